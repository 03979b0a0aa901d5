"""Splicing an SAE into the forward pass at its site, exactly, and editing its features.

**The exact splice.** At the SAE's site the activation ``x`` ``[batch, pos, *site shape]``
becomes::

    x'  = decode(f') + error,   error = x - decode(encode(x))     (keep_error=True)
        = x + (decode(f') - decode(f))   at positions where f' != f, x itself elsewhere

so an edit that changes nothing leaves the run bit-for-bit unchanged; ``keep_error=False``
replaces ``x`` by ``decode(f')`` (the SAE "spliced in" without its error term). ``f``
``[batch, pos, d_sae]`` is ``encode(x)``; ``f'`` is ``f`` after the feature edits
(:func:`edit_features`, or any intervention on ``{site}.sae.features``).

**Names.** An attached SAE's values are named ``{site}.sae.{leaf}`` for the leaves
:data:`SAE_LEAVES`: ``features`` ``[batch, pos, d_sae]``, ``error``, ``recons``, ``input`` and
``output`` (each ``[batch, pos, *site shape]``); the SAELens spellings
``{hook_name}.hook_sae_acts_post``, ``.hook_sae_error``, ``.hook_sae_recons``,
``.hook_sae_input`` and ``.hook_sae_output`` work too. ``features`` and ``error`` may be
edited (:data:`EDITABLE_LEAVES`), the others are read-only.

**In a trace.** :func:`attach_saes` binds the SAEs given as ``model.trace(..., saes=[...])``
and returns them as an :class:`SAESplices`: the splice set the trace runs. Each
:class:`SAESplice` implements the trace's splice protocol (:class:`causalpatch.tracing.Splice`:
a site, named values, a hook function), so the trace knows nothing about SAEs.

**For the methods.** :func:`features_component` finds the SAE a sweep's
``component='{site}.sae.features'`` names, and :func:`feature_edit_values` computes the site's
activation after setting one feature (the exact splice at a handful of positions).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..errors import (InvalidArgumentError, InvalidTypeError, OutOfRangeError, ShapeMismatchError,
                      UnknownComponentError)
from ..interventions import Index, Intervention
from .model import BoundSAE, bind_saes

if TYPE_CHECKING:
    from ..model import HookedModel
    from ..names import Site

#: Names of an attached SAE's values, as in ``blocks.20.resid_post.sae.features``.
SAE_LEAVES = ("features", "error", "recons", "input", "output")
#: SAELens hook names (``{hook_name}.hook_sae_acts_post``) -> :data:`SAE_LEAVES`.
SAELENS_LEAVES = {"hook_sae_acts_post": "features", "hook_sae_error": "error",
                  "hook_sae_recons": "recons", "hook_sae_input": "input",
                  "hook_sae_output": "output"}
#: Leaves an intervention may edit (the others are read-only).
EDITABLE_LEAVES = ("features", "error")


def split_sae_name(name: str) -> tuple[str, str] | None:
    """``"blocks.20.resid_post.sae.features"`` -> ``("blocks.20.resid_post", "features")``;
    also the SAELens spelling ``"blocks.20.hook_resid_post.hook_sae_acts_post"``. ``None`` if
    ``name`` names no SAE value."""
    if not isinstance(name, str):
        return None
    match = re.fullmatch(r"(.+)\.sae\.([a-z_]+)", name)
    if match is not None:
        return match.group(1), match.group(2)
    match = re.fullmatch(r"(.+)\.(hook_sae_[a-z_]+)", name)
    if match is not None and match.group(2) in SAELENS_LEAVES:
        return match.group(1), SAELENS_LEAVES[match.group(2)]
    return None


def lookup_sae(model: HookedModel, bound: Mapping[str, BoundSAE], name: str
               ) -> tuple[BoundSAE, str] | None:
    """``(bound SAE, leaf)`` for an SAE value name, ``None`` for other names.

    Raises:
        UnknownComponentError: the name has an SAE suffix but no SAE sits at that site, or the
            leaf is unknown.
    """
    parsed = split_sae_name(name)
    if parsed is None:
        return None
    prefix, leaf = parsed
    if leaf not in SAE_LEAVES:
        raise UnknownComponentError(f"unknown SAE value {leaf!r} in {name!r}; expected one of "
                                    f"{', '.join(SAE_LEAVES)}")
    site = model.site(prefix)
    if site.name not in bound:
        attached = ", ".join(bound) or "none"
        raise UnknownComponentError(
            f"{name!r} names an SAE value at {site.name}, but no SAE is attached there "
            f"(attached: {attached}); pass saes=[sae] with an SAE for that site")
    return bound[site.name], leaf


def features_component(model: HookedModel, component: Any, saes: Sequence[Any] | None
                       ) -> BoundSAE | None:
    """The attached SAE when ``component`` names SAE features (``{site}.sae.features``), else
    ``None`` (then ``saes`` must not be given).

    Raises:
        InvalidArgumentError: SAE features named without ``saes``, another SAE value named, or
            ``saes`` given for a component that is not SAE features.
    """
    parsed = split_sae_name(component) if isinstance(component, str) else None
    if parsed is None:
        if saes:
            raise InvalidArgumentError(
                f"saes= is given but component {component!r} does not name SAE features; use "
                "component='<site>.sae.features' (e.g. 'blocks.20.resid_post.sae.features')")
        return None
    bound = bind_saes(model, saes)
    if not bound:
        raise InvalidArgumentError(f"component {component!r} names SAE features: pass the SAE "
                                   "with saes=[sae]")
    found = lookup_sae(model, bound, component)
    assert found is not None
    if found[1] != "features":
        raise InvalidArgumentError(f"component {component!r}: only SAE features can be swept; "
                                   f"use {found[0].value_name('features')!r}")
    return found[0]


# -- the splice ---------------------------------------------------------------------------------
def _position_mask(new: torch.Tensor, old: torch.Tensor, n_trailing: int) -> torch.Tensor:
    """``[..., 1 x n_trailing]`` True where ``new`` and ``old`` differ anywhere in the trailing
    ``n_trailing`` dims."""
    differ = new != old
    for _ in range(n_trailing):
        differ = differ.any(-1)
    return differ.reshape(*differ.shape, *([1] * n_trailing))


def splice(bound: BoundSAE, feature_edits: Sequence[Callable[[torch.Tensor], torch.Tensor]] = (),
           error_edits: Sequence[Callable[[torch.Tensor], torch.Tensor]] = (),
           keep_error: bool = True,
           record: Callable[[str, torch.Tensor], None] | None = None,
           wants: Iterable[str] = ()) -> Callable[[torch.Tensor], torch.Tensor | None]:
    """A hook function splicing ``bound`` into the forward pass at its site.

    ``x -> x + (decode(f') - decode(f)) + (error' - error)`` at the positions where the edits
    changed something (``x`` itself elsewhere, bit for bit), or ``decode(f')`` everywhere with
    ``keep_error=False``. ``f = encode(x)``; ``f'`` / ``error'`` are ``f`` / ``error`` after
    ``feature_edits`` / ``error_edits`` (in order).

    Args:
        record: called with ``(leaf, tensor)`` for every leaf in ``wants``.
    """
    wants = set(wants)
    n_trailing = len(bound.feature_shape)

    def run(act: torch.Tensor) -> torch.Tensor | None:
        if "input" in wants and record is not None:
            record("input", act)
        f = bound.encode(act)
        edited = f
        for edit in feature_edits:
            edited = edit(edited)
        if "features" in wants and record is not None:
            record("features", edited)
        f_changed = edited is not f and not torch.equal(edited, f)
        need_error = bool(error_edits) or "error" in wants
        need_recon1 = f_changed or not keep_error or "recons" in wants
        recon0 = bound.decode(f) if (need_error or (keep_error and f_changed)
                                     or (need_recon1 and not f_changed)) else None
        recon1 = (recon0 if not f_changed else bound.decode(edited)) if need_recon1 else None
        error = new_error = None
        if need_error:
            assert recon0 is not None
            error = act.float() - recon0.float()
            new_error = error
            for edit in error_edits:
                new_error = edit(new_error)
            if "error" in wants and record is not None:
                record("error", new_error)
        if "recons" in wants and record is not None:
            assert recon1 is not None  # "recons" wanted: need_recon1
            record("recons", recon1)
        if not keep_error:
            assert recon1 is not None  # not keep_error: need_recon1
            new: torch.Tensor | None = recon1.to(act.dtype)
        else:
            out = act.float()
            changed = False
            if f_changed:
                assert recon0 is not None and recon1 is not None  # f_changed: both decoded
                mask = _position_mask(edited, f, 1)[..., 0].reshape(
                    *f.shape[:-1], *([1] * n_trailing))
                out = torch.where(mask, out + (recon1.float() - recon0.float()), out)
                changed = True
            if (error is not None and new_error is not None  # set together (need_error)
                    and new_error is not error and not torch.equal(new_error, error)):
                mask = _position_mask(new_error, error, n_trailing)
                out = torch.where(mask, out + (new_error - error), out)
                changed = True
            new = out.to(act.dtype) if changed else None
        if "output" in wants and record is not None:
            record("output", act if new is None else new)
        return new

    return run


@dataclass(frozen=True, eq=False)
class SAESplice:
    """One SAE attached to a trace: the trace's :class:`~causalpatch.tracing.Splice` for it.

    Its leaves are :data:`SAE_LEAVES`, named ``{site}.sae.{leaf}``; ``features``
    ``[batch, pos, d_sae]`` and ``error`` ``[batch, pos, *site shape]`` may be edited (``error``
    only with ``keep_error``), and are what ``cache=True`` records.

    Attributes:
        bound: the SAE, bound to its site.
        keep_error: splice exactly (``decode(f') + error``) or drop the error term.
    """

    bound: BoundSAE
    keep_error: bool = True
    cached_by_default: ClassVar[tuple[str, ...]] = ("features", "error")

    @property
    def site(self) -> Site:
        return self.bound.site

    def value_name(self, leaf: str) -> str:
        """``"blocks.20.resid_post.sae.features"`` for ``leaf="features"``."""
        return self.bound.value_name(leaf)

    def edit_shape(self, leaf: str, name: str) -> tuple[int, ...]:
        """``(d_sae,)`` for ``features``, the site's shape for ``error``.

        Raises:
            InvalidArgumentError: ``leaf`` is read-only, or it is ``error`` and the error term
                is dropped (``keep_error=False``).
        """
        if leaf not in EDITABLE_LEAVES:
            raise InvalidArgumentError(
                f"{name!r} is read-only; intervene on {self.value_name('features')!r} or "
                f"{self.value_name('error')!r}")
        if leaf == "error" and not self.keep_error:
            raise InvalidArgumentError(
                f"an intervention on {name!r} needs the error term: keep_error=False drops "
                "it")
        return (self.bound.d_sae,) if leaf == "features" else self.bound.feature_shape

    def hook(self, edits: Mapping[str, Sequence[Callable[[torch.Tensor], torch.Tensor]]],
             record: Callable[[str, torch.Tensor], None], wants: Collection[str]
             ) -> Callable[[torch.Tensor], torch.Tensor | None] | None:
        """:func:`splice` with the ``features`` / ``error`` edits, or ``None`` when the exact
        splice would read and change nothing (it would be the identity)."""
        if self.keep_error and not wants and not any(edits.values()):
            return None
        return splice(self.bound, edits.get("features", ()), edits.get("error", ()),
                      self.keep_error, record, wants)


class SAESplices(Mapping[str, SAESplice]):
    """The SAEs attached to one trace (site name -> :class:`SAESplice`): the trace's
    :class:`~causalpatch.tracing.SpliceSet`, which also parses SAE value names."""

    def __init__(self, model: HookedModel, bound: Mapping[str, BoundSAE],
                 keep_error: bool = True) -> None:
        self.model = model
        self.bound = dict(bound)
        self.splices = {name: SAESplice(b, keep_error) for name, b in self.bound.items()}

    def __getitem__(self, site: str) -> SAESplice:
        return self.splices[site]

    def __iter__(self) -> Iterator[str]:
        return iter(self.splices)

    def __len__(self) -> int:
        return len(self.splices)

    def lookup(self, name: str) -> tuple[SAESplice, str] | None:
        """``(splice, leaf)`` for an SAE value name (:func:`lookup_sae`), ``None`` otherwise.

        Raises:
            UnknownComponentError: the name has an SAE suffix but no SAE sits at that site, or
                the leaf is unknown.
        """
        found = lookup_sae(self.model, self.bound, name)
        return None if found is None else (self.splices[found[0].name], found[1])


def attach_saes(model: HookedModel, saes: Sequence[Any] | Any | None,
                keep_error: bool = True) -> SAESplices:
    """Bind ``saes`` to ``model`` (:func:`~causalpatch.sae.bind_saes`: sites and widths are
    checked before any forward pass) as the splice set of a trace
    (``model.trace(..., saes=saes, keep_error=keep_error)``)."""
    return SAESplices(model, bind_saes(model, saes), keep_error)


class FeatureEdit(Intervention):
    """Set, scale or shift chosen SAE features (an intervention on ``{site}.sae.features``).

    Args:
        features: feature indices.
        value: replacement value(s), broadcasting to ``[batch, n_positions, n_features]``.
        scale: multiply the features by this.
        add: add this to the features.
        positions: token positions (negative count from the end); default all.
    """

    def __init__(self, features: Sequence[int] | int, *, value: Any = None,
                 scale: float | None = None, add: float | None = None,
                 positions: Index = None) -> None:
        super().__init__(positions, None)
        # a bool joins the list as an int does, and is rejected just below
        feats = [features] if isinstance(features, int) else list(features)
        if not feats or any(isinstance(j, bool) or not isinstance(j, int) for j in feats):
            raise InvalidTypeError(f"features must be a non-empty list of ints, got {features!r}")
        if sum(x is not None for x in (value, scale, add)) != 1:
            raise InvalidArgumentError("give exactly one of value=, scale= or add=")
        self.features = feats
        self.value = None if value is None else torch.as_tensor(value).detach().clone()
        self.scale = scale
        self.add = add

    def validate(self, shape: tuple[int, ...], site: str = "") -> None:
        super().validate(shape, site)
        d_sae = shape[-1]
        for j in self.features:
            if not 0 <= j < d_sae:
                where = f" at {site!r}" if site else ""
                raise OutOfRangeError(f"feature {j} of FeatureEdit{where} is out of range: the "
                                      f"SAE has {d_sae} features, so indices must be in "
                                      f"[0, {d_sae - 1}]")
        if self.value is not None:
            target = (*self.selected_shape(shape)[:-1], len(self.features))
            try:
                fits = torch.broadcast_shapes(tuple(self.value.shape), target) == target
            except RuntimeError:
                fits = False
            if not fits:
                raise ShapeMismatchError(
                    f"FeatureEdit value has shape {tuple(self.value.shape)}, which does not "
                    f"broadcast to [batch, positions, features] = {target}")

    def transform(self, selected: torch.Tensor) -> torch.Tensor:
        out = selected.clone()
        idx = torch.tensor(self.features, device=selected.device)
        current = out[..., idx]
        if self.value is not None:
            new = self.value.to(selected.device, selected.dtype).expand_as(current)
        elif self.scale is not None:
            new = current * self.scale
        else:
            assert self.add is not None  # exactly one of value, scale and add is given
            new = current + self.add
        out[..., idx] = new
        return out

    def __repr__(self) -> str:
        return (f"FeatureEdit(features={self.features}, value={self.value}, scale={self.scale}, "
                f"add={self.add}, positions={self.positions})")


def edit_features(features: Sequence[int] | int, *, value: Any = None,
                  scale: float | None = None, add: float | None = None,
                  positions: Index = None) -> FeatureEdit:
    """An intervention on ``{site}.sae.features``: set (``value=``), scale or shift features.

    Example::

        model.trace(prompt, saes=[sae], interventions={
            "blocks.20.resid_post.sae.features": edit_features([12, 40], value=0.0,
                                                               positions=[-1])})
    """
    return FeatureEdit(features, value=value, scale=scale, add=add, positions=positions)


def feature_edit_values(bound: BoundSAE, act: torch.Tensor, feature: int,
                        new: torch.Tensor) -> torch.Tensor:
    """The activation after setting one feature, error term kept: ``act + decode(f') -
    decode(f)`` where ``f = encode(act)`` and ``f'`` is ``f`` with ``f[..., feature] = new``;
    positions whose features do not change keep ``act`` exactly.

    Args:
        act: ``[pos, *feature_shape]`` the site's activation at the positions to edit.
        new: ``[pos]`` the feature's new value at each position.

    Returns:
        ``[pos, *feature_shape]`` in ``act``'s dtype.
    """
    f = bound.encode(act)  # [pos, d_sae]
    edited = f.clone()
    edited[:, feature] = new.to(f.device, f.dtype)
    changed = (edited != f).any(-1).reshape(-1, *([1] * len(bound.feature_shape)))
    delta = bound.decode(edited).float() - bound.decode(f).float()
    return torch.where(changed, act.float() + delta, act.float()).to(act.dtype)

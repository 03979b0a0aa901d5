"""The :class:`Trace` context: one forward pass, read activations and intervene.

With ``saes=[sae]`` the SAEs are spliced in at their sites (:func:`causalpatch.sae.splice`):
``{site}.sae.features`` (and ``.sae.error``, ``.sae.recons``, ``.sae.input``, ``.sae.output``)
become names like any other, to cache and (features, error) to intervene on. With the default
``keep_error=True`` the spliced activation is ``decode(f') + error``, so a no-op edit leaves
the run bit-for-bit unchanged; ``keep_error=False`` drops the error term (the model then runs
on the SAE's reconstruction at that site).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .errors import InvalidArgumentError, InvalidTypeError
from .hooks import Hook, hooked
from .interventions import Intervention, as_intervention
from .sae import EDITABLE_LEAVES, BoundSAE, bind_saes, lookup_sae, splice
from .tokens import Batch, Prompts, make_batch, token_lists

if TYPE_CHECKING:
    from .model import HookedModel


class Trace:
    """Result of one forward pass with caching and interventions.

    Use as a context manager (the forward runs on entry)::

        with model.trace(["A prompt", "Another"], cache=["blocks.3.mlp"]) as tr:
            acts = tr.cache["blocks.3.mlp"]   # [batch, pos, d_model]
            logits = tr.logits                # [batch, pos, vocab]

    With sparse autoencoders attached (``saes=[sae]``), their values are names too::

        with model.trace(prompt, saes=[sae], cache=["blocks.20.resid_post.sae.features"],
                         interventions={"blocks.20.resid_post.sae.features":
                                        edit_features([7], value=0.0)}) as tr:
            f = tr.cache["blocks.20.resid_post.sae.features"]   # [batch, pos, d_sae]

    Attributes:
        logits: ``[batch, pos, vocab]``; padded positions hold whatever the model computed.
        last_logits: ``[batch, vocab]`` at each row's last real token.
        cache: site name -> activation ``[batch, pos, ...]`` (detached clones).
        batch: the :class:`Batch` that was run.
        saes: site name -> the attached :class:`~causalpatch.sae.BoundSAE`.
    """

    def __init__(self, model: HookedModel, prompts: Prompts,
                 interventions: Mapping[str, Any] | None = None,
                 cache: Sequence[str] | bool | str | None = None,
                 saes: Sequence[Any] | None = None, keep_error: bool = True) -> None:
        self.model = model
        rows = token_lists(model, prompts)
        self.batch = make_batch(rows, model.pad_token_id, model.device)
        self.saes: dict[str, BoundSAE] = bind_saes(model, saes)
        self._plan = _plan(model, self.batch, interventions or {}, cache, self.saes,
                           bool(keep_error))
        self.cache: dict[str, torch.Tensor] = {}
        self.logits: torch.Tensor | None = None
        self._ran = False

    # seed-style aliases
    @property
    def activations(self) -> dict[str, torch.Tensor]:
        return self.cache

    @property
    def output(self) -> torch.Tensor | None:
        return self.logits

    @property
    def last_logits(self) -> torch.Tensor:
        assert self.logits is not None
        rows = torch.arange(self.logits.shape[0], device=self.logits.device)
        return self.logits[rows, self.batch.last_index]

    def run(self) -> Trace:
        if self._ran:
            return self
        hooks: list[Hook] = []
        for site, ivs in self._plan.interventions:
            hooks += [Hook(site, iv) for iv in ivs]
        for sp in self._plan.splices:  # after the site's own interventions, before its cache
            if self._plan.keep_error and not sp.names and not any(sp.edits.values()):
                continue  # nothing to read or change: the splice would be the identity
            hooks.append(Hook(sp.bound.site, splice(
                sp.bound, sp.edits["features"], sp.edits["error"], self._plan.keep_error,
                _sae_recorder(self.cache, sp), wants=sp.names)))
        for requested, site in zip(self._plan.cache_names, self._plan.cache_sites):
            hooks.append(Hook(site, _cacher(self.cache, site.name, requested)))
        with torch.no_grad():
            self.logits = self.model.forward(self.batch, hooks)
        self._ran = True
        return self

    def __enter__(self) -> Trace:
        return self.run()

    def __exit__(self, *exc: object) -> None:
        return None


def _cacher(store: dict[str, torch.Tensor], name: str, requested: str | None = None):
    """Store under the canonical ``name`` and under the ``requested`` name (a raw module path
    or TransformerLens name), so ``cache[what_the_user_asked_for]`` works."""
    def save(act: torch.Tensor) -> None:
        store[name] = act.detach().clone()
        if requested is not None and requested != name:
            store[requested] = store[name]
        return None

    return save


@dataclass
class _Splice:
    """One attached SAE in a trace: its edits, and the names to cache per value."""

    bound: BoundSAE
    edits: dict[str, list[Intervention]] = field(
        default_factory=lambda: {leaf: [] for leaf in EDITABLE_LEAVES})
    names: dict[str, list[str]] = field(default_factory=dict)  # leaf -> requested names


def _sae_recorder(store: dict[str, torch.Tensor], sp: _Splice):
    """Store an SAE value under its canonical name and every requested spelling."""
    def record(leaf: str, value: torch.Tensor) -> None:
        for name in sp.names.get(leaf, ()):
            store[name] = value.detach().clone()

    return record


@dataclass
class _Plan:
    interventions: list[tuple[Any, list[Intervention]]]
    cache_sites: list[Any]
    cache_names: list[str]
    splices: list[_Splice] = field(default_factory=list)
    keep_error: bool = True


def _plan(model: HookedModel, batch: Batch, interventions: Mapping[str, Any],
          cache: Sequence[str] | bool | str | None, saes: Mapping[str, BoundSAE] | None = None,
          keep_error: bool = True) -> _Plan:
    """Resolve names and validate every intervention before anything runs."""
    if not isinstance(interventions, Mapping):
        raise InvalidTypeError(
            "interventions must be a dict {component name: intervention or list of them}, got "
            f"{type(interventions).__name__}")
    saes = saes or {}
    splices = {name: _Splice(bound) for name, bound in saes.items()}
    n_rows, n_pos = batch.input_ids.shape[0], batch.input_ids.shape[1]
    planned = []
    for name, value in interventions.items():
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        ivs = [as_intervention(v, name) for v in items]
        found = lookup_sae(model, saes, name)
        if found is not None:
            bound, leaf = found
            if leaf not in EDITABLE_LEAVES:
                raise InvalidArgumentError(
                    f"{name!r} is read-only; intervene on {bound.value_name('features')!r} or "
                    f"{bound.value_name('error')!r}")
            if leaf == "error" and not keep_error:
                raise InvalidArgumentError(
                    f"an intervention on {name!r} needs the error term: keep_error=False drops "
                    "it")
            width = (bound.d_sae,) if leaf == "features" else bound.feature_shape
            for iv in ivs:
                iv.validate((n_rows, n_pos, *width), name)
            splices[bound.name].edits[leaf] += ivs
            continue
        site = model.site(name)
        feat = site.feature_shape(model.dims)
        if feat is not None:
            shape = (n_rows, n_pos, *feat)
            for iv in ivs:
                iv.validate(shape, name)
        planned.append((site, ivs))
    if cache is True:
        names = model.component_names() + [b.value_name(leaf) for b in saes.values()
                                           for leaf in ("features", "error")]
    elif cache in (None, False):
        names = []
    elif isinstance(cache, str):
        names = [cache]
    else:
        names = list(cache)
    site_names = []
    for name in names:
        found = lookup_sae(model, saes, name)
        if found is None:
            site_names.append(name)
            continue
        bound, leaf = found
        requested = splices[bound.name].names.setdefault(leaf, [])
        requested += [n for n in dict.fromkeys([bound.value_name(leaf), name])
                      if n not in requested]
    return _Plan(planned, [model.site(n) for n in site_names], site_names,
                 list(splices.values()), keep_error)

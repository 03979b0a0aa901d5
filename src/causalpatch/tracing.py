"""The :class:`Trace` context: one forward pass, read activations and intervene.

With ``saes=[sae]`` the SAEs are spliced in at their sites (:func:`causalpatch.sae.splice`):
``{site}.sae.features`` (and ``.sae.error``, ``.sae.recons``, ``.sae.input``, ``.sae.output``)
become names like any other, to cache and (features, error) to intervene on. With the default
``keep_error=True`` the spliced activation is ``decode(f') + error``, so a no-op edit leaves
the run bit-for-bit unchanged; ``keep_error=False`` drops the error term (the model then runs
on the SAE's reconstruction at that site).

Reading values, the seeds' way:

* ``tr.cache`` (also ``tr.activations``) is an :class:`ActivationCache`: keyed by the names you
  asked for, and any other spelling of the same site works as a key too (``layers.10.mlp``,
  ``blocks.10.mlp``, ``model.model.layers.10.mlp``, ``blocks.10.hook_mlp_out``).
* A name that was not cached is read by running the same forward pass once more (same prompts,
  interventions, SAEs and random-number state) with every component cached; so
  ``tr.activations["model.model.layers.10.mlp"]`` works without ``cache=``.
* ``tr.output`` and the values of ``model.output`` / ``model.layers[i].output`` inside a
  ``with model.trace(...)`` block are tensors with a ``.save()`` method (it returns the plain
  tensor), as in the seeds.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .errors import CausalPatchError, InvalidArgumentError, InvalidTypeError
from .hooks import Hook, hooked
from .interventions import Intervention, as_intervention
from .sae import EDITABLE_LEAVES, BoundSAE, bind_saes, lookup_sae, splice
from .tokens import Batch, Prompts, make_batch, token_lists

if TYPE_CHECKING:
    from .model import HookedModel


class SavedTensor(torch.Tensor):
    """A tensor with the seeds' ``.save()`` (``model.output.save()``); it returns the plain
    tensor. Every operation on a ``SavedTensor`` (indexing, arithmetic) gives a plain tensor."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    def save(self) -> torch.Tensor:
        """The value as a plain ``torch.Tensor`` (already computed: the forward has run)."""
        return self.as_subclass(torch.Tensor)

    def __repr__(self, *args: Any, **kwargs: Any) -> str:
        return repr(self.as_subclass(torch.Tensor))


def saved(value: torch.Tensor | None) -> SavedTensor | None:
    """``value`` viewed as a :class:`SavedTensor` (no copy)."""
    return None if value is None else value.as_subclass(SavedTensor)


class ActivationCache(dict):
    """Activations keyed by the names they were asked for; every spelling of a site works.

    ``cache["layers.10.mlp"]``, ``cache["blocks.10.mlp"]`` and
    ``cache["model.model.layers.10.mlp"]`` are the same tensor whichever of them was
    requested; iterating, ``len`` and ``==`` see only the requested names. ``name in cache`` and
    ``cache.get(name)`` accept any spelling too. In a :class:`Trace`, ``cache[name]`` for a name
    that was not cached computes it (one more forward pass, see :meth:`Trace.run`);
    ``in``/``get`` never do.
    """

    def __init__(self, canonical: Callable[[str], str] | None = None,
                 fill: Callable[[str], torch.Tensor] | None = None) -> None:
        super().__init__()
        self._canonical_of = canonical
        self._fill = fill
        self._by_canonical: dict[str, str] = {}

    def store(self, key: str, canonical: str, value: torch.Tensor) -> None:
        """Record ``value`` under ``key`` (the requested spelling) for site ``canonical``."""
        dict.__setitem__(self, key, value)
        self._by_canonical.setdefault(canonical, key)

    def _canonical(self, name: Any) -> str | None:
        if not isinstance(name, str) or self._canonical_of is None:
            return None
        try:
            return self._canonical_of(name)
        except CausalPatchError:
            return None

    def _key(self, name: Any) -> Any:
        if dict.__contains__(self, name):
            return name
        canonical = self._canonical(name)
        return None if canonical is None else self._by_canonical.get(canonical)

    def __getitem__(self, name: Any) -> torch.Tensor:
        key = self._key(name)
        if key is not None:
            return dict.__getitem__(self, key)
        if self._fill is not None and isinstance(name, str):
            value = self._fill(name)
            canonical = self._canonical(name)
            self.store(name, name if canonical is None else canonical, value)
            return value
        known = ", ".join(map(repr, list(self)[:8])) or "nothing"
        raise KeyError(f"{name!r} was not cached (cached: {known}{', ...' if len(self) > 8 else ''}"
                       "); pass cache=[...] / names=[...] with it")

    def __contains__(self, name: object) -> bool:
        return self._key(name) is not None

    def get(self, name: Any, default: Any = None) -> Any:
        key = self._key(name)
        return default if key is None else dict.__getitem__(self, key)

    def __copy__(self) -> ActivationCache:
        new = ActivationCache(self._canonical_of, None)
        for key, value in self.items():
            new.store(key, self._canonical(key) or key, value)
        return new

    def copy(self) -> ActivationCache:
        return self.__copy__()


_OPEN = threading.local()


def current_trace(model: Any) -> Trace | None:
    """The innermost ``with model.trace(...)`` block open in this thread for ``model``."""
    for tr in reversed(getattr(_OPEN, "stack", [])):
        if tr.model is model:
            return tr
    return None


class Trace:
    """Result of one forward pass with caching and interventions.

    Use as a context manager (the forward runs on entry)::

        with model.trace(["A prompt", "Another"], cache=["blocks.3.mlp"]) as tr:
            acts = tr.cache["blocks.3.mlp"]   # [batch, pos, d_model]
            logits = tr.logits                # [batch, pos, vocab]

    The seeds' spellings work as well::

        with model.trace("Paris is the capital of France") as trace:
            mlp = trace.activations["model.model.layers.10.mlp"]   # computed on first read
            out = model.output.save()                                # the logits
            h = model.layers[10].output.save()                       # blocks.10.resid_post

    With sparse autoencoders attached (``saes=[sae]``), their values are names too::

        with model.trace(prompt, saes=[sae], cache=["blocks.20.resid_post.sae.features"],
                         interventions={"blocks.20.resid_post.sae.features":
                                        edit_features([7], value=0.0)}) as tr:
            f = tr.cache["blocks.20.resid_post.sae.features"]   # [batch, pos, d_sae]

    Attributes:
        logits: ``[batch, pos, vocab]``; padded positions hold whatever the model computed.
        output: ``logits`` with a ``.save()`` method (the seeds' ``tr.output.save()``).
        last_logits: ``[batch, vocab]`` at each row's last real token.
        cache: an :class:`ActivationCache`, requested name -> activation ``[batch, pos, ...]``
            (detached clones); any spelling of a cached site works as a key. ``activations``
            is the same object.
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
        self._interventions = interventions or {}
        self._keep_error = bool(keep_error)
        self._plan = _plan(model, self.batch, self._interventions, cache, self.saes,
                           self._keep_error)
        self.cache = ActivationCache(self.canonical_name, self._compute)
        self.logits: torch.Tensor | None = None
        self._ran = False
        self._rng: tuple[torch.Tensor, list[torch.Tensor]] | None = None
        self._more: dict[str, torch.Tensor] = {}  # canonical name -> value from a re-run
        self._everything = False  # whether a re-run cached every component

    # seed-style aliases
    @property
    def activations(self) -> ActivationCache:
        return self.cache

    @property
    def output(self) -> SavedTensor | None:
        return saved(self.logits)

    @property
    def last_logits(self) -> torch.Tensor:
        assert self.logits is not None
        rows = torch.arange(self.logits.shape[0], device=self.logits.device)
        return self.logits[rows, self.batch.last_index]

    def canonical_name(self, name: str) -> str:
        """The canonical spelling of ``name`` (a site or an attached SAE's value)."""
        found = lookup_sae(self.model, self.saes, name)
        if found is not None:
            return found[0].value_name(found[1])
        return self.model.site(name).name

    def value(self, name: str) -> SavedTensor:
        """The activation ``name`` of this pass (computed if it was not cached), ``.save()``-able."""
        out = saved(self.cache[name])
        assert out is not None
        return out

    def run(self) -> Trace:
        if self._ran:
            return self
        self._rng = _rng_state(self.model.device)
        self.logits = self._forward(self._plan, self.cache)
        self._ran = True
        return self

    def _forward(self, plan: _Plan, store: ActivationCache) -> torch.Tensor:
        hooks: list[Hook] = []
        for site, ivs in plan.interventions:
            hooks += [Hook(site, iv) for iv in ivs]
        for sp in plan.splices:  # after the site's own interventions, before its cache
            if plan.keep_error and not sp.names and not any(sp.edits.values()):
                continue  # nothing to read or change: the splice would be the identity
            hooks.append(Hook(sp.bound.site, splice(
                sp.bound, sp.edits["features"], sp.edits["error"], plan.keep_error,
                _sae_recorder(store, sp), wants=sp.names)))
        for requested, site in zip(plan.cache_names, plan.cache_sites):
            hooks.append(Hook(site, _cacher(store, site.name, requested)))
        with torch.no_grad():
            return self.model.forward(self.batch, hooks)

    def _compute(self, name: str) -> torch.Tensor:
        """``name``'s value in this pass: the same forward run again with every component
        (and ``name``) cached, with the random-number state of the first run, so random
        interventions draw the same numbers. At most one such re-run caches everything; a raw
        module path outside the canonical names costs one more."""
        if not self._ran:
            raise InvalidArgumentError(
                f"{name!r} is read before the forward pass ran: use `with model.trace(...) as "
                "tr:` or call tr.run() first")
        try:
            canonical = self.canonical_name(name)
        except CausalPatchError as exc:
            raise KeyError(f"{name!r}: {exc}") from None
        if canonical not in self._more:
            everything = not self._everything
            names = [name]
            if everything:  # every canonical component and SAE value, as cache=True
                names = self.model.component_names() + [
                    b.value_name(leaf) for b in self.saes.values()
                    for leaf in ("features", "error")] + [name]
            plan = _plan(self.model, self.batch, self._interventions, names, self.saes,
                         self._keep_error)
            store = ActivationCache(self.canonical_name)
            with _replayed_rng(self._rng, self.model.device):
                self._forward(plan, store)
            self._everything = self._everything or everything
            for key in store:
                self._more.setdefault(self.canonical_name(key), store[key])
        if canonical not in self._more:
            raise KeyError(f"{name!r} has no value in this forward pass")
        return self._more[canonical]

    def __enter__(self) -> Trace:
        self.run()
        stack = getattr(_OPEN, "stack", None)
        if stack is None:
            stack = _OPEN.stack = []
        stack.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        stack = getattr(_OPEN, "stack", [])
        if self in stack:
            del stack[len(stack) - 1 - stack[::-1].index(self)]
        return None


def _rng_state(device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]]:
    cuda = [torch.cuda.get_rng_state(device)] if device.type == "cuda" else []
    return torch.get_rng_state(), cuda


class _replayed_rng:
    """Run a block with the random-number state of ``state``; restore the current one after."""

    def __init__(self, state: tuple[torch.Tensor, list[torch.Tensor]] | None,
                 device: torch.device) -> None:
        self.state, self.device = state, device

    def __enter__(self) -> None:
        self.saved = _rng_state(self.device)
        if self.state is not None:
            torch.set_rng_state(self.state[0])
            for s in self.state[1]:
                torch.cuda.set_rng_state(s, self.device)

    def __exit__(self, *exc: object) -> None:
        torch.set_rng_state(self.saved[0])
        for s in self.saved[1]:
            torch.cuda.set_rng_state(s, self.device)


def _cacher(store: ActivationCache, name: str, requested: Sequence[str]):
    """Store under each ``requested`` spelling (any spelling of the canonical ``name`` then
    finds it)."""
    def save(act: torch.Tensor) -> None:
        value = act.detach().clone()
        for key in requested:
            store.store(key, name, value)
        return None

    return save


@dataclass
class _Splice:
    """One attached SAE in a trace: its edits, and the names to cache per value."""

    bound: BoundSAE
    edits: dict[str, list[Intervention]] = field(
        default_factory=lambda: {leaf: [] for leaf in EDITABLE_LEAVES})
    names: dict[str, list[str]] = field(default_factory=dict)  # leaf -> requested names


def _sae_recorder(store: ActivationCache, sp: _Splice):
    """Store an SAE value under every requested spelling."""
    def record(leaf: str, value: torch.Tensor) -> None:
        value = value.detach().clone()
        for name in sp.names.get(leaf, ()):
            store.store(name, sp.bound.value_name(leaf), value)

    return record


@dataclass
class _Plan:
    interventions: list[tuple[Any, list[Intervention]]]
    cache_sites: list[Any]
    cache_names: list[list[str]]  # per cached site, the spellings it was requested under
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
    by_site: dict[str, tuple[Any, list[str]]] = {}  # one hook per site, every spelling kept
    for name in names:
        found = lookup_sae(model, saes, name)
        if found is None:
            site = model.site(name)
            spellings = by_site.setdefault(site.name, (site, []))[1]
            if name not in spellings:
                spellings.append(name)
            continue
        bound, leaf = found
        requested = splices[bound.name].names.setdefault(leaf, [])
        if name not in requested:
            requested.append(name)
    return _Plan(planned, [site for site, _ in by_site.values()],
                 [spellings for _, spellings in by_site.values()], list(splices.values()),
                 keep_error)

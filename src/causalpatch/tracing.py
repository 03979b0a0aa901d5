"""The :class:`Trace` context: one forward pass, read activations and intervene.

**Splices.** A trace may run with a set of :class:`Splice` objects: each sits at one site,
turns the site's activation ``[batch, pos, *site shape]`` into a new one, and exposes named
values computed on the way, which become names like any other, to cache and (the editable
ones) to intervene on; interventions on a value reach the splice as edits. The trace knows only
this protocol. Sparse autoencoders are the splices causalpatch ships:
``model.trace(..., saes=[sae])`` attaches them (:func:`causalpatch.sae.attach_saes`), and
``{site}.sae.features`` ``[batch, pos, d_sae]`` (and ``.sae.error``, ``.sae.recons``,
``.sae.input``, ``.sae.output``) are their values; the exact splice keeps the SAE's error term,
so a no-op edit leaves the run bit-for-bit unchanged (:mod:`causalpatch.sae.splicing`).

Reading values, the seeds' way:

* ``tr.cache`` (also ``tr.activations``) is an :class:`ActivationCache`: keyed by the names you
  asked for, and any other spelling of the same site works as a key too (``layers.10.mlp``,
  ``blocks.10.mlp``, ``model.model.layers.10.mlp``, ``blocks.10.hook_mlp_out``).
* A name that was not cached is read by running the same forward pass once more (same prompts,
  interventions, splices and random-number state) with every component cached; so
  ``tr.activations["model.model.layers.10.mlp"]`` works without ``cache=``.
* ``tr.output`` and the values of ``model.output`` / ``model.layers[i].output`` inside a
  ``with model.trace(...)`` block are tensors with a ``.save()`` method, as in the seeds.

Writing values, nnsight's way: inside the block, ``model.layers[i].output[:] = x``,
``.output[:, p] = x``, ``.output[0][:, p] = x`` (a view) and ``.output = x`` take effect: each
write is recorded as an intervention at its site (:class:`TracedTensor`, :meth:`Trace.write`)
and the pass runs again before the next read. Writes that cannot take effect (the logits, a copy
made by advanced indexing, the cache, attention patterns) raise an error naming the supported
forms (:data:`WRITE_FORMS`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from .errors import CausalPatchError, InvalidArgumentError, InvalidTypeError
from .hooks import Hook, HookFn, read_only_error
from .interventions import Intervention, as_intervention
from .tokens import Batch, Prompts, make_batch, token_lists

if TYPE_CHECKING:
    from .model import HookedModel
    from .names import Site


class Splice(Protocol):
    """Something spliced into the forward pass at one site, with named values of its own.

    At :attr:`site` it receives the site's activation ``[batch, pos, *site shape]`` and returns
    the new activation (or ``None``: unchanged). On the way it computes values called *leaves*
    (an SAE's ``features`` ``[batch, pos, d_sae]``, its ``error`` ``[batch, pos, *site shape]``,
    ...), named in a trace by :meth:`value_name` (``blocks.20.resid_post.sae.features``).
    """

    @property
    def site(self) -> Site:
        """Where it sits."""
        ...

    @property
    def cached_by_default(self) -> tuple[str, ...]:
        """The leaves ``cache=True`` records."""
        ...

    def value_name(self, leaf: str) -> str:
        """The canonical name of value ``leaf`` (any other spelling resolves to it)."""
        ...

    def edit_shape(self, leaf: str, name: str) -> tuple[int, ...]:
        """The trailing shape (after ``[batch, pos]``) of ``leaf``, which an intervention on
        ``name`` is about to edit. Raises (naming ``name``) when ``leaf`` may not be edited."""
        ...

    def hook(self, edits: Mapping[str, Sequence[Callable[[torch.Tensor], torch.Tensor]]],
             record: Callable[[str, torch.Tensor], None], wants: Collection[str]
             ) -> HookFn | None:
        """The hook function for one forward pass, or ``None`` when it would change and record
        nothing (then no hook is installed).

        Args:
            edits: leaf -> functions applied in order to that value (the interventions on it).
            record: to be called with ``(leaf, value)`` for every leaf in ``wants``.
            wants: the leaves to record.
        """
        ...


class SpliceSet(Protocol):
    """The splices attached to one trace, and the parser of their value names."""

    def values(self) -> Iterable[Splice]:
        """Every attached splice."""
        ...

    def lookup(self, name: str) -> tuple[Splice, str] | None:
        """``(splice, leaf)`` when ``name`` names a splice's value, ``None`` for other names.
        May raise for a name in the splices' vocabulary that names nothing attached."""
        ...


class _NoSplices:
    """The empty :class:`SpliceSet`: no splice, no value names."""

    def values(self) -> tuple[Splice, ...]:
        return ()

    def lookup(self, name: str) -> None:
        return None


#: The splice set of a trace run without splices.
NO_SPLICES: SpliceSet = _NoSplices()


class SavedTensor(torch.Tensor):
    """A tensor with the seeds' ``.save()`` (``model.output.save()``); it returns the plain
    tensor. Every operation on a ``SavedTensor`` (indexing, arithmetic) gives a plain tensor."""

    # PyTorch's documented idiom. The impl is a C builtin, which a class attribute does not
    # bind; mypy binds it like a Python function (dropping ``func``) and so sees a mismatch
    __torch_function__ = torch._C._disabled_torch_function_impl  # type: ignore[assignment]  # idiom

    def save(self) -> torch.Tensor:
        """The value as a plain ``torch.Tensor`` (already computed: the forward has run)."""
        return self.as_subclass(torch.Tensor)

    @property
    def value(self) -> torch.Tensor:
        """The value as a plain ``torch.Tensor`` (older nnsight's ``saved.value``)."""
        return self.as_subclass(torch.Tensor)

    # mypy drops the names of a dunder's keyword-only arguments (Tensor.__repr__ has
    # ``tensor_contents``), so it rejects every override with an annotation, even an identical one
    def __repr__(self, *args: Any, **kwargs: Any) -> str:  # type: ignore[override]  # mypy bug
        return repr(self.as_subclass(torch.Tensor))


#: The forms of a write that take effect, named by every refusal.
WRITE_FORMS = ("`.output[:] = x`, `.output[:, p] = x` (any basic index), `.output = x`, in-place "
               "operations such as `.output.add_(x)` or `+= x`; the same with `.input`")


class TracedTensor(SavedTensor):
    """A value of an open ``with model.trace(...)`` block (``model.layers[i].output``, ``.input``)
    that can be written as in nnsight: ``value[index] = x`` on it, or on a view of it taken by
    basic indexing (``value[0][:, p] = x``), records the write as an intervention at its site,
    applied in the forward pass after the site's own interventions; everything read afterwards
    (``model.output``, other values, ``tr.logits``) comes from the pass with the write. In-place
    operations (``value.add_(x)``, ``value.zero_()``, ``value += x``) are writes of their
    result; those that change the shape (``unsqueeze_``, ...) are refused. Indexing
    returns a ``TracedTensor`` view; every other operation gives a plain tensor. After the block
    closes it is a plain tensor again (writes change only it)."""

    _cp_trace: Trace | None
    _cp_name: str
    _cp_keys: tuple[Any, ...]
    _cp_refusal: str | None

    def save(self) -> torch.Tensor:
        """The value itself (inside the block, writes through it still take effect); a value
        that cannot be written (the logits) as a plain ``torch.Tensor``, as nnsight's
        ``.save()`` gives."""
        if getattr(self, "_cp_refusal", None) is not None and not self._cp_keys:
            return self.as_subclass(torch.Tensor)
        return self

    def __getitem__(self, key: Any) -> torch.Tensor:
        plain = self.as_subclass(torch.Tensor)
        out = plain[key]
        trace = getattr(self, "_cp_trace", None)
        if trace is None or not isinstance(out, torch.Tensor):
            return out
        refusal = self._cp_refusal
        if refusal is None and not out._is_view():
            refusal = (f"{self._cp_name}[...][{_show(key)}] is a copy (advanced indexing with a "
                       "list or tensor), so writing into it cannot reach the model; write in "
                       f"one step instead: {WRITE_FORMS}")
        return _traced(out, trace, self._cp_name, (*self._cp_keys, key), refusal)

    def __setitem__(self, key: Any, value: Any) -> None:
        plain = self.as_subclass(torch.Tensor)
        trace = getattr(self, "_cp_trace", None)
        if trace is None or not trace.is_open:
            plain[key] = value
            return
        if self._cp_refusal is not None:
            raise InvalidArgumentError(self._cp_refusal)
        trace.write(self._cp_name, (*self._cp_keys, key), value)
        plain[key] = _plain(value)


#: In-place methods that change a value's shape or storage, not its numbers: refused on an open
#: trace's value (the model cannot take a value of another shape).
RESHAPING_IN_PLACE = frozenset({
    "as_strided_", "resize_", "resize_as_", "resize_as_sparse_", "set_", "sparse_resize_",
    "sparse_resize_and_clear_", "squeeze_", "unsqueeze_", "swapaxes_", "swapdims_", "t_",
    "transpose_"})
#: In-place methods that change no number (autograd and sharing flags): left to torch.
NON_VALUE_IN_PLACE = frozenset({"requires_grad_", "share_memory_", "detach_"})
#: The augmented assignments ``x += y``, ``x *= y``, ... (Tensor's in-place operators).
IN_PLACE_OPERATORS = ("__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__",
                      "__imod__", "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__",
                      "__irshift__")


def _in_place(name: str) -> Callable[..., Any]:
    """``TracedTensor.<name>``: in an open trace, an in-place operation is a write of its result
    (``value.add_(1)`` is ``value[...] = value + 1``; ``value += 1`` too), as in nnsight where
    it changes the model's own activation; elsewhere torch's own method."""

    def method(self: TracedTensor, *args: Any, **kwargs: Any) -> TracedTensor:
        plain = self.as_subclass(torch.Tensor)
        trace = getattr(self, "_cp_trace", None)
        if trace is None or not trace.is_open:
            getattr(plain, name)(*args, **kwargs)
            return self
        if name in RESHAPING_IN_PLACE:
            raise InvalidArgumentError(
                f"{self._cp_name}.{name}(...) changes the shape of a traced value, which the "
                f"model cannot take; write its numbers instead: {WRITE_FORMS}")
        updated = plain.clone()
        getattr(updated, name)(*args, **kwargs)
        self[...] = updated  # records the write, or raises why this value cannot be written
        return self

    method.__name__ = method.__qualname__ = name
    return method


for _name in [n for n in dir(torch.Tensor) if n.endswith("_") and not n.startswith("_")
              and n not in NON_VALUE_IN_PLACE] + [
        n for n in IN_PLACE_OPERATORS if hasattr(torch.Tensor, n)]:
    setattr(TracedTensor, _name, _in_place(_name))


def _show(key: Any) -> str:
    return repr(key).replace("slice(None, None, None)", ":")


def _plain(value: Any) -> Any:
    return value.as_subclass(torch.Tensor) if isinstance(value, torch.Tensor) else value


def _traced(value: torch.Tensor, trace: Trace, name: str, keys: tuple[Any, ...] = (),
            refusal: str | None = None) -> TracedTensor:
    out = value.as_subclass(TracedTensor)
    out._cp_trace, out._cp_name, out._cp_keys, out._cp_refusal = trace, name, keys, refusal
    return out


@dataclass
class _Write:
    """The writes made to one site's value in a trace: where (``mask``) and what (``values``),
    both of the site's shape ``[batch, pos, ...]``."""

    mask: torch.Tensor
    values: torch.Tensor

    def __call__(self, act: torch.Tensor) -> torch.Tensor:
        mask = self.mask.to(act.device)
        return torch.where(mask, self.values.to(device=act.device, dtype=act.dtype), act)


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
        self._refresh: Callable[[], None] | None = None  # brings a written trace up to date
        # how a value is handed out: inside an open trace block, as a writable TracedTensor
        self._shown: Callable[[str, torch.Tensor], torch.Tensor] | None = None

    def __setitem__(self, name: Any, value: Any) -> None:
        raise InvalidArgumentError(
            f"the cache is a record of the forward pass and cannot be assigned ({name!r}); to "
            f"change a value in the pass, write it inside the trace block: {WRITE_FORMS} (e.g. "
            "model.layers[10].output[:] = x), or pass interventions={name: ...}")

    def clear_values(self) -> None:
        """Forget every value (a trace re-runs after a write)."""
        dict.clear(self)
        self._by_canonical.clear()

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
        if self._refresh is not None:
            self._refresh()
        if dict.__contains__(self, name):
            return name
        canonical = self._canonical(name)
        return None if canonical is None else self._by_canonical.get(canonical)

    def __getitem__(self, name: Any) -> torch.Tensor:
        value = self.raw(name)
        return value if self._shown is None else self._shown(name, value)

    def raw(self, name: Any) -> torch.Tensor:
        """``cache[name]`` as the plain stored tensor (also inside an open trace block)."""
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
        if key is None:
            return default
        value = dict.__getitem__(self, key)
        return value if self._shown is None else self._shown(name, value)

    def __copy__(self) -> ActivationCache:
        new = ActivationCache(self._canonical_of, None)
        for key, value in self.items():
            new.store(key, self._canonical(key) or key, value)
        return new

    def copy(self) -> ActivationCache:
        return self.__copy__()


_OPEN = threading.local()

_LOGITS_READ_ONLY = (
    "the logits (model.output / tr.output / tr.logits) are the result of the pass and cannot "
    "be written; write a value inside the model instead (the last layer's "
    "`.output[:] = x`, or interventions={'ln_final': ...}). Supported writes: "
    + WRITE_FORMS)


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

    With splices attached, such as sparse autoencoders (``saes=[sae]``), their values are
    names too::

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
        splices: the attached :class:`SpliceSet` (for ``saes=[...]``, a
            :class:`causalpatch.sae.SAESplices`: site name -> its ``SAESplice``).
    """

    def __init__(self, model: HookedModel, prompts: Prompts,
                 interventions: Mapping[str, Any] | None = None,
                 cache: Sequence[str] | bool | str | None = None,
                 splices: SpliceSet | None = None) -> None:
        self.model = model
        rows = token_lists(model, prompts)
        self.batch = make_batch(rows, model.pad_token_id, model.device)
        self.splices: SpliceSet = NO_SPLICES if splices is None else splices
        self._interventions = interventions or {}
        self._cache_request = cache
        self._plan = _plan(model, self.batch, self._interventions, cache, self.splices)
        self.cache = ActivationCache(self.canonical_name, self._compute)
        self.cache._refresh = self._refresh
        self.cache._shown = self._shown
        self._views: dict[int, tuple[torch.Tensor, TracedTensor]] = {}  # id(value) -> its view
        self._logits: torch.Tensor | None = None
        self._writes: dict[str, _Write] = {}  # canonical site name -> writes made in the block
        self._stale = False  # a write was made since the last pass
        self._ran = False
        self._rng: tuple[torch.Tensor, list[torch.Tensor]] | None = None
        self._more: dict[str, torch.Tensor] = {}  # canonical name -> value from a re-run
        self._everything = False  # whether a re-run cached every component

    # seed-style aliases
    @property
    def activations(self) -> ActivationCache:
        return self.cache

    @property
    def logits(self) -> torch.Tensor | None:
        self._refresh()
        return self._logits

    @logits.setter
    def logits(self, value: Any) -> None:
        raise InvalidArgumentError(_LOGITS_READ_ONLY)

    @property
    def output(self) -> SavedTensor | None:
        logits = self.logits
        if logits is None or not self.is_open:
            return saved(logits)
        return _traced(logits, self, "output", refusal=_LOGITS_READ_ONLY)

    @output.setter
    def output(self, value: Any) -> None:
        raise InvalidArgumentError(_LOGITS_READ_ONLY)

    @property
    def is_open(self) -> bool:
        """Whether this trace's ``with`` block is open in this thread."""
        return self in getattr(_OPEN, "stack", [])

    def write(self, name: str, keys: Sequence[Any], value: Any) -> None:
        """Record ``value[keys...] = value`` on the value ``name`` (a write inside the block):
        applied in the forward pass from now on. See :class:`TracedTensor`."""
        if not self.is_open:
            raise InvalidArgumentError(
                f"{name!r} is written after its `with model.trace(...)` block closed; write "
                "inside the block")
        site = self.model.site(name)
        if site.hook == "pattern":
            raise read_only_error(name)
        current = self.cache.raw(name)
        write = self._writes.get(site.name)
        if write is None:
            write = _Write(torch.zeros(current.shape, dtype=torch.bool, device=current.device),
                           torch.zeros_like(current))
        mask, values = write.mask, write.values
        for key in keys[:-1]:
            mask, values = mask[key], values[key]
        try:
            values[keys[-1]] = _plain(value)
        except (RuntimeError, IndexError, TypeError) as exc:
            where = "".join(f"[{_show(k)}]" for k in keys)
            raise InvalidArgumentError(
                f"cannot write {name}{where} = value (value of shape "
                f"{tuple(getattr(value, 'shape', ()))}; {name} is {tuple(current.shape)}): "
                f"{exc}. Supported: {WRITE_FORMS}") from None
        mask[keys[-1]] = True
        self._writes[site.name] = write
        self._stale = True

    def assign(self, name: str, value: Any) -> None:
        """``.output = value`` / ``.input = value``: replace the whole value of ``name``."""
        self.write(name, (Ellipsis,), value)

    def _interventions_with_writes(self) -> Mapping[str, Any]:
        if not self._writes:
            return self._interventions
        merged: dict[str, Any] = {}
        for key, value in self._interventions.items():
            merged[key] = list(value) if isinstance(value, (list, tuple)) else [value]
        for name, write in self._writes.items():
            merged.setdefault(name, []).append(write)
        return merged

    def _refresh(self) -> None:
        """After a write, run the pass again (same random-number state) with every write
        applied, so every value read from now on includes it."""
        if not self._stale or not self._ran:
            return
        self._stale = False
        self._plan = _plan(self.model, self.batch, self._interventions_with_writes(),
                           self._cache_request, self.splices)
        self.cache.clear_values()
        self._views.clear()
        self._more.clear()
        self._everything = False
        with _replayed_rng(self._rng, self.model.device):
            self._logits = self._forward(self._plan, self.cache)

    @property
    def last_logits(self) -> torch.Tensor:
        logits = self.logits
        assert logits is not None
        rows = torch.arange(logits.shape[0], device=logits.device)
        return logits[rows, self.batch.last_index]

    def canonical_name(self, name: str) -> str:
        """The canonical spelling of ``name`` (a site or an attached splice's value)."""
        found = self.splices.lookup(name)
        if found is not None:
            return found[0].value_name(found[1])
        return self.model.site(name).name

    def _shown(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """``tr.cache[name]`` inside the open block is writable like ``tr.value(name)``; every
        spelling of one site gives the same object, as outside the block."""
        if not self.is_open:
            return value
        hit = self._views.get(id(value))
        if hit is None or hit[0] is not value:
            hit = (value, _traced(value, self, name))
            self._views[id(value)] = hit
        return hit[1]

    def value(self, name: str) -> SavedTensor:
        """The activation ``name`` of this pass (computed if not cached), ``.save()``-able;
        inside the open block a :class:`TracedTensor` (writes to it take effect)."""
        value = self.cache.raw(name)
        if self.is_open:
            return _traced(value, self, name)
        out = saved(value)
        assert out is not None
        return out

    def run(self) -> Trace:
        if self._ran:
            return self
        self._rng = _rng_state(self.model.device)
        self._logits = self._forward(self._plan, self.cache)
        self._ran = True
        return self

    def _forward(self, plan: _Plan, store: ActivationCache) -> torch.Tensor:
        hooks: list[Hook] = []
        for site, ivs in plan.interventions:
            hooks += [Hook(site, iv) for iv in ivs]
        for sp in plan.splices:  # after the site's own interventions, before its cache
            fn = sp.splice.hook(sp.edits, _recorder(store, sp), list(sp.names))
            if fn is not None:  # None: nothing to read or change, the splice is the identity
                hooks.append(Hook(sp.splice.site, fn))
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
            if everything:  # every canonical component (but the patterns: [b, h, pos, pos]
                # per layer, computed by one more attention each) and splice value
                names = [n for n in self.model.component_names()
                         if not n.endswith(".attn.pattern")]
                names += _default_values(self.splices) + [name]
            plan = _plan(self.model, self.batch, self._interventions_with_writes(), names,
                         self.splices)
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
        if exc[0] is None:
            self._refresh()  # writes made in the block reach tr.logits and tr.cache
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
class _Spliced:
    """One attached splice in a planned pass: its edits, and the names to cache per value."""

    splice: Splice
    edits: dict[str, list[Intervention]] = field(default_factory=dict)  # leaf -> interventions
    names: dict[str, list[str]] = field(default_factory=dict)  # leaf -> requested names


def _recorder(store: ActivationCache, sp: _Spliced):
    """Store a splice's value under every requested spelling."""
    def record(leaf: str, value: torch.Tensor) -> None:
        value = value.detach().clone()
        for name in sp.names.get(leaf, ()):
            store.store(name, sp.splice.value_name(leaf), value)

    return record


def _default_values(splices: SpliceSet) -> list[str]:
    """The names of every splice's values that ``cache=True`` records."""
    return [sp.value_name(leaf) for sp in splices.values() for leaf in sp.cached_by_default]


@dataclass
class _Plan:
    interventions: list[tuple[Any, list[Intervention]]]
    cache_sites: list[Any]
    cache_names: list[list[str]]  # per cached site, the spellings it was requested under
    splices: list[_Spliced] = field(default_factory=list)


def _plan(model: HookedModel, batch: Batch, interventions: Mapping[str, Any],
          cache: Sequence[str] | bool | str | None, splices: SpliceSet = NO_SPLICES) -> _Plan:
    """Resolve names and validate every intervention before anything runs."""
    if not isinstance(interventions, Mapping):
        raise InvalidTypeError(
            "interventions must be a dict {component name: intervention or list of them}, got "
            f"{type(interventions).__name__}")
    spliced = {id(sp): _Spliced(sp) for sp in splices.values()}
    n_rows, n_pos = batch.input_ids.shape[0], batch.input_ids.shape[1]
    planned = []
    for name, value in interventions.items():
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        ivs = [as_intervention(v, name) for v in items]
        found = splices.lookup(name)
        if found is not None:
            splice, leaf = found
            width = splice.edit_shape(leaf, name)
            for iv in ivs:
                iv.validate((n_rows, n_pos, *width), name)
            spliced[id(splice)].edits.setdefault(leaf, []).extend(ivs)
            continue
        site = model.site(name)
        if site.hook == "pattern":
            raise read_only_error(name)
        feat = site.feature_shape(model.dims)
        if feat is not None:
            shape = (n_rows, n_pos, *feat)
            for iv in ivs:
                iv.validate(shape, name)
        planned.append((site, ivs))
    if cache is True:
        names = model.component_names() + _default_values(splices)
    elif cache is None or cache is False:
        names = []
    elif isinstance(cache, str):
        names = [cache]
    else:
        names = list(cache)
    by_site: dict[str, tuple[Any, list[str]]] = {}  # one hook per site, every spelling kept
    for name in names:
        found = splices.lookup(name)
        if found is None:
            site = model.site(name)
            spellings = by_site.setdefault(site.name, (site, []))[1]
            if name not in spellings:
                spellings.append(name)
            continue
        splice, leaf = found
        requested = spliced[id(splice)].names.setdefault(leaf, [])
        if name not in requested:
            requested.append(name)
    return _Plan(planned, [site for site, _ in by_site.values()],
                 [spellings for _, spellings in by_site.values()], list(spliced.values()))

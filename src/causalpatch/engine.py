"""The sweep engine: the metric of many patched runs, exactly and with little work.

A *patch* (one row of a sweep) replaces some entries of some sites' activations in the *base*
run (the run patched into) with the *source* run's values, or with values the patch carries
itself (:attr:`~causalpatch.plan.SitePatch.values`: one vector per entry, e.g. an SAE feature
patch ``x_base + decode(f') - decode(f_base)``). Two implementations:

:func:`naive_patched_logits`
    The reference: one full forward pass of the base prompt per patch, with hooks.

:func:`staircase_logits`
    The same numbers with far less work, using only facts about causal transformers:

    1. **Exact no-ops are skipped.** A patch whose values (source or its own) equal the base
       values at every entry leaves the run unchanged; its logits are the base logits.
    2. **Shared prefix.** Positions before the first entry that actually changes (``w``) are
       identical to the base run in every patched run, so their keys/values come from the base
       run's cache (Hugging Face's own ``Cache``) and only the ``T - w`` window positions are
       computed.
    3. **Start where the patch is.** A patch at layer ``L`` leaves layers ``< L`` unchanged, so
       its row enters at layer ``L`` with the base run's residual stream. Rows climb a
       *staircase* (:func:`climb`): the batch grows layer by layer as rows enter, so each
       decoder layer is called once per chunk with every row that needs it. Rows of several
       base runs of one token length share the batches.
    4. **Last position only** goes through the last layer's MLP branch, the final norm and the
       unembedding (the last layer's attention still runs on every position: the last
       position's query reads their keys and values), and only the answer columns of the
       unembedding are computed when the metric reads nothing else.

    The decoder layers are the model's own ``transformers`` modules, called with exactly the
    arguments Hugging Face passes them (recorded from a real forward over the suffix with the
    prefix cache), so masks, rotary embeddings and sliding windows are Hugging Face's.

:func:`climb` is the one staircase primitive ("rows enter at their layer, with per-layer
writes"); the sweeps, causal tracing and path patching all run their rows through it.
:func:`pair_runs` makes the base and source runs of pairs (shared prefixes, batched), and
:func:`run_layer` calls one decoder layer alone (path patching's single-layer passes).

Both engines return ``[n_patches, vocab]`` logits at the last position (or only the requested
columns); tests prove them equal.

A base run need not be a plain prompt: :func:`run_perturbed` makes base runs whose embedding
output is given (e.g. causal tracing's noised subject, :attr:`PairRun.base_embed`); every
forward of such a run (prefix, suffix, recorded calls) replaces the ``embed`` site's output with
it. A sweep that reads only a few numbers per row passes ``readout=`` to
:func:`staircase_logits`, which reduces each batch's logits at once instead of keeping
``[n_rows, vocab]``.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Collection, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from .adapters.runtime import LayerCall, first_argument, parse_layer_call, stack_paths
from .enums import Engine
from .errors import InvalidArgumentError, NonFiniteError, UnsupportedArchitectureError
from .hooks import Hook, StopForward, hooked, last_position_only, recorded_calls
from .names import Site
from .plan import Patch, SitePatch
from .tokens import make_batch

if TYPE_CHECKING:
    from .model import HookedModel

#: Site kinds that are the decoder layer's input/output: patched by editing the hidden state
#: handed to a layer rather than by a hook.
RESIDUAL_INJECTED = ("resid_pre", "resid_post")


@dataclass
class RunActivations:
    """Activations of one run at the sites a sweep patches: name -> ``[1, pos, ...]``."""

    acts: dict[str, torch.Tensor] = field(default_factory=dict)

    def value(self, site: Site, pos: int, unit: int | None) -> torch.Tensor:
        act = self.acts[site.name][0, pos]
        return act if unit is None else act[unit]


def entry_values(sp: SitePatch, source: RunActivations, base: RunActivations | None = None
                 ) -> list[tuple[int, int | None, torch.Tensor]]:
    """Every entry ``(pos, unit)`` of ``sp`` with the value it is set to: the patch's own
    ``values`` when it carries them, else the source run's activation there (the ``base``
    run's for a :attr:`~causalpatch.plan.SitePatch.frozen` site patch)."""
    if sp.values is not None:
        return [(p, u, sp.values[i]) for i, (p, u) in enumerate(sp.entries())]
    if sp.frozen:
        if base is None:
            raise InvalidArgumentError(
                f"the frozen site patch at {sp.site.name} holds base-run values: pass the base "
                "run's activations (or give the patch its own values)")
        source = base
    return [(p, u, source.value(sp.site, p, u)) for p, u in sp.entries()]


def collect_sites(patches: Sequence[Patch]) -> list[Site]:
    """Distinct sites used by a list of patches, in first-seen order."""
    seen: dict[str, Site] = {}
    for patch in patches:
        for sp in patch:
            seen.setdefault(sp.site.name, sp.site)
    return list(seen.values())


# -- applying entries --------------------------------------------------------------------------
class _Writes:
    """Vectorised writes ``act[rows, pos, unit] = values`` for one site, gathered in pieces."""

    def __init__(self) -> None:
        self._rows: list[torch.Tensor] = []
        self._pos: list[torch.Tensor] = []
        self._units: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []
        self.has_units = False
        self._frozen: tuple[torch.Tensor, ...] | None = None

    def add(self, row: int, pos: int, unit: int | None, value: torch.Tensor) -> None:
        """One entry."""
        self.add_many(row, torch.tensor([pos]), None if unit is None else torch.tensor([unit]),
                      value.unsqueeze(0))

    def add_many(self, row: int, pos: torch.Tensor, units: torch.Tensor | None,
                 values: torch.Tensor) -> None:
        """Entries ``pos`` ``[k]`` (and ``units`` ``[k]``) of one row, ``values`` ``[k, ...]``."""
        self._rows.append(torch.full((len(pos),), row, dtype=torch.long))
        self._pos.append(pos)
        self.has_units = units is not None
        self._units.append(torch.zeros_like(pos) if units is None else units)
        self._values.append(values)
        self._frozen = None

    def freeze(self) -> _Writes:
        if self._frozen is None:
            self._frozen = (torch.cat(self._rows), torch.cat(self._pos), torch.cat(self._units),
                            torch.cat(self._values))
        return self

    def shifted(self, offset: int) -> _Writes:
        """The same writes with positions ``offset`` lower (into a window)."""
        rows, pos, units, values = self.freeze()._frozen  # type: ignore[misc]
        out = _Writes()
        out.has_units = self.has_units
        out._frozen = (rows, pos - offset, units, values)
        return out

    def at(self, position: int) -> _Writes | None:
        """The writes at ``position`` only, moved to position 0 (into a one-position tensor);
        ``None`` when there are none."""
        rows, pos, units, values = self.freeze()._frozen  # type: ignore[misc]
        keep = pos == position
        if not bool(keep.any()):
            return None
        out = _Writes()
        out.has_units = self.has_units
        out._frozen = (rows[keep], torch.zeros_like(pos[keep]), units[keep], values[keep])
        return out

    def apply(self, act: torch.Tensor) -> torch.Tensor:
        rows, pos, units, values = self.freeze()._frozen  # type: ignore[misc]
        out = act.clone()
        values = values.to(act.device, act.dtype)
        if self.has_units:
            out[rows, pos, units] = values
        else:
            out[rows, pos] = values
        return out


def _writer(writes: _Writes) -> Callable[[torch.Tensor], torch.Tensor]:
    return writes.apply


# -- naive reference ---------------------------------------------------------------------------
def naive_patched_logits(model: HookedModel, base_ids: torch.Tensor,
                         patches: Sequence[Patch], source: RunActivations,
                         progress: Callable[[int], None] | None = None,
                         base: RunActivations | None = None) -> torch.Tensor:
    """Reference implementation: one forward pass per patch.

    Args:
        base_ids: ``[1, pos]`` token ids of the run patched into.
        patches: the patches, one per output row.
        source: the source run's activations at every patched site.
        base: the base run's activations (read by frozen site patches without own values).

    Returns:
        ``[n_patches, vocab]`` float32 logits at the last position.
    """
    batch = make_batch([base_ids[0].tolist()], model.pad_token_id, model.device)
    rows = []
    for patch in patches:
        hooks = []
        for sp in patch:
            writes = _Writes()
            for pos, unit, value in entry_values(sp, source, base):
                writes.add(0, pos, unit, value)
            hooks.append(Hook(sp.site, _writer(writes.freeze())))
        with torch.no_grad():
            logits = model.forward(batch, hooks)
        rows.append(logits[0, -1].float())
        if progress is not None:
            progress(1)
    if not rows:
        return torch.empty(0, model.vocab_size)
    return torch.stack(rows)


# -- fast engine -------------------------------------------------------------------------------
def _stage(sp: SitePatch, n_layers: int) -> int:
    """Decoder layer at which a site patch acts (``n_layers`` = after the last layer)."""
    assert sp.site.layer is not None
    return sp.site.layer + 1 if sp.site.kind == "resid_post" else sp.site.layer


def fast_supported(patches: Sequence[Patch]) -> bool:
    """The fast engine handles sites inside the decoder stack."""
    return all(sp.site.layer is not None for patch in patches for sp in patch)


@dataclass
class _Entries:
    """The entries of one site patch that change the base run: positions ``[k]``, units
    ``[k]`` (or ``None``) and the values they are set to ``[k, ...]``."""

    sp: SitePatch
    pos: torch.Tensor
    units: torch.Tensor | None
    values: torch.Tensor


Changed = list[_Entries]
"""A patch's entries that change the base run, per site patch."""


def _changed_entries(patch: Patch, base: RunActivations, source: RunActivations,
                     memo: dict[Any, _Entries | None] | None = None, run: int = 0) -> Changed:
    """The entries of ``patch`` whose value (the source run's, or the patch's own ``values``)
    differs from the base value (compared exactly, all entries of a site at once).

    ``memo``: shared by the calls of one sweep, remembers each site patch without own values
    per base run ``run`` (a site patch often recurs in many rows, e.g. a layer inside many
    restoration windows)."""
    out = []
    for sp in patch:
        if sp.frozen:  # never a change by itself: see _frozen_entries
            continue
        key = None
        if memo is not None and sp.values is None:
            key = (run, sp.site.name, sp.positions, sp.units)
            if key in memo:
                found = memo[key]
                if found is not None:
                    out.append(found)
                continue
        before = len(out)
        _changed_site(sp, base, source, out)
        if memo is not None and key is not None:
            memo[key] = out[-1] if len(out) > before else None
    return out


def _changed_site(sp: SitePatch, base: RunActivations, source: RunActivations,
                  out: list[_Entries]) -> None:
    """Append the changed entries of one site patch to ``out`` (nothing if none change)."""
    entries = sp.entries()
    pos = torch.tensor([p for p, _ in entries], dtype=torch.long)
    units = None if sp.units is None else torch.tensor([u for _, u in entries],
                                                       dtype=torch.long)
    bas = base.acts[sp.site.name][0]
    bas = bas[pos] if units is None else bas[pos, units]
    if sp.values is not None:
        values = sp.values.to(bas.device, bas.dtype)
    else:
        src = source.acts[sp.site.name][0]
        values = src[pos] if units is None else src[pos, units]
    keep = (values != bas).reshape(len(entries), -1).any(1)
    if bool(keep.any()):
        out.append(_Entries(sp, pos[keep], None if units is None else units[keep],
                            values[keep]))


def _frozen_entries(patch: Patch, base: RunActivations, stage: int, window: int,
                    n_layers: int) -> Changed:
    """The frozen site patches of a live row whose first change is at decoder layer ``stage``
    and position ``window``: every entry at or after both, set to the base run's value (or the
    patch's own) whether it differs or not. Entries before them are dropped: there the row
    still equals the base run, so holding the base value changes nothing."""
    out = []
    for sp in patch:
        if not sp.frozen or _stage(sp, n_layers) < stage:
            continue
        entries = sp.entries()
        pos = torch.tensor([p for p, _ in entries], dtype=torch.long)
        units = None if sp.units is None else torch.tensor([u for _, u in entries],
                                                           dtype=torch.long)
        if sp.values is not None:
            values = sp.values
        else:
            bas = base.acts[sp.site.name][0]
            values = bas[pos] if units is None else bas[pos, units]
        keep = pos >= window
        if bool(keep.any()):
            out.append(_Entries(sp, pos[keep], None if units is None else units[keep],
                                values[keep]))
    return out


@dataclass
class Staircase:
    """What the staircase needs of one base prompt: every layer's recorded call on the suffix.

    Attributes:
        start: first suffix position ``s``; positions ``< s`` live in ``prefix_cache``.
        calls: per decoder layer, how Hugging Face called it (``calls[L].hidden`` is the base
            residual stream entering layer ``L``, ``[1, T - s, d_model]``).
        final_input: ``[1, T - s, d_model]`` the input of the final norm.
        prefix_cache: the Hugging Face cache of positions ``< s`` (``None`` when ``s == 0``).
        full_cache: the cache of all ``T`` positions of the base run (cut to any window start
            ``w >= s`` for rows whose first change is at ``w``), or ``None``.
    """

    start: int
    calls: list[LayerCall]
    final_input: torch.Tensor
    prefix_cache: Any
    full_cache: Any = None


def cachers(store: dict[str, torch.Tensor], sites: Sequence[Site]) -> list[Hook]:
    """Read-only hooks saving each site's activation (a detached clone) into
    ``store[site.name]``."""

    def saver(name: str) -> Callable[[torch.Tensor], None]:
        def save(act: torch.Tensor) -> None:
            store[name] = act.detach().clone()

        return save

    return [Hook(site, saver(site.name)) for site in sites]


def _embed_hooks(model: HookedModel, embeds: torch.Tensor | None, offset: int) -> list[Hook]:
    """Hooks replacing the ``embed`` site's output of a run over positions ``offset..`` with
    those positions of ``embeds`` ``[rows, T, d_model]`` (none when ``embeds`` is ``None``)."""
    if embeds is None:
        return []

    def replace(act: torch.Tensor) -> torch.Tensor:
        return embeds[:, offset : offset + act.shape[1]].to(act.dtype).expand_as(act)

    return [Hook(model.site("embed"), replace)]


def _suffix_run(model: HookedModel, ids: torch.Tensor, start: int, prefix_cache: Any,
                sites: Sequence[Site], record: Sequence[int] = (),
                embeds: torch.Tensor | None = None, prefix_rows: Sequence[int] | None = None
                ) -> tuple[dict[str, torch.Tensor], torch.Tensor, list[Staircase]]:
    """Run positions ``start..T-1`` of every row of ``ids`` ``[rows, T]`` on top of
    ``prefix_cache`` (positions ``< start``), as one batch.

    Row ``i`` continues from row ``prefix_rows[i]`` of the prefix cache (default: its only
    row, shared by every row). Returns the activations of ``sites`` on those positions
    ``[rows, T - start, ...]``, the last-position logits ``[rows, vocab]`` and, for each row in
    ``record``, its staircase context (each layer's call arguments, the prefix and the run's
    full cache, cut to that row). ``embeds`` ``[rows, T, d_model]``: the embedding outputs to
    use instead of the tokens' (see :func:`run_perturbed`).
    """
    runtime = model.runtime
    rows = ids.shape[0]
    paths = stack_paths(runtime) if record else []
    acts: dict[str, torch.Tensor] = {}
    hooks = [*_embed_hooks(model, embeds, start), *cachers(acts, sites)]
    if start == 0:
        prefix_cache = None
    prefix_rows = list(prefix_rows) if prefix_rows is not None else [0] * rows
    cache = prefix_cache
    if cache is not None and prefix_rows != [0]:
        cache = runtime.cache_rows(cache, prefix_rows)
    with torch.no_grad(), hooked(model.hf_model, hooks, model.dims), \
            recorded_calls(model.hf_model, paths) as calls:
        logits, full = runtime.forward(ids[:, start:], cache=cache, keep_cache=bool(record),
                                       last_only=True)
    last = logits[:, -1].float()
    if not record:
        return acts, last, []
    layer_calls = [parse_layer_call(*calls[path]) for path in runtime.layer_paths]
    final_input = first_argument(*calls[runtime.final_norm_path])
    return acts, last, [
        Staircase(start, [call.row(r) for call in layer_calls], final_input[r : r + 1],
                  runtime.cache_rows(prefix_cache, [prefix_rows[r]]),
                  runtime.cache_rows(full, [r]))
        for r in record]


def _prefix_run(model: HookedModel, ids: torch.Tensor, start: int,
                sites: Sequence[Site], embeds: torch.Tensor | None = None
                ) -> tuple[dict[str, torch.Tensor], Any]:
    """Run positions ``0..start-1`` with a cache; activations of ``sites`` and the cache
    (``embeds``: as :func:`_suffix_run`)."""
    if start == 0:
        return {}, None
    acts: dict[str, torch.Tensor] = {}
    hooks = [*_embed_hooks(model, embeds, 0), *cachers(acts, sites)]
    with torch.no_grad(), hooked(model.hf_model, hooks, model.dims):
        _, cache = model.runtime.forward(ids[:, :start], keep_cache=True, last_only=True)
    return acts, cache


def prepare_staircase(model: HookedModel, base_ids: torch.Tensor, start: int,
                      base_embed: torch.Tensor | None = None) -> Staircase:
    """Prefill the base prompt's prefix (positions ``< start``) and record each layer's call
    on the suffix; ``base_ids`` is ``[1, T]``.

    ``base_embed`` ``[1, T, d_model]``: the base run's embedding output when it is not the
    tokens' own (:attr:`PairRun.base_embed`).
    """
    _, cache = _prefix_run(model, base_ids, start, [], base_embed)
    return _suffix_run(model, base_ids, start, cache, [], record=[0], embeds=base_embed)[2][0]


def _row(acts: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    """Row ``index`` of batched activations ``[rows, ...]``, as ``[1, ...]``."""
    return {name: act[index : index + 1] for name, act in acts.items()}


def _join(prefix: dict[str, torch.Tensor], suffix: dict[str, torch.Tensor]) -> RunActivations:
    return RunActivations({name: torch.cat([prefix[name], act], dim=1) if name in prefix
                           else act for name, act in suffix.items()})


@dataclass
class PairRun:
    """The base and source runs of one pair, sharing their common prefix.

    Attributes:
        base_ids: ``[1, T]`` the prompt patched into.
        base, source: activations at the sweep's sites, ``[1, T, ...]``; positions before the
            first differing token come from one shared computation, so they are bitwise equal.
        base_last, source_last: ``[vocab]`` last-position logits.
        prepared: the staircase context of the base run.
        base_embed: ``[1, T, d_model]`` the base run's embedding output when it is not the
            token embedding of ``base_ids`` (a perturbed base from :func:`run_perturbed`);
            ``None`` for a plain prompt. Every forward of the base run uses it.
    """

    base_ids: torch.Tensor
    base: RunActivations
    source: RunActivations
    base_last: torch.Tensor
    source_last: torch.Tensor
    prepared: Staircase | None
    base_embed: torch.Tensor | None = None


#: pairs whose base and source runs share one batch in :func:`pair_runs` (at most; bounds the
#: batch's transient memory to about that of a plain forward of ``2 x PAIRS_PER_BATCH`` rows)
PAIRS_PER_BATCH = 32


def run_pair(model: HookedModel, base_ids: Sequence[int], source_ids: Sequence[int],
             sites: Sequence[Site]) -> PairRun:
    """Run base and source once each, the shared prefix only once (:func:`pair_runs` of one
    pair)."""
    return pair_runs(model, [(base_ids, source_ids)], sites)[0]


def pair_runs(model: HookedModel, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
              sites: Sequence[Site]) -> list[PairRun]:
    """The :class:`PairRun` of every ``(base_ids, source_ids)`` pair, in order.

    A pair's prefix (tokens before the first position where its prompts differ) is run once
    with a key/value cache, and both prompts' suffixes continue from it; positions before the
    first difference are therefore one computation, bitwise equal in base and source. The base
    suffix also records the arguments of every decoder layer for the staircase. Identical
    prompts (ablations: the source is the base) run once, from position 0.

    Pairs of one token length and first difference run together: their prefixes as one batch,
    then all their base and source suffixes as one batch on those prefixes (rows ``0..k-1``
    the bases, ``k..2k-1`` the sources); identical prompts of one length as one batch.
    """
    ids = [(torch.tensor([list(b)], dtype=torch.long, device=model.device),
            torch.tensor([list(s)], dtype=torch.long, device=model.device)) for b, s in pairs]
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, (base_t, src_t) in enumerate(ids):
        T = base_t.shape[1]
        if base_t.shape == src_t.shape and torch.equal(base_t, src_t):
            groups[(T, -1)].append(i)  # identical: no source run
            continue
        differ = (base_t[0] != src_t[0]).nonzero()
        groups[(T, min(int(differ[0]) if len(differ) else T - 1, T - 1))].append(i)
    out: list[PairRun | None] = [None] * len(pairs)
    batches = [(start, members[lo : lo + PAIRS_PER_BATCH]) for (_, start), members in groups.items()
               for lo in range(0, len(members), PAIRS_PER_BATCH)]
    for start, members in batches:
        base_t = torch.cat([ids[i][0] for i in members])  # [k, T]
        k = len(members)
        if start < 0:
            acts, last, stairs = _suffix_run(model, base_t, 0, None, sites, range(k))
            for r, i in enumerate(members):
                run = RunActivations(_row(acts, r))
                out[i] = PairRun(ids[i][0], run, run, last[r], last[r], stairs[r])
            continue
        src_t = torch.cat([ids[i][1] for i in members])
        prefix_acts, cache = _prefix_run(model, base_t, start, sites)
        acts, last, stairs = _suffix_run(model, torch.cat([base_t, src_t]), start, cache,
                                         sites, range(k), prefix_rows=[*range(k), *range(k)])
        for r, i in enumerate(members):
            prefix = _row(prefix_acts, r)
            out[i] = PairRun(ids[i][0], _join(prefix, _row(acts, r)),
                             _join(prefix, _row(acts, k + r)), last[r], last[k + r], stairs[r])
    return out  # type: ignore[return-value]


def run_perturbed(model: HookedModel, ids: Sequence[int], base_embeds: torch.Tensor,
                  sites: Sequence[Site]) -> list[PairRun]:
    """Base runs of one prompt with given embedding outputs, against its plain run.

    Base run ``i`` is the prompt ``ids`` with the ``embed`` site's output replaced by
    ``base_embeds[i]`` (e.g. Gaussian noise added at a subject's positions); the source of
    every run is the plain prompt, run once. Positions before the first one where any base
    embedding differs from the plain embedding are computed once (one shared prefix cache),
    so they are bitwise equal in every run and patches there are exact no-ops.

    Args:
        ids: the prompt's ``T`` token ids.
        base_embeds: ``[n_runs, T, d_model]`` the embedding output of each base run.
        sites: where to record activations (``[1, T, ...]`` in each run's ``base``/``source``).

    Returns:
        ``n_runs`` :class:`PairRun` (their ``base_embed`` set, staircase contexts recorded, the
        ``source`` activations shared).

    Raises:
        InvalidArgumentError: ``base_embeds`` is not ``[n_runs, T, d_model]``.
    """
    ids_t = torch.tensor([list(ids)], dtype=torch.long, device=model.device)
    T = ids_t.shape[1]
    if base_embeds.dim() != 3 or base_embeds.shape[1:] != (T, model.d_model):
        raise InvalidArgumentError(
            f"base_embeds must be [n_runs, {T}, {model.d_model}] (one embedding output per "
            f"base run of this {T}-token prompt), got {tuple(base_embeds.shape)}")
    with torch.no_grad():
        plain = model.runtime.embed(ids_t)
    embeds = base_embeds.to(plain.device, plain.dtype)
    differ = (embeds != plain).reshape(len(embeds), T, -1).any(-1).any(0).nonzero()
    start = min(int(differ[0]) if len(differ) else T - 1, T - 1)
    prefix_acts, cache = _prefix_run(model, ids_t, start, sites)
    # the plain source (row 0) and every base run (rows 1..) as one batch on the shared prefix
    n = len(embeds)
    acts, last, stairs = _suffix_run(model, ids_t.expand(n + 1, T), start, cache, sites,
                                     range(1, n + 1), torch.cat([plain, embeds]))
    source = _join(prefix_acts, _row(acts, 0))
    return [PairRun(ids_t, _join(prefix_acts, _row(acts, i + 1)), source, last[i + 1], last[0],
                    stairs[i], embeds[i : i + 1]) for i in range(n)]


def run_layer(model: HookedModel, staircase: Staircase, layer: int, hidden: torch.Tensor,
              hooks: Sequence[Hook] = (), stop_ok: bool = False) -> torch.Tensor | None:
    """Decoder layer ``layer`` alone on ``hidden`` ``[rows, T - start, d_model]``: every row is
    a variant of the staircase's base prompt on the suffix positions (the prefix is shared).

    Args:
        hooks: installed for this call only.
        stop_ok: a hook may raise :class:`~causalpatch.hooks.StopForward` to end the call early
            (then ``None`` is returned).
    """
    try:
        with torch.no_grad(), hooked(model.hf_model, hooks, model.dims):
            return model.runtime.run_layer(layer, staircase.calls[layer], hidden,
                                           staircase.prefix_cache, None)
    except StopForward:
        if stop_ok:
            return None
        raise


@dataclass
class Step:
    """What one decoder layer of a :func:`climb` runs with.

    Attributes:
        hooks: installed for this layer's call only.
        last_position_mlp: run the layer's MLP branch on the last position only (exact when
            nothing after this layer reads other positions, i.e. in the last layer).
    """

    hooks: Sequence[Hook] = ()
    last_position_mlp: bool = False


def climb(model: HookedModel, calls: Sequence[LayerCall],
          base_hidden: Callable[[int], torch.Tensor], entries: Sequence[int], stop: int,
          step: Callable[[int, torch.Tensor], Step] | None = None, *, prefix: Any = None,
          run_of: torch.Tensor | None = None,
          inject: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The staircase: rows enter the decoder stack at their own layer, and each layer is called
    once on every row that has entered, with that layer's writes.

    Row ``i`` enters at layer ``entries[i]`` (ascending) with the base residual stream there,
    ``base_hidden(layer)`` ``[n_runs, q, d_model]`` (row ``i`` reads run ``run_of[i]``; with
    ``run_of=None`` there is one run, shared by every row). At each layer the entered rows are
    first edited by ``inject(layer, hidden)`` (residual writes), then the layer runs with
    ``step(layer, hidden)``'s hooks (site writes, reads) on the window's positions, attending
    to the prefix keys/values ``prefix`` (rows of it chosen by ``run_of``). Rows entering at
    ``stop`` are added and injected too, and nothing runs there.

    Every method that runs patched rows through the decoder stack (sweeps, causal tracing,
    path patching) climbs with this one function; it knows nothing of what the writes mean.

    Args:
        calls: per decoder layer, how Hugging Face calls it on the window.
        stop: the residual stream entering layer ``stop`` is returned (``n_layers``: the final
            norm's input).

    Returns:
        ``[len(entries), q, d_model]`` the residual stream entering layer ``stop`` (with
        ``Step.last_position_mlp`` in the last layer only position ``-1`` is valid).
    """
    hidden = base_hidden(entries[0] if entries else stop)
    hidden = hidden.new_empty((0, *hidden.shape[1:]))
    n_rows = len(entries)
    with torch.no_grad():
        for layer in range(entries[0] if entries else stop, stop + 1):
            n_before = n_now = hidden.shape[0]
            while n_now < n_rows and entries[n_now] <= layer:
                n_now += 1
            if n_now > n_before:
                base_in = base_hidden(layer)
                new = (base_in[run_of[n_before:n_now]] if run_of is not None
                       else base_in.expand(n_now - n_before, -1, -1))
                hidden = torch.cat([hidden, new]) if n_before else new
            if inject is not None:
                hidden = inject(layer, hidden)
            if layer == stop:
                break
            todo = step(layer, hidden) if step is not None else Step()
            with hooked(model.hf_model, todo.hooks, model.dims), (
                    last_position_only(model.hf_model, model.runtime.mlp_branch_path(layer))
                    if todo.last_position_mlp else nullcontext()):
                hidden = model.runtime.run_layer(layer, calls[layer], hidden, prefix,
                                                 None if run_of is None else run_of[:n_now])
    return hidden


def embed(model: HookedModel, ids: torch.Tensor) -> torch.Tensor:
    """The token embedding's output (the ``embed`` site) for ``ids``, without hooks:
    ``[..., pos] -> [..., pos, d_model]``."""
    with torch.no_grad():
        return model.runtime.embed(ids)


def unembed(model: HookedModel, hidden: torch.Tensor,
            columns: Sequence[int] | None = None) -> torch.Tensor:
    """Final norm, output projection and soft-cap: ``[batch, d_model] -> [batch, vocab]``.

    ``columns``: only these vocabulary entries, ascending without repeats: ``[batch,
    len(set(columns))]`` (see :meth:`~causalpatch.adapters.runtime.Runtime.unembed`).
    """
    return model.runtime.unembed(hidden, model.config, columns)


def row_bytes(model: HookedModel, n_query: int, n_keys: int, n_columns: int | None = None
              ) -> int:
    """Estimated peak bytes one staircase row needs (activations of one layer call on
    ``n_query`` positions attending to ``n_keys`` keys, its prefix keys/values and its
    logits)."""
    d = model.dims
    itemsize = torch.finfo(model.dtype).bits // 8
    per_position = 10 * d.d_model + 4 * d.d_mlp + 3 * d.n_heads * d.d_head + 2 * d.n_heads * n_keys
    vocab = d.vocab_size if n_columns is None else n_columns
    return itemsize * (n_query * per_position + 2 * n_keys * d.n_kv_heads * d.d_head) + 8 * vocab


def rows_per_chunk(model: HookedModel, n_query: int, n_keys: int,
                   memory_mb: float, n_columns: int | None = None) -> int:
    """How many patch rows fit a memory budget in one staircase pass.

    Raises:
        InvalidArgumentError: the budget holds no row (the message names the minimum).
    """
    return fit_budget(memory_mb, row_bytes(model, n_query, n_keys, n_columns),
                      f"one patch row of this sweep ({n_query} positions, {n_keys} keys)",
                      "(or a larger budget, or batch_size=)", digits=3)


def fit_budget(memory_mb: float, unit_bytes: float, unit: str, alternative: str,
               digits: int = 0) -> int:
    """How many units of ``unit_bytes`` fit ``memory_mb`` MiB (at least one).

    Raises:
        InvalidArgumentError: the budget holds no unit; the message names ``unit``, the
            minimum budget (``digits`` decimals) and ``alternative``.
    """
    n = int(memory_mb * 2**20 // unit_bytes)
    if n < 1:
        need = f"{unit_bytes / 2**20:.{digits}f}"
        raise InvalidArgumentError(
            f"memory_mb={memory_mb:g} cannot hold {unit}: one needs {need} MiB; pass "
            f"memory_mb >= {need} {alternative}")
    return n


@dataclass
class _Row:
    """One live patch row: which base run, where it enters, its window and its writes."""

    index: int  # output row
    run: int  # index of its base run
    stage: int  # first decoder layer it changes (n_layers: only the final norm's input)
    window: int  # first position it changes
    changed: Changed


def staircase_logits(model: HookedModel, runs: Sequence[PairRun],
                     jobs: Sequence[tuple[int, Patch]], batch_size: int | None = None,
                     memory_mb: float = 1024.0, progress: Callable[[int], None] | None = None,
                     stats: dict[str, Any] | None = None,
                     columns: Sequence[int] | None = None,
                     readout: Callable[[torch.Tensor], torch.Tensor] | None = None
                     ) -> torch.Tensor:
    """Last-position logits of every job ``(run index, patch)``, on the staircase.

    Rows from several base runs of the same token length run in the same batches (each row
    reads its own run's residual stream and prefix keys/values); a row whose first changed
    entry is at position ``w`` computes only positions ``w..T-1`` (earlier positions are the
    base run's, taken from its cache), and enters the decoder stack at the first layer it
    changes.

    Args:
        runs: base runs (their ``prepared`` staircase contexts are filled in if missing).
        jobs: one output row each.
        batch_size: rows per staircase pass; default from ``memory_mb``.
        stats: receives counts: ``rows`` computed, ``skipped`` no-op patches, ``window`` the
            longest window, ``chunks`` staircase passes, ``batch_size`` the rows per pass chosen,
            ``layer_tokens`` the (row, layer, position) triples computed.
        columns: the vocabulary entries the caller reads (all by default); the logits then
            hold only those, ascending without repeats (:func:`unembed`).
        readout: reduces float32 logits ``[rows, vocab]`` to ``[rows, k]`` (e.g. the answer's
            probability, which needs the whole vocabulary's log-sum-exp); applied to every
            batch as it is computed and to the base runs' logits for no-op rows, so the
            logits of all rows are never held at once.

    Returns:
        ``[n_jobs, vocab]`` float32 logits (``[n_jobs, len(set(columns))]`` with ``columns``),
        or ``[n_jobs, k]`` readouts with ``readout``.
    """
    n_layers = model.n_layers
    base_last = torch.stack([run.base_last.float() for run in runs]) if runs else \
        torch.empty(0, model.vocab_size)  # [n_runs, vocab]
    if readout is not None and runs:
        base_last = readout(base_last).float()
    elif columns is not None:
        base_last = base_last[:, sorted(set(columns))]
    out = base_last[[r for r, _ in jobs]].cpu()
    live: list[_Row] = []
    memo: dict[Any, _Entries | None] = {}
    for i, (r, patch) in enumerate(jobs):
        run = runs[r]
        changed = _changed_entries(patch, run.base, run.source, memo, r)
        if not changed:
            if progress is not None:
                progress(1)
            continue
        T = run.base_ids.shape[1]
        window = min(T - 1, min(int(e.pos.min()) for e in changed))
        stage = min(_stage(e.sp, n_layers) for e in changed)
        if any(sp.frozen for sp in patch):
            changed = changed + _frozen_entries(patch, run.base, stage, window, n_layers)
        live.append(_Row(i, r, stage, window, changed))
    counts: dict[str, Any] = {"rows": len(live), "skipped": len(jobs) - len(live), "chunks": 0,
                              "layer_tokens": 0, "window": 0}
    # every run's staircase must start at or before its rows' windows
    first: dict[int, int] = {}
    for row in live:
        first[row.run] = min(first.get(row.run, row.window), row.window)
    for r, start in first.items():
        run = runs[r]
        if run.prepared is None or run.prepared.start > start or run.prepared.full_cache is None:
            run.prepared = prepare_staircase(model, run.base_ids, start, run.base_embed)
    # group rows by (length, window); each group is one staircase
    groups: dict[tuple[int, int], list[_Row]] = defaultdict(list)
    for row in live:
        groups[(runs[row.run].base_ids.shape[1], row.window)].append(row)
    n_cols = None if columns is None else len(set(columns))
    for (T, w), rows in sorted(groups.items()):
        rows.sort(key=lambda row: (row.stage, row.run))
        q = T - w
        chunk = batch_size or rows_per_chunk(model, q, T, memory_mb, n_cols)
        counts["batch_size"] = max(counts.get("batch_size", 0), chunk)
        counts["window"] = max(counts["window"], q)
        group = _Group.make(model, runs, rows, w)
        for lo in range(0, len(rows), chunk):
            part = rows[lo : lo + chunk]
            logits = group.run(model, part, columns).float()
            out[[row.index for row in part]] = (logits if readout is None
                                                else readout(logits).float()).to(out.device)
            counts["chunks"] += 1
            counts["layer_tokens"] += sum((n_layers - row.stage) * q for row in part)
            if progress is not None:
                progress(len(part))
    if stats is not None:
        for key, value in counts.items():
            if key in ("window", "batch_size"):
                stats[key] = max(stats.get(key, 0), value)
            else:
                stats[key] = stats.get(key, 0) + value
    return out


@dataclass
class _Group:
    """Rows of one or more base runs sharing a token length ``T`` and a window start ``w``:
    the layer calls on positions ``w..T-1``, each run's base residual stream there and its
    prefix keys/values (positions ``< w``), stacked over runs."""

    window: int
    calls: list[LayerCall]
    hidden: list[torch.Tensor]  # per layer (and the final norm's input): [n_runs, T - w, d]
    prefix: Any  # cache of positions < w, one row per run (None when w == 0)
    run_row: dict[int, int]  # run index -> row in the stacked tensors

    @staticmethod
    def make(model: HookedModel, runs: Sequence[PairRun], rows: Sequence[_Row], w: int
             ) -> _Group:
        runtime = model.runtime
        order = sorted({row.run for row in rows})
        run_row = {r: j for j, r in enumerate(order)}
        stairs: list[Staircase] = []
        for r in order:
            st = runs[r].prepared
            assert st is not None
            stairs.append(st)
        calls = _window_calls(model, runs[order[0]], w)
        hidden = []
        for layer in range(model.n_layers + 1):
            per_run = [(st.calls[layer].hidden if layer < model.n_layers else st.final_input)
                       [:, w - st.start:] for st in stairs]
            hidden.append(torch.cat(per_run) if len(per_run) > 1 else per_run[0])
        prefix = None
        if w > 0:
            caches = []
            for r, st in zip(order, stairs):
                cut = runtime.crop_cache(st.full_cache, w)
                caches.append(cut if cut is not None else _prefix_run(
                    model, runs[r].base_ids, w, [], runs[r].base_embed)[1])
            prefix = runtime.stack_caches(caches)
        return _Group(w, calls, hidden, prefix, run_row)

    def run(self, model: HookedModel, rows: Sequence[_Row],
            columns: Sequence[int] | None) -> torch.Tensor:
        """One chunk of rows (sorted by stage) through the decoder stack: ``[rows, vocab]``."""
        n_layers = model.n_layers
        w = self.window
        stages = [row.stage for row in rows]
        run_of = torch.tensor([self.run_row[row.run] for row in rows], dtype=torch.long)
        several = len(self.run_row) > 1
        injections: dict[int, _Writes] = defaultdict(_Writes)
        site_writes: dict[int, dict[str, tuple[Site, _Writes]]] = defaultdict(dict)
        for r, row in enumerate(rows):
            for e in row.changed:
                stage = _stage(e.sp, n_layers)
                if e.sp.site.kind in RESIDUAL_INJECTED:
                    writes = injections[stage]
                else:
                    writes = site_writes[stage].setdefault(e.sp.site.name,
                                                           (e.sp.site, _Writes()))[1]
                writes.add_many(r, e.pos - w, e.units, e.values)

        def inject(layer: int, hidden: torch.Tensor) -> torch.Tensor:
            return injections[layer].apply(hidden) if layer in injections else hidden

        def step(layer: int, hidden: torch.Tensor) -> Step:
            writes = list(site_writes[layer].values())
            last = layer == n_layers - 1 and hidden.shape[1] > 1 and all(
                _before_mlp(site) or _in_mlp(site) for site, _ in writes)
            kept: list[tuple[Site, _Writes | None]] = list(writes)
            if last:  # the MLP branch sees only the last position: keep its writes there
                kept = [(site, wr if _before_mlp(site) else wr.at(hidden.shape[1] - 1))
                        for site, wr in writes]
            return Step([Hook(site, _writer(wr)) for site, wr in kept if wr is not None],
                        last_position_mlp=last)

        hidden = climb(model, self.calls, self.hidden.__getitem__, stages, n_layers, step,
                       prefix=self.prefix, run_of=run_of if several else None, inject=inject)
        # after the last layer only position -1 is valid (its MLP ran on that one alone)
        with torch.no_grad():
            return unembed(model, hidden[:, -1], columns)


def _before_mlp(site: Site) -> bool:
    """A site a decoder layer computes before its MLP branch, at every position (``resid_mid``
    is written on the attention output)."""
    return site.kind in ("resid_pre", "resid_mid", "attn") or site.kind.startswith("attn.")


def _in_mlp(site: Site) -> bool:
    """A site inside a decoder layer's MLP branch, which works on each position separately: in
    the last layer only its last position reaches the logits."""
    return site.kind == "mlp" or site.kind.startswith("mlp.")


def _window_calls(model: HookedModel, run: PairRun, w: int) -> list[LayerCall]:
    """Every decoder layer's call on positions ``w..T-1`` of ``run``'s base prompt: cut from the
    recorded calls when that is exact, else recorded with a real forward over the window."""
    st = run.prepared
    assert st is not None
    cut = [call.window(w - st.start) for call in st.calls]
    exact = w == st.start or (st.full_cache is not None and
                              model.runtime.crop_cache(st.full_cache, w) is not None)
    if exact and all(c is not None for c in cut):
        return cut  # type: ignore[return-value]
    return prepare_staircase(model, run.base_ids, w, run.base_embed).calls


# -- dispatch ----------------------------------------------------------------------------------
def run_sites(model: HookedModel, ids: Sequence[int], sites: Sequence[Site]
              ) -> tuple[RunActivations, torch.Tensor]:
    """One plain forward pass: activations at ``sites`` ``[1, pos, ...]`` and last logits."""
    tr = model.trace([list(ids)], cache=[s.name for s in sites]).run()
    return RunActivations({s.name: tr.cache[s.name] for s in sites}), tr.last_logits[0].float()


def run_base_and_source(model: HookedModel, base_ids: Sequence[int], source_ids: Sequence[int],
                        sites: Sequence[Site], patches: Sequence[Patch],
                        engine: Engine = Engine.FAST) -> PairRun:
    """The base and source runs of a pair (:func:`base_and_source_runs` of one pair)."""
    return base_and_source_runs(model, [(base_ids, source_ids)], sites, patches, engine)[0]


def base_and_source_runs(model: HookedModel,
                         pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                         sites: Sequence[Site], patches: Sequence[Patch],
                         engine: Engine = Engine.FAST) -> list[PairRun]:
    """The base and source runs of every ``(base_ids, source_ids)`` pair: :func:`pair_runs`
    (shared prefixes, staircase contexts, pairs of one shape batched) for the fast engine, or
    two plain forward passes per pair for the naive reference."""
    if engine is Engine.FAST and fast_supported(patches):
        return pair_runs(model, pairs, sites)
    runs = []
    for base_ids, source_ids in pairs:
        base, base_last = run_sites(model, base_ids, sites)
        source, source_last = run_sites(model, source_ids, sites)
        ids = torch.tensor([list(base_ids)], dtype=torch.long, device=model.device)
        runs.append(PairRun(ids, base, source, base_last, source_last, None))
    return runs


def patched_logits(model: HookedModel, run: PairRun, patches: Sequence[Patch],
                   engine: Engine = Engine.FAST, batch_size: int | None = None,
                   memory_mb: float = 1024.0, progress: Callable[[int], None] | None = None,
                   stats: dict[str, Any] | None = None,
                   columns: Sequence[int] | None = None) -> torch.Tensor:
    """``[n_patches, vocab]`` last-position logits of every patch applied to ``run``'s base.

    Args:
        engine: ``FAST`` (the staircase) or ``NAIVE`` (one forward per patch); same numbers.
        batch_size: patch rows per staircase pass (default: from ``memory_mb``).
        stats: receives the fast engine's counts (see :func:`staircase_logits`).
        columns: only these vocabulary entries, ascending without repeats (``[n_patches,
            len(set(columns))]``; the fast engine computes only them).
    """
    return patched_logits_many(model, [run], [(0, p) for p in patches], engine, batch_size,
                               memory_mb, progress, stats, columns)


def patched_logits_many(model: HookedModel, runs: Sequence[PairRun],
                        jobs: Sequence[tuple[int, Patch]], engine: Engine = Engine.FAST,
                        batch_size: int | None = None, memory_mb: float = 1024.0,
                        progress: Callable[[int], None] | None = None,
                        stats: dict[str, Any] | None = None,
                        columns: Sequence[int] | None = None) -> torch.Tensor:
    """``[n_jobs, vocab]`` logits of every job ``(run index, patch)``: the rows of several base
    runs (e.g. all pairs of a dataset with the same token length) share staircase batches.
    With ``columns``, ``[n_jobs, len(set(columns))]`` (those entries, ascending)."""
    patches = [p for _, p in jobs]
    if engine is Engine.NAIVE or not fast_supported(patches):
        cols = slice(None) if columns is None else sorted(set(columns))
        if not jobs:
            return torch.empty(0, model.vocab_size)[:, cols]
        out = []
        for r, run in enumerate(runs):
            mine = [i for i, (k, _) in enumerate(jobs) if k == r]
            if mine:
                out.append((mine, naive_patched_logits(model, run.base_ids,
                                                       [patches[i] for i in mine], run.source,
                                                       progress, run.base)[:, cols]))
        logits = torch.empty(len(jobs), out[0][1].shape[-1])
        for mine, values in out:
            logits[mine] = values
        return logits
    return staircase_logits(model, runs, jobs, batch_size, memory_mb, progress, stats, columns)


def last_logits(model: HookedModel, ids: torch.Tensor, hooks: Sequence[Hook] = ()
                ) -> torch.Tensor:
    """Last-position logits ``[batch, vocab]`` of an unpadded batch ``ids`` ``[batch, pos]``.

    Runs under the caller's grad mode (attribution patching differentiates through it).
    """
    with hooked(model.hf_model, hooks, model.dims):
        return model.runtime.forward(ids, last_only=True)[0][:, -1]


# -- first-order (gradient) pass ---------------------------------------------------------------
Leaf = Callable[[Site, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]
"""How a gradient pass makes a site differentiable: ``(site, act) -> (act', leaves)`` where
``act'`` equals ``act`` exactly and depends on the zero ``leaves`` (``name -> tensor`` with
``requires_grad``), whose gradients the pass returns."""


def delta_leaf(site: Site, act: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The plain :data:`Leaf`: ``act + delta`` with ``delta = 0``, so ``d metric / d delta``
    is exactly ``d metric / d act`` (leaf name ``"act"``)."""
    delta = torch.zeros_like(act, requires_grad=True)
    return act + delta, {"act": delta}


After = Callable[[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor],
                  dict[str, torch.Tensor]], None]
"""A gradient pass's callback ``(grads, base, source) -> None`` (:func:`gradient_pass`)."""


@dataclass
class Gradients:
    """What one gradient pass of a batch of ``b`` pairs gives.

    Attributes:
        base, source: each site's activation in the base and source runs ``[b, T, ...]``.
        grads: ``site name -> leaf name -> d metric / d leaf`` at the base run (zeros where the
            metric does not depend on the leaf).
        base_values, source_values: ``[b]`` the metric of the base and source runs.
    """

    base: dict[str, torch.Tensor]
    source: dict[str, torch.Tensor]
    grads: dict[str, dict[str, torch.Tensor]]
    base_values: torch.Tensor
    source_values: torch.Tensor


def gradient_pass(model: HookedModel, base_ids: torch.Tensor, source_ids: torch.Tensor,
                  sites: Sequence[Site],
                  objective: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                  leaf: Leaf = delta_leaf, timings: dict[str, float] | None = None,
                  what: str = "attribution patching", *,
                  base_embeds: torch.Tensor | None = None,
                  after: After | None = None,
                  keep: Collection[str] | None = None) -> Gradients:
    """The one gradient pass of every first-order method: one source forward (caching the
    sites), one base forward with each site made differentiable by ``leaf``, one backward.

    The gradients are taken with :func:`torch.autograd.grad` with respect to the leaves only,
    so the model's parameters never receive ``.grad``, whether or not they require it.

    Args:
        base_ids, source_ids: ``[b, T]`` token ids of the run patched into and from.
        objective: ``(base_logits [b, vocab], source_logits [b, vocab]) -> [b]`` the metric of
            each base row (it must be differentiable in ``base_logits``; rows independent).
        timings: receives ``source_forward_s``, ``base_forward_s``, ``backward_s`` (added).
        what: the method's name, for error messages.
        base_embeds: ``[b, T, d_model]`` the base forward's embedding output (the ``embed``
            site) instead of the tokens' own, e.g. integrated gradients' interpolations
            (``base`` then holds the activations of those runs).
        after: called with ``site name -> leaf name -> gradient``, the base and the source
            activations (as ``base``/``source`` of the result) right after the backward, while
            the base run's graph is still alive (it is retained for this call): the caller's
            own vector-Jacobian products between the tensors its ``leaf`` kept (edge
            attribution's per-receiver input gradients, contracted there and then).
        keep: the site names whose base and source activations the caller needs (``base`` and
            ``source`` hold only these); ``None``: every site's.

    Raises:
        InvalidArgumentError: a site the forward never reaches, or a metric that does not
            depend differentiably on the logits.
        NonFiniteError: a gradient that is not finite.
    """
    return _first_order(model, base_ids, source_ids, sites, objective, leaf, timings, what,
                        drop_layers=False, base_embeds=base_embeds, after=after,
                        keep=keep).plain


@dataclass
class DroppedGradients:
    """What :func:`graddrop_pass` gives: the plain pass and one gradient per dropped layer.

    Attributes:
        plain: the ordinary :class:`Gradients` (equal to :func:`gradient_pass`'s).
        dropped: ``dropped[l]``: ``site name -> leaf name -> gradient`` with the gradient
            through layer ``l``'s residual writes (its attention and MLP outputs) set to zero.
    """

    plain: Gradients
    dropped: list[dict[str, dict[str, torch.Tensor]]]


def graddrop_pass(model: HookedModel, base_ids: torch.Tensor, source_ids: torch.Tensor,
                  sites: Sequence[Site],
                  objective: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                  leaf: Leaf = delta_leaf, timings: dict[str, float] | None = None,
                  what: str = "attribution patching") -> DroppedGradients:
    """:func:`gradient_pass` plus GradDrop (AtP*, Kramar et al. 2024): the gradient of every
    leaf with the gradient through layer ``l``'s residual writes (its attention and MLP
    outputs, the only ways layer ``l`` writes to the residual stream) set to zero, for every
    ``l``: one source forward, one base forward whose graph is kept, the plain backward and
    ``L`` partial ones.

    Pass ``l`` restarts from the plain gradient ``G_l`` at layer ``l``'s output: with the
    writes dropped, layer ``l`` passes ``G_l`` unchanged to its input (the skip connection),
    so a leaf the forward made

    * after layer ``l``'s output has its plain gradient,
    * inside layer ``l`` has gradient 0 (its only ways out are the dropped writes),
    * before layer ``l``'s input has the vector-Jacobian product of that input with ``G_l``,
      one backward from layer ``l`` down instead of from the logits.

    Tests prove every pass equal to the textbook one (one forward per ``l`` with the writes
    detached, one full backward). Arguments, raises: as :func:`gradient_pass`; ``timings``
    also receives ``graddrop_backward_s``.
    """
    return _first_order(model, base_ids, source_ids, sites, objective, leaf, timings, what,
                        drop_layers=True)


def _first_order(model: HookedModel, base_ids: torch.Tensor, source_ids: torch.Tensor,
                 sites: Sequence[Site],
                 objective: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 leaf: Leaf, timings: dict[str, float] | None, what: str, drop_layers: bool,
                 base_embeds: torch.Tensor | None = None,
                 after: After | None = None,
                 keep: Collection[str] | None = None) -> DroppedGradients:
    """:func:`gradient_pass` and, with ``drop_layers``, :func:`graddrop_pass`'s extra passes
    (``dropped`` is empty without them)."""
    t0 = time.perf_counter()
    source: dict[str, torch.Tensor] = {}
    kept_sites = [s for s in sites if keep is None or s.name in keep]
    with torch.no_grad():
        source_last = last_logits(model, source_ids, cachers(source, kept_sites)).float()
    t1 = time.perf_counter()
    base: dict[str, torch.Tensor] = {}
    leaves: dict[str, dict[str, torch.Tensor]] = {}
    made: dict[str, int] = {}  # forward order: leaves by site name, "pre l" / "post l"
    ends: dict[str, torch.Tensor] = {}

    def attach(name: str, site: Site) -> Callable[[torch.Tensor], torch.Tensor]:
        def hook(act: torch.Tensor) -> torch.Tensor:
            if keep is None or name in keep:
                base[name] = act.detach().clone()
            new, leaves[name] = leaf(site, act)
            made[name] = len(made)
            return new
        return hook

    def end(key: str) -> Callable[[torch.Tensor], torch.Tensor]:
        def hook(act: torch.Tensor) -> torch.Tensor:
            out = act.clone()  # the same value; a node to restart from
            ends[key] = out
            made[key] = len(made)
            return out
        return hook

    n_layers = model.n_layers
    hooks = [Hook(s, attach(s.name, s)) for s in sites]
    if drop_layers:  # a layer's input after any leaf there; its output before any leaf there
        hooks = [*[Hook(model.layer_site("resid_post", layer), end(f"post {layer}"))
                   for layer in range(n_layers)], *hooks,
                 *[Hook(model.layer_site("resid_pre", layer), end(f"pre {layer}"))
                   for layer in range(n_layers)]]
    hooks = [*_embed_hooks(model, base_embeds, 0), *hooks]
    passes: list[Sequence[torch.Tensor | None]] = []
    with torch.enable_grad():
        base_last = last_logits(model, base_ids, hooks)
        base_values = objective(base_last, source_last)
        t2 = time.perf_counter()
        missing = [s.name for s in sites if s.name not in leaves]
        if missing:
            raise InvalidArgumentError(
                f"site(s) {missing} were not reached in the forward pass; {what} needs sites the "
                "logits depend on")
        if not base_values.requires_grad:
            raise InvalidArgumentError(
                f"the metric does not depend differentiably on the logits; {what} needs a "
                "differentiable metric (use the exact method instead)")
        flat = [(s.name, k, t) for s in sites for k, t in leaves[s.name].items()]
        posts = [ends[f"post {layer}"] for layer in range(n_layers)] if drop_layers else []
        # rows are independent, so the gradient of the sum is each row's own gradient
        found = torch.autograd.grad(base_values.sum(), [t for _, _, t in flat] + posts,
                                    allow_unused=True,
                                    retain_graph=drop_layers or after is not None)
        passes.append(found[:len(flat)])
        if after is not None:
            plain_grads: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
            for (site_name, leaf_name, leaf_t), got in zip(flat, found[:len(flat)]):
                plain_grads[site_name][leaf_name] = (torch.zeros_like(leaf_t) if got is None
                                                     else got)
            after(dict(plain_grads), base, source)
        g_post = found[len(flat):]
        t3 = time.perf_counter()
        for layer in range(n_layers if drop_layers else 0):
            start, stop = made[f"pre {layer}"], made[f"post {layer}"]
            below = [i for i, (name, _, _) in enumerate(flat) if made[name] < start]
            row: list[torch.Tensor | None] = [
                passes[0][i] if made[name] > stop else None
                for i, (name, _, _) in enumerate(flat)]
            if below and g_post[layer] is not None:
                vjp = torch.autograd.grad(ends[f"pre {layer}"], [flat[i][2] for i in below],
                                          grad_outputs=g_post[layer], allow_unused=True,
                                          retain_graph=layer != n_layers - 1)
                for i, g in zip(below, vjp):
                    row[i] = g
            passes.append(row)
    t4 = time.perf_counter()
    per_pass: list[dict[str, dict[str, torch.Tensor]]] = []
    for found_ in passes:
        grads: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
        for (name, key, tensor), maybe in zip(flat, found_):
            g = torch.zeros_like(tensor) if maybe is None else maybe.detach()
            if not torch.isfinite(g).all():
                raise NonFiniteError(
                    f"the gradient of the metric at {name} is not finite (a distance metric "
                    f"whose base and source logits coincide has no gradient); use a score "
                    f"metric or the exact method instead of {what}")
            grads[name][key] = g
        per_pass.append(dict(grads))
    with torch.no_grad():
        source_values = objective(source_last, source_last).detach()
    if timings is not None:
        spans = [("source_forward_s", t1 - t0), ("base_forward_s", t2 - t1),
                 ("backward_s", t3 - t2)]
        if drop_layers:
            spans.append(("graddrop_backward_s", t4 - t3))
        for key, dt in spans:
            timings[key] = timings.get(key, 0.0) + dt
    plain = Gradients(base, source, per_pass[0], base_values.detach(), source_values)
    return DroppedGradients(plain, per_pass[1:])


def pattern_patched_outputs(model: HookedModel, base_ids: torch.Tensor,
                            layers: Sequence[tuple[Site, torch.Tensor, Site, torch.Tensor]],
                            rows: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Attention outputs of the base run with the patched attention pattern recomputed exactly
    by the model's own attention (its scaling, soft-cap, rotary embedding, mask), every layer
    in one forward (stopped once the last output is read): AtP*'s QK fix linearises only what
    comes after.

    At each layer of ``layers`` = ``(patched, source, output, base_output)``, the ``patched``
    input of the attention (``attn.q`` or ``attn.k``) is taken from ``source`` ``[b, T, ...]``
    at some positions, the attention output ``output`` (``attn.z`` of that layer) is read, and
    then set back to ``base_output`` so that every later layer sees the base run again.

    Args:
        base_ids: ``[b, T]``.
        rows: one run per entry, patching the entry's positions (every head at once: heads
            do not mix inside an attention layer).

    Returns:
        Per entry of ``layers``: ``[b, len(rows), T, ...]`` the output of every run (no
        gradient).
    """
    b = base_ids.shape[0]
    n = len(rows)
    ids = base_ids.repeat_interleave(n, dim=0)  # row-major: pair, then run
    seen: dict[int, torch.Tensor] = {}

    def replace(source: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        def hook(act: torch.Tensor) -> torch.Tensor:
            new = act.clone()
            for r, positions in enumerate(rows):
                pos = list(positions)
                new[r::n][:, pos] = source[:, pos].to(new.dtype)
            return new
        return hook

    def read_and_restore(i: int, base_output: torch.Tensor
                         ) -> Callable[[torch.Tensor], torch.Tensor]:
        def hook(act: torch.Tensor) -> torch.Tensor:
            seen[i] = act.detach().clone()
            if len(seen) == len(layers):
                raise StopForward  # nothing later is read
            return base_output.repeat_interleave(n, dim=0).to(act.dtype)
        return hook

    hooks = []
    for i, (patched, source, output, base_output) in enumerate(layers):
        hooks += [Hook(patched, replace(source)), Hook(output, read_and_restore(i, base_output))]
    try:
        with torch.no_grad():
            last_logits(model, ids, hooks)
    except StopForward:
        pass
    missing = [output.name for i, (_, _, output, _) in enumerate(layers) if i not in seen]
    if missing:
        raise InvalidArgumentError(
            f"{missing} not reached; the QK fix needs the attention output of each patched "
            "layer")
    return [seen[i].reshape(b, n, *seen[i].shape[1:]) for i in range(len(layers))]


# -- AtP*'s key fix in closed form ---------------------------------------------------------------
#: The closed-form key fix is used only where ``softmax(scores) . v`` reproduces the layer's own
#: attention output to this fraction of its largest entry (float32 models: observed <= 3e-7;
#: anything structural the logits miss, a sink or a bias outside the mask, is of order 1).
KEY_FIX_CHECK = {torch.float64: 1e-4, torch.float32: 1e-4, torch.float16: 2e-2,
                 torch.bfloat16: 4e-2}


@dataclass
class KeyPatternChange:
    """One attention layer's pattern change when each key position ``n`` alone takes its
    source key (AtP*'s key fix, Kramar et al. 2024), in closed form, every key at once.

    With the base logits ``s_t`` of query row ``t`` (``-inf`` where masked), a change of key
    ``n`` changes only column ``n``: ``s'_tn = s_tn + ds_tn`` with ``ds_tn = s(q_t, k'_n) -
    s(q_t, k_n)`` (the model's scaling and soft-cap), so the patched row is
    ``a'_t(n) = softmax(s_t + e_n ds_tn)``. Writing ``x_tn = s_tn - logsumexp_{j != n} s_tj``
    (``a_tn = sigmoid(x_tn)``), the patched weight of ``n`` is ``a'_tn = sigmoid(x_tn +
    ds_tn)`` and every other weight is rescaled by ``(1 - a'_tn) / (1 - a_tn)``.

    The estimate linearises only what follows the pattern: with ``G_tj = d metric / d a_tj =
    g_t . v_j`` (``g_t`` the metric's gradient at the head's output ``z_t = sum_j a_tj v_j``)

        c(n) = sum_t sum_j G_tj (a'_tj(n) - a_tj) = sum_t (a'_tn - a_tn) (G_tn - g_t . u_tn)

    where ``u_tn`` is the value average without ``n``, ``sum_{j != n} a_tj v_j / (1 - a_tn)``
    (the second form follows from the rescaling; it is ``O(T^2)`` per head instead of
    ``O(T^3)``). For ``n`` not a row's largest logit ``a_tn <= 1/2``, so dividing by ``1 -
    a_tn`` is safe; for the row's largest logit, ``u`` is the softmax of the row without it,
    taken from the logits, so a saturated softmax (``a_tn`` = 1 in float32) loses nothing.

    Attributes:
        pattern: ``[b, H, T, T]`` the base pattern ``a`` (float64).
        change: ``[b, H, T, R]`` ``a'_tn - a_tn`` for the ``R`` key positions ``keys``.
        is_top: ``[b, H, T, R]`` whether key ``n`` holds row ``t``'s largest logit.
        without_top: ``[b, H, T, T]`` each row's softmax without its largest logit (zeros for
            a row with one key).
        values: ``[b, T, H, d_head]`` the values each query head reads (float64).
        keys: the key positions.
    """

    pattern: torch.Tensor
    change: torch.Tensor
    is_top: torch.Tensor
    without_top: torch.Tensor
    values: torch.Tensor
    keys: list[int]

    @staticmethod
    def make(scores: torch.Tensor, patched: torch.Tensor, values: torch.Tensor,
             keys: Sequence[int]) -> KeyPatternChange:
        """From the base logits ``scores`` and the logits ``patched`` of a run with every key
        of ``keys`` from the source ``[b, H, T, T]`` (``-inf`` where masked), and the values
        ``[b, T, KV, d_head]``."""
        cols = list(keys)
        s = scores.double()
        total = torch.logsumexp(s, -1, keepdim=True)
        pattern = torch.exp(s - total)
        top = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, s.argmax(-1, keepdim=True),
                                                              True)
        rest = s.masked_fill(top, float("-inf"))
        rest_total = torch.logsumexp(rest, -1, keepdim=True)  # -inf for a one-key row
        without_top = torch.where(torch.isfinite(rest_total), torch.exp(rest - rest_total),
                                  torch.zeros_like(rest))
        s_n, a_n, top_n = s[..., cols], pattern[..., cols], top[..., cols]
        allowed = torch.isfinite(s_n)
        delta = torch.where(allowed, patched.double()[..., cols] - s_n, torch.zeros_like(s_n))
        # logsumexp of row t without key n: from the row's total (a_tn <= 1/2 there) or, for
        # the row's largest logit, from the logits without it
        other = torch.where(top_n, rest_total.expand_as(s_n),
                            total + torch.log1p(-a_n.clamp(max=0.5)))
        x = s_n - other  # -inf where masked, +inf for a row's only key
        change = torch.sigmoid(x + delta) - torch.sigmoid(x)
        groups = scores.shape[1] // values.shape[2]
        v = values.double().repeat_interleave(groups, dim=2) if groups > 1 else values.double()
        return KeyPatternChange(pattern, change, top_n, without_top, v, cols)

    def output(self) -> torch.Tensor:
        """``[b, T, H, d_head]`` the attention output these logits and values give (the
        check against the layer's own output)."""
        return torch.einsum("bhtj,bjhd->bthd", self.pattern, self.values)

    def contract(self, grad: torch.Tensor) -> torch.Tensor:
        """``[b, R, H]`` the estimate ``c(n)`` of each key position and query head, for the
        metric's gradient ``grad`` ``[b, T, H, d_head]`` at the head outputs."""
        g = grad.double()
        G = torch.einsum("bthd,bjhd->bhtj", g, self.values)  # d metric / d a_tj
        through = (self.pattern * G).sum(-1, keepdim=True)  # g_t . z_t
        g_n, a_n = G[..., self.keys], self.pattern[..., self.keys]
        rest = (through - a_n * g_n) / (1 - a_n.clamp(max=0.5))  # g_t . u_tn, n not the top
        top = (self.without_top * G).sum(-1, keepdim=True)  # g_t . u_tn, n the top
        u = torch.where(self.is_top, top.expand_as(g_n), rest)
        return (self.change * (g_n - u)).sum(2).transpose(1, 2)


def key_pattern_changes(model: HookedModel, base_ids: torch.Tensor,
                        layers: Sequence[tuple[Site, torch.Tensor, Site, Site]],
                        keys: Sequence[int]) -> list[KeyPatternChange] | None:
    """AtP*'s key fix in closed form (:class:`KeyPatternChange`) for every layer of
    ``layers``, from one forward of ``2b`` rows: the base run, and the base run with every
    key of ``keys`` from the source (whose attention output is then set back to the base
    run's, so each layer's logits are those of the base run with only its own keys patched).

    Each entry of ``layers`` is ``(key site, source keys [b, T, KV, d_head], value site,
    output site)`` (``attn.k``, ``attn.v``, ``attn.z`` of one layer). The logits come from the
    layer's attention call (:func:`causalpatch.adapters.runtime.attention_scores`: the model's
    scaling, soft-cap and mask, after rotary embedding and q/k norms).

    Returns ``None`` when the logits cannot be read for this model, or when the softmax of the
    logits times the values does not reproduce a layer's own attention output (within
    :data:`KEY_FIX_CHECK`): the caller then recomputes the patterns exactly
    (:func:`pattern_patched_outputs`).
    """
    b = base_ids.shape[0]
    cols = list(keys)
    ids = torch.cat([base_ids, base_ids])
    scores: dict[int, torch.Tensor] = {}
    values: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}

    def patch(source: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        def hook(act: torch.Tensor) -> torch.Tensor:
            new = act.clone()
            new[b:, cols] = source[:, cols].to(new.dtype)
            return new
        return hook

    def read(store: dict[int, torch.Tensor], i: int) -> Callable[[torch.Tensor], None]:
        def hook(act: torch.Tensor) -> None:
            store[i] = act.detach().clone()
        return hook

    def restore(i: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def hook(act: torch.Tensor) -> torch.Tensor:
            outputs[i] = act[:b].detach().clone()
            if len(outputs) == len(layers):
                raise StopForward  # nothing later is read
            new = act.clone()
            new[b:] = act[:b]
            return new
        return hook

    hooks = []
    for i, (key_site, source, value_site, output_site) in enumerate(layers):
        if key_site.layer is None:
            return None  # a single module, not a layer's keys
        pattern_site = model.layer_site("attn.pattern", key_site.layer)
        score_site = replace(pattern_site, name=f"{pattern_site.name}:scores", hook="scores")
        hooks += [Hook(key_site, patch(source)), Hook(value_site, read(values, i)),
                  Hook(score_site, read(scores, i)), Hook(output_site, restore(i))]
    try:
        with torch.no_grad():
            last_logits(model, ids, hooks)
    except StopForward:
        pass
    except UnsupportedArchitectureError:
        return None
    if len(scores) != len(layers) or len(values) != len(layers):
        return None  # an attention call the tap does not see (a family's own code path)
    out = []
    for i in range(len(layers)):
        change = KeyPatternChange.make(scores[i][:b], scores[i][b:], values[i][:b], cols)
        own = outputs[i].double()
        tol = KEY_FIX_CHECK.get(outputs[i].dtype, 1e-4) * float(own.abs().max())
        if not float((change.output() - own).abs().max()) <= tol:
            return None
        out.append(change)
    return out

"""The sweep engine: the metric of many patched runs, exactly and with little work.

A *patch* (one row of a sweep) replaces some entries of some sites' activations in the *base*
run (the run patched into) with the *source* run's values, or with values the patch carries
itself (:attr:`~causalpatch.plan.SitePatch.values`: one vector per entry, e.g. an SAE feature
patch ``x_base + decode(f') - decode(f_base)``). Two implementations:

:func:`naive_patched_logits`
    The reference: one full forward pass of the base prompt per patch, with hooks.

:func:`fast_patched_logits`
    The same numbers with far less work, using only facts about causal transformers:

    1. **Exact no-ops are skipped.** A patch whose values (source or its own) equal the base
       values at every entry leaves the run unchanged; its logits are the base logits.
    2. **Shared prefix.** Positions before the first entry that actually changes (``s``) are
       identical to the base run in every patched run, so their keys/values come from the base
       run's cache (Hugging Face's own ``Cache``) and only the ``T - s`` suffix positions are
       computed.
    3. **Start where the patch is.** A patch at layer ``L`` leaves layers ``< L`` unchanged, so
       its row enters at layer ``L`` with the base run's residual stream. Rows are processed
       as a *staircase*: the batch grows layer by layer as rows enter, so each decoder layer is
       called once per chunk with every row that needs it.
    4. **Last position only** goes through the final norm and the unembedding.
    5. **One sync**: the metric is computed for all rows at once on the device.

    The decoder layers are the model's own ``transformers`` modules, called with exactly the
    arguments Hugging Face passes them (recorded from a real forward over the suffix with the
    prefix cache), so masks, rotary embeddings and sliding windows are Hugging Face's.

Both return ``[n_patches, vocab]`` logits at the last position; tests prove them equal.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .adapters.runtime import LayerCall, first_argument, parse_layer_call, stack_paths
from .enums import Engine
from .hooks import Hook, StopForward, hooked, recorded_calls
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


def entry_values(sp: SitePatch, source: RunActivations
                 ) -> list[tuple[int, int | None, torch.Tensor]]:
    """Every entry ``(pos, unit)`` of ``sp`` with the value it is set to: the patch's own
    ``values`` when it carries them, else the source run's activation there."""
    if sp.values is not None:
        return [(p, u, sp.values[i]) for i, (p, u) in enumerate(sp.entries())]
    return [(p, u, source.value(sp.site, p, u)) for p, u in sp.entries()]


def collect_sites(patches: Sequence[Patch]) -> list[Site]:
    """Distinct sites used by a list of patches, in first-seen order."""
    seen: dict[str, Site] = {}
    for patch in patches:
        for sp in patch:
            seen.setdefault(sp.site.name, sp.site)
    return list(seen.values())


# -- applying entries --------------------------------------------------------------------------
@dataclass
class _Writes:
    """Vectorised writes ``act[rows, pos, unit] = values`` for one site."""

    rows: list[int] = field(default_factory=list)
    pos: list[int] = field(default_factory=list)
    units: list[int] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    has_units: bool = False

    def add(self, row: int, pos: int, unit: int | None, value: torch.Tensor) -> None:
        self.rows.append(row)
        self.pos.append(pos)
        self.units.append(0 if unit is None else unit)
        self.has_units = unit is not None
        self.values.append(value)

    def freeze(self) -> _Writes:
        out = _Writes(has_units=self.has_units)
        out.rows = torch.tensor(self.rows, dtype=torch.long)  # type: ignore[assignment]
        out.pos = torch.tensor(self.pos, dtype=torch.long)  # type: ignore[assignment]
        out.units = torch.tensor(self.units, dtype=torch.long)  # type: ignore[assignment]
        out.values = torch.stack(self.values)  # type: ignore[assignment]
        return out

    def apply(self, act: torch.Tensor) -> torch.Tensor:
        out = act.clone()
        values = self.values.to(act.dtype)  # type: ignore[attr-defined]
        if self.has_units:
            out[self.rows, self.pos, self.units] = values
        else:
            out[self.rows, self.pos] = values
        return out


def _writer(writes: _Writes) -> Callable[[torch.Tensor], torch.Tensor]:
    return writes.apply


# -- naive reference ---------------------------------------------------------------------------
def naive_patched_logits(model: HookedModel, base_ids: torch.Tensor,
                         patches: Sequence[Patch], source: RunActivations,
                         progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Reference implementation: one forward pass per patch.

    Args:
        base_ids: ``[1, pos]`` token ids of the run patched into.
        patches: the patches, one per output row.
        source: the source run's activations at every patched site.

    Returns:
        ``[n_patches, vocab]`` float32 logits at the last position.
    """
    batch = make_batch([base_ids[0].tolist()], model.pad_token_id, model.device)
    rows = []
    for patch in patches:
        hooks = []
        for sp in patch:
            writes = _Writes()
            for pos, unit, value in entry_values(sp, source):
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


Changed = list[tuple[SitePatch, list[tuple[int, int | None, torch.Tensor]]]]
"""A patch's entries that change the base run, per site patch, with their values."""


def _changed_entries(patch: Patch, base: RunActivations, source: RunActivations) -> Changed:
    """The entries of ``patch`` whose value (the source run's, or the patch's own ``values``)
    differs from the base value."""
    out = []
    for sp in patch:
        bas = base.acts[sp.site.name][0]
        changed = [(p, u, v) for p, u, v in entry_values(sp, source)
                   if not torch.equal(v, bas[p] if u is None else bas[p, u])]
        if changed:
            out.append((sp, changed))
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
    """

    start: int
    calls: list[LayerCall]
    final_input: torch.Tensor
    prefix_cache: Any


def cachers(store: dict[str, torch.Tensor], sites: Sequence[Site]) -> list[Hook]:
    """Read-only hooks saving each site's activation (a detached clone) into
    ``store[site.name]``."""

    def saver(name: str) -> Callable[[torch.Tensor], None]:
        def save(act: torch.Tensor) -> None:
            store[name] = act.detach().clone()

        return save

    return [Hook(site, saver(site.name)) for site in sites]


def _suffix_run(model: HookedModel, ids: torch.Tensor, start: int, prefix_cache: Any,
                sites: Sequence[Site], record: bool
                ) -> tuple[dict[str, torch.Tensor], torch.Tensor, Staircase | None]:
    """Run positions ``start..T-1`` of ``ids`` on top of ``prefix_cache``.

    Returns the activations of ``sites`` on those positions, the last-position logits
    ``[vocab]`` and, with ``record``, the staircase context (each layer's call arguments).
    """
    runtime = model.runtime
    paths = stack_paths(runtime) if record else []
    acts: dict[str, torch.Tensor] = {}
    with torch.no_grad(), hooked(model.hf_model, cachers(acts, sites), model.dims), \
            recorded_calls(model.hf_model, paths) as calls:
        logits, _ = runtime.forward(ids[:, start:], cache=prefix_cache if start > 0 else None,
                                    last_only=True)
    last = logits[0, -1].float()
    if not record:
        return acts, last, None
    layer_calls = [parse_layer_call(*calls[path]) for path in runtime.layer_paths]
    final_input = first_argument(*calls[runtime.final_norm_path])
    return acts, last, Staircase(start, layer_calls, final_input, prefix_cache)


def _prefix_run(model: HookedModel, ids: torch.Tensor, start: int,
                sites: Sequence[Site]) -> tuple[dict[str, torch.Tensor], Any]:
    """Run positions ``0..start-1`` with a cache; activations of ``sites`` and the cache."""
    if start == 0:
        return {}, None
    acts: dict[str, torch.Tensor] = {}
    with torch.no_grad(), hooked(model.hf_model, cachers(acts, sites), model.dims):
        _, cache = model.runtime.forward(ids[:, :start], keep_cache=True, last_only=True)
    return acts, cache


def prepare_staircase(model: HookedModel, base_ids: torch.Tensor, start: int) -> Staircase:
    """Prefill the base prompt's prefix (positions ``< start``) and record each layer's call
    on the suffix; ``base_ids`` is ``[1, T]``."""
    _, cache = _prefix_run(model, base_ids, start, [])
    prepared = _suffix_run(model, base_ids, start, cache, [], record=True)[2]
    assert prepared is not None
    return prepared


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
    """

    base_ids: torch.Tensor
    base: RunActivations
    source: RunActivations
    base_last: torch.Tensor
    source_last: torch.Tensor
    prepared: Staircase | None


def run_pair(model: HookedModel, base_ids: Sequence[int], source_ids: Sequence[int],
             sites: Sequence[Site]) -> PairRun:
    """Run base and source once each, the shared prefix only once.

    The prefix (tokens before the first position where the prompts differ) is run with a
    key/value cache; each prompt's suffix continues from it. The base suffix run also records
    the arguments of every decoder layer for the staircase.
    """
    base_t = torch.tensor([list(base_ids)], dtype=torch.long, device=model.device)
    src_t = torch.tensor([list(source_ids)], dtype=torch.long, device=model.device)
    T = base_t.shape[1]
    differ = (base_t[0] != src_t[0]).nonzero()
    start = min(int(differ[0]) if len(differ) else T - 1, T - 1)
    prefix_acts, cache = _prefix_run(model, base_t, start, sites)
    base_acts, base_last, prepared = _suffix_run(model, base_t, start, cache, sites, True)
    src_acts, src_last, _ = _suffix_run(model, src_t, start, cache, sites, False)
    assert prepared is not None
    return PairRun(base_t, _join(prefix_acts, base_acts), _join(prefix_acts, src_acts),
                   base_last, src_last, prepared)


def run_layer(model: HookedModel, staircase: Staircase, layer: int, hidden: torch.Tensor,
              hooks: Sequence[Hook] = (), stop_ok: bool = False, *, prefix_cache: Any = None,
              prefix_rows: torch.Tensor | None = None) -> torch.Tensor | None:
    """Decoder layer ``layer`` on ``hidden`` ``[rows, T - start, d_model]``: every row is a
    variant of the staircase's base prompt on the suffix positions (the prefix is shared).

    Args:
        hooks: installed for this call only.
        stop_ok: a hook may raise :class:`~causalpatch.hooks.StopForward` to end the call early
            (then ``None`` is returned).
        prefix_cache: rows whose *prefix activations* differ (same tokens, e.g. different noise
            on the embeddings): a cache of their positions ``< start`` from
            :func:`run_prefix`, used instead of the staircase's own one-row prefix.
        prefix_rows: with ``prefix_cache``, ``[rows]`` the cache row of each row of ``hidden``.
    """
    if prefix_cache is None:
        prefix_cache, prefix_rows = staircase.prefix_cache, None
    try:
        with torch.no_grad(), hooked(model.hf_model, hooks, model.dims):
            return model.runtime.run_layer(layer, staircase.calls[layer], hidden,
                                           prefix_cache, prefix_rows)
    except StopForward:
        if stop_ok:
            return None
        raise


def run_prefix(model: HookedModel, ids: torch.Tensor, start: int,
               hooks: Sequence[Hook] = ()) -> Any:
    """The key/value cache of positions ``< start`` of ``ids`` ``[rows, T]``, run with
    ``hooks`` (e.g. noise on the embeddings): the ``prefix_cache`` of :func:`run_layer` for rows
    whose prefixes differ. ``None`` when ``start == 0``."""
    if start == 0:
        return None
    with torch.no_grad(), hooked(model.hf_model, hooks, model.dims):
        return model.runtime.forward(ids[:, :start], keep_cache=True, last_only=True)[1]


def embed(model: HookedModel, ids: torch.Tensor) -> torch.Tensor:
    """The token embedding's output (the ``embed`` site) for ``ids``, without hooks:
    ``[..., pos] -> [..., pos, d_model]``."""
    with torch.no_grad():
        return model.runtime.embed(ids)


def unembed(model: HookedModel, hidden: torch.Tensor,
            columns: Sequence[int] | None = None) -> torch.Tensor:
    """Final norm, output projection and soft-cap: ``[batch, d_model] -> [batch, vocab]``.

    ``columns``: compute only these vocabulary entries (the others are 0) where the model
    allows it (see :meth:`~causalpatch.adapters.runtime.Runtime.unembed`).
    """
    return model.runtime.unembed(hidden, model.config, columns)


def rows_per_chunk(model: HookedModel, n_query: int, n_keys: int,
                   memory_mb: float) -> int:
    """How many patch rows fit a memory budget in one staircase pass (at least 1)."""
    d = model.dims
    itemsize = torch.finfo(model.dtype).bits // 8
    per_position = 10 * d.d_model + 4 * d.d_mlp + 3 * d.n_heads * d.d_head + 2 * d.n_heads * n_keys
    per_row = itemsize * (n_query * per_position + 2 * n_keys * d.n_kv_heads * d.d_head) + 4 * (
        d.vocab_size * 2)
    return max(1, int(memory_mb * 2**20 // per_row))


def fast_patched_logits(model: HookedModel, base_ids: torch.Tensor,
                        patches: Sequence[Patch], base: RunActivations, source: RunActivations,
                        base_last_logits: torch.Tensor, batch_size: int | None = None,
                        memory_mb: float = 1024.0,
                        progress: Callable[[int], None] | None = None,
                        prepared: Staircase | None = None,
                        stats: dict[str, int] | None = None) -> torch.Tensor:
    """Same output as :func:`naive_patched_logits`, computed with the staircase engine.

    Args:
        base_ids: ``[1, T]`` token ids of the run patched into.
        patches: one per output row; every site must be inside the decoder stack.
        base: the base run's activations at the patched sites (to find exact no-ops).
        source: the source run's activations at the patched sites.
        base_last_logits: ``[vocab]`` the base run's last-position logits (rows that are
            no-ops get exactly these).
        batch_size: rows per staircase pass; default from ``memory_mb``.
        prepared: the base run's staircase context from :func:`run_pair` (saves re-running
            the base prompt); its window must start at or before every changed entry.
        stats: if given, receives counts: ``rows`` computed, ``skipped`` no-op patches,
            ``window`` suffix positions, ``chunks`` staircase passes.

    Returns:
        ``[n_patches, vocab]`` float32 logits at the last position.
    """
    n_layers = model.n_layers
    T = base_ids.shape[1]
    out = base_last_logits.float().unsqueeze(0).repeat(len(patches), 1)

    live: list[tuple[int, Changed]] = []
    for i, patch in enumerate(patches):
        changed = _changed_entries(patch, base, source)
        if changed:
            live.append((i, changed))
        elif progress is not None:
            progress(1)
    if not live:
        if stats is not None:
            stats["skipped"] = stats.get("skipped", 0) + len(patches)
        return out
    start = min(p for _, changed in live for _, entries in changed for p, _, _ in entries)
    start = min(start, T - 1)
    if prepared is None or prepared.start > start:
        prepared = prepare_staircase(model, base_ids, start)
    q = T - prepared.start

    def row_stage(item: tuple[int, list]) -> int:
        return min(_stage(sp, n_layers) for sp, _ in item[1])

    live.sort(key=row_stage)
    chunk = batch_size or rows_per_chunk(model, q, T, memory_mb)
    if stats is not None:
        for key, value in (("rows", len(live)), ("skipped", len(patches) - len(live)),
                           ("window", q), ("chunks", -(-len(live) // chunk))):
            stats[key] = stats.get(key, 0) + value if key != "window" else value
    for lo in range(0, len(live), chunk):
        part = live[lo : lo + chunk]
        logits = _staircase(model, prepared, part, source, row_stage)
        out[[i for i, _ in part]] = logits.float()
        if progress is not None:
            progress(len(part))
    return out


def _staircase(model: HookedModel, prepared: Staircase,
               rows: list[tuple[int, Changed]], source: RunActivations,
               row_stage: Callable[[Any], int]) -> torch.Tensor:
    """Run one chunk of rows (sorted by entry stage) through the decoder stack."""
    n_layers = model.n_layers
    s = prepared.start
    stages = [row_stage(r) for r in rows]
    injections: dict[int, _Writes] = defaultdict(_Writes)
    site_writes: dict[int, dict[str, tuple[Site, _Writes]]] = defaultdict(dict)
    for r, (_, changed) in enumerate(rows):
        for sp, entries in changed:
            stage = _stage(sp, n_layers)
            for pos, unit, value in entries:
                if sp.site.kind in RESIDUAL_INJECTED:
                    injections[stage].add(r, pos - s, unit, value)
                else:
                    site_writes[stage].setdefault(sp.site.name, (sp.site, _Writes()))[1].add(
                        r, pos - s, unit, value)

    root = model.hf_model
    first = stages[0]
    hidden = prepared.final_input.new_empty((0, *prepared.final_input.shape[1:]))
    with torch.no_grad():
        for layer in range(first, n_layers + 1):
            n_before = hidden.shape[0]
            n_now = sum(1 for st in stages if st <= layer)
            base_in = prepared.calls[layer].hidden if layer < n_layers else prepared.final_input
            if n_now > n_before:
                hidden = torch.cat([hidden, base_in.expand(n_now - n_before, -1, -1)])
            if layer in injections:
                hidden = injections[layer].freeze().apply(hidden)
            if layer == n_layers:
                break
            hooks = [Hook(site, _writer(w.freeze())) for site, w in site_writes[layer].values()]
            with hooked(root, hooks, model.dims):
                hidden = model.runtime.run_layer(layer, prepared.calls[layer], hidden,
                                                 prepared.prefix_cache)
        return unembed(model, hidden[:, -1])


# -- dispatch ----------------------------------------------------------------------------------
def run_sites(model: HookedModel, ids: Sequence[int], sites: Sequence[Site]
              ) -> tuple[RunActivations, torch.Tensor]:
    """One plain forward pass: activations at ``sites`` ``[1, pos, ...]`` and last logits."""
    tr = model.trace([list(ids)], cache=[s.name for s in sites]).run()
    return RunActivations({s.name: tr.cache[s.name] for s in sites}), tr.last_logits[0].float()


def run_base_and_source(model: HookedModel, base_ids: Sequence[int], source_ids: Sequence[int],
                        sites: Sequence[Site], patches: Sequence[Patch],
                        engine: Engine = Engine.FAST) -> PairRun:
    """The base and source runs of a pair: :func:`run_pair` (shared prefix, staircase context)
    for the fast engine, or two plain forward passes for the naive reference."""
    if engine is Engine.FAST and fast_supported(patches):
        return run_pair(model, base_ids, source_ids, sites)
    base, base_last = run_sites(model, base_ids, sites)
    source, source_last = run_sites(model, source_ids, sites)
    ids = torch.tensor([list(base_ids)], dtype=torch.long, device=model.device)
    return PairRun(ids, base, source, base_last, source_last, None)


def patched_logits(model: HookedModel, run: PairRun, patches: Sequence[Patch],
                   engine: Engine = Engine.FAST, batch_size: int | None = None,
                   memory_mb: float = 1024.0, progress: Callable[[int], None] | None = None,
                   stats: dict[str, int] | None = None) -> torch.Tensor:
    """``[n_patches, vocab]`` last-position logits of every patch applied to ``run``'s base.

    Args:
        engine: ``FAST`` (the staircase) or ``NAIVE`` (one forward per patch); same numbers.
        batch_size: patch rows per staircase pass (default: from ``memory_mb``).
        stats: receives the fast engine's counts (rows, skipped, window, chunks).
    """
    if engine is Engine.NAIVE or not fast_supported(patches):
        return naive_patched_logits(model, run.base_ids, patches, run.source, progress)
    return fast_patched_logits(model, run.base_ids, patches, run.base, run.source,
                               run.base_last, batch_size, memory_mb, progress, run.prepared,
                               stats)


def last_logits(model: HookedModel, ids: torch.Tensor, hooks: Sequence[Hook] = ()
                ) -> torch.Tensor:
    """Last-position logits ``[batch, vocab]`` of an unpadded batch ``ids`` ``[batch, pos]``.

    Runs under the caller's grad mode (attribution patching differentiates through it).
    """
    with hooked(model.hf_model, hooks, model.dims):
        return model.runtime.forward(ids, last_only=True)[0][:, -1]

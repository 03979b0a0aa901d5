"""The sweep engine: the metric of many patched runs, exactly and with little work.

A *patch* (one row of a sweep) replaces some entries of some sites' activations in the *base*
run (the run patched into) with the *source* run's values. Two implementations:

:func:`naive_patched_logits`
    The reference: one full forward pass of the base prompt per patch, with hooks.

:func:`fast_patched_logits`
    The same numbers with far less work, using only facts about causal transformers:

    1. **Exact no-ops are skipped.** A patch whose source values equal the base values at every
       entry leaves the run unchanged; its logits are the base logits.
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

import copy
import inspect
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .hooks import Hook, hooked, recorded_calls
from .names import Site

if TYPE_CHECKING:
    from .model import InterpretableModel

#: Site kinds that are the decoder layer's input/output: patched by editing the hidden state
#: handed to a layer rather than by a hook.
RESIDUAL_INJECTED = ("resid_pre", "resid_post")


@dataclass(frozen=True)
class SitePatch:
    """Entries of one site to take from the source run.

    Attributes:
        site: where.
        positions: absolute token positions (non-negative).
        units: head (per-head sites) or neuron indices, or ``None`` for the whole vector.
    """

    site: Site
    positions: tuple[int, ...]
    units: tuple[int, ...] | None = None

    def entries(self) -> list[tuple[int, int | None]]:
        units: Sequence[int | None] = self.units if self.units is not None else (None,)
        return [(p, u) for p in self.positions for u in units]


Patch = tuple[SitePatch, ...]


@dataclass
class RunActivations:
    """Activations of one run at the sites a sweep patches: name -> ``[1, pos, ...]``."""

    acts: dict[str, torch.Tensor] = field(default_factory=dict)

    def value(self, site: Site, pos: int, unit: int | None) -> torch.Tensor:
        act = self.acts[site.name][0, pos]
        return act if unit is None else act[unit]


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
def naive_patched_logits(model: InterpretableModel, base_ids: torch.Tensor,
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
    from .tracing import make_batch

    batch = make_batch([base_ids[0].tolist()], model.pad_token_id, model.device)
    rows = []
    for patch in patches:
        hooks = []
        for sp in patch:
            writes = _Writes()
            for pos, unit in sp.entries():
                writes.add(0, pos, unit, source.value(sp.site, pos, unit))
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


def _changed_entries(patch: Patch, base: RunActivations, source: RunActivations
                     ) -> list[tuple[SitePatch, list[tuple[int, int | None]]]]:
    """The entries of ``patch`` whose source value differs from the base value."""
    out = []
    for sp in patch:
        src = source.acts[sp.site.name][0]
        bas = base.acts[sp.site.name][0]
        changed = [(p, u) for p, u in sp.entries()
                   if not torch.equal(src[p] if u is None else src[p, u],
                                      bas[p] if u is None else bas[p, u])]
        if changed:
            out.append((sp, changed))
    return out


@dataclass
class _Prepared:
    """Everything the staircase needs for one base prompt."""

    start: int  # first suffix position s
    layer_inputs: list[torch.Tensor]  # per layer: [1, q, d_model] base residual (suffix)
    final_input: torch.Tensor  # [1, q, d_model] input of the final norm (suffix)
    layer_args: list[tuple[Any, ...]]  # per layer: positional args after the hidden state
    layer_kwargs: list[dict[str, Any]]  # per layer: kwargs Hugging Face passed
    prefix_cache: Any  # Hugging Face Cache holding positions < s (or None)
    cache_key: str | None  # name of the cache kwarg ("cache" or "past_key_values")
    cache_arg: int | None  # index in layer_args where the cache is passed positionally


def _model_kwargs(model: InterpretableModel) -> set[str]:
    return set(inspect.signature(model.hf_model.forward).parameters)


def _cache_of(out: Any) -> Any:
    return getattr(out, "cache", None) or getattr(out, "past_key_values", None)


def _cachers(store: dict[str, torch.Tensor], sites: Sequence[Site]) -> list[Hook]:
    def saver(name: str) -> Callable[[torch.Tensor], None]:
        def save(act: torch.Tensor) -> None:
            store[name] = act.detach().clone()

        return save

    return [Hook(site, saver(site.name)) for site in sites]


def _suffix_run(model: InterpretableModel, ids: torch.Tensor, start: int, prefix_cache: Any,
                sites: Sequence[Site], record: bool
                ) -> tuple[dict[str, torch.Tensor], torch.Tensor, _Prepared | None]:
    """Run positions ``start..T-1`` of ``ids`` on top of ``prefix_cache``.

    Returns the activations of ``sites`` on those positions, the last-position logits
    ``[vocab]`` and, with ``record``, the staircase context (each layer's call arguments).
    """
    hf = model.hf_model
    adapter = model.adapter
    n_layers = model.n_layers
    params = _model_kwargs(model)
    cache_key: str | None = "cache" if "cache" in params else "past_key_values"
    kwargs: dict[str, Any] = {"input_ids": ids[:, start:], "use_cache": start > 0}
    if start > 0:
        kwargs[cache_key] = copy.deepcopy(prefix_cache)
    if "logits_to_keep" in params:
        kwargs["logits_to_keep"] = 1
    paths = ([f"{adapter.layers}.{i}" for i in range(n_layers)] + [adapter.final_norm]
             if record else [])
    acts: dict[str, torch.Tensor] = {}
    with torch.no_grad(), hooked(hf, _cachers(acts, sites), model.dims), \
            recorded_calls(hf, paths) as calls:
        last = hf(**kwargs).logits[0, -1].float()
    if not record:
        return acts, last, None
    from transformers.cache_utils import Cache

    layer_inputs, layer_args, layer_kwargs = [], [], []
    cache_arg = None
    for i in range(n_layers):
        args, kw = calls[paths[i]]
        hidden = args[0] if args else kw.pop("hidden_states")
        for key, value in list(kw.items()):  # the cache kwarg's name varies by model
            if isinstance(value, Cache) or (key in ("cache", "past_key_values", "layer_past")
                                            and value is None):
                kw[key] = None
                cache_key = key
        rest = list(args[1:])
        for j, arg in enumerate(rest):  # GPT-2 passes its cache positionally
            if isinstance(arg, Cache):
                rest[j], cache_arg = None, j
        layer_inputs.append(hidden.detach())
        layer_args.append(tuple(rest))
        layer_kwargs.append(kw)
    final_args, final_kw = calls[adapter.final_norm]
    final_input = (final_args[0] if final_args else next(iter(final_kw.values()))).detach()
    prepared = _Prepared(start, layer_inputs, final_input, layer_args, layer_kwargs,
                         prefix_cache, cache_key, cache_arg)
    return acts, last, prepared


def _prefix_run(model: InterpretableModel, ids: torch.Tensor, start: int,
                sites: Sequence[Site]) -> tuple[dict[str, torch.Tensor], Any]:
    """Run positions ``0..start-1`` with a cache; activations of ``sites`` and the cache."""
    if start == 0:
        return {}, None
    acts: dict[str, torch.Tensor] = {}
    with torch.no_grad(), hooked(model.hf_model, _cachers(acts, sites), model.dims):
        out = model.hf_model(input_ids=ids[:, :start], use_cache=True)
    return acts, _cache_of(out)


def _prepare(model: InterpretableModel, base_ids: torch.Tensor, start: int) -> _Prepared:
    """Prefill the base prompt's prefix and record each layer's call on the suffix."""
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
    prepared: _Prepared | None


def run_pair(model: InterpretableModel, base_ids: Sequence[int], source_ids: Sequence[int],
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


def _layer_cache(prepared: _Prepared, layer: int, batch: int) -> Any:
    """A cache object whose layer ``layer`` holds the base prefix repeated ``batch`` times."""
    template = prepared.prefix_cache
    if template is None:
        return None
    cache = copy.copy(template)
    cache.layers = list(template.layers)
    entry = copy.copy(template.layers[layer])
    if getattr(entry, "keys", None) is not None and entry.keys.numel() > 0:
        entry.keys = entry.keys.expand(batch, *entry.keys.shape[1:])
        entry.values = entry.values.expand(batch, *entry.values.shape[1:])
    cache.layers[layer] = entry
    return cache


def unembed(model: InterpretableModel, hidden: torch.Tensor) -> torch.Tensor:
    """Final norm, output projection and soft-cap: ``[batch, d_model] -> [batch, vocab]``."""
    root = model.hf_model
    logits = root.get_submodule(model.adapter.unembed)(
        root.get_submodule(model.adapter.final_norm)(hidden))
    cap_attr = model.adapter.logit_softcap_attr
    cap = getattr(model.config, cap_attr, None) if cap_attr else None
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def rows_per_chunk(model: InterpretableModel, n_query: int, n_keys: int,
                   memory_mb: float) -> int:
    """How many patch rows fit a memory budget in one staircase pass (at least 1)."""
    d = model.dims
    itemsize = torch.finfo(model.dtype).bits // 8
    per_position = 10 * d.d_model + 4 * d.d_mlp + 3 * d.n_heads * d.d_head + 2 * d.n_heads * n_keys
    per_row = itemsize * (n_query * per_position + 2 * n_keys * d.n_kv_heads * d.d_head) + 4 * (
        d.vocab_size * 2)
    return max(1, int(memory_mb * 2**20 // per_row))


def fast_patched_logits(model: InterpretableModel, base_ids: torch.Tensor,
                        patches: Sequence[Patch], base: RunActivations, source: RunActivations,
                        base_last_logits: torch.Tensor, batch_size: int | None = None,
                        memory_mb: float = 1024.0,
                        progress: Callable[[int], None] | None = None,
                        prepared: _Prepared | None = None,
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

    live: list[tuple[int, list[tuple[SitePatch, list[tuple[int, int | None]]]]]] = []
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
    start = min(p for _, changed in live for _, entries in changed for p, _ in entries)
    start = min(start, T - 1)
    if prepared is None or prepared.start > start:
        prepared = _prepare(model, base_ids, start)
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


def _staircase(model: InterpretableModel, prepared: _Prepared,
               rows: list[tuple[int, list[tuple[SitePatch, list[tuple[int, int | None]]]]]],
               source: RunActivations, row_stage: Callable[[Any], int]) -> torch.Tensor:
    """Run one chunk of rows (sorted by entry stage) through the decoder stack."""
    n_layers = model.n_layers
    s = prepared.start
    stages = [row_stage(r) for r in rows]
    injections: dict[int, _Writes] = defaultdict(_Writes)
    site_writes: dict[int, dict[str, tuple[Site, _Writes]]] = defaultdict(dict)
    for r, (_, changed) in enumerate(rows):
        for sp, entries in changed:
            stage = _stage(sp, n_layers)
            for pos, unit in entries:
                value = source.value(sp.site, pos, unit)
                if sp.site.kind in RESIDUAL_INJECTED:
                    injections[stage].add(r, pos - s, unit, value)
                else:
                    site_writes[stage].setdefault(sp.site.name, (sp.site, _Writes()))[1].add(
                        r, pos - s, unit, value)

    root = model.hf_model
    layer_root = root.get_submodule(model.adapter.layers)
    first = stages[0]
    hidden = prepared.layer_inputs[0][:, :0].new_empty((0, *prepared.final_input.shape[1:]))
    with torch.no_grad():
        for layer in range(first, n_layers + 1):
            n_before = hidden.shape[0]
            n_now = sum(1 for st in stages if st <= layer)
            base_in = prepared.layer_inputs[layer] if layer < n_layers else prepared.final_input
            if n_now > n_before:
                hidden = torch.cat([hidden, base_in.expand(n_now - n_before, -1, -1)])
            if layer in injections:
                hidden = injections[layer].freeze().apply(hidden)
            if layer == n_layers:
                break
            hooks = [Hook(site, _writer(w.freeze())) for site, w in site_writes[layer].values()]
            args = list(prepared.layer_args[layer])
            kwargs = dict(prepared.layer_kwargs[layer])
            cache = _layer_cache(prepared, layer, hidden.shape[0])
            if cache is not None:
                if prepared.cache_arg is not None:
                    args[prepared.cache_arg] = cache
                else:
                    kwargs[prepared.cache_key] = cache
            with hooked(root, hooks, model.dims):
                result = layer_root[layer](hidden, *args, **kwargs)
            hidden = result[0] if isinstance(result, tuple) else result
        return unembed(model, hidden[:, -1])

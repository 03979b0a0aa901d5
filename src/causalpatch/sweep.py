"""The sweep driver behind :func:`causalpatch.activation_patching`.

Validates every argument before any compute, runs each clean/corrupted pair through the engine
(in chunks, checkpointed when asked), and assembles a :class:`PatchingResult`.

Aggregation over pairs: the effect is normalised on the *means*,
``(mean patched - mean base) / (mean source - mean base)``, which stays defined when one pair's
own gap is tiny. ``per_pair[i] = (patched_i - base_i) / (mean source - mean base)``; their mean
is exactly the effect matrix, and ``std`` is their standard deviation.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from .checkpoint import SweepCheckpoint, fingerprint
from .engine import collect_sites
from .metrics import get_metric, normalize as normalize_fn
from .patching import (Direction, _check_method, _direction, _inputs, build_patches,
                       make_pairs, patched_logits, plan_component, resolve_answers,
                       resolve_positions, run_pair_or_sites)

if TYPE_CHECKING:
    from .model import InterpretableModel
    from .result import PatchingResult


def _progress_callback(progress: bool | Callable[[int, int], None], total: int
                       ) -> tuple[Callable[[int], None] | None, Callable[[], None]]:
    if progress is False or progress is None:
        return None, lambda: None
    if callable(progress):
        done = [0]

        def tick(n: int) -> None:
            done[0] += n
            progress(done[0], total)

        return tick, lambda: None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="patching", unit="patch", leave=False)
    return bar.update, bar.close


def run_sweep(model: InterpretableModel, clean: Any, corrupted: Any, *, component: str,
              metric: Any, metric_kwargs: Mapping[str, Any] | None, correct: Any, incorrect: Any,
              layers: Any, heads: Any, neurons: Any, positions: Any, by_position: bool,
              direction: Any, method: str, batch_size: int | None, memory_mb: float,
              normalize: bool, checkpoint: str | None,
              progress: bool | Callable[[int, int], None]) -> PatchingResult:
    from .result import PatchingResult

    t0 = time.perf_counter()
    # -- validate everything first ----------------------------------------------------------
    direction_ = _direction(direction)
    _check_method(method, batch_size)
    if metric is None:
        metric = getattr(clean, "metric", None) if corrupted is None else None
        metric = metric or "logit_diff"
    m = get_metric(metric)
    correct, incorrect = resolve_answers(model, metric_kwargs, correct, incorrect)
    pairs = make_pairs(model, clean, corrupted, correct, incorrect)
    plan = plan_component(model, component, layers, heads, neurons)
    lengths = {len(p.clean) for p in pairs}
    if by_position and len(lengths) > 1:
        from .errors import InvalidArgumentError

        raise InvalidArgumentError(
            f"by_position=True needs all pairs to have the same token length, got lengths "
            f"{sorted(lengths)}; group pairs by length or use by_position=False")
    pos_lists = [resolve_positions(positions, by_position, len(p.clean)) for p in pairs]
    for pair in pairs:
        _inputs(m, pair.correct, pair.incorrect, torch.zeros(1))  # answers present?
    cells = [build_patches(model, plan, pl, by_position, len(p.clean))
             for p, pl in zip(pairs, pos_lists)]
    shape = cells[0][1]
    n_cells = len(cells[0][0])
    ckpt = None
    if checkpoint is not None:
        key = fingerprint(model, pairs, dict(
            component=component, metric=m.name, layers=plan.layers, units=plan.units,
            positions=pos_lists, by_position=by_position, direction=direction_.value,
            method=method))
        ckpt = SweepCheckpoint.open(checkpoint, key, len(pairs), n_cells)
    tick, close = _progress_callback(progress, len(pairs) * n_cells)

    # -- run ----------------------------------------------------------------------------------
    raw = torch.empty(len(pairs), n_cells)
    base_values = torch.empty(len(pairs))
    source_values = torch.empty(len(pairs))
    t_setup = time.perf_counter() - t0
    stats: dict[str, int] = {}
    try:
        for i, (pair, (patches, _)) in enumerate(zip(pairs, cells)):
            if direction_ is Direction.DENOISE:
                base_ids, src_ids = pair.corrupted, pair.clean
            else:
                base_ids, src_ids = pair.clean, pair.corrupted
            sites = collect_sites(patches)
            run = run_pair_or_sites(model, base_ids, src_ids, sites, patches, method)
            base, source, base_last, source_last = (run.base, run.source, run.base_last,
                                                    run.source_last)
            inputs = _inputs(m, pair.correct, pair.incorrect, source_last)
            ends = m(torch.stack([base_last, source_last]), inputs.expand(2))
            base_values[i], source_values[i] = ends[0], ends[1]
            todo = list(range(n_cells))
            if ckpt is not None:
                done = ckpt.done(i)
                for j, v in done.items():
                    raw[i, j] = v
                todo = [j for j in todo if j not in done]
                if tick is not None and len(done):
                    tick(len(done))
            step = len(todo) if ckpt is None else max(1, min(len(todo), batch_size or 64))
            for lo in range(0, len(todo), max(step, 1)):
                idx = todo[lo : lo + step]
                logits = patched_logits(model, base_ids, [patches[j] for j in idx], base, source,
                                        base_last, method, batch_size, memory_mb, tick,
                                        run.prepared, stats)
                values = m(logits, inputs.expand(len(idx)))
                raw[i, idx] = values
                if ckpt is not None:
                    ckpt.record(i, idx, values.tolist())
    finally:
        close()
    t_run = time.perf_counter() - t0 - t_setup

    # -- aggregate ----------------------------------------------------------------------------
    mean_base, mean_source = base_values.mean(), source_values.mean()
    if normalize:
        effect = normalize_fn(raw.mean(0), mean_base, mean_source, m.name)
        per_pair = (raw - base_values[:, None]) / (mean_source - mean_base)
    else:
        effect, per_pair = raw.mean(0), raw
    std = per_pair.std(0, unbiased=False) if len(pairs) > 1 else None
    clean_v, corrupted_v = ((source_values, base_values) if direction_ is Direction.DENOISE
                            else (base_values, source_values))
    axes: tuple[str, ...] = ("layer",) if plan.single_site is None else ()
    labels: dict[str, list[Any]] = {}
    if plan.single_site is None:
        labels["layer"] = list(plan.layers)
    if by_position:
        toks = model.to_str_tokens(pairs[0].clean)
        axes += ("position",)
        labels["position"] = [f"{p}: {toks[p]!r}" for p in pos_lists[0]]  # type: ignore[union-attr]
    if plan.unit_axis is not None:
        axes += (plan.unit_axis,)
        labels[plan.unit_axis] = list(plan.units or [])
    if plan.single_site is not None:  # one named site: no layer axis
        shape = shape[1:]
    if not axes:  # one named site, all positions jointly: a 1-element result
        axes, labels = ("site",), {"site": [plan.single_site]}
        shape = (1,)
    decode = model.tokenizer.decode
    return PatchingResult(
        effect_matrix=effect.reshape(shape).float(),
        axes=axes,
        labels=labels,
        component=component,
        metric=m.name,
        direction=direction_.value,
        method="activation_patching",
        model_name=model.name,
        clean_prompts=[decode(p.clean) for p in pairs],
        corrupted_prompts=[decode(p.corrupted) for p in pairs],
        clean_tokens=[model.to_str_tokens(p.clean) for p in pairs[:1]],
        clean_metric=float(clean_v.mean()),
        corrupted_metric=float(corrupted_v.mean()),
        normalized=normalize,
        per_pair=per_pair.reshape(len(pairs), *shape).float() if len(pairs) > 1 else None,
        std=None if std is None else std.reshape(shape).float(),
        timings={"setup_s": t_setup, "run_s": t_run, "total_s": time.perf_counter() - t0},
        extra={"engine": method, "n_pairs": len(pairs), **stats, "positions": pos_lists[0],
               "answers": [[p.correct, p.incorrect] for p in pairs[:1]]},
    )

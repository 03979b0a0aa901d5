"""The one method loop: run every group of pairs, aggregate, build the result.

Every method (activation patching, attribution patching, ablation, multi-site patches ...) is
a plan plus a :class:`Evaluator` — a function that, for a group of pairs, returns the raw metric
of the base run, of the source run and of every requested cell. :func:`run_pairs` drives it
(checkpointing finished cells, reporting progress), :func:`aggregate` applies the one
aggregation rule, and :func:`build_result` makes the :class:`PatchingResult`.

The aggregation rule, for every method::

    effect   = (mean_i patched_i - mean_i base_i) / (mean_i source_i - mean_i base_i)
    per_pair = (patched_i - base_i) / (mean_i source_i - mean_i base_i)

so the mean of ``per_pair`` is exactly ``effect`` and the effect stays defined when one pair's
own gap is tiny. ``Scale.RAW`` keeps the raw mean; ``Scale.CHANGE`` (ablations) the mean change
``patched - base`` in the metric's own unit.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol

import torch

from .checkpoint import SweepCheckpoint, fingerprint
from .engine import collect_sites, patched_logits, run_base_and_source
from .enums import Direction, Engine
from .metrics import Metric, normalize as normalize_metric
from .plan import metric_inputs
from .result import PatchingResult

if TYPE_CHECKING:
    from .model import HookedModel
    from .plan import Pair, Patch


class Scale(str, Enum):
    """How raw metric values become the effect matrix."""

    NORMALIZED = "normalized"
    """``(mean patched - mean base) / (mean source - mean base)``."""
    RAW = "raw"
    """The mean patched metric value."""
    CHANGE = "change"
    """The mean of ``patched - base`` (ablations: the metric's own unit)."""


@dataclass
class GroupValues:
    """Raw metric values of a group of ``g`` pairs.

    Attributes:
        base: ``[g]`` the base (unpatched) run.
        source: ``[g]`` the source run, or ``None`` (ablations have none).
        cells: ``[g, n]`` the patched runs of the requested cells.
    """

    base: torch.Tensor
    source: torch.Tensor | None
    cells: torch.Tensor


class Evaluator(Protocol):
    """Computes a group's values; ``cells`` are indices into the method's flat cell list."""

    def __call__(self, group: list[int], cells: list[int],
                 tick: Callable[[int], None] | None) -> GroupValues: ...


@dataclass
class PairValues:
    """Raw metric values over all pairs: ``raw [n_pairs, n_cells]``, ``base``/``source``
    ``[n_pairs]`` (``source`` is ``None`` for ablations)."""

    raw: torch.Tensor
    base: torch.Tensor
    source: torch.Tensor | None
    stats: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def progress_callback(progress: bool | Callable[[int, int], None] | None, total: int,
                      label: str = "patching"
                      ) -> tuple[Callable[[int], None] | None, Callable[[], None]]:
    """``(tick, close)``: ``tick(n)`` advances a tqdm bar (``progress=True``) or calls
    ``progress(done, total)``."""
    if progress is False or progress is None:
        return None, lambda: None
    if callable(progress):
        done = [0]

        def tick(n: int) -> None:
            done[0] += n
            progress(done[0], total)

        return tick, lambda: None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=label, unit="cell", leave=False)
    return bar.update, bar.close


def run_pairs(model: HookedModel, pairs: Sequence[Pair], n_cells: int, evaluate: Evaluator, *,
              groups: Sequence[list[int]] | None = None, checkpoint: str | None = None,
              checkpoint_args: dict[str, Any] | None = None, chunk: int | None = None,
              progress: bool | Callable[[int, int], None] | None = False,
              label: str = "patching") -> PairValues:
    """Evaluate every cell of every pair, group by group.

    Args:
        groups: pair indices evaluated together (default: one pair per group).
        checkpoint: a file path; finished cells are saved after every chunk and a rerun with
            the same arguments (``checkpoint_args`` + the model and pairs) resumes.
        chunk: cells per evaluation call when checkpointing (default: all at once).
    """
    t0 = time.perf_counter()
    n = len(pairs)
    groups = [list(g) for g in groups] if groups is not None else [[i] for i in range(n)]
    ckpt = None
    if checkpoint is not None:
        key = fingerprint(model, list(pairs), checkpoint_args or {})
        ckpt = SweepCheckpoint.open(checkpoint, key, n, n_cells)
    tick, close = progress_callback(progress, n * n_cells, label)
    raw = torch.empty(n, n_cells)
    base = torch.empty(n)
    source: torch.Tensor | None = torch.empty(n)
    try:
        for group in groups:
            todo = list(range(n_cells))
            if ckpt is not None:
                done = [ckpt.done(i) for i in group]
                finished = set.intersection(*(set(d) for d in done))
                for i, d in zip(group, done):
                    for j, v in d.items():
                        raw[i, j] = v
                todo = [j for j in todo if j not in finished]
                if tick is not None and finished:
                    tick(len(finished) * len(group))
            step = max(1, min(len(todo), chunk or 64)) if ckpt is not None else max(1, len(todo))
            for lo in range(0, max(len(todo), 1), step):
                cells = todo[lo : lo + step]
                values = evaluate(group, cells, tick)
                base[group] = values.base.float().cpu()
                if values.source is None:
                    source = None
                elif source is not None:
                    source[group] = values.source.float().cpu()
                if cells:
                    raw[torch.tensor(group)[:, None], torch.tensor(cells)[None, :]] = (
                        values.cells.float().cpu())
                    if ckpt is not None:
                        for r, i in enumerate(group):
                            ckpt.record(i, cells, values.cells[r].tolist())
    finally:
        close()
    return PairValues(raw, base, source, seconds=time.perf_counter() - t0)


@dataclass
class Aggregate:
    """The effect of every cell and its spread over pairs (flat, ``[n_cells]``)."""

    effect: torch.Tensor
    per_pair: torch.Tensor  # [n_pairs, n_cells]
    std: torch.Tensor | None


def aggregate(values: PairValues, scale: Scale, metric: Metric) -> Aggregate:
    """The one aggregation rule (module docstring)."""
    raw, base = values.raw, values.base
    if scale is Scale.NORMALIZED:
        if values.source is None:
            raise ValueError("normalised effects need source values")
        mean_base, mean_source = base.mean(), values.source.mean()
        effect = normalize_metric(raw.mean(0), mean_base, mean_source, metric.name)
        per_pair = (raw - base[:, None]) / (mean_source - mean_base)
    elif scale is Scale.CHANGE:
        per_pair = raw - base[:, None]
        effect = per_pair.mean(0)
    else:
        effect, per_pair = raw.mean(0), raw
    std = per_pair.std(0, unbiased=False) if raw.shape[0] > 1 else None
    return Aggregate(effect, per_pair, std)


def build_result(model: HookedModel, *, values: PairValues, scale: Scale, metric: Metric,
                 axes: tuple[str, ...], labels: dict[str, list[Any]], shape: tuple[int, ...],
                 component: str, method: str, direction: Direction | str,
                 clean: Sequence[Sequence[int]], corrupted: Sequence[Sequence[int]],
                 answers: Sequence[Sequence[int | None]] = (), timings: dict[str, float] | None = None,
                 extra: dict[str, Any] | None = None, t_start: float | None = None
                 ) -> PatchingResult:
    """Aggregate ``values`` and wrap everything in a :class:`PatchingResult`.

    ``clean``/``corrupted`` are the token ids of every pair (``corrupted`` empty for ablations);
    the base run is the corrupted one when denoising, the clean one otherwise.
    """
    agg = aggregate(values, scale, metric)
    n = values.raw.shape[0]
    if isinstance(direction, Direction):
        denoise = direction is Direction.DENOISE
        direction_text = direction.value
    else:
        denoise, direction_text = False, direction
    if values.source is None:
        clean_v, corrupted_v = values.base, None
    else:
        clean_v, corrupted_v = ((values.source, values.base) if denoise
                                else (values.base, values.source))
    decode = model.tokenizer.decode
    times = dict(timings or {})
    times.setdefault("run_s", values.seconds)
    if t_start is not None:
        times["total_s"] = time.perf_counter() - t_start
    return PatchingResult(
        effect_matrix=agg.effect.reshape(shape).float(),
        axes=axes,
        labels=labels,
        component=component,
        metric=metric.name,
        direction=direction_text,
        method=method,
        model_name=model.name,
        clean_prompts=[decode(list(p)) for p in clean],
        corrupted_prompts=[decode(list(p)) for p in corrupted],
        clean_tokens=[model.to_str_tokens(list(p)) for p in clean[:1]],
        clean_metric=float(clean_v.mean()),
        corrupted_metric=None if corrupted_v is None else float(corrupted_v.mean()),
        normalized=scale is Scale.NORMALIZED,
        per_pair=agg.per_pair.reshape(n, *shape).float() if n > 1 else None,
        std=None if agg.std is None else agg.std.reshape(shape).float(),
        timings=times,
        extra={"n_pairs": n, **values.stats, "answers": [list(a) for a in answers[:1]],
               **(extra or {})},
    )


def pair_evaluator(model: HookedModel, pairs: Sequence[Pair], patches_of: Sequence[list[Patch]],
                   metric: Metric, direction: Direction, engine: Engine,
                   batch_size: int | None, memory_mb: float, stats: dict[str, Any]
                   ) -> Callable[[list[int], list[int], Callable[[int], None] | None],
                                 GroupValues]:
    """An :class:`~causalpatch.assemble.Evaluator` for one pair per group: the base and source
    runs share their prefix, then the engine computes the requested cells' patches."""
    runs: dict[int, Any] = {}

    def evaluate(group: list[int], cells: list[int],
                 tick: Callable[[int], None] | None) -> GroupValues:
        (i,) = group
        pair, patches = pairs[i], patches_of[i]
        base_ids, source_ids = pair.runs(direction is Direction.DENOISE)
        if i not in runs:
            runs.clear()  # keep only the pair being evaluated
            runs[i] = run_base_and_source(model, base_ids, source_ids, collect_sites(patches),
                                          patches, engine)
        run = runs[i]
        inputs = metric_inputs(metric, [pair.correct], [pair.incorrect],
                               run.source_last.unsqueeze(0))
        ends = metric(torch.stack([run.base_last, run.source_last]), inputs.expand(2))
        values = torch.empty(1, len(cells))
        if cells:
            logits = patched_logits(model, run, [patches[j] for j in cells], engine, batch_size,
                                    memory_mb, tick, stats)
            values[0] = metric(logits, inputs.expand(len(cells)))
        return GroupValues(ends[:1], ends[1:], values)

    return evaluate

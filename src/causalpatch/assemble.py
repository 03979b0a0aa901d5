"""The one method loop: run every group of pairs, aggregate, build the result.

Every method (activation patching, attribution patching, ablation, multi-site patches ...) is
a plan plus a :class:`Evaluator` — a function that, for a group of pairs, returns the raw metric
of the base run, of the source run and of every requested cell. :func:`run_pairs` drives it
(checkpointing finished cells, reporting progress), :func:`aggregate` applies the one
aggregation rule, and :func:`build_result` makes the :class:`PatchingResult`.

A method hands :func:`run_pairs` an :class:`EvaluatorFactory` (``build(model, stats)``, which
captures the plan but not the model) so that the same evaluator can be built next to another
copy of the model: with ``executor=`` (:mod:`causalpatch.executors`) the groups are evaluated
by Ray workers, and their raw values come back and are stored, checkpointed and aggregated by
exactly the code of the local loop.

The aggregation rule, for every method::

    effect   = (mean_i patched_i - mean_i base_i) / (mean_i source_i - mean_i base_i)
    per_pair = (patched_i - base_i) / (mean_i source_i - mean_i base_i)

so the mean of ``per_pair`` is exactly ``effect`` and the effect stays defined when one pair's
own gap is tiny. ``Scale.RAW`` keeps the raw mean; ``Scale.CHANGE`` (ablations) the mean change
``patched - base`` in the metric's own unit.
"""

from __future__ import annotations

import time
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol

import torch

from .checkpoint import SweepCheckpoint, fingerprint
from .engine import PairRun, base_and_source_runs, collect_sites, patched_logits_many
from .enums import Direction, Engine
from .metrics import Metric, normalize as normalize_metric
from .plan import metric_inputs
from .result import PatchingResult

if TYPE_CHECKING:
    from .model import HookedModel
    from .names import Site
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
    payload: Any = None
    """Anything else the method needs back from the group (picklable); kept in
    :attr:`PairValues.payloads` under the group's first pair."""


Evaluator = Callable[[list[int], list[int], Callable[[int], None] | None], GroupValues]
"""Computes a group's values: ``(group, cells, tick) -> GroupValues``; ``cells`` are indices
into the method's flat cell list, ``tick(n)`` reports progress (or is ``None``)."""

EvaluatorFactory = typing.Callable[["HookedModel", dict[str, Any]], Evaluator]
"""Builds a method's :data:`Evaluator` for a model (the driver's, or a worker's copy):
``build(model, stats)``. It must use the ``model`` it is given (never capture one) and may add
numeric counters to ``stats``; counters of several workers are summed."""


class Executor(Protocol):
    """Evaluates tasks ``(group, cells)`` elsewhere (see
    :class:`causalpatch.executors.RayExecutor`)."""

    def run(self, model: HookedModel, build: EvaluatorFactory,
            tasks: Sequence[tuple[list[int], list[int]]],
            on_result: Callable[[list[int], list[int], GroupValues], None],
            label: str = ...) -> dict[str, Any]: ...


@dataclass
class PairValues:
    """Raw metric values over all pairs: ``raw [n_pairs, n_cells]``, ``base``/``source``
    ``[n_pairs]`` (``source`` is ``None`` for ablations)."""

    raw: torch.Tensor
    base: torch.Tensor
    source: torch.Tensor | None
    stats: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    payloads: dict[int, Any] = field(default_factory=dict)


def merge_stats(into: dict[str, Any], more: dict[str, Any]) -> None:
    """Add a worker's evaluator counters: numbers are summed, except ``window`` (the fast
    engine's last window, which is replaced as in one local run); other values replace."""
    for key, value in more.items():
        old = into.get(key)
        if (key != "window" and isinstance(value, (int, float)) and isinstance(old, (int, float))
                and not isinstance(value, bool)):
            into[key] = old + value
        else:
            into[key] = value


#: With ``progress=None`` (auto), a bar appears only once the work has run this long (s).
PROGRESS_DELAY_S = 2.0


def _interactive() -> bool:
    """Whether a progress bar has somewhere to go: a terminal on stderr, or a notebook."""
    import sys

    if "ipykernel" in sys.modules:
        return True
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def progress_callback(progress: bool | Callable[[int, int], None] | None, total: int,
                      label: str = "patching"
                      ) -> tuple[Callable[[int], None] | None, Callable[[], None]]:
    """``(tick, close)``: ``tick(n)`` advances a tqdm bar (counts, rate and ETA) or calls
    ``progress(done, total)``.

    ``progress``: ``True`` (a bar at once), ``False`` (silent), a callback, or ``None`` (auto,
    the methods' default): a bar in a terminal or notebook that appears only once the work
    has taken :data:`PROGRESS_DELAY_S` seconds, so short sweeps print nothing.
    """
    if progress is False or (progress is None and not _interactive()):
        return None, lambda: None
    if callable(progress):
        done = [0]

        def tick(n: int) -> None:
            done[0] += n
            progress(done[0], total)

        return tick, lambda: None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=label, unit="cell", leave=False,
               delay=PROGRESS_DELAY_S if progress is None else 0.0)
    return bar.update, bar.close


def run_pairs(model: HookedModel, pairs: Sequence[Pair], n_cells: int,
              evaluate: Evaluator | None = None, *, build: EvaluatorFactory | None = None,
              groups: Sequence[list[int]] | None = None, checkpoint: str | None = None,
              checkpoint_args: dict[str, Any] | None = None, chunk: int | None = None,
              progress: bool | Callable[[int, int], None] | None = None,
              label: str = "patching", executor: Executor | None = None) -> PairValues:
    """Evaluate every cell of every pair, group by group.

    Args:
        evaluate: the method's evaluator for ``model`` (local runs only); or
        build: its :class:`EvaluatorFactory` (needed with ``executor``): the evaluator is
            built as ``build(model, stats)`` here, or next to each worker's model copy.
        groups: pair indices evaluated together (default: one pair per group).
        checkpoint: a file path; finished cells are saved after every chunk (every shard with
            an executor) and a rerun with the same arguments (``checkpoint_args`` + the model
            and pairs) resumes; a group recorded whole (cells, base and source metrics and its
            payload, which must then be JSON data) is not evaluated again.
        chunk: cells per evaluation call when checkpointing locally (default: all at once).
        executor: where to evaluate (see :mod:`causalpatch.executors`); ``None`` runs here.
            Either way the values are stored, checkpointed and aggregated by this function.

    Returns:
        :class:`PairValues`; ``stats`` holds the evaluators' counters and, with an executor,
        ``stats["executor"]``: per-worker shards, cells and throughput and Ray's overhead.
    """
    if (evaluate is None) == (build is None):
        raise TypeError("run_pairs takes exactly one of evaluate= and build=")
    if executor is not None and build is None:
        raise TypeError("run_pairs with an executor needs build= (an evaluator factory)")
    t0 = time.perf_counter()
    n = len(pairs)
    groups = [list(g) for g in groups] if groups is not None else [[i] for i in range(n)]
    ckpt = None
    if checkpoint is not None:
        key = fingerprint(model, list(pairs), checkpoint_args or {})
        ckpt = SweepCheckpoint.open(checkpoint, key, n, n_cells)
    stats: dict[str, Any] = {}
    raw = torch.empty(n, n_cells)
    base = torch.empty(n)
    source: torch.Tensor | None = torch.empty(n)
    payloads: dict[int, Any] = {}

    def fill(group: list[int], cells: list[int], values: GroupValues) -> None:
        """Put a group's values in place (here only; :func:`store` also checkpoints them)."""
        nonlocal source
        base[group] = values.base.float().cpu()
        if values.source is None:
            source = None
        elif source is not None:
            source[group] = values.source.float().cpu()
        if values.payload is not None:
            payloads[group[0]] = values.payload
        if cells:
            raw[torch.tensor(group)[:, None], torch.tensor(cells)[None, :]] = (
                values.cells.float().cpu())

    def store(group: list[int], cells: list[int], values: GroupValues) -> None:
        fill(group, cells, values)
        if ckpt is not None:  # the whole group in one write
            ckpt.record_group(group, cells, values.cells.tolist() if cells else [[]] * len(group),
                              values.base.float().cpu().tolist(),
                              None if values.source is None
                              else values.source.float().cpu().tolist(), values.payload)

    def restored(group: list[int]) -> bool:
        """Fill in a group the checkpoint holds whole (cells, base and source metrics, the
        payload): a rerun after a kill does not evaluate it again."""
        if ckpt is None or not ckpt.finished(group):
            return False
        ends = [ckpt.ends[i] for i in group]
        sources = [s for _, s in ends]
        fill(group, list(range(n_cells)), GroupValues(
            torch.tensor([b for b, _ in ends]),
            None if None in sources else torch.tensor(sources),
            torch.tensor([[ckpt.done(i)[j] for j in range(n_cells)] for i in group]),
            ckpt.payloads.get(group[0])))
        if tick is not None:
            tick(n_cells * len(group))
        return True

    def remaining(group: list[int]) -> list[int]:
        """Cells of ``group`` not in the checkpoint (finished ones are filled in)."""
        todo = list(range(n_cells))
        if ckpt is None:
            return todo
        done = [ckpt.done(i) for i in group]
        finished = set.intersection(*(set(d) for d in done))
        for i, d in zip(group, done):
            for j, v in d.items():
                raw[i, j] = v
        if tick is not None and finished:
            tick(len(finished) * len(group))
        return [j for j in todo if j not in finished]

    tick, close = progress_callback(progress, n * n_cells, label)
    summary: dict[str, Any] | None = None
    try:
        if executor is None:
            evaluate_ = evaluate if evaluate is not None else build(model, stats)  # type: ignore[misc]
            for group in groups:
                if restored(group):
                    continue
                todo = remaining(group)
                step = (max(1, min(len(todo), chunk or 64)) if ckpt is not None
                        else max(1, len(todo)))
                for lo in range(0, max(len(todo), 1), step):
                    cells = todo[lo : lo + step]
                    store(group, cells, evaluate_(group, cells, tick))
        else:
            tasks = [(group, remaining(group)) for group in groups if not restored(group)]

            def on_result(group: list[int], cells: list[int], values: GroupValues) -> None:
                store(group, cells, values)
                if tick is not None:
                    tick(len(group) * len(cells))

            summary = executor.run(model, build, tasks, on_result,  # type: ignore[arg-type]
                                   label=label)
            for shard_stats in summary.pop("stats", []):
                merge_stats(stats, shard_stats)
    finally:
        close()
    if summary is not None:
        text = summary.pop("text", "")
        if progress is True and text:
            import sys

            print(text, file=sys.stderr)
        stats["executor"] = summary
    return PairValues(raw, base, source, stats=stats, seconds=time.perf_counter() - t0,
                      payloads=payloads)


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
                 answers: Sequence[Sequence[int | None]] = (),
                 timings: dict[str, float] | None = None,
                 extra: dict[str, Any] | None = None, t_start: float | None = None,
                 data: Any = None, aggregated: Aggregate | None = None,
                 clean_prompts: Sequence[str] | None = None) -> PatchingResult:
    """Aggregate ``values`` and wrap everything in a :class:`PatchingResult`.

    ``clean``/``corrupted`` are the token ids of every pair (``corrupted`` empty for ablations);
    the base run is the corrupted one when denoising, the clean one otherwise. ``answers``
    (token ids per pair) are also stored as text (``extra["answer_text"]``); ``data``, the
    user's dataset object, contributes its per-pair position roles (a ``roles`` list, one
    role per clean token: ``extra["position_roles"]``). Token strings are kept for the first
    :data:`KEPT_PAIRS` pairs (the report's per-pair view).

    ``aggregated``: effects the method aggregated itself by the one rule over a subset of pairs
    per cell (causal tracing's ROME groups: each group over the prompts that have it); its
    ``per_pair`` is then not kept. ``clean_prompts``: the prompts as the user wrote them
    (default: the clean token ids decoded).
    """
    agg = aggregate(values, scale, metric) if aggregated is None else aggregated
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
    pair_metrics: dict[str, Any] = {}
    if n > 1 and aggregated is None:
        # each pair's unpatched metrics: what PatchingResult.ci needs to re-normalise resamples
        pair_metrics["base"] = [float(v) for v in values.base.tolist()]
        if values.source is not None:
            pair_metrics["source"] = [float(v) for v in values.source.tolist()]
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
        clean_prompts=(list(clean_prompts) if clean_prompts is not None
                       else [decode(list(p)) for p in clean]),
        corrupted_prompts=[decode(list(p)) for p in corrupted],
        clean_tokens=[model.to_str_tokens(list(p)) for p in clean[:KEPT_PAIRS]],
        clean_metric=float(clean_v.mean()),
        corrupted_metric=None if corrupted_v is None else float(corrupted_v.mean()),
        normalized=scale is Scale.NORMALIZED,
        per_pair=(agg.per_pair.reshape(n, *shape).float()
                  if n > 1 and aggregated is None else None),
        std=None if agg.std is None else agg.std.reshape(shape).float(),
        timings=times,
        extra={"n_pairs": n, "scale": scale.value, **values.stats,
               "answers": [list(a) for a in answers[:1]],
               **({"pair_metrics": pair_metrics} if pair_metrics else {}),
               **_texts(model, answers, data, n), **(extra or {})},
    )


#: Pairs whose token strings a result keeps (the report's per-pair view shows at most these).
KEPT_PAIRS = 64


def _texts(model: HookedModel, answers: Sequence[Sequence[int | None]], data: Any, n: int
           ) -> dict[str, Any]:
    """``answer_text`` (each pair's answers decoded) and, when ``data`` has one role list per
    pair, ``position_roles``."""
    out: dict[str, Any] = {}
    if answers:
        decode = model.tokenizer.decode
        out["answer_text"] = [[None if t is None else decode([int(t)]) for t in a]
                              for a in answers]
    roles = getattr(data, "roles", None) if data is not None else None
    if isinstance(roles, list) and len(roles) == n:
        out["position_roles"] = [None if r is None else [str(x) for x in r] for r in roles]
    return out


#: Most pairs whose staircase rows share batches (one evaluator group); each keeps its base
#: run's recorded layer calls and cache (``[T, d_model]`` per layer) while the group runs.
MAX_PAIRS_PER_GROUP = 64


def length_groups(pairs: Sequence[Pair], engine: Engine,
                  max_size: int = MAX_PAIRS_PER_GROUP) -> tuple[list[list[int]], dict[str, Any]]:
    """Pair indices grouped by token length (the fast engine batches rows of pairs of one
    length together), at most ``max_size`` per group, in order of first appearance; and a note
    for the result's metadata (``extra["pair_groups"]``) saying how the pairs were grouped.

    The naive engine runs every pair alone (one forward per patch either way).
    """
    if engine is Engine.NAIVE or len(pairs) == 1:
        groups = [[i] for i in range(len(pairs))]
        why = "naive engine: one pair at a time" if engine is Engine.NAIVE else "one pair"
        return groups, {"groups": len(groups), "largest": 1, "note": why}
    by_length: dict[int, list[int]] = {}
    for i, pair in enumerate(pairs):
        by_length.setdefault(len(pair.clean), []).append(i)
    groups = [members[lo : lo + max_size] for members in by_length.values()
              for lo in range(0, len(members), max_size)]
    note: dict[str, Any] = {"groups": len(groups), "largest": max(len(g) for g in groups),
                            "lengths": sorted(by_length)}
    alone = sum(1 for members in by_length.values() if len(members) == 1)
    if alone:
        note["note"] = (f"{alone} of {len(pairs)} pairs have a token length no other pair has "
                        "and run alone (same results, less batching); templated prompts of one "
                        "length batch best")
    return groups, note


def answer_columns(metric: Metric, pairs: Sequence[Pair]) -> list[int] | None:
    """The vocabulary entries ``metric`` reads for these pairs (their answer tokens) when it
    reads nothing else (``Metric.answers_only``), else ``None`` (every logit)."""
    if not metric.answers_only:
        return None
    cols = {t for p in pairs for t in (p.correct, p.incorrect) if t is not None}
    return sorted(cols) or None


def cell_values(model: HookedModel, runs: Sequence[PairRun], jobs: Sequence[tuple[int, Patch]],
                metric: Metric, inputs: Any, engine: Engine, batch_size: int | None,
                memory_mb: float, tick: Callable[[int], None] | None, stats: dict[str, Any],
                columns: Sequence[int] | None) -> torch.Tensor:
    """The metric of every job of a group, ``[n_runs, n_cells]``.

    ``jobs`` are cell-major (cell ``j`` of run ``r`` is job ``j * n_runs + r``); ``inputs`` are
    the runs' :class:`~causalpatch.metrics.MetricInputs`, one row per run.
    """
    n_runs = len(runs)
    if not jobs:
        return torch.empty(n_runs, 0)
    n_cells = len(jobs) // n_runs
    logits = patched_logits_many(model, runs, jobs, engine, batch_size, memory_mb, tick, stats,
                                 columns)  # [n_jobs, vocab], or [n_jobs, n_columns]
    if columns is not None:
        inputs = inputs.on_columns(columns)
    row_of = torch.arange(n_runs).repeat(n_cells)
    return metric(logits, inputs.rows(row_of)).reshape(n_cells, n_runs).T


PatchMaker = Callable[[int, PairRun, list[int]], list["Patch"]]
"""Patches made once a pair's runs exist: ``(pair index, its runs, cells) -> one patch per
cell`` (e.g. SAE feature patches, whose values come from the runs' activations)."""


def pair_evaluator(model: HookedModel, pairs: Sequence[Pair],
                   patches_of: Sequence[list[Patch]] | PatchMaker, metric: Metric,
                   direction: Direction, engine: Engine, batch_size: int | None,
                   memory_mb: float, stats: dict[str, Any], sites: Sequence[Site] | None = None
                   ) -> Callable[[list[int], list[int], Callable[[int], None] | None],
                                 GroupValues]:
    """An :class:`~causalpatch.assemble.Evaluator` for groups of pairs (:func:`length_groups`):
    each pair's base and source runs share their prefix, then the engine computes the requested
    cells' patches of every pair of the group together (rows of several pairs of one token
    length share staircase batches; :func:`~causalpatch.engine.patched_logits_many`).

    ``patches_of``: every pair's patches, one per cell; or a :data:`PatchMaker` that makes
    them from the runs, with ``sites`` the sites the runs must record (patches inside the
    decoder stack).
    """
    runs: dict[int, PairRun] = {}
    maker = patches_of if callable(patches_of) else None

    def evaluate(group: list[int], cells: list[int],
                 tick: Callable[[int], None] | None) -> GroupValues:
        if set(runs) != set(group):
            runs.clear()  # keep only the group being evaluated
            if maker is None:
                patches = [p for i in group for p in patches_of[i]]  # type: ignore[index]
                where = collect_sites(patches)
            else:
                patches, where = [], list(sites or ())
            runs.update(zip(group, base_and_source_runs(
                model, [pairs[i].runs(direction is Direction.DENOISE) for i in group],
                where, patches, engine)))
        members = [runs[i] for i in group]
        source_last = torch.stack([run.source_last for run in members])  # [n, vocab]
        base_last = torch.stack([run.base_last for run in members])
        inputs = metric_inputs(metric, [pairs[i].correct for i in group],
                               [pairs[i].incorrect for i in group], source_last)
        if maker is None:
            made = {i: [patches_of[i][j] for j in cells] for i in group}  # type: ignore[index]
        else:
            made = {i: maker(i, runs[i], cells) for i in group}
        jobs = [(r, made[i][k]) for k in range(len(cells)) for r, i in enumerate(group)]
        values = cell_values(model, members, jobs, metric, inputs, engine, batch_size,
                             memory_mb, tick, stats,
                             answer_columns(metric, [pairs[i] for i in group]))
        return GroupValues(metric(base_last, inputs), metric(source_last, inputs), values)

    return evaluate

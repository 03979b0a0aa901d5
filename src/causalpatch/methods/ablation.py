"""Ablations: knock out one component at a time and measure how the metric changes.

For every cell of a sweep (a layer's ``attn``/``mlp``/residual output, a head, a neuron) the
cell's activation is replaced, at the chosen positions of every prompt, by

* ``"zero"``: zeros;
* ``"mean"``: the mean activation over a *reference* set (default: the prompts themselves),
  averaged over rows and over every real (non-padding) token position, one vector per site
  (``[d_model]``, ``[n_heads, d_head]`` of which the cell's head is used, or ``[d_mlp]``);
* ``"resample"``: the same site's activation, at the same positions, in another row of the
  reference set. With the prompts as reference, row ``i`` takes row ``sigma(i)`` where
  ``sigma`` walks a seeded random ordering of the rows one step forward (a cyclic permutation:
  no row ever takes itself). With a separate reference set of ``m`` rows, row ``i`` takes
  reference row ``order[i mod m]`` for a seeded random ``order``.

Only the ablated cell changes; everything downstream is recomputed by the model.

**The effect** of a cell is the raw change of the metric, averaged over prompts::

    effect[cell] = mean over prompts i of (metric_i(ablated) - metric_i(original))

so ``result.normalized`` is ``False`` and the unit is the metric's own (e.g. logits for
``logit_diff``). A negative effect on ``logit_diff`` means the component supported the correct
answer. ``result.extra["fraction_kept"]`` holds ``mean ablated metric / mean original metric``
per cell (score metrics only: 1.0 = nothing lost, 0.0 = the behaviour is gone). Distance
metrics (``l2``, ``kl``, ...) are measured from each prompt's *original* (unablated) logits, so
their original value is 0 and the effect is the distance the ablation moves the output.

Prompts may have different token lengths (they are right-padded; positions index each row's own
tokens, negative positions count from each row's end), except for ``"resample"``, which needs
every prompt and reference row to have the same length so positions line up.

Computation: every (cell, prompt) is a row of the staircase engine (:mod:`causalpatch.engine`)
whose patch sets the cell's entries to the ablated values (``SitePatch.values``): the prompt's
own run is the base, each row enters the decoder stack at the cell's layer (earlier layers are
the original run's) and rows of prompts of one token length share batches. Rows whose values
equal the original activation are exact no-ops. ``engine="naive"`` runs one full forward per
row instead (the reference the fast path is tested against). Mean and resample statistics come
from one batched forward over the reference set.

**SAE features.** ``component="blocks.20.resid_post.sae.features"`` with ``saes=[sae]`` ablates
one feature of a sparse autoencoder per cell (``features=`` a subset): the feature is set to 0
(``"zero"``), to its mean activation over the reference set and its positions (``"mean"``) or
to its value in the resampled row (``"resample"``), and the activation becomes
``x + decode(f') - decode(f)`` (the error term of the same run is kept; see
:mod:`causalpatch.sae`). The result's axis is ``("feature",)``.

Example::

    from causalpatch import HookedModel
    from causalpatch.ablation import ablate
    model = HookedModel("smollm2")
    result = ablate(model, "When Mary and John went to the store, John gave a drink to",
                    component="attn_head", kind="zero", correct=" Mary", incorrect=" John")
    result.effect_matrix.shape    # (30, 9): change of the logit difference per head
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from ..assemble import (GroupValues, Scale, answer_columns, build_result, cell_values,
                        length_groups)
from ..datasets import as_patching_dataset
from ..engine import PairRun, base_and_source_runs, cachers, last_logits
from ..enums import AblationKind, Engine, parse
from ..errors import InvalidArgumentError, InvalidTypeError, OutOfRangeError
from ..hooks import Hook
from ..options import DEFAULT_MEMORY_MB, Progress, RunOptions
from ..metrics import Metric
from ..names import Site
from ..plan import (ComponentPlan, Pair, Patch, SitePatch, answer_tokens, check_answers,
                    choose_metric, engine_choice, index_list, metric_inputs,
                    plan_component, resolve_answers, result_axes)
from ..sae import BoundSAE, feature_edit_values, features_component
from ..tokens import make_batch, token_lists

if TYPE_CHECKING:
    from ..model import HookedModel
    from ..result import PatchingResult

#: Rows per pass of the forward over the reference set (mean/resample statistics).
REFERENCE_ROWS_PER_BATCH = 64


@dataclass(frozen=True)
class _Cell:
    """One result cell: a site and optionally one head/neuron of it."""

    site: Site
    unit: int | None


# -- inputs ---------------------------------------------------------------------------------------
def _rows_of(model: HookedModel, obj: Any, what: str) -> tuple[list[list[int]], Any, Any]:
    """Token rows of prompts or a dataset, and the dataset's answers (or None)."""
    for attr in ("clean", "prompts"):
        if not isinstance(obj, (str, list, tuple, torch.Tensor)) and hasattr(obj, attr):
            rows = token_lists(model, getattr(obj, attr), what)
            correct = list(getattr(obj, "correct", []) or []) or None
            incorrect = list(getattr(obj, "incorrect", []) or []) or None
            return rows, correct, incorrect
    return token_lists(model, obj, what), None, None


def _row_positions(positions: list[int] | None, lengths: Sequence[int]) -> list[list[int]]:
    """Absolute positions per row (``None``: all of the row's tokens)."""
    if positions is None:
        return [list(range(n)) for n in lengths]
    shortest = min(lengths)
    for p in positions:
        if not -shortest <= p < shortest:
            raise OutOfRangeError(
                f"positions contains {p}, out of range for the shortest prompt ({shortest} "
                f"tokens): positions must be in [{-shortest}, {shortest - 1}]")
    return [sorted({p % n for p in positions}) for n in lengths]


def _resample_sources(n_rows: int, n_ref: int, same_set: bool, seed: int) -> list[int]:
    """Reference row used by each row; a cyclic permutation (no fixed points) on the same set."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n_ref, generator=gen).tolist()
    if same_set:
        sources = [0] * n_rows
        for j, row in enumerate(order):
            sources[row] = order[(j + 1) % n_ref]
        return sources
    return [order[i % n_ref] for i in range(n_rows)]


# -- running ---------------------------------------------------------------------------------------
def _forward_last(model: HookedModel, rows: Sequence[Sequence[int]],
                  hooks: Sequence[Hook]) -> torch.Tensor:
    """Logits ``[batch, vocab]`` at each row's last real token (rows right-padded if needed)."""
    batch = make_batch([list(r) for r in rows], model.pad_token_id, model.device)
    with torch.no_grad():
        if not batch.padded:
            return last_logits(model, batch.input_ids, hooks).float()
        logits = model.forward(batch, hooks)
        return logits[torch.arange(len(rows), device=logits.device), batch.last_index].float()


def _cache_run(model: HookedModel, rows: list[list[int]], sites: Sequence[Site],
               rows_per_batch: int) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
    """Last logits ``[n, vocab]`` and, per site, each row's activation ``[len_i, *feature]``."""
    acts: dict[str, list[torch.Tensor]] = {s.name: [] for s in sites}
    last = []
    for lo in range(0, len(rows), rows_per_batch):
        chunk = rows[lo : lo + rows_per_batch]
        store: dict[str, torch.Tensor] = {}
        last.append(_forward_last(model, chunk, cachers(store, sites)))
        for s in sites:
            acts[s.name] += [store[s.name][i, : len(r)] for i, r in enumerate(chunk)]
    return torch.cat(last), acts


def _ablated_values(cell: _Cell, prompt: int, positions: list[int], act: torch.Tensor,
                    kind: str, means: Mapping[str, torch.Tensor],
                    resampled: Mapping[str, torch.Tensor], sae: BoundSAE | None
                    ) -> torch.Tensor:
    """What the cell's entries of one prompt are set to, ``[n_positions, *entry]`` in
    :meth:`SitePatch.entries` order (an entry is ``act[pos]`` or ``act[pos, unit]``).

    Args:
        act: ``[T, *feature]`` the prompt's original activation at the cell's site.
        means: per site, the reference mean ``[*feature]`` (SAE: ``[d_sae]``).
        resampled: per site, ``[n_prompts, T, *feature]`` the rows taken (SAE: their features
            ``[n_prompts, T, d_sae]``).
    """
    name, pos = cell.site.name, torch.tensor(positions, dtype=torch.long)
    if sae is not None:  # one SAE feature set to its ablated value, error term kept
        k = cell.unit
        assert k is not None
        new = (torch.zeros(len(positions)) if kind == "zero"
               else means[name][k].expand(len(positions)) if kind == "mean"
               else resampled[name][prompt][pos, k])
        return feature_edit_values(sae, act[pos], k, new)
    entry = act[pos] if cell.unit is None else act[pos, cell.unit]  # [n_positions, *entry]
    if kind == "zero":
        return torch.zeros_like(entry)
    if kind == "mean":
        mean = means[name] if cell.unit is None else means[name][cell.unit]
        return mean.to(entry.dtype).expand_as(entry).clone()
    rows = resampled[name][prompt][pos]
    return (rows if cell.unit is None else rows[:, cell.unit]).to(entry.dtype)


def ablate(
    model: HookedModel,
    prompts_or_dataset: Any,
    component: str = "attn_head",
    kind: str | AblationKind = "zero",
    metric: str | Metric | Callable[..., Any] | None = None,
    metric_kwargs: Mapping[str, Any] | None = None,
    *,
    correct: Any = None,
    incorrect: Any = None,
    layers: Sequence[int] | int | None = None,
    heads: Sequence[int] | int | None = None,
    neurons: Sequence[int] | int | None = None,
    positions: Sequence[int] | int | None = None,
    reference: Any = None,
    seed: int = 0,
    batch_size: int | None = None,
    executor: Any = None,
    threads: int | None = None,
    saes: Sequence[Any] | None = None,
    features: Sequence[int] | int | None = None,
    engine: str | Engine = "fast",
    memory_mb: float = DEFAULT_MEMORY_MB,
    checkpoint: str | None = None,
    progress: Progress = None,
) -> PatchingResult:
    """Ablate every cell of ``component`` in turn; the mean change of the metric per cell.

    Args:
        model: the model.
        prompts_or_dataset: a prompt, a list of prompts (strings or token ids; lengths may
            differ except for ``"resample"``), or a dataset with ``.clean`` (or ``.prompts``)
            and optional ``.correct``/``.incorrect`` answer lists.
        component: ``resid_pre | resid_mid | resid_post | attn | mlp | attn_head |
            attn_head_q | attn_head_k | attn_head_v | mlp_neuron``, another per-layer site
            kind, or one full site name.
        kind: ``"zero"``, ``"mean"`` or ``"resample"`` (an :class:`AblationKind`).
        metric: metric name or callable (default ``logit_diff``); distance metrics are measured
            from each prompt's original logits.
        metric_kwargs / correct / incorrect: answer tokens (one, or one per prompt).
        layers, heads, neurons: subsets of the cells (default all).
        positions: ablate only these positions of each prompt (negative: from each prompt's
            end), all of them jointly; default every position.
        reference: prompts (or a dataset) for ``"mean"``/``"resample"``; default the prompts.
        seed: seed of the resampling permutation.
        batch_size: staircase rows (cell x prompt) per pass (default: from ``memory_mb``).
        executor: ``None`` (here), ``"ray"`` or a :class:`~causalpatch.executors.RayExecutor`:
            the ablated runs (cells x prompts) are split into shards evaluated by Ray workers;
            the reference statistics are computed here.
        saes: the SAE whose features ``component`` (``"<site>.sae.features"``) names.
        features: with SAE features, the features to ablate (default all).
        engine: ``"fast"`` (the staircase: each row from the cell's layer, rows of prompts of
            one length batched) or ``"naive"`` (one forward per row); same numbers.
        memory_mb, checkpoint, progress, threads: the run options every method shares
            (:mod:`causalpatch.options`; ``executor`` and ``batch_size`` above are two of them).

    Returns:
        :class:`PatchingResult` (``method="ablation"``, ``normalized=False``) whose
        ``effect_matrix`` ``(n_layers,)``, ``(n_layers, n_heads)`` or ``(n_layers, n_neurons)``
        holds ``mean(ablated - original)``; ``per_pair`` ``[n_prompts, *shape]`` the
        per-prompt changes; ``extra["kind"]`` the ablation kind; ``extra["fraction_kept"]``
        ``ablated / original`` (score metrics).

    Raises:
        InvalidArgumentError: unknown ``kind``; ``"resample"`` with a reference set of fewer
            than 2 rows or prompts of different token lengths; ``reference`` with ``"zero"``.
    """
    t0 = time.perf_counter()
    # -- validate everything first ----------------------------------------------------------
    kind_ = parse(AblationKind, kind, "ablation kind")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise InvalidTypeError(f"seed must be an int, got {seed!r}")
    engine_ = engine_choice(engine, None)
    options = RunOptions.make(model, progress=progress, executor=executor, batch_size=batch_size,
                              memory_mb=memory_mb, checkpoint=checkpoint, threads=threads)
    if kind_ is AblationKind.ZERO and reference is not None:
        raise InvalidArgumentError(
            "reference is only used by kind='mean' and kind='resample', not by zero ablation")
    correct, incorrect = resolve_answers(metric_kwargs, correct, incorrect)
    prompts_or_dataset = as_patching_dataset(prompts_or_dataset, model)  # either style
    rows, data_correct, data_incorrect = _rows_of(model, prompts_or_dataset, "prompts")
    correct = correct if correct is not None else data_correct
    incorrect = incorrect if incorrect is not None else data_incorrect
    n = len(rows)
    corrects = answer_tokens(model, correct, n, "correct")
    incorrects = answer_tokens(model, incorrect, n, "incorrect")
    prompts = [Pair(r, [], c, k) for r, c, k in zip(rows, corrects, incorrects)]
    m = choose_metric(metric, prompts, prompts_or_dataset if hasattr(
        prompts_or_dataset, "corrupted") else None)
    check_answers(m, prompts)
    sae = features_component(model, component, saes)
    if sae is None:
        if features is not None:
            raise InvalidArgumentError(
                "features= is for SAE features: component='<site>.sae.features' with saes=[sae]")
        plan: ComponentPlan = plan_component(model, component, layers, heads, neurons)
    else:
        if layers is not None or heads is not None or neurons is not None:
            raise InvalidArgumentError("layers/heads/neurons do not apply to SAE features; use "
                                       "features=")
        feats = sae.check_features(index_list(features, "features") or range(sae.d_sae))
        plan = ComponentPlan(component, None, sae.site.name, "feature", [sae.site.layer or 0],
                             feats, (sae.site,))
    lengths = [len(r) for r in rows]
    row_pos = _row_positions(index_list(positions, "positions"), lengths)
    ref_rows = rows
    if reference is not None:
        ref_rows = _rows_of(model, reference, "reference")[0]
    if kind_ is AblationKind.RESAMPLE:
        if len(ref_rows) < 2:
            raise InvalidArgumentError(
                f"resample ablation needs a reference set of at least 2 rows, got "
                f"{len(ref_rows)}; pass more prompts or reference=[...]")
        all_lengths = sorted({len(r) for r in (*rows, *ref_rows)})
        if len(all_lengths) > 1:
            raise InvalidArgumentError(
                f"resample ablation needs every prompt and reference row to have the same token "
                f"length (positions must line up), got lengths {all_lengths}; group prompts by "
                "length or use kind='mean'")
    sites = list(plan.sites)
    units: list[int | None] = list(plan.units) if plan.units is not None else [None]
    cells = [_Cell(site, u) for site in sites for u in units]
    axes, labels, shape = result_axes(model, plan, None, False, rows[0])
    kind_name = kind_.value

    # -- the reference statistics -------------------------------------------------------------
    means: dict[str, torch.Tensor] = {}
    resampled: dict[str, torch.Tensor] = {}
    sources: list[int] | None = None
    if kind_ is not AblationKind.ZERO:
        ref_acts = _cache_run(model, ref_rows, sites, REFERENCE_ROWS_PER_BATCH)[1]
        if kind_ is AblationKind.MEAN:
            for s in sites:
                stacked = torch.cat([a.float() for a in ref_acts[s.name]])  # [sum len, *feat]
                means[s.name] = (stacked.mean(0) if sae is None
                                 else sae.encode(stacked).float().mean(0))
        else:
            sources = _resample_sources(n, len(ref_rows), reference is None, seed)
            for s in sites:
                resampled[s.name] = torch.stack([ref_acts[s.name][j] for j in sources])
                if sae is not None:  # the resampled rows' features
                    resampled[s.name] = sae.encode(resampled[s.name]).float()
    groups, grouping = length_groups(prompts, engine_)
    t_setup = time.perf_counter() - t0

    # -- ablated runs: rows are (cell, prompt) on the staircase -------------------------------
    def build(model_: HookedModel, stats: dict[str, Any]) -> Callable[..., GroupValues]:
        return partial(evaluate, model_, stats)

    def evaluate(model_: HookedModel, stats: dict[str, Any], group: list[int], todo: list[int],
                 tick: Callable[[int], None] | None) -> GroupValues:
        runs: list[PairRun] = base_and_source_runs(model_, [(rows[i], rows[i]) for i in group],
                                                   sites, [], engine_)
        inputs = metric_inputs(m, [corrects[i] for i in group], [incorrects[i] for i in group],
                               torch.stack([run.base_last for run in runs]))
        jobs: list[tuple[int, Patch]] = []
        for c in todo:
            cell = cells[c]
            for r, i in enumerate(group):
                act = runs[r].base.acts[cell.site.name][0]  # [T, *feature]
                values = _ablated_values(cell, i, row_pos[i], act, kind_name, means,
                                         resampled, sae)
                unit = None if cell.unit is None or sae is not None else (cell.unit,)
                jobs.append((r, (SitePatch(cell.site, tuple(row_pos[i]), unit, values),)))
        raw = cell_values(model_, runs, jobs, m, inputs, engine_, options.batch_size,
                          options.memory_mb, tick, stats,
                          answer_columns(m, [prompts[i] for i in group]))
        base_last = torch.stack([run.base_last for run in runs])
        return GroupValues(m(base_last, inputs), None, raw)

    values = options.run(
        model, prompts, len(cells), build, groups=groups, label="ablating",
        checkpoint_args=dict(method="ablation", component=component, kind=kind_name,
                             metric=m.name, layers=plan.layers, units=plan.units,
                             positions=row_pos, reference=ref_rows, seed=seed,
                             engine=engine_.value))
    original = values.base

    # -- the result ---------------------------------------------------------------------------
    mean_original = float(original.mean())
    ablated_mean = values.raw.mean(0)
    fraction = None
    if m.kind == "score" and abs(mean_original) > 1e-6:
        fraction = (ablated_mean / mean_original).reshape(shape).tolist()
    return build_result(
        model, values=values, scale=Scale.CHANGE, metric=m, axes=axes, labels=labels,
        shape=shape, component=component, method="ablation", direction="none",
        clean=rows, corrupted=[], answers=[[c, k] for c, k in zip(corrects, incorrects)],
        timings={"setup_s": t_setup},
        extra={"kind": kind_name, "engine": engine_.value, "pair_groups": grouping,
               "effect": "mean over prompts of ablated - original metric",
               "n_prompts": n, "original_metric": original.tolist(),
               "ablated_metric": ablated_mean.reshape(shape).tolist(),
               "fraction_kept": fraction, "positions": None if positions is None else row_pos,
               "reference_rows": len(ref_rows) if kind_ is not AblationKind.ZERO else 0,
               "seed": seed, "resample_sources": sources}, t_start=t0, data=prompts_or_dataset)


__all__ = ["ablate"]

"""Attribution patching: a first-order estimate of every activation patch from one backward pass.

Activation patching measures, for each cell (layer x position x head ...), the metric of the
*base* run after the cell's activation is replaced by the *source* run's. That costs one
(partial) forward pass per cell. Attribution patching replaces each of those runs by a Taylor
expansion of the metric around the base run::

    metric(base with a <- a_src)  ~=  metric(base) + (a_src - a_base) . d metric / d a |_base

The gradient ``d metric / d a`` at every site is obtained from **one** backward pass of the base
run, so the whole sweep costs one source forward (to cache ``a_src``), one base forward and one
backward, whatever the number of cells. The estimate of a cell is the dot product summed over
the cell's feature dimensions (``d_model``, ``d_head`` of the selected head, or the single
neuron) and over its positions (all positions jointly unless ``by_position``). It is normalised
exactly like :func:`causalpatch.activation_patching`::

    effect ~= (estimate) / (metric(source) - metric(base))

so a value near 1.0 means "this cell alone is predicted to restore (denoising) or break
(noising) the behaviour". Over a dataset the estimates are averaged over pairs and normalised
by the mean gap, as the exact sweep does.

Gradients are taken with :func:`torch.autograd.grad` with respect to an additive zero tensor
inserted at each patched site (``a + delta`` with ``delta = 0``), so ``d metric / d delta`` is
exactly ``d metric / d a``, the model's parameters never receive ``.grad``, and the estimate
works whether or not the parameters require gradients. Hooks are installed only through
:func:`causalpatch.hooks.hooked` and are removed on every exit path.

Distance metrics (``l2``, ``kl``, ...) are measured from the *source* logits, as in
:mod:`causalpatch.metrics`: they are 0 at the source and their gradient is taken at the base
run, where it is generally non-zero. They are far from linear between base and source (KL is
quadratic near its minimum), so the first-order estimate of a distance metric is much less
reliable than that of ``logit_diff``. Use ``verify_top_k`` to check the cells that matter.

Example::

    from causalpatch import HookedModel
    from causalpatch.attribution import attribution_patching
    model = HookedModel("smollm2")
    result = attribution_patching(
        model,
        "When Mary and John went to the store, John gave a drink to",
        "When Mary and John went to the store, Mary gave a drink to",
        component="attn_head", correct=" Mary", incorrect=" John", verify_top_k=5)
    result.effect_matrix.shape      # (30, 9): layer x head, estimated effects
    result.extra["verified"][0]     # {'index': [..], 'estimate': .., 'exact': ..}
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..assemble import GroupValues, Scale, build_result, pair_evaluator, run_pairs
from ..engine import last_logits
from ..enums import Direction, Engine, parse
from ..errors import InvalidArgumentError, NonFiniteError
from ..executors import resolve_executor
from ..hooks import Hook
from ..metrics import Metric, normalize as normalize_metric
from ..names import Site
from ..plan import (ComponentPlan, Pair, build_patches, check_answers, check_int,
                    choose_metric, make_pairs, metric_inputs, pair_positions, plan_component,
                    resolve_answers, result_axes)

if TYPE_CHECKING:
    from ..model import HookedModel
    from ..result import PatchingResult

#: Pairs per forward/backward batch when ``batch_size`` is not given.
DEFAULT_PAIRS_PER_BATCH = 8


def _reduce(contrib: torch.Tensor, plan: ComponentPlan, positions: list[int] | None,
            by_position: bool) -> torch.Tensor:
    """Sum a per-entry contribution ``[batch, pos, *feature]`` into cells.

    Returns ``[batch, (n_positions), (n_units)]`` following the result's axis order.
    """
    if plan.unit_axis == "head":  # [b, p, H, d_head] -> [b, p, H]
        cells = contrib.sum(-1)
    elif plan.unit_axis == "neuron":  # [b, p, d_mlp]
        cells = contrib
    else:  # [b, p, d] -> [b, p]
        cells = contrib.flatten(2).sum(-1)
    if plan.units is not None:
        cells = cells[:, :, plan.units]
    if positions is not None:
        cells = cells[:, positions]
    return cells if by_position else cells.sum(1)


# -- the attribution pass -----------------------------------------------------------------------
def _saver(store: dict[str, torch.Tensor], name: str) -> Callable[[torch.Tensor], None]:
    def save(act: torch.Tensor) -> None:
        store[name] = act.detach().clone()

    return save


def _with_delta(acts: dict[str, torch.Tensor], deltas: dict[str, torch.Tensor], name: str
                ) -> Callable[[torch.Tensor], torch.Tensor]:
    """Record the activation and add a zero tensor whose gradient is ``d metric / d act``."""

    def add_delta(act: torch.Tensor) -> torch.Tensor:
        acts[name] = act.detach().clone()
        delta = torch.zeros_like(act, requires_grad=True)
        deltas[name] = delta
        return act + delta

    return add_delta


def _estimate_batch(model: HookedModel, metric: Metric, sites: Sequence[Site],
                    base_ids: torch.Tensor, source_ids: torch.Tensor, pairs: Sequence[Pair],
                    plan: ComponentPlan, positions: list[int] | None, by_position: bool,
                    timings: dict[str, float]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """First-order estimates for a batch of equal-length pairs.

    Args:
        base_ids, source_ids: ``[batch, pos]`` token ids of the run patched into and the run
            patched from.

    Returns:
        ``(estimates [batch, *cells], base metric [batch], source metric [batch])``.
    """
    t0 = time.perf_counter()
    source_acts: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        source_last = last_logits(model, source_ids,
                                  [Hook(s, _saver(source_acts, s.name)) for s in sites]).float()
    t1 = time.perf_counter()
    inputs = metric_inputs(metric, [p.correct for p in pairs], [p.incorrect for p in pairs],
                           source_last)
    base_acts: dict[str, torch.Tensor] = {}
    deltas: dict[str, torch.Tensor] = {}
    with torch.enable_grad():
        base_last = last_logits(model, base_ids,
                                [Hook(s, _with_delta(base_acts, deltas, s.name)) for s in sites])
        base_values = metric(base_last, inputs)
        t2 = time.perf_counter()
        missing = [s.name for s in sites if s.name not in deltas]
        if missing:
            raise InvalidArgumentError(
                f"site(s) {missing} were not reached in the forward pass; attribution patching "
                "needs sites the logits depend on")
        order = [deltas[s.name] for s in sites]
        if not base_values.requires_grad:
            raise InvalidArgumentError(
                f"metric {metric.name!r} does not depend differentiably on the logits; "
                "attribution patching needs a differentiable metric (use activation_patching)")
        # rows are independent, so the gradient of the sum is each row's own gradient
        grads = torch.autograd.grad(base_values.sum(), order, allow_unused=True)
    t3 = time.perf_counter()
    with torch.no_grad():
        source_values = metric(source_last, inputs)
        per_site = []
        for site, grad in zip(sites, grads):
            diff = (source_acts[site.name].float() - base_acts[site.name].float())
            g = torch.zeros_like(diff) if grad is None else grad.float()
            if not torch.isfinite(g).all():
                raise NonFiniteError(
                    f"the gradient of metric {metric.name!r} at {site.name} is not finite (a "
                    "distance metric whose base and source logits coincide has no gradient); "
                    "use a score metric or activation_patching")
            per_site.append(_reduce(diff * g, plan, positions, by_position))
        estimates = torch.stack(per_site, dim=1)  # [batch, n_sites, (pos), (units)]
    timings["source_forward_s"] = timings.get("source_forward_s", 0.0) + (t1 - t0)
    timings["base_forward_s"] = timings.get("base_forward_s", 0.0) + (t2 - t1)
    timings["backward_s"] = timings.get("backward_s", 0.0) + (t3 - t2)
    return estimates.flatten(1), base_values.detach(), source_values


def attribution_patching(
    model: HookedModel,
    clean: Any,
    corrupted: Any = None,
    component: str = "resid_post",
    metric: str | Metric | Callable[..., Any] | None = None,
    metric_kwargs: Mapping[str, Any] | None = None,
    *,
    correct: Any = None,
    incorrect: Any = None,
    layers: Sequence[int] | int | None = None,
    heads: Sequence[int] | int | None = None,
    neurons: Sequence[int] | int | None = None,
    positions: Sequence[int] | int | None = None,
    by_position: bool = False,
    direction: str | Direction = "denoise",
    verify_top_k: int = 0,
    batch_size: int | None = None,
    executor: Any = None,
) -> PatchingResult:
    """Estimate every patch effect of an activation patching sweep from one backward pass.

    ``estimate(cell) = sum over the cell's entries of (a_source - a_base) * d metric / d a``,
    with the gradient taken on the base run (the corrupted run when denoising, the clean run
    when noising), then normalised by ``metric(source) - metric(base)``.

    Args:
        model: the :class:`HookedModel`.
        clean, corrupted: as in :func:`causalpatch.activation_patching` (strings, token ids,
            equal-length lists, or a dataset with ``.clean``/``.corrupted``/``.correct``/
            ``.incorrect`` as ``clean``).
        component: ``resid_pre | resid_mid | resid_post | attn | mlp | attn_head |
            attn_head_q | attn_head_k | attn_head_v | mlp_neuron``, another per-layer site
            kind, or one full site name.
        metric: a metric name or callable ``(logits [batch, vocab]) -> [batch]``; it must be
            differentiable in the logits.
        metric_kwargs / correct / incorrect: answer tokens.
        layers, heads, neurons, positions, by_position: which cells, as in
            :func:`causalpatch.activation_patching`.
        direction: ``"denoise"`` (gradient on the corrupted run) or ``"noise"`` (on the clean
            run).
        verify_top_k: re-run the ``k`` cells with the largest ``|estimate|`` exactly with the
            patching engine; stored in ``result.extra["verified"]`` as a list of
            ``{"index": [...labels], "cell": [...coords], "estimate": e, "exact": x}``
            (``index`` holds layer/head/neuron labels and absolute token positions).
        batch_size: pairs per forward/backward batch (pairs are grouped by token length).
        executor: ``None`` (here), ``"ray"`` or a :class:`~causalpatch.executors.RayExecutor`:
            batches of pairs are evaluated by Ray workers (``verify_top_k`` too).

    Returns:
        :class:`PatchingResult` with ``method="attribution_patching"`` and the same shape,
        axes and labels as :func:`causalpatch.activation_patching`:
        ``(n_layers,)``, ``(n_layers, n_heads)``, ``(n_layers, n_positions)`` or
        ``(n_layers, n_positions, n_heads)`` (``n_neurons`` for ``mlp_neuron``).
    """
    t_start = time.perf_counter()
    # -- validate everything first ----------------------------------------------------------
    direction_ = parse(Direction, direction, "direction")
    check_int(verify_top_k, "verify_top_k", 0)
    check_int(batch_size, "batch_size", 1, allow_none=True)
    executor_ = resolve_executor(executor, model)
    correct, incorrect = resolve_answers(metric_kwargs, correct, incorrect)
    pairs = make_pairs(model, clean, corrupted, correct, incorrect)
    m = choose_metric(metric, pairs, clean if corrupted is None else None)
    plan = plan_component(model, component, layers, heads, neurons)
    positions_of = pair_positions(pairs, positions, by_position)
    check_answers(m, pairs)
    axes, labels, shape = result_axes(model, plan, positions_of[0], by_position, pairs[0].clean)
    n_cells = int(torch.Size(shape).numel())
    per_batch = batch_size or DEFAULT_PAIRS_PER_BATCH

    # -- run: pairs of one length and one position list, batched -----------------------------
    groups: dict[tuple[int, tuple[int, ...] | None], list[int]] = {}
    for i, (pair, pos) in enumerate(zip(pairs, positions_of)):
        groups.setdefault((len(pair.clean), None if pos is None else tuple(pos)), []).append(i)
    batches = [idx[lo : lo + per_batch] for idx in groups.values()
               for lo in range(0, len(idx), per_batch)]
    timings: dict[str, float] = {"setup_s": time.perf_counter() - t_start}
    denoise = direction_ is Direction.DENOISE

    def build(model_: HookedModel, stats: dict[str, Any]) -> Callable[..., GroupValues]:
        def evaluate(group: list[int], cells: list[int], tick: Callable[[int], None] | None
                     ) -> GroupValues:
            chunk = [pairs[i] for i in group]
            runs = [p.runs(denoise) for p in chunk]
            base_ids = torch.tensor([b for b, _ in runs], device=model_.device)
            src_ids = torch.tensor([s for _, s in runs], device=model_.device)
            est, base, source = _estimate_batch(model_, m, plan.sites, base_ids, src_ids, chunk,
                                                plan, positions_of[group[0]], by_position,
                                                stats)
            # an estimate is a first-order change: patched ~= base + estimate
            patched = base.detach().cpu()[:, None] + est.cpu()
            if tick is not None:
                tick(len(group) * len(cells))
            return GroupValues(base.cpu(), source.cpu(), patched[:, cells])

        return evaluate

    values = run_pairs(model, pairs, n_cells, build=build, groups=batches, executor=executor_)
    for key in ("source_forward_s", "base_forward_s", "backward_s"):  # summed over workers
        timings[key] = values.stats.pop(key, 0.0)
    timings["attribution_s"] = (timings["source_forward_s"] + timings["base_forward_s"]
                                + timings["backward_s"])

    # -- optional exact check of the largest estimates ---------------------------------------
    t_verify = time.perf_counter()
    verified: list[dict[str, Any]] = []
    if verify_top_k > 0:
        mean_base, mean_source = values.base.mean(), values.source.mean()
        effect = normalize_metric(values.raw.mean(0), mean_base, mean_source, m.name)
        verified = _verify(model, m, pairs, plan, positions_of, by_position, direction_,
                           effect, shape, axes, labels, min(verify_top_k, n_cells), batch_size,
                           executor_)
    timings["verify_s"] = time.perf_counter() - t_verify
    return build_result(
        model, values=values, scale=Scale.NORMALIZED, metric=m, axes=axes, labels=labels,
        shape=shape, component=component, method="attribution_patching",
        direction=direction_, clean=[p.clean for p in pairs],
        corrupted=[p.corrupted for p in pairs],
        answers=[[p.correct, p.incorrect] for p in pairs], timings=timings,
        extra={"estimate": "first-order (gradient at the base run)",
               "positions": positions_of[0], "verified": verified}, t_start=t_start,
        data=clean)


def _verify(model: HookedModel, m: Metric, pairs: Sequence[Pair], plan: ComponentPlan,
            positions_of: Sequence[list[int] | None], by_position: bool,
            direction: Direction, effect: torch.Tensor, shape: tuple[int, ...],
            axes: tuple[str, ...], labels: dict[str, list[Any]], k: int,
            batch_size: int | None, executor: Any = None) -> list[dict[str, Any]]:
    """Exact effects (the activation patching engine) of the ``k`` largest estimates."""
    order = torch.argsort(effect.abs(), descending=True, stable=True)[:k].tolist()
    patches_of = [[build_patches(plan, pos, by_position, len(p.clean))[j] for j in order]
                  for p, pos in zip(pairs, positions_of)]

    def build(model_: HookedModel, stats: dict[str, Any]) -> Any:
        return pair_evaluator(model_, pairs, patches_of, m, direction, Engine.FAST, batch_size,
                              1024.0, stats)

    values = run_pairs(model, pairs, k, build=build, executor=executor)
    exact = normalize_metric(values.raw.mean(0), values.base.mean(), values.source.mean(),
                             m.name)
    positions = positions_of[0]
    out = []
    for j, flat in enumerate(order):
        coords = [int(c) for c in torch.unravel_index(torch.tensor(flat), shape)]
        index = [positions[c] if a == "position" and positions is not None
                 else labels[a][c] if a in labels else c for a, c in zip(axes, coords)]
        out.append({"index": index, "cell": coords, "estimate": float(effect[flat]),
                    "exact": float(exact[j])})
    return out


__all__ = ["attribution_patching"]

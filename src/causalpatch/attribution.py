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

    from causalpatch import InterpretableModel
    from causalpatch.attribution import attribution_patching
    model = InterpretableModel("smollm2")
    result = attribution_patching(
        model,
        "When Mary and John went to the store, John gave a drink to",
        "When Mary and John went to the store, Mary gave a drink to",
        component="attn_head", correct=" Mary", incorrect=" John", verify_top_k=5)
    result.effect_matrix.shape      # (30, 9): layer x head, estimated effects
    result.extra["verified"][0]     # {'index': [..], 'estimate': .., 'exact': ..}
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from .errors import InvalidArgumentError, InvalidTypeError, NonFiniteError
from .hooks import Hook, hooked
from .metrics import Metric, MetricInputs, get_metric, normalize as normalize_fn
from .names import Site
from .patching import (ComponentPlan, Direction, Pair, _direction, _inputs, build_patches,
                       make_pairs, patched_logits, plan_component, resolve_answers,
                       resolve_positions, run_pair_or_sites)

if TYPE_CHECKING:
    from .model import InterpretableModel
    from .result import PatchingResult

#: Pairs per forward/backward batch when ``batch_size`` is not given.
DEFAULT_PAIRS_PER_BATCH = 8


# -- small shared helpers (also used by causalpatch.ablation) -----------------------------------
def plan_sites(model: InterpretableModel, plan: ComponentPlan) -> list[Site]:
    """The site of every layer of ``plan``, in the order of the result's layer axis."""
    if plan.single_site is not None:
        return [model.site(plan.single_site)]
    return [model.site(f"blocks.{layer}.{plan.kind}") for layer in plan.layers]


def result_axes(model: InterpretableModel, plan: ComponentPlan, positions: list[int] | None,
                by_position: bool, tokens: Sequence[int]
                ) -> tuple[tuple[str, ...], dict[str, list[Any]], tuple[int, ...]]:
    """Axes, labels and shape of a result, the same as :func:`activation_patching` builds.

    A single named site without positions or units gives the 1-element axis ``("site",)``.
    """
    axes: tuple[str, ...] = ()
    labels: dict[str, list[Any]] = {}
    shape: tuple[int, ...] = ()
    if plan.single_site is None:
        axes, labels["layer"], shape = ("layer",), list(plan.layers), (len(plan.layers),)
    if by_position:
        assert positions is not None
        toks = model.to_str_tokens(list(tokens))
        axes += ("position",)
        labels["position"] = [f"{p}: {toks[p]!r}" for p in positions]
        shape += (len(positions),)
    if plan.unit_axis is not None:
        axes += (plan.unit_axis,)
        labels[plan.unit_axis] = list(plan.units or [])
        shape += (len(plan.units or []),)
    if not axes:
        axes, labels, shape = ("site",), {"site": [plan.single_site]}, (1,)
    return axes, labels, shape


def last_logits(model: InterpretableModel, ids: torch.Tensor, hooks: Sequence[Hook] = ()
                ) -> torch.Tensor:
    """Last-position logits ``[batch, vocab]`` of an unpadded batch ``ids`` ``[batch, pos]``.

    Runs under the caller's grad mode; only the last position is unembedded when the model
    supports ``logits_to_keep``.
    """
    hf = model.hf_model
    kwargs: dict[str, Any] = {"input_ids": ids, "use_cache": False}
    if "logits_to_keep" in inspect.signature(hf.forward).parameters:
        kwargs["logits_to_keep"] = 1
    with hooked(hf, hooks, model.dims):
        logits = hf(**kwargs).logits
    return logits[:, -1]


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


def _check_int(value: Any, what: str, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidTypeError(f"{what} must be an int, got {value!r}")
    if value < minimum:
        raise InvalidArgumentError(f"{what} must be >= {minimum}, got {value}")


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


def _estimate_batch(model: InterpretableModel, metric: Metric, sites: Sequence[Site],
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
    inputs = MetricInputs(
        target_logits=source_last,
        correct=None if pairs[0].correct is None else torch.tensor([p.correct for p in pairs]),
        incorrect=None if pairs[0].incorrect is None else torch.tensor(
            [p.incorrect for p in pairs]),
    )
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
    model: InterpretableModel,
    clean: Any,
    corrupted: Any = None,
    component: str = "resid_post",
    metric: str | Metric | Callable[..., Any] = "logit_diff",
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
) -> PatchingResult:
    """Estimate every patch effect of an activation patching sweep from one backward pass.

    ``estimate(cell) = sum over the cell's entries of (a_source - a_base) * d metric / d a``,
    with the gradient taken on the base run (the corrupted run when denoising, the clean run
    when noising), then normalised by ``metric(source) - metric(base)``.

    Args:
        model: the :class:`InterpretableModel`.
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

    Returns:
        :class:`PatchingResult` with ``method="attribution_patching"`` and the same shape,
        axes and labels as :func:`causalpatch.activation_patching`:
        ``(n_layers,)``, ``(n_layers, n_heads)``, ``(n_layers, n_positions)`` or
        ``(n_layers, n_positions, n_heads)`` (``n_neurons`` for ``mlp_neuron``).
    """
    from .result import PatchingResult

    t_start = time.perf_counter()
    # -- validate everything first ----------------------------------------------------------
    direction_ = _direction(direction)
    _check_int(verify_top_k, "verify_top_k", 0)
    if batch_size is not None:
        _check_int(batch_size, "batch_size", 1)
    m = get_metric(metric)
    correct, incorrect = resolve_answers(model, metric_kwargs, correct, incorrect)
    pairs = make_pairs(model, clean, corrupted, correct, incorrect)
    plan = plan_component(model, component, layers, heads, neurons)
    lengths = sorted({len(p.clean) for p in pairs})
    if by_position and len(lengths) > 1:
        raise InvalidArgumentError(
            f"by_position=True needs all pairs to have the same token length, got lengths "
            f"{lengths}; group pairs by length or use by_position=False")
    pos_by_length = {n: resolve_positions(positions, by_position, n) for n in lengths}
    for pair in pairs:
        _inputs(m, pair.correct, pair.incorrect, torch.zeros(1))  # answers present?
    answered = {(p.correct is None, p.incorrect is None) for p in pairs}
    if len(answered) > 1:
        raise InvalidArgumentError("some pairs have answer tokens and others do not")
    sites = plan_sites(model, plan)
    axes, labels, shape = result_axes(model, plan, pos_by_length[len(pairs[0].clean)],
                                      by_position, pairs[0].clean)
    n_cells = int(torch.Size(shape).numel())
    per_batch = batch_size or DEFAULT_PAIRS_PER_BATCH

    # -- run: pairs grouped by length, batched --------------------------------------------------
    timings: dict[str, float] = {"setup_s": time.perf_counter() - t_start}
    est = torch.empty(len(pairs), n_cells)
    base_values = torch.empty(len(pairs))
    source_values = torch.empty(len(pairs))
    for n_tok in lengths:
        idx = [i for i, p in enumerate(pairs) if len(p.clean) == n_tok]
        for lo in range(0, len(idx), per_batch):
            rows = idx[lo : lo + per_batch]
            chunk = [pairs[i] for i in rows]
            clean_ids = torch.tensor([p.clean for p in chunk], device=model.device)
            corrupted_ids = torch.tensor([p.corrupted for p in chunk], device=model.device)
            base_ids, src_ids = ((corrupted_ids, clean_ids) if direction_ is Direction.DENOISE
                                 else (clean_ids, corrupted_ids))
            e, b, s = _estimate_batch(model, m, sites, base_ids, src_ids, chunk, plan,
                                      pos_by_length[n_tok], by_position, timings)
            est[rows], base_values[rows], source_values[rows] = e.cpu(), b.cpu(), s.cpu()
    attribution_s = (timings["source_forward_s"] + timings["base_forward_s"]
                     + timings["backward_s"])

    # -- aggregate exactly like the exact sweep --------------------------------------------------
    mean_base, mean_source = base_values.mean(), source_values.mean()
    effect = normalize_fn(mean_base + est.mean(0), mean_base, mean_source, m.name)
    per_pair = est / (mean_source - mean_base)
    std = per_pair.std(0, unbiased=False) if len(pairs) > 1 else None

    # -- optional exact check of the largest estimates ---------------------------------------
    t_verify = time.perf_counter()
    verified: list[dict[str, Any]] = []
    if verify_top_k > 0:
        verified = _verify(model, m, pairs, plan, pos_by_length, by_position, direction_, effect,
                           shape, axes, labels, min(verify_top_k, n_cells), batch_size)
    timings["verify_s"] = time.perf_counter() - t_verify
    timings["attribution_s"] = attribution_s
    timings["total_s"] = time.perf_counter() - t_start

    clean_v, corrupted_v = ((source_values, base_values) if direction_ is Direction.DENOISE
                            else (base_values, source_values))
    decode = model.tokenizer.decode
    first_positions = pos_by_length[len(pairs[0].clean)]
    return PatchingResult(
        effect_matrix=effect.reshape(shape).float(),
        axes=axes,
        labels=labels,
        component=component,
        metric=m.name,
        direction=direction_.value,
        method="attribution_patching",
        model_name=model.name,
        clean_prompts=[decode(p.clean) for p in pairs],
        corrupted_prompts=[decode(p.corrupted) for p in pairs],
        clean_tokens=[model.to_str_tokens(p.clean) for p in pairs[:1]],
        clean_metric=float(clean_v.mean()),
        corrupted_metric=float(corrupted_v.mean()),
        normalized=True,
        per_pair=per_pair.reshape(len(pairs), *shape).float() if len(pairs) > 1 else None,
        std=None if std is None else std.reshape(shape).float(),
        timings=timings,
        extra={"estimate": "first-order (gradient at the base run)", "n_pairs": len(pairs),
               "positions": first_positions,
               "answers": [[p.correct, p.incorrect] for p in pairs[:1]],
               "verified": verified},
    )


def _verify(model: InterpretableModel, m: Metric, pairs: Sequence[Pair], plan: ComponentPlan,
            pos_by_length: dict[int, list[int] | None], by_position: bool,
            direction: Direction, effect: torch.Tensor, shape: tuple[int, ...],
            axes: tuple[str, ...], labels: dict[str, list[Any]], k: int,
            batch_size: int | None) -> list[dict[str, Any]]:
    """Exact effects (the activation patching engine) of the ``k`` largest estimates."""
    order = torch.argsort(effect.abs(), descending=True, stable=True)[:k].tolist()
    positions = pos_by_length[len(pairs[0].clean)]
    raw = torch.empty(len(pairs), k)
    base_values = torch.empty(len(pairs))
    source_values = torch.empty(len(pairs))
    for i, pair in enumerate(pairs):
        n_tok = len(pair.clean)
        patches, _ = build_patches(model, plan, pos_by_length[n_tok], by_position, n_tok)
        chosen = [patches[j] for j in order]
        base_ids, src_ids = ((pair.corrupted, pair.clean) if direction is Direction.DENOISE
                             else (pair.clean, pair.corrupted))
        sites = plan_sites(model, plan)
        run = run_pair_or_sites(model, base_ids, src_ids, sites, chosen, "fast")
        inputs = _inputs(m, pair.correct, pair.incorrect, run.source_last)
        ends = m(torch.stack([run.base_last, run.source_last]), inputs.expand(2))
        base_values[i], source_values[i] = ends[0], ends[1]
        logits = patched_logits(model, base_ids, chosen, run.base, run.source, run.base_last,
                                "fast", batch_size, prepared=run.prepared)
        raw[i] = m(logits, inputs.expand(k))
    exact = normalize_fn(raw.mean(0), base_values.mean(), source_values.mean(), m.name)
    out = []
    for j, flat in enumerate(order):
        coords = list(torch.unravel_index(torch.tensor(flat), shape))
        coords = [int(c) for c in coords]
        index = [positions[c] if a == "position" and positions is not None
                 else labels[a][c] if a in labels else c for a, c in zip(axes, coords)]
        out.append({"index": index, "cell": coords, "estimate": float(effect[flat]),
                    "exact": float(exact[j])})
    return out


__all__ = ["attribution_patching"]

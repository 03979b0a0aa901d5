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

AtP* (``method="atp*"``; Kramar et al. 2024, docs/attribution_patching.md) removes attribution
patching's two known sources of false negatives. The **QK fix** (``attn_head_q``/``_k``):
the patched attention pattern is exact and only what follows is linearised,
``c(n) = sum_t (z'_t - z_t) . d metric / d z_t`` with ``z' = A' v`` (a key: over every query
position and query head that reads it). Queries (and keys patched jointly) take one run of the
layer's own attention with the node patched; a key by position takes the paper's closed form
from the attention logits ``s``: only column ``n`` changes, ``A'_t(n) = softmax(s_t + e_n
ds_tn)``, so ``c(n) = sum_t (A'_tn - A_tn) (g_t . v_n - g_t . u_tn)`` (``g_t = d metric /
d z_t``, ``u_tn`` the value average without ``n``; :class:`causalpatch.engine.KeyPatternChange`),
with the exact runs as fallback where the logits do not reproduce the layer's attention
(``extra["qk_fix"]`` says which ran). **GradDrop**: ``L`` more
backward passes, pass ``l`` with the gradient through layer ``l``'s residual writes zeroed,
``c_GD(n) = sum_l |c_l(n)| / (L - 1)`` (``extra["graddrop"]``). ``verify="auto"`` then
screens (``max(|estimate|, c_GD)``) and proves: :func:`causalpatch.options.screen_then_prove`.

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

from ..assemble import GroupValues, PairValues, Scale, aggregate, build_result
from ..engine import (KeyPatternChange, graddrop_pass, gradient_pass, key_pattern_changes,
                      pattern_patched_outputs)
from ..enums import Direction
from ..errors import InvalidArgumentError
from ..metrics import Metric
from ..options import DEFAULT_MEMORY_MB, Progress, RunOptions, prepare_pairs, screen_then_prove
from ..options import verify_top_k as exact_top_k
from ..plan import (ComponentPlan, build_patches, check_int, metric_inputs, pair_positions,
                    plan_component, result_axes)

if TYPE_CHECKING:
    from ..model import HookedModel
    from ..names import Site
    from ..result import PatchingResult

#: Pairs per forward/backward batch when ``batch_size`` is not given.
DEFAULT_PAIRS_PER_BATCH = 8

#: ``method=``: plain attribution patching, or AtP* (GradDrop; see the module docstring).
METHODS = ("atp", "atp*")

#: Components AtP*'s QK fix applies to.
QK_COMPONENTS = ("attn_head_q", "attn_head_k")
QK_SITES = ("attn.q", "attn.k")


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
    method: str = "atp",
    verify: str | None = None,
    top_k: int = 20,
    threshold: float | None = None,
    n_subsets: int = 8,
    seed: int = 0,
    batch_size: int | None = None,
    memory_mb: float = DEFAULT_MEMORY_MB,
    checkpoint: str | None = None,
    progress: Progress = None,
    executor: Any = None,
    threads: int | None = None,
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
        method: ``"atp"`` (default: plain attribution patching) or ``"atp*"`` (AtP*: the QK
            fix for ``attn_head_q``/``attn_head_k`` and GradDrop, whose magnitudes are in
            ``extra["graddrop"]``; needs at least 2 layers).
        verify: ``None`` or ``"auto"``: screen then prove (module docstring): every cell
            whose score could place it in the exact ``top_k`` (or above ``threshold``) is run
            exactly, the rest bounded by ``n_subsets`` random joint patches (``seed``). The
            verified cells hold exact values (``extra["exact"]`` marks them, listed in
            ``extra["verified"]`` like ``verify_top_k``); ``extra["missed_bound"]`` states
            the bound.
        top_k, threshold, n_subsets, seed: of ``verify="auto"``.
        batch_size: pairs per forward/backward batch (pairs are grouped by token length;
            default 8); the exact check of ``verify_top_k`` uses the engine's default.
        memory_mb, checkpoint, progress, executor, threads: the run options every method shares
            (:mod:`causalpatch.options`); with an executor, batches of pairs (and the
            ``verify_top_k`` check) are evaluated by Ray workers.

    Returns:
        :class:`PatchingResult` with ``method="attribution_patching"`` and the same shape,
        axes and labels as :func:`causalpatch.activation_patching`:
        ``(n_layers,)``, ``(n_layers, n_heads)``, ``(n_layers, n_positions)`` or
        ``(n_layers, n_positions, n_heads)`` (``n_neurons`` for ``mlp_neuron``).
    """
    t_start = time.perf_counter()
    # -- validate everything first ----------------------------------------------------------
    check_int(verify_top_k, "verify_top_k", 0)
    if not isinstance(method, str) or method not in METHODS:
        raise InvalidArgumentError(
            f"method must be 'atp' (plain attribution patching, the default) or 'atp*' "
            f"(AtP*: GradDrop plus screen-then-prove), got {method!r}")
    if verify is not None and verify != "auto":
        raise InvalidArgumentError(
            f"verify must be None or 'auto' (screen then prove the top_k), got {verify!r}")
    check_int(top_k, "top_k", 1)
    check_int(n_subsets, "n_subsets", 1)
    check_int(seed, "seed", 0)
    if threshold is not None and (isinstance(threshold, bool)
                                  or not isinstance(threshold, (int, float))
                                  or not threshold > 0):
        raise InvalidArgumentError(
            f"threshold must be None or a positive normalised effect, got {threshold!r}")
    star = method == "atp*"
    options = RunOptions.make(model, progress=progress, executor=executor, batch_size=batch_size,
                              memory_mb=memory_mb, checkpoint=checkpoint, threads=threads)
    prep = prepare_pairs(model, clean, corrupted, metric, metric_kwargs, correct, incorrect,
                         direction)
    pairs, m, denoise = prep.pairs, prep.metric, prep.denoise  # the factory captures no dataset
    plan = plan_component(model, component, layers, heads, neurons)
    if star:
        _check_star(model, plan)
    positions_of = pair_positions(pairs, positions, by_position)
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

    def build(model_: HookedModel, stats: dict[str, Any]) -> Callable[..., GroupValues]:
        def evaluate(group: list[int], cells: list[int], tick: Callable[[int], None] | None
                     ) -> GroupValues:
            chunk = [pairs[i] for i in group]
            runs = [p.runs(denoise) for p in chunk]
            base_ids = torch.tensor([b for b, _ in runs], device=model_.device)
            src_ids = torch.tensor([s for _, s in runs], device=model_.device)

            def objective(logits: torch.Tensor, source_logits: torch.Tensor) -> torch.Tensor:
                return m(logits, metric_inputs(m, [p.correct for p in chunk],
                                               [p.incorrect for p in chunk], source_logits))

            pos = positions_of[group[0]]
            qk = star and plan.component in QK_COMPONENTS
            z_sites = [model_.layer_site("attn.z", layer) for layer in plan.layers] if qk else []
            n_kv = plan.sites[0].view.n_heads(model_.dims) if plan.unit_axis == "head" else 1

            def estimate(grad: dict[str, dict[str, torch.Tensor]]) -> torch.Tensor:
                with torch.no_grad():
                    if closed:
                        per_site = [_key_cells(ch.contract(grad[z.name]["act"]), plan,
                                               by_position, n_kv)
                                    for ch, z in zip(closed, z_sites)]
                    elif qk:
                        per_site = [_qk_reduce(dz, grad[z.name]["act"].float(), plan, pos,
                                               by_position, n_kv)
                                    for dz, z in zip(deltas, z_sites)]
                    else:
                        per_site = [_reduce((grads.source[s.name].float()
                                             - grads.base[s.name].float())
                                            * grad[s.name]["act"].float(), plan, pos,
                                            by_position)
                                    for s in plan.sites]
                    return torch.stack(per_site, dim=1).flatten(1).cpu()  # [batch, n_cells]

            if star:
                dropped = graddrop_pass(model_, base_ids, src_ids, [*plan.sites, *z_sites],
                                        objective, timings=stats)
                grads = dropped.plain
                # the QK fix: a key per position in closed form from the attention logits
                # (KeyPatternChange), else each attention output with the patched pattern
                # recomputed exactly (queries, keys jointly, or logits the adapter cannot read)
                t_fix = time.perf_counter()
                closed = _key_fix(model_, base_ids, plan, z_sites, grads.source, pos,
                                  by_position) if qk else None
                deltas = _pattern_deltas(model_, base_ids, plan, z_sites, grads.source,
                                         grads.base, pos, by_position) if qk and not closed else []
                if qk:
                    key = "qk_fix_closed_form" if closed else "qk_fix_exact"
                    stats[key] = stats.get(key, 0.0) + 1.0
                    stats["qk_fix_s"] = stats.get("qk_fix_s", 0.0) + time.perf_counter() - t_fix
                # GradDrop: sum over l of |estimate with layer l's writes' gradient dropped|,
                # over L - 1 (a cell's own layer gives 0); appended after the estimates
                drop = torch.stack([estimate(g).abs() for g in dropped.dropped]).sum(0) / max(
                    model_.n_layers - 1, 1)
                est = torch.cat([estimate(grads.grads), drop], dim=1)
            else:
                closed = None
                grads = gradient_pass(model_, base_ids, src_ids, plan.sites, objective,
                                      timings=stats)
                est = estimate(grads.grads)
            # an estimate is a first-order change: patched ~= base + estimate
            patched = grads.base_values.cpu()[:, None] + est
            if tick is not None:
                tick(len(group) * len(cells))
            return GroupValues(grads.base_values.cpu(), grads.source_values.cpu(),
                               patched[:, cells])

        return evaluate

    n_columns = 2 * n_cells if star else n_cells  # AtP*: estimates, then GradDrop
    values = options.run(
        model, pairs, n_columns, build, groups=batches, label="attribution patching",
        checkpoint_args=dict(method="attribution_patching", component=component,
                             metric=m.name, layers=plan.layers, units=plan.units,
                             positions=positions_of, by_position=by_position,
                             direction=prep.direction.value, batch=per_batch,
                             **({"atp": "atp*"} if star else {})))
    for key in ("source_forward_s", "base_forward_s", "backward_s"):  # summed over workers
        timings[key] = values.stats.pop(key, 0.0)
    timings["attribution_s"] = (timings["source_forward_s"] + timings["base_forward_s"]
                                + timings["backward_s"])
    extra: dict[str, Any] = {}
    if star:
        timings["graddrop_backward_s"] = values.stats.pop("graddrop_backward_s", 0.0)
        timings["attribution_s"] += timings["graddrop_backward_s"]
        if plan.component in QK_COMPONENTS:
            timings["qk_fix_s"] = values.stats.pop("qk_fix_s", 0.0)
            timings["attribution_s"] += timings["qk_fix_s"]
            n_closed = values.stats.pop("qk_fix_closed_form", 0.0)
            n_exact = values.stats.pop("qk_fix_exact", 0.0)
            extra["qk_fix"] = {(True, False): "closed form", (False, True): "exact recomputation",
                               (True, True): "closed form and exact recomputation"}.get(
                (n_closed > 0, n_exact > 0), "not run (every pair from the checkpoint)")
        gd = PairValues(values.raw[:, n_cells:], values.base, values.source)
        # GradDrop: |.| per pair, averaged, normalised; a magnitude
        graddrop = aggregate(gd, Scale.NORMALIZED, m).effect.abs()
        values = PairValues(values.raw[:, :n_cells].clone(), values.base, values.source,
                            values.stats, values.seconds, values.payloads)
        extra["graddrop"] = graddrop.reshape(shape).tolist()  # extra holds JSON values

    # -- optional exact check of the largest estimates ---------------------------------------
    t_verify = time.perf_counter()
    verified: list[dict[str, Any]] = []
    if verify_top_k > 0:
        effect = aggregate(values, Scale.NORMALIZED, m).effect
        exact_options = options.exact()

        def patches_for(order: list[int]) -> list[list[Any]]:
            return [[build_patches(plan, pos, by_position, len(p.clean))[j] for j in order]
                    for p, pos in zip(pairs, positions_of)]

        verified = exact_top_k(model, prep, effect, min(verify_top_k, n_cells), shape, axes,
                                labels, patches_for, exact_options, positions=positions_of[0])
    if verify == "auto":
        estimate_ = aggregate(values, Scale.NORMALIZED, m).effect
        score = (torch.maximum(estimate_.abs(), graddrop) if star else estimate_.abs())
        exact_options = options.exact()

        every = [build_patches(plan, pos, by_position, len(p.clean))  # once per pair
                 for p, pos in zip(pairs, positions_of)]

        def cell_patches(order: list[int]) -> list[list[Any]]:
            return [[patches[j] for j in order] for patches in every]

        proven = screen_then_prove(model, prep, estimate_, score, top_k, shape, axes, labels,
                                   cell_patches, exact_options, threshold=threshold,
                                   n_subsets=n_subsets, seed=seed, positions=positions_of[0])
        verified = proven.verified
        cells = [int(torch.tensor(e["cell"]) @ torch.tensor(_strides(shape))) for e in verified]
        exact_mask = torch.zeros(n_cells, dtype=torch.bool)
        if proven.raw is not None:  # the verified cells hold their exact values
            values.raw[:, cells] = proven.raw
            exact_mask[cells] = True
        extra.update(exact=exact_mask.reshape(shape).tolist(), missed_bound=proven.bound,
                     top_k=top_k, threshold=proven.threshold)
    timings["verify_s"] = time.perf_counter() - t_verify
    what = ("AtP* (first-order, GradDrop screening)" if star
            else "first-order (gradient at the base run)")
    if verify == "auto":
        what += "; cells where extra['exact'] is True hold exact values"
    return build_result(
        model, values=values, scale=Scale.NORMALIZED, axes=axes, labels=labels,
        shape=shape, component=component, method="attribution_patching", timings=timings,
        extra={"estimate": what, "attribution_method": method,
               "positions": positions_of[0], "verified": verified, **extra},
        t_start=t_start, **prep.result_fields())


def _pattern_deltas(model: HookedModel, base_ids: torch.Tensor, plan: ComponentPlan,
                    z_sites: list[Site], source: dict[str, torch.Tensor],
                    base: dict[str, torch.Tensor], positions: list[int] | None,
                    by_position: bool) -> list[torch.Tensor]:
    """The QK fix's exact change of each layer's attention output ``[b, R, T, H, d_head]``,
    every layer in one forward: one run with every query patched (a query changes only its own
    row of the pattern), or, for keys, one run per key position (``by_position``) or one with
    the keys of every position of the cell."""
    length = base_ids.shape[1]
    cell_pos = list(range(length)) if positions is None else list(positions)
    if plan.component == "attn_head_q" or not by_position:
        rows: list[list[int]] = [cell_pos]
    else:
        rows = [[p] for p in cell_pos]
    outs = pattern_patched_outputs(
        model, base_ids, [(s, source[s.name], z, base[z.name])
                          for s, z in zip(plan.sites, z_sites)], rows)
    return [out.float() - base[z.name].float()[:, None] for out, z in zip(outs, z_sites)]


def _key_fix(model: HookedModel, base_ids: torch.Tensor, plan: ComponentPlan,
             z_sites: list[Site], source: dict[str, torch.Tensor], positions: list[int] | None,
             by_position: bool) -> list[KeyPatternChange] | None:
    """The closed-form key fix of every layer (keys by position only), or ``None``: queries
    and keys patched jointly take one exact run of ``b`` rows, as cheap as the closed form's
    one of ``2b``; a model whose logits cannot be read falls back to the exact runs too."""
    if plan.component != "attn_head_k" or not by_position:
        return None
    keys = list(range(base_ids.shape[1])) if positions is None else list(positions)
    layers = [(s, source[s.name], model.layer_site("attn.v", layer), z)
              for s, z, layer in zip(plan.sites, z_sites, plan.layers)]
    return key_pattern_changes(model, base_ids, layers, keys)


def _key_cells(per_key: torch.Tensor, plan: ComponentPlan, by_position: bool, n_kv: int
               ) -> torch.Tensor:
    """Key cells ``[b, R, (n_units)]`` from per-query-head values ``[b, R, H]``: grouped-query
    attention's query heads ``[g * H/KV, (g + 1) * H/KV)`` read key head ``g``."""
    b, r, n_heads = per_key.shape
    cells = per_key.reshape(b, r, n_kv, n_heads // n_kv).sum(-1)  # [b, R, KV]
    if plan.units is not None:
        cells = cells[:, :, plan.units]
    return cells if by_position else cells[:, 0]


def _qk_reduce(dz: torch.Tensor, grad_z: torch.Tensor, plan: ComponentPlan,
               positions: list[int] | None, by_position: bool, n_kv: int) -> torch.Tensor:
    """Cells of the QK-fixed estimate: ``(z' - z) . d metric / d z`` (the pattern exact, the
    rest linear), summed over the cell's query rows (a key: every query position and every
    query head that reads it)."""
    if plan.component == "attn_head_q":
        return _reduce(dz[:, 0] * grad_z, plan, positions, by_position)
    per_run = (dz * grad_z[:, None]).sum(-1).sum(2)  # [b, R, H]: over queries and d_head
    return _key_cells(per_run, plan, by_position, n_kv)


def _strides(shape: tuple[int, ...]) -> list[int]:
    out, step = [], 1
    for n in reversed(shape):
        out.append(step)
        step *= n
    return out[::-1]


def _check_star(model: HookedModel, plan: ComponentPlan) -> None:
    """AtP*'s applicability, before any forward pass."""
    if plan.component not in QK_COMPONENTS and any(s.name.endswith(QK_SITES)
                                                   for s in plan.sites):
        raise InvalidArgumentError(
            f"method='atp*' applies its QK fix to the per-layer components attn_head_q and "
            f"attn_head_k, not to the single site {plan.component!r}; use component="
            f"'attn_head_q'/'attn_head_k' with layers=, or method='atp'")
    if model.n_layers < 2:
        raise InvalidArgumentError(
            f"method='atp*' needs at least 2 layers: GradDrop averages over the L - 1 layers "
            f"whose gradient it drops (this model has {model.n_layers}); use method='atp'")

"""SAE feature patching: which sparse-autoencoder features carry a behaviour?

Activation patching asks which *sites* carry the information that distinguishes a clean from
a corrupted prompt; SAE feature patching asks the same of the features of a sparse autoencoder
(:mod:`causalpatch.sae`) at one site. For a feature cell (features ``F`` at positions ``P``) the
base run's features are replaced by the source run's, and the base run's **error term** is kept::

    x'[p] = decode(f'[p]) + error_base[p],   f'[p, j] = f_src[p, j] for j in F, f_base elsewhere
          = x_base[p] + decode(f'[p]) - decode(f_base[p])

so a cell whose features agree in both runs is an exact no-op, and the effect is exactly that of
those features (nothing else changes). The effect is normalised as everywhere::

    effect = (metric(patched) - metric(base)) / (metric(source) - metric(base))

Exact and fast: the replacement vector of every row is computed up front, so the sweep runs on
the staircase engine (:mod:`causalpatch.engine`) like any site patch — rows batched, the prefix
the two prompts share computed once, only the SAE's layer onward recomputed, and rows whose
features do not differ skipped outright. ``engine="naive"`` runs one full forward per row.

:func:`sae_attribution` estimates every feature's effect to first order from one forward
(base and source prompts batched together) and one backward pass that stops at the SAE's site
(the gradient with respect to the features, through the decoder, at the base run, error held
fixed)::

    estimate[p, j] = (f_src[p, j] - f_base[p, j]) * d metric / d f[p, j]

with ``verify_top_k`` re-running the largest estimates exactly.

Both report, in ``extra["reference"]``, the effect of patching the whole site (plain activation
patching at the same positions), of all features at once (error from the base run) and of the
error term alone, so one can say how much of the site's effect the SAE's features explain.

Example::

    from causalpatch import InterpretableModel, sae_patching
    from causalpatch.sae import load_sae
    model = InterpretableModel("smollm2")
    sae = load_sae("tests/data/saes/smollm2-blocks.20.resid_post-topk-2048")
    result = sae_patching(model, sae,
                          "When Mary and John went to the store, John gave a drink to",
                          "When Mary and John went to the store, Mary gave a drink to",
                          positions=[-1], correct=" Mary", incorrect=" John")
    result.top_components(5)          # [(feature, effect), ...]
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..assemble import GroupValues, PairValues, Scale, build_result, run_pairs
from ..engine import last_logits, patched_logits, run_base_and_source
from ..enums import Direction, Engine, parse
from ..errors import InvalidArgumentError, InvalidTypeError, NonFiniteError
from ..executors import resolve_executor
from ..hooks import Hook
from ..metrics import Metric, normalize as normalize_metric
from ..plan import (Pair, Patch, SitePatch, check_answers, check_int, choose_metric,
                    engine_choice, make_pairs, metric_inputs, pair_positions, resolve_answers)
from ..sae import BoundSAE, bind_sae

if TYPE_CHECKING:
    from ..model import HookedModel
    from ..result import PatchingResult

#: Pairs per forward/backward batch of :func:`sae_attribution` when ``batch_size`` is not given.
DEFAULT_PAIRS_PER_BATCH = 8
#: Reference rows (per position group): the whole site, all features, the error term alone.
REFERENCES = ("site", "all_features", "error")
_DECODE_ROWS = 2048


@dataclass(frozen=True)
class _Cell:
    """Features patched together, at the positions of one position group."""

    features: tuple[int, ...]
    group: int


def _feature_cells(bound: BoundSAE, features: Any) -> list[tuple[int, ...]]:
    """``"all"``, a list of ints (one cell each) or a list of lists (one cell per list)."""
    if isinstance(features, str):
        if features != "all":
            raise InvalidArgumentError(
                f"features must be 'all', a list of feature indices or a list of lists, got "
                f"{features!r}")
        return [(j,) for j in range(bound.d_sae)]
    if isinstance(features, int) and not isinstance(features, bool):
        features = [features]
    if isinstance(features, torch.Tensor):
        features = features.tolist()
    if isinstance(features, range):
        features = list(features)
    if not isinstance(features, (list, tuple)) or not features:
        raise InvalidTypeError(f"features must be 'all', a non-empty list of feature indices or "
                               f"a list of lists, got {features!r}")
    cells = []
    for item in features:
        group = list(item) if isinstance(item, (list, tuple, range)) else [item]
        if not group:
            raise InvalidArgumentError("features contains an empty group")
        cells.append(tuple(bound.check_features(group, "features")))
    return cells


def _position_groups(positions: list[int] | None, length: int, by_position: bool
                     ) -> list[tuple[int, ...]]:
    pos = list(range(length)) if positions is None else positions
    return [(p,) for p in pos] if by_position else [tuple(pos)]


def _label(features: tuple[int, ...]) -> int | str:
    return features[0] if len(features) == 1 else "+".join(map(str, features))


# -- one pair's feature activations -------------------------------------------------------------
@dataclass
class _PairFeatures:
    """A pair's base and source activations at the SAE's site, with their features."""

    x_base: torch.Tensor  # [T, *feat]
    x_src: torch.Tensor
    f_base: torch.Tensor  # [T, d_sae]
    f_src: torch.Tensor
    recon_base: torch.Tensor  # [T, *feat]
    recon_src: torch.Tensor

    @classmethod
    def of(cls, bound: BoundSAE, x_base: torch.Tensor, x_src: torch.Tensor) -> _PairFeatures:
        with torch.no_grad():
            f_base, f_src = bound.encode(x_base), bound.encode(x_src)
            return cls(x_base, x_src, f_base, f_src, bound.decode(f_base), bound.decode(f_src))


def _feature_patches(bound: BoundSAE, pf: _PairFeatures, cells: Sequence[_Cell],
                     groups: Sequence[tuple[int, ...]]) -> list[Patch]:
    """The patch of every feature cell: replacement vectors at the positions where the cell's
    features differ between the runs (no entries, hence an exact no-op, where none does)."""
    site = bound.site
    differ = (pf.f_src != pf.f_base).tolist()  # [T][d_sae]
    entries: list[tuple[int, int, tuple[int, ...]]] = []  # (row, position, features)
    for r, cell in enumerate(cells):
        for p in groups[cell.group]:
            if any(differ[p][j] for j in cell.features):
                entries.append((r, p, cell.features))
    values: list[torch.Tensor] = []
    with torch.no_grad():
        for lo in range(0, len(entries), _DECODE_ROWS):
            part = entries[lo : lo + _DECODE_ROWS]
            pos = torch.tensor([p for _, p, _ in part])
            f = pf.f_base[pos].clone()  # [n, d_sae]
            for i, (_, p, feats) in enumerate(part):
                idx = torch.tensor(feats)
                f[i, idx] = pf.f_src[p, idx]
            delta = bound.decode(f).float() - pf.recon_base[pos].float()
            values.append((pf.x_base[pos].float() + delta).to(pf.x_base.dtype))
    flat = torch.cat(values) if values else None
    by_row: dict[int, list[int]] = {}
    for i, (r, _, _) in enumerate(entries):
        by_row.setdefault(r, []).append(i)
    patches: list[Patch] = []
    for r in range(len(cells)):
        idx = by_row.get(r)
        if not idx:
            patches.append(())
            continue
        assert flat is not None
        positions = tuple(entries[i][1] for i in idx)
        patches.append((SitePatch(site, positions, None, flat[torch.tensor(idx)]),))
    return patches


def _reference_patches(bound: BoundSAE, pf: _PairFeatures,
                       groups: Sequence[tuple[int, ...]]) -> list[Patch]:
    """Per position group: the whole site (source values), all features (error from the base
    run) and the error term alone (features from the base run)."""
    site = bound.site
    out: list[Patch] = []
    for g in groups:
        pos = torch.tensor(g)
        base = pf.x_base[pos].float()
        all_features = base + (pf.recon_src[pos].float() - pf.recon_base[pos].float())
        error = base + ((pf.x_src[pos].float() - pf.recon_src[pos].float())
                        - (pf.x_base[pos].float() - pf.recon_base[pos].float()))
        dtype = pf.x_base.dtype
        out += [(SitePatch(site, g),), (SitePatch(site, g, None, all_features.to(dtype)),),
                (SitePatch(site, g, None, error.to(dtype)),)]
    return out


def _exact_evaluator(model: HookedModel, bound: BoundSAE, pairs: Sequence[Pair],
                     cells: Sequence[_Cell], groups_of: Sequence[list[tuple[int, ...]]],
                     metric: Metric, direction: Direction, engine: Engine,
                     batch_size: int | None, memory_mb: float, stats: dict[str, Any],
                     references: bool) -> Callable[..., GroupValues]:
    """An :class:`~causalpatch.assemble.Evaluator` over ``cells`` (then, with ``references``,
    :data:`REFERENCES` for every position group), one pair per group."""
    site = bound.site
    probe: list[Patch] = [(SitePatch(site, (0,)),)]
    cache: dict[int, tuple[Any, _PairFeatures]] = {}

    def evaluate(group: list[int], todo: list[int], tick: Callable[[int], None] | None
                 ) -> GroupValues:
        (i,) = group
        pair = pairs[i]
        base_ids, source_ids = pair.runs(direction is Direction.DENOISE)
        if i not in cache:
            cache.clear()
            run = run_base_and_source(model, base_ids, source_ids, [site], probe, engine)
            pf = _PairFeatures.of(bound, run.base.acts[site.name][0],
                                  run.source.acts[site.name][0])
            cache[i] = (run, pf)
        run, pf = cache[i]
        inputs = metric_inputs(metric, [pair.correct], [pair.incorrect],
                               run.source_last.unsqueeze(0))
        ends = metric(torch.stack([run.base_last, run.source_last]), inputs.expand(2))
        values = torch.empty(1, len(todo))
        if todo:
            n_cells = len(cells)
            feature_rows = [c for c in todo if c < n_cells]
            patches = dict(zip(feature_rows, _feature_patches(
                bound, pf, [cells[c] for c in feature_rows], groups_of[i])))
            if references and any(c >= n_cells for c in todo):
                refs = _reference_patches(bound, pf, groups_of[i])
                patches.update({n_cells + r: p for r, p in enumerate(refs)})
            noop = [j for j, c in enumerate(todo) if not patches[c]]
            stats["noop_cells"] = stats.get("noop_cells", 0) + len(noop)
            # The fast engine would return the base logits for an empty patch; give such cells
            # the base metric directly instead of materialising [cells, vocab] logits for them.
            # The naive reference still runs one forward per row.
            run_rows = list(range(len(todo))) if engine is Engine.NAIVE else [
                j for j, c in enumerate(todo) if patches[todo[j]]]
            values[0] = ends[0]
            if run_rows:
                logits = patched_logits(model, run, [patches[todo[j]] for j in run_rows], engine,
                                        batch_size, memory_mb, tick, stats)
                values[0, run_rows] = metric(logits, inputs.expand(len(run_rows))).float()
            if engine is Engine.FAST:
                stats["skipped"] = stats.get("skipped", 0) + len(noop)
                if tick is not None and noop:
                    tick(len(noop))
        return GroupValues(ends[:1], ends[1:], values)

    return evaluate


def _split_references(values: PairValues, n_cells: int, n_groups: int, metric: Metric,
                      normalize: bool, groups: Sequence[tuple[int, ...]]
                      ) -> tuple[PairValues, dict[str, Any]]:
    """Take the reference columns off ``values``; their effects aggregated by the one rule."""
    ref = values.raw[:, n_cells:]
    cells = PairValues(values.raw[:, :n_cells], values.base, values.source, values.stats,
                       values.seconds)
    if ref.shape[1] == 0:
        return cells, {}
    assert values.source is not None
    if normalize:
        effect = normalize_metric(ref.mean(0), values.base.mean(), values.source.mean(),
                                  metric.name)
    else:
        effect = ref.mean(0)
    effect = effect.reshape(n_groups, len(REFERENCES))
    out: dict[str, Any] = {"positions": [list(g) for g in groups]}
    for k, name in enumerate(REFERENCES):
        out[name] = effect[:, k].tolist()
    return cells, out


# -- the attribution pass -------------------------------------------------------------------------
def _attribution_batch(model: HookedModel, bound: BoundSAE, metric: Metric,
                       pairs: Sequence[Pair], base_ids: torch.Tensor, source_ids: torch.Tensor,
                       timings: dict[str, float]) -> dict[str, torch.Tensor]:
    """First-order estimates for a batch of equal-length pairs (``ids`` ``[b, T]``).

    The base and the source prompts run as one batch of ``2b`` rows (one pass over the
    weights, which is what a short prompt's forward costs on a CPU); only the base rows get the
    zero deltas whose gradients are ``d metric / d f`` and ``d metric / d x``, and the backward
    pass stops at the SAE's site.

    Returns ``features [b, T, d_sae]`` (``(f_src - f_base) * dm/df``), ``error [b, T]`` and
    ``site [b, T]`` (the same for the error term and the whole activation), ``base [b]`` and
    ``source [b]`` metric values.
    """
    site = bound.site
    b = base_ids.shape[0]
    t0 = time.perf_counter()
    state: dict[str, torch.Tensor] = {}

    def attach(act: torch.Tensor) -> torch.Tensor:
        base, source = act[:b], act[b:]
        with torch.no_grad():
            f = bound.encode(base.detach())
            recon = bound.decode(f)
        d_f = torch.zeros_like(f, requires_grad=True)
        d_x = torch.zeros_like(base, requires_grad=True)
        state.update(x=base.detach().clone(), x_src=source.detach().clone(), f=f, recon=recon,
                     d_f=d_f, d_x=d_x)
        # decode(f + 0) - decode(f) is exactly 0: the run is unchanged, but now depends on f
        new_base = base + d_x + (bound.decode(f + d_f) - recon).to(act.dtype)
        return torch.cat([new_base, source])

    with torch.enable_grad():
        last = last_logits(model, torch.cat([base_ids, source_ids]), [Hook(site, attach)])
        source_last = last[b:].detach().float()
        inputs = metric_inputs(metric, [p.correct for p in pairs], [p.incorrect for p in pairs],
                               source_last)
        base_values = metric(last[:b], inputs)
        t1 = time.perf_counter()
        if "d_f" not in state:
            raise InvalidArgumentError(f"{site.name} was not reached in the forward pass")
        if not base_values.requires_grad:
            raise InvalidArgumentError(
                f"metric {metric.name!r} does not depend differentiably on the logits; "
                "sae_attribution needs a differentiable metric (use sae_patching)")
        grad_f, grad_x = torch.autograd.grad(base_values.sum(), [state["d_f"], state["d_x"]],
                                             allow_unused=True)
    t2 = time.perf_counter()
    with torch.no_grad():
        grad_f = torch.zeros_like(state["f"]) if grad_f is None else grad_f
        grad_x = torch.zeros_like(state["x"]) if grad_x is None else grad_x
        if not (torch.isfinite(grad_f).all() and torch.isfinite(grad_x).all()):
            raise NonFiniteError(
                f"the gradient of metric {metric.name!r} at {site.name} is not finite; use a "
                "score metric or sae_patching")
        x_src = state["x_src"]
        f_src = bound.encode(x_src)
        recon_src = bound.decode(f_src)
        x_base, f_base, recon_base = state["x"], state["f"], state["recon"]
        dims = tuple(range(2, x_base.dim()))
        err_diff = (x_src.float() - recon_src.float()) - (x_base.float() - recon_base.float())
        out = {
            "features": (f_src.float() - f_base.float()) * grad_f.float(),
            "error": (err_diff * grad_x.float()).sum(dims),
            "site": ((x_src.float() - x_base.float()) * grad_x.float()).sum(dims),
            "base": base_values.detach().float(),
            "source": metric(source_last, inputs).float(),
        }
    timings["forward_s"] = timings.get("forward_s", 0.0) + (t1 - t0)
    timings["backward_s"] = timings.get("backward_s", 0.0) + (t2 - t1)
    return out


def _reduce(values: torch.Tensor, groups: Sequence[tuple[int, ...]]) -> torch.Tensor:
    """``[b, T, ...] -> [b, n_groups, ...]``: the sum over each group's positions."""
    return torch.stack([values[:, list(g)].sum(1) for g in groups], dim=1)


@dataclass
class _Estimates:
    """Per pair: feature estimates ``[n, n_groups, d_sae]``, error/site ``[n, n_groups]``,
    base/source metric ``[n]`` (raw metric units)."""

    features: torch.Tensor
    error: torch.Tensor
    site: torch.Tensor
    base: torch.Tensor
    source: torch.Tensor


def _estimate(model: HookedModel, bound: BoundSAE, metric: Metric, pairs: Sequence[Pair],
              groups_of: Sequence[list[tuple[int, ...]]], direction: Direction,
              batch_size: int | None, timings: dict[str, float]) -> _Estimates:
    n, n_groups = len(pairs), len(groups_of[0])
    out = _Estimates(torch.empty(n, n_groups, bound.d_sae), torch.empty(n, n_groups),
                     torch.empty(n, n_groups), torch.empty(n), torch.empty(n))
    batches: dict[tuple[int, tuple[tuple[int, ...], ...]], list[int]] = {}
    for i, pair in enumerate(pairs):
        batches.setdefault((len(pair.clean), tuple(groups_of[i])), []).append(i)
    per_batch = batch_size or DEFAULT_PAIRS_PER_BATCH
    denoise = direction is Direction.DENOISE
    for (_, groups), idx in batches.items():
        for lo in range(0, len(idx), per_batch):
            chunk = idx[lo : lo + per_batch]
            runs = [pairs[i].runs(denoise) for i in chunk]
            base_ids = torch.tensor([b for b, _ in runs], device=model.device)
            src_ids = torch.tensor([s for _, s in runs], device=model.device)
            est = _attribution_batch(model, bound, metric, [pairs[i] for i in chunk],
                                     base_ids, src_ids, timings)
            rows = torch.tensor(chunk)
            out.features[rows] = _reduce(est["features"], groups).cpu()
            out.error[rows] = _reduce(est["error"], groups).cpu()
            out.site[rows] = _reduce(est["site"], groups).cpu()
            out.base[rows] = est["base"].cpu()
            out.source[rows] = est["source"].cpu()
    return out


# -- shared argument handling ---------------------------------------------------------------------
@dataclass
class _Setup:
    bound: BoundSAE
    pairs: list[Pair]
    metric: Metric
    direction: Direction
    positions_of: list[list[int] | None]
    groups_of: list[list[tuple[int, ...]]]
    feature_cells: list[tuple[int, ...]]


def _setup(model: HookedModel, sae: Any, clean: Any, corrupted: Any, metric: Any,
           metric_kwargs: Mapping[str, Any] | None, correct: Any, incorrect: Any,
           features: Any, positions: Any, by_position: bool, direction: Any) -> _Setup:
    """Validate everything (before any forward pass)."""
    direction_ = parse(Direction, direction, "direction")
    bound = bind_sae(model, sae)
    correct, incorrect = resolve_answers(metric_kwargs, correct, incorrect)
    pairs = make_pairs(model, clean, corrupted, correct, incorrect)
    m = choose_metric(metric, pairs, clean if corrupted is None else None)
    check_answers(m, pairs)
    positions_of = pair_positions(pairs, positions, by_position)
    groups_of = [_position_groups(pos, len(p.clean), by_position)
                 for p, pos in zip(pairs, positions_of)]
    cells = _feature_cells(bound, features)
    return _Setup(bound, pairs, m, direction_, positions_of, groups_of, cells)


def _axes(model: HookedModel, setup: _Setup, cells: Sequence[tuple[int, ...]],
          by_position: bool) -> tuple[tuple[str, ...], dict[str, list[Any]], tuple[int, ...]]:
    labels: dict[str, list[Any]] = {"feature": [_label(c) for c in cells]}
    if not by_position:
        return ("feature",), labels, (len(cells),)
    toks = model.to_str_tokens(list(setup.pairs[0].clean))
    groups = setup.groups_of[0]
    labels["position"] = [f"{g[0]}: {toks[g[0]]!r}" for g in groups]
    return ("position", "feature"), labels, (len(groups), len(cells))


def _sae_extra(bound: BoundSAE) -> dict[str, Any]:
    sae = bound.sae
    return {"site": bound.site.name, "d_sae": bound.d_sae,
            "architecture": getattr(sae, "architecture", type(sae).__name__),
            "hook_name": getattr(sae, "hook_name", None),
            "model_name": getattr(sae, "model_name", None)}


def _cell_sums(values: torch.Tensor, cells: Sequence[tuple[int, ...]]) -> torch.Tensor:
    """``[..., d_sae] -> [..., n_cells]``: the sum over each cell's features."""
    if all(len(c) == 1 for c in cells):
        return values[..., torch.tensor([c[0] for c in cells])]
    return torch.stack([values[..., list(c)].sum(-1) for c in cells], dim=-1)


def _top_features(est: _Estimates, candidates: Sequence[tuple[int, ...]], k: int
                  ) -> list[tuple[int, ...]]:
    """The ``k`` candidate cells with the largest |mean estimate| (max over position groups)."""
    mean = est.features.mean(0, keepdim=True)  # [1, n_groups, d_sae]
    score = _cell_sums(mean, candidates)[0].abs().amax(0)
    order = torch.argsort(score, descending=True, stable=True)[:k].tolist()
    return [candidates[i] for i in order]


# -- the methods ------------------------------------------------------------------------------------
def sae_patching(
    model: HookedModel,
    sae: Any,
    clean: Any,
    corrupted: Any = None,
    metric: str | Metric | Callable[..., Any] | None = None,
    metric_kwargs: Mapping[str, Any] | None = None,
    *,
    correct: Any = None,
    incorrect: Any = None,
    features: Any = "all",
    top_k: int | None = None,
    positions: Sequence[int] | int | None = None,
    by_position: bool = False,
    direction: str | Direction = "denoise",
    engine: str | Engine = "fast",
    batch_size: int | None = None,
    memory_mb: float = 1024.0,
    normalize: bool = True,
    references: bool = True,
    progress: bool | Callable[[int, int], None] | None = None,
    executor: Any = None,
) -> PatchingResult:
    """Patch SAE features one cell at a time (error term from the base run); exact.

    Args:
        model: the model.
        sae: an SAE with a declared site (:class:`~causalpatch.sae.SparseAutoencoder`, a
            ``sae_lens.SAE``, or :func:`~causalpatch.sae.wrap_sae`).
        clean, corrupted: prompts (same token length pairwise) or a dataset as ``clean``.
        metric / metric_kwargs / correct / incorrect: as in
            :func:`causalpatch.activation_patching` (default: the dataset's, else
            ``logit_diff`` with answers, else ``l2``).
        features: ``"all"``, a list of feature indices (one cell each), or a list of lists
            (each list one cell, its features patched together).
        top_k: patch only the ``k`` cells (of ``features``) with the largest first-order
            estimates (:func:`sae_attribution`'s, computed first); recorded in
            ``extra["selected_by"]``.
        positions: patch only these positions (jointly, or one cell each with
            ``by_position``); negative positions count from each pair's end. Default: all.
        by_position: one cell per (position, feature cell).
        direction: ``"denoise"`` (source = clean, base = corrupted) or ``"noise"``.
        engine: ``"fast"`` (staircase) or ``"naive"`` (one forward per row); same numbers.
        batch_size: patch rows per staircase pass (default: from ``memory_mb``).
        normalize: False returns raw metric values.
        references: also patch, per position group, the whole site, all features and the
            error term alone (``extra["reference"]``: effects, same normalisation).
        progress: ``None`` (default: a bar with counts and ETA in a terminal or notebook once
            the sweep has run 2 s), ``True`` (a bar at once), ``False`` (silent) or a callback
            ``(done, total)``.
        executor: ``None`` (here), ``"ray"`` or a :class:`~causalpatch.executors.RayExecutor`:
            pairs are split into shards evaluated by Ray workers (the SAE travels with the
            plan; each worker loads the model from its specification).

    Returns:
        :class:`PatchingResult` (``method="sae_patching"``) with axes ``("feature",)`` or
        ``("position", "feature")``; feature labels are indices (``"3+17"`` for groups).
    """
    t0 = time.perf_counter()
    engine_ = engine_choice(engine)
    check_int(batch_size, "batch_size", 1, allow_none=True)
    check_int(top_k, "top_k", 1, allow_none=True)
    executor_ = resolve_executor(executor, model)
    setup = _setup(model, sae, clean, corrupted, metric, metric_kwargs, correct, incorrect,
                   features, positions, by_position, direction)
    bound, pairs, m = setup.bound, setup.pairs, setup.metric
    cells_f = setup.feature_cells
    timings: dict[str, float] = {}
    extra: dict[str, Any] = {"engine": engine_.value, "positions": setup.positions_of[0],
                             "sae": _sae_extra(bound), "selected_by": None}
    if top_k is not None:
        est = _estimate(model, bound, m, pairs, setup.groups_of, setup.direction, None, timings)
        cells_f = _top_features(est, cells_f, min(top_k, len(cells_f)))
        extra["selected_by"] = f"top {len(cells_f)} of {len(setup.feature_cells)} by |first-" \
                               "order estimate| (sae_attribution)"
    n_groups = len(setup.groups_of[0])
    cells = [_Cell(c, g) for g in range(n_groups) for c in cells_f]
    n_refs = len(REFERENCES) * n_groups if references else 0
    def build(model_: HookedModel, stats: dict[str, Any]) -> Callable[..., GroupValues]:
        return _exact_evaluator(model_, bound, pairs, cells, setup.groups_of, m,
                                setup.direction, engine_, batch_size, memory_mb, stats,
                                references)

    timings["setup_s"] = time.perf_counter() - t0
    values = run_pairs(model, pairs, len(cells) + n_refs, build=build, progress=progress,
                       label="SAE features", executor=executor_)
    values, reference = _split_references(values, len(cells), n_groups, m, normalize,
                                          setup.groups_of[0])
    extra["reference"] = reference
    axes, labels, shape = _axes(model, setup, cells_f, by_position)
    return build_result(
        model, values=values, scale=Scale.NORMALIZED if normalize else Scale.RAW, metric=m,
        axes=axes, labels=labels, shape=shape, component=bound.value_name("features"),
        method="sae_patching", direction=setup.direction,
        clean=[p.clean for p in pairs], corrupted=[p.corrupted for p in pairs],
        answers=[[p.correct, p.incorrect] for p in pairs], timings=timings, extra=extra,
        t_start=t0)


def sae_attribution(
    model: HookedModel,
    sae: Any,
    clean: Any,
    corrupted: Any = None,
    metric: str | Metric | Callable[..., Any] | None = None,
    metric_kwargs: Mapping[str, Any] | None = None,
    *,
    correct: Any = None,
    incorrect: Any = None,
    features: Any = "all",
    positions: Sequence[int] | int | None = None,
    by_position: bool = False,
    direction: str | Direction = "denoise",
    verify_top_k: int = 0,
    batch_size: int | None = None,
) -> PatchingResult:
    """First-order estimate of every SAE feature cell's patching effect, from one batched
    forward of the base and source prompts and one backward pass.

    ``estimate = sum over the cell's positions of (f_src - f_base) * d metric / d f`` at the
    base run, the gradient taken through the decoder with the error term held fixed, then
    normalised by ``metric(source) - metric(base)`` (mean over pairs, as every method).

    Args:
        model, sae, clean, corrupted, metric, metric_kwargs, correct, incorrect, features,
            positions, by_position, direction: as in :func:`sae_patching`.
        verify_top_k: re-run the ``k`` cells with the largest ``|estimate|`` exactly
            (:func:`sae_patching`'s engine); ``extra["verified"]`` lists ``{"index": [...],
            "cell": [...], "estimate": e, "exact": x}``.
        batch_size: pairs per forward/backward batch (pairs are grouped by token length).

    Returns:
        :class:`PatchingResult` (``method="sae_attribution"``), axes as in
        :func:`sae_patching`; ``extra["reference"]`` holds the estimates for the whole site
        and for the error term alone, per position group.
    """
    t0 = time.perf_counter()
    check_int(verify_top_k, "verify_top_k", 0)
    check_int(batch_size, "batch_size", 1, allow_none=True)
    setup = _setup(model, sae, clean, corrupted, metric, metric_kwargs, correct, incorrect,
                   features, positions, by_position, direction)
    bound, pairs, m = setup.bound, setup.pairs, setup.metric
    timings: dict[str, float] = {"setup_s": time.perf_counter() - t0}
    t1 = time.perf_counter()
    est = _estimate(model, bound, m, pairs, setup.groups_of, setup.direction, batch_size,
                    timings)
    timings["attribution_s"] = time.perf_counter() - t1
    cells_f = setup.feature_cells
    per_cell = _cell_sums(est.features, cells_f)
    raw = est.base[:, None] + per_cell.flatten(1)  # patched ~= base + estimate
    values = PairValues(raw, est.base, est.source)
    mean_base, mean_source = est.base.mean(), est.source.mean()
    reference = {"positions": [list(g) for g in setup.groups_of[0]],
                 "site": normalize_metric(mean_base + est.site.mean(0), mean_base,
                                          mean_source, m.name).tolist(),
                 "error": normalize_metric(mean_base + est.error.mean(0), mean_base,
                                           mean_source, m.name).tolist()}
    axes, labels, shape = _axes(model, setup, cells_f, by_position)
    verified: list[dict[str, Any]] = []
    t2 = time.perf_counter()
    if verify_top_k > 0:
        effect = normalize_metric(raw.mean(0), mean_base, mean_source, m.name)
        k = min(verify_top_k, effect.numel())
        order = torch.argsort(effect.abs(), descending=True, stable=True)[:k].tolist()
        n_f = len(cells_f)
        cells = [_Cell(cells_f[flat % n_f], flat // n_f) for flat in order]
        evaluate = _exact_evaluator(model, bound, pairs, cells, setup.groups_of, m,
                                    setup.direction, Engine.FAST, None, 1024.0, {}, False)
        exact_values = run_pairs(model, pairs, k, evaluate)
        exact = normalize_metric(exact_values.raw.mean(0), exact_values.base.mean(),
                                 exact_values.source.mean(), m.name)
        for j, flat in enumerate(order):
            coords = [int(c) for c in torch.unravel_index(torch.tensor(flat), shape)]
            index = [setup.groups_of[0][c][0] if a == "position" else labels[a][c]
                     for a, c in zip(axes, coords)]
            verified.append({"index": index, "cell": coords, "estimate": float(effect[flat]),
                             "exact": float(exact[j])})
    timings["verify_s"] = time.perf_counter() - t2
    return build_result(
        model, values=values, scale=Scale.NORMALIZED, metric=m, axes=axes, labels=labels,
        shape=shape, component=bound.value_name("features"), method="sae_attribution",
        direction=setup.direction, clean=[p.clean for p in pairs],
        corrupted=[p.corrupted for p in pairs],
        answers=[[p.correct, p.incorrect] for p in pairs], timings=timings,
        extra={"estimate": "first-order (gradient at the base run, error term held fixed)",
               "positions": setup.positions_of[0], "sae": _sae_extra(bound),
               "reference": reference, "verified": verified}, t_start=t0)


__all__ = ["sae_attribution", "sae_patching"]

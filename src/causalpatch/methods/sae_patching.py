"""SAE feature patching: which sparse-autoencoder features carry a behaviour?

Activation patching asks which *sites* carry the information that distinguishes a clean from
a corrupted prompt; SAE feature patching asks the same of the features of a sparse autoencoder
(:mod:`causalpatch.sae`) at one site. For a feature cell (features ``F`` at positions ``P``) the
base run's features are replaced by the source run's, and the base run's **error term** is kept::

    x'[p] = decode(f'[p]) + error_base[p],   f'[p, j] = f_src[p, j] for j in F, f_base elsewhere
          = x_base[p] + decode(f'[p]) - decode(f_base[p])

so a cell whose features agree in both runs is an exact no-op, and the effect is exactly that of
those features (nothing else changes). The effect is normalised as everywhere (the one
aggregation rule of :mod:`causalpatch.assemble`)::

    effect = (metric(patched) - metric(base)) / (metric(source) - metric(base))

Exact and fast: the replacement vector of every row is made from the pair's runs (a
:data:`~causalpatch.assemble.PatchMaker`), so the sweep runs on the shared pair evaluator
(:func:`~causalpatch.assemble.pair_evaluator`) like any site patch — pairs of one token length
share staircase batches, the prefix the two prompts share is computed once, only the SAE's
layer onward is recomputed, rows whose features do not differ are skipped outright (exact
no-ops), and only the answer columns are unembedded when the metric reads nothing else.
``engine="naive"`` runs one full forward per row.

:func:`sae_attribution` estimates every feature's effect to first order from the one gradient
pass of every first-order method (:func:`~causalpatch.engine.gradient_pass`: a source forward,
a base forward and one backward pass that stops at the SAE's site; the gradient is taken with
respect to the features, through the decoder, at the base run, error held fixed)::

    estimate[p, j] = (f_src[p, j] - f_base[p, j]) * d metric / d f[p, j]

with ``verify_top_k`` re-running the largest estimates exactly
(:func:`~causalpatch.options.verify_top_k`).

Both report, in ``extra["reference"]``, the effect of patching the whole site (plain activation
patching at the same positions), of all features at once (error from the base run; exact method
only) and of the error term alone, so one can say how much of the site's effect the SAE's
features explain. Both take the run options every method shares (:mod:`causalpatch.options`:
``progress``, ``executor``, ``batch_size``, ``memory_mb``, ``checkpoint``, ``threads``).

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

import hashlib
import json
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..assemble import (GroupValues, PairValues, Scale, aggregate, build_result, length_groups,
                        pair_evaluator)
from ..engine import gradient_pass
from ..enums import Direction, Engine
from ..errors import InvalidArgumentError, InvalidTypeError
from ..metrics import Metric
from ..options import DEFAULT_MEMORY_MB, PreparedPairs, Progress, RunOptions, prepare_pairs
from ..options import verify_top_k as exact_top_k
from ..plan import Patch, SitePatch, check_int, engine_choice, metric_inputs, pair_positions
from ..sae import BoundSAE, bind_sae

if TYPE_CHECKING:
    from ..engine import Gradients, PairRun
    from ..model import HookedModel
    from ..names import Site
    from ..result import PatchingResult

#: Pairs per forward/backward batch of :func:`sae_attribution` when ``batch_size`` is not given.
DEFAULT_PAIRS_PER_BATCH = 8
#: Reference rows (per position group): the whole site, all features, the error term alone.
REFERENCES = ("site", "all_features", "error")
#: Reference estimates of :func:`sae_attribution` (per position group).
ESTIMATE_REFERENCES = ("site", "error")
_DECODE_ROWS = 2048
_SAMPLE = 4096  # weight entries per tensor in an SAE's fingerprint



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
        mine = by_row.get(r)
        if not mine:
            patches.append(())
            continue
        assert flat is not None
        positions = tuple(entries[i][1] for i in mine)
        patches.append((SitePatch(site, positions, None, flat[torch.tensor(mine)]),))
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


class _FeaturePatches:
    """The :data:`~causalpatch.assemble.PatchMaker` of a feature sweep: ``(pair index, its
    runs, cells) -> one patch per cell``, made from the runs' activations at the SAE's site.

    Cells ``0 .. len(cells) - 1`` are the feature cells; with ``references``, cell
    ``len(cells) + 3 g + k`` is reference ``k`` (:data:`REFERENCES`) of position group ``g``.
    A pair's :class:`_PairFeatures` are computed once per run object (dropped with it). Empty
    patches (features that agree in both runs) are exact no-ops: the engine gives them the base
    logits without computing them; ``stats["noop_cells"]`` counts them.
    """

    def __init__(self, bound: BoundSAE, cells: Sequence[_Cell],
                 groups_of: Sequence[list[tuple[int, ...]]], references: bool,
                 stats: dict[str, Any] | None = None) -> None:
        self.bound = bound
        self.cells = list(cells)
        self.groups_of = groups_of
        self.references = references
        self.stats = stats
        self._memo: dict[int, _PairFeatures] = {}

    def __getstate__(self) -> dict[str, Any]:  # shipped to executor workers without the memo
        return {**self.__dict__, "_memo": {}}

    def features(self, run: PairRun) -> _PairFeatures:
        """The pair's features, memoised per run object."""
        key = id(run)
        pf = self._memo.get(key)
        if pf is None:
            name = self.bound.site.name
            pf = _PairFeatures.of(self.bound, run.base.acts[name][0], run.source.acts[name][0])
            self._memo[key] = pf
            weakref.finalize(run, self._memo.pop, key, None)
        return pf

    def __call__(self, i: int, run: PairRun, todo: list[int]) -> list[Patch]:
        pf = self.features(run)
        n = len(self.cells)
        rows = [c for c in todo if c < n]
        made: dict[int, Patch] = dict(zip(rows, _feature_patches(
            self.bound, pf, [self.cells[c] for c in rows], self.groups_of[i])))
        if self.references and len(rows) < len(todo):
            refs = _reference_patches(self.bound, pf, self.groups_of[i])
            made.update({n + r: p for r, p in enumerate(refs)})
        if self.stats is not None:
            self.stats["noop_cells"] = (self.stats.get("noop_cells", 0)
                                        + sum(1 for c in rows if not made[c]))
        return [made[c] for c in todo]


def _split(values: PairValues, n_cells: int) -> tuple[PairValues, PairValues]:
    """``values`` cut into the first ``n_cells`` cells and the rest (the references)."""
    head = PairValues(values.raw[:, :n_cells], values.base, values.source, values.stats,
                      values.seconds, values.payloads)
    tail = PairValues(values.raw[:, n_cells:], values.base, values.source)
    return head, tail


def _references(values: PairValues, names: Sequence[str], scale: Scale, metric: Metric,
                groups: Sequence[tuple[int, ...]]) -> dict[str, Any]:
    """The reference cells' effects by the one aggregation rule: ``{"positions": [...], name:
    [one per position group]}``; ``values`` holds, per position group, one cell per name."""
    if values.raw.shape[1] == 0:
        return {}
    effect = aggregate(values, scale, metric).effect.reshape(len(groups), len(names))
    out: dict[str, Any] = {"positions": [list(g) for g in groups]}
    for k, name in enumerate(names):
        out[name] = effect[:, k].tolist()
    return out


# -- the attribution pass -------------------------------------------------------------------------
def _sae_leaf(bound: BoundSAE) -> Callable[[Site, torch.Tensor],
                                           tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """The :data:`~causalpatch.engine.Leaf` of SAE attribution: ``act + d_x + (decode(f + d_f)
    - decode(f))`` with ``f = encode(act)`` and zero leaves ``{"features": d_f, "act": d_x}``.

    ``decode(f + 0) - decode(f)`` is exactly 0, so the run is unchanged, but it now depends on
    the features through the decoder, with the error term held fixed."""

    def leaf(site: Site, act: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.no_grad():
            f = bound.encode(act.detach())
            recon = bound.decode(f)
        d_f = torch.zeros_like(f, requires_grad=True)
        d_x = torch.zeros_like(act, requires_grad=True)
        new = act + d_x + (bound.decode(f + d_f) - recon).to(act.dtype)
        return new, {"features": d_f, "act": d_x}

    return leaf


def _reduce(values: torch.Tensor, groups: Sequence[tuple[int, ...]]) -> torch.Tensor:
    """``[b, T, ...] -> [b, n_groups, ...]``: the sum over each group's positions."""
    return torch.stack([values[:, list(g)].sum(1) for g in groups], dim=1)


def _cell_sums(values: torch.Tensor, cells: Sequence[tuple[int, ...]]) -> torch.Tensor:
    """``[..., d_sae] -> [..., n_cells]``: the sum over each cell's features."""
    if all(len(c) == 1 for c in cells):
        return values[..., torch.tensor([c[0] for c in cells])]
    return torch.stack([values[..., list(c)].sum(-1) for c in cells], dim=-1)


def _estimates(bound: BoundSAE, grads: Gradients, groups: Sequence[tuple[int, ...]],
               cells: Sequence[tuple[int, ...]]) -> torch.Tensor:
    """First-order estimates of a batch of ``b`` pairs from their gradient pass, in raw metric
    units: ``[b, n_groups * n_cells + n_groups * 2]`` — every feature cell per position group
    (group-major: ``sum over the group's positions and the cell's features of (f_src - f_base)
    * dm/df``), then per position group the whole site (``(x_src - x_base) . dm/dx``) and the
    error term (``(err_src - err_base) . dm/dx``): :data:`ESTIMATE_REFERENCES`."""
    name = bound.site.name
    x_base, x_src = grads.base[name], grads.source[name]
    grad_f = grads.grads[name]["features"].float()
    grad_x = grads.grads[name]["act"].float()
    with torch.no_grad():
        f_base, f_src = bound.encode(x_base), bound.encode(x_src)
        recon_base, recon_src = bound.decode(f_base), bound.decode(f_src)
        dims = tuple(range(2, x_base.dim()))
        err_diff = (x_src.float() - recon_src.float()) - (x_base.float() - recon_base.float())
        features = (f_src.float() - f_base.float()) * grad_f  # [b, T, d_sae]
        error = (err_diff * grad_x).sum(dims)  # [b, T]
        site = ((x_src.float() - x_base.float()) * grad_x).sum(dims)
        per_cell = _cell_sums(_reduce(features, groups), cells)  # [b, n_groups, n_cells]
        refs = torch.stack([_reduce(site, groups), _reduce(error, groups)], dim=2)
        return torch.cat([per_cell.flatten(1), refs.flatten(1)], dim=1)


def _attribution_batches(setup: _Setup, per_batch: int) -> list[list[int]]:
    """Pairs of one token length and one set of position groups, ``per_batch`` at a time."""
    by_key: dict[tuple[int, tuple[tuple[int, ...], ...]], list[int]] = {}
    for i, pair in enumerate(setup.pairs):
        by_key.setdefault((len(pair.clean), tuple(setup.groups_of[i])), []).append(i)
    return [idx[lo : lo + per_batch] for idx in by_key.values()
            for lo in range(0, len(idx), per_batch)]


def _attribution_values(model: HookedModel, setup: _Setup, cells: Sequence[tuple[int, ...]],
                        options: RunOptions, checkpoint_args: dict[str, Any] | None = None
                        ) -> PairValues:
    """Every pair's first-order estimates of ``cells`` (and the site and error references),
    batches of pairs evaluated by ``options.run`` (here or on an executor, checkpointed when
    ``options.checkpoint``), as raw values ``patched ~= base + estimate``: cells laid out as
    :func:`_estimates` returns them."""
    # the factory travels to executor workers: it captures plain values, never the dataset
    bound, groups_of = setup.bound, setup.groups_of
    pairs, m, denoise = setup.prep.pairs, setup.prep.metric, setup.prep.denoise
    cells = list(cells)
    n_cells = len(groups_of[0]) * (len(cells) + len(ESTIMATE_REFERENCES))
    per_batch = options.batch_size or DEFAULT_PAIRS_PER_BATCH

    def build(model: HookedModel, stats: dict[str, Any]) -> Callable[..., GroupValues]:
        """The evaluator next to ``model`` (the driver's, or a worker's copy)."""
        leaf = _sae_leaf(bound)

        def evaluate(group: list[int], todo: list[int], tick: Callable[[int], None] | None
                     ) -> GroupValues:
            chunk = [pairs[i] for i in group]
            runs = [p.runs(denoise) for p in chunk]
            base_ids = torch.tensor([b for b, _ in runs], device=model.device)
            src_ids = torch.tensor([s for _, s in runs], device=model.device)

            def objective(logits: torch.Tensor, source_logits: torch.Tensor) -> torch.Tensor:
                return m(logits, metric_inputs(m, [p.correct for p in chunk],
                                               [p.incorrect for p in chunk], source_logits))

            grads = gradient_pass(model, base_ids, src_ids, [bound.site], objective, leaf=leaf,
                                  timings=stats, what="sae_attribution")
            est = _estimates(bound, grads, groups_of[group[0]], cells).cpu()
            base = grads.base_values.float().cpu()
            # an estimate is a first-order change: patched ~= base + estimate
            patched = base[:, None] + est
            if tick is not None:
                tick(len(group) * len(todo))
            return GroupValues(base, grads.source_values.float().cpu(), patched[:, todo])

        return evaluate

    return options.run(model, pairs, n_cells, build, groups=_attribution_batches(setup, per_batch),
                       label="SAE attribution", checkpoint_args=checkpoint_args, chunk=n_cells)


# -- shared argument handling ---------------------------------------------------------------------
@dataclass
class _Setup:
    bound: BoundSAE
    prep: PreparedPairs
    positions_of: list[list[int] | None]
    groups_of: list[list[tuple[int, ...]]]
    feature_cells: list[tuple[int, ...]]

    @property
    def pairs(self) -> list[Any]:
        return self.prep.pairs

    @property
    def metric(self) -> Metric:
        return self.prep.metric


def _setup(model: HookedModel, sae: Any, clean: Any, corrupted: Any, metric: Any,
           metric_kwargs: Mapping[str, Any] | None, correct: Any, incorrect: Any,
           features: Any, positions: Any, by_position: bool, direction: Any) -> _Setup:
    """Validate everything (before any forward pass)."""
    bound = bind_sae(model, sae)
    prep = prepare_pairs(model, clean, corrupted, metric, metric_kwargs, correct, incorrect,
                         direction)
    positions_of = pair_positions(prep.pairs, positions, by_position)
    groups_of = [_position_groups(pos, len(p.clean), by_position)
                 for p, pos in zip(prep.pairs, positions_of)]
    cells = _feature_cells(bound, features)
    return _Setup(bound, prep, positions_of, groups_of, cells)


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


def _sae_tensors(sae: Any) -> list[tuple[str, torch.Tensor]]:
    """The SAE's weights: a module's state dict (also of the object a wrapper holds), else
    its ``W_enc``/``b_enc``/``W_dec``/``b_dec``/``threshold`` attributes."""
    for obj in (sae, getattr(sae, "sae", None)):
        if isinstance(obj, torch.nn.Module):
            return sorted(obj.state_dict().items())
    for obj in (sae, getattr(sae, "sae", None)):
        found = [(n, getattr(obj, n)) for n in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")
                 if isinstance(getattr(obj, n, None), torch.Tensor)]
        if found:
            return found
    return []


def _sae_identity(bound: BoundSAE) -> dict[str, Any]:
    """What identifies the SAE in a checkpoint: site, widths, config and a cheap fingerprint of
    its weights (a strided sample of every tensor; for an SAE without visible tensors, its
    decoding of a strided set of single features, rounded)."""
    sae = bound.sae
    config = sae.config() if callable(getattr(sae, "config", None)) else None
    if config is None and callable(getattr(getattr(sae, "cfg", None), "to_dict", None)):
        config = sae.cfg.to_dict()
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    tensors = _sae_tensors(sae)
    for name, t in tensors:
        flat = t.detach().flatten()
        sample = flat[:: max(1, flat.numel() // _SAMPLE)].float().cpu()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(sample.numpy().tobytes())
    if not tensors:
        step = max(1, bound.d_sae // 64)
        probe = torch.zeros(len(range(0, bound.d_sae, step)), bound.d_sae)
        probe[torch.arange(probe.shape[0]), torch.arange(0, bound.d_sae, step)] = 1.0
        with torch.no_grad():
            out = bound.decode(probe).float().cpu()
        h.update(torch.round(out * 1e4).numpy().tobytes())
    return {"site": bound.site.name, "d_in": bound.d_in, "d_sae": bound.d_sae,
            "architecture": getattr(sae, "architecture", type(sae).__name__),
            "weights": h.hexdigest()}


# -- the methods ----------------------------------------------------------------------------------
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
    memory_mb: float = DEFAULT_MEMORY_MB,
    normalize: bool = True,
    references: bool = True,
    checkpoint: str | None = None,
    progress: Progress = None,
    executor: Any = None,
    threads: int | None = None,
) -> PatchingResult:
    """Patch SAE features one cell at a time (error term from the base run); exact.

    Args:
        model: the model.
        sae: an SAE with a declared site (:class:`~causalpatch.sae.SparseAutoencoder`, a
            ``sae_lens.SAE``, or :func:`~causalpatch.sae.wrap_sae`).
        clean, corrupted: prompts (same token length pairwise) or a dataset as ``clean`` (also
            one in the seed framework's style).
        metric / metric_kwargs / correct / incorrect: as in
            :func:`causalpatch.activation_patching` (default: the dataset's, else
            ``logit_diff`` with answers, else ``l2``).
        features: ``"all"``, a list of feature indices (one cell each), or a list of lists
            (each list one cell, its features patched together).
        top_k: patch only the ``k`` cells (of ``features``) with the largest first-order
            estimates (:func:`sae_attribution`'s, computed first; largest ``|mean change|``
            over pairs, the largest over position groups); recorded in
            ``extra["selected_by"]``.
        positions: patch only these positions (jointly, or one cell each with
            ``by_position``); negative positions count from each pair's end. Default: all.
        by_position: one cell per (position, feature cell).
        direction: ``"denoise"`` (source = clean, base = corrupted) or ``"noise"``.
        engine: ``"fast"`` (staircase) or ``"naive"`` (one forward per row); same numbers.
        batch_size: patch rows per staircase pass (default: from ``memory_mb``); with
            ``checkpoint``, also the cells per evaluation call (default 64). The ``top_k``
            estimate uses :func:`sae_attribution`'s default batch.
        memory_mb: the memory budget (MiB) of one engine pass, used to choose ``batch_size``.
        normalize: False returns raw metric values.
        references: also patch, per position group, the whole site, all features and the
            error term alone (``extra["reference"]``: effects, same normalisation).
        checkpoint: a file path: finished cells are saved there after every group of pairs
            and a rerun with the same arguments (and the same SAE) resumes, after a kill too.
        threads: CPU threads torch uses during the run (restored after; ``None``: unchanged).
        progress: ``None`` (default: a bar with counts and ETA in a terminal or notebook once
            the sweep has run 2 s), ``True`` (a bar at once), ``False`` (silent) or a callback
            ``(done, total)``.
        executor: ``None`` (here), ``"ray"`` or a :class:`~causalpatch.executors.RayExecutor`:
            groups of pairs are evaluated by Ray workers (the SAE travels with the plan; each
            worker loads the model from its specification); so is the ``top_k`` estimate.

    Returns:
        :class:`PatchingResult` (``method="sae_patching"``) with axes ``("feature",)`` or
        ``("position", "feature")``; feature labels are indices (``"3+17"`` for groups).
        ``extra["noop_cells"]`` counts the (pair, feature cell)s whose features agree in both
        runs (exact no-ops, never computed); ``extra["pair_groups"]`` says how pairs shared
        staircase batches.
    """
    t0 = time.perf_counter()
    engine_ = engine_choice(engine)
    check_int(top_k, "top_k", 1, allow_none=True)
    options = RunOptions.make(model, progress=progress, executor=executor, batch_size=batch_size,
                              memory_mb=memory_mb, checkpoint=checkpoint, threads=threads)
    setup = _setup(model, sae, clean, corrupted, metric, metric_kwargs, correct, incorrect,
                   features, positions, by_position, direction)
    bound, prep, m = setup.bound, setup.prep, setup.metric
    cells_f = setup.feature_cells
    timings: dict[str, float] = {}
    extra: dict[str, Any] = {"engine": engine_.value, "positions": setup.positions_of[0],
                             "sae": _sae_extra(bound), "selected_by": None}
    n_groups = len(setup.groups_of[0])
    if top_k is not None:
        t1 = time.perf_counter()
        estimate_options = options.exact()
        est = _attribution_values(model, setup, cells_f, estimate_options)
        change = aggregate(_split(est, n_groups * len(cells_f))[0], Scale.CHANGE, m).effect
        score = change.reshape(n_groups, len(cells_f)).abs().amax(0)
        order = torch.argsort(score, descending=True, stable=True)[:top_k].tolist()
        cells_f = [cells_f[i] for i in order]
        extra["selected_by"] = f"top {len(cells_f)} of {len(setup.feature_cells)} by |first-" \
                               "order estimate| (sae_attribution)"
        timings["attribution_s"] = time.perf_counter() - t1
    cells = [_Cell(c, g) for g in range(n_groups) for c in cells_f]
    n_refs = len(REFERENCES) * n_groups if references else 0

    # the factory travels to executor workers: it captures plain values
    pairs, direction, groups_of = prep.pairs, prep.direction, setup.groups_of
    rows_per_pass, memory = options.batch_size, options.memory_mb

    def build(model: HookedModel, stats: dict[str, Any]) -> Any:
        """The evaluator next to ``model`` (the driver's, or a worker's copy)."""
        maker = _FeaturePatches(bound, cells, groups_of, references, stats)
        return pair_evaluator(model, pairs, maker, m, direction, engine_, rows_per_pass, memory,
                              stats, [bound.site])

    groups, grouping = length_groups(prep.pairs, engine_)
    extra["pair_groups"] = grouping
    timings["setup_s"] = time.perf_counter() - t0  # with the top_k estimate (attribution_s)
    values = options.run(
        model, prep.pairs, len(cells) + n_refs, build, groups=groups, label="SAE features",
        chunk=options.batch_size,
        checkpoint_args=dict(method="sae_patching", sae=_sae_identity(bound), metric=m.name,
                             features=[list(c) for c in cells_f], positions=setup.positions_of,
                             by_position=by_position, direction=prep.direction.value,
                             engine=engine_.value, references=references))
    values.stats.setdefault("noop_cells", 0)
    scale = Scale.NORMALIZED if normalize else Scale.RAW
    values, ref_values = _split(values, len(cells))
    extra["reference"] = _references(ref_values, REFERENCES, scale, m, setup.groups_of[0])
    axes, labels, shape = _axes(model, setup, cells_f, by_position)
    return build_result(
        model, values=values, scale=scale, axes=axes, labels=labels, shape=shape,
        component=bound.value_name("features"), method="sae_patching", timings=timings,
        extra=extra, t_start=t0, **prep.result_fields())


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
    memory_mb: float = DEFAULT_MEMORY_MB,
    checkpoint: str | None = None,
    progress: Progress = None,
    executor: Any = None,
    threads: int | None = None,
) -> PatchingResult:
    """First-order estimate of every SAE feature cell's patching effect, from one gradient pass
    per batch of pairs (a source forward, a base forward and one backward pass).

    ``estimate = sum over the cell's positions of (f_src - f_base) * d metric / d f`` at the
    base run, the gradient taken through the decoder with the error term held fixed, then
    normalised by ``metric(source) - metric(base)`` (mean over pairs, as every method).

    Args:
        model, sae, clean, corrupted, metric, metric_kwargs, correct, incorrect, features,
            positions, by_position, direction: as in :func:`sae_patching`.
        verify_top_k: re-run the ``k`` cells with the largest ``|estimate|`` exactly
            (:func:`sae_patching`'s patches on the fast engine); ``extra["verified"]`` lists
            ``{"index": [...], "cell": [...], "estimate": e, "exact": x}`` (``index`` holds
            the feature label and the absolute token position).
        batch_size: pairs per forward/backward batch (pairs are grouped by token length;
            default 8); the exact check of ``verify_top_k`` uses the engine's default.
        memory_mb, checkpoint, progress, executor, threads: the run options every method shares
            (:mod:`causalpatch.options`); with an executor, batches of pairs (and the
            ``verify_top_k`` check) are evaluated by Ray workers.

    Returns:
        :class:`PatchingResult` (``method="sae_attribution"``), axes as in
        :func:`sae_patching`; ``extra["reference"]`` holds the estimates for the whole site
        and for the error term alone, per position group.
    """
    t0 = time.perf_counter()
    check_int(verify_top_k, "verify_top_k", 0)
    options = RunOptions.make(model, progress=progress, executor=executor, batch_size=batch_size,
                              memory_mb=memory_mb, checkpoint=checkpoint, threads=threads)
    setup = _setup(model, sae, clean, corrupted, metric, metric_kwargs, correct, incorrect,
                   features, positions, by_position, direction)
    bound, prep, m = setup.bound, setup.prep, setup.metric
    cells_f = setup.feature_cells
    groups = setup.groups_of[0]
    timings: dict[str, float] = {"setup_s": time.perf_counter() - t0}
    all_values = _attribution_values(
        model, setup, cells_f, options,
        checkpoint_args=dict(method="sae_attribution", sae=_sae_identity(bound), metric=m.name,
                             features=[list(c) for c in cells_f], positions=setup.positions_of,
                             by_position=by_position, direction=prep.direction.value,
                             batch=options.batch_size or DEFAULT_PAIRS_PER_BATCH))
    for key in ("source_forward_s", "base_forward_s", "backward_s"):  # summed over workers
        timings[key] = all_values.stats.pop(key, 0.0)
    timings["attribution_s"] = (timings["source_forward_s"] + timings["base_forward_s"]
                                + timings["backward_s"])
    values, ref_values = _split(all_values, len(groups) * len(cells_f))
    reference = _references(ref_values, ESTIMATE_REFERENCES, Scale.NORMALIZED, m, groups)
    axes, labels, shape = _axes(model, setup, cells_f, by_position)

    t_verify = time.perf_counter()
    verified: list[dict[str, Any]] = []
    if verify_top_k > 0:
        effect = aggregate(values, Scale.NORMALIZED, m).effect
        exact_options = options.exact()
        n_f = len(cells_f)

        def patches_for(order: list[int]) -> _FeaturePatches:
            return _FeaturePatches(bound, [_Cell(cells_f[flat % n_f], flat // n_f)
                                           for flat in order], setup.groups_of, False)

        verified = exact_top_k(model, prep, effect, min(verify_top_k, effect.numel()), shape,
                               axes, labels, patches_for, exact_options, sites=[bound.site],
                               positions=[g[0] for g in groups])
    timings["verify_s"] = time.perf_counter() - t_verify
    return build_result(
        model, values=values, scale=Scale.NORMALIZED, axes=axes, labels=labels, shape=shape,
        component=bound.value_name("features"), method="sae_attribution", timings=timings,
        extra={"estimate": "first-order (gradient at the base run, error term held fixed)",
               "positions": setup.positions_of[0], "sae": _sae_extra(bound),
               "reference": reference, "verified": verified}, t_start=t0,
        **prep.result_fields())


__all__ = ["sae_attribution", "sae_patching"]

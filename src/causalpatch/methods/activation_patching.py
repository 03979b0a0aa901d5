"""Activation patching: which layers, positions and heads carry a behaviour?

Run the model on a *clean* and a *corrupted* prompt, splice activations of one run into the
other, and measure with a metric how much of the behaviour moves.

* **Denoising** (default): patch clean activations into the corrupted run.
  ``base = corrupted``, ``source = clean``; an effect of 1.0 means the patch alone restores the
  clean behaviour.
* **Noising**: patch corrupted activations into the clean run. ``base = clean``,
  ``source = corrupted``; 1.0 means the patch alone fully breaks the behaviour.

In both, ``effect = (patched - base) / (source - base)``, aggregated over pairs by the one rule
of :mod:`causalpatch.assemble`.

Example::

    from causalpatch import InterpretableModel, activation_patching
    model = InterpretableModel("smollm2")
    result = activation_patching(
        model,
        "When Mary and John went to the store, John gave a drink to",
        "When Mary and John went to the store, Mary gave a drink to",
        component="resid_post", by_position=True, correct=" Mary", incorrect=" John")
    result.effect_matrix.shape   # (30, 14): layer x position
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..assemble import Scale, build_result, length_groups, pair_evaluator, run_pairs
from ..datasets import as_patching_dataset
from ..enums import Direction, Engine, parse
from ..errors import InvalidArgumentError, OutOfRangeError
from ..metrics import Metric
from ..options import DEFAULT_MEMORY_MB, Progress, RunOptions, prepare_pairs
from ..plan import (Pair, Patch, SitePatch, build_patches, check_answers, choose_metric,
                    engine_choice, index_list, make_pairs, pair_positions, plan_component,
                    resolve_answers, resolve_positions, result_axes)

if TYPE_CHECKING:
    from ..model import HookedModel
    from ..result import PatchingResult
    from ..tokens import Prompts

def activation_patching(
    model: HookedModel,
    clean: Prompts | Any,
    corrupted: Prompts | None = None,
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
    engine: str | Engine = "fast",
    batch_size: int | None = None,
    memory_mb: float = DEFAULT_MEMORY_MB,
    normalize: bool = True,
    checkpoint: str | None = None,
    progress: Progress = None,
    method: str | None = None,
    normalize_effects: bool | None = None,
    executor: Any = None,
    threads: int | None = None,
) -> PatchingResult:
    """Patch every layer (x position x head) and measure the effect on a metric.

    Args:
        model: the model.
        clean: clean prompt(s): a string, token ids, a list, or a dataset (anything with
            ``.clean``, ``.corrupted`` and optionally ``.correct``, ``.incorrect``, ``.metric``).
        corrupted: corrupted prompt(s), each the same token length as its clean prompt.
        component: ``resid_pre | resid_mid | resid_post | attn | mlp | attn_head |
            attn_head_q | attn_head_k | attn_head_v | mlp_neuron``, a per-layer site kind, or
            one full site name (``"blocks.5.mlp"``).
        metric: ``logit_diff | logit | prob | logprob | ce_diff | l2 | mse | cosine | kl`` or
            a callable ``(logits [batch, vocab]) -> [batch]``. Default: the dataset's metric,
            else ``logit_diff``.
        metric_kwargs / correct / incorrect: answer tokens (strings must be single tokens);
            default: the dataset's answers.
        layers, heads, neurons: subsets (default all; negative layers count from the end).
        positions: patch only these positions (jointly, or one cell each with
            ``by_position``); negative positions count from each pair's own end.
        by_position: a separate patch per position (adds a position axis).
        direction: ``"denoise"`` or ``"noise"``.
        engine: ``"fast"`` (exact staircase engine) or ``"naive"`` (one forward per patch).
        batch_size: patch rows per staircase pass (default: from ``memory_mb``).
        normalize: False returns raw patched metric values (mean over pairs) instead of effects.
        checkpoint: a file path: finished cells are saved there and a rerun resumes.
        threads: CPU threads torch uses during the run (restored after; ``None``: unchanged).
        progress: ``None`` (default: a bar with counts and ETA in a terminal or notebook once
            the sweep has run 2 s), ``True`` (a bar at once), ``False`` (silent) or a callback
            ``(done, total)``.
        method, normalize_effects: deprecated spellings of ``engine`` and ``normalize``.
        executor: ``None`` (here), ``"ray"`` or a :class:`~causalpatch.executors.RayExecutor`:
            pairs are split into shards evaluated by Ray workers, each holding a copy of the
            model loaded from its name or path; results equal the local run.

    Returns:
        :class:`PatchingResult` with ``effect_matrix`` of shape ``(n_layers,)``,
        ``(n_layers, n_heads)``, ``(n_layers, n_positions)`` or
        ``(n_layers, n_positions, n_heads)``.
    """
    t0 = time.perf_counter()
    # -- validate everything first ----------------------------------------------------------
    engine_ = engine_choice(engine, method)
    options = RunOptions.make(model, progress=progress, executor=executor, batch_size=batch_size,
                              memory_mb=memory_mb, checkpoint=checkpoint, threads=threads)
    if normalize_effects is not None:
        warnings.warn("normalize_effects= is deprecated; use normalize=", DeprecationWarning,
                      stacklevel=2)
        normalize = bool(normalize_effects)
    prep = prepare_pairs(model, clean, corrupted, metric, metric_kwargs, correct, incorrect,
                         direction)
    pairs, m, direction_ = prep.pairs, prep.metric, prep.direction  # the factory may travel:
    plan = plan_component(model, component, layers, heads, neurons)  # plain values only
    positions_of = pair_positions(pairs, positions, by_position)
    patches_of = [build_patches(plan, pos, by_position, len(p.clean))
                  for p, pos in zip(pairs, positions_of)]
    axes, labels, shape = result_axes(model, plan, positions_of[0], by_position, pairs[0].clean)
    n_cells = len(patches_of[0])

    # -- run ------------------------------------------------------------------------------------
    def build(model_: HookedModel, stats: dict[str, Any]) -> Any:
        return pair_evaluator(model_, pairs, patches_of, m, direction_, engine_,
                              options.batch_size, options.memory_mb, stats)

    groups, grouping = length_groups(pairs, engine_)
    t_setup = time.perf_counter() - t0
    values = options.run(
        model, pairs, n_cells, build, groups=groups, chunk=batch_size,
        checkpoint_args=dict(component=component, metric=m.name, layers=plan.layers,
                             units=plan.units, positions=positions_of, by_position=by_position,
                             direction=prep.direction.value, engine=engine_.value))
    return build_result(
        model, values=values, scale=Scale.NORMALIZED if normalize else Scale.RAW,
        axes=axes, labels=labels, shape=shape, component=component,
        method="activation_patching", timings={"setup_s": t_setup},
        extra={"engine": engine_.value, "positions": positions_of[0], "pair_groups": grouping},
        t_start=t0, **prep.result_fields())


class CausalTrace:
    """Several patches applied together, measured once, on the same pipeline as a sweep.

    Example::

        with model.causal_trace(clean, corrupted) as ct:
            ct.patch("blocks.5.mlp")
            ct.patch("layers.9.self_attn", positions=[-1])
            effect = ct.metric("logit_diff", correct_token=" Mary", incorrect_token=" John")

    ``metric`` returns the effect aggregated as every method does: the mean raw metric over
    pairs, normalised by the mean gap; positions are resolved per pair (``-1`` is each pair's
    own last token); a dataset's answers are used unless given. Without a metric the rule of
    every entry point applies (:func:`~causalpatch.plan.choose_metric`): the dataset's
    metric, else ``logit_diff`` when answer tokens are known, else ``l2``.
    ``direction="noise"`` patches corrupted activations into the clean run. ``clean`` may be a
    dataset, also one in the seeds' ``get_clean_corrupt_pairs`` style.
    """

    def __init__(self, model: HookedModel, clean: Prompts | Any, corrupted: Prompts | None = None,
                 direction: str | Direction = "denoise", engine: str | Engine = "fast") -> None:
        self.model = model
        self.direction = parse(Direction, direction, "direction")
        self.engine = parse(Engine, engine, "engine")
        clean = as_patching_dataset(clean, model)
        self._clean, self._corrupted = clean, corrupted
        self.pairs = make_pairs(model, clean, corrupted)
        self._patches: list[tuple[str, list[int] | None, list[int] | None]] = []

    def __enter__(self) -> CausalTrace:
        return self

    def __exit__(self, *exc: object) -> None:
        self._patches.clear()  # a trace's patches do not outlive its ``with`` block

    def patch(self, name: str, positions: Sequence[int] | int | None = None,
              heads: Sequence[int] | int | None = None) -> CausalTrace:
        """Register a site to patch (all positions unless ``positions``; all heads unless
        ``heads``). Validated now, against every pair."""
        site = self.model.site(name)
        for pair in self.pairs:
            resolve_positions(positions, False, len(pair.clean))
        head_list = index_list(heads, "heads")
        if head_list is not None:
            if not site.per_head:
                raise InvalidArgumentError(
                    f"heads given for {name!r}, which has no heads; use a per-head site such as "
                    "'blocks.L.attn.z'")
            n = site.view.n_heads(self.model.dims)
            bad = [h for h in head_list if not 0 <= h < n]
            if bad:
                raise OutOfRangeError(f"heads {bad} out of range for {name!r}: [0, {n - 1}]")
        self._patches.append((name, index_list(positions, "positions"), head_list))
        return self

    def _patch_of(self, pair: Pair) -> Patch:
        out = []
        for name, positions, heads in self._patches:
            pos = resolve_positions(positions, False, len(pair.clean))
            out.append(SitePatch(self.model.site(name),
                                 tuple(range(len(pair.clean))) if pos is None else tuple(pos),
                                 None if heads is None else tuple(heads)))
        return tuple(out)

    def result(self, metric: str | Metric | Callable[..., Any] | None = None,
               correct: Any = None, incorrect: Any = None, normalize: bool = True,
               **metric_kwargs: Any) -> PatchingResult:
        """Run all registered patches at once on every pair: a one-cell result."""
        if not self._patches:
            raise InvalidArgumentError("no patches registered: call ct.patch(name) first")
        correct, incorrect = resolve_answers(metric_kwargs, correct, incorrect)
        pairs = self.pairs
        if correct is not None or incorrect is not None:
            pairs = make_pairs(self.model, self._clean, self._corrupted, correct, incorrect)
        m = choose_metric(metric, pairs, self._clean if self._corrupted is None else None)
        check_answers(m, pairs)
        patches_of = [[self._patch_of(p)] for p in pairs]
        stats: dict[str, Any] = {}
        evaluate = pair_evaluator(self.model, pairs, patches_of, m, self.direction, self.engine,
                                  None, DEFAULT_MEMORY_MB, stats)
        values = run_pairs(self.model, pairs, 1, evaluate)
        names = [name for name, _, _ in self._patches]
        return build_result(
            self.model, values=values, scale=Scale.NORMALIZED if normalize else Scale.RAW,
            metric=m, axes=("site",), labels={"site": [" + ".join(names)]}, shape=(1,),
            component=" + ".join(names), method="causal_trace", direction=self.direction,
            clean=[p.clean for p in pairs], corrupted=[p.corrupted for p in pairs],
            answers=[[p.correct, p.incorrect] for p in pairs],
            extra={"engine": self.engine.value, "patches": [
                {"site": n, "positions": pos, "heads": h} for n, pos, h in self._patches]})

    def metric(self, metric: str | Metric | Callable[..., Any] | None = None,
               **metric_kwargs: Any) -> float:
        """The effect of all registered patches together, a float.

        ``metric`` defaults by the one rule (the dataset's, else ``logit_diff`` with answer
        tokens, else ``l2``); answers may be given as ``correct_token=``/``incorrect_token=``
        (or ``correct=``/``incorrect=``)."""
        return float(self.result(metric, **metric_kwargs).effect_matrix[0])

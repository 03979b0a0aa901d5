"""What every method shares before and around its own work: run options and the prologue.

Every method that evaluates pairs or prompts (activation patching, attribution patching,
ablation, path patching, causal tracing, SAE feature patching and attribution, and every
method added later) takes the same keyword arguments, with the same meaning and defaults,
collected in one :class:`RunOptions`:

``progress``
    ``None`` (default, auto: a bar with counts and ETA in a terminal or notebook once the work
    has run 2 s), ``True`` (a bar at once), ``False`` (silent) or a callback ``(done, total)``.
``executor``
    ``None`` (here), ``"ray"`` or a :class:`~causalpatch.executors.RayExecutor`: groups of
    pairs are evaluated by Ray workers; results equal the local run.
``batch_size``
    The method's unit of batching (its docstring says which: patch rows per staircase pass,
    pairs per forward/backward, senders per pass); default: from ``memory_mb`` or the method's
    own default.
``memory_mb``
    The memory budget (MiB) of one engine pass, used to choose ``batch_size`` when it is not
    given (default 1024).
``checkpoint``
    A file path: finished cells are saved there after every group (atomically) and a rerun
    with the same arguments resumes, after a kill too.
``threads``
    ``None`` (default: torch's current setting) or the number of CPU threads torch uses
    while the method computes: set with :func:`torch.set_num_threads` when the work starts
    and restored when it ends, on every exit path (an exception or Ctrl-C too). One thread is
    often faster on a busy machine (other processes on the cores) and for tiny models.
    Results do not depend on it. Ray workers keep their own count (``num_cpus_per_worker``).

:func:`prepare_pairs` is the one prologue of the pair methods: direction parsed, answers
merged, a dataset (also one written in the seed framework's style) accepted, pairs made,
the metric chosen by the one rule and checked against the answers — all before any forward.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .assemble import (EvaluatorFactory, PairValues, PatchMaker, Scale, aggregate,
                       pair_evaluator, run_pairs)
from .datasets import as_patching_dataset
from .enums import Direction, Engine, parse
from .errors import InvalidArgumentError, InvalidTypeError
from .executors import resolve_executor
from .metrics import Metric
from .plan import (Pair, Patch, SitePatch, check_answers, check_int, choose_metric, make_pairs,
                   resolve_answers)

if TYPE_CHECKING:
    from .executors import RayExecutor
    from .model import HookedModel
    from .names import Site

Progress = bool | Callable[[int, int], None] | None
"""``progress=``: ``None`` (auto), ``True``, ``False`` or a callback ``(done, total)``."""

#: The default memory budget of one engine pass (MiB).
DEFAULT_MEMORY_MB = 1024.0


@dataclass(frozen=True)
class RunOptions:
    """The run options of every method (module docstring), validated.

    Build it with :meth:`make` (checks every value before any forward pass); a method hands
    it to :meth:`run`, which drives :func:`~causalpatch.assemble.run_pairs`.
    """

    progress: Progress = None
    executor: RayExecutor | None = None
    batch_size: int | None = None
    memory_mb: float = DEFAULT_MEMORY_MB
    checkpoint: str | None = None
    threads: int | None = None

    @classmethod
    def make(cls, model: HookedModel, *, progress: Progress = None, executor: Any = None,
             batch_size: int | None = None, memory_mb: float = DEFAULT_MEMORY_MB,
             checkpoint: Any = None, threads: int | None = None) -> RunOptions:
        """Validate the options for ``model``.

        Raises:
            InvalidTypeError / InvalidArgumentError: a value of the wrong type or range (the
                message names the argument and what it accepts).
        """
        if progress is not None and not isinstance(progress, bool) and not callable(progress):
            raise InvalidTypeError(
                f"progress must be None (auto), True, False or a callback (done, total), got "
                f"{progress!r}")
        check_int(batch_size, "batch_size", 1, allow_none=True)
        if isinstance(memory_mb, bool) or not isinstance(memory_mb, (int, float)):
            raise InvalidTypeError(f"memory_mb must be a number of MiB, got {memory_mb!r}")
        if not memory_mb > 0:
            raise InvalidArgumentError(
                f"memory_mb must be a positive number of MiB (default {DEFAULT_MEMORY_MB:g}), "
                f"got {memory_mb!r}")
        if checkpoint is not None:
            if not isinstance(checkpoint, (str, os.PathLike)):
                raise InvalidTypeError(
                    f"checkpoint must be a file path (str or os.PathLike), got {checkpoint!r}")
            checkpoint = os.fspath(checkpoint)
        check_threads(threads)
        return cls(progress, resolve_executor(executor, model), batch_size, float(memory_mb),
                   checkpoint, threads)

    def exact(self) -> RunOptions:
        """These options for a method's exact check of chosen cells (``verify_top_k``, ...):
        the engine's own default batch size and no checkpoint; progress, executor, memory
        budget and threads kept."""
        return RunOptions(self.progress, self.executor, None, self.memory_mb, None, self.threads)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """For the ``with`` block, torch uses :attr:`threads` CPU threads (when set); the
        previous count is restored on every exit path."""
        with using_threads(self.threads):
            yield

    def run(self, model: HookedModel, pairs: Sequence[Any], n_cells: int,
            build: EvaluatorFactory, *, groups: Sequence[list[int]] | None = None,
            label: str = "patching", checkpoint_args: dict[str, Any] | None = None,
            chunk: int | None = None) -> PairValues:
        """:func:`~causalpatch.assemble.run_pairs` with these options.

        ``checkpoint_args``: everything besides the model and the pairs that determines the
        cells' values (include the method's name), so a checkpoint of another sweep is
        refused. ``chunk``: cells per evaluation call when checkpointing locally.
        """
        with self.applied():
            return run_pairs(model, pairs, n_cells, build=build, groups=groups,
                             checkpoint=self.checkpoint,
                             checkpoint_args=checkpoint_args,
                             chunk=chunk, progress=self.progress, label=label,
                             executor=self.executor)


def check_threads(threads: Any) -> None:
    """``threads=``: ``None`` or a positive int (before any compute)."""
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, int):
        raise InvalidTypeError(
            f"threads must be None (keep torch's current setting) or a positive int number of "
            f"CPU threads, got {threads!r}")
    if threads < 1:
        raise InvalidArgumentError(
            f"threads must be a positive number of CPU threads (1 is often fastest on a busy "
            f"machine), or None to keep torch's setting; got {threads}")


@contextmanager
def using_threads(threads: int | None) -> Iterator[None]:
    """torch on ``threads`` CPU threads for the ``with`` block (``None``: unchanged), the
    previous count restored on every exit path (an exception, ``KeyboardInterrupt``)."""
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class PreparedPairs:
    """The prologue's output: what every pair method needs before its own plan.

    Attributes:
        pairs: token ids and answers of every pair.
        metric: the metric (the one given, the dataset's, else ``logit_diff`` with answers,
            else ``l2``), checked against the pairs' answers.
        direction: which run is patched into which.
        data: the user's dataset (converted from the seed framework's style when needed), or
            the prompts as given: build_result reads its position roles.
    """

    pairs: list[Pair]
    metric: Metric
    direction: Direction
    data: Any

    @property
    def denoise(self) -> bool:
        return self.direction is Direction.DENOISE

    def result_fields(self) -> dict[str, Any]:
        """The pairs' part of :func:`~causalpatch.assemble.build_result`'s arguments."""
        return {"metric": self.metric, "direction": self.direction,
                "clean": [p.clean for p in self.pairs],
                "corrupted": [p.corrupted for p in self.pairs],
                "answers": [[p.correct, p.incorrect] for p in self.pairs], "data": self.data}


def prepare_pairs(model: HookedModel, clean: Any, corrupted: Any, metric: Any = None,
                  metric_kwargs: Mapping[str, Any] | None = None, correct: Any = None,
                  incorrect: Any = None, direction: Any = "denoise") -> PreparedPairs:
    """The one prologue of every pair method (module docstring); no forward pass."""
    direction_ = parse(Direction, direction, "direction")
    correct, incorrect = resolve_answers(metric_kwargs, correct, incorrect)
    data = as_patching_dataset(clean, model)
    pairs = make_pairs(model, data, corrupted, correct, incorrect)
    m = choose_metric(metric, pairs, data if corrupted is None else None)
    check_answers(m, pairs)
    return PreparedPairs(pairs, m, direction_, data)


def verify_top_k(model: HookedModel, prep: PreparedPairs, estimate: torch.Tensor, k: int,
                 shape: tuple[int, ...], axes: tuple[str, ...], labels: dict[str, list[Any]],
                 patches_for: Callable[[list[int]], Sequence[list[Patch]] | PatchMaker],
                 options: RunOptions, *, sites: Sequence[Site] | None = None,
                 positions: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """The one exact check of a first-order method: the ``k`` cells with the largest
    ``|estimate|`` re-run exactly on the engine (every pair, the one aggregation rule).

    Args:
        estimate: ``[n_cells]`` the normalised estimates (flat, row-major over ``shape``).
        patches_for: the chosen flat cell indices -> every pair's patches for them (or a
            :data:`~causalpatch.assemble.PatchMaker`, with ``sites``).
        positions: absolute token positions of the ``"position"`` axis, for the listing.

    Returns:
        One entry per verified cell, largest first: ``{"index": [...labels], "cell":
        [...coords], "estimate": e, "exact": x}`` (``index`` holds layer/head/neuron/feature
        labels and absolute token positions).
    """
    order = torch.argsort(estimate.abs(), descending=True, stable=True)[:k].tolist()
    return exact_cells(model, prep, estimate, order, shape, axes, labels, patches_for, options,
                       sites=sites, positions=positions)[0]


def _exact_values(model: HookedModel, prep: PreparedPairs,
                  patches: Sequence[list[Patch]] | PatchMaker, n: int, options: RunOptions,
                  sites: Sequence[Site] | None, label: str) -> PairValues:
    """Every pair's raw metric with each of ``n`` patch rows, on the fast engine."""
    pairs, metric, direction = prep.pairs, prep.metric, prep.direction  # no dataset object:
    batch_size, memory_mb = options.batch_size, options.memory_mb  # the factory may travel

    def build(model_: HookedModel, stats: dict[str, Any]) -> Any:
        return pair_evaluator(model_, pairs, patches, metric, direction, Engine.FAST,
                              batch_size, memory_mb, stats, sites)

    with options.applied():
        return run_pairs(model, pairs, n, build=build, executor=options.executor,
                         progress=options.progress, label=label)


def exact_cells(model: HookedModel, prep: PreparedPairs, estimate: torch.Tensor,
                order: list[int], shape: tuple[int, ...], axes: tuple[str, ...],
                labels: dict[str, list[Any]],
                patches_for: Callable[[list[int]], Sequence[list[Patch]] | PatchMaker],
                options: RunOptions, *, sites: Sequence[Site] | None = None,
                positions: Sequence[int] | None = None
                ) -> tuple[list[dict[str, Any]], PairValues | None]:
    """The cells ``order`` (flat indices) re-run exactly: :func:`verify_top_k`'s listing (in
    ``order``) and the raw values ``[n_pairs, len(order)]`` (``None`` for no cells)."""
    if not order:
        return [], None
    values = _exact_values(model, prep, patches_for(order), len(order), options, sites,
                           "verifying")
    exact = aggregate(values, Scale.NORMALIZED, prep.metric).effect
    out = []
    for j, flat in enumerate(order):
        coords = [int(c) for c in torch.unravel_index(torch.tensor(flat), shape)]
        index = [positions[c] if a == "position" and positions is not None
                 else labels[a][c] if a in labels else c for a, c in zip(axes, coords)]
        out.append({"index": index, "cell": coords, "estimate": float(estimate[flat]),
                    "exact": float(exact[j])})
    return out, values


#: ``verify="auto"``: cells whose screening score is at least this fraction of the k-th
#: largest exact effect found so far are verified too.
SCREEN_MARGIN = 0.5


#: ``verify="auto"``: joint rows a round's bisection may run, per subset.
BISECT_ROWS = 8


@dataclass(frozen=True)
class Proven:
    """What :func:`screen_then_prove` gives.

    Attributes:
        verified: :func:`verify_top_k`-style entries of every verified cell (largest score
            first), ``exact`` holding the exact normalised effect.
        raw: ``[n_pairs, len(verified)]`` the verified cells' raw metric values, or ``None``.
        threshold: the k-th largest ``|exact|`` among the verified cells (or the given
            threshold, if lower): the line a missed cell would have to cross.
        bound: the random-subset check of the unverified cells: ``{"subsets": n, "cells": m,
            "max_abs_effect": b, "threshold": t, "holds": b < t}`` (``b`` the largest
            ``|exact effect|`` of patching one random subset jointly; ``None`` if every cell
            was verified).
    """

    verified: list[dict[str, Any]]
    raw: torch.Tensor | None
    threshold: float
    bound: dict[str, Any] | None


def _subset_effects(model: HookedModel, prep: PreparedPairs, cells: list[int],
                    patches_for: Callable[[list[int]], Sequence[list[Patch]]],
                    options: RunOptions, n_subsets: int, seed: int
                    ) -> tuple[list[list[int]], torch.Tensor]:
    """``cells`` split at random into at most ``n_subsets`` subsets, each patched jointly and
    exactly: the subsets and their normalised effects."""
    gen = torch.Generator().manual_seed(seed)
    shuffled = [cells[i] for i in torch.randperm(len(cells), generator=gen).tolist()]
    subsets = [s for s in (shuffled[i::n_subsets] for i in range(n_subsets)) if s]
    return subsets, _joint_effects(model, prep, subsets, patches_for, options)


def _merged(patches: list[SitePatch]) -> Patch:
    """The same entries in fewer site patches: the units of one site at the same positions
    together (source values only; a patch carrying values is kept as it is)."""
    groups: dict[tuple[str, tuple[int, ...]], list[SitePatch]] = {}
    out: list[SitePatch] = []
    for sp in patches:
        if sp.values is not None or sp.units is None:
            out.append(sp)
        else:
            groups.setdefault((sp.site.name, sp.positions), []).append(sp)
    for group in groups.values():
        units = tuple(sorted({u for sp in group for u in sp.units or ()}))
        out.append(SitePatch(group[0].site, group[0].positions, units))
    return tuple(out)


def _joint_effects(model: HookedModel, prep: PreparedPairs, subsets: list[list[int]],
                   patches_for: Callable[[list[int]], Sequence[list[Patch]]],
                   options: RunOptions) -> torch.Tensor:
    """The normalised exact effect of patching each subset of cells jointly."""
    joint: list[list[Patch]] = [[] for _ in prep.pairs]
    for subset in subsets:
        for p, pair_rows in enumerate(patches_for(subset)):
            joint[p].append(_merged([sp for patch in pair_rows for sp in patch]))
    values = _exact_values(model, prep, joint, len(subsets), options, None, "bounding the rest")
    return aggregate(values, Scale.NORMALIZED, prep.metric).effect


def screen_then_prove(model: HookedModel, prep: PreparedPairs, estimate: torch.Tensor,
                      score: torch.Tensor, k: int, shape: tuple[int, ...],
                      axes: tuple[str, ...], labels: dict[str, list[Any]],
                      patches_for: Callable[[list[int]], Sequence[list[Patch]]],
                      options: RunOptions, *, threshold: float | None = None,
                      n_subsets: int = 8, seed: int = 0,
                      positions: Sequence[int] | None = None) -> Proven:
    """Verify every cell whose screening ``score`` could place it in the exact top ``k`` (or
    above ``threshold``), then bound what the unverified cells may hide.

    1. The ``2k`` cells of largest ``score`` are run exactly.
    2. ``t`` = the k-th largest ``|exact|`` so far (``min(t, threshold)`` with a threshold);
       every unverified cell with ``score >= SCREEN_MARGIN * t`` is run exactly; repeat until
       no such cell is left.
    3. The unverified cells are split at random (``seed``) into ``n_subsets`` subsets; each
       subset is patched jointly and exactly. Every subset whose ``|effect| >= t`` is bisected
       (halves patched jointly, those still reaching ``t`` split again) down to single cells,
       which are verified (at most ``BISECT_ROWS * n_subsets`` joint rows a round: effects
       spread over many small cells flag every half, and the bound then does not hold); steps
       2-3 repeat (new subsets, ``seed + round``) until no subset reaches ``t`` or bisection
       finds no new cell. ``max |effect|`` over the last subsets is the stated bound on a
       missed cell (``holds``: below ``t``): it holds unless effects inside a subset cancel
       (AtP*'s subsampling check).

    Args:
        estimate, score: ``[n_cells]`` the normalised estimate (listed) and the screening
            score (e.g. AtP*'s ``max(|estimate|, GradDrop)``).
        patches_for: flat cell indices -> every pair's patch of each cell (a list per pair).
    """
    n = int(score.numel())
    k = min(k, n)
    order = torch.argsort(score, descending=True, stable=True).tolist()
    chosen = order[:min(2 * k, n)]
    verified: list[dict[str, Any]] = []
    raws: list[torch.Tensor] = []
    done: set[int] = set()
    t = float("inf")
    bound: dict[str, Any] | None = None
    for round_ in range(n + 1):  # every round verifies at least one new cell
        while chosen:
            listing, values = exact_cells(model, prep, estimate, chosen, shape, axes, labels,
                                          patches_for, options, positions=positions)
            verified += listing
            assert values is not None
            raws.append(values.raw)
            done.update(chosen)
            exact = sorted((abs(e["exact"]) for e in verified), reverse=True)
            t = exact[k - 1] if len(exact) >= k else 0.0
            if threshold is not None:
                t = min(t, threshold)
            chosen = [c for c in order
                      if c not in done and float(score[c]) >= SCREEN_MARGIN * t]
        rest = [c for c in order if c not in done]
        if not rest:
            bound = None
            break
        subsets, effects = _subset_effects(model, prep, rest, patches_for, options, n_subsets,
                                           seed + round_)
        b = float(effects.abs().max())
        bound = {"subsets": len(subsets), "cells": len(rest), "max_abs_effect": b,
                 "threshold": t, "holds": b < t, "seed": seed + round_}
        # a subset whose joint effect reaches t may hide a cell above the line: bisect it
        # (halves patched jointly, those still reaching t split again) down to single cells
        level = [s_ for s_, e in zip(subsets, effects.tolist()) if abs(e) >= t]
        chosen = []
        budget = BISECT_ROWS * n_subsets  # effects spread over many cells flag every half
        while level:
            chosen += [c for s_ in level if len(s_) == 1 for c in s_]
            halves = [h for s_ in level if len(s_) > 1
                      for h in (s_[:len(s_) // 2], s_[len(s_) // 2:])]
            if not halves or len(halves) > budget:
                bound["bisection"] = "stopped: over budget" if halves else "done"
                break
            budget -= len(halves)
            level = [h for h, e in zip(halves, _joint_effects(model, prep, halves, patches_for,
                                                               options).tolist())
                     if abs(e) >= t]
        if not chosen:
            break
    raw = torch.cat(raws, dim=1) if raws else None
    return Proven(verified, raw, t, bound)


__all__ = ["DEFAULT_MEMORY_MB", "PreparedPairs", "Progress", "RunOptions", "prepare_pairs",
           "check_threads", "using_threads",
           "verify_top_k", "exact_cells", "screen_then_prove", "Proven", "SCREEN_MARGIN",
           "BISECT_ROWS"]

"""The shared base of every task dataset: :class:`PatchingDataset`, its rows, and helpers.

A dataset is four lists aligned by index,

* ``clean[i]`` / ``corrupted[i]`` — prompts (strings, or token-id lists) with the **same token
  length** pairwise (checked when a model is given),
* ``correct[i]`` / ``incorrect[i]`` — answer token ids (``int``; strings are converted with the
  model, see :func:`~causalpatch.datasets.protocol.answer_token`),

plus the ``metric`` the task is measured with. ``dataset[i]`` is a :class:`PatchingPair`;
:meth:`PatchingDataset.subset` and :meth:`PatchingDataset.batches` slice the lists together with
a subclass's own per-pair lists (``per_pair_fields``). Every dataset also speaks the seeds'
protocol (:class:`~causalpatch.datasets.protocol.SeedProtocol`), and :func:`as_patching_dataset`
turns a foreign object speaking it into a :class:`PatchingDataset`.

The helpers :func:`n_tokens` (token length as the patching functions tokenise) and
:func:`check_n` (the ``n`` argument of every task) are shared by the task modules.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import KW_ONLY, InitVar, dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..errors import InvalidArgumentError, InvalidTypeError, OutOfRangeError
from ..metrics import Metric
from .protocol import SeedProtocol, answer_token, seed_lists, seed_metric

if TYPE_CHECKING:
    from ..model import HookedModel


# -- helpers ----------------------------------------------------------------------------------
def n_tokens(model: HookedModel, prompt: Any) -> int:
    """Token length of one prompt exactly as the patching functions tokenise it."""
    from ..tokens import token_lists

    return len(token_lists(model, prompt)[0])


def check_n(n: int) -> None:
    """Refuse an ``n`` (number of pairs) that is not an int >= 1."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise InvalidTypeError(f"n must be an int, got {type(n).__name__}")
    if n < 1:
        raise InvalidArgumentError(f"n must be at least 1, got {n}")


def _as_list(value: Any, what: str) -> list[Any]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, torch.Tensor)):
        raise InvalidTypeError(
            f"{what} must be a list (one entry per pair), got {type(value).__name__}")
    return value.tolist() if isinstance(value, torch.Tensor) else list(value)


# -- the base class ---------------------------------------------------------------------------
@dataclass(frozen=True)
class PatchingPair:
    """One clean/corrupted pair with its answer token ids (one row of a dataset)."""

    clean: Any
    corrupted: Any
    correct: int | None
    incorrect: int | None


@dataclass(repr=False)
class PatchingDataset(SeedProtocol):
    """Clean/corrupted prompt pairs and answer token ids, aligned by index.

    Args:
        clean, corrupted: ``n`` prompts each: strings or token-id lists.
        correct, incorrect: ``n`` answer token ids (strings are converted with
            ``model.to_single_token`` when ``model`` is given).
        metric: the metric this task is measured with, a registered name (``"logit_diff"``)
            or a :class:`~causalpatch.metrics.Metric`.
        metric_kwargs: extra settings of the metric, kept with the data (may be empty).
        name: a short description.
        info: free-form metadata (seed, corruption, ...).
        model: keyword only; when given, every pair must have equal clean/corrupted token
            length (otherwise :class:`InvalidArgumentError` naming the pair and both lengths).

    Raises:
        InvalidArgumentError: no pairs ("dataset has no pairs"), lists of different lengths,
            unequal token lengths within a pair (with ``model``).

    Example::

        data = PatchingDataset.from_pairs(model, [
            ("The capital of France is", "The capital of Italy is", " Paris", " Rome")])
        len(data), data[0].correct        # 1, model.to_single_token(" Paris")

    The seeds' subclass pattern works too: a subclass that does not call this ``__init__`` and
    defines ``get_clean_corrupt_pairs()`` (``[(clean, corrupted), ...]``), optionally
    ``get_target_tokens(pair_idx)`` (``(correct_id, incorrect_id)``) and
    ``compute_metric(logits, pair_idx)`` (a float from logits ``[1, pos, vocab]``) gets its
    ``clean``/``corrupted``/``correct``/``incorrect`` lists from those methods on first use, and
    its ``metric`` from ``compute_metric`` (see :func:`seed_metric`), so it can be passed
    wherever a dataset is accepted. :func:`as_patching_dataset` converts any object with
    these methods. Every dataset has the three methods (from
    :class:`~causalpatch.datasets.protocol.SeedProtocol`).
    """

    clean: list[Any]
    corrupted: list[Any]
    correct: list[int]
    incorrect: list[int]
    metric: str | Metric = "logit_diff"
    metric_kwargs: dict[str, Any] = field(default_factory=dict)
    name: str = "custom"
    info: dict[str, Any] = field(default_factory=dict)
    _: KW_ONLY
    model: InitVar[Any] = None

    #: names of further per-pair lists a subclass keeps aligned (sliced by :meth:`subset`)
    per_pair_fields: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self, model: HookedModel | None) -> None:
        self.clean = _as_list(self.clean, "clean")
        self.corrupted = _as_list(self.corrupted, "corrupted")
        self.correct = _as_list(self.correct, "correct")
        self.incorrect = _as_list(self.incorrect, "incorrect")
        self.metric_kwargs = dict(self.metric_kwargs or {})
        self.info = dict(self.info or {})
        if len(self.clean) == 0:
            raise InvalidArgumentError(
                f"dataset has no pairs ({self.name!r}): give at least one clean/corrupted pair")
        lengths = (len(self.clean), len(self.corrupted), len(self.correct), len(self.incorrect))
        if len(set(lengths)) != 1:
            raise InvalidArgumentError(
                f"dataset {self.name!r}: lists differ in length: clean {lengths[0]}, corrupted "
                f"{lengths[1]}, correct {lengths[2]}, incorrect {lengths[3]}")
        # an answer may be None (a dataset for answer-free metrics such as l2); the fields keep
        # the seed protocol's list[int] for the datasets that have answers
        self.correct = [answer_token(model, a, "correct", i)  # type: ignore[misc]
                        for i, a in enumerate(self.correct)]
        self.incorrect = [answer_token(model, a, "incorrect", i)  # type: ignore[misc]
                          for i, a in enumerate(self.incorrect)]
        if model is not None:
            self.check_lengths(model)

    # -- sequence protocol ----------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.clean)

    def __getitem__(self, i: int) -> PatchingPair:
        if isinstance(i, bool) or not hasattr(i, "__index__"):
            raise InvalidTypeError(
                f"dataset index must be an int, got {type(i).__name__}; use .subset(indices)")
        i = int(i)
        if not -len(self) <= i < len(self):
            raise OutOfRangeError(f"pair index {i} is out of range for {len(self)} pairs")
        return PatchingPair(self.clean[i], self.corrupted[i], self.correct[i], self.incorrect[i])

    def __iter__(self) -> Iterator[PatchingPair]:
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:
        metric = self.metric if isinstance(self.metric, str) else self.metric.name
        return f"{type(self).__name__}(name={self.name!r}, pairs={len(self)}, metric={metric!r})"

    # -- slicing ----------------------------------------------------------------------------------
    def subset(self, indices: Sequence[int]) -> PatchingDataset:
        """A dataset of the same class holding the pairs at ``indices`` (in that order).

        Per-pair extras of a subclass (``orders``, ``subjects``, ``years_above`` ...) are sliced
        too, so ``greater_than_metric(logits, data.subset(rows))`` stays aligned.
        """
        idx = []
        for i in indices:
            if isinstance(i, bool) or not hasattr(i, "__index__"):
                raise InvalidTypeError(f"subset indices must be ints, got {type(i).__name__}")
            if not -len(self) <= int(i) < len(self):
                raise OutOfRangeError(f"pair index {int(i)} is out of range for {len(self)} pairs")
            idx.append(int(i))
        if not idx:
            raise InvalidArgumentError("dataset has no pairs: subset() needs at least one index")
        new = copy.copy(self)
        for name in ("clean", "corrupted", "correct", "incorrect", *self.per_pair_fields):
            values = getattr(self, name)
            setattr(new, name, [values[i] for i in idx])
        new.info = dict(self.info)
        new.metric_kwargs = dict(self.metric_kwargs)
        return new

    def batches(self, size: int) -> Iterator[PatchingDataset]:
        """Consecutive sub-datasets of at most ``size`` pairs (see :meth:`subset`)."""
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise InvalidArgumentError(f"batch size must be an int >= 1, got {size!r}")
        for lo in range(0, len(self), size):
            yield self.subset(range(lo, min(lo + size, len(self))))

    def by_length(self, model: HookedModel) -> dict[int, PatchingDataset]:
        """The pairs grouped by token length, ``{n_tokens: sub-dataset}`` (see :meth:`subset`),
        largest group first (ties: shorter first); pairs keep their order inside a group.

        ``by_position=True`` sweeps need pairs of one token length; this is the grouping their
        error message asks for::

            groups = data.by_length(model)
            n_tokens, same = next(iter(groups.items()))   # the largest group
            activation_patching(model, same, component="resid_post", by_position=True)
        """
        members: dict[int, list[int]] = {}
        for i, prompt in enumerate(self.clean):
            members.setdefault(n_tokens(model, prompt), []).append(i)
        order = sorted(members, key=lambda n: (-len(members[n]), n))
        return {n: self.subset(members[n]) for n in order}

    # -- checks and construction ------------------------------------------------------------------
    def check_lengths(self, model: HookedModel) -> None:
        """Raise :class:`InvalidArgumentError` if a pair's prompts differ in token length."""
        for i, (c, k) in enumerate(zip(self.clean, self.corrupted)):
            nc, nk = n_tokens(model, c), n_tokens(model, k)
            if nc != nk:
                raise InvalidArgumentError(
                    f"pair {i} of dataset {self.name!r}: clean has {nc} tokens, corrupted has "
                    f"{nk}; patching needs equal token lengths (check model.to_str_tokens)")

    @classmethod
    def from_pairs(cls, model: HookedModel,
                   pairs: Sequence[tuple[Any, Any, str | int, str | int]],
                   metric: str | Metric = "logit_diff", name: str = "custom",
                   metric_kwargs: dict[str, Any] | None = None) -> PatchingDataset:
        """Build from ``(clean, corrupted, correct, incorrect)`` tuples.

        Answers given as strings must be single tokens (``" Paris"``, mind the space); token
        lengths are checked pair by pair.

        Example::

            PatchingDataset.from_pairs(model, [("When Mary and John went out, John gave it to",
                                                "When Mary and John went out, Mary gave it to",
                                                " Mary", " John")])
        """
        pairs = _as_list(pairs, "pairs")
        if not pairs:
            raise InvalidArgumentError("dataset has no pairs: from_pairs got an empty list")
        for i, p in enumerate(pairs):
            if not isinstance(p, (tuple, list)) or len(p) != 4:
                raise InvalidArgumentError(
                    f"pairs[{i}] must be a (clean, corrupted, correct, incorrect) tuple, got "
                    f"{p!r}")
        return PatchingDataset([p[0] for p in pairs], [p[1] for p in pairs],
                               [model.to_single_token(p[2]) for p in pairs],
                               [model.to_single_token(p[3]) for p in pairs], metric,
                               metric_kwargs or {}, name, model=model)


# -- another library's dataset -> ours --------------------------------------------------------
def as_patching_dataset(obj: Any, model: HookedModel | None = None) -> Any:
    """``obj`` in the form every patching function accepts.

    A :class:`PatchingDataset` (also a seeds'-style subclass) is returned as it is. Another
    object with the seeds' methods (``get_clean_corrupt_pairs()``, optionally
    ``get_target_tokens(i)`` and ``compute_metric(logits, i)``; e.g. a subclass of another
    library's ``PatchingDataset``) becomes a :class:`PatchingDataset` with those pairs,
    answers and, when it has ``compute_metric``, that metric (:func:`seed_metric`); answer
    strings are converted with ``model``. Anything else (prompts, token ids) is returned
    unchanged.
    """
    if isinstance(obj, PatchingDataset) or not callable(getattr(obj, "get_clean_corrupt_pairs",
                                                                None)):
        return obj
    lists = seed_lists(obj, model if model is not None else getattr(obj, "model", None))
    compute = getattr(obj, "compute_metric", None)
    metric: str | Metric = getattr(obj, "metric", None) or "logit_diff"
    if callable(compute):
        metric = seed_metric(compute, lists["correct"], lists["incorrect"],
                             f"{type(obj).__name__}.compute_metric")
    name = getattr(obj, "name", None)
    return PatchingDataset(lists["clean"], lists["corrupted"], lists["correct"],
                           lists["incorrect"], metric,
                           name=name if isinstance(name, str) else type(obj).__name__)

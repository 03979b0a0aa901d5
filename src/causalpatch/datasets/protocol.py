"""The seeds' dataset protocol, and how datasets written in it become ours.

The seed framework describes a dataset by three methods:

* ``get_clean_corrupt_pairs()`` — ``[(clean, corrupted), ...]``;
* ``get_target_tokens(pair_idx)`` — ``(correct_id, incorrect_id)`` for one pair (optional);
* ``compute_metric(logits, pair_idx)`` — a float from that pair's logits ``[1, pos, vocab]``
  (optional).

This module holds both directions of that protocol:

* :class:`SeedProtocol` gives every :class:`~causalpatch.datasets.PatchingDataset` the three
  methods (read from its ``clean``/``corrupted``/``correct``/``incorrect`` lists), and lets a
  subclass written in the seeds' style — one that defines ``get_clean_corrupt_pairs()`` and
  never calls ``PatchingDataset.__init__`` — fill those lists (and its ``metric``) from its own
  methods on first use;
* :func:`seed_lists` reads the four lists from any object with the seeds' methods, and
  :func:`seed_metric` wraps a ``compute_metric`` as a :class:`~causalpatch.metrics.Metric`.

:func:`~causalpatch.datasets.as_patching_dataset`, which turns a foreign object with these
methods into a ``PatchingDataset``, lives beside that class in :mod:`.base` (it builds one);
this module sits below it, so the base class can inherit :class:`SeedProtocol`.
:func:`answer_token` is the one conversion of an answer (id, one-element tensor or string) to a
token id, shared by the protocol and the base class.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..errors import InvalidArgumentError, InvalidTypeError
from ..metrics import Metric, MetricInputs

if TYPE_CHECKING:
    from ..model import HookedModel

#: the attributes a seeds'-style subclass gets from its methods when first asked for them
_SEED_FIELDS = ("clean", "corrupted", "correct", "incorrect", "metric_kwargs", "info")


def answer_token(model: HookedModel | None, value: Any, what: str, i: int) -> int | None:
    """Answer ``value`` of pair ``i`` as a token id (``what`` names the list in errors).

    None stays None; a string needs ``model`` and must be one token
    (``model.to_single_token``); an int or one-element tensor is range-checked when ``model``
    is given.

    Raises:
        InvalidTypeError: a string without ``model``, or a value that is no token id.
    """
    if value is None:
        return None
    if isinstance(value, str):
        if model is None:
            raise InvalidTypeError(
                f"{what}[{i}] is the string {value!r}; pass model= (or use from_pairs) to "
                "convert answer strings to token ids")
        return model.to_single_token(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise InvalidTypeError(
            f"{what}[{i}] must be a token id (int), got {type(value).__name__}")
    token = int(value)
    if model is not None:
        token = model.to_single_token(token)  # range check
    return token


def _seed_style(cls: type[SeedProtocol]) -> bool:
    """A :class:`SeedProtocol` subclass that defines its pairs by ``get_clean_corrupt_pairs``."""
    return cls.get_clean_corrupt_pairs is not SeedProtocol.get_clean_corrupt_pairs


def seed_lists(obj: Any, model: Any) -> dict[str, list[Any]]:
    """``clean``/``corrupted``/``correct``/``incorrect`` from the seeds' methods of ``obj``.

    ``get_target_tokens`` is asked only when ``obj`` defines its own (a dataset that inherits
    the default would read back the lists being built); without it the answers are None.
    Answer strings are converted with ``model`` (:func:`answer_token`).

    Raises:
        InvalidArgumentError: no pairs, a pair that is not ``(clean, corrupted)``, or targets
            that are not ``(correct_id, incorrect_id)``.
    """
    what = type(obj).__name__
    pairs = obj.get_clean_corrupt_pairs()
    pairs = list(pairs) if pairs is not None else []
    if not pairs:
        raise InvalidArgumentError(
            f"dataset has no pairs: {what}.get_clean_corrupt_pairs() returned none")
    for i, p in enumerate(pairs):
        if not isinstance(p, (tuple, list)) or len(p) != 2:
            raise InvalidArgumentError(
                f"{what}.get_clean_corrupt_pairs()[{i}] must be a (clean, corrupted) pair, got "
                f"{p!r}")
    own_targets = not (isinstance(obj, SeedProtocol) and type(obj).get_target_tokens
                       is SeedProtocol.get_target_tokens)
    correct: list[Any] = []
    incorrect: list[Any] = []
    for i in range(len(pairs)):
        target = obj.get_target_tokens(i) if own_targets and hasattr(obj, "get_target_tokens") \
            else (None, None)
        if not isinstance(target, (tuple, list)) or len(target) != 2:
            raise InvalidArgumentError(
                f"{what}.get_target_tokens({i}) must return (correct_id, incorrect_id), got "
                f"{target!r}")
        correct.append(answer_token(model, target[0], "correct", i))
        incorrect.append(answer_token(model, target[1], "incorrect", i))
    return {"clean": [p[0] for p in pairs], "corrupted": [p[1] for p in pairs],
            "correct": correct, "incorrect": incorrect}


def _fill_from_seed_methods(ds: SeedProtocol) -> None:
    state = ds.__dict__
    if "clean" not in state:
        state.update(seed_lists(ds, state.get("model")))
    state.setdefault("metric_kwargs", {})
    state.setdefault("info", {})


def seed_metric(compute_metric: Any, correct: Sequence[int | None],
                incorrect: Sequence[int | None], name: str = "compute_metric") -> Metric:
    """A :class:`Metric` calling the seeds' ``compute_metric(logits, pair_idx)`` per row.

    Each row's logits are passed as ``[1, 1, vocab]`` (so ``logits[0, -1, token]`` works) with
    the index of the first pair whose answer tokens are the row's: exact when the metric
    depends on the pair only through ``get_target_tokens(pair_idx)``, as in the seeds.
    """
    pairs = list(zip(correct, incorrect))

    def per_pair(logits: torch.Tensor, inputs: MetricInputs) -> torch.Tensor:
        if inputs.correct is None or inputs.incorrect is None:
            raise InvalidArgumentError(
                f"metric {name!r} finds each row's pair by its answer tokens: define "
                "get_target_tokens(pair_idx) on the dataset")
        values = []
        for r in range(logits.shape[0]):
            key = (int(inputs.correct[r]), int(inputs.incorrect[r]))
            if key not in pairs:
                raise InvalidArgumentError(
                    f"metric {name!r}: no pair of the dataset has answer tokens {key}")
            values.append(float(compute_metric(logits[r].reshape(1, 1, -1), pairs.index(key))))
        return torch.tensor(values, dtype=torch.float32)

    return Metric(name, per_pair, "score", ("correct", "incorrect"),
                  "the dataset's own compute_metric(logits, pair_idx)")


def _seed_metric_of(ds: SeedProtocol) -> str | Metric:
    state = ds.__dict__
    if "_metric" not in state:
        _fill_from_seed_methods(ds)
        state["_metric"] = seed_metric(ds.compute_metric, state["correct"], state["incorrect"],
                                       f"{type(ds).__name__}.compute_metric")
    return state["_metric"]


def _set_seed_metric(ds: SeedProtocol, value: str | Metric) -> None:
    ds.__dict__["_metric"] = value


class SeedProtocol:
    """The seeds' three methods on top of the four aligned lists, and seeds'-style subclasses.

    :class:`~causalpatch.datasets.PatchingDataset` inherits this class; nothing else does. A
    subclass that overrides ``get_clean_corrupt_pairs`` (the seeds' style) gets ``clean``,
    ``corrupted``, ``correct``, ``incorrect``, ``metric_kwargs`` and ``info`` from its methods
    when one of them is first looked up and missing, and — when it also defines
    ``compute_metric`` and no ``metric`` — a ``metric`` property wrapping that method
    (:func:`seed_metric`).
    """

    clean: list[Any]
    corrupted: list[Any]
    correct: list[int]
    incorrect: list[int]
    metric: str | Metric

    def get_clean_corrupt_pairs(self) -> list[tuple[Any, Any]]:
        """``[(clean, corrupted), ...]`` (the seeds' spelling of the two prompt lists)."""
        return list(zip(self.clean, self.corrupted))

    def get_target_tokens(self, pair_idx: int) -> tuple[int | None, int | None]:
        """``(correct, incorrect)`` answer token ids of pair ``pair_idx``."""
        return self.correct[pair_idx], self.incorrect[pair_idx]

    def compute_metric(self, logits: torch.Tensor, pair_idx: int) -> float:
        """The dataset's metric on pair ``pair_idx``'s logits (``[1, pos, vocab]``: the last
        position; or ``[1, vocab]``), as a float. Distance metrics need a target run and are
        refused here."""
        from ..metrics import get_metric

        metric = get_metric(self.metric)
        if metric.kind != "score":
            raise InvalidArgumentError(
                f"compute_metric: {metric.name!r} is a distance to another run's logits; it is "
                "computed by the patching functions, not per pair")
        last = logits[:, -1] if logits.dim() == 3 else logits.reshape(1, -1)
        correct, incorrect = self.get_target_tokens(pair_idx)
        ids = lambda v: None if v is None else torch.tensor([int(v)])  # noqa: E731
        return float(metric(last[:1], MetricInputs(correct=ids(correct),
                                                   incorrect=ids(incorrect)))[0])

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if _seed_style(cls) and "metric" not in cls.__dict__ \
                and cls.compute_metric is not SeedProtocol.compute_metric:
            cls.metric = property(_seed_metric_of, _set_seed_metric)  # type: ignore[assignment]

    def __getattr__(self, name: str) -> Any:
        # only reached when normal lookup fails: a seed-style subclass that never ran __init__
        if name in _SEED_FIELDS and _seed_style(type(self)):
            _fill_from_seed_methods(self)
            return self.__dict__[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

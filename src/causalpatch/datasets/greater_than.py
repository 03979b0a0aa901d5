"""Greater-than: "The war lasted from the year 1732 to the year 17", after Hanna et al. (2023).

Clean: a sentence about an event that starts in year ``17YY`` and ends in a year that must be
later, cut just before the end year's last digits: "The war lasted from the year 1732 to the
year 17". Corrupted: the same sentence starting from "1701", as in the paper, after which
almost every year is later. What counts as an answer depends on how the tokenizer splits a
year, detected at construction (``answer_unit``):

* ``"digit"`` (SmolLM2, Gemma, Qwen, LLaMA-3 style) — the next token is the end year's **tens
  digit**; digits above the start year's tens digit are later years, those below are earlier,
  and the start decade's own digit counts in neither (it holds earlier and later years)
  unless the start year ends in 9;
* ``"two_digit"`` (GPT-2 style, as in the paper) — the next token is the two-digit ``YY``.

Each pair keeps ``years_above`` / ``years_below``, the answer tokens that are entirely later /
not later than its start year; ``correct`` is the earliest of the first and ``incorrect`` the
latest of the second. The metric, ``"greater_than"`` (:func:`greater_than_metric`), is the
probability of the later tokens minus that of the earlier ones. The nouns (:data:`GT_NOUNS`)
are written for causalpatch.

Roles (per token of the clean prompt, Hanna et al.'s names): ``"NOUN"`` (the event),
``"XX1"`` (the start year's century), ``"YY"`` (its last two digits), ``"END"``; ``""``
elsewhere.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..errors import InvalidArgumentError, InvalidTypeError, ShapeMismatchError
from ..metrics import Metric, MetricInputs
from .base import PatchingDataset, check_n, n_tokens
from .roles import format_spans, token_roles

if TYPE_CHECKING:
    from ..model import HookedModel


# -- prompts ----------------------------------------------------------------------------------
GT_NOUNS: tuple[str, ...] = (
    "war", "expedition", "drought", "reign", "siege", "strike", "famine", "festival",
    "journey", "rebellion", "occupation", "voyage", "campaign", "epidemic", "alliance",
    "construction",
)
_GT_TEMPLATE = "The {noun} lasted from the year {century}{yy:02d} to the year {century}"


# -- the metric -------------------------------------------------------------------------------
def _year_mass(logits: torch.Tensor, above: Sequence[Sequence[int]],
               below: Sequence[Sequence[int]]) -> torch.Tensor:
    if logits.dim() == 3:
        logits = logits[:, -1]
    if logits.dim() != 2:
        raise ShapeMismatchError(
            f"greater_than_metric takes logits [batch, vocab], got shape {tuple(logits.shape)}")
    if len(above) != logits.shape[0] or len(below) != logits.shape[0]:
        raise ShapeMismatchError(
            f"greater_than_metric: logits have {logits.shape[0]} rows but the dataset rows "
            f"give {len(above)}")
    probs = torch.softmax(logits.float(), dim=-1)
    mask = torch.zeros_like(probs)
    for r, (up, down) in enumerate(zip(above, below)):
        mask[r, list(up)] = 1.0
        mask[r, list(down)] = -1.0
    return (probs * mask).sum(-1)


def greater_than_metric(logits: torch.Tensor, rows: Any) -> torch.Tensor:
    """Probability on years after the start year minus probability on the others.

    Args:
        logits: ``[batch, vocab]`` next-token logits (``[batch, pos, vocab]``: last position).
        rows: a :class:`GreaterThanDataset` (or a ``subset`` of one) aligned with the batch;
            its ``years_above[i]`` / ``years_below[i]`` are the answer tokens whose every year
            is later than / not later than row ``i``'s start year.

    Returns:
        ``[batch]`` float32: ``sum p(years_above) - sum p(years_below)``, in ``[-1, 1]``.

    Example::

        gt = GreaterThanDataset(model, n=8)
        greater_than_metric(model.trace(gt.clean).run().last_logits, gt)   # shape [8]
    """
    if not hasattr(rows, "years_above") or not hasattr(rows, "years_below"):
        raise InvalidTypeError(
            "greater_than_metric needs the GreaterThanDataset rows (with years_above and "
            f"years_below), got {type(rows).__name__}")
    return _year_mass(logits, rows.years_above, rows.years_below)


def _greater_than_metric_object(answer_ids: Sequence[int]) -> Metric:
    """The dataset's :class:`Metric`: sets derived from each row's correct/incorrect token.

    ``answer_ids`` are the answer tokens in year order; ``correct`` is the earliest token that
    is entirely later than the start year and ``incorrect`` the latest token that is entirely
    not later, so tokens at or after ``correct`` count as "above" and tokens at or before
    ``incorrect`` as "below" (a decade digit holding the start year counts in neither).
    """
    ids = torch.tensor(list(answer_ids))

    def greater_than(logits: torch.Tensor, inputs: MetricInputs) -> torch.Tensor:
        if inputs.correct is None or inputs.incorrect is None:
            raise InvalidArgumentError("metric 'greater_than' needs correct and incorrect tokens")
        where = ids.to(logits.device).view(1, -1)
        hit_c = inputs.correct.view(-1, 1).to(logits.device) == where
        hit_i = inputs.incorrect.view(-1, 1).to(logits.device) == where
        if not bool(hit_c.any(-1).all() and hit_i.any(-1).all()):
            raise InvalidArgumentError(
                "metric 'greater_than' needs correct/incorrect tokens from a GreaterThanDataset")
        pos = torch.arange(len(ids), device=logits.device).view(1, -1)
        c_pos = hit_c.float().argmax(-1, keepdim=True)  # [batch, 1] index into ids
        i_pos = hit_i.float().argmax(-1, keepdim=True)
        probs = torch.softmax(logits.float(), dim=-1)[:, ids.to(logits.device)]
        return (probs * (pos >= c_pos)).sum(-1) - (probs * (pos <= i_pos)).sum(-1)

    return Metric("greater_than", greater_than, "score", ("correct", "incorrect"),
                  greater_than.__doc__ or _greater_than_metric_object.__doc__ or "")


# -- roles ------------------------------------------------------------------------------------
def _greater_than_roles(model: HookedModel, noun: str, century: int, yy: int) -> list[str] | None:
    """Hanna et al.'s roles: NOUN, the start year's century (XX1) and last digits (YY), END."""
    form = _GT_TEMPLATE.replace("{yy:02d}", "{yy}").replace("{century}", "{c1}", 1) \
        .replace("{century}", "{c2}", 1)
    text, spans = format_spans(form, {"noun": noun, "c1": str(century), "yy": f"{yy:02d}",
                                       "c2": str(century)})
    return token_roles(model, text, [(*spans["noun"], "NOUN"), (*spans["c1"], "XX1"),
                                     (*spans["yy"], "YY")])


# -- the dataset ------------------------------------------------------------------------------
class GreaterThanDataset(PatchingDataset):
    """"The war lasted from the year 1732 to the year 17" vs the "1701" corruption.

    After Hanna et al. (2023). The answer is the next token after the final "17". How a year
    is split depends on the tokenizer, detected at construction (``answer_unit``):

    * ``"digit"`` — the tokenizer splits numbers into single digits (SmolLM2, Gemma, Qwen,
      LLaMA-3 style): the next token is the **tens digit** of the end year. A start year
      ``17YY`` with tens digit ``d`` and units ``u`` gives ``years_above`` = digits ``> d``
      (every year of those decades is later) and ``years_below`` = digits ``< d``, plus ``d``
      itself when ``u = 9``. Otherwise the start decade mixes earlier and later years and
      counts in neither. Start years are drawn from 1710–1789, so both sets are non-empty
      (the paper draws 1702–1798).
    * ``"two_digit"`` — the tokenizer makes "17" and "YY" separate tokens (GPT-2 style, as in
      the paper): the next token is the two-digit year ``YY``; ``years_above`` are the ``YY'``
      tokens with ``YY' > YY``, ``years_below`` those with ``YY' <= YY``. Start years
      ``02..98`` whose "YY" is one token there.

    Corrupted: the same sentence starting from "1701", as in the paper. ``correct[i]`` is the
    earliest token in ``years_above[i]`` and ``incorrect[i]`` the latest in
    ``years_below[i]``; the dataset's ``metric`` (``"greater_than"``) recovers both sets from
    them and equals :func:`greater_than_metric`.

    Attributes (one entry per pair): ``start_years`` (e.g. 1732), ``years_above``,
    ``years_below`` (token-id lists), ``roles`` (per token: ``"NOUN"``, ``"XX1"`` the start
    year's century, ``"YY"`` its last two digits, ``"END"`` or ``""``); ``answer_ids`` (all
    answer tokens in year order).

    Example::

        gt = GreaterThanDataset(model, n=8, seed=0)
        gt.clean[0]          # 'The war lasted from the year 1732 to the year 17'
        gt.answer_unit       # 'digit' for SmolLM2
    """

    per_pair_fields: ClassVar[tuple[str, ...]] = ("start_years", "years_above", "years_below",
                                                   "nouns", "roles")

    def __init__(self, model: HookedModel, n: int = 32, seed: int = 0,
                 century: int = 17, nouns: Sequence[str] | None = None) -> None:
        check_n(n)
        if isinstance(century, bool) or not isinstance(century, int) or not 10 <= century <= 99:
            raise InvalidArgumentError(f"century must be a two-digit int like 17, got {century!r}")
        noun_pool = list(GT_NOUNS if nouns is None else nouns)
        if not noun_pool:
            raise InvalidArgumentError("nouns is empty")
        probe = _GT_TEMPLATE.format(noun=noun_pool[0], century=century, yy=1)
        unit, answers = self._answer_tokens(model, probe)
        self.answer_unit: str = unit
        # answers: [(token id, first year offset, last year offset)] in year order
        self.answer_ids: list[int] = [a[0] for a in answers]
        if unit == "digit":
            starts = list(range(10, 90))
        else:
            single = {a[1] for a in answers}
            starts = [y for y in range(2, 99) if y in single and y + 1 <= max(single)]
        rng = random.Random(seed)
        rows: dict[str, list[Any]] = defaultdict(list)
        attempts = 0
        while len(rows["clean"]) < n:
            attempts += 1
            if attempts > 100 * n + 100:
                raise InvalidArgumentError(
                    f"could only build {len(rows['clean'])} of {n} greater-than pairs with equal "
                    "clean/corrupted token lengths for this tokenizer")
            noun, yy = rng.choice(noun_pool), rng.choice(starts)
            text = _GT_TEMPLATE.format(noun=noun, century=century, yy=yy)
            other = _GT_TEMPLATE.format(noun=noun, century=century, yy=1)
            if n_tokens(model, text) != n_tokens(model, other):
                continue
            above = [t for t, lo, _ in answers if lo > yy]
            below = [t for t, _, hi in answers if hi <= yy]
            if not above or not below:
                continue
            for key, value in (("clean", text), ("corrupted", other), ("correct", above[0]),
                               ("incorrect", below[-1]), ("start_years", century * 100 + yy),
                               ("years_above", above), ("years_below", below),
                               ("nouns", noun),
                               ("roles", _greater_than_roles(model, noun, century, yy))):
                rows[key].append(value)
        for key in self.per_pair_fields:
            setattr(self, key, rows[key])
        super().__init__(rows["clean"], rows["corrupted"], rows["correct"], rows["incorrect"],
                         _greater_than_metric_object(self.answer_ids), {}, "greater_than",
                         {"seed": seed, "century": century, "answer_unit": unit}, model=model)

    @staticmethod
    def _answer_tokens(model: HookedModel,
                       probe: str) -> tuple[str, list[tuple[int, int, int]]]:
        """Detect how the year after ``probe`` ("... to the year 17") is tokenised."""
        from ..tokens import token_lists

        base = token_lists(model, probe)[0]

        def next_token(suffix: str) -> int | None:
            ids = token_lists(model, probe + suffix)[0]
            if len(ids) == len(base) + 1 and ids[:len(base)] == base:
                return ids[-1]
            return None

        two = [(next_token(f"{y:02d}"), y) for y in range(100)]
        two_ok = [(t, y, y) for t, y in two if t is not None]
        if len(two_ok) >= 50 and len({t for t, _, _ in two_ok}) == len(two_ok):
            return "two_digit", two_ok
        digits = [next_token(str(d)) for d in range(10)]
        if all(t is not None for t in digits) and len(set(digits)) == 10:
            return "digit", [(int(t), 10 * d, 10 * d + 9)  # type: ignore[arg-type]
                             for d, t in enumerate(digits)]
        raise InvalidArgumentError(
            "this tokenizer neither splits years into single digits nor into '17' + two-digit "
            "tokens after 'to the year 17'; GreaterThanDataset does not support it")

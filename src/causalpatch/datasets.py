"""Task datasets of clean/corrupted prompt pairs with answer tokens.

Any object with aligned lists ``.clean``, ``.corrupted``, ``.correct``, ``.incorrect`` can be
passed to :func:`causalpatch.activation_patching` in place of a single pair; every dataset here
is a :class:`PatchingDataset`. Pairs are averaged as described in :mod:`causalpatch.sweep`.

* :class:`IOIDataset` – indirect object identification (Wang et al., 2022).
* :class:`FactualRecallDataset` – subject swaps within a relation of the ROME "known facts".
* :class:`GreaterThanDataset` – "from the year 1732 to the year 17..." (Hanna et al., 2023).
* :class:`InductionDataset` – repeated random token sequences.

Example::

    from causalpatch import InterpretableModel, activation_patching
    from causalpatch.datasets import IOIDataset
    model = InterpretableModel("smollm2")
    ioi = IOIDataset(model, n=16, seed=0)
    result = activation_patching(model, ioi, component="attn_head")
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import InvalidArgumentError
from .metrics import Metric, MetricInputs

if TYPE_CHECKING:
    from .model import InterpretableModel


@dataclass(frozen=True)
class PatchingPair:
    """One clean/corrupted pair with its answer token ids."""

    clean: Any
    corrupted: Any
    correct: int | None
    incorrect: int | None


@dataclass
class PatchingDataset:
    """Aligned clean/corrupted prompts and answer tokens.

    Attributes:
        clean, corrupted: prompts (strings or token-id lists), equal token length pairwise.
        correct, incorrect: answer token ids, one per pair.
        metric: the metric this task is measured with (a name or a :class:`Metric`).
        name: a short description.
    """

    clean: list[Any]
    corrupted: list[Any]
    correct: list[int]
    incorrect: list[int]
    metric: str | Metric = "logit_diff"
    name: str = "custom"
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        lengths = {len(self.clean), len(self.corrupted), len(self.correct), len(self.incorrect)}
        if len(self.clean) == 0:
            raise InvalidArgumentError(f"dataset {self.name!r} has no pairs")
        if len(lengths) != 1:
            raise InvalidArgumentError(
                f"dataset {self.name!r} lists differ in length: clean {len(self.clean)}, "
                f"corrupted {len(self.corrupted)}, correct {len(self.correct)}, incorrect "
                f"{len(self.incorrect)}")

    def __len__(self) -> int:
        return len(self.clean)

    def __getitem__(self, i: int) -> PatchingPair:
        return PatchingPair(self.clean[i], self.corrupted[i], self.correct[i], self.incorrect[i])

    def __iter__(self) -> Iterator[PatchingPair]:
        return (self[i] for i in range(len(self)))

    def subset(self, indices: Sequence[int]) -> PatchingDataset:
        """A dataset of the pairs at ``indices``."""
        pick = lambda xs: [xs[i] for i in indices]  # noqa: E731
        return PatchingDataset(pick(self.clean), pick(self.corrupted), pick(self.correct),
                               pick(self.incorrect), self.metric, self.name, dict(self.info))

    def batches(self, size: int) -> Iterator[PatchingDataset]:
        """Consecutive sub-datasets of at most ``size`` pairs."""
        if size < 1:
            raise InvalidArgumentError(f"batch size must be at least 1, got {size}")
        for lo in range(0, len(self), size):
            yield self.subset(range(lo, min(lo + size, len(self))))

    def check_lengths(self, model: InterpretableModel) -> None:
        """Raise if any pair's clean and corrupted prompts differ in token length."""
        from .tracing import token_lists

        for i, (c, k) in enumerate(zip(self.clean, self.corrupted)):
            nc, nk = len(token_lists(model, c)[0]), len(token_lists(model, k)[0])
            if nc != nk:
                raise InvalidArgumentError(
                    f"pair {i} of dataset {self.name!r}: clean has {nc} tokens, corrupted has {nk}")

    @classmethod
    def from_pairs(cls, model: InterpretableModel,
                   pairs: Sequence[tuple[str, str, str | int, str | int]],
                   metric: str | Metric = "logit_diff", name: str = "custom") -> PatchingDataset:
        """Build from ``(clean, corrupted, correct, incorrect)`` tuples; answers as strings
        must be single tokens."""
        if not pairs:
            raise InvalidArgumentError(f"dataset {name!r} has no pairs")
        data = cls([p[0] for p in pairs], [p[1] for p in pairs],
                   [model.to_single_token(p[2]) for p in pairs],
                   [model.to_single_token(p[3]) for p in pairs], metric, name)
        data.check_lengths(model)
        return data


def _single_token_names(model: InterpretableModel, names: Sequence[str]) -> tuple[list[str], int]:
    keep = [n for n in names
            if len(model.tokenizer.encode(" " + n, add_special_tokens=False)) == 1]
    return keep, len(names) - len(keep)


# -- IOI --------------------------------------------------------------------------------------
#: Templates: {X} and {Y} are the first two mentions, {S} the repeated subject.
IOI_TEMPLATES: tuple[str, ...] = (
    "When {X} and {Y} went to the {place}, {S} gave a {obj} to",
    "After {X} and {Y} arrived at the {place}, {S} handed a {obj} to",
    "While {X} and {Y} were at the {place}, {S} passed a {obj} to",
    "Then {X} and {Y} had a long day at the {place}. {S} gave a {obj} to",
    "Yesterday {X} and {Y} were working at the {place}. {S} decided to give a {obj} to",
    "When {X} and {Y} got a {obj} at the {place}, {S} gave it to",
    "Once {X} and {Y} met at the {place}, {S} threw a {obj} to",
    "Because {X} and {Y} stayed at the {place}, {S} brought a {obj} to",
    "After the lunch, {X} and {Y} went to the {place}. {S} sold a {obj} to",
    "Later {X} and {Y} walked into the {place}, and {S} showed a {obj} to",
)
IOI_NAMES: tuple[str, ...] = (
    "Mary", "John", "Alice", "Bob", "James", "Sarah", "David", "Emma", "Michael", "Anna",
    "Tom", "Lisa", "Paul", "Laura", "Mark", "Kate", "Peter", "Jane", "George", "Rachel",
    "Daniel", "Emily", "Chris", "Anne", "Steve", "Amy", "Kevin", "Helen", "Brian", "Susan",
    "Jack", "Linda", "Eric", "Karen", "Adam", "Julia", "Ryan", "Grace", "Sam", "Lucy",
    "Henry", "Nancy", "Frank", "Alex", "Robert", "Maria", "Richard", "Jessica",
)
IOI_PLACES: tuple[str, ...] = ("store", "school", "park", "hospital", "station", "office",
                               "garden", "market", "restaurant", "library")
IOI_OBJECTS: tuple[str, ...] = ("drink", "book", "ball", "gift", "bag", "letter", "key",
                                "ring", "bottle", "basket")


class IOIDataset(PatchingDataset):
    """Indirect object identification pairs in the style of Wang et al. (2022).

    Clean: "When Mary and John went to the store, John gave a drink to" (answer: the indirect
    object " Mary"; wrong answer: the subject " John"). Corruptions:

    * ``"swap"``: the second subject mention becomes the other name ("... Mary gave a drink
      to"), so the repeated name — and the right answer — flips;
    * ``"abc"``: all three name slots get three unrelated names.

    ``order="ABBA"`` puts the indirect object first ("Mary and John ..., John"), ``"BABA"`` the
    subject first; ``"both"`` alternates. Names that are not a single token (with a leading
    space) for the model's tokenizer are dropped; ``dropped_names`` counts them.
    ``equal_length=True`` keeps every prompt at one token length (one template, pairs of
    another length re-drawn), as ``by_position`` sweeps over a dataset need.
    """

    def __init__(self, model: InterpretableModel, n: int = 32, seed: int = 0,
                 templates: Sequence[str] | None = None, names: Sequence[str] | None = None,
                 corruption: str = "swap", order: str = "both",
                 equal_length: bool = False) -> None:
        if n < 1:
            raise InvalidArgumentError(f"n must be at least 1, got {n}")
        if corruption not in ("swap", "abc"):
            raise InvalidArgumentError(f"corruption must be 'swap' or 'abc', got {corruption!r}")
        if order not in ("both", "ABBA", "BABA"):
            raise InvalidArgumentError(f"order must be 'both', 'ABBA' or 'BABA', got {order!r}")
        pool, self.dropped_names = _single_token_names(model, names or IOI_NAMES)
        need = 5 if corruption == "abc" else 2
        if len(pool) < need + 1:
            raise InvalidArgumentError(
                f"only {len(pool)} of the names are single tokens for this tokenizer; IOI needs "
                f"at least {need + 1} (pass names= with more common first names)")
        rng = random.Random(seed)
        templates = list(templates or IOI_TEMPLATES)
        if equal_length:
            templates = templates[:1]
        clean, corrupted, correct, incorrect, orders = [], [], [], [], []
        tok = model.tokenizer
        target = None
        i = -1
        attempts = 0
        while len(clean) < n:
            i += 1
            attempts += 1
            if attempts > 50 * n:
                raise InvalidArgumentError(
                    f"could not draw {n} IOI prompts of equal token length; lower n")
            template = templates[i % len(templates)] if i < len(templates) else rng.choice(
                templates)
            io, s, c1, c2, c3 = rng.sample(pool, 5) if len(pool) >= 5 else (
                *rng.sample(pool, 2), *rng.sample(pool, 3))
            this = order if order != "both" else ("ABBA" if len(clean) % 2 == 0 else "BABA")
            x, y = (io, s) if this == "ABBA" else (s, io)
            place, obj = rng.choice(IOI_PLACES), rng.choice(IOI_OBJECTS)
            fill = dict(place=place, obj=obj)
            text = template.format(X=x, Y=y, S=s, **fill)
            if equal_length:
                length = len(tok(text)["input_ids"])
                target = length if target is None else target
                if length != target:
                    continue
            clean.append(text)
            if corruption == "swap":
                corrupted.append(template.format(X=x, Y=y, S=io, **fill))
            else:
                corrupted.append(template.format(X=c1, Y=c2, S=c3, **fill))
            correct.append(tok.encode(" " + io, add_special_tokens=False)[0])
            incorrect.append(tok.encode(" " + s, add_special_tokens=False)[0])
            orders.append(this)
        super().__init__(clean, corrupted, correct, incorrect, "logit_diff", "ioi",
                         {"corruption": corruption, "orders": orders, "seed": seed})
        self.orders = orders
        self.check_lengths(model)


# -- factual recall ---------------------------------------------------------------------------
def load_known_facts(path: str | Path | None = None) -> list[dict[str, Any]]:
    """The ROME "known facts" (Meng et al., 2022; MIT licence) shipped with the package."""
    if path is not None:
        text = Path(path).read_text(encoding="utf-8")
    else:
        text = resources.files("causalpatch").joinpath("data/known_1000.json").read_text(
            encoding="utf-8")
    facts = json.loads(text)
    if not isinstance(facts, list) or not facts:
        raise InvalidArgumentError("known facts file must hold a non-empty JSON list")
    return facts


def _first_token(model: InterpretableModel, text: str) -> int:
    return model.tokenizer.encode(" " + text.strip(), add_special_tokens=False)[0]


def known_facts(model: InterpretableModel, n: int = 100, seed: int = 0, only_correct: bool = True,
                path: str | Path | None = None, batch_size: int = 32) -> list[dict[str, Any]]:
    """Up to ``n`` facts (dicts with ``prompt``, ``subject``, ``attribute``, ``answer`` id) that
    the model completes correctly (top-1 next token = first token of the attribute)."""
    facts = load_known_facts(path)
    random.Random(seed).shuffle(facts)
    out: list[dict[str, Any]] = []
    for lo in range(0, len(facts), batch_size):
        chunk = facts[lo : lo + batch_size]
        answers = [_first_token(model, f["attribute"]) for f in chunk]
        if only_correct:
            with torch.no_grad():
                top = model.trace([f["prompt"] for f in chunk]).run().last_logits.argmax(-1)
        for j, fact in enumerate(chunk):
            if not only_correct or int(top[j]) == answers[j]:
                out.append({**fact, "answer": answers[j]})
            if len(out) >= n:
                return out
    return out


class FactualRecallDataset(PatchingDataset):
    """Counterfactual pairs from the known facts: the subject swapped within a relation.

    Clean: "Vinson Massif is located in the continent of" (answer " Antarctica"); corrupted:
    the same template with another subject of the same relation and the same token length
    (answer of that fact = the incorrect token).
    """

    def __init__(self, model: InterpretableModel, n: int = 32, seed: int = 0,
                 relation: str | None = None, path: str | Path | None = None) -> None:
        if n < 1:
            raise InvalidArgumentError(f"n must be at least 1, got {n}")
        facts = load_known_facts(path)
        if relation is not None:
            facts = [f for f in facts if f["relation_id"] == relation]
            if not facts:
                raise InvalidArgumentError(f"no known facts with relation_id {relation!r}")
        by_template: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for fact in facts:
            by_template[fact["template"]].append(fact)
        rng = random.Random(seed)
        candidates = []
        for template, group in by_template.items():
            lengths = defaultdict(list)
            for fact in group:
                lengths[len(model.tokenizer(template.format(fact["subject"]))["input_ids"])].append(fact)
            for same in lengths.values():
                for a in same:
                    for b in same:
                        if a is not b:
                            candidates.append((template, a, b))
        rng.shuffle(candidates)
        clean, corrupted, correct, incorrect, subj, csubj, rel = [], [], [], [], [], [], []
        for template, a, b in candidates:
            ca, cb = _first_token(model, a["attribute"]), _first_token(model, b["attribute"])
            if ca == cb:
                continue
            clean.append(template.format(a["subject"]))
            corrupted.append(template.format(b["subject"]))
            correct.append(ca)
            incorrect.append(cb)
            subj.append(a["subject"])
            csubj.append(b["subject"])
            rel.append(a["relation_id"])
            if len(clean) >= n:
                break
        super().__init__(clean, corrupted, correct, incorrect, "logit_diff", "factual_recall",
                         {"seed": seed})
        self.subjects, self.corrupted_subjects, self.relations = subj, csubj, rel


# -- greater-than -----------------------------------------------------------------------------
GT_NOUNS: tuple[str, ...] = ("war", "expedition", "drought", "reign", "project", "journey",
                             "siege", "strike", "festival", "famine")


def greater_than_metric(digit_ids: Sequence[int]) -> Metric:
    """Probability mass on next digits above the threshold minus mass below it.

    ``inputs.correct`` holds the token id of each row's threshold digit (the clean prompt's
    start-year tens digit). SmolLM2-style tokenizers split years into single digits, so after
    "... to the year 17" the next token is the tens digit; a larger tens digit means a later
    year, a smaller one an earlier year, an equal one is undecided (counted in neither).
    """
    ids = torch.tensor(list(digit_ids))

    def fn(logits: torch.Tensor, inputs: MetricInputs) -> torch.Tensor:
        probs = torch.softmax(logits.float(), dim=-1)[:, ids.to(logits.device)]  # [batch, 10]
        assert inputs.correct is not None
        threshold = (inputs.correct.view(-1, 1).to(ids.device) == ids.view(1, -1)).float().argmax(-1)
        digits = torch.arange(10).view(1, -1)
        above = (digits > threshold.view(-1, 1)).float().to(probs.device)
        below = (digits < threshold.view(-1, 1)).float().to(probs.device)
        return (probs * above).sum(-1) - (probs * below).sum(-1)

    return Metric("greater_than", fn, "score", ("correct",), greater_than_metric.__doc__ or "")


class GreaterThanDataset(PatchingDataset):
    """"The war lasted from the year 1732 to the year 17" vs the "1701" corruption.

    The metric (:func:`greater_than_metric`) is the probability of a later tens digit minus an
    earlier one, relative to the clean start year; ``correct`` holds the threshold digit's
    token id and ``incorrect`` the token id of "0" (the corrupted start year's tens digit).
    """

    def __init__(self, model: InterpretableModel, n: int = 32, seed: int = 0,
                 century: int = 17) -> None:
        if n < 1:
            raise InvalidArgumentError(f"n must be at least 1, got {n}")
        tok = model.tokenizer
        digit_ids = [tok.encode(str(d), add_special_tokens=False)[-1] for d in range(10)]
        if len(set(digit_ids)) != 10:
            raise InvalidArgumentError("this tokenizer does not give each digit its own token")
        rng = random.Random(seed)
        clean, corrupted, correct, incorrect, years = [], [], [], [], []
        for i in range(n):
            noun = GT_NOUNS[i % len(GT_NOUNS)]
            yy = rng.randint(21, 88)
            text = "The {} lasted from the year {}{:02d} to the year {}"
            clean.append(text.format(noun, century, yy, century))
            corrupted.append(text.format(noun, century, 1, century))
            correct.append(digit_ids[yy // 10])
            incorrect.append(digit_ids[0])
            years.append(century * 100 + yy)
        super().__init__(clean, corrupted, correct, incorrect, greater_than_metric(digit_ids),
                         "greater_than", {"seed": seed, "start_years": years})
        self.start_years = years
        self.check_lengths(model)


# -- induction --------------------------------------------------------------------------------
class InductionDataset(PatchingDataset):
    """Repeated random token sequences: ``[r, r[:-1]]`` should predict ``r[-1]``.

    Clean: a random sequence ``r`` of ``seq_len`` tokens followed by its first ``seq_len - 1``
    tokens; the answer is the token that continues the repeat. Corrupted: the first half is a
    different random sequence, so there is nothing to copy. Prompts are token-id lists (random
    ids do not round-trip through text). ``incorrect`` is the corrupted first half's token at
    the same place. Metric: ``logit`` of the repeated token.
    """

    def __init__(self, model: InterpretableModel, n: int = 32, seq_len: int = 10,
                 seed: int = 0) -> None:
        if n < 1 or seq_len < 2:
            raise InvalidArgumentError(f"need n >= 1 and seq_len >= 2, got n={n}, seq_len={seq_len}")
        special = set(getattr(model.tokenizer, "all_special_ids", []) or [])
        low, high = min(1000, model.vocab_size // 4), model.vocab_size - 1
        gen = torch.Generator().manual_seed(seed)
        clean, corrupted, correct, incorrect = [], [], [], []
        for _ in range(n):
            first, other = [], []
            while len(first) < seq_len or len(other) < seq_len:
                t = int(torch.randint(low, high, (1,), generator=gen))
                if t in special:
                    continue
                (first if len(first) < seq_len else other).append(t)
            clean.append(first + first[:-1])
            corrupted.append(other + first[:-1])
            correct.append(first[-1])
            incorrect.append(other[-1])
        super().__init__(clean, corrupted, correct, incorrect, "logit", "induction",
                         {"seed": seed, "seq_len": seq_len})
        self.clean_tokens, self.corrupted_tokens = clean, corrupted


__all__ = ["FactualRecallDataset", "GreaterThanDataset", "IOIDataset", "InductionDataset",
           "PatchingDataset", "PatchingPair", "greater_than_metric", "known_facts",
           "load_known_facts"]

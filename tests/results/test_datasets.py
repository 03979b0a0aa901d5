"""Task datasets: aligned pairs, single-token answers, determinism, validation, model checks.

Uses the session fixture ``smollm2`` from conftest (SmolLM2-135M, loaded once).
"""

from __future__ import annotations

import re

import pytest
import torch

from causalpatch import activation_patching
from conftest import assert_within
from causalpatch.datasets import (FactualRecallDataset, GreaterThanDataset, InductionDataset,
                                  IOIDataset, KnownFact, PatchingDataset, PatchingPair,
                                  greater_than_metric, known_facts, load_known_facts)
from causalpatch.errors import InvalidArgumentError, InvalidTypeError, OutOfRangeError
from causalpatch.metrics import MetricInputs
from causalpatch.tokens import token_lists

pytestmark = pytest.mark.real


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Forward passes here are tiny; one thread avoids oversubscription on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


FACTORIES = {
    "ioi-swap": lambda m, seed=0: IOIDataset(m, n=8, seed=seed),
    "ioi-abc": lambda m, seed=0: IOIDataset(m, n=8, seed=seed, corruption="abc"),
    "factual": lambda m, seed=0: FactualRecallDataset(m, n=8, seed=seed),
    "greater-than": lambda m, seed=0: GreaterThanDataset(m, n=8, seed=seed),
    "induction": lambda m, seed=0: InductionDataset(m, n=8, seq_len=6, seed=seed),
}


def _n_tokens(model, prompt) -> int:
    return len(token_lists(model, prompt)[0])


# -- every dataset ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(FACTORIES))
def test_dataset_builds_with_aligned_pairs_and_single_token_answers(smollm2, kind):
    data = FACTORIES[kind](smollm2)
    assert len(data) == 8
    assert len(data.clean) == len(data.corrupted) == len(data.correct) == len(data.incorrect)
    for i, pair in enumerate(data):
        assert isinstance(pair, PatchingPair)
        assert pair == data[i]
        assert _n_tokens(smollm2, pair.clean) == _n_tokens(smollm2, pair.corrupted), i
        assert pair.clean != pair.corrupted
        for token in (pair.correct, pair.incorrect):
            assert isinstance(token, int) and 0 <= token < smollm2.vocab_size
            if kind != "induction":  # a text answer: decodes and re-encodes to the same one token
                assert smollm2.to_single_token(smollm2.tokenizer.decode([token])) == token
        assert pair.correct != pair.incorrect


@pytest.mark.parametrize("kind", list(FACTORIES))
def test_dataset_is_deterministic_by_seed(smollm2, kind):
    a, b, c = (FACTORIES[kind](smollm2, seed) for seed in (1, 1, 2))
    assert (a.clean, a.corrupted, a.correct, a.incorrect) == (
        b.clean, b.corrupted, b.correct, b.incorrect)
    assert a.clean != c.clean


# -- IOI -----------------------------------------------------------------------------------------
def test_ioi_answers_orders_and_swap_corruption(smollm2):
    data = IOIDataset(smollm2, n=10, seed=3)
    assert set(data.orders) == {"ABBA", "BABA"}
    tok = smollm2.tokenizer
    for i in range(len(data)):
        io, s = data.io_names[i], data.subject_names[i]
        assert data.correct[i] == smollm2.to_single_token(" " + io) != data.incorrect[i]
        assert data.incorrect[i] == smollm2.to_single_token(" " + s)
        words = re.findall(r"[A-Z][a-z]+", data.clean[i])
        named = [w for w in words if w in (io, s)]
        assert named == ([io, s, s] if data.orders[i] == "ABBA" else [s, io, s])
        # swap: only the second subject mention changes, to the indirect object
        assert data.corrupted[i] == data.clean[i][::-1].replace(s[::-1], io[::-1], 1)[::-1]
        assert tok.decode([data.correct[i]]).strip() == io
    for order in ("ABBA", "BABA"):
        assert set(IOIDataset(smollm2, n=4, order=order).orders) == {order}


def test_ioi_abc_corruption_uses_no_name_of_the_clean_prompt(smollm2):
    data = IOIDataset(smollm2, n=12, seed=5, corruption="abc")
    pool = set(data.names)
    for clean, corrupted in zip(data.clean, data.corrupted):
        clean_names = {w for w in re.findall(r"[A-Z][a-z]+", clean) if w in pool}
        new_names = [w for w in re.findall(r"[A-Z][a-z]+", corrupted) if w in pool]
        assert len(clean_names) == 2 and len(new_names) == 3 and len(set(new_names)) == 3
        assert not clean_names & set(new_names)


def test_ioi_drops_multi_token_names_and_reports_them(smollm2):
    names = ["Mary", "John", "Alice", "Bob", "Xzqwvbn", "Qqqqzzzt", "Brzęczyszczykiewicz"]
    data = IOIDataset(smollm2, n=4, names=names)
    assert data.dropped_names == 3
    assert data.names == ["Mary", "John", "Alice", "Bob"]
    assert all(n in names[:4] for n in data.io_names + data.subject_names)
    with pytest.raises(InvalidArgumentError, match="only 2 of 4 names are single tokens"):
        IOIDataset(smollm2, n=4, names=["Mary", "John", "Xzqwvbn", "Qqqqzzzt"])
    with pytest.raises(InvalidArgumentError, match="needs at least 5"):
        IOIDataset(smollm2, n=4, names=["Mary", "John", "Alice", "Bob"], corruption="abc")


def test_ioi_custom_templates_and_bad_arguments(smollm2):
    data = IOIDataset(smollm2, n=4, templates=["Then {A} and {B} had lunch. {B} gave the "
                                               "{object} to"])
    assert all(p.startswith("Then ") and p.endswith(" to") for p in data.clean)
    same = IOIDataset(smollm2, n=6, equal_length=True)
    assert len({_n_tokens(smollm2, p) for p in same.clean + same.corrupted}) == 1
    with pytest.raises(InvalidArgumentError, match="ABBA form"):
        IOIDataset(smollm2, n=2, templates=["{A} and {B} met; {A} waved to"])
    with pytest.raises(InvalidArgumentError, match="unknown field"):
        IOIDataset(smollm2, n=2, templates=["{A} and {B} met; {B} gave a {food} to"])
    with pytest.raises(InvalidArgumentError, match="corruption"):
        IOIDataset(smollm2, n=2, corruption="shuffle")
    with pytest.raises(InvalidArgumentError, match="order"):
        IOIDataset(smollm2, n=2, order="AABB")
    with pytest.raises(InvalidArgumentError, match="n must be"):
        IOIDataset(smollm2, n=0)


def test_smollm2_prefers_the_indirect_object(smollm2):
    data = IOIDataset(smollm2, n=16, seed=0)
    with torch.no_grad():
        logits = smollm2.trace(data.clean).run().last_logits  # [16, vocab]
    rows = torch.arange(len(data))
    diff = logits[rows, data.correct] - logits[rows, data.incorrect]
    assert diff.mean() > 0
    assert (diff > 0).float().mean() >= 0.75


# -- the base class ------------------------------------------------------------------------------
def test_patching_dataset_validation(smollm2):
    with pytest.raises(InvalidArgumentError, match="dataset has no pairs"):
        PatchingDataset([], [], [], [])
    with pytest.raises(InvalidArgumentError, match="dataset has no pairs"):
        PatchingDataset.from_pairs(smollm2, [])
    with pytest.raises(InvalidArgumentError,
                       match="clean 1, corrupted 2, correct 1, incorrect 1"):
        PatchingDataset(["a"], ["b", "c"], [1], [2])
    pairs = [("The cat sat on the", "The dog sat on the", " mat", " rug"),
             ("The cat sat on the", "The big cat sat on the", " mat", " rug")]
    with pytest.raises(InvalidArgumentError, match=r"pair 1 .*clean has 5 tokens, corrupted has 6"):
        PatchingDataset.from_pairs(smollm2, pairs)
    with pytest.raises(InvalidArgumentError, match="pair 0 .*corrupted has 6"):
        PatchingDataset(["The cat sat on the"], ["The big cat sat on the"], [1], [2],
                        model=smollm2)
    with pytest.raises(InvalidArgumentError, match="tokens for this tokenizer"):
        PatchingDataset.from_pairs(smollm2, [("The cat sat on the", "The dog sat on the",
                                              " Xzqwvbn", " rug")])
    with pytest.raises(InvalidTypeError, match="pass model="):
        PatchingDataset(["a"], ["b"], [" mat"], [2])
    with pytest.raises(InvalidTypeError, match="list"):
        PatchingDataset("abc", "abd", [1], [2])


def test_patching_dataset_from_pairs_index_subset_and_batches(smollm2):
    data = PatchingDataset.from_pairs(smollm2, [
        ("The capital of France is", "The capital of Italy is", " Paris", " Rome"),
        ("The capital of Italy is", "The capital of France is", " Rome", " Paris"),
        ("The capital of Spain is", "The capital of Italy is", " Madrid", " Rome"),
    ], name="capitals")
    paris = smollm2.to_single_token(" Paris")
    assert len(data) == 3 and data[0].correct == paris and data[-1].clean.endswith("Spain is")
    assert [p.correct for p in data] == data.correct
    with pytest.raises(OutOfRangeError):
        data[3]
    assert data.subset([2, 0]).clean == [data.clean[2], data.clean[0]]
    assert [len(b) for b in data.batches(2)] == [2, 1]
    assert sum((b.clean for b in data.batches(2)), []) == data.clean
    with pytest.raises(InvalidArgumentError, match="batch size"):
        list(data.batches(0))
    # a subclass keeps its per-pair extras aligned through subset()
    ioi = IOIDataset(smollm2, n=6, seed=0)
    sub = ioi.subset([4, 1])
    assert isinstance(sub, IOIDataset)
    assert sub.orders == [ioi.orders[4], ioi.orders[1]]
    assert sub.io_names == [ioi.io_names[4], ioi.io_names[1]] and len(ioi) == 6
    assert "IOIDataset" in repr(ioi) and "pairs=6" in repr(ioi)


def test_dataset_sweep_reports_mean_and_spread(smollm2):
    data = IOIDataset(smollm2, n=4, seed=0)
    result = activation_patching(smollm2, data, component="resid_post", layers=[0, 29],
                                 positions=[-1])
    assert result.per_pair.shape == (4, 2) and result.std.shape == (2,)
    # observed 6.0e-8 (effects of size ~1): the result averages the pairs in another order than
    # torch's float32 mean here, so the last bit may differ; 5e-7 is 8.4x that
    assert_within(result.per_pair.mean(0), result.effect_matrix, 5e-7, "mean of pairs")
    # patching the last layer's residual stream gives the corrupted run's logits, so the
    # normalised effect divides a number by itself: observed bitwise 1.0 (difference 0)
    assert_within(result.effect_matrix[1], 1.0, 0.0, "last layer")


def test_by_length_groups_pairs_for_by_position_sweeps(smollm2):
    ioi = IOIDataset(smollm2, n=24, seed=0)
    groups = ioi.by_length(smollm2)
    lengths = [len(token_lists(smollm2, p)[0]) for p in ioi.clean]
    assert len(groups) > 1  # seed 0's names tokenise to several lengths
    assert sum(len(g) for g in groups.values()) == len(ioi)
    sizes = [len(g) for g in groups.values()]
    assert sizes == sorted(sizes, reverse=True)  # largest group first
    for n, group in groups.items():
        assert isinstance(group, IOIDataset)
        want = [i for i, length in enumerate(lengths) if length == n]
        assert group.clean == [ioi.clean[i] for i in want]  # order kept
        assert group.io_names == [ioi.io_names[i] for i in want]
    n, same = next(iter(groups.items()))
    with pytest.raises(InvalidArgumentError, match=r"group pairs by length .*\.by_length\(model\)"):
        activation_patching(smollm2, ioi, component="resid_post", by_position=True,
                            layers=[29])
    result = activation_patching(smollm2, same, component="resid_post", by_position=True,
                                 layers=[29])
    assert result.effect_matrix.shape == (1, n)
    # last layer, last position: observed 1.2e-7 (one float32 ulp of 1), not bitwise 1 as in
    # the sweep above: the normalised mean over a group's pairs rounds once more; 1e-6 is 8.4x
    assert_within(result.effect_matrix[0, -1], 1.0, 1e-6, "last layer, last position")


# -- factual recall ------------------------------------------------------------------------------
def test_factual_pairs_swap_subjects_within_one_relation(smollm2):
    facts = {f["known_id"]: f for f in load_known_facts()}
    assert len(facts) == 1209
    data = FactualRecallDataset(smollm2, n=8, seed=0)
    assert len(set(data.clean)) == 8

    def first(text):
        return smollm2.tokenizer.encode(" " + text, add_special_tokens=False)[0]

    for i in range(len(data)):
        a, b = facts[data.known_ids[i]], facts[data.corrupted_known_ids[i]]
        assert a["relation_id"] == b["relation_id"] == data.relation_ids[i]
        assert data.clean[i] == a["prompt"] and a["subject"] == data.subjects[i]
        assert data.corrupted[i] == a["prompt"].replace(a["subject"], b["subject"])
        assert data.corrupted_subjects[i] == b["subject"]
        assert (data.correct[i], data.incorrect[i]) == (first(a["attribute"]),
                                                        first(b["attribute"]))
    p30 = FactualRecallDataset(smollm2, n=4, seed=0, relation="P30")
    assert set(p30.relation_ids) == {"P30"}
    with pytest.raises(InvalidArgumentError, match="relation_id"):
        FactualRecallDataset(smollm2, n=4, relation="P0")
    with pytest.raises(InvalidArgumentError, match="only .* factual pairs"):
        FactualRecallDataset(smollm2, n=500, relation="P30")


def test_known_facts_are_ones_smollm2_gets_right(smollm2):
    facts = known_facts(smollm2, n=3, seed=0, batch_size=16)
    assert len(facts) == 3 and all(isinstance(f, KnownFact) for f in facts)
    prompt, subject, token = facts[0]
    assert subject in prompt
    with torch.no_grad():
        top = smollm2.trace([f.prompt for f in facts]).run().last_logits.argmax(-1)
    assert top.tolist() == [f.attribute_token for f in facts]
    unchecked = known_facts(smollm2, n=3, seed=0, only_correct=False)
    assert len(unchecked) == 3


# -- greater-than --------------------------------------------------------------------------------
def test_greater_than_uses_the_tens_digit_on_smollm2(smollm2):
    data = GreaterThanDataset(smollm2, n=8, seed=0)
    assert data.answer_unit == "digit"  # SmolLM2 splits "1732" into 1 7 3 2
    digit = {smollm2.to_single_token(str(d)): d for d in range(10)}
    for i in range(len(data)):
        yy = data.start_years[i] - 1700
        assert data.clean[i] == (f"The {data.nouns[i]} lasted from the year 17{yy:02d} to the "
                                 "year 17")
        assert data.corrupted[i] == f"The {data.nouns[i]} lasted from the year 1701 to the year 17"
        above = sorted(digit[t] for t in data.years_above[i])
        below = sorted(digit[t] for t in data.years_below[i])
        assert above == list(range(yy // 10 + 1, 10))
        assert below == list(range(0, yy // 10 + (1 if yy % 10 == 9 else 0)))
        assert digit[data.correct[i]] == above[0] and digit[data.incorrect[i]] == below[-1]
    with torch.no_grad():
        clean = smollm2.trace(data.clean).run().last_logits
        corrupted = smollm2.trace(data.corrupted).run().last_logits
    value = greater_than_metric(clean, data)
    assert value.shape == (8,) and (value.abs() <= 1).all()
    inputs = MetricInputs(correct=torch.tensor(data.correct),
                          incorrect=torch.tensor(data.incorrect))
    # observed 6.0e-8: the registered metric sums p(above) and p(below) separately, the function
    # sums the signed mask over the vocabulary, so the float32 sums round differently; 5e-7 is
    # 8.4x that. A subset's rows are the same rows: observed bitwise 0
    assert_within(data.metric(clean, inputs), value, 5e-7, "metric vs function")
    assert_within(greater_than_metric(clean[2:5], data.subset([2, 3, 4])), value[2:5], 0.0,
                  "subset")
    # the model's later-year preference is stronger from 17YY than from 1701
    assert value.mean() > greater_than_metric(corrupted, data).mean()


class _TwoDigitTokenizer:
    """Splits words, and numbers into two-digit chunks (" 1732" -> " 17", "32"), GPT-2 style."""

    pad_token_id = eos_token_id = 0
    pattern = re.compile(r" ?[A-Za-z]+| ?\d{1,2}| ?[^\sA-Za-z\d]+|\s")

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [self.vocab.setdefault(p, len(self.vocab) + 1) for p in self.pattern.findall(text)]

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text)}


class _FakeModel:
    vocab_size = 10_000

    def __init__(self) -> None:
        self.tokenizer = _TwoDigitTokenizer()

    def to_single_token(self, text):
        return text if isinstance(text, int) else self.tokenizer.encode(text)[0]


def test_greater_than_with_two_digit_year_tokens():
    model = _FakeModel()
    data = GreaterThanDataset(model, n=6, seed=0)
    assert data.answer_unit == "two_digit" and len(data.answer_ids) == 100
    yy_of = {model.tokenizer.vocab[f"{y:02d}"]: y for y in range(100)}
    for i in range(len(data)):
        yy = data.start_years[i] - 1700
        assert 2 <= yy <= 98
        assert sorted(yy_of[t] for t in data.years_above[i]) == list(range(yy + 1, 100))
        assert sorted(yy_of[t] for t in data.years_below[i]) == list(range(0, yy + 1))
        assert (yy_of[data.correct[i]], yy_of[data.incorrect[i]]) == (yy + 1, yy)
    logits = torch.randn(6, model.vocab_size, generator=torch.Generator().manual_seed(0))
    inputs = MetricInputs(correct=torch.tensor(data.correct),
                          incorrect=torch.tensor(data.incorrect))
    # observed 1.4e-9 with these seeded logits (3.5e-10 to 9.3e-10 on other draws): nonzero as
    # above, the two formulas sum the float32 probabilities in another order; 5e-9 is 3.6x that
    assert_within(data.metric(logits, inputs), greater_than_metric(logits, data), 5e-9,
                  "metric vs function, two-digit years")


# -- induction -----------------------------------------------------------------------------------
def test_induction_repeats_a_random_sequence(smollm2):
    data = InductionDataset(smollm2, n=8, seq_len=6, seed=0)
    special = set(smollm2.tokenizer.all_special_ids)
    assert data.clean_tokens == data.clean and data.corrupted_tokens == data.corrupted
    for clean, corrupted, correct, incorrect in zip(data.clean, data.corrupted, data.correct,
                                                    data.incorrect):
        r, r2 = corrupted[:6], corrupted[6:]
        assert len(clean) == len(corrupted) == 12
        assert clean == r + r and clean[:6] == r
        assert len(set(r + r2)) == 12 and not special & set(r + r2)
        assert (correct, incorrect) == (r[0], r2[0])
    assert isinstance(data.subset([1]), InductionDataset)
    assert data.subset([1]).clean_tokens == [data.clean[1]]
    with pytest.raises(InvalidArgumentError, match="seq_len"):
        InductionDataset(smollm2, n=2, seq_len=1)

"""Task datasets: aligned pairs, single-token answers, determinism, and use in sweeps."""

from __future__ import annotations

import pytest
import torch

from causalpatch import activation_patching
from causalpatch.datasets import (FactualRecallDataset, GreaterThanDataset, IOIDataset,
                                  InductionDataset, PatchingDataset, known_facts)
from causalpatch.errors import InvalidArgumentError
from causalpatch.tracing import token_lists


def _lengths_match(model, data):
    for c, k in zip(data.clean, data.corrupted):
        assert len(token_lists(model, c)[0]) == len(token_lists(model, k)[0])


@pytest.mark.parametrize("factory", [
    lambda m: IOIDataset(m, n=8),
    lambda m: IOIDataset(m, n=8, corruption="abc"),
    lambda m: FactualRecallDataset(m, n=8),
    lambda m: GreaterThanDataset(m, n=8),
    lambda m: InductionDataset(m, n=8),
], ids=["ioi-swap", "ioi-abc", "factual", "greater-than", "induction"])
def test_every_dataset_has_aligned_pairs_and_single_token_answers(smollm2, factory):
    data = factory(smollm2)
    assert len(data) == 8
    _lengths_match(smollm2, data)
    for token in data.correct + data.incorrect:
        assert 0 <= token < smollm2.vocab_size


def test_ioi_orders_answers_and_corruptions(smollm2):
    data = IOIDataset(smollm2, n=10, seed=3)
    assert set(data.orders) == {"ABBA", "BABA"}
    assert all(c != i for c, i in zip(data.correct, data.incorrect))
    abc = IOIDataset(smollm2, n=10, seed=3, corruption="abc")
    for clean, corrupted, io, s in zip(abc.clean, abc.corrupted, abc.correct, abc.incorrect):
        names = {smollm2.tokenizer.decode([io]).strip(), smollm2.tokenizer.decode([s]).strip()}
        assert not any(f" {n} " in f" {corrupted} " or f" {n}," in corrupted for n in names)


def test_ioi_is_deterministic_by_seed(smollm2):
    assert IOIDataset(smollm2, n=6, seed=1).clean == IOIDataset(smollm2, n=6, seed=1).clean
    assert IOIDataset(smollm2, n=6, seed=1).clean != IOIDataset(smollm2, n=6, seed=2).clean


def test_multi_token_names_are_dropped_and_counted(smollm2):
    names = ["Mary", "John", "Alice", "Bob", "Xzqwvbn", "Qqqqzzzt"]
    data = IOIDataset(smollm2, n=4, names=names)
    assert data.dropped_names == 2
    with pytest.raises(InvalidArgumentError, match="single tokens"):
        IOIDataset(smollm2, n=4, names=["Mary", "Xzqwvbn", "Qqqqzzzt"])


def test_empty_and_misaligned_datasets_are_refused(smollm2):
    with pytest.raises(InvalidArgumentError, match="no pairs"):
        PatchingDataset([], [], [], [])
    with pytest.raises(InvalidArgumentError, match="differ in length"):
        PatchingDataset(["a"], ["b", "c"], [1], [2])
    with pytest.raises(InvalidArgumentError, match="tokens"):
        PatchingDataset.from_pairs(smollm2, [("The cat sat on the", "The big cat sat on the",
                                              " mat", " dog")])


def test_model_prefers_the_indirect_object(smollm2):
    data = IOIDataset(smollm2, n=16, seed=0)
    logits = smollm2.trace(data.clean).run().last_logits
    rows = torch.arange(len(data))
    diff = logits[rows, data.correct] - logits[rows, data.incorrect]
    assert diff.mean() > 1.0


def test_factual_pairs_share_a_relation(smollm2):
    data = FactualRecallDataset(smollm2, n=8, seed=0)
    assert all(s in c for s, c in zip(data.subjects, data.clean))
    assert all(s in k for s, k in zip(data.corrupted_subjects, data.corrupted))


def test_known_facts_are_ones_the_model_gets_right(smollm2):
    facts = known_facts(smollm2, n=5, seed=0)
    assert len(facts) == 5
    top = smollm2.trace([f["prompt"] for f in facts]).run().last_logits.argmax(-1)
    assert top.tolist() == [f["answer"] for f in facts]


def test_dataset_sweep_reports_mean_and_spread(smollm2):
    data = IOIDataset(smollm2, n=4, seed=0)
    result = activation_patching(smollm2, data, component="resid_post", layers=[0, 29],
                                 positions=[-1])
    assert result.per_pair.shape == (4, 2) and result.std.shape == (2,)
    assert torch.allclose(result.per_pair.mean(0), result.effect_matrix, atol=1e-5)
    assert abs(result.effect_matrix[1].item() - 1.0) < 1e-4

"""The shared method core: one aggregation rule, per-pair positions, dataset answers, multi-site
patches, and errors before any compute — each checked against a naive loop written here with
plain interventions (``model.trace``), independent of the engine."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from conftest import assert_matches_reference

import causalpatch.interventions as iv
from causalpatch import CausalTrace, activation_patching, attribution_patching
from causalpatch.errors import InvalidArgumentError, OutOfRangeError, UnknownComponentError
from causalpatch.metrics import get_metric

#: The engine against the naive loop written here, on tiny float32 models
#: (``conftest.assert_matches_reference`` through :func:`check`: |engine - naive| over the
#: largest |naive| effect, normalised effects or raw metric changes, 0 = no patch): the staircase
#: batches rows and pairs differently (other float32 summation orders). Largest ratio observed
#: 3.8e-6 (ragged pairs, fast engine: 3.1e-6 on an effect of 0.80).
RTOL = 3e-5


def check(got, expected, what: str, min_cells: int = 1) -> None:
    """The engine's values equal the naive loop's by the suite's one rule (:data:`RTOL`)."""
    assert_matches_reference(torch.as_tensor(got, dtype=torch.float64).reshape(-1),
                             torch.as_tensor(expected, dtype=torch.float64).reshape(-1), 0.0,
                             rtol=RTOL, min_cells=min_cells, what=what)


@dataclass
class Pairs:
    """A dataset the way users write one: prompts, answers and a metric."""

    clean: list[str]
    corrupted: list[str]
    correct: list[str]
    incorrect: list[str]
    metric: str = "logit_diff"


#: Pairs of different token lengths (the answers differ per pair).
RAGGED = Pairs(
    clean=["When Mary and John went to the store, John gave a drink to",
           "The Eiffel Tower is in Paris and Mary went to",
           "When John and Mary went to the city, Mary gave a drink to"],
    corrupted=["When Mary and John went to the store, Mary gave a drink to",
               "The Eiffel Tower is in Rome and Mary went to",
               "When John and Mary went to the city, John gave a drink to"],
    correct=[" Mary", " Paris", " John"],
    incorrect=[" John", " Rome", " Mary"],
)


@pytest.fixture(scope="module")
def lm(make_tiny_lm):
    model = make_tiny_lm("llama")
    before = model.hook_snapshot()
    yield model
    assert model.hook_snapshot() == before


def _metric_value(model, logits, correct, incorrect, source_logits, metric="logit_diff"):
    m = get_metric(metric)
    from causalpatch.metrics import MetricInputs

    inputs = MetricInputs(target_logits=source_logits[None],
                          correct=torch.tensor([model.to_single_token(correct)]),
                          incorrect=torch.tensor([model.to_single_token(incorrect)]))
    return float(m(logits[None], inputs)[0])


def naive_effect(model, data: Pairs, patches, metric="logit_diff", denoise=True, raw=False):
    """The reference: per pair, cache the source, run the base with replace_with interventions
    (positions resolved against that pair's own length), then mean raw over pairs, normalised.

    ``patches``: list of ``(site name, positions or None, heads or None)``.
    """
    patched, base, source = [], [], []
    for c, k, good, bad in zip(data.clean, data.corrupted, data.correct, data.incorrect):
        base_p, source_p = (k, c) if denoise else (c, k)
        n = len(model.to_str_tokens(base_p))
        names = [name for name, _, _ in patches]
        src_logits, cache = model.run_with_cache(source_p, names=names)
        base_logits, _ = model.run_with_cache(base_p, names=[])
        interventions: dict[str, list] = {}
        for name, positions, heads in patches:
            pos = None if positions is None else [p % n for p in positions]
            value = cache[model.site(name).name]
            interventions.setdefault(name, []).append(
                iv.replace_with(value, positions=pos, heads=heads))
        with model.trace(base_p, interventions=interventions) as tr:
            out = tr.last_logits[0]
        s_last, b_last = src_logits[0, -1], base_logits[0, -1]
        patched.append(_metric_value(model, out, good, bad, s_last, metric))
        base.append(_metric_value(model, b_last, good, bad, s_last, metric))
        source.append(_metric_value(model, s_last, good, bad, s_last, metric))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    if raw:
        return mean(patched)
    return (mean(patched) - mean(base)) / (mean(source) - mean(base))


@pytest.mark.parametrize("engine", ["fast", "naive"])
def test_causal_trace_on_ragged_pairs_with_last_position_equals_the_naive_loop(lm, engine):
    ct = CausalTrace(lm, RAGGED, engine=engine)
    ct.patch("blocks.1.resid_pre", positions=[-1])
    got = ct.metric()  # the dataset's metric and answers
    check(got, naive_effect(lm, RAGGED, [("blocks.1.resid_pre", [-1], None)]),
          f"ragged last position {engine}")


def test_causal_trace_of_one_cell_equals_activation_patching_of_that_cell(lm):
    sweep = activation_patching(lm, RAGGED, component="mlp", layers=[0], positions=[-1])
    ct = CausalTrace(lm, RAGGED)
    ct.patch("blocks.0.mlp", positions=[-1])
    check(ct.metric(), float(sweep.effect_matrix[0]), "trace = sweep cell")
    # the same aggregation: normalise the means, not the mean of per-pair normalised values
    assert float(sweep.per_pair.mean(0)[0]) == pytest.approx(float(sweep.effect_matrix[0]),
                                                             abs=1e-6)


def test_causal_trace_uses_the_datasets_answers_not_the_first_pairs(lm):
    """A wrong aggregation (one pair's answers for all) gives another number."""
    ct = CausalTrace(lm, RAGGED)
    ct.patch("blocks.0.attn", positions=[-1])
    got = ct.metric()
    expected = naive_effect(lm, RAGGED, [("blocks.0.attn", [-1], None)])
    check(got, expected, "dataset answers")
    raw = float(ct.result(normalize=False).effect_matrix[0])
    check(raw, naive_effect(lm, RAGGED, [("blocks.0.attn", [-1], None)], raw=True),
          "dataset answers, raw")
    same_answers = Pairs(RAGGED.clean, RAGGED.corrupted, [" Mary"] * 3, [" John"] * 3)
    other = naive_effect(lm, same_answers, [("blocks.0.attn", [-1], None)], raw=True)
    assert abs(other - raw) > 1e-2  # the check above can tell them apart


@pytest.mark.parametrize("engine", ["fast", "naive"])
def test_several_patch_calls_together_equal_the_naive_loop(lm, engine):
    patches = [("blocks.0.mlp", [-1, -3], None), ("blocks.1.attn.z", None, [0, 2]),
               ("layers.1.mlp", [5], None)]
    with lm.causal_trace(RAGGED, engine=engine) as ct:
        for name, positions, heads in patches:
            ct.patch(name, positions=positions, heads=heads)
        got = ct.metric()
    check(got, naive_effect(lm, RAGGED, patches), f"several patches {engine}")


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_multi_position_and_multi_head_cells_of_a_sweep_equal_the_naive_loop(lm, direction):
    """One cell = several positions jointly (positions=[...] without by_position) and every
    head of a layer jointly (component 'attn' vs all heads of attn.z)."""
    result = activation_patching(lm, RAGGED, component="attn_head", positions=[-1, -2, 3],
                                 direction=direction)
    got, expected = [], []
    for layer in range(lm.n_layers):
        for head in (0, lm.n_heads - 1):
            expected.append(naive_effect(lm, RAGGED,
                                         [(f"blocks.{layer}.attn.z", [-1, -2, 3], [head])],
                                         denoise=direction == "denoise"))
            got.append(float(result.effect_matrix[layer, head]))
    check(got, expected, f"multi-position heads {direction}", min_cells=4)


def test_negative_layers_and_positions_count_from_the_end(lm):
    a = activation_patching(lm, RAGGED, component="mlp", layers=[-1], positions=[-1])
    b = activation_patching(lm, RAGGED, component="mlp", layers=[lm.n_layers - 1],
                            positions=[-1])
    assert a.labels["layer"] == [lm.n_layers - 1]
    assert torch.equal(a.effect_matrix, b.effect_matrix)


def test_every_entry_point_defaults_to_the_same_metric(lm):
    clean, corrupted = RAGGED.clean[0], RAGGED.corrupted[0]
    answers = dict(correct=" Mary", incorrect=" John")
    assert activation_patching(lm, clean, corrupted, component="mlp", **answers).metric == \
        "logit_diff"
    assert attribution_patching(lm, clean, corrupted, component="mlp", **answers).metric == \
        "logit_diff"
    ct = lm.causal_trace(clean, corrupted)
    ct.patch("blocks.0.mlp")
    assert ct.result(**answers).metric == "logit_diff"
    # without answers: l2 everywhere (the seeds' default)
    assert activation_patching(lm, clean, corrupted, component="mlp").metric == "l2"
    ct.patch("blocks.1.mlp")
    assert ct.result().metric == "l2"
    recovered = lm.activation_patching(clean, corrupted, component="mlp")
    expected = activation_patching(lm, clean, corrupted, component="mlp", metric="l2")
    assert recovered == {i: pytest.approx(100 * float(v), abs=1e-4)
                         for i, v in enumerate(expected.effect_matrix)}


def test_the_result_of_a_trace_names_its_patches(lm):
    with lm.causal_trace(RAGGED) as ct:
        ct.patch("blocks.0.mlp", positions=[-1])
        ct.patch("blocks.1.attn.z", heads=[1])
        result = ct.result()
    assert result.method == "causal_trace" and result.n_pairs == 3
    assert result.extra["patches"][1] == {"site": "blocks.1.attn.z", "positions": None,
                                          "heads": [1]}


@pytest.mark.parametrize("call,error,match", [
    (lambda m: activation_patching(m, RAGGED, component="attn_heads"), UnknownComponentError,
     "Did you mean: attn_head"),
    (lambda m: activation_patching(m, RAGGED, component="mlp", engine="quick"),
     InvalidArgumentError, "engine 'quick'"),
    (lambda m: activation_patching(m, RAGGED, component="mlp", layers=[9]), OutOfRangeError,
     "layers contains 9"),
    (lambda m: activation_patching(m, RAGGED, component="mlp", positions=[12]), OutOfRangeError,
     "positions contains 12"),
    (lambda m: activation_patching(m, RAGGED, component="mlp", by_position=True),
     InvalidArgumentError, "same token length"),
    (lambda m: attribution_patching(m, RAGGED, component="attn_heads"), UnknownComponentError,
     "Did you mean"),
    (lambda m: CausalTrace(m, RAGGED).patch("blocks.0.mlp", positions=[12]), OutOfRangeError,
     "positions contains 12"),
    (lambda m: CausalTrace(m, RAGGED).metric(), InvalidArgumentError, "no patches"),
    (lambda m: CausalTrace(m, RAGGED, direction="up"), InvalidArgumentError, "direction 'up'"),
])
def test_core_errors_come_before_any_forward_and_leave_no_hook(lm, monkeypatch, call, error,
                                                               match):
    calls = []
    real = lm.hf_model.forward
    monkeypatch.setattr(lm.hf_model, "forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    before = lm.hook_snapshot()
    with pytest.raises(error, match=match):
        call(lm)
    assert calls == [], "an argument error must come before any forward pass"
    assert lm.hook_snapshot() == before


def test_method_is_deprecated_in_favour_of_engine(lm):
    with pytest.warns(DeprecationWarning, match="engine="):
        old = activation_patching(lm, RAGGED, component="mlp", method="naive")
    new = activation_patching(lm, RAGGED, component="mlp", engine="naive")
    assert torch.equal(old.effect_matrix, new.effect_matrix)
    assert new.method == "activation_patching" and new.extra["engine"] == "naive"

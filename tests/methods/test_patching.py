"""Specification of activation patching: the fast engine equals the naive loop, invariants hold,
bad input is refused before any compute."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_matches_reference, assert_within

from causalpatch import activation_patching
from causalpatch.engine import collect_sites, patched_logits, run_base_and_source
from causalpatch.enums import Engine
from causalpatch.errors import (InvalidArgumentError, NormalizationError, OutOfRangeError,
                                UnknownComponentError)
from causalpatch.plan import (build_patches, make_pairs, plan_component, resolve_positions,
                              result_axes)

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"
FIRST_DIFF = 9  # " John" vs " Mary": the first token that differs
#: The fast engine against the naive loop on SmolLM2 (``conftest.assert_matches_reference``:
#: max |fast - naive| over the largest logit change of the sampled cells). Not zero: the
#: staircase batches rows (other float32 summation orders), ~3e-5 absolute on logits of ~20
#: for every component. Largest ratio observed 2.0e-5 (attn_head_k, largest change 1.7); for
#: mlp_neuron 1.25e-4 (RTOL_NEURON), whose largest logit change is only 0.24.
RTOL = 2e-4
RTOL_NEURON = 1e-3
#: (cell, vocabulary entry) logits that move by 100x the tolerance (fewest observed: 69,347).
MIN_CELLS = 50_000
#: The sweep's normalised effects, fast vs naive: observed 2.9e-7 of the largest effect (1.0).
SWEEP_RTOL = 2.5e-6
#: sweep cells with an effect >= 100x that (observed 10 of 42: positions before the first
#: difference are exactly 0).
SWEEP_MIN_CELLS = 8
#: full restorations (the whole residual stream patched: the effect is 1 up to rounding),
#: absolute on normalised effects: observed 0 for every metric and 6e-8 (half a float32 ulp of
#: 1) for layer 0 denoising; the bound is two float32 ulps of 1.
FULL_ATOL = 2.4e-7
#: batch sizes 1 and 7 against the automatic one: observed 2.8e-6 of the largest effect (7.4e-7
#: on 0.27; other float32 summation orders).
BATCH_RTOL = 2.5e-5


def _neuron_sample(model, n_random=14):
    """First, last and seeded random neurons of each layer (SmolLM2: 16 of 1536)."""
    gen = torch.Generator().manual_seed(0)
    picks = (torch.randperm(model.d_mlp - 2, generator=gen)[:n_random] + 1).tolist()
    return sorted({0, model.d_mlp - 1, *picks})


def _cells(model, component, by_position):
    pair = make_pairs(model, CLEAN, CORRUPTED, " Mary", " John")[0]
    neurons = _neuron_sample(model) if component == "mlp_neuron" else None
    plan = plan_component(model, component, None, None, neurons)
    positions = resolve_positions(None, by_position, len(pair.clean))
    patches = build_patches(plan, positions, by_position, len(pair.clean))
    shape = result_axes(model, plan, positions, by_position, pair.clean)[2]
    # plain runs (no shared prefix): the fast engine prepares its own staircase
    run = run_base_and_source(model, pair.corrupted, pair.clean, collect_sites(patches), patches,
                              Engine.NAIVE)
    return pair, patches, shape, run


@pytest.mark.parametrize("by_position", [False, True])
@pytest.mark.parametrize("component", ["resid_pre", "resid_mid", "resid_post", "attn", "mlp",
                                       "attn_head", "attn_head_q", "attn_head_k",
                                       "attn_head_v", "mlp_neuron"])
def test_fast_engine_equals_naive_loop_on_smollm2(smollm2, component, by_position):
    pair, patches, shape, run = _cells(smollm2, component, by_position)
    base_last = run.base_last
    fast = patched_logits(smollm2, run, patches, Engine.FAST)
    assert fast.shape == (len(patches), smollm2.vocab_size)
    # the naive loop is one forward per patch: compare on a spread of cells, live ones included
    gen = torch.Generator().manual_seed(0)
    sample = torch.randperm(len(patches), generator=gen)[:10].tolist()
    live = [i for i, p in enumerate(patches) if max(p[0].positions) >= FIRST_DIFF]
    # ... and the cells the fast engine says matter most (largest change of the answer logits):
    # a wrong unit or position shows there first
    answers = [smollm2.to_single_token(" Mary"), smollm2.to_single_token(" John")]
    moved = (fast[:, answers] - base_last[answers]).abs().amax(dim=-1)
    top = moved.topk(3).indices.tolist()
    sample = sorted(set(sample) | set(live[-3:]) | set(live[:2]) | set(top))
    naive = patched_logits(smollm2, run, [patches[i] for i in sample], Engine.NAIVE)
    rtol = RTOL_NEURON if component == "mlp_neuron" else RTOL
    assert_matches_reference(fast[sample], naive, base_last, rtol=rtol, min_cells=MIN_CELLS,
                             what=f"smollm2 {component} {by_position}")


def test_sweep_effects_fast_equal_naive(smollm2):
    kw = dict(component="resid_post", by_position=True, layers=[0, 13, 29], correct=" Mary",
              incorrect=" John")
    fast = activation_patching(smollm2, CLEAN, CORRUPTED, **kw)
    naive = activation_patching(smollm2, CLEAN, CORRUPTED, engine="naive", **kw)
    assert fast.effect_matrix.shape == (3, 14)
    assert_matches_reference(fast.effect_matrix, naive.effect_matrix, 0.0, rtol=SWEEP_RTOL,
                             min_cells=SWEEP_MIN_CELLS, what="smollm2 resid_post sweep")


def test_denoising_final_residual_at_last_position_recovers_fully(smollm2):
    result = activation_patching(smollm2, CLEAN, CORRUPTED, component="resid_post",
                                 layers=[29], positions=[-1], correct=" Mary",
                                 incorrect=" John")
    assert result.effect_matrix.shape == (1,)
    assert_within(result.effect_matrix[0].item(), 1.0, FULL_ATOL, "final residual")


def test_positions_before_first_difference_have_zero_effect(smollm2):
    for component in ("resid_pre", "resid_post", "resid_mid"):
        result = activation_patching(smollm2, CLEAN, CORRUPTED, component=component,
                                     by_position=True, correct=" Mary", incorrect=" John")
        assert torch.all(result.effect_matrix[:, :FIRST_DIFF] == 0)
        assert result.effect_matrix[:, FIRST_DIFF:].abs().max() > 0.1


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_full_residual_at_layer_zero_moves_everything(smollm2, direction):
    result = activation_patching(smollm2, CLEAN, CORRUPTED, component="resid_pre", layers=[0],
                                 direction=direction, correct=" Mary", incorrect=" John")
    assert_within(result.effect_matrix[0].item(), 1.0, FULL_ATOL, f"layer 0 {direction}")


def test_ioi_result_metadata(smollm2):
    result = activation_patching(smollm2, CLEAN, CORRUPTED, component="attn_head",
                                 metric="logit_diff", correct=" Mary", incorrect=" John")
    assert result.effect_matrix.shape == (30, 9)
    assert result.axes == ("layer", "head")
    assert result.labels["layer"] == list(range(30))
    assert result.clean_metric == pytest.approx(6.12, abs=0.3)
    assert result.corrupted_metric == pytest.approx(-5.49, abs=0.3)
    top = result.top_components(3)
    assert len(top) == 3 and abs(top[0][1]) >= abs(top[2][1])


@pytest.mark.parametrize("metric", ["l2", "mse", "cosine", "kl", "prob", "logprob", "ce_diff"])
def test_every_metric_gives_finite_normalised_effects(smollm2, metric):
    result = activation_patching(smollm2, CLEAN, CORRUPTED, component="resid_post",
                                 layers=[5, 29], positions=[-1], metric=metric,
                                 correct=" Mary", incorrect=" John")
    assert torch.isfinite(result.effect_matrix).all()
    # the last layer's residual at the last position *is* the output: full recovery
    assert_within(result.effect_matrix[1].item(), 1.0, FULL_ATOL, metric)


def test_batch_size_does_not_change_results(smollm2):
    kw = dict(component="attn_head", layers=[10, 20, 29], correct=" Mary", incorrect=" John")
    auto = activation_patching(smollm2, CLEAN, CORRUPTED, **kw).effect_matrix
    for size in (1, 7):
        other = activation_patching(smollm2, CLEAN, CORRUPTED, batch_size=size, **kw)
        assert_matches_reference(other.effect_matrix, auto, 0.0, rtol=BATCH_RTOL, min_cells=10,
                                 what=f"batch_size={size}")


def test_seed_style_helper_returns_percent_per_layer(smollm2):
    out = smollm2.activation_patching(clean_text=CLEAN, corrupted_text=CORRUPTED,
                                      component="mlp", metric="l2")
    assert sorted(out) == list(range(30))
    assert all(isinstance(v, float) for v in out.values())


def test_causal_trace_combines_patches(smollm2):
    with smollm2.causal_trace(CLEAN, CORRUPTED) as ct:
        ct.patch("blocks.29.resid_post", positions=[-1])
        full = ct.metric("logit_diff", correct_token=" Mary", incorrect_token=" John")
    assert_within(full, 1.0, FULL_ATOL, "causal trace")
    with smollm2.causal_trace(CLEAN, CORRUPTED) as ct:
        ct.patch("layers.5.mlp")
        ct.patch("layers.9.self_attn", positions=[-1])
        both = ct.metric("l2")
    assert -5 < both < 5 and both != 0


# -- bad input: a specific error before any compute, no hook left behind ------------------------
def _count_forwards(model):
    calls = []
    handle = model.hf_model.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls, handle


BAD_SWEEPS = [
    (dict(corrupted="When Mary and John went to the big store, Mary gave a drink to"),
     InvalidArgumentError, "different token lengths"),
    (dict(metric="accuracy"), InvalidArgumentError, "unknown metric"),
    (dict(correct=None, incorrect=None, metric="logit_diff"), InvalidArgumentError,
     "needs correct"),
    (dict(correct=" Eiffel"), InvalidArgumentError, "2 tokens"),
    (dict(positions=[14]), OutOfRangeError, "positions"),
    (dict(positions=[3, -11], by_position=True), InvalidArgumentError, "repeat"),
    (dict(direction="sideways"), InvalidArgumentError, "direction"),
    (dict(layers=[30]), OutOfRangeError, "layers"),
    (dict(component="attn_head", heads=[9]), OutOfRangeError, "heads"),
    (dict(batch_size=0), InvalidArgumentError, "batch_size"),
    (dict(component="attention_heads"), UnknownComponentError, "Did you mean: attn_head"),
    (dict(component="mlp", heads=[0]), InvalidArgumentError, "heads"),
    (dict(clean=""), InvalidArgumentError, "empty"),
]


@pytest.mark.parametrize("changes,error,fragment", BAD_SWEEPS,
                         ids=[f"{list(c)[0]}={list(c.values())[0]!r}"[:40] for c, _, _ in BAD_SWEEPS])
def test_bad_sweep_input_fails_before_compute(smollm2, changes, error, fragment):
    kwargs = dict(clean=CLEAN, corrupted=CORRUPTED, correct=" Mary", incorrect=" John",
                  component="resid_post")
    kwargs.update(changes)
    before = smollm2.hook_snapshot()
    calls, handle = _count_forwards(smollm2)
    try:
        with pytest.raises(error, match=fragment):
            activation_patching(smollm2, **kwargs)
        assert calls == []
    finally:
        handle.remove()
    assert smollm2.hook_snapshot() == before


def test_tiny_normalisation_gap_is_an_error_not_nan(smollm2):
    with pytest.raises(NormalizationError, match="normalize=False"):
        activation_patching(smollm2, CLEAN, CLEAN, component="mlp", layers=[3],
                            correct=" Mary", incorrect=" John")
    raw = activation_patching(smollm2, CLEAN, CLEAN, component="mlp", layers=[3],
                              correct=" Mary", incorrect=" John", normalize=False)
    assert torch.isfinite(raw.effect_matrix).all()


def test_unknown_single_site_lists_close_matches(smollm2):
    with pytest.raises(UnknownComponentError, match="Did you mean: blocks.3.attn"):
        activation_patching(smollm2, CLEAN, CORRUPTED, component="blocks.3.atn",
                            correct=" Mary", incorrect=" John")
    with pytest.raises(UnknownComponentError):
        smollm2.site("blocks.3.atn")


@pytest.mark.parametrize("component,by_position,shape,axes", [
    ("blocks.23.attn.z", False, (9,), ("head",)),
    ("blocks.5.mlp", True, (14,), ("position",)),
    ("layers.9.self_attn", False, (1,), ("site",)),
])
def test_single_named_site_results(smollm2, component, by_position, shape, axes):
    result = activation_patching(smollm2, CLEAN, CORRUPTED, component=component,
                                 by_position=by_position, correct=" Mary", incorrect=" John")
    assert result.effect_matrix.shape == shape and result.axes == axes

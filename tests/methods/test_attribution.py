"""Specification of attribution patching: a first-order estimate of activation patching.

On a tiny random LLaMA the estimate converges to the exact effect as the clean/corrupted
difference shrinks, results have the exact sweep's shapes and labels, no gradient leaks into the
parameters and no hook is left behind. On SmolLM2 (IOI) the estimate tracks the exact sweep.
"""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import IdTokenizer, TextPairs, assert_matches_reference, assert_within, \
    id_llama_hf

from causalpatch import InterpretableModel, activation_patching
from causalpatch.methods.attribution import attribution_patching
from causalpatch.errors import InvalidArgumentError, InvalidTypeError
from causalpatch.plan import SWEEP_COMPONENTS as COMPONENTS

#: baseline metric values against the exact sweep's, absolute: the gradient pass and the
#: sweep run other batches (float32). Largest observed 8.3e-7; a distance to itself is 0.
METRIC_ATOL = 8e-6
CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"
FIRST_DIFF = 9  # " John" vs " Mary"

CLEAN_IDS = [[1, 2, 5, 4, 3, 7]]
CORRUPTED_IDS = [[1, 2, 6, 4, 3, 7]]
ANSWERS = dict(correct=3, incorrect=9)


pytestmark = pytest.mark.usefixtures("one_thread")

#: Relative tolerance (:func:`conftest.assert_matches_reference`: max |got - reference| over the
#: largest |reference|; estimates and normalised effects, unpatched value 0) where both sides are
#: the same float32 quantity summed in another order: a subset against the full sweep's cells,
#: joint positions against the sum of single ones, noising against swapped denoising, a dataset
#: against the hand formula from single pairs, per-pair values against their mean. Observed: 0
#: (bitwise) for the first three, 1.7e-7 (dataset vs hand formula, |diff| 2.4e-7 on 1.42) and
#: 4.2e-8 (per-pair mean) for the others: float32 ulps of values of order 1.
RTOL = 1e-6
#: The same for the exact values of verified cells against the exact sweep (one forward per
#: cell against staircase batches: other matmul shapes). Observed 1.4e-6 on the tiny LLaMA
#: (|diff| 1.0e-6 on effects up to 0.72) and 8.2e-7 on SmolLM2 (|diff| 4.8e-7 on 0.58).
RTOL_VERIFIED = 1e-5
#: Cells whose effect must be >= 100 x the tolerance, per comparison (fewest observed: 2).
MIN_CELLS = 2


def tiny_hf(dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    """A 2-layer LLaMA, d_model 32, 4 query heads, 2 key/value heads (grouped-query)."""
    return id_llama_hf(dtype=dtype, seed=seed, initializer_range=0.2)


def wrap(hf: torch.nn.Module) -> InterpretableModel:
    return InterpretableModel(hf, tokenizer=IdTokenizer())


@pytest.fixture(scope="module")
def tiny() -> InterpretableModel:
    return wrap(tiny_hf())


def _rel_err(estimate: torch.Tensor, exact: torch.Tensor) -> float:
    return float((estimate - exact).norm() / exact.norm())


# -- exactness in the small-difference limit -----------------------------------------------------
@pytest.fixture(scope="module")
def near_models() -> dict[float, InterpretableModel]:
    """float64 copies where token 6's embedding is token 5's plus ``eps`` (relative) noise."""
    base = tiny_hf(torch.float64)
    gen = torch.Generator().manual_seed(1)
    delta = torch.randn(32, generator=gen, dtype=torch.float64)
    out = {}
    for eps in (1e-1, 1e-2, 1e-3):
        hf = copy.deepcopy(base)
        with torch.no_grad():
            emb = hf.model.embed_tokens.weight
            emb[6] = emb[5] + eps * delta * emb[5].norm() / delta.norm()
        out[eps] = wrap(hf)
    return out


@pytest.mark.parametrize("component", list(COMPONENTS))
def test_estimate_converges_to_exact_effect_for_small_differences(near_models, component):
    errors, ratios = [], []
    for eps, model in near_models.items():
        kw = dict(component=component, by_position=True, **ANSWERS)
        estimate = attribution_patching(model, CLEAN_IDS, CORRUPTED_IDS, **kw).effect_matrix
        exact = activation_patching(model, CLEAN_IDS, CORRUPTED_IDS, **kw).effect_matrix
        errors.append(_rel_err(estimate, exact))
        top = exact.abs().argmax()
        ratios.append(float(estimate.flatten()[top] / exact.flatten()[top]))
    # first order: the error shrinks about linearly with the size of the difference
    assert errors[-1] < 0.02, errors
    assert errors[-1] < errors[0] / 10, errors
    assert abs(ratios[-1] - 1) < 0.02, ratios


# -- same result layout as activation patching ------------------------------------------------------
@pytest.mark.parametrize("by_position", [False, True])
@pytest.mark.parametrize("component", list(COMPONENTS))
def test_shapes_axes_labels_equal_activation_patching(tiny, component, by_position):
    kw = dict(component=component, by_position=by_position, **ANSWERS)
    est = attribution_patching(tiny, CLEAN_IDS, CORRUPTED_IDS, **kw)
    exact = activation_patching(tiny, CLEAN_IDS, CORRUPTED_IDS, **kw)
    assert est.shape == exact.shape
    assert est.axes == exact.axes
    assert est.labels == exact.labels
    assert est.method == "attribution_patching" and est.normalized
    assert_within([est.clean_metric, est.corrupted_metric],
                  [exact.clean_metric, exact.corrupted_metric], METRIC_ATOL, "baselines")
    assert torch.isfinite(est.effect_matrix).all()


def test_subsets_of_layers_heads_positions(tiny):
    kw = dict(component="attn_head", layers=[1], heads=[0, 2], positions=[2, -1],
              by_position=True, **ANSWERS)
    est = attribution_patching(tiny, CLEAN_IDS, CORRUPTED_IDS, **kw)
    exact = activation_patching(tiny, CLEAN_IDS, CORRUPTED_IDS, **kw)
    assert est.shape == exact.shape == (1, 2, 2)
    assert est.labels == exact.labels
    full = attribution_patching(tiny, CLEAN_IDS, CORRUPTED_IDS, component="attn_head",
                                by_position=True, **ANSWERS).effect_matrix
    assert_matches_reference(est.effect_matrix[0], full[1][[2, 5]][:, [0, 2]], 0.0, rtol=RTOL,
                             min_cells=MIN_CELLS, what="subset vs full sweep")


def test_joint_positions_are_the_sum_of_single_positions(tiny):
    kw = dict(component="resid_post", **ANSWERS)
    joint = attribution_patching(tiny, CLEAN_IDS, CORRUPTED_IDS, **kw).effect_matrix
    split = attribution_patching(tiny, CLEAN_IDS, CORRUPTED_IDS, by_position=True,
                                 **kw).effect_matrix
    assert_matches_reference(joint, split.sum(1), 0.0, rtol=RTOL, min_cells=MIN_CELLS,
                             what="joint vs sum of positions")
    # positions where clean and corrupted agree (before the change) estimate exactly 0
    assert torch.all(split[:, :2] == 0)


def test_noise_direction_takes_the_gradient_on_the_clean_run(tiny):
    kw = dict(component="attn_head", **ANSWERS)
    noise = attribution_patching(tiny, CLEAN_IDS, CORRUPTED_IDS, direction="noise", **kw)
    swapped = attribution_patching(tiny, CORRUPTED_IDS, CLEAN_IDS, **kw)
    assert noise.direction == "noise"
    assert_matches_reference(noise.effect_matrix, swapped.effect_matrix, 0.0, rtol=RTOL,
                             min_cells=MIN_CELLS, what="noise vs swapped denoise")
    assert noise.clean_metric == pytest.approx(swapped.corrupted_metric)


# -- datasets ----------------------------------------------------------------------------------
def test_dataset_averages_estimates_and_normalises_by_the_mean_gap(tiny):
    data = TextPairs([[1, 2, 5, 4, 3, 7], [8, 9, 5, 4, 3], [1, 5, 2, 4, 3, 7]],
                     [[1, 2, 6, 4, 3, 7], [8, 9, 6, 4, 3], [1, 6, 2, 4, 3, 7]],
                     [3, 3, 11], [9, 9, 12])
    res = attribution_patching(tiny, data, component="attn_head", batch_size=2)
    singles = [attribution_patching(tiny, [c], [k], component="attn_head", correct=a,
                                    incorrect=b)
               for c, k, a, b in zip(data.clean, data.corrupted, data.correct, data.incorrect)]
    raw = [s.effect_matrix * (s.clean_metric - s.corrupted_metric) for s in singles]
    gap = (sum(s.clean_metric for s in singles) - sum(s.corrupted_metric for s in singles)) / 3
    expected = sum(raw) / 3 / gap
    assert_matches_reference(res.effect_matrix, expected, 0.0, rtol=RTOL, min_cells=MIN_CELLS,
                             what="dataset vs hand formula")
    assert res.per_pair.shape == (3, 2, 4)
    assert_matches_reference(res.per_pair.mean(0), res.effect_matrix, 0.0, rtol=RTOL,
                             min_cells=MIN_CELLS, what="per-pair mean")
    assert res.std.shape == (2, 4)
    assert res.extra["n_pairs"] == 3


# -- exact verification of the largest estimates -------------------------------------------------
def test_verify_top_k_reports_exact_effects_of_the_largest_estimates(tiny):
    kw = dict(component="attn_head", by_position=True, **ANSWERS)
    est = attribution_patching(tiny, CLEAN_IDS, CORRUPTED_IDS, verify_top_k=4, **kw)
    exact = activation_patching(tiny, CLEAN_IDS, CORRUPTED_IDS, **kw).effect_matrix
    checked = est.extra["verified"]
    assert len(checked) == 4
    magnitudes = [abs(v["estimate"]) for v in checked]
    assert magnitudes == sorted(magnitudes, reverse=True)
    assert magnitudes[0] == pytest.approx(float(est.effect_matrix.abs().max()))
    for v in checked:
        cell = tuple(v["cell"])
        assert v["estimate"] == pytest.approx(float(est.effect_matrix[cell]))
        layer, pos, head = v["index"]
        assert (layer, pos, head) == (cell[0], est.extra["positions"][cell[1]], cell[2])
    # the verified exact values are the exact sweep's (normalised effects: unpatched value 0)
    assert_matches_reference([v["exact"] for v in checked],
                             [float(exact[tuple(v["cell"])]) for v in checked], 0.0,
                             rtol=RTOL_VERIFIED, min_cells=MIN_CELLS,
                             what="verified vs exact sweep")
    assert "verified" in est.to_dict()["extra"]  # JSON-serialisable
    est.to_json()


# -- no side effects ---------------------------------------------------------------------------------
def test_no_gradients_leak_and_hooks_are_removed(tiny):
    before = tiny.hook_snapshot()
    flags = [p.requires_grad for p in tiny.hf_model.parameters()]
    with torch.no_grad():  # works even when the caller disabled gradients
        res = attribution_patching(tiny, CLEAN_IDS, CORRUPTED_IDS, component="resid_mid",
                                   by_position=True, **ANSWERS)
        assert not torch.is_grad_enabled()  # the caller's grad mode is restored
    assert torch.isfinite(res.effect_matrix).all() and res.effect_matrix.abs().max() > 0
    assert all(p.grad is None for p in tiny.hf_model.parameters())
    assert [p.requires_grad for p in tiny.hf_model.parameters()] == flags
    assert tiny.hook_snapshot() == before


def test_works_when_parameters_do_not_require_grad():
    model = wrap(tiny_hf())
    reference = attribution_patching(model, CLEAN_IDS, CORRUPTED_IDS, component="mlp",
                                     **ANSWERS).effect_matrix
    model.hf_model.requires_grad_(False)
    frozen = attribution_patching(model, CLEAN_IDS, CORRUPTED_IDS, component="mlp",
                                  **ANSWERS).effect_matrix
    assert torch.equal(reference, frozen)


def test_hooks_removed_when_the_metric_raises(tiny):
    before = tiny.hook_snapshot()

    def broken(logits):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        attribution_patching(tiny, CLEAN_IDS, CORRUPTED_IDS, component="attn_head",
                             metric=broken)
    assert tiny.hook_snapshot() == before
    assert all(p.grad is None for p in tiny.hf_model.parameters())


def test_distance_metrics_are_estimated_from_the_base_gradient(tiny):
    for metric in ("kl", "l2"):
        est = attribution_patching(tiny, CLEAN_IDS, CORRUPTED_IDS, component="attn_head",
                                   metric=metric)
        assert_within(est.clean_metric, 0.0, METRIC_ATOL, "distance to itself")
        assert est.corrupted_metric > 0
        assert torch.isfinite(est.effect_matrix).all() and est.effect_matrix.abs().max() > 0


# -- argument errors -------------------------------------------------------------------------------
def test_bad_arguments_are_refused(tiny):
    with pytest.raises(InvalidArgumentError, match="verify_top_k"):
        attribution_patching(tiny, CLEAN_IDS, CORRUPTED_IDS, verify_top_k=-1, **ANSWERS)
    with pytest.raises(InvalidTypeError, match="verify_top_k"):
        attribution_patching(tiny, CLEAN_IDS, CORRUPTED_IDS, verify_top_k=1.5, **ANSWERS)
    with pytest.raises(InvalidArgumentError, match="batch_size"):
        attribution_patching(tiny, CLEAN_IDS, CORRUPTED_IDS, batch_size=0, **ANSWERS)
    with pytest.raises(InvalidArgumentError, match="direction"):
        attribution_patching(tiny, CLEAN_IDS, CORRUPTED_IDS, direction="sideways", **ANSWERS)
    with pytest.raises(InvalidArgumentError, match="same token length"):
        attribution_patching(tiny, [[1, 2, 5], [1, 2, 5, 4]], [[1, 2, 6], [1, 2, 6, 4]],
                             by_position=True, **ANSWERS)
    with pytest.raises(InvalidArgumentError, match="needs correct"):
        attribution_patching(tiny, CLEAN_IDS, CORRUPTED_IDS, metric="logit_diff")


# -- SmolLM2, IOI ------------------------------------------------------------------------------------
IOI = dict(correct=" Mary", incorrect=" John")


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


@pytest.mark.real
def test_ioi_heads_track_the_exact_sweep(smollm2):
    est = attribution_patching(smollm2, CLEAN, CORRUPTED, component="attn_head",
                               verify_top_k=3, **IOI)
    exact = activation_patching(smollm2, CLEAN, CORRUPTED, component="attn_head", **IOI)
    assert est.shape == exact.shape == (30, 9) and est.labels == exact.labels
    assert _corr(est.effect_matrix, exact.effect_matrix) > 0.95
    assert est.top_components(1)[0][0] == exact.top_components(1)[0][0] == (23, 3)
    verified = est.extra["verified"]
    assert_matches_reference([v["exact"] for v in verified],
                             [float(exact.effect_matrix[tuple(v["cell"])]) for v in verified],
                             0.0, rtol=RTOL_VERIFIED, min_cells=MIN_CELLS,
                             what="smollm2 verified vs exact")
    assert all(p.grad is None for p in smollm2.hf_model.parameters())


@pytest.mark.real
def test_ioi_residual_stream_fails_only_at_the_changed_token(smollm2):
    kw = dict(component="resid_post", by_position=True, **IOI)
    est = attribution_patching(smollm2, CLEAN, CORRUPTED, **kw).effect_matrix
    exact = activation_patching(smollm2, CLEAN, CORRUPTED, **kw).effect_matrix
    assert est.shape == exact.shape == (30, 14)
    assert torch.all(est[:, :FIRST_DIFF] == 0)
    others = [p for p in range(14) if p != FIRST_DIFF]
    assert _corr(est[:, others], exact[:, others]) > 0.99
    # swapping the name's whole residual stream is not a small change: exact ~1, estimate far
    # below (documented in docs/attribution_patching.md)
    assert torch.all(exact[:15, FIRST_DIFF] > 0.95)
    assert torch.all(est[:15, FIRST_DIFF] < 0.6)

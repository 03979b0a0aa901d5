"""Numerics across dtypes and vocabularies.

Stated tolerances (relative to the largest effect, on normalised effects, against the float32
run of the same sweep): float16 <= 0.01, bfloat16 <= 0.05 (bfloat16 keeps 8 bits of mantissa).
"""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import assert_matches_reference, assert_within

from causalpatch import InterpretableModel, activation_patching
from causalpatch.errors import NonFiniteError
from causalpatch.metrics import METRICS, MetricInputs, get_metric

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"
#: Relative tolerance of a half-precision sweep against the float32 one (:func:`conftest.
#: assert_matches_reference`: max |half - float32| over the largest float32 effect, normalised
#: effects of SmolLM2, 14 cells of which 8 are 0.33-1.01). Not small, and not a bug: every
#: matmul, norm and softmax of 30 layers rounds to 11 (float16) or 8 (bfloat16) bits of mantissa,
#: and the normalisation divides by a clean-corrupted gap computed in that precision. Observed:
#: float16 1.04e-3 (|diff| 1.06e-3 on effects up to 1.01), bfloat16 1.61e-2 (|diff| 1.63e-2).
TOLERANCE = {torch.float16: 0.01, torch.bfloat16: 0.05}
#: 100x a tolerance of 1-5% exceeds the largest effect, so half precision asks for cells whose
#: effect is >= 10x the tolerance: 8 cells (float16, >= 0.10) and 7 (bfloat16, >= 0.51) observed.
HALF_MARGIN = 10.0
HALF_MIN_CELLS = 6
SWEEP = dict(component="resid_post", layers=[0, 5, 10, 15, 20, 25, 29], positions=[9, 13],
             by_position=True, correct=" Mary", incorrect=" John")


@pytest.fixture(scope="module", params=[torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def low_precision(request, smollm2):
    hf = copy.deepcopy(smollm2.hf_model).to(request.param)
    return InterpretableModel(hf, tokenizer=smollm2.tokenizer)


@pytest.fixture(scope="module")
def float32_effects(smollm2):
    return activation_patching(smollm2, CLEAN, CORRUPTED, **SWEEP).effect_matrix


def test_low_precision_effects_match_float32(low_precision, float32_effects):
    result = activation_patching(low_precision, CLEAN, CORRUPTED, **SWEEP)
    assert torch.isfinite(result.effect_matrix).all()
    # normalised effects (unpatched value 0); the reference is the float32 run of the same sweep
    assert_matches_reference(result.effect_matrix, float32_effects, 0.0,
                             rtol=TOLERANCE[low_precision.dtype], min_cells=HALF_MIN_CELLS,
                             margin=HALF_MARGIN, what=f"{low_precision.dtype} vs float32")


@pytest.mark.parametrize("metric", sorted(METRICS))
def test_every_metric_is_finite_in_low_precision(low_precision, metric):
    result = activation_patching(low_precision, CLEAN, CORRUPTED, metric=metric,
                                 component="resid_post", layers=[10, 29], positions=[-1],
                                 correct=" Mary", incorrect=" John")
    assert torch.isfinite(result.effect_matrix).all()
    # patching the last layer's residual stream gives the corrupted run's final logits, so the
    # normalised effect divides a number by itself: observed bitwise 1.0 (difference 0) for
    # every metric in float16 and bfloat16, and nothing can round differently
    assert_within(result.effect_matrix[1], 1.0, 0.0, f"{low_precision.dtype} {metric} last layer")


# -- Gemma 3 270M: 262,144-token vocabulary ------------------------------------------------------
@pytest.fixture(scope="module")
def gemma_logits():
    model = InterpretableModel("gemma3-270m")
    assert model.vocab_size == 262_144
    prompts = ["The Eiffel Tower is in the city of", "The Colosseum is in the city of"]
    logits = torch.stack([model.trace(p).run().last_logits[0] for p in prompts])
    return model, logits


#: Relative difference of each distance metric (float32, 262,144 logits) from a float64
#: computation on the same inputs, largest over float32 and float16 inputs. Observed: l2 4.9e-8,
#: mse 1.2e-7, cosine 1.3e-5, kl 9.5e-7; nonzero because the metric sums 262,144 float32 terms
#: (and cosine is 1 - a ratio near 0.7, which loses about 2 digits to cancellation). Bounds are
#: 5-9x those.
DISTANCE_REL = {"l2": 4e-7, "mse": 1e-6, "cosine": 1e-4, "kl": 5e-6}


def _float64_reference(name: str, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    x, t = logits.double(), target.double()
    if name == "l2":
        return ((x - t) ** 2).sum(-1).sqrt()
    if name == "mse":
        return ((x - t) ** 2).mean(-1)
    if name == "cosine":
        return 1 - (x * t).sum(-1) / (x.norm(dim=-1) * t.norm(dim=-1))
    p = torch.softmax(t, -1)
    return (p * (torch.log_softmax(t, -1) - torch.log_softmax(x, -1))).sum(-1)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name", ["l2", "mse", "cosine", "kl"])
def test_distance_metrics_on_gemma_vocabulary(gemma_logits, name, dtype):
    _, logits = gemma_logits
    x, target = logits[:1].to(dtype), logits[1:].to(dtype)
    value = get_metric(name)(x, MetricInputs(target_logits=target))
    assert value.dtype == torch.float32 and torch.isfinite(value).all()
    expected = _float64_reference(name, x.float(), target.float())
    assert_within(value.double() / expected, 1.0, DISTANCE_REL[name], f"{name} {dtype}")


@pytest.mark.slow
def test_float16_l2_does_not_overflow_with_large_logits():
    # float16 squares overflow at 256; a 262k-vocabulary l2 must still be finite
    x = torch.full((1, 262_144), 300.0, dtype=torch.float16)
    t = torch.full((1, 262_144), -300.0, dtype=torch.float16)
    value = get_metric("l2")(x, MetricInputs(target_logits=t))
    assert torch.isfinite(value).all()
    # observed bitwise 600 * 512: torch.sum's cascade adds 2^18 equal squares exactly. One float32
    # ulp of the result (2^-5 at 307,200) is allowed so another accurate summation order passes;
    # an overflowing or float16 accumulation is off by far more
    assert_within(value, 600 * 512, 2.0**-5, "l2 of large float16 logits")


@pytest.mark.slow
def test_gemma_sweeps_are_finite_in_bfloat16_and_refuse_float16_overflow(gemma_logits):
    model, _ = gemma_logits
    pair = ("The Eiffel Tower is in the city of", "The Colosseum is in the city of")
    bf16 = InterpretableModel(copy.deepcopy(model.hf_model).to(torch.bfloat16),
                              tokenizer=model.tokenizer)
    for metric in ("l2", "kl", "cosine", "mse"):
        result = activation_patching(bf16, *pair, component="mlp", layers=[3, 17],
                                     metric=metric)
        assert torch.isfinite(result.effect_matrix).all()
    # Gemma's activations overflow float16 (the model's own logits become NaN): causalpatch
    # says so instead of returning NaN effects
    half = InterpretableModel(copy.deepcopy(model.hf_model).to(torch.float16),
                              tokenizer=model.tokenizer)
    with pytest.raises(NonFiniteError, match="float32"):
        activation_patching(half, *pair, component="mlp", layers=[3], metric="l2")

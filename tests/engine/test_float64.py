"""Float64 controls: the fast engine equals the naive loop in float64, so no float32 rounding
can hide a real difference.

The float32 tests allow 1e-5 on logits, which is also the size of float32's own error; here the
tiny models run in float64 (``hf_model.double()``, as in ``models/test_trace.py``) and the
engine's logits must agree to :data:`REL64` of their magnitude.  Families: LLaMA (grouped-query
heads, 4 query / 2 key-value), GPT-2 (fused ``c_attn``), Gemma 3 (sandwich norms, sliding
windows, soft-caps) and GPT-NeoX with a parallel residual.

The engine returns float32 logits whatever the model's dtype (``patched_logits``), so the
float64 logits of both sides are rounded once to float32 at the end: agreeing far below float32
resolution in float64, they can differ by at most one float32 ulp after that rounding, and
:data:`ULP32` (one ulp relative to each logit) is the bound.  A float32 model's fast and naive
logits differ by many ulps (~1e-6 absolute); a real mismatch (a wrong unit, position or head)
is of order the effect (far above the bound: :func:`_close32`).  Every component kind; mlp_neuron on
a sample of neurons (first, last, seeded random).

Method level (``activation_patching`` fast vs naive, ``ablate`` fast vs naive,
``attribution_patching``'s verified exact values vs the naive loop, ``sae_patching`` fast vs
naive): metrics are returned in float32 whatever the model's dtype
(:mod:`causalpatch.metrics`), so raw metric values (``normalize=False``) are compared to
:data:`REL32` of their magnitude: a few float32 ulps, ~100x tighter than the float32 tests'
1e-5 on values of order 1-10.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_matches_reference, tiny_hf_model, tiny_tokenizer

from causalpatch import InterpretableModel, ablate, activation_patching, attribution_patching
from causalpatch.engine import collect_sites, patched_logits, run_base_and_source
from causalpatch.enums import Engine
from causalpatch.errors import UnknownComponentError
from causalpatch.plan import build_patches, make_pairs, plan_component, resolve_positions

CLEAN, CORRUPTED = "abcdefghijkl", "abcdeXghijkl"  # 12 tokens, differ at position 5
FAMILIES64 = ["llama", "gpt2", "gemma3_text", "gpt_neox_parallel"]
COMPONENTS = ["resid_pre", "resid_mid", "resid_post", "attn", "mlp", "attn_head",
              "attn_head_q", "attn_head_k", "attn_head_v", "mlp_neuron"]
#: engine logits of a float64 model, rounded to float32 at the end: |fast - naive| <= ULP32 *
#: |naive| element by element (one float32 ulp, 2**-23 of the value). Observed: 0 ulps, fast
#: and naive logits bitwise equal after the rounding in every family, component and by_position
#: setting. One ulp, not 0, is the smallest bound rounding admits: a float64 difference of
#: ~1e-16 (other summation orders) flips a float32 rounding when it lands on a midpoint.
ULP32 = 2.0 ** -23
#: method results are float32 metric values of float64 logits: max |fast - naive| <=
#: REL32 * max(1, max |value|) (float32 eps is 1.2e-7: a couple of ulps of the largest value).
#: Observed: 0 (bitwise equal) for activation patching, ablate and attribution's verified values
#: on every family and component, since both sides' float32 logits are bitwise equal (above);
#: the bound allows one flipped logit rounding (an ulp of a logit of up to ~5 moves a metric by
#: up to 4.8e-7). The float64 method tests of path patching and causal tracing, which compare
#: with constructions of their own, observe 1.8e-7 (``methods/test_float64_methods.py``).
REL32 = 5e-7
#: non-vacuity (``conftest.assert_matches_reference`` through :func:`_close32`): the largest
#: effect is >= 1000x the rounding bound, and at least MIN_CELLS cells move by 100x it. Fewest
#: observed: 3 of 3 (``attn``, one cell per layer); smallest largest effect 0.035 (GPT-2
#: ``attn_head_q``), 3.5e4x its bound.
MIN_CELLS = 3


@pytest.fixture(scope="module", params=FAMILIES64)
def model64(request):
    hf = tiny_hf_model(request.param).double()
    model = InterpretableModel(hf, tokenizer=tiny_tokenizer())
    assert next(model.hf_model.parameters()).dtype == torch.float64
    return request.param, model


def _neurons(model):
    gen = torch.Generator().manual_seed(0)
    picks = torch.randperm(model.d_mlp, generator=gen)[:6].tolist()
    return sorted({0, model.d_mlp - 1, *picks})


@pytest.mark.parametrize("by_position", [False, True])
@pytest.mark.parametrize("component", COMPONENTS)
def test_float64_fast_engine_equals_naive_loop(model64, component, by_position, one_thread):
    family, model = model64
    if component == "resid_mid" and family == "gpt_neox_parallel":
        with pytest.raises(UnknownComponentError, match="parallel residual"):
            model.site("blocks.1.resid_mid")  # not defined there: refused, nothing to compare
        return
    pair = make_pairs(model, CLEAN, CORRUPTED, 5, 6)[0]
    neurons = _neurons(model) if component == "mlp_neuron" else None
    plan = plan_component(model, component, None, None, neurons)
    positions = resolve_positions(None, by_position, 12)
    patches = build_patches(plan, positions, by_position, 12)
    run = run_base_and_source(model, pair.corrupted, pair.clean, collect_sites(patches), patches,
                              Engine.NAIVE)
    fast = patched_logits(model, run, patches, Engine.FAST, batch_size=7)
    naive = patched_logits(model, run, patches, Engine.NAIVE)
    assert fast.dtype == naive.dtype == torch.float32  # documented: float32 logits
    excess = ((fast - naive).abs() - ULP32 * naive.abs()).max().item()
    assert excess <= 1e-30, excess
    # the rule of conftest: one ulp of the largest logit, relative to the largest effect
    _close32(fast, naive, run.base_last, ULP32, f"{family} {component} {by_position}")


def _close32(fast, naive, unpatched, rel: float, what: str) -> None:
    """``conftest.assert_matches_reference`` with the bound ``rel * max(1, max |naive|)`` (float32
    rounding of the values) expressed relative to the largest effect ``max |naive -
    unpatched|``; at least :data:`MIN_CELLS` cells move by 100x that bound."""
    bound = rel * max(1.0, float(torch.as_tensor(naive).abs().max()))
    scale = float((torch.as_tensor(naive).double() - torch.as_tensor(unpatched).double()).abs()
                  .max())
    assert scale >= 1000 * bound, f"{what}: the largest effect {scale:.3g} is < 1000x {bound:.3g}"
    assert_matches_reference(fast, naive, unpatched, rtol=bound / scale, min_cells=MIN_CELLS,
                             what=what)


ANSWERS = dict(correct=5, incorrect=6, normalize=False)


@pytest.mark.parametrize("component", COMPONENTS)
def test_float64_activation_patching_fast_equals_naive(model64, component, one_thread):
    family, model = model64
    if component == "resid_mid" and family == "gpt_neox_parallel":
        with pytest.raises(UnknownComponentError, match="parallel residual"):
            model.site("blocks.1.resid_mid")  # not defined there: refused, nothing to compare
        return
    kw = dict(component=component, by_position=component.startswith("resid"), **ANSWERS)
    if component == "mlp_neuron":
        kw["neurons"] = _neurons(model)
    fast = activation_patching(model, CLEAN, CORRUPTED, **kw)
    naive = activation_patching(model, CLEAN, CORRUPTED, engine="naive", **kw)
    _close32(fast.effect_matrix, naive.effect_matrix, naive.corrupted_metric, REL32,
             f"{family} {component} activation patching")


@pytest.mark.parametrize("component", ["attn_head", "mlp_neuron", "resid_post", "attn_head_v"])
@pytest.mark.parametrize("kind", ["zero", "mean"])
def test_float64_ablate_fast_equals_naive(model64, component, kind, one_thread):
    family, model = model64
    prompts = [CLEAN, CORRUPTED, "bcdefghijklm"]
    kw = dict(component=component, kind=kind, correct=5, incorrect=6)
    if component == "mlp_neuron":
        kw["neurons"] = _neurons(model)
    fast = ablate(model, prompts, **kw).effect_matrix
    naive = ablate(model, prompts, engine="naive", **kw).effect_matrix
    _close32(fast, naive, 0.0, REL32, f"{family} {component} {kind} ablation")  # changes: 0


@pytest.mark.parametrize("component", ["attn_head", "attn_head_k", "mlp_neuron", "resid_pre"])
def test_float64_attribution_verified_values_equal_naive(model64, component, one_thread):
    family, model = model64
    kw = dict(component=component, correct=5, incorrect=6, by_position=component == "resid_pre")
    if component == "mlp_neuron":
        kw["neurons"] = _neurons(model)
    result = attribution_patching(model, CLEAN, CORRUPTED, verify_top_k=5, **kw)
    naive = activation_patching(model, CLEAN, CORRUPTED, engine="naive", **kw).effect_matrix
    verified = result.extra["verified"]
    assert len(verified) == 5
    exact = torch.tensor([v["exact"] for v in verified], dtype=torch.float64)
    expected = torch.stack([naive[tuple(v["cell"])] for v in verified]).double()
    _close32(exact, expected, 0.0, REL32, f"{family} {component} attribution verified")

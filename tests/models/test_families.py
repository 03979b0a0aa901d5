"""Every architecture adapter on a tiny model of its family: names, shapes, identities between
sites, interventions, padded batches and the fast engine against the naive loop."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_matches_reference, neuron_sample

import causalpatch.interventions as iv
from causalpatch.engine import collect_sites, patched_logits, run_base_and_source
from causalpatch.enums import Engine
from causalpatch.errors import OutOfRangeError, UnknownComponentError, UnsupportedArchitectureError
from causalpatch.plan import build_patches, make_pairs, plan_component, resolve_positions

CLEAN, CORRUPTED = "abcdefghijkl", "abcdeXghijkl"  # 12 tokens, differ at position 5
#: fast engine against the naive loop (``conftest.assert_matches_reference``): max |fast - naive|
#: over the largest effect max |naive - base|, float32 logits. Not zero: the fast engine
#: batches 7 rows (other matmul shapes, other float32 summation orders). Largest ratio observed
#: 2.5e-5 (attn_head_q by position, 1.1e-6 absolute on a largest effect of 0.043); most
#: components 0 to 1e-6.
FAMILY_RTOL = 1e-4
#: cells (row x vocabulary entry) with an effect >= 100x the tolerance: fewest observed 344
#: (counted at 10x this tolerance, so at least that many here).
FAMILY_MIN_CELLS = 300


@pytest.fixture
def model(tiny_lm):
    """The shared tiny model of every family (``conftest.FAMILIES``)."""
    return tiny_lm


def test_hooked_logits_equal_plain_transformers(model):
    ids = model.to_tokens(CLEAN)
    with torch.no_grad():
        plain = model.hf_model(input_ids=ids).logits
    logits, cache = model.run_with_cache(CLEAN, names=True)
    assert torch.equal(logits, plain)
    assert len(cache) == len(model.component_names())


def test_cached_shapes(model):
    _, cache = model.run_with_cache([CLEAN, CORRUPTED], names=True)
    d = model.dims
    for layer in range(d.n_layers):
        for kind in ("resid_pre", "resid_post", "attn", "mlp"):
            assert cache[f"blocks.{layer}.{kind}"].shape == (2, 12, d.d_model)
        assert cache[f"blocks.{layer}.attn.z"].shape == (2, 12, d.n_heads, d.d_head)
        assert cache[f"blocks.{layer}.attn.q"].shape == (2, 12, d.n_heads, d.d_head)
        assert cache[f"blocks.{layer}.attn.k"].shape == (2, 12, d.n_kv_heads, d.d_head)
        assert cache[f"blocks.{layer}.mlp.post"].shape == (2, 12, d.d_mlp)


def test_residual_identities(model):
    _, c = model.run_with_cache(CLEAN, names=True)
    parallel = getattr(model.config, "use_parallel_residual", False)
    for layer in range(model.n_layers):
        pre, post = c[f"blocks.{layer}.resid_pre"], c[f"blocks.{layer}.resid_post"]
        if layer + 1 < model.n_layers:
            assert torch.equal(post, c[f"blocks.{layer + 1}.resid_pre"])
        attn, mlp = c[f"blocks.{layer}.attn"], c[f"blocks.{layer}.mlp"]
        assert torch.allclose(pre + attn + mlp, post, atol=1e-5)
        if not parallel:
            assert torch.allclose(pre + attn, c[f"blocks.{layer}.resid_mid"], atol=1e-6)


def test_zeroing_one_head_equals_zeroing_its_slice_of_the_projection_input(model):
    site = model.site("blocks.1.attn.z")
    module = model.hf_model.get_submodule(site.module_path)
    d_head = model.d_head

    def manual(mod, args, kwargs):
        x = (args[0] if args else kwargs["hidden_states"]).clone()
        x[..., 2 * d_head:3 * d_head] = 0
        return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})

    handle = module.register_forward_pre_hook(manual, with_kwargs=True)
    try:
        expected = model.trace(CLEAN).run().logits
    finally:
        handle.remove()
    got = model.trace(CLEAN, interventions={"blocks.1.attn.z": iv.zero(heads=[2])}).run().logits
    assert torch.equal(got, expected)


@pytest.mark.parametrize("kind", ["attn.q", "attn.k", "attn.v", "mlp.post", "resid_mid"])
def test_views_round_trip_and_writes_take_effect(model, kind):
    if kind == "resid_mid" and getattr(model.config, "use_parallel_residual", False):
        with pytest.raises(UnknownComponentError, match="parallel residual"):
            model.site("blocks.1.resid_mid")
        return  # parallel residual: no resid_mid to round-trip; its refusal is checked above
    name = f"blocks.1.{kind}"
    logits, cache = model.run_with_cache(CLEAN, names=[name])
    same = model.trace(CLEAN, interventions={name: iv.replace_with(cache[name])}).run().logits
    assert torch.allclose(same, logits, atol=1e-6)
    zeroed = model.trace(CLEAN, interventions={name: iv.zero()}).run().logits
    assert (zeroed - logits).abs().max() > 1e-4


def test_padded_batch_rows_equal_unbatched_runs(model):
    rows = model.trace([CLEAN, "abc", "abcdefg"]).run().last_logits
    for i, prompt in enumerate([CLEAN, "abc", "abcdefg"]):
        alone = model.trace(prompt).run().last_logits[0]
        assert (rows[i] - alone).abs().max() <= 1e-5


@pytest.mark.parametrize("component,by_position", [
    ("resid_pre", True), ("resid_mid", True), ("resid_post", True), ("attn", True),
    ("mlp", True), ("attn_head", False), ("attn_head", True), ("attn_head_q", True),
    ("attn_head_k", True), ("attn_head_v", False), ("mlp_neuron", False)])
def test_fast_engine_equals_naive_loop(model, component, by_position):
    if component == "resid_mid" and getattr(model.config, "use_parallel_residual", False):
        with pytest.raises(UnknownComponentError, match="parallel residual"):
            model.site("blocks.1.resid_mid")  # not defined there: refused, nothing to compare
        return
    pair = make_pairs(model, CLEAN, CORRUPTED, 5, 6)[0]
    plan = plan_component(model, component, None, None)
    positions = resolve_positions(None, by_position, 12)
    patches = build_patches(plan, positions, by_position, 12)
    run = run_base_and_source(model, pair.corrupted, pair.clean, collect_sites(patches), patches,
                              Engine.NAIVE)
    base_last = run.base_last
    fast = patched_logits(model, run, patches, Engine.FAST, batch_size=7)
    rows = list(range(len(patches)))
    if component == "mlp_neuron":  # the naive loop on a sample: every neuron is a forward
        rows = neuron_sample((fast - base_last).abs().amax(-1), len(plan.layers))
    naive = patched_logits(model, run, [patches[i] for i in rows], Engine.NAIVE)
    assert_matches_reference(fast[rows], naive, base_last, rtol=FAMILY_RTOL,
                             min_cells=FAMILY_MIN_CELLS, what=f"{component} {by_position}")


def test_names_and_errors(model):
    assert model.site("layers.1.mlp").name == "blocks.1.mlp"
    assert model.site("blocks.1.hook_resid_pre").name == "blocks.1.resid_pre"
    raw = model.adapter.layers + ".1.mlp"
    assert model.site(raw).name == "blocks.1.mlp"
    with pytest.raises(UnknownComponentError, match="Did you mean"):
        model.site("blocks.1.mpl")
    with pytest.raises(OutOfRangeError, match="layer must be in"):
        model.site("blocks.3.mlp")


def test_unsupported_architecture_names_the_supported_ones():
    from transformers import BertConfig

    from causalpatch.adapters import adapter_for

    with pytest.raises(UnsupportedArchitectureError, match="llama"):
        adapter_for(BertConfig())

"""Trace on SmolLM2: facts the model knows, padding exactness, composition, binding."""

from __future__ import annotations

import copy

import pytest
import torch

import causalpatch.interventions as iv
from causalpatch import InterpretableModel

IOI_CLEAN = "When Mary and John went to the store, John gave a drink to"
IOI_CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"


def test_smollm2_knows_the_eiffel_tower(smollm2):
    top = smollm2.generate_top_tokens("The Eiffel Tower is in the city of", k=1)
    assert top[0][0] == " Paris"


def test_smollm2_ioi_logit_differences(smollm2):
    mary, john = smollm2.to_single_token(" Mary"), smollm2.to_single_token(" John")
    clean = smollm2.trace(IOI_CLEAN).run().last_logits[0]
    corrupted = smollm2.trace(IOI_CORRUPTED).run().last_logits[0]
    assert (clean[mary] - clean[john]).item() == pytest.approx(6.1, abs=0.3)
    assert (corrupted[mary] - corrupted[john]).item() == pytest.approx(-5.5, abs=0.3)


def test_model_properties(smollm2):
    assert (smollm2.n_layers, smollm2.n_heads, smollm2.n_kv_heads, smollm2.d_model,
            smollm2.d_head, smollm2.d_mlp, smollm2.vocab_size) == (30, 9, 3, 576, 64, 1536, 49152)
    assert smollm2.architecture == "llama"
    assert smollm2.to_str_tokens("Hello world") == ["Hello", " world"]


def test_padding_is_exact_and_float32_rows_agree_to_rounding(smollm2):
    """Right padding is mathematically exact: in float64 each padded row equals its unbatched
    run to 1e-10. In float32 the padded (masked) kernels round differently: rows agree to 1e-4
    in logits of magnitude ~30, the same size as float32's own error against float64 (3e-5)."""
    prompts = [IOI_CLEAN, "Hello there", "The Eiffel Tower is in"]
    rows = smollm2.trace(prompts).run().last_logits
    for i, p in enumerate(prompts):
        assert (rows[i] - smollm2.trace(p).run().last_logits[0]).abs().max() <= 1e-4
    m64 = InterpretableModel(copy.deepcopy(smollm2.hf_model).double(), tokenizer=smollm2.tokenizer)
    rows64 = m64.trace(prompts).run().last_logits
    for i, p in enumerate(prompts):
        assert (rows64[i] - m64.trace(p).run().last_logits[0]).abs().max() <= 1e-10


def test_interventions_compose_in_order(smollm2):
    name = "blocks.4.mlp"
    _, cache = smollm2.run_with_cache(IOI_CLEAN, names=[name])
    tr = smollm2.trace(IOI_CLEAN, interventions={name: [iv.scale(2.0), iv.add(torch.ones(576))]},
                       cache=[name]).run()
    assert torch.allclose(tr.cache[name], cache[name] * 2 + 1, atol=1e-5)
    tr2 = smollm2.trace(IOI_CLEAN, interventions={name: [iv.add(torch.ones(576)), iv.scale(2.0)]},
                        cache=[name]).run()
    assert torch.allclose(tr2.cache[name], (cache[name] + 1) * 2, atol=1e-5)


def test_replace_with_binds_its_value_at_construction(smollm2):
    value = torch.zeros(576)
    patch = iv.replace_with(value, positions=[-1])
    value += 5.0  # changing the caller's tensor afterwards must not matter
    tr = smollm2.trace(IOI_CLEAN, interventions={"blocks.2.resid_post": patch},
                       cache=["blocks.2.resid_post"]).run()
    assert torch.equal(tr.cache["blocks.2.resid_post"][0, -1], torch.zeros(576))


def test_wrong_shape_is_refused_before_any_forward(smollm2):
    calls = []
    handle = smollm2.hf_model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=r"\(3,\).*\(1, 14, 9, 64\)"):
            smollm2.trace(IOI_CLEAN, interventions={"blocks.1.attn.z": iv.replace_with(
                torch.zeros(3))})
    finally:
        handle.remove()
    assert calls == []

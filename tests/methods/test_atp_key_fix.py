"""AtP*'s key fix in closed form (``engine.KeyPatternChange``), checked against the exact
recomputation it replaces (``engine.pattern_patched_outputs``: one forward per key position,
the patched pattern computed by the model's own attention).

When key ``n`` alone takes its source key, only column ``n`` of the attention logits changes,
so every query row's patched pattern is ``softmax(s_t + e_n ds_tn)``; the estimate linearises
only what follows the pattern. Checked: the closed form equals the exact recomputation on
every attention layout (grouped-query LLaMA, Gemma 2's soft-capped and Gemma 3's
sliding-window attention, GPT-2, GPT-NeoX, Qwen 3's q/k norms, SmolLM3's NoPE layer), through
``attribution_patching`` too (GradDrop included), on a saturated softmax where plain AtP misses
a key, and it steps aside (exact recomputation) when the logits do not reproduce the layer's
attention; queries and keys patched jointly keep the exact run (one forward, as cheap). The
``O(T^2)`` form is also checked against its definition (every patched row's softmax) on
random logits with masks and saturated rows.
"""

from __future__ import annotations

import pytest
import torch

from conftest import (IdTokenizer, assert_matches_reference, id_llama_hf, tiny_hf_model,
                      tiny_tokenizer)

import causalpatch.adapters.runtime as runtime
import causalpatch.methods.attribution as attribution
from causalpatch import InterpretableModel, activation_patching
from causalpatch.engine import gradient_pass, key_pattern_changes, pattern_patched_outputs
from causalpatch.methods.attribution import attribution_patching

pytestmark = pytest.mark.usefixtures("one_thread")

BASE_IDS = torch.tensor([[5, 9, 14, 7, 22, 31, 12, 40, 18, 25]])
SOURCE_IDS = torch.tensor([[5, 9, 17, 7, 22, 30, 12, 40, 18, 25]])
CLEAN_IDS = [[1, 2, 5, 4, 3, 7, 8, 2]]
CORRUPTED_IDS = [[1, 2, 6, 4, 3, 9, 8, 2]]
ANSWERS = dict(correct=3, incorrect=9)

#: Every attention layout the closed form must represent (float32 tiny models).
FAMILIES = ["llama", "gemma3_text", "gemma2", "gpt2", "gpt_neox_parallel", "qwen3", "smollm3"]

#: Closed form vs exact recomputation, relative to the largest per-key contribution: float32
#: rounding of the two routes (observed at most 5.2e-7, GPT-NeoX; 2.3e-7 to 4.0e-7 elsewhere).
ENGINE_RTOL = 3e-6
#: The same through attribution_patching (effects stored in float32; observed at most 6.1e-7,
#: Gemma 3's GradDrop; the saturated model 2.3e-7).
METHOD_RTOL = 5e-6


def _objective(logits: torch.Tensor, source_logits: torch.Tensor) -> torch.Tensor:
    return logits[:, 3] - logits[:, 9]


def _both_routes(model: InterpretableModel, base_ids: torch.Tensor = BASE_IDS,
                 source_ids: torch.Tensor = SOURCE_IDS,
                 objective=_objective) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer, key position and query head ``[L, R, H]``: ``sum_t (z'_t - z_t) . dM/dz_t``
    with ``z'`` from the closed form and from the exact recomputation."""
    n_layers, length = model.n_layers, base_ids.shape[1]
    k_sites = [model.layer_site("attn.k", layer) for layer in range(n_layers)]
    z_sites = [model.layer_site("attn.z", layer) for layer in range(n_layers)]
    v_sites = [model.layer_site("attn.v", layer) for layer in range(n_layers)]
    grads = gradient_pass(model, base_ids, source_ids, [*k_sites, *z_sites], objective)
    changes = key_pattern_changes(
        model, base_ids, [(k, grads.source[k.name], v, z)
                          for k, v, z in zip(k_sites, v_sites, z_sites)], range(length))
    assert changes is not None, "the closed form stepped aside"
    outs = pattern_patched_outputs(
        model, base_ids, [(k, grads.source[k.name], z, grads.base[z.name])
                          for k, z in zip(k_sites, z_sites)], [[p] for p in range(length)])
    closed, exact = [], []
    for layer, z in enumerate(z_sites):
        g = grads.grads[z.name]["act"].double()
        dz = outs[layer].double() - grads.base[z.name].double()[:, None]  # [b, R, T, H, d]
        exact.append((dz * g[:, None]).sum(-1).sum(2)[0])
        closed.append(changes[layer].contract(g)[0])
    return torch.stack(closed), torch.stack(exact)


@pytest.mark.parametrize("family", FAMILIES)
def test_closed_form_key_fix_equals_the_exact_recomputation(family):
    model = InterpretableModel(tiny_hf_model(family), tokenizer=tiny_tokenizer())
    before = model.hook_snapshot()
    closed, exact = _both_routes(model)
    assert closed.shape == (model.n_layers, BASE_IDS.shape[1], model.dims.n_heads)
    assert_matches_reference(closed, exact, 0.0, rtol=ENGINE_RTOL, min_cells=20,
                             what=f"{family} key fix")
    assert model.hook_snapshot() == before


@pytest.mark.real
def test_closed_form_key_fix_equals_the_exact_recomputation_on_smollm2(smollm2):
    """SmolLM2-135M (30 layers, 9 query / 3 key-value heads), an IOI pair."""
    base = smollm2.to_tokens("When Mary and John went to the store, Mary gave a drink to")
    source = smollm2.to_tokens("When Mary and John went to the store, John gave a drink to")
    mary, john = smollm2.to_single_token(" Mary"), smollm2.to_single_token(" John")

    def objective(logits: torch.Tensor, source_logits: torch.Tensor) -> torch.Tensor:
        return logits[:, mary] - logits[:, john]

    closed, exact = _both_routes(smollm2, base, source, objective)
    # observed ratio 1.7e-6 (float32 rounding over 30 layers of scores and values)
    assert_matches_reference(closed, exact, 0.0, rtol=1.5e-5, min_cells=50,
                             what="smollm2 key fix")


def _llama() -> InterpretableModel:
    return InterpretableModel(tiny_hf_model("llama"), tokenizer=tiny_tokenizer())


def _exact_route(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make attribution_patching take the exact recomputation (as for an unreadable model)."""
    monkeypatch.setattr(attribution, "key_pattern_changes", lambda *a, **k: None)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_attribution_patching_uses_the_closed_form_and_matches_the_exact_route(
        family, monkeypatch):
    model = InterpretableModel(tiny_hf_model(family), tokenizer=tiny_tokenizer())
    before = model.hook_snapshot()
    kw = dict(component="attn_head_k", by_position=True, method="atp*", **ANSWERS)
    closed = attribution_patching(model, CLEAN_IDS, CORRUPTED_IDS, **kw)
    assert closed.extra["qk_fix"] == "closed form"
    assert closed.timings["qk_fix_s"] > 0
    with monkeypatch.context() as m:
        _exact_route(m)
        exact = attribution_patching(model, CLEAN_IDS, CORRUPTED_IDS, **kw)
    assert exact.extra["qk_fix"] == "exact recomputation"
    assert_matches_reference(closed.effect_matrix, exact.effect_matrix, 0.0, rtol=METHOD_RTOL,
                             min_cells=10, what=f"{family} attn_head_k atp*")
    assert_matches_reference(torch.tensor(closed.extra["graddrop"]),
                             torch.tensor(exact.extra["graddrop"]), 0.0, rtol=METHOD_RTOL,
                             min_cells=10, what=f"{family} attn_head_k GradDrop")
    assert model.hook_snapshot() == before


def test_closed_form_finds_the_key_plain_atp_misses_in_a_saturated_softmax(monkeypatch):
    """Layer 1's queries sharpened 12x (a saturated softmax): patching key position 6 of key
    head 1 has an exact effect of 1.35, plain AtP estimates 0.0001 (the gradient at a key
    the softmax ignores is ~0), the closed-form key fix 1.04: the pattern is exact, what
    follows it linear. It equals the exact recomputation, in float32 as in float64."""
    for dtype in (torch.float64, torch.float32):
        hf = id_llama_hf(n_layers=2, seed=1, dtype=dtype, initializer_range=0.3)
        with torch.no_grad():
            hf.model.layers[1].self_attn.q_proj.weight.mul_(12.0)
        model = InterpretableModel(hf, tokenizer=IdTokenizer())
        pattern = model.attention_pattern(CORRUPTED_IDS[0], 1)
        assert float(pattern.max()) > 0.999  # saturated
        kw = dict(component="attn_head_k", layers=[1], by_position=True, **ANSWERS)
        exact = activation_patching(model, CLEAN_IDS, CORRUPTED_IDS, **kw).effect_matrix[0]
        plain = attribution_patching(model, CLEAN_IDS, CORRUPTED_IDS, **kw).effect_matrix[0]
        star = attribution_patching(model, CLEAN_IDS, CORRUPTED_IDS, method="atp*", **kw)
        assert star.extra["qk_fix"] == "closed form"
        fixed = star.effect_matrix[0]
        assert float(exact[6, 1]) > 1.0 and abs(float(plain[6, 1])) < 0.01
        assert 0.7 < float(fixed[6, 1]) / float(exact[6, 1]) < 1.3
        # over all cells: AtP*'s largest error 0.31 (position 6, head 1), plain AtP's 1.35
        assert (fixed - exact).abs().max() < (plain - exact).abs().max() / 3
        with monkeypatch.context() as m:
            _exact_route(m)
            recomputed = attribution_patching(model, CLEAN_IDS, CORRUPTED_IDS, method="atp*",
                                              **kw).effect_matrix[0]
        assert_matches_reference(fixed, recomputed, 0.0, rtol=METHOD_RTOL, min_cells=3,
                                 what=f"saturated {dtype}")


def test_logits_that_do_not_reproduce_the_attention_fall_back_to_the_exact_route(monkeypatch):
    """A family whose attention the logits do not describe (here: a scaling the model does not
    use) is caught by the check softmax(logits) . v == the layer's own output."""
    model = _llama()
    kw = dict(component="attn_head_k", by_position=True, method="atp*", **ANSWERS)
    with monkeypatch.context() as m:
        _exact_route(m)
        exact = attribution_patching(model, CLEAN_IDS, CORRUPTED_IDS, **kw)
    real = runtime.attention_scores

    def wrong(query, key, mask, scaling=None, softcap=None):
        return real(query, key, mask, 0.5 * (scaling or query.shape[-1] ** -0.5), softcap)

    monkeypatch.setattr(runtime, "attention_scores", wrong)
    res = attribution_patching(model, CLEAN_IDS, CORRUPTED_IDS, **kw)
    assert res.extra["qk_fix"] == "exact recomputation"
    assert torch.equal(res.effect_matrix, exact.effect_matrix)


def test_logits_that_cannot_be_read_fall_back_and_leave_the_model_unchanged(monkeypatch):
    """An attention call whose logits the adapter cannot read (it raises mid-forward): the
    exact route runs, and the model keeps its config and no hook."""
    from causalpatch.errors import UnsupportedArchitectureError

    model = _llama()
    before = model.hook_snapshot()
    configs = [layer.self_attn.config for layer in model.hf_model.model.layers]
    kw = dict(component="attn_head_k", by_position=True, method="atp*", **ANSWERS)
    with monkeypatch.context() as m:
        _exact_route(m)
        exact = attribution_patching(model, CLEAN_IDS, CORRUPTED_IDS, **kw)

    def unreadable(*args, **kwargs):
        raise UnsupportedArchitectureError("no logits here")

    monkeypatch.setattr(runtime, "attention_scores", unreadable)
    res = attribution_patching(model, CLEAN_IDS, CORRUPTED_IDS, **kw)
    assert res.extra["qk_fix"] == "exact recomputation"
    assert torch.equal(res.effect_matrix, exact.effect_matrix)
    assert model.hook_snapshot() == before
    assert all(a is b for a, b in zip(
        [layer.self_attn.config for layer in model.hf_model.model.layers], configs))


@pytest.mark.parametrize("component,by_position", [("attn_head_q", True),
                                                   ("attn_head_q", False),
                                                   ("attn_head_k", False)])
def test_queries_and_joint_keys_keep_the_exact_run(component, by_position):
    res = attribution_patching(_llama(), CLEAN_IDS, CORRUPTED_IDS, component=component,
                               by_position=by_position, method="atp*", **ANSWERS)
    assert res.extra["qk_fix"] == "exact recomputation"
    assert "qk_fix" not in attribution_patching(_llama(), CLEAN_IDS, CORRUPTED_IDS,
                                                component=component, by_position=by_position,
                                                **ANSWERS).extra


#: The O(T^2) closed form against its definition (float64 softmax of every patched row),
#: relative to the largest contribution: float64 rounding, observed 2.4e-16 (saturated rows
#: included).
DEFINITION_RTOL = 2e-15


def _by_definition(scores, patched, values, grad, keys):
    """``c(n) = sum_t sum_j G_tj (softmax(s_t + e_n ds_tn)_j - softmax(s_t)_j)`` row by row."""
    b, n_heads = scores.shape[:2]
    groups = n_heads // values.shape[2]
    v = values.repeat_interleave(groups, dim=2)
    G = torch.einsum("bthd,bjhd->bhtj", grad, v)
    base = torch.softmax(scores, -1)
    out = torch.zeros(b, len(keys), n_heads, dtype=torch.float64)
    for r, n in enumerate(keys):
        s = scores.clone()
        allowed = torch.isfinite(scores[..., n])
        s[..., n] = torch.where(allowed, patched[..., n], scores[..., n])
        out[:, r] = (G * (torch.softmax(s, -1) - base)).sum(-1).sum(-1)
    return out


def test_closed_form_equals_its_definition_on_saturated_masked_rows():
    """Random logits with a causal and a sliding-window mask, rows saturated on one key (a gap
    of 60: the base weight is 1.0 even in float64) and key changes up to +-80."""
    from causalpatch.engine import KeyPatternChange

    gen = torch.Generator().manual_seed(0)
    b, n_heads, n_kv, length, d = 2, 4, 2, 9, 5
    scores = torch.randn(b, n_heads, length, length, generator=gen, dtype=torch.float64)
    scores[:, :2] += 60.0 * torch.nn.functional.one_hot(
        torch.randint(0, 3, (b, 2, length), generator=gen), length).double()
    rows = torch.arange(length)[:, None]
    cols = torch.arange(length)[None, :]
    masked = (cols > rows) | ((cols <= rows - 5) & (torch.arange(n_heads) >= 2)[:, None, None])
    scores = scores.masked_fill(masked, float("-inf"))
    patched = scores + 80.0 * torch.randn(scores.shape, generator=gen, dtype=torch.float64)
    values = torch.randn(b, length, n_kv, d, generator=gen, dtype=torch.float64)
    grad = torch.randn(b, length, n_heads, d, generator=gen, dtype=torch.float64)
    keys = [0, 2, 3, 5, 8]
    change = KeyPatternChange.make(scores, patched, values, keys)
    assert float(change.pattern.max()) == 1.0  # saturated
    got = change.contract(grad)
    want = _by_definition(scores, patched, values, grad, keys)
    assert_matches_reference(got, want, 0.0, rtol=DEFINITION_RTOL, min_cells=20,
                             what="closed form vs definition")

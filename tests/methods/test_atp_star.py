"""Specification of AtP* (Kramar et al. 2024) in attribution patching: GradDrop equals its
textbook definition (one forward and backward per dropped layer, that layer's residual writes
detached), screen-then-prove recovers the exact top-k of the full exact sweep, and bad input is
refused before any forward pass with the model left unhooked.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import IdTokenizer, TextPairs, assert_matches_reference, id_llama_hf, tiny_hf_model

from causalpatch import InterpretableModel, activation_patching
from causalpatch.engine import delta_leaf, graddrop_pass, gradient_pass, last_logits
from causalpatch.errors import InvalidArgumentError
from causalpatch.hooks import Hook, hook_counts
from causalpatch.methods.attribution import attribution_patching
from causalpatch.plan import SWEEP_COMPONENTS as COMPONENTS

CLEAN_IDS = [[1, 2, 5, 4, 3, 7, 8, 2]]
CORRUPTED_IDS = [[1, 2, 6, 4, 3, 9, 8, 2]]
ANSWERS = dict(correct=3, incorrect=9)

pytestmark = pytest.mark.usefixtures("one_thread")

#: ``conftest.assert_matches_reference`` tolerances (max |got - reference| over the largest
#: effect), float64 models.
#: GradDrop's gradients against the textbook passes (float64): observed 0 (bitwise equal) on
#: every site kind and family; the bound is a few float64 ulps of other summation orders.
GRAD_RTOL = 1e-12
#: gradient entries that move by 100x that (fewest observed: 255 of 768, attn.z layer 0).
GRAD_MIN_CELLS = 100
#: estimates stored in float32 against float64 constructions (q/k fix brute force, the GradDrop
#: estimate, pairs batched, a subset): observed at most 4.7e-6 (GPT-2 attn_head_q's q/k fix:
#: 1.4e-6 on a largest estimate of 0.30; float32 storage of float64 sums over positions).
STORED_RTOL = 3e-5
#: verified cells against the exact sweep: both float32 effects of the same float64 logits,
#: observed 0 (bitwise equal); the bound is two float32 ulps of values of order 1.
VERIFIED_RTOL = 3e-7


def wrap(hf: torch.nn.Module) -> InterpretableModel:
    return InterpretableModel(hf, tokenizer=IdTokenizer())


@pytest.fixture(scope="module")
def tiny() -> InterpretableModel:
    """A 3-layer LLaMA in float64 (so that the comparisons are exact to rounding)."""
    return wrap(id_llama_hf(n_layers=3, seed=0, dtype=torch.float64, initializer_range=0.3))


def _objective(logits: torch.Tensor, source_logits: torch.Tensor) -> torch.Tensor:
    return logits[:, 3] - logits[:, 9]


def _textbook(model, base_ids, sites, layer):
    """One forward with layer ``layer``'s attention and MLP outputs detached, one backward."""
    leaves: dict[str, torch.Tensor] = {}

    def attach(site):
        def hook(act):
            new, leaf = delta_leaf(site, act)
            leaves[site.name] = leaf["act"]
            return new
        return hook

    hooks = [Hook(s, attach(s)) for s in sites]
    hooks += [Hook(model.layer_site(kind, layer), lambda act: act.detach())
              for kind in ("attn", "mlp")]
    with torch.enable_grad():
        value = _objective(last_logits(model, base_ids, hooks), None).sum()
        found = torch.autograd.grad(value, [leaves[s.name] for s in sites], allow_unused=True)
    return {s.name: torch.zeros_like(leaves[s.name]) if g is None else g
            for s, g in zip(sites, found)}


@pytest.mark.parametrize("kind", ["attn.z", "attn.q", "attn.k", "attn.v", "mlp.post",
                                  "resid_pre", "resid_mid", "resid_post", "attn", "mlp"])
def test_graddrop_equals_textbook_passes(tiny, kind):
    """graddrop_pass restarts pass l from the plain gradient at layer l's output; every pass
    equals the textbook one (a forward with layer l's writes detached, a full backward)."""
    sites = [tiny.layer_site(kind, layer) for layer in range(tiny.n_layers)]  # LLaMA: all
    base_ids = torch.tensor(CORRUPTED_IDS)
    src_ids = torch.tensor(CLEAN_IDS)
    dropped = graddrop_pass(tiny, base_ids, src_ids, sites, _objective)
    plain = gradient_pass(tiny, base_ids, src_ids, sites, _objective)
    for s in sites:  # the plain pass is gradient_pass's
        assert torch.equal(dropped.plain.grads[s.name]["act"], plain.grads[s.name]["act"])
    assert len(dropped.dropped) == tiny.n_layers
    changed = 0
    for layer in range(tiny.n_layers):
        expected = _textbook(tiny, base_ids, sites, layer)
        got = torch.cat([dropped.dropped[layer][s.name]["act"].flatten() for s in sites])
        want = torch.cat([expected[s.name].flatten() for s in sites])
        # unpatched: the plain gradient, where dropping the layer changes it (it cannot change
        # sites after the layer: resid_post drops layer 0 with no site before it); else 0
        undropped = torch.cat([plain.grads[s.name]["act"].flatten() for s in sites])
        moved = bool((want - undropped).abs().max() > 0)
        changed += moved
        assert_matches_reference(got, want, undropped if moved else 0.0, rtol=GRAD_RTOL,
                                 min_cells=GRAD_MIN_CELLS, what=f"graddrop {kind} layer {layer}")
    assert changed > 0  # dropping a layer does change gradients
    assert hook_counts(tiny.hf_model) == hook_counts(wrap(id_llama_hf(n_layers=3)).hf_model)


def test_graddrop_estimate_is_the_mean_absolute_dropped_estimate(tiny):
    kw = dict(component="attn_head", by_position=True, **ANSWERS)
    star = attribution_patching(tiny, CLEAN_IDS, CORRUPTED_IDS, method="atp*", **kw)
    atp = attribution_patching(tiny, CLEAN_IDS, CORRUPTED_IDS, **kw)
    assert torch.equal(star.effect_matrix, atp.effect_matrix)
    sites = [tiny.layer_site("attn.z", layer) for layer in range(tiny.n_layers)]
    base_ids, src_ids = torch.tensor(CORRUPTED_IDS), torch.tensor(CLEAN_IDS)
    grads = gradient_pass(tiny, base_ids, src_ids, sites, _objective)
    with torch.no_grad():
        gap = float(_objective(last_logits(tiny, src_ids), None)
                    - _objective(last_logits(tiny, base_ids), None))
    total = 0
    for layer in range(tiny.n_layers):
        g = _textbook(tiny, base_ids, sites, layer)
        est = torch.stack([((grads.source[s.name] - grads.base[s.name]) * g[s.name])[0].sum(-1)
                           for s in sites])  # [layer, pos, head]
        total = total + est.abs()
    expected = total / (tiny.n_layers - 1) / abs(gap)
    # results are stored in float32
    graddrop = torch.tensor(star.extra["graddrop"]).double()
    assert_matches_reference(graddrop, expected, 0.0, rtol=STORED_RTOL, min_cells=10,
                             what="graddrop estimate")
    # a cell's own layer contributes nothing: the sum has L - 1 non-trivial terms
    assert star.extra["attribution_method"] == "atp*"


def _recall(result, exact, k):
    top = set(torch.argsort(exact.effect_matrix.flatten().abs(), descending=True)[:k].tolist())
    found = {int(torch.tensor(e["cell"]) @ torch.tensor(_strides(result.shape)))
             for e in result.extra["verified"]}
    return len(top & found) / k


def _strides(shape):
    out, step = [], 1
    for n in reversed(shape):
        out.append(step)
        step *= n
    return out[::-1]


@pytest.mark.parametrize("component,by_position,k",
                         [("attn_head", True, 20), ("mlp_neuron", False, 20),
                          ("resid_post", True, 5), ("attn_head", False, 5)])
def test_screen_then_prove_recovers_the_exact_top_k(tiny, component, by_position, k):
    kw = dict(component=component, by_position=by_position, **ANSWERS)
    exact = activation_patching(tiny, CLEAN_IDS, CORRUPTED_IDS, **kw)
    res = attribution_patching(tiny, CLEAN_IDS, CORRUPTED_IDS, method="atp*", verify="auto",
                               top_k=k, **kw)
    assert _recall(res, exact, k) == 1.0
    mask = torch.tensor(res.extra["exact"])
    assert mask.shape == res.shape and mask.sum() == len(res.extra["verified"])
    # verified cells hold exact values; the others the estimates (marked False)
    assert_matches_reference(res.effect_matrix[mask], exact.effect_matrix[mask], 0.0,
                             rtol=VERIFIED_RTOL, min_cells=3, what=f"{component} verified cells")
    assert_matches_reference([e["exact"] for e in res.extra["verified"]],
                             [float(exact.effect_matrix[tuple(e["cell"])])
                              for e in res.extra["verified"]], 0.0, rtol=VERIFIED_RTOL,
                             min_cells=3, what=f"{component} verified list")
    for e in res.extra["verified"]:
        assert set(e) >= {"cell", "estimate", "exact", "index"}
    json.loads(res.to_json())  # extra holds JSON values only
    bound = res.extra["missed_bound"]
    if bound is not None:
        assert bound["cells"] == int((~mask).sum())
        assert bound["max_abs_effect"] >= 0 and bound["subsets"] >= 1
        # no unverified cell is above the line while the bound says it holds
        if bound["holds"]:
            assert exact.effect_matrix[~mask].abs().max() < res.extra["threshold"]


def test_screen_then_prove_on_a_dataset(tiny):
    data = TextPairs([[1, 2, 5, 4, 3, 7], [8, 9, 5, 4, 3, 7]],
                     [[1, 2, 6, 4, 3, 7], [8, 9, 6, 4, 3, 7]], [3, 3], [9, 9])
    exact = activation_patching(tiny, data, component="attn_head", by_position=True)
    res = attribution_patching(tiny, data, component="attn_head", by_position=True,
                               method="atp*", verify="auto", top_k=10)
    assert _recall(res, exact, 10) == 1.0
    mask = torch.tensor(res.extra["exact"])
    assert_matches_reference(res.per_pair[:, mask], exact.per_pair[:, mask], 0.0,
                             rtol=VERIFIED_RTOL, min_cells=6, what="dataset verified cells")


def test_the_subset_check_catches_what_plain_atp_misses_and_graddrop_does_not(tiny):
    """Head L0H0: plain AtP estimates -0.04 against an exact 0.66 (direct and indirect effects
    cancel). The random-subset check flags its subset, so it is verified anyway; AtP*'s
    GradDrop already ranks it for verification in the first screen (no subset round)."""
    kw = dict(component="attn_head", **ANSWERS)
    exact = activation_patching(tiny, CLEAN_IDS, CORRUPTED_IDS, **kw)
    plain = attribution_patching(tiny, CLEAN_IDS, CORRUPTED_IDS, **kw)
    assert abs(float(plain.effect_matrix[0, 0])) < 0.1 < 0.5 < float(exact.effect_matrix[0, 0])
    res = attribution_patching(tiny, CLEAN_IDS, CORRUPTED_IDS, verify="auto", top_k=3, **kw)
    assert _recall(res, exact, 3) == 1.0
    assert "graddrop" not in res.extra
    assert res.extra["missed_bound"]["seed"] == 1  # found in the second round, by a subset
    assert res.extra["missed_bound"]["holds"]
    star = attribution_patching(tiny, CLEAN_IDS, CORRUPTED_IDS, method="atp*", verify="auto",
                                top_k=3, **kw)
    assert _recall(star, exact, 3) == 1.0
    assert float(star.extra["graddrop"][0][0]) > 0.4
    assert star.extra["missed_bound"]["seed"] == 0  # the first screen found it


# -- the QK fix ----------------------------------------------------------------------------------
def _brute_force_qk(model, kind, by_position):
    """Every query/key cell patched alone (exactly, through hooks), the attention output of its
    layer read, and ``(z' - z) . d metric / d z`` summed; normalised by the gap."""
    base_ids, src_ids = torch.tensor(CORRUPTED_IDS), torch.tensor(CLEAN_IDS)
    n_layers, length = model.n_layers, base_ids.shape[1]
    z_sites = [model.layer_site("attn.z", layer) for layer in range(n_layers)]
    in_sites = [model.layer_site(kind, layer) for layer in range(n_layers)]
    grads = gradient_pass(model, base_ids, src_ids, [*in_sites, *z_sites], _objective)
    with torch.no_grad():
        gap = float(_objective(last_logits(model, src_ids), None)
                    - _objective(last_logits(model, base_ids), None))
    n_heads = grads.source[in_sites[0].name].shape[2]
    pos_groups = [[p] for p in range(length)] if by_position else [list(range(length))]
    out = torch.zeros(n_layers, len(pos_groups), n_heads, dtype=torch.float64)
    for layer in range(n_layers):
        src = grads.source[in_sites[layer].name]
        z_base = grads.base[z_sites[layer].name]
        g_z = grads.grads[z_sites[layer].name]["act"]
        for i, group in enumerate(pos_groups):
            for head in range(n_heads):
                seen = {}

                def patch(act, group=group, head=head, src=src):
                    new = act.clone()
                    new[:, group, head] = src[:, group, head]
                    return new

                def read(act, seen=seen):
                    seen["z"] = act.detach().clone()

                with torch.no_grad():
                    last_logits(model, base_ids, [Hook(in_sites[layer], patch),
                                                  Hook(z_sites[layer], read)])
                out[layer, i, head] = float(((seen["z"] - z_base) * g_z).sum())
    out /= gap
    return out if by_position else out[:, 0]


@pytest.mark.parametrize("by_position", [True, False])
@pytest.mark.parametrize("component,kind", [("attn_head_q", "attn.q"),
                                            ("attn_head_k", "attn.k")])
def test_qk_fix_equals_brute_force_recomputation(tiny, component, kind, by_position):
    res = attribution_patching(tiny, CLEAN_IDS, CORRUPTED_IDS, component=component,
                               by_position=by_position, method="atp*", **ANSWERS)
    expected = _brute_force_qk(tiny, kind, by_position)
    assert res.effect_matrix.shape == expected.shape
    assert_matches_reference(res.effect_matrix, expected, 0.0, rtol=STORED_RTOL, min_cells=4,
                             what=f"{component} qk fix {by_position}")
    plain = attribution_patching(tiny, CLEAN_IDS, CORRUPTED_IDS, component=component,
                                 by_position=by_position, **ANSWERS)
    assert not torch.allclose(plain.effect_matrix, res.effect_matrix, atol=1e-4)


@pytest.fixture(scope="module", params=["gpt2", "gemma2", "gemma3_text", "gpt_neox_parallel",
                                        "qwen3"])
def family(request) -> InterpretableModel:
    """Other attention layouts: fused c_attn (GPT-2), soft-capped and sliding-window attention
    with sandwich norms (Gemma 2), interleaved qkv with partial rotary and a parallel residual
    (GPT-NeoX), q/k norms (Qwen 3)."""
    return wrap(tiny_hf_model(request.param).double())


@pytest.mark.parametrize("component,kind", [("attn_head_q", "attn.q"),
                                            ("attn_head_k", "attn.k")])
def test_qk_fix_uses_each_familys_own_attention(family, component, kind):
    res = attribution_patching(family, CLEAN_IDS, CORRUPTED_IDS, component=component,
                               by_position=True, method="atp*", **ANSWERS)
    expected = _brute_force_qk(family, kind, True)
    assert_matches_reference(res.effect_matrix, expected, 0.0, rtol=STORED_RTOL, min_cells=4,
                             what=f"{family.adapter.name} {component} qk fix")


def test_graddrop_equals_textbook_passes_on_other_families(family):
    sites = [family.layer_site("attn.z", layer) for layer in range(family.n_layers)]
    base_ids, src_ids = torch.tensor(CORRUPTED_IDS), torch.tensor(CLEAN_IDS)
    dropped = graddrop_pass(family, base_ids, src_ids, sites, _objective)
    for layer in range(family.n_layers):
        expected = _textbook(family, base_ids, sites, layer)
        got = torch.cat([dropped.dropped[layer][s.name]["act"].flatten() for s in sites])
        want = torch.cat([expected[s.name].flatten() for s in sites])
        undropped = torch.cat([dropped.plain.grads[s.name]["act"].flatten() for s in sites])
        assert_matches_reference(got, want, undropped, rtol=GRAD_RTOL, min_cells=GRAD_MIN_CELLS,
                                 what=f"{family.adapter.name} graddrop layer {layer}")


@pytest.mark.parametrize("component", ["attn_head_k", "attn_head_q"])
def test_atp_star_batches_pairs_like_single_pairs(tiny, component):
    data = TextPairs([[1, 2, 5, 4, 3, 7], [8, 9, 5, 4, 3, 7]],
                     [[1, 2, 6, 4, 3, 7], [8, 9, 6, 4, 3, 9]], [3, 3], [9, 9])
    kw = dict(component=component, by_position=True, method="atp*")
    res = attribution_patching(tiny, data, batch_size=2, **kw)
    singles = [attribution_patching(tiny, [c], [k], correct=a, incorrect=b, **kw)
               for c, k, a, b in zip(data.clean, data.corrupted, data.correct, data.incorrect)]
    raw = [s.effect_matrix * (s.clean_metric - s.corrupted_metric) for s in singles]
    gap = (sum(s.clean_metric for s in singles) - sum(s.corrupted_metric for s in singles)) / 2
    assert_matches_reference(res.effect_matrix, sum(raw) / 2 / gap, 0.0, rtol=STORED_RTOL,
                             min_cells=4, what=f"{component} pairs batched")


def test_qk_fix_removes_the_saturated_softmax_false_negative():
    """The last layer's queries sharpened 12x (a saturated softmax): plain AtP sees a
    near-zero gradient at query head 2 of the last position and estimates 0.0007 against an
    exact 0.26; the QK fix recomputes the pattern exactly and estimates 0.258 (what follows the
    pattern, o_proj, the MLP, the norm and the unembedding, stays linearised: head 3 is -0.17
    against -0.12)."""
    hf = id_llama_hf(n_layers=2, seed=3, dtype=torch.float64, initializer_range=0.3)
    with torch.no_grad():
        hf.model.layers[1].self_attn.q_proj.weight.mul_(12.0)
    model = wrap(hf)
    kw = dict(component="attn_head_q", layers=[1], positions=[-1], by_position=True,
              **ANSWERS)
    exact = activation_patching(model, CLEAN_IDS, CORRUPTED_IDS, **kw).effect_matrix[0, 0]
    star = attribution_patching(model, CLEAN_IDS, CORRUPTED_IDS, method="atp*",
                                **kw).effect_matrix[0, 0]
    plain = attribution_patching(model, CLEAN_IDS, CORRUPTED_IDS, **kw).effect_matrix[0, 0]
    assert float(exact[2]) > 0.2 and abs(float(plain[2])) < 0.01
    assert abs(float(star[2] - exact[2])) < 1e-2
    assert (star - exact).abs().max() < (plain - exact).abs().max() / 5


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,words", [
    (dict(method="atp**"), "'atp' (plain"),
    (dict(method=None), "'atp*'"),
    (dict(verify="all"), "verify must be None or 'auto'"),
    (dict(verify="auto", top_k=0), "top_k"),
    (dict(method="atp*", component="Q_SITE"), "attn_head_q"),
    (dict(method="atp*", threshold=-1.0), "threshold"),
])
def test_bad_inputs_fail_before_any_forward(tiny, kwargs, words):
    calls = []
    handle = tiny.hf_model.register_forward_pre_hook(lambda m, a: calls.append(1))
    before = hook_counts(tiny.hf_model)
    try:
        with pytest.raises((InvalidArgumentError, TypeError)) as info:
            if kwargs.get("component") == "Q_SITE":
                kwargs = {**kwargs, "component": tiny.layer_site("attn.q", 1).name}
            attribution_patching(tiny, CLEAN_IDS, CORRUPTED_IDS,
                                 **{"component": "attn_head", **ANSWERS, **kwargs})
    finally:
        after = hook_counts(tiny.hf_model)
        handle.remove()
    assert words in str(info.value)
    assert calls == []
    assert after == before


def test_graddrop_needs_two_layers():
    one = wrap(id_llama_hf(n_layers=1, seed=0))
    with pytest.raises(InvalidArgumentError, match="at least 2 layers"):
        attribution_patching(one, CLEAN_IDS, CORRUPTED_IDS, component="attn_head",
                             method="atp*", **ANSWERS)


# -- every component ---------------------------------------------------------------------------
@pytest.mark.parametrize("by_position", [False, True])
@pytest.mark.parametrize("component", list(COMPONENTS))
def test_every_component_has_the_exact_sweeps_layout(tiny, component, by_position):
    kw = dict(component=component, by_position=by_position, **ANSWERS)
    star = attribution_patching(tiny, CLEAN_IDS, CORRUPTED_IDS, method="atp*", **kw)
    exact = activation_patching(tiny, CLEAN_IDS, CORRUPTED_IDS, **kw)
    assert star.shape == exact.shape and star.axes == exact.axes and star.labels == exact.labels
    graddrop = torch.tensor(star.extra["graddrop"])
    assert graddrop.shape == star.shape and (graddrop >= 0).all()
    assert torch.isfinite(star.effect_matrix).all() and torch.isfinite(graddrop).all()
    assert star.timings["graddrop_backward_s"] > 0


@pytest.mark.parametrize("component", ["attn_head_q", "attn_head_k"])
def test_qk_fix_on_a_subset_of_layers_heads_positions(tiny, component):
    kw = dict(component=component, by_position=True, method="atp*", **ANSWERS)
    full = attribution_patching(tiny, CLEAN_IDS, CORRUPTED_IDS, **kw).effect_matrix
    part = attribution_patching(tiny, CLEAN_IDS, CORRUPTED_IDS, layers=[1, 2], heads=[1],
                                positions=[2, -1], **kw).effect_matrix
    assert_matches_reference(part, full[1:][:, [2, 7]][:, :, [1]], 0.0, rtol=STORED_RTOL,
                             min_cells=2, what=f"{component} subset")

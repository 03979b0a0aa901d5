"""Architecture adapters on a tiny random model of every family.

Expected values are computed independently of causalpatch wherever possible: with plain
PyTorch hooks on module paths written out by hand in ``conftest.REFERENCE``, so a wrong
adapter entry or view fails here instead of agreeing with itself. Every ``model_type`` an
adapter claims has a tiny family here (``test_every_claimed_model_type_has_a_tiny_family``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
import transformers

import causalpatch.interventions as iv
from causalpatch import InterpretableModel
from causalpatch.adapters import supported_model_types
from causalpatch.errors import OutOfRangeError, UnknownComponentError, UnsupportedArchitectureError
from conftest import (CONFIGS, FAMILIES, REFERENCE, assert_within, capture_modules, first_tensor,
                      reference_qkv, tiny_model, tiny_tokenizer)

#: Two computations of the same thing by the same kernels on the same inputs (hooked vs plain
#: Transformers, a hand hook's zeroing vs an intervention's, a site read vs the sum the hook
#: itself forms): observed bitwise 0 on every family, and nothing makes them differ (a hook that
#: only reads, or writes the same slice, leaves every kernel and its inputs as they were), so
#: nothing is allowed.
SAME_OPS = 0.0
#: The residual stream's parts added in another order than the model adds them, or a
#: ``resid_mid`` replacement written back as ``pre + (value - pre)``: observed 2.4e-7 at most (one
#: float32 ulp of values in [2, 4)); nonzero because float32 addition is not associative. 2e-6
#: is 8.4x that.
REORDERED_SUM = 2e-6

PROMPT = "When Mary and John went to the store, John gave"  # 11 tokens: crosses Gemma's window 4
SHORT = "The city of Paris"  # 4 tokens
N_TOKENS = 11

pytestmark = pytest.mark.usefixtures("one_thread")

#: (n_layers, n_heads, n_kv_heads, d_model, d_head, d_mlp), from the configs in conftest.
DIMS = {
    "gpt2": (3, 4, 4, 48, 12, 192),  # GPT-2's MLP is 4 * n_embd
    "llama": (3, 4, 2, 64, 16, 128),
    "mistral": (3, 4, 2, 64, 16, 128),
    "smollm3": (3, 4, 2, 64, 16, 128),
    "qwen2": (3, 4, 2, 64, 16, 128),
    "qwen3": (3, 4, 2, 64, 16, 128),
    "gemma": (3, 4, 2, 64, 16, 128),
    "gemma2": (3, 4, 2, 64, 16, 128),
    "gemma3_text": (3, 4, 2, 64, 16, 128),
    "gpt_neox_parallel": (3, 4, 4, 48, 12, 96),
    "gpt_neox_sequential": (3, 4, 4, 48, 12, 96),
}

#: Every ``config.model_type`` causalpatch claims, written by hand: each must have a tiny family
#: in ``conftest.CONFIGS`` so that every test here runs on it.
CLAIMED_MODEL_TYPES = {"gpt2", "llama", "mistral", "smollm3", "qwen2", "qwen3", "gemma",
                       "gemma2", "gemma3_text", "gpt_neox"}

#: Final logit soft-cap of the tiny configs that have one (conftest.gemma2_config/gemma3_config).
FINAL_SOFTCAP = {"gemma2": 30.0, "gemma3_text": 30.0}

D_MODEL_KINDS = {"embed", "ln_final", "resid_pre", "resid_mid", "resid_post", "attn", "mlp",
                 "attn.in", "mlp.in", "attn.raw", "mlp.raw"}
Q_HEAD_KINDS = {"attn.z", "attn.q", "attn.q_normed"}
KV_HEAD_KINDS = {"attn.k", "attn.v", "attn.k_normed"}
D_MLP_KINDS = {"mlp.post", "mlp.pre", "mlp.gate", "mlp.up"}


@pytest.fixture
def lm(tiny_lm: InterpretableModel) -> Iterator[InterpretableModel]:
    """The shared tiny model; fails the test if a causalpatch hook is left behind."""
    assert tiny_lm.hook_snapshot() == {}
    yield tiny_lm
    assert tiny_lm.hook_snapshot() == {}, "a hook leaked out of the test"


def _kind(name: str) -> str:
    """``blocks.1.attn.z`` -> ``attn.z``; ``embed`` -> ``embed``."""
    return name.split(".", 2)[2] if name.startswith("blocks.") else name


def _ids(lm: InterpretableModel, prompt: str = PROMPT) -> torch.Tensor:
    return torch.tensor([lm.tokenizer(prompt)["input_ids"]])


def _plain_logits(lm: InterpretableModel, ids: torch.Tensor, **kwargs: object) -> torch.Tensor:
    with torch.no_grad():
        return lm.hf_model(input_ids=ids, use_cache=False, **kwargs).logits


def _with_hook(lm: InterpretableModel, path: str, kind: str, fn: Callable[[torch.Tensor], None],
               ids: torch.Tensor) -> torch.Tensor:
    """Plain HF logits with our own hook editing a clone of ``path``'s input/output in place."""
    module = lm.hf_model.get_submodule(path)
    if kind == "in":
        def hook(mod: torch.nn.Module, args: tuple, kwargs: dict) -> object:
            x = (args[0] if args else kwargs["hidden_states"]).clone()
            fn(x)
            return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})
        handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    else:
        def hook(mod: torch.nn.Module, args: tuple, output: object) -> object:
            x = first_tensor(output).clone()
            fn(x)
            return (x, *output[1:]) if isinstance(output, tuple) else x
        handle = module.register_forward_hook(hook)
    try:
        return _plain_logits(lm, ids)
    finally:
        handle.remove()


# -- sizes and shapes --------------------------------------------------------------------------
def test_dims_are_read_correctly_from_every_config(lm, tiny_family):
    d = lm.dims
    assert (d.n_layers, d.n_heads, d.n_kv_heads, d.d_model, d.d_head, d.d_mlp) == \
        DIMS[tiny_family]
    assert d.vocab_size == lm.hf_model.get_output_embeddings().weight.shape[0]
    if REFERENCE[tiny_family].qkv_layout == "separate":
        assert d.n_kv_heads < d.n_heads  # grouped-query attention is exercised
    if tiny_family in ("gemma2", "gemma3_text"):
        assert "sliding_attention" in lm.config.layer_types
        assert lm.config.sliding_window < N_TOKENS  # the prompt crosses the window


def test_every_component_name_caches_with_its_documented_shape(lm):
    names = lm.component_names()
    _, cache = lm.run_with_cache([PROMPT, SHORT], names=True)
    assert set(cache) == set(names)
    d = lm.dims
    for name in names:
        kind = _kind(name)
        if kind in D_MODEL_KINDS:
            expected = (2, N_TOKENS, d.d_model)
        elif kind in Q_HEAD_KINDS:
            expected = (2, N_TOKENS, d.n_heads, d.d_head)
        elif kind in KV_HEAD_KINDS:
            expected = (2, N_TOKENS, d.n_kv_heads, d.d_head)
        elif kind in D_MLP_KINDS:
            expected = (2, N_TOKENS, d.d_mlp)
        elif kind == "attn.pattern":  # [batch, head, query, key]
            expected = (2, d.n_heads, N_TOKENS, N_TOKENS)
        else:
            pytest.fail(f"component {name!r} has no documented shape")
        assert tuple(cache[name].shape) == expected, name


def test_every_layer_offers_the_core_components(lm, tiny_family):
    core = {"resid_pre", "resid_post", "attn", "mlp", "attn.z", "attn.q", "attn.k", "attn.v",
            "mlp.post", "attn.in", "mlp.in"}
    if not REFERENCE[tiny_family].parallel:
        core.add("resid_mid")
    names = set(lm.component_names())
    for layer in range(lm.n_layers):
        assert {f"blocks.{layer}.{k}" for k in core} <= names
    assert {"embed", "ln_final"} <= names


# -- reading changes nothing; reads match the modules ------------------------------------------
def test_hooked_logits_without_interventions_equal_plain_transformers(lm):
    ids = _ids(lm)
    plain = _plain_logits(lm, ids)
    assert_within(lm.trace(PROMPT).run().logits, plain, SAME_OPS, "trace vs plain")
    logits, _ = lm.run_with_cache(PROMPT, names=True)  # read-only hooks on every site
    assert_within(logits, plain, SAME_OPS, "run_with_cache vs plain")


def test_hooked_padded_batch_equals_plain_transformers_with_the_same_mask(lm):
    tr = lm.trace([PROMPT, SHORT], cache=True).run()
    plain = _plain_logits(lm, tr.batch.input_ids, attention_mask=tr.batch.attention_mask)
    assert_within(tr.logits, plain, SAME_OPS, "padded batch vs plain")


def test_cached_sites_equal_what_the_hf_modules_see(lm, tiny_family):
    ref = REFERENCE[tiny_family]
    wanted = {}
    for kind, (path, io) in ref.sites.items():
        if "{L}" in path:
            for layer in range(lm.n_layers):
                wanted[f"blocks.{layer}.{kind}"] = (path.format(L=layer), io)
        else:
            wanted[kind] = (path, io)
    expected = capture_modules(lm.hf_model, _ids(lm), wanted)
    _, cache = lm.run_with_cache(PROMPT, names=list(wanted))
    for name, value in expected.items():
        got = cache[name]
        if _kind(name) in Q_HEAD_KINDS | KV_HEAD_KINDS:
            got = got.flatten(-2)
        assert torch.equal(got, value), name


@pytest.mark.parametrize("prompts", [[PROMPT], [PROMPT, SHORT]], ids=["one", "padded"])
def test_core_sites_equal_a_hand_computation_from_the_module_outputs(lm, tiny_family, prompts):
    """attn, mlp, resid_mid, per-head attn.z and mlp.post of every layer, computed by hand from
    plain PyTorch hooks on the hand-written module paths: the module outputs added to the
    residual stream, the layer input, and the inputs of the two output projections."""
    ref = REFERENCE[tiny_family]
    _, n_heads, _, _, d_head, d_mlp = DIMS[tiny_family]
    tr = lm.trace(prompts).run()
    ids, mask = tr.batch.input_ids, tr.batch.attention_mask
    layer, attn_out, mlp_out = (ref.sites[k][0] for k in ("resid_pre", "attn", "mlp"))
    down_proj = ref.sites["mlp.post"][0]
    wanted = {}
    for L in range(lm.n_layers):
        wanted.update({
            f"{L}.layer_in": (layer.format(L=L), "in"),
            f"{L}.layer_out": (layer.format(L=L), "out"),
            f"{L}.attn_out": (attn_out.format(L=L), "out"),  # what attention adds
            f"{L}.mlp_out": (mlp_out.format(L=L), "out"),  # what the MLP adds
            f"{L}.o_proj_in": (ref.o_proj.format(L=L), "in"),
            f"{L}.down_proj_in": (down_proj.format(L=L), "in"),
        })
    raw = capture_modules(lm.hf_model, ids, wanted, attention_mask=mask)
    kinds = ["attn", "mlp", "attn.z", "mlp.post"] + ([] if ref.parallel else ["resid_mid"])
    names = [f"blocks.{L}.{k}" for L in range(lm.n_layers) for k in kinds]
    _, cache = lm.run_with_cache(prompts, names=names)
    for L in range(lm.n_layers):
        r = {k.split(".", 1)[1]: v for k, v in raw.items() if k.startswith(f"{L}.")}
        b, p, _ = r["o_proj_in"].shape
        expected = {
            "attn": r["attn_out"],
            "mlp": r["mlp_out"],
            "attn.z": r["o_proj_in"].reshape(b, p, n_heads, d_head),
            "mlp.post": r["down_proj_in"],
        }
        assert expected["mlp.post"].shape == (b, p, d_mlp)
        if ref.parallel:  # both blocks read the layer input
            closes = r["layer_in"] + r["attn_out"] + r["mlp_out"]
        else:
            expected["resid_mid"] = r["layer_in"] + r["attn_out"]
            closes = expected["resid_mid"] + r["mlp_out"]
        # the hand computation adds up to the layer's own output: attn/mlp are what is added
        assert_within(closes, r["layer_out"], REORDERED_SUM, f"layer {L} sum")
        for kind, value in expected.items():
            got = cache[f"blocks.{L}.{kind}"]
            assert got.shape == value.shape, (L, kind)
            assert_within(got, value, SAME_OPS, f"layer {L} {kind}")
            assert value.abs().max() > 1e-3, (L, kind)  # not vacuous


def test_resid_post_of_each_layer_is_exactly_resid_pre_of_the_next(lm):
    _, c = lm.run_with_cache(PROMPT, names=True)
    for layer in range(lm.n_layers - 1):
        assert torch.equal(c[f"blocks.{layer}.resid_post"], c[f"blocks.{layer + 1}.resid_pre"])


def test_residual_stream_is_resid_pre_plus_attn_plus_mlp(lm, tiny_family):
    _, c = lm.run_with_cache(PROMPT, names=True)
    for layer in range(lm.n_layers):
        pre, post = c[f"blocks.{layer}.resid_pre"], c[f"blocks.{layer}.resid_post"]
        attn, mlp = c[f"blocks.{layer}.attn"], c[f"blocks.{layer}.mlp"]
        assert attn.abs().max() > 1e-3 and mlp.abs().max() > 1e-3  # not vacuous
        if REFERENCE[tiny_family].parallel:
            assert_within(pre + attn + mlp, post, REORDERED_SUM, "parallel sum")
        else:
            mid = c[f"blocks.{layer}.resid_mid"]
            assert_within(pre + attn, mid, SAME_OPS, "pre + attn = mid")
            assert_within(mid + mlp, post, SAME_OPS, "mid + mlp = post")


def test_logits_are_the_unembedding_of_ln_final(lm, tiny_family):
    logits, c = lm.run_with_cache(PROMPT, names=["ln_final"])
    with torch.no_grad():
        expected = lm.hf_model.get_output_embeddings()(c["ln_final"])
        if tiny_family in FINAL_SOFTCAP:
            cap = FINAL_SOFTCAP[tiny_family]
            assert lm.config.final_logit_softcapping == cap
            expected = torch.tanh(expected / cap) * cap
    assert_within(logits, expected, SAME_OPS, "logits = unembed(ln_final)")


# -- per-head sites ----------------------------------------------------------------------------
@pytest.mark.parametrize("positions", [None, [-1]], ids=["all-positions", "last-position"])
@pytest.mark.parametrize("head", [0, -1], ids=["first-head", "last-head"])
def test_zeroing_one_attn_z_head_equals_zeroing_its_o_proj_input_columns(lm, tiny_family, head,
                                                                         positions):
    h = head % lm.n_heads
    dh = lm.d_head
    ids = _ids(lm)

    def manual(x: torch.Tensor) -> None:
        pos = slice(None) if positions is None else positions[0]
        x[:, pos, h * dh:(h + 1) * dh] = 0

    expected = _with_hook(lm, REFERENCE[tiny_family].o_proj.format(L=1), "in", manual, ids)
    got = lm.trace(PROMPT, interventions={
        "blocks.1.attn.z": iv.zero(heads=[h], positions=positions)}).run().logits
    assert_within(got, expected, SAME_OPS, "zeroed attn.z head vs o_proj columns")
    assert (got - _plain_logits(lm, ids)).abs().max() > 1e-4  # the ablation did something


@pytest.mark.parametrize("which", [0, 1, 2], ids=["q", "k", "v"])
def test_cached_q_k_v_are_the_projection_outputs_split_as_the_hf_code_does(lm, tiny_family,
                                                                           which):
    path = REFERENCE[tiny_family].qkv[which].format(L=1)
    raw = capture_modules(lm.hf_model, _ids(lm), {"proj": (path, "out")})["proj"]
    expected = reference_qkv(tiny_family, which, raw, lm.n_heads, lm.n_kv_heads, lm.d_head)
    name = f"blocks.1.attn.{'qkv'[which]}"
    _, cache = lm.run_with_cache(PROMPT, names=[name])
    assert torch.equal(cache[name], expected)


@pytest.mark.parametrize("which", [0, 1, 2], ids=["q", "k", "v"])
def test_zeroing_one_q_k_v_head_equals_zeroing_its_slice_of_the_projection(lm, tiny_family,
                                                                          which):
    ref = REFERENCE[tiny_family]
    n_group = lm.n_heads if which == 0 else lm.n_kv_heads
    h, dh, H = n_group - 1, lm.d_head, lm.n_heads
    if ref.qkv_layout == "separate":
        start = h * dh
    elif ref.qkv_layout == "gpt2":  # [q heads | k heads | v heads]
        start = which * H * dh + h * dh
    else:  # neox: [q_0 k_0 v_0 | q_1 k_1 v_1 | ...]
        start = h * 3 * dh + which * dh

    def manual(x: torch.Tensor) -> None:
        x[..., start:start + dh] = 0

    ids = _ids(lm)
    expected = _with_hook(lm, ref.qkv[which].format(L=1), "out", manual, ids)
    got = lm.trace(PROMPT, interventions={
        f"blocks.1.attn.{'qkv'[which]}": iv.zero(heads=[h])}).run().logits
    assert_within(got, expected, SAME_OPS, "zeroed q/k/v head vs projection slice")
    assert (got - _plain_logits(lm, ids)).abs().max() > 1e-5


@pytest.mark.parametrize("kind", ["attn.q", "attn.k", "attn.v", "attn.z"])
def test_replacing_a_head_site_with_its_own_value_changes_nothing_and_zeros_do(lm, kind):
    name = f"blocks.1.{kind}"
    logits, cache = lm.run_with_cache(PROMPT, names=[name])
    same = lm.trace(PROMPT, interventions={name: iv.replace_with(cache[name])}).run().logits
    assert_within(same, logits, SAME_OPS, "replaced with its own value")
    zeros = lm.trace(PROMPT, interventions={
        name: iv.replace_with(torch.zeros_like(cache[name]))}).run().logits
    assert (zeros - logits).abs().max() > 1e-4


def test_resid_mid_and_resid_pre_interventions_do_not_depend_on_dict_order(lm, tiny_family):
    """Replacing resid_mid must give resid_mid == value even if resid_pre of the same layer
    is changed by an intervention listed after it."""
    if REFERENCE[tiny_family].parallel:
        with pytest.raises(UnknownComponentError, match="parallel residual"):
            lm.site("blocks.1.resid_mid")  # not defined there: refused, nothing to order
        return
    torch.manual_seed(1)
    value, shift = torch.randn(lm.d_model), torch.randn(lm.d_model)
    mid, pre = "blocks.1.resid_mid", "blocks.1.resid_pre"
    orders = [{pre: iv.add(shift), mid: iv.replace_with(value)},
              {mid: iv.replace_with(value), pre: iv.add(shift)}]
    runs = [lm.trace(PROMPT, interventions=o, cache=[mid]).run() for o in orders]
    for tr in runs:
        assert_within(tr.cache[mid], value, REORDERED_SUM, "resid_mid replaced")
    assert_within(runs[0].logits, runs[1].logits, SAME_OPS, "both dict orders")


# -- names -------------------------------------------------------------------------------------
def test_raw_module_paths_and_short_forms_alias_canonical_sites(lm, tiny_family):
    raws = {raw.format(L=1): f"blocks.1.{kind}"
            for raw, kind in REFERENCE[tiny_family].raw_paths.items()}
    for raw, canonical in raws.items():
        assert lm.site(raw).name == canonical, raw
    _, cache = lm.run_with_cache(PROMPT, names=[*raws, *raws.values()])
    for raw, canonical in raws.items():
        assert torch.equal(cache[raw], cache[canonical]), raw


def test_a_raw_path_means_the_modules_output_even_where_a_site_reads_its_input(lm, tiny_family):
    """``...o_proj`` is o_proj's output; the per-head input of o_proj is ``attn.z``."""
    path = REFERENCE[tiny_family].o_proj.format(L=1)
    site = lm.site(path)
    assert site.name == path and site.hook == "output"
    expected = capture_modules(lm.hf_model, _ids(lm), {"o": (path, "out")})["o"]
    _, cache = lm.run_with_cache(PROMPT, names=[path, "blocks.1.attn.z"])
    assert torch.equal(cache[path], expected)
    assert cache["blocks.1.attn.z"].shape[-1] == lm.d_head  # a different, per-head site


def test_a_raw_module_without_a_canonical_name_is_cached_as_is(lm, tiny_family):
    path = REFERENCE[tiny_family].qkv[0].format(L=0)  # q (or fused qkv) projection
    site = lm.site(path)
    assert site.name == path and site.layer == 0
    expected = capture_modules(lm.hf_model, _ids(lm), {"q": (path, "out")})["q"]
    _, cache = lm.run_with_cache(PROMPT, names=[path])
    assert torch.equal(cache[path], expected)


TL_NAMES = {
    "blocks.1.hook_resid_pre": "blocks.1.resid_pre",
    "blocks.1.hook_resid_mid": "blocks.1.resid_mid",
    "blocks.1.hook_resid_post": "blocks.1.resid_post",
    "blocks.1.hook_attn_out": "blocks.1.attn",
    "blocks.1.hook_mlp_out": "blocks.1.mlp",
    "blocks.1.attn.hook_z": "blocks.1.attn.z",
    "blocks.1.attn.hook_q": "blocks.1.attn.q",
    "blocks.1.attn.hook_k": "blocks.1.attn.k",
    "blocks.1.attn.hook_v": "blocks.1.attn.v",
    "blocks.1.mlp.hook_post": "blocks.1.mlp.post",
}


def test_transformer_lens_names_alias_canonical_sites(lm, tiny_family):
    names = dict(TL_NAMES)
    if REFERENCE[tiny_family].parallel:
        del names["blocks.1.hook_resid_mid"]
    for tl, canonical in names.items():
        assert lm.site(tl).name == canonical, tl
    _, cache = lm.run_with_cache(PROMPT, names=[*names, *names.values()])
    for tl, canonical in names.items():
        assert torch.equal(cache[tl], cache[canonical]), tl


@pytest.mark.parametrize("typo,suggestion", [
    ("blocks.1.mpl", "blocks.1.mlp"),
    ("blocks.1.resid_prex", "blocks.1.resid_pre"),
    ("blocks.1.atn.z", "blocks.1.attn.z"),
    ("blocks.1.attn.zz", "blocks.1.attn.z"),
    ("embedd", "embed"),
])
def test_unknown_names_raise_with_close_matches_in_the_message(lm, typo, suggestion):
    with pytest.raises(UnknownComponentError) as err:
        lm.site(typo)
    message = str(err.value)
    assert repr(typo) in message and "Did you mean" in message and suggestion in message
    assert isinstance(err.value, KeyError)
    with pytest.raises(UnknownComponentError, match="Did you mean"):
        lm.run_with_cache(PROMPT, names=[typo])
    with pytest.raises(UnknownComponentError, match="Did you mean"):
        lm.trace(PROMPT, interventions={typo: iv.zero()})


def test_a_name_unlike_any_component_still_raises_unknown_component(lm):
    with pytest.raises(UnknownComponentError, match="blocks.0.resid_pre"):
        lm.site("completely.unrelated.thing")


def test_layer_out_of_range_raises_with_the_valid_range(lm, tiny_family):
    n = lm.n_layers
    some_raw = next(iter(REFERENCE[tiny_family].raw_paths))
    for name in (f"blocks.{n}.mlp", "blocks.-1.mlp", f"blocks.{n + 7}.hook_resid_pre",
                 f"blocks.{n}.attn.z", some_raw.format(L=n + 5)):
        with pytest.raises(OutOfRangeError, match=rf"\[0, {n - 1}\]"):
            lm.site(name)
    with pytest.raises(OutOfRangeError):
        lm.trace(PROMPT, interventions={f"blocks.{n}.mlp": iv.zero()})


# -- which architectures are claimed ----------------------------------------------------------
def test_every_claimed_model_type_has_a_tiny_family():
    """An adapter claims exactly the model types proven by the tiny families of this file."""
    assert set(supported_model_types()) == CLAIMED_MODEL_TYPES
    assert len(supported_model_types()) == len(CLAIMED_MODEL_TYPES)  # no type claimed twice
    assert {CONFIGS[f]().model_type for f in FAMILIES} == CLAIMED_MODEL_TYPES
    assert set(FAMILIES) == set(DIMS) == set(REFERENCE)


def test_gemma1_uses_the_llama_layout_and_gemma2_3_the_sandwich_norms(make_tiny_lm):
    """Gemma 1's decoder layer has no pre/post-feedforward norms: its attn/mlp are the raw
    block outputs, while Gemma 2/3 add the post-normed ones."""
    g1 = make_tiny_lm("gemma")
    layer = g1.hf_model.get_submodule("model.layers.0")
    assert not hasattr(layer, "pre_feedforward_layernorm")
    assert not hasattr(layer, "post_feedforward_layernorm")
    assert g1.site("blocks.0.attn").module_path == "model.layers.0.self_attn"
    assert g1.site("blocks.0.mlp").module_path == "model.layers.0.mlp"
    for family in ("gemma2", "gemma3_text"):
        lm = make_tiny_lm(family)
        assert lm.site("blocks.0.attn").module_path == "model.layers.0.post_attention_layernorm"
        assert lm.site("blocks.0.mlp").module_path == "model.layers.0.post_feedforward_layernorm"


def _unclaimed_configs() -> dict[str, object]:
    """Tiny configs of architectures no adapter claims (the multimodal Gemma 3 nests its
    decoder under ``model.language_model``)."""
    return {
        "opt": transformers.OPTConfig(vocab_size=256, hidden_size=16, ffn_dim=32,
                                      num_hidden_layers=1, num_attention_heads=2,
                                      word_embed_proj_dim=16, max_position_embeddings=32),
        "gemma3": transformers.Gemma3Config(
            text_config=transformers.Gemma3TextConfig(
                vocab_size=256, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, head_dim=8),
            vision_config=transformers.SiglipVisionConfig(
                hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, image_size=16, patch_size=8)),
    }


@pytest.mark.parametrize("model_type", ["opt", "gemma3"])
def test_an_unclaimed_model_type_is_an_unsupported_architecture_error(model_type):
    from causalpatch.adapters import adapter_for

    config = _unclaimed_configs()[model_type]
    assert config.model_type == model_type
    with pytest.raises(UnsupportedArchitectureError) as err:
        adapter_for(config)
    message = str(err.value)
    assert "unsupported architecture" in message and repr(model_type) in message
    listed = message.split("Supported model types: ", 1)[1].split(". ", 1)[0].split(", ")
    assert sorted(listed) == sorted(CLAIMED_MODEL_TYPES)


def test_unsupported_architecture_names_every_supported_type():
    config = transformers.OPTConfig(vocab_size=256, hidden_size=16, ffn_dim=32,
                                    num_hidden_layers=1, num_attention_heads=2,
                                    word_embed_proj_dim=16, max_position_embeddings=32)
    opt = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedArchitectureError) as err:
        InterpretableModel(opt, tokenizer=tiny_tokenizer())
    message = str(err.value)
    assert "'opt'" in message and "adapter" in message
    for model_type in supported_model_types():
        assert model_type in message
    assert isinstance(err.value, ValueError)


def test_resid_mid_of_a_parallel_residual_neox_is_a_clear_error():
    lm = tiny_model("gpt_neox_parallel")
    assert not any(n.endswith("resid_mid") for n in lm.component_names())
    for name in ("blocks.0.resid_mid", "blocks.0.hook_resid_mid"):
        with pytest.raises(UnknownComponentError, match="parallel residual"):
            lm.site(name)
    with pytest.raises(UnknownComponentError, match="parallel residual"):
        lm.trace(PROMPT, interventions={"blocks.1.resid_mid": iv.zero()})
    sequential = tiny_model("gpt_neox_sequential")
    assert "blocks.0.resid_mid" in sequential.component_names()

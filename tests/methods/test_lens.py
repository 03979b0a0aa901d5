"""Logit lens and direct logit attribution on a tiny model of every adapter family.

Expected values are computed independently of causalpatch's adapters: residual streams and
block outputs come from plain PyTorch hooks on the hand-written module paths of
``conftest.REFERENCE``, the final norm and unembedding are the Hugging Face modules themselves
(``get_output_embeddings``), and the frozen-norm formulas are written out here per norm type.
"""

from __future__ import annotations

from collections.abc import Iterator

import matplotlib
import pytest
import torch
from conftest import REFERENCE, TextPairs, assert_matches_reference, assert_within, \
    capture_modules, tiny_hf_model, tiny_tokenizer

from causalpatch import (
    DLAResult,
    InterpretableModel,
    LensResult,
    direct_logit_attribution,
    logit_lens,
)
from causalpatch.errors import (
    CorruptResultError,
    InvalidArgumentError,
    InvalidTypeError,
    OutOfRangeError,
)

matplotlib.use("Agg")
pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "When Mary and John went to the store, John gave"  # 11 tokens
SHORT = "The city of Paris"  # 4 tokens
N_TOKENS = 11
IOI = dict(correct=" Mary", incorrect=" John")
UNITS = ("component", "layer", "head", "neuron")
#: How each family's final (and post-block) norm computes, written out by hand.
NORM = {"gpt2": "layer", "gpt_neox_parallel": "layer", "gpt_neox_sequential": "layer",
        "gemma": "rms1", "gemma2": "rms1", "gemma3_text": "rms1"}
POST_NORMED = {"gemma2", "gemma3_text"}  # attn/mlp are post-normed before the residual add


@pytest.fixture
def lm(tiny_lm: InterpretableModel) -> Iterator[InterpretableModel]:
    """The shared tiny model; fails the test if a hook is left behind."""
    assert tiny_lm.hook_snapshot() == {}
    yield tiny_lm
    assert tiny_lm.hook_snapshot() == {}, "a hook leaked out of the test"


#: Tolerances, float32 models, every family (``conftest.assert_matches_reference`` through
#: :func:`_close` / :func:`_logits`: max |got - expected| over the largest expected value).
#: Lens logits against the model's logits or the final norm and unembedding applied by hand:
#: other batch shapes, other float32 summation orders. Largest ratio observed 5.3e-7 (1.7e-6 on
#: logits up to 3.1).
LOGITS_RTOL = 5e-6
#: logits that move by 100x the tolerance (fewest observed: 978 of 1024).
LOGITS_MIN_CELLS = 500
#: entropy, KL, top and answer probabilities against float64 formulas of the reference logits:
#: largest ratio observed 1.8e-6 (KL: 6.3e-7 on values up to 0.35).
STATS_RTOL = 1.5e-5
#: DLA parts against writes through the frozen norm by hand, and batched rows against single
#: prompts: largest ratio observed 9.7e-7 (batched rows, 3.4e-7 on parts up to 0.35).
PARTS_RTOL = 8e-6
#: identities of sums (parts sum to the logit difference, heads and neurons refine their
#: block), absolute in logits: a total may be near 0 while its parts are not, so the bound is
#: on the float32 rounding of the summation. Largest observed 5.3e-7.
SUM_ATOL = 5e-6


def _close(got, expected, rtol: float, what: str, min_cells: int = 1) -> None:
    """``got`` equals ``expected`` by the suite's one rule (0 is no value at all)."""
    assert_matches_reference(torch.as_tensor(got, dtype=torch.float64),
                             torch.as_tensor(expected, dtype=torch.float64), 0.0, rtol=rtol,
                             min_cells=min_cells, what=what)


def _logits(got, expected, what: str) -> None:
    """Lens logits by the suite's one rule (:data:`LOGITS_RTOL`)."""
    _close(got, expected, LOGITS_RTOL, what, LOGITS_MIN_CELLS)



# -- independent helpers (plain torch and Hugging Face modules only) ------------------------------
def _ids(lm: InterpretableModel, prompt: str = PROMPT) -> torch.Tensor:
    return torch.tensor([lm.tokenizer(prompt)["input_ids"]])


def _plain_logits(lm: InterpretableModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return lm.hf_model(input_ids=ids, use_cache=False).logits


def _softcap(lm: InterpretableModel) -> float | None:
    return getattr(lm.config, "final_logit_softcapping", None)


def _capture(lm: InterpretableModel, family: str, ids: torch.Tensor, extra: dict | None = None
             ) -> dict[str, torch.Tensor]:
    """Every layer's input/output and attn/mlp writes, the final norm's output, by plain hooks."""
    ref = REFERENCE[family]
    wanted = {"ln_final": ref.sites["ln_final"]}
    for L in range(lm.n_layers):
        for key in ("resid_pre", "resid_post", "attn", "mlp"):
            path, io = ref.sites[key]
            wanted[f"{L}.{key}"] = (path.format(L=L), io)
    wanted.update(extra or {})
    return capture_modules(lm.hf_model, ids, wanted)


def _norm_module(lm: InterpretableModel, family: str) -> torch.nn.Module:
    return lm.hf_model.get_submodule(REFERENCE[family].sites["ln_final"][0])


def _frozen(kind: str, module: torch.nn.Module, x: torch.Tensor):
    """The norm ``module`` frozen at ``x`` ``[d]``, by hand: ``(linear map, bias)``."""
    x = x.double()
    w = module.weight.detach().double()
    if kind == "layer":
        sigma = torch.sqrt(x.var(unbiased=False) + module.eps)
        return ((lambda v: (v.double() - v.double().mean(-1, keepdim=True)) / sigma * w),
                module.bias.detach().double())
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    rms = torch.sqrt(x.pow(2).mean() + eps)
    gain = w + 1.0 if kind == "rms1" else w
    return (lambda v: v.double() / rms * gain), None


def _answer_direction(lm: InterpretableModel, correct: str = " Mary",
                      incorrect: str | None = " John") -> torch.Tensor:
    w = lm.hf_model.get_output_embeddings().weight.detach().double()
    d = w[lm.to_single_token(correct)]
    return d if incorrect is None else d - w[lm.to_single_token(incorrect)]


def _model_diff(lm: InterpretableModel, ids: torch.Tensor, pos: int = -1, capped: bool = False
                ) -> float:
    """The model's logit difference at ``pos``: from its output logits, or (``capped=False`` on
    a soft-capped model) from its ``lm_head`` output on its own final-norm output."""
    c, i = lm.to_single_token(" Mary"), lm.to_single_token(" John")
    if _softcap(lm) is None or capped:
        logits = _plain_logits(lm, ids)[0, pos]
    else:
        got = capture_modules(lm.hf_model, ids, {"head": ("lm_head", "out")})
        logits = got["head"][0, pos]
    return float(logits[c].double() - logits[i].double())


# -- logit lens -----------------------------------------------------------------------------------
def test_last_layer_lens_equals_the_model_logits(lm):
    lens = logit_lens(lm, PROMPT)
    assert isinstance(lens, LensResult)
    assert lens.logits.shape == (lm.n_layers, N_TOKENS, lm.vocab_size)
    _logits(lens.logits[-1], _plain_logits(lm, _ids(lm))[0], "lens logits")


def test_a_padded_batch_gives_each_prompts_own_lens(lm):
    both = logit_lens(lm, [PROMPT, SHORT], answer=[" Mary", " Paris"])
    assert isinstance(both, list) and len(both) == 2
    for prompt, lens in zip([PROMPT, SHORT], both):
        alone = logit_lens(lm, prompt)
        assert lens.logits.shape == alone.logits.shape
        _logits(lens.logits, alone.logits, "lens logits")
        _logits(lens.logits[-1], _plain_logits(lm, _ids(lm, prompt))[0], "lens logits")
    assert both[1].answer_text == " Paris" and both[1].positions == [0, 1, 2, 3]


def test_each_layer_lens_is_the_final_norm_of_its_resid_post_unembedded(lm, tiny_family):
    """Every layer, computed here with plain torch: the HF final norm module applied to the
    layer's output (its own statistics), the output embedding, the soft-cap; then every
    statistic from those logits."""
    ids = _ids(lm)
    got = _capture(lm, tiny_family, ids)
    norm, head = _norm_module(lm, tiny_family), lm.hf_model.get_output_embeddings()
    cap = _softcap(lm)
    with torch.no_grad():
        rows = [got["0.resid_pre"][0]] + [got[f"{L}.resid_post"][0] for L in range(lm.n_layers)]
        expected = torch.stack([head(norm(r)) for r in rows])
        if cap:
            expected = torch.tanh(expected / cap) * cap
    answer = lm.to_single_token(" Mary")
    lens = logit_lens(lm, PROMPT, answer=" Mary", k=3, include_embed=True)
    assert lens.layers == ["embed", *range(lm.n_layers)]
    _logits(lens.logits, expected, "lens logits")
    assert (lens.logits[1:-1] - lens.logits[-1]).abs().max() > 1e-2  # layers differ: not vacuous

    logp = torch.log_softmax(expected.double(), -1)
    final = logp[-1].exp()
    _close(lens.entropy, -(logp.exp() * logp).sum(-1), STATS_RTOL, "entropy", min_cells=20)
    _close(lens.kl[:-1], (final * (logp[-1] - logp)).sum(-1)[:-1], STATS_RTOL, "kl", min_cells=20)
    assert lens.kl[-1].abs().max() == 0
    assert torch.equal(lens.top_ids, expected.topk(3, dim=-1).indices)
    _close(lens.top_probs, logp.exp().gather(-1, lens.top_ids), STATS_RTOL, "top probs",
           min_cells=20)
    _close(lens.answer_prob, logp[..., answer].exp(), STATS_RTOL, "answer prob", min_cells=20)
    ranks = (expected > expected[..., answer, None]).sum(-1) + 1
    assert torch.equal(lens.answer_rank, ranks)
    assert lens.top_tokens[0][0] == [lm.tokenizer.decode([int(t)]) for t in lens.top_ids[0, 0]]


def test_lens_positions_count_from_the_end_and_match_the_full_lens(lm):
    full = logit_lens(lm, PROMPT)
    some = logit_lens(lm, PROMPT, positions=[-1, 2], keep_logits=True)
    assert some.positions == [2, N_TOKENS - 1]
    _logits(some.logits, full.logits[:, [2, N_TOKENS - 1]], "lens positions")
    a, b = some.cell(-1, -1), full.cell(lm.n_layers - 1, N_TOKENS - 1)
    assert [t for t, _ in a] == [t for t, _ in b]
    assert [p for _, p in a] == pytest.approx([p for _, p in b], abs=1e-6)
    lean = logit_lens(lm, PROMPT, keep_logits=False)
    assert lean.logits is None and torch.allclose(lean.entropy, full.entropy)


def test_lens_blocks_and_chunks_change_nothing(lm, monkeypatch):
    """Blocks of positions (keep_logits=False) and row chunks of the statistics give the same
    numbers as one pass."""
    import causalpatch.methods.lens as lens_module

    whole = logit_lens(lm, PROMPT, answer=" Mary")
    monkeypatch.setattr(lens_module, "LENS_BLOCK_CELLS", 2 * lm.n_layers)  # 2 positions a block
    monkeypatch.setattr(lens_module, "STATS_CHUNK_BYTES", 4 * lm.vocab_size * 3)  # 3 rows
    parts = logit_lens(lm, PROMPT, answer=" Mary", keep_logits=False)
    for name in ("top_probs", "entropy", "kl", "answer_prob", "answer_logit"):
        assert torch.allclose(getattr(parts, name), getattr(whole, name), atol=1e-6), name
    assert torch.equal(parts.top_ids, whole.top_ids)
    assert torch.equal(parts.answer_rank, whole.answer_rank)


# -- direct logit attribution ------------------------------------------------------------------
@pytest.mark.parametrize("unit", UNITS)
def test_dla_parts_sum_to_the_models_logit_difference(lm, tiny_family, unit):
    r = direct_logit_attribution(lm, PROMPT, unit, **IOI)
    assert isinstance(r, DLAResult) and r.unit == unit
    total = sum(r.parts.values())
    assert_within([total], [r.logit_diff], SUM_ATOL, "dla sum")
    ids = _ids(lm)
    # the attributed difference is the model's own (pre-cap where the model soft-caps)
    assert_within([r.logit_diff], [_model_diff(lm, ids)], SUM_ATOL, "dla sum")
    assert_within([r.model_logit_diff], [_model_diff(lm, ids, capped=True)], SUM_ATOL, "dla sum")
    assert r.sum_error <= SUM_ATOL
    assert max(abs(v) for v in r.parts.values()) > 1e-2  # not vacuous
    n_heads, d_mlp, n = lm.n_heads, lm.d_mlp, lm.n_layers
    bias_free = {"component": 2 * n, "layer": n, "head": n * (n_heads + 1) + n,
                 "neuron": n + n * (d_mlp + 1)}[unit]
    embeddings = ["embed", "pos_embed"] if tiny_family == "gpt2" else ["embed"]
    assert r.names[: len(embeddings)] == embeddings
    layer_norm = NORM.get(tiny_family) == "layer"  # LayerNorm's bias is a part of its own
    assert ("ln_final.bias" in r.names) == layer_norm
    assert len(r.names) == len(embeddings) + bias_free + layer_norm


@pytest.mark.parametrize("family", sorted(POST_NORMED))
def test_soft_capped_models_attribute_the_pre_cap_difference(family):
    """Gemma 2/3 with a tight final soft-cap (0.5, so that it changes the logits a lot): the
    parts sum to the pre-cap difference of the model's own lm_head output, which the cap maps
    to the logits the model returns; the lens applies the cap like the model."""
    lm = InterpretableModel(tiny_hf_model(family, final_logit_softcapping=0.5),
                            tokenizer=tiny_tokenizer())
    ids = _ids(lm)
    pre = capture_modules(lm.hf_model, ids, {"head": ("lm_head", "out")})["head"][0, -1]
    logits = _plain_logits(lm, ids)[0, -1]
    assert torch.allclose(torch.tanh(pre / 0.5) * 0.5, logits, atol=1e-6)  # pre-cap -> model
    c, i = int(pre.argmax()), int(pre.argmin())  # the widest gap: the cap bends it most
    for unit in UNITS:
        r = direct_logit_attribution(lm, PROMPT, unit, correct=c, incorrect=i)
        assert r.softcap == 0.5
        assert_within([r.logit_diff], [float(pre[c] - pre[i])], SUM_ATOL, "dla sum")
        assert_within([sum(r.parts.values())], [r.logit_diff], SUM_ATOL, "dla sum")
        assert_within([r.model_logit_diff], [float(logits[c] - logits[i])], SUM_ATOL, "dla sum")
    assert abs(r.logit_diff - r.model_logit_diff) > 1e-2  # the cap matters here
    lens = logit_lens(lm, PROMPT)
    _logits(lens.logits[-1], _plain_logits(lm, ids)[0], "lens logits")
    assert lens.logits.abs().max() <= 0.5
    assert lm.hook_snapshot() == {}


def test_dla_component_parts_equal_the_frozen_final_norm_by_hand(lm, tiny_family):
    """Each write (embeddings, attn, mlp of every layer) through the final norm frozen at the
    actual final residual (by hand per norm type) onto W_U[Mary] - W_U[John]."""
    ids = _ids(lm)
    extra = {}
    if tiny_family == "gpt2":
        extra["wpe"] = ("transformer.wpe", "out")
    got = _capture(lm, tiny_family, ids, extra)
    kind = NORM.get(tiny_family, "rms")
    norm = _norm_module(lm, tiny_family)
    x_final = got[f"{lm.n_layers - 1}.resid_post"][0, -1]
    linear, bias = _frozen(kind, norm, x_final)
    direction = _answer_direction(lm)
    expected = {}
    start = got["0.resid_pre"][0, -1]
    if tiny_family == "gpt2":
        pos = got["wpe"][0, -1]
        expected["pos_embed"] = float(linear(pos) @ direction)
        start = start - pos
    expected["embed"] = float(linear(start) @ direction)
    for L in range(lm.n_layers):
        for block in ("attn", "mlp"):
            expected[f"blocks.{L}.{block}"] = float(linear(got[f"{L}.{block}"][0, -1]) @ direction)
    if bias is not None:
        expected["ln_final.bias"] = float(bias @ direction)
    with torch.no_grad():  # the frozen map reproduces the module on the final residual
        assert (linear(x_final) + (0 if bias is None else bias) - norm(x_final).double()
                ).abs().max() <= 1e-5
    parts = direct_logit_attribution(lm, PROMPT, "component", **IOI).parts
    assert set(parts) == set(expected) | ({"unembed.bias"} & set(parts))
    names = sorted(expected)
    _close([parts[k] for k in names], [expected[k] for k in names], PARTS_RTOL,
           f"{tiny_family} component parts", min_cells=4)


def _module_writes(module: torch.nn.Module, x: torch.Tensor, groups: int) -> torch.Tensor:
    """``module``'s output per group of its input (others zeroed), minus its output on zeros:
    each head's (or neuron's) write, through the HF module itself. ``x`` is ``[d_in]``."""
    d_in = x.shape[-1]
    size = d_in // groups
    masked = torch.zeros(groups, d_in)
    for g in range(groups):
        masked[g, g * size:(g + 1) * size] = x[g * size:(g + 1) * size]
    with torch.no_grad():
        return (module(masked) - module(torch.zeros(1, d_in))).double()


@pytest.mark.parametrize("unit", ["head", "neuron"])
def test_head_and_neuron_parts_are_their_writes_through_the_modules(lm, tiny_family, unit):
    """Head h's part: o_proj(z with only head h) - o_proj(0), through the post-attention norm
    frozen at the raw attention output on Gemma 2/3, then the frozen final norm, onto the
    answer direction. Neurons likewise through the down projection."""
    ref = REFERENCE[tiny_family]
    L = 1
    proj = (ref.o_proj if unit == "head" else ref.sites["mlp.post"][0]).format(L=L)
    block = "attn" if unit == "head" else "mlp"
    extra = {"x": (proj, "in")}
    if tiny_family in POST_NORMED:
        raw = "self_attn" if block == "attn" else "mlp"
        extra["raw"] = (f"model.layers.{L}.{raw}", "out")
    ids = _ids(lm)
    got = _capture(lm, tiny_family, ids, extra)
    module = lm.hf_model.get_submodule(proj)
    groups = lm.n_heads if unit == "head" else lm.d_mlp
    writes = _module_writes(module, got["x"][0, -1], groups)  # [groups, d_model]
    if tiny_family in POST_NORMED:
        post = lm.hf_model.get_submodule(ref.sites[block][0].format(L=L))
        post_linear, _ = _frozen("rms1", post, got["raw"][0, -1])
        writes = post_linear(writes)
    linear, _ = _frozen(NORM.get(tiny_family, "rms"), _norm_module(lm, tiny_family),
                        got[f"{lm.n_layers - 1}.resid_post"][0, -1])
    expected = linear(writes) @ _answer_direction(lm)
    r = direct_logit_attribution(lm, PROMPT, unit, **IOI)
    word = "head" if unit == "head" else "neuron"
    got_parts = torch.tensor([r.parts[f"blocks.{L}.{block}.{word}.{g}"] for g in range(groups)],
                             dtype=torch.float64)
    _close(got_parts, expected, PARTS_RTOL, f"{tiny_family} {unit} parts", min_cells=4)


def test_units_are_refinements_of_each_other(lm):
    parts = {u: direct_logit_attribution(lm, PROMPT, u, **IOI).parts for u in UNITS}
    comp = parts["component"]
    for L in range(lm.n_layers):
        heads = sum(parts["head"][f"blocks.{L}.attn.head.{h}"] for h in range(lm.n_heads))
        assert_within([heads + parts["head"][f"blocks.{L}.attn.bias"]],
                      [comp[f"blocks.{L}.attn"]], SUM_ATOL, "heads refine attn")
        neurons = sum(parts["neuron"][f"blocks.{L}.mlp.neuron.{j}"] for j in range(lm.d_mlp))
        assert_within([neurons + parts["neuron"][f"blocks.{L}.mlp.bias"]],
                      [comp[f"blocks.{L}.mlp"]], SUM_ATOL, "neurons refine mlp")
        assert_within([parts["layer"][f"blocks.{L}"]],
                      [comp[f"blocks.{L}.attn"] + comp[f"blocks.{L}.mlp"]], SUM_ATOL,
                      "layer = attn + mlp")
        assert parts["head"][f"blocks.{L}.mlp"] == pytest.approx(comp[f"blocks.{L}.mlp"],
                                                                 abs=1e-9)


def test_dla_over_a_padded_batch_and_a_dataset_is_the_mean_of_single_prompts(lm):
    correct, incorrect = [" Mary", " Paris"], [" John", " Rome"]
    r = direct_logit_attribution(lm, [PROMPT, SHORT], "head", correct=correct,
                                 incorrect=incorrect)
    singles = [direct_logit_attribution(lm, p, "head", correct=c, incorrect=i)
               for p, c, i in zip([PROMPT, SHORT], correct, incorrect)]
    for row, single in zip(r.per_prompt, singles):
        _close(row, single.values, PARTS_RTOL, "batched row", min_cells=4)
    assert (r.values - r.per_prompt.mean(0)).abs().max() <= 1e-12
    assert_within([sum(r.parts.values())], [r.logit_diff], SUM_ATOL, "dla sum")
    assert r.positions == [N_TOKENS - 1, 3]
    data = TextPairs.of([(PROMPT, PROMPT, " Mary", " John"), (SHORT, SHORT, " Paris", " Rome")])
    from_data = direct_logit_attribution(lm, data, "head")
    assert (from_data.per_prompt - r.per_prompt).abs().max() <= 1e-9


def test_dla_at_an_inner_position_and_of_a_single_logit(lm):
    ids = _ids(lm)
    r = direct_logit_attribution(lm, PROMPT, "component", position=4, **IOI)
    assert r.positions == [4]
    assert_within([r.logit_diff], [_model_diff(lm, ids, pos=4)], SUM_ATOL, "dla sum")
    assert_within([sum(r.parts.values())], [r.logit_diff], SUM_ATOL, "dla sum")
    one = direct_logit_attribution(lm, PROMPT, "neuron", correct=" Mary")
    assert one.metric == "logit" and one.incorrect is None
    got = capture_modules(lm.hf_model, ids, {"head": ("lm_head", "out")})["head"][0, -1]
    assert_within([one.logit_diff], [float(got[lm.to_single_token(" Mary")])], SUM_ATOL, "dla sum")
    assert_within([sum(one.parts.values())], [one.logit_diff], SUM_ATOL, "dla sum")


@pytest.mark.parametrize("family", ["llama", "gpt_neox_parallel"])
def test_tied_embeddings(family):
    """Tied input/output embeddings (GPT-2 ties by default; here LLaMA and NeoX with
    tie_word_embeddings=True): the lens and the attribution read the shared matrix."""
    hf = tiny_hf_model(family, tie_word_embeddings=True)
    assert hf.get_output_embeddings().weight is hf.get_input_embeddings().weight
    lm = InterpretableModel(hf, tokenizer=tiny_tokenizer())
    ids = _ids(lm)
    lens = logit_lens(lm, PROMPT)
    _logits(lens.logits[-1], _plain_logits(lm, ids)[0], "lens logits")
    for unit in UNITS:
        r = direct_logit_attribution(lm, PROMPT, unit, **IOI)
        assert_within([sum(r.parts.values())], [_model_diff(lm, ids)], SUM_ATOL, "dla sum")
    assert lm.hook_snapshot() == {}


def test_gpt2_ties_its_embeddings(make_tiny_lm):
    lm = make_tiny_lm("gpt2")
    assert lm.hf_model.get_output_embeddings().weight is lm.hf_model.get_input_embeddings().weight


# -- bad inputs: specific errors before any forward, no hook left --------------------------------
BAD = [
    ("lens-position", lambda m: logit_lens(m, PROMPT, positions=[N_TOKENS]), OutOfRangeError,
     "beyond prompt 0, which has 11 tokens"),
    ("lens-position-short", lambda m: logit_lens(m, [PROMPT, SHORT], positions=[-5]),
     OutOfRangeError, "beyond prompt 1, which has 4 tokens"),
    ("lens-multi-token", lambda m: logit_lens(m, PROMPT, answer="xyz"), InvalidArgumentError,
     "'xyz' is 3 tokens"),
    ("lens-k", lambda m: logit_lens(m, PROMPT, k=0), InvalidArgumentError, "k must be"),
    ("lens-positions-type", lambda m: logit_lens(m, PROMPT, positions=3), InvalidTypeError,
     "positions must be"),
    ("lens-positions-empty", lambda m: logit_lens(m, PROMPT, positions=[]),
     InvalidArgumentError, "positions is empty"),
    ("dla-position", lambda m: direct_logit_attribution(m, PROMPT, position=11, **IOI),
     OutOfRangeError, "position=11 is beyond prompt 0"),
    ("dla-multi-token-correct", lambda m: direct_logit_attribution(
        m, PROMPT, correct=" Marx", incorrect=" John"), InvalidArgumentError,
     "correct: ' Marx' is"),
    ("dla-multi-token-incorrect", lambda m: direct_logit_attribution(
        m, PROMPT, correct=" Mary", incorrect="Jo"), InvalidArgumentError, "incorrect: 'Jo' is 2"),
    ("dla-no-answer", lambda m: direct_logit_attribution(m, PROMPT), InvalidArgumentError,
     "correct is required"),
    ("dla-unit", lambda m: direct_logit_attribution(m, PROMPT, unit="heads", **IOI),
     InvalidArgumentError, "unit must be one of"),
    ("dla-answer-count", lambda m: direct_logit_attribution(
        m, [PROMPT, SHORT], correct=[" Mary"], incorrect=" John"), InvalidArgumentError,
     "1 answers for 2 prompts"),
    ("dla-answer-type", lambda m: direct_logit_attribution(m, PROMPT, correct=1.5),
     InvalidTypeError, "single-token string"),
    ("dla-token-id", lambda m: direct_logit_attribution(m, PROMPT, correct=10**6),
     InvalidArgumentError, "outside the vocabulary"),
]


@pytest.mark.parametrize("call,error,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_inputs_raise_before_any_forward(lm, monkeypatch, call, error, match):
    def no_forward(*args, **kwargs):
        raise AssertionError("a forward pass ran before the input was checked")

    monkeypatch.setattr(type(lm.hf_model), "forward", no_forward)
    with pytest.raises(error, match=match.replace("(", r"\(").replace(")", r"\)")):
        call(lm)
    monkeypatch.undo()
    assert lm.hook_snapshot() == {}
    _logits(logit_lens(lm, PROMPT).logits[-1], _plain_logits(lm, _ids(lm))[0],
            "lens after bad input")


# -- results: exports and views ----------------------------------------------------------------
def test_lens_result_exports(make_tiny_lm, tmp_path):
    lm = make_tiny_lm("llama")
    lens = logit_lens(lm, PROMPT, answer=" Mary", k=3)
    back = LensResult.from_json(lens.to_json())
    assert back.logits is None and back.top_tokens == lens.top_tokens
    assert torch.allclose(back.entropy, lens.entropy) and torch.equal(back.answer_rank,
                                                                      lens.answer_rank)
    df = lens.to_pandas()
    assert len(df) == lm.n_layers * N_TOKENS and {"top_token", "answer_rank", "kl"} <= set(df)
    for stat in ("top", "answer_prob", "answer_rank", "entropy", "kl"):
        assert lens.plot(stat).axes
    for suffix in ("json", "png", "html"):
        path = lens.save(tmp_path / f"lens.{suffix}")
        assert path.stat().st_size > 100
    assert LensResult.from_json(tmp_path / "lens.json").positions == lens.positions
    assert "<table>" in lens._repr_html_() and "Mary" in lens.to_html()
    assert "layer" in lens.summary() and "rank=" in lens.summary()
    with_embed = logit_lens(lm, PROMPT, include_embed=True)
    assert [t for t, _ in with_embed.cell("embed", 0)] == with_embed.top_tokens[0][0]
    assert with_embed.cell(-1)[0][0] == with_embed.cell(lm.n_layers - 1)[0][0]
    with pytest.raises(OutOfRangeError, match="layer axis"):
        lens.cell(lm.n_layers)
    with pytest.raises(OutOfRangeError, match="position axis"):
        lens.cell(0, N_TOKENS)
    with pytest.raises(InvalidArgumentError, match="stat must be one of"):
        lens.plot("probability")
    with pytest.raises(CorruptResultError):
        LensResult.from_json('{"format": "causalpatch-lens", "version": 99}')


@pytest.mark.parametrize("unit", UNITS)
def test_dla_result_exports(make_tiny_lm, tmp_path, unit):
    lm = make_tiny_lm("gpt2")
    r = direct_logit_attribution(lm, [PROMPT, SHORT], unit, correct=[" Mary", " Paris"],
                                 incorrect=[" John", " Rome"])
    back = DLAResult.from_json(r.to_json())
    assert back.parts == r.parts and torch.equal(back.per_prompt, r.per_prompt)
    df = r.to_pandas()
    assert list(df["part"]) == r.names and {"layer", "kind", "index", "prompt_1"} <= set(df)
    assert_within([df["value"].sum()], [r.logit_diff], SUM_ATOL, "dla sum")
    mat, cols = r.matrix()
    width = {"component": 2, "layer": 1, "head": lm.n_heads, "neuron": lm.d_mlp}[unit]
    assert mat.shape == (lm.n_layers, width) and len(cols) == width
    top = r.top(3)
    assert len(top) == 3 and abs(top[0][1]) == max(abs(v) for v in r.parts.values())
    assert r.plot().axes
    for suffix in ("json", "png", "html"):
        assert r.save(tmp_path / f"dla.{suffix}").stat().st_size > 100
    assert "sum to" in r._repr_html_() and unit in r.summary()


# -- the real model ---------------------------------------------------------------------------
@pytest.mark.real
def test_smollm2_lens_and_head_attribution(smollm2):
    prompt = "When Mary and John went to the store, John gave a drink to"
    ids = smollm2.to_tokens(prompt)
    with torch.no_grad():
        logits = smollm2.hf_model(input_ids=ids).logits[0]
    lens = logit_lens(smollm2, prompt, answer=" Mary")
    assert lens.logits.shape == (30, ids.shape[1], smollm2.vocab_size)
    _logits(lens.logits[-1], logits, "lens logits")
    assert int(lens.answer_rank[-1, -1]) == 1 and int(lens.answer_rank[0, -1]) > 10
    r = direct_logit_attribution(smollm2, prompt, "head", correct=" Mary", incorrect=" John")
    diff = float(logits[-1, smollm2.to_single_token(" Mary")].double()
                 - logits[-1, smollm2.to_single_token(" John")].double())
    assert_within([r.logit_diff, sum(r.parts.values())], [diff, diff], SUM_ATOL, "smollm2 dla sums")
    assert r.logit_diff > 1
    assert smollm2.hook_snapshot() == {}

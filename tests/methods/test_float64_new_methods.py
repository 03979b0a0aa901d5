"""Float64 controls of the newer methods: logit lens, direct logit attribution, edge
attribution (``exact``, ``eap``, ``eap_ig``), AtP*'s verified cells and ROME causal tracing
with its controls (``noise_std`` given or ``"subject"``, ``window="scaled"``,
``exclude_layers``, ``prepend_bos``, ``sever`` of MLPs and of attention), each on float64 tiny models of LLaMA (grouped-query heads), GPT-2 (fused
``c_attn``), Gemma 3 (sandwich norms, soft-caps) and GPT-NeoX with a parallel residual, against
a reference written here with plain PyTorch hooks on the module paths of
``conftest.REFERENCE`` (or ``model.trace`` with plain interventions, or the naive loop), all
through ``conftest.assert_matches_reference``.

In float64 neither side has float32 rounding to hide behind: where a method returns float64
values (DLA) the two sides agree to float64 rounding; where it returns float32 values (logits,
metrics, effects) they agree to float32 resolution of the result (the tolerances below, each
measured). Gemma 3 mixes the heads in its post-attention norm, so ``edge_attribution`` refuses
it: the edge test asserts that refusal there.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (REFERENCE, assert_matches_reference, capture_modules, first_tensor,
                      tiny_hf_model, tiny_tokenizer)

import causalpatch.interventions as iv
from causalpatch.errors import UnsupportedArchitectureError
from causalpatch import (InterpretableModel, activation_patching, attribution_patching,
                         causal_tracing, direct_logit_attribution, edge_attribution, logit_lens)

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
FAMILIES64 = ["llama", "gpt2", "gemma3_text", "gpt_neox_parallel"]
CLEAN, CORRUPTED = "abcdefghijkl", "abcdeXghijkl"  # 12 tokens, differ at position 5
CORRECT, INCORRECT = 5, 6
#: Tolerances (``conftest.assert_matches_reference``: max |method - reference| over the largest
#: reference value or effect), each measured on all four families:
#:
#: logit lens: float32 logits of float64 runs. Observed at most 4.7e-8 (GPT-2; 1.1e-7 absolute on
#: logits up to 2.5: half a float32 ulp, the one rounding of the result).
LENS_RTOL = 2e-7
#: direct logit attribution: float64 parts. Observed 0 (bitwise equal) on every family; the
#: bound allows a few float64 ulps of other summation orders.
DLA_RTOL = 1e-14
#: edge attribution: ``change`` is a float32 difference of float32 metric values (logit
#: differences of 1-5, one float32 ulp 1.2e-7 to 4.8e-7). Observed at most 2.0e-6 for ``exact``
#: (GPT-2: 2.6e-7 on a largest change of 0.13), 7.8e-7 for ``eap`` and 6.3e-7 for ``eap_ig``
#: (GPT-2 both).
EDGE_RTOL = {"exact": 1e-5, "eap": 5e-6, "eap_ig": 5e-6}
IG_STEPS = 3
#: AtP*'s verified cells against the naive loop: float32 effects from the same float64 logits.
#: Observed 0 (bitwise equal) on every family and component; the bound allows one flipped
#: float32 rounding of a metric value (as ``engine/test_float64.py``'s REL32).
RTOL32 = 5e-7
#: causal tracing: float32 probabilities of the answer (the method's metric) of float64 runs,
#: against float64 softmax of the plain traces. Observed at most 2.5e-6 (GPT-2's severed-MLP
#: trace: 4.7e-9 absolute on a largest effect of 1.9e-3; severed attention 1.2e-6).
TRACE_RTOL = 2e-5


@pytest.fixture(scope="module", params=FAMILIES64)
def model64(request):
    hf = tiny_hf_model(request.param).double()
    return request.param, InterpretableModel(hf, tokenizer=tiny_tokenizer())


def _ids(text: str) -> torch.Tensor:
    return torch.tensor([tiny_tokenizer()(text)["input_ids"]])


def _run(hf, ids, hooks=()) -> torch.Tensor:
    """Logits ``[T, vocab]`` of a plain HF run with ``hooks`` ``(path, fn, is_pre)``."""
    handles = []
    try:
        for path, fn, pre in hooks:
            module = hf.get_submodule(path)
            handles.append(module.register_forward_pre_hook(fn) if pre
                           else module.register_forward_hook(fn))
        return hf(input_ids=ids, use_cache=False).logits[0]
    finally:
        for h in handles:
            h.remove()


def _ld(logits: torch.Tensor) -> torch.Tensor:
    return logits[-1, CORRECT] - logits[-1, INCORRECT]


# -- logit lens and direct logit attribution -------------------------------------------------------
def test_float64_logit_lens_is_each_layers_final_norm_and_unembedding(model64):
    """Layer L's lens: the HF final norm module on layer L's output, the output embedding, the
    soft-cap where the model has one."""
    family, model = model64
    hf, ref = model.hf_model, REFERENCE[family]
    ids = _ids(CLEAN)
    wanted = {L: (ref.sites["resid_post"][0].format(L=L), "out") for L in range(model.n_layers)}
    got = capture_modules(hf, ids, wanted)
    norm, head = hf.get_submodule(ref.sites["ln_final"][0]), hf.get_output_embeddings()
    cap = getattr(hf.config, "final_logit_softcapping", None)
    with torch.no_grad():
        expected = torch.stack([head(norm(got[L][0])) for L in range(model.n_layers)])
        if cap:
            expected = torch.tanh(expected / cap) * cap
    lens = logit_lens(model, CLEAN)
    # the logits themselves: 0 is no logit at all
    assert_matches_reference(lens.logits, expected, 0.0, rtol=LENS_RTOL, min_cells=5000,
                             what=f"{family} lens logits")
    # and the lens of layer L differs from the last layer's (the layers are not one copy)
    assert_matches_reference(lens.logits[:-1], expected[:-1], expected[-1], rtol=LENS_RTOL,
                             min_cells=5000, what=f"{family} lens, from the last layer")


def _frozen_norm(norm: torch.nn.Module, x: torch.Tensor):
    """The norm ``norm`` frozen at ``x`` ``[d]``, written out by hand: ``(linear map, bias)``.
    LayerNorm: centre, divide by x's std, scale; RMSNorm: divide by x's RMS, scale by ``w`` (or
    ``1 + w`` for Gemma's, whose weight is stored as an offset)."""
    x = x.double()
    w = norm.weight.detach().double()
    if isinstance(norm, torch.nn.LayerNorm):
        sigma = torch.sqrt(x.var(unbiased=False) + norm.eps)
        return (lambda v: (v - v.mean(-1, keepdim=True)) / sigma * w), norm.bias.detach().double()
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    gain = w + 1.0 if type(norm).__name__.startswith("Gemma") else w
    rms = torch.sqrt(x.pow(2).mean() + eps)
    return (lambda v: v / rms * gain), None


def test_float64_dla_component_parts_are_writes_through_the_frozen_final_norm(model64):
    """Each residual write (embeddings, every attn and mlp) at the last position through the
    final norm frozen at the final residual, onto ``W_U[correct] - W_U[incorrect]``; the parts
    sum to the model's own (pre-cap) logit difference."""
    family, model = model64
    hf, ref = model.hf_model, REFERENCE[family]
    ids = _ids(CLEAN)
    n = model.n_layers
    wanted = {"pre0": (ref.sites["resid_pre"][0].format(L=0), "in"),
              "final": (ref.sites["resid_post"][0].format(L=n - 1), "out"),
              "head": ("lm_head", "out")}
    for L in range(n):
        for kind in ("attn", "mlp"):
            wanted[f"blocks.{L}.{kind}"] = (ref.sites[kind][0].format(L=L), ref.sites[kind][1])
    if family == "gpt2":
        wanted["pos_embed"] = ("transformer.wpe", "out")
    got = {k: v[0, -1].double() for k, v in capture_modules(hf, ids, wanted).items()}
    linear, bias = _frozen_norm(hf.get_submodule(ref.sites["ln_final"][0]), got["final"])
    w_u = hf.get_output_embeddings().weight.detach().double()
    direction = w_u[CORRECT] - w_u[INCORRECT]
    expected = {k: float(linear(v) @ direction) for k, v in got.items()
                if k.startswith("blocks.") or k == "pos_embed"}
    start = got["pre0"] - got.get("pos_embed", 0.0)
    expected["embed"] = float(linear(start) @ direction)
    if bias is not None:
        expected["ln_final.bias"] = float(bias @ direction)
    r = direct_logit_attribution(model, CLEAN, "component", correct=CORRECT, incorrect=INCORRECT)
    names = sorted(expected)
    assert set(r.parts) == set(names)
    assert_matches_reference([r.parts[k] for k in names], [expected[k] for k in names], 0.0,
                             rtol=DLA_RTOL, min_cells=2 * n, what=f"{family} dla parts")
    model_ld = float(got["head"][CORRECT] - got["head"][INCORRECT])
    assert_matches_reference([sum(r.parts.values())], [model_ld], 0.0, rtol=DLA_RTOL, min_cells=1,
                             what=f"{family} dla sum")


# -- edge attribution ------------------------------------------------------------------------------
def _edge_setup(family, model):
    """Plain-hook ingredients of edges: each sender's output difference (corrupted - clean, the
    noising direction) ``[T, d]`` and each receiver's hook point."""
    hf, ref = model.hf_model, REFERENCE[family]
    n = model.n_layers
    wanted = {"input": (ref.sites["resid_pre"][0].format(L=0), "in")}
    for L in range(n):
        wanted[f"m{L}"] = (ref.sites["mlp"][0].format(L=L), "out")
        wanted[f"z{L}"] = (ref.o_proj.format(L=L), "in")
    clean = capture_modules(hf, _ids(CLEAN), wanted)
    corrupted = capture_modules(hf, _ids(CORRUPTED), wanted)
    d_head = model.d_head

    def delta(node: str) -> torch.Tensor:
        if not node.startswith("a"):
            return (corrupted[node] - clean[node])[0]
        layer, head = (int(x) for x in node[1:].split(".h"))
        o_proj = hf.get_submodule(ref.o_proj.format(L=layer))
        keep = torch.zeros(model.n_heads * d_head, dtype=F64)
        keep[head * d_head:(head + 1) * d_head] = 1.0
        with torch.no_grad():  # the head's write: its z columns through o_proj (bias cancels)
            return (o_proj(corrupted[f"z{layer}"] * keep) - o_proj(clean[f"z{layer}"] * keep))[0]

    def point(receiver: str) -> tuple[str, bool]:
        """Where the receiver reads the residual: the last layer's output for the logits, the
        MLP's input norm's input for an MLP (only the MLP sees an addition there)."""
        if receiver == "logits":
            return ref.sites["resid_post"][0].format(L=n - 1), False
        return ref.sites["mlp.in"][0].format(L=int(receiver[1:])), True

    return delta, point


def _add(value: torch.Tensor, pre: bool):
    def pre_hook(module, args):
        return (args[0] + value, *args[1:])

    def hook(module, args, out):
        if isinstance(out, torch.Tensor):
            return out + value
        return (first_tensor(out) + value, *out[1:])
    return pre_hook if pre else hook


EDGES = [("input", "logits"), ("input", "m1"), ("m0", "logits"), ("m0", "m2"), ("m1", "m2"),
         ("a0.h1", "logits"), ("a0.h2", "m1"), ("a1.h0", "m2"), ("a2.h3", "logits"),
         ("a1.h3", "m2")]


@pytest.mark.parametrize("method", ["exact", "eap", "eap_ig"])
def test_float64_edges_equal_plain_hook_edges(model64, method):
    """``exact``: the clean run with only the receiver reading ``x + delta_u``, minus the clean
    run, in logit-difference units. ``eap``: ``delta_u`` dotted with the gradient of the clean
    run's logit difference at the receiver's input (plain autograd). ``eap_ig``: the same with
    the gradient averaged over runs whose embedding output is ``e_corrupted + (k/m)(e_clean -
    e_corrupted)``, ``k = 0..m-1`` (:data:`IG_STEPS`)."""
    family, model = model64
    if family == "gemma3_text":  # its post-attention norm mixes the heads: no edges to check
        with pytest.raises(UnsupportedArchitectureError):
            edge_attribution(model, CLEAN, CORRUPTED, method=method, correct=CORRECT,
                             incorrect=INCORRECT)
        return
    hf = model.hf_model
    delta, point = _edge_setup(family, model)
    ids = _ids(CLEAN)
    layer0 = REFERENCE[family].sites["resid_pre"][0].format(L=0)
    e_clean = capture_modules(hf, ids, {"e": (layer0, "in")})["e"]
    e_corr = capture_modules(hf, _ids(CORRUPTED), {"e": (layer0, "in")})["e"]
    embeds = [e_corr + (k / IG_STEPS) * (e_clean - e_corr) for k in range(IG_STEPS)]
    with torch.no_grad():
        base = float(_ld(_run(hf, ids)))
    expected = []
    for src, dst in EDGES:
        path, pre = point(dst)
        d = delta(src)
        if method == "exact":
            with torch.no_grad():
                expected.append(float(_ld(_run(hf, ids, [(path, _add(d, pre), pre)]))) - base)
        else:
            grads = []
            for emb in (embeds if method == "eap_ig" else [None]):
                leaf = torch.zeros_like(d, requires_grad=True)
                hooks = [(path, _add(leaf, pre), pre)]
                if emb is not None:  # the run's embedding output is the interpolation point
                    hooks.append((layer0, lambda module, args, e=emb: (e, *args[1:]), True))
                with torch.enable_grad():
                    value = _ld(_run(hf, ids, hooks))
                    grads.append(torch.autograd.grad(value, [leaf])[0])
            expected.append(float((torch.stack(grads).mean(0) * d).sum()))
    kw = dict(ig_steps=IG_STEPS) if method == "eap_ig" else {}
    result = edge_attribution(model, CLEAN, CORRUPTED, method=method, correct=CORRECT,
                              incorrect=INCORRECT, edges=EDGES if method == "exact" else None,
                              **kw)
    got = [float(result.change[result.graph.edge_index(s, d)]) for s, d in EDGES]
    assert_matches_reference(got, expected, 0.0, rtol=EDGE_RTOL[method], min_cells=6,
                             what=f"{family} {method} edges")


# -- AtP* ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("component", ["attn_head", "attn_head_q", "attn_head_k", "mlp_neuron"])
def test_float64_atp_star_verified_cells_equal_the_naive_loop(model64, component):
    """AtP* (GradDrop, the q/k fix) screens, then proves its top cells on the engine: those
    exact values equal one naive forward per cell."""
    family, model = model64
    kw = dict(component=component, correct=CORRECT, incorrect=INCORRECT)
    if component == "mlp_neuron":
        kw["neurons"] = list(range(0, model.d_mlp, 4))
    result = attribution_patching(model, CLEAN, CORRUPTED, method="atp*", verify="auto", top_k=6,
                                  **kw)
    naive = activation_patching(model, CLEAN, CORRUPTED, engine="naive", **kw).effect_matrix
    verified = result.extra["verified"]
    assert len(verified) >= 6
    exact = [v["exact"] for v in verified]
    expected = [float(naive[tuple(v["cell"])]) for v in verified]
    assert_matches_reference(exact, expected, 0.0, rtol=RTOL32, min_cells=4,
                             what=f"{family} {component} atp* verified")


# -- causal tracing with ROME's controls -----------------------------------------------------------
PROMPT, SUBJECT = "The Eiffel Tower is in the city of", "Eiffel Tower"


def _restored_p(model, ids, span, noise, answer, restore, frozen=None) -> float:
    """The answer's probability averaged over noise rows, from one plain trace: the subject's
    embeddings noised, ``{site: position}`` restored to the clean run's value and ``frozen``
    ``{site: (position, value)}`` replaced."""
    rows = noise.shape[0]
    full = torch.zeros(rows, len(ids), model.d_model, dtype=F64)
    full[:, span[0]:span[1]] = noise.to(F64)
    interventions: dict = {"embed": iv.add(full)}
    clean = model.trace([ids], cache=list(restore)).run().cache
    for name, p in restore.items():
        interventions[name] = iv.replace_with(clean[name][:, p:p + 1], positions=[p])
    for name, (p, value) in (frozen or {}).items():
        interventions[name] = iv.replace_with(value[:, p:p + 1], positions=[p])
    logits = model.trace([ids] * rows, interventions=interventions).run().last_logits
    return float(torch.softmax(logits.double(), -1)[:, answer].mean())


def test_float64_causal_tracing_controls_equal_plain_traces(model64):
    """noise_std given as a number, window 2 with layer 0 excluded, and the severed traces
    (every later MLP, or attention, output at the restored position frozen at its noised
    value)."""
    family, model = model64
    result = causal_tracing(model, PROMPT, SUBJECT, samples=3, noise_std=0.5, window=2,
                            exclude_layers=(0,), sever=("mlp", "attn"), position_groups=False,
                            components=("resid_post", "mlp", "attn"))
    assert result.sigma == 3.0 * 0.5
    ids = model.tokenizer(PROMPT)["input_ids"]
    span, noise = result.spans[0], result.noise[0]
    answer, p_corr = result.answers[0], float(result.p_corrupted[0])
    n, T = model.n_layers, len(ids)
    rows = noise.shape[0]
    full = torch.zeros(rows, T, model.d_model, dtype=F64)
    full[:, span[0]:span[1]] = noise.to(F64)
    names = [f"blocks.{L}.{k}" for L in range(n) for k in ("mlp", "attn")]
    noised = model.trace([ids] * rows, interventions={"embed": iv.add(full)},
                         cache=names).run().cache
    for kind in ("resid_post", "mlp", "attn", "resid_post_sever_mlp", "resid_post_sever_attn"):
        got, expected = [], []
        for layer in range(n):
            for p in range(T):
                if kind.startswith("resid_post"):
                    restore = {f"blocks.{layer}.resid_post": p}
                else:  # window 2: layers L-1 and L, without the excluded layer 0
                    restore = {f"blocks.{lr}.{kind}": p for lr in (layer - 1, layer) if lr >= 1}
                frozen = {}
                if kind.startswith("resid_post_sever_"):
                    cut = kind.rsplit("_", 1)[1]
                    frozen = {f"blocks.{lr}.{cut}": (p, noised[f"blocks.{lr}.{cut}"])
                              for lr in range(layer + 1, n)}
                value = (_restored_p(model, ids, span, noise, answer, restore, frozen)
                         if restore else p_corr)
                expected.append(value - p_corr)
                got.append(float(result[kind].effect_matrix[layer, p]))
        assert_matches_reference(got, expected, 0.0, rtol=TRACE_RTOL, min_cells=4,
                                 what=f"{family} {kind} traced")
    assert result["mlp"].effect_matrix[0].abs().max() == 0  # window {0} minus layer 0: empty


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox_parallel"])
def test_float64_rome_subject_noise_scaled_window_and_bos_equal_plain_traces(family):
    """``noise_std="subject"`` (sigma = 3 x the std of the subject tokens' embeddings, computed
    here from a plain trace), ``window="scaled"`` (round(10 * 10 / 48) = 2 layers of a 10-layer
    model, written out here) and ``prepend_bos`` (the BOS token in front, the subject one token
    later) against plain float64 traces. Observed at most 6.6e-6 of the largest effect (NeoX's
    MLP trace: 8.7e-9 absolute, float32 probabilities), inside TRACE_RTOL."""
    hf = tiny_hf_model(family, num_hidden_layers=10).double()
    model = InterpretableModel(hf, tokenizer=tiny_tokenizer())
    bos = 1
    result = causal_tracing(model, PROMPT, SUBJECT, samples=2, noise_std="subject",
                            window="scaled", prepend_bos=bos, position_groups=False,
                            components=("resid_post", "mlp"))
    plain = model.tokenizer(PROMPT)["input_ids"]
    ids = [bos, *plain]
    span = (2, 4)  # "The", "Eiffel", "Tower": the subject's two tokens, one later for BOS
    assert result.spans[0] == span
    embedded = model.trace([ids], cache=["embed"]).run().cache["embed"][0, span[0]:span[1]]
    sigma = 3.0 * float(embedded.double().flatten().std())
    assert result.sigma == pytest.approx(sigma, rel=1e-12)  # observed equal to float64 rounding
    assert result["mlp"].extra["window"] == 2
    noise, answer = result.noise[0], result.answers[0]
    p_corr = float(result.p_corrupted[0])
    n, T = model.n_layers, len(ids)
    for kind in ("resid_post", "mlp"):
        got, expected = [], []
        for layer in range(n):
            for p in range(T):
                if kind == "resid_post":
                    restore = {f"blocks.{layer}.resid_post": p}
                else:  # window 2 centred as ROME's: layers L - 1 and L (clipped at 0)
                    restore = {f"blocks.{lr}.mlp": p for lr in (layer - 1, layer) if lr >= 0}
                expected.append(_restored_p(model, ids, span, noise, answer, restore) - p_corr)
                got.append(float(result[kind].effect_matrix[layer, p]))
        assert_matches_reference(got, expected, 0.0, rtol=TRACE_RTOL, min_cells=4,
                                 what=f"{family} {kind} subject noise, scaled window, BOS")

"""Float64 controls of the methods without an ``engine="naive"`` switch or with their own
construction: path patching (both freeze modes, four families) against a brute force
written out with plain traces, ROME causal tracing against one plain trace per cell, and SAE
feature patching fast against naive, all on float64 models.

Metrics are returned in float32 whatever the model's dtype (:mod:`causalpatch.metrics`), so the
float64 values of both sides are rounded to float32 once: they must agree to :data:`REL32` of
the largest value (a few float32 ulps; the float32 tests of the same methods allow 1e-4 to
2e-6), through ``conftest.assert_matches_reference`` (:func:`_close32`). Path patching and
its brute force run on LLaMA (grouped-query), GPT-2, Gemma 3 and GPT-NeoX (parallel).
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_matches_reference, id_llama, tiny_hf_model, tiny_tokenizer

import causalpatch.interventions as iv
from causalpatch import InterpretableModel
from causalpatch.methods.causal_tracing import causal_tracing
from causalpatch.methods.path_patching import path_patching
from causalpatch.methods.sae_patching import sae_patching
from causalpatch.sae import SparseAutoencoder

F64 = torch.float64
#: |got - expected| <= REL32 * max(1, max |expected|): float32 rounding of float64 values.
#: Observed: 1.8e-7 for path patching (brute force's normalised values up to 0.44, a few float32
#: ulps: both sides round their float64 logits to float32 and the normalisation divides by a
#: gap of float32 metrics), 8.9e-8 for causal tracing (probability differences: float32
#: softmax of rounded logits against float64 plain traces), 0 (bitwise) for SAE patching fast
#: against naive (both sides round the same float64 logits).
REL32 = 5e-7
#: Path patching on GPT-2 / NeoX with answers whose clean-corrupted gap is small observed up to
#: 2.4e-6 here: the normalisation multiplies the float32 rounding of the metric values by
#: 1 / gap. The test therefore picks, on those families, the answers the corruption moves most
#: (:func:`_answers`); observed then at most 1.8e-7 (LLaMA ``q``; 1.1e-7 Gemma 3 ``k``).
#: non-vacuity (``conftest.assert_matches_reference`` through :func:`_close32`): the largest
#: effect is >= 1000x the bound, and at least MIN_CELLS cells move by 100x it (fewest observed:
#: 4 of 5 paths, GPT-NeoX ``q``; smallest largest effect 2.1e-3, GPT-2 ``q``).
MIN_CELLS = 3

CLEAN = [5, 6, 7, 8, 9, 10, 11, 12]
CORRUPTED = [5, 6, 7, 20, 9, 10, 21, 12]
CORRECT, INCORRECT = 3, 4


def _close32(got, expected, unpatched, what: str) -> None:
    """``conftest.assert_matches_reference`` with the bound ``REL32 * max(1, max |expected|)``
    (float32 rounding of the values) expressed relative to the largest effect ``max |expected
    - unpatched|``, which must be >= 1000x the bound; at least :data:`MIN_CELLS` cells move by
    100x the bound."""
    expected = torch.as_tensor(expected, dtype=F64)
    bound = REL32 * max(1.0, float(expected.abs().max()))
    scale = float((expected - torch.as_tensor(unpatched, dtype=F64)).abs().max())
    assert scale >= 1000 * bound, f"{what}: the largest effect {scale:.3g} is < 1000x {bound:.3g}"
    assert_matches_reference(got, expected, unpatched, rtol=bound / scale, min_cells=MIN_CELLS,
                             what=what)


@pytest.fixture(scope="module", params=["llama", "gpt2", "gemma3_text", "gpt_neox_parallel"])
def gqa64(request):
    """Float64 3-layer models with 4 heads: the token-id LLaMA of the path-patching tests
    (2 key/value heads), and the tiny GPT-2 (fused ``c_attn``), Gemma 3 (sandwich norms) and
    GPT-NeoX (parallel residual), prompts given as token ids."""
    if request.param == "llama":
        return id_llama(n_layers=3, vocab_size=32, seed=1, dtype=F64, num_key_value_heads=2,
                        initializer_range=0.3)
    return InterpretableModel(tiny_hf_model(request.param).double(), tokenizer=tiny_tokenizer())


def _ld(logits: torch.Tensor, answers: tuple[int, int] = (CORRECT, INCORRECT)) -> float:
    return float(logits[answers[0]].double() - logits[answers[1]].double())


def _answers(model) -> tuple[int, int]:
    """The token-id LLaMA's answers; for the other families the tokens the corruption moves
    most (up, down), so that the normalisation divides by a large clean-corrupted gap (a small
    one multiplies the float32 rounding of the metric values)."""
    if model.adapter.name == "llama":
        return CORRECT, INCORRECT
    shift = (model.trace([CLEAN]).run().last_logits[0]
             - model.trace([CORRUPTED]).run().last_logits[0])
    return int(shift.argmax()), int(shift.argmin())


def brute_force_path(model, base, source, sender, receiver, kind, freeze,
                     answers=(CORRECT, INCORRECT)) -> float:
    """Path patching with plain traces: pass 1 freezes every head output (and every MLP output
    with ``freeze="all"``) at its base value except the sender's, taken from the source run,
    and reads the receiver's input; pass 2 patches only that input."""
    n = model.n_layers
    names = [f"blocks.{layer}.{k}" for layer in range(n) for k in ("attn.z", "mlp")]
    base_cache = model.trace([base], cache=names).run().cache
    source_cache = model.trace([source], cache=names).run().cache
    layer_s, head_s = sender
    frozen = {}
    for layer in range(n):
        z = base_cache[f"blocks.{layer}.attn.z"].clone()
        mlp = base_cache[f"blocks.{layer}.mlp"].clone()
        if layer == layer_s and head_s is not None:
            z[:, :, head_s] = source_cache[f"blocks.{layer}.attn.z"][:, :, head_s]
        if layer == layer_s and head_s is None:
            mlp = source_cache[f"blocks.{layer}.mlp"].clone()
        frozen[f"blocks.{layer}.attn.z"] = iv.replace_with(z)
        if freeze == "all" or (layer == layer_s and head_s is None):
            frozen[f"blocks.{layer}.mlp"] = iv.replace_with(mlp)
    base_ld = _ld(model.trace([base]).run().last_logits[0], answers)
    source_ld = _ld(model.trace([source]).run().last_logits[0], answers)
    layer_r, head_r = receiver
    name = f"blocks.{layer_r}.attn.{kind}"
    value = model.trace([base], interventions=frozen, cache=[name]).run().cache[name]
    unit = head_r if kind == "q" else head_r // (model.n_heads // model.n_kv_heads)
    patch = {name: iv.replace_with(value[:, :, unit : unit + 1], heads=[unit])}
    patched_ld = _ld(model.trace([base], interventions=patch).run().last_logits[0], answers)
    return (patched_ld - base_ld) / (source_ld - base_ld)


@pytest.mark.parametrize("freeze", ["heads", "all"])
@pytest.mark.parametrize("kind", ["q", "k", "v"])
def test_float64_path_patching_equals_brute_force(gqa64, freeze, kind, one_thread):
    paths = [((0, 1), (2, 3)), ((0, 2), (1, 0)), ((1, 0), (2, 1)), ((0, None), (2, 2)),
             ((1, None), (2, 0))]
    got, expected = [], []
    answers = _answers(gqa64)
    for sender, receiver in paths:
        expected.append(brute_force_path(gqa64, CLEAN, CORRUPTED, sender, receiver, kind, freeze,
                                         answers))
        got.append(path_patching(gqa64, [CLEAN], [CORRUPTED], senders=[sender],
                                 receivers=[receiver], receiver_input=kind, freeze=freeze,
                                 correct=answers[0], incorrect=answers[1]).effect_matrix[0])
    _close32(torch.stack(got), expected, 0.0, f"{gqa64.adapter.name} path {kind} {freeze}")


def _restored_p(model, ids, span, noise, answer, restore) -> float:
    """The answer's probability averaged over noise rows, from one plain trace with the
    subject's embeddings noised and ``{site: position}`` restored to the clean run's value."""
    full = torch.zeros(noise.shape[0], len(ids), model.d_model, dtype=F64)
    full[:, span[0] : span[1]] = noise.to(F64)
    interventions: dict = {"embed": iv.add(full)}
    clean = model.trace([ids], cache=list(restore)).run().cache
    for name, p in restore.items():
        interventions[name] = iv.replace_with(clean[name][:, p : p + 1], positions=[p])
    logits = model.trace([ids] * noise.shape[0], interventions=interventions).run().last_logits
    return float(torch.softmax(logits.double(), -1)[:, answer].mean())


def test_float64_causal_tracing_equals_plain_traces(one_thread):
    model = id_llama(n_layers=3, vocab_size=32, seed=0, dtype=F64, num_key_value_heads=2,
                     initializer_range=0.3)
    ids = [5, 6, 7, 8, 9, 10, 11]
    result = causal_tracing(model, "t5 t6 t7 t8 t9 t10 t11", "t6 t7", samples=3,
                            components=("resid_pre", "resid_post", "mlp", "attn"), window=1,
                            position_groups=False)
    answer, p_corr = result.answers[0], float(result.p_corrupted[0])
    for kind in ("resid_pre", "resid_post", "mlp", "attn"):
        effect = result[kind].effect_matrix
        expected = torch.tensor(
            [[_restored_p(model, ids, (1, 3), result.noise[0], answer,
                          {f"blocks.{layer}.{kind}": p}) - p_corr for p in range(7)]
             for layer in range(3)], dtype=F64)
        # IE values: differences of probabilities (0 is the corrupted run)
        _close32(effect, expected, 0.0, f"causal tracing {kind}")


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3_text", "gpt_neox_parallel"])
def test_float64_sae_patching_fast_equals_naive(family, one_thread):
    model = InterpretableModel(tiny_hf_model(family).double(), tokenizer=tiny_tokenizer())
    d_in = model.d_model
    sae = SparseAutoencoder(d_in, 64, "standard", hook_name="blocks.1.hook_resid_post", seed=1,
                            dtype=F64)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(64, generator=gen, dtype=F64) * 0.3)
        sae.b_dec.copy_(torch.randn(d_in, generator=gen, dtype=F64) * 0.1)
    kw = dict(correct=5, incorrect=6, normalize=False)
    clean, corrupted = "abcdefghijkl", "abcdeXghijkl"
    fast = sae_patching(model, sae, clean, corrupted, **kw).effect_matrix
    naive = sae_patching(model, sae, clean, corrupted, engine="naive", **kw).effect_matrix
    base = sae_patching(model, sae, clean, corrupted, features=[0], **kw).corrupted_metric
    _close32(fast, naive, base, f"{family} sae patching")

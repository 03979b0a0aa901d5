"""Every metric against its formula written out by hand from the docstrings of
:mod:`causalpatch.metrics` (plain float64 torch: ``exp``, ``log``, sums; no ``softmax``,
``log_softmax`` or ``cosine_similarity``), on random logits; then the same formulas, applied to
logits of a hand-patched Hugging Face run (plain hooks on ``conftest.REFERENCE`` paths), against
``activation_patching``'s normalised effect for every metric.

Conventions (metrics docstring): scores (``logit_diff``, ``logit``, ``prob``, ``logprob``) are
about the answer tokens; distances (``l2``, ``mse``, ``cosine``, ``kl``, ``ce_diff``) are measured
from the *source* run's logits (0 at the source).  ``effect = (patched - base) / (source -
base)``; denoising: base = corrupted run, source = clean run.
"""

from __future__ import annotations

import pytest
import torch
from conftest import REFERENCE, assert_matches_reference, capture_modules, tiny_hf_model, \
    tiny_tokenizer

from causalpatch import InterpretableModel, activation_patching
from causalpatch.metrics import METRICS, MetricInputs

#: float32 metric values against float64 hand formulas: relative to max(1, |value|).
REL = 1e-5
#: effects of a float32 tiny model, computed by causalpatch's engine vs one hand-hooked HF run,
#: relative to the effect (``conftest.assert_matches_reference``): float32 logits agree to ~1e-6
#: (other batch shapes); divided by a clean-corrupted gap of order 0.1-10. Largest ratio
#: observed 2.8e-5 (``logit``, denoising: 8.8e-7 on an effect of 0.031); 0 to 1e-5 elsewhere.
TOL_EFFECT = 1e-4


def _log_softmax(x: torch.Tensor) -> torch.Tensor:
    m = x.max(dim=-1, keepdim=True).values
    return x - m - (x - m).exp().sum(dim=-1, keepdim=True).log()


def hand(name: str, x: torch.Tensor, target: torch.Tensor, correct: torch.Tensor,
         incorrect: torch.Tensor) -> torch.Tensor:
    """The metric's formula, per row, in float64."""
    x, t = x.double(), target.double()
    rows = torch.arange(x.shape[0])
    if name == "logit_diff":   # logit[correct] - logit[incorrect]
        return x[rows, correct] - x[rows, incorrect]
    if name == "logit":        # logit of the correct token
        return x[rows, correct]
    if name == "prob":         # exp(x_c) / sum exp(x)
        m = x.max(dim=-1).values
        return (x[rows, correct] - m).exp() / (x - m[:, None]).exp().sum(dim=-1)
    if name == "logprob":      # log of the above
        return _log_softmax(x)[rows, correct]
    if name == "ce_diff":      # CE(patched) - CE(source) of the correct token, nats
        return -_log_softmax(x)[rows, correct] + _log_softmax(t)[rows, correct]
    if name == "l2":           # Euclidean distance to the source logits
        return ((x - t) ** 2).sum(dim=-1).sqrt()
    if name == "mse":          # mean squared difference
        return ((x - t) ** 2).sum(dim=-1) / x.shape[-1]
    if name == "cosine":       # 1 - <x, t> / (|x| |t|)
        return 1 - (x * t).sum(-1) / ((x * x).sum(-1).sqrt() * (t * t).sum(-1).sqrt())
    if name == "kl":           # KL(source || patched) = sum p_t (log p_t - log p_x)
        lt, lx = _log_softmax(t), _log_softmax(x)
        return (lt.exp() * (lt - lx)).sum(dim=-1)
    raise KeyError(name)


NAMES = ["logit_diff", "logit", "prob", "logprob", "ce_diff", "l2", "mse", "cosine", "kl"]


def test_every_registered_metric_has_a_hand_formula():
    assert sorted(METRICS) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("seed", range(4))
def test_metric_equals_hand_formula_on_random_logits(name, seed):
    gen = torch.Generator().manual_seed(seed)
    batch, vocab = 6, 50 + 37 * seed
    x = torch.randn(batch, vocab, generator=gen) * (1 + 3 * seed)
    t = x + torch.randn(batch, vocab, generator=gen) * (0.5 + seed)
    correct = torch.randint(vocab, (batch,), generator=gen)
    incorrect = torch.randint(vocab, (batch,), generator=gen)
    got = METRICS[name](x, MetricInputs(t, correct, incorrect))
    expected = hand(name, x, t, correct, incorrect)
    assert got.dtype == torch.float32 and got.shape == (batch,)
    scale = max(1.0, expected.abs().max().item())
    assert (got.double() - expected).abs().max().item() <= REL * scale
    # distances are 0 at the source run
    if METRICS[name].kind == "distance":
        at_source = METRICS[name](t, MetricInputs(t, correct, incorrect))
        assert at_source.abs().max().item() <= REL * scale
        assert expected.abs().min().item() > 1e-3  # and not 0 elsewhere: non-vacuous


@pytest.fixture(scope="module")
def llama():
    hf = tiny_hf_model("llama")
    return hf, InterpretableModel(hf, tokenizer=tiny_tokenizer())


CLEAN, CORRUPTED = "abcdefghijkl", "abcdeXghijkl"


def _last_logits(hf, text: str, hook=None) -> torch.Tensor:
    ids = torch.tensor([tiny_tokenizer()(text)["input_ids"]])
    handle = None
    if hook is not None:
        handle = hf.get_submodule(hook[0]).register_forward_hook(hook[1])
    try:
        with torch.no_grad():
            return hf(input_ids=ids, use_cache=False).logits[:, -1]
    finally:
        if handle is not None:
            handle.remove()


@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("name", NAMES)
def test_api_effect_equals_hand_metric_of_a_hand_patched_run(llama, name, direction,
                                                            one_thread):
    """Patch layer 1's MLP output (every position) by hand; the effect from the hand formula
    equals ``activation_patching(component="mlp", layers=[1], metric=name)``."""
    hf, model = llama
    base, source = (CORRUPTED, CLEAN) if direction == "denoise" else (CLEAN, CORRUPTED)
    path = REFERENCE["llama"].sites["mlp"][0].format(L=1)
    ids = torch.tensor([tiny_tokenizer()(source)["input_ids"]])
    src_mlp = capture_modules(hf, ids, {"m": (path, "out")})["m"]
    patched = _last_logits(hf, base, (path, lambda mod, args, out: src_mlp.clone()))
    base_logits, source_logits = _last_logits(hf, base), _last_logits(hf, source)
    correct, incorrect = torch.tensor([5]), torch.tensor([6])
    value = {k: hand(name, v, source_logits, correct, incorrect).item()
             for k, v in (("patched", patched), ("base", base_logits), ("source", source_logits))}
    expected = (value["patched"] - value["base"]) / (value["source"] - value["base"])
    assert abs(value["source"] - value["base"]) > 1e-3
    result = activation_patching(model, CLEAN, CORRUPTED, component="mlp", layers=[1],
                                 metric=name, correct=5, incorrect=6, direction=direction)
    # one normalised effect (0 is the base run): relative to the effect itself
    assert_matches_reference(result.effect_matrix, [expected], 0.0, rtol=TOL_EFFECT, min_cells=1,
                             what=f"{name} {direction}")
    assert abs(expected) > 1e-2 and abs(expected - 1) > 1e-2  # neither nothing nor everything

"""The bad-input matrix: every case raises a specific error naming the argument and what was
expected, and afterwards the model has exactly the hooks it had (ours gone, the user's intact)
and gives the same logits as before."""

from __future__ import annotations

import types

import pytest
import torch

import causalpatch.interventions as iv
from causalpatch import InterpretableModel, activation_patching
from causalpatch.datasets import IOIDataset, PatchingDataset
from causalpatch.errors import (CausalPatchError, InvalidArgumentError, InvalidTypeError,
                                ModelNotFoundError, NormalizationError, OutOfRangeError,
                                ShapeMismatchError, UnknownComponentError,
                                UnsupportedArchitectureError)
from causalpatch.metrics import get_metric, normalize

PROMPT = "The Eiffel Tower is in the city of"  # 9 tokens
CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"
IOI = dict(correct=" Mary", incorrect=" John")


def sweep(m, **changes):
    kwargs = dict(clean=CLEAN, corrupted=CORRUPTED, component="resid_post", **IOI)
    kwargs.update(changes)
    return activation_patching(m, **kwargs)


def trace(m, prompts=PROMPT, **kw):
    return m.trace(prompts, **kw).run()


def _fake_unsupported(m):
    fake = types.SimpleNamespace(config=types.SimpleNamespace(model_type="mamba"))
    model = torch.nn.Module()
    model.config = fake.config
    return InterpretableModel(model, tokenizer=m.tokenizer)


def _bad_function(act):
    return act[..., :3]


CASES = [
    # loading
    ("alias-path", lambda m: InterpretableModel("./no/such/model"), ModelNotFoundError, "does not exist"),
    ("empty-name", lambda m: InterpretableModel(""), InvalidArgumentError, "non-empty"),
    ("model-type", lambda m: InterpretableModel(123), InvalidTypeError, "model must be"),
    ("no-tokenizer", lambda m: InterpretableModel(m.hf_model), InvalidArgumentError, "tokenizer is required"),
    ("missing-gguf", lambda m: InterpretableModel("/tmp/none.gguf"), ModelNotFoundError, "GGUF file"),
    ("unsupported-arch", _fake_unsupported, UnsupportedArchitectureError, "Supported model types"),
    # names
    ("unknown-name", lambda m: m.site("blocks.3.atn"), UnknownComponentError, "Did you mean"),
    ("layer-range", lambda m: m.site("blocks.30.mlp"), OutOfRangeError, "layer must be in"),
    ("empty-component", lambda m: m.site(""), UnknownComponentError, "non-empty"),
    ("short-name-range", lambda m: m.site("layers.99.mlp"), OutOfRangeError, "30 layers"),
    # trace and interventions
    ("value-shape", lambda m: trace(m, interventions={"blocks.3.mlp": iv.replace_with(torch.zeros(7))}),
     ShapeMismatchError, "(1, 9, 576)"),
    ("not-callable", lambda m: trace(m, interventions={"blocks.3.mlp": 5}), InvalidTypeError, "callable"),
    ("position-range", lambda m: trace(m, interventions={"blocks.3.mlp": iv.zero(positions=[20])}),
     OutOfRangeError, "positions must be in"),
    ("head-range", lambda m: trace(m, interventions={"blocks.3.attn.z": iv.zero(heads=[9])}),
     OutOfRangeError, "heads must be in"),
    ("heads-on-mlp", lambda m: trace(m, interventions={"blocks.3.mlp": iv.zero(heads=[0])}),
     InvalidArgumentError, "no head axis"),
    ("empty-prompt", lambda m: trace(m, ""), InvalidArgumentError, "empty"),
    ("no-prompts", lambda m: trace(m, []), InvalidArgumentError, "at least one prompt"),
    ("prompt-type", lambda m: trace(m, 3.5), InvalidTypeError, "prompts must be"),
    ("interventions-type", lambda m: trace(m, interventions=[iv.zero()]), InvalidTypeError, "dict"),
    ("token-range", lambda m: trace(m, [[1, 2, 10**6]]), InvalidArgumentError, "vocabulary"),
    ("add-shape", lambda m: trace(m, interventions={"blocks.3.mlp": iv.add(torch.ones(5))}),
     ShapeMismatchError, "does not broadcast"),
    ("positions-type", lambda m: iv.zero(positions="abc"), InvalidTypeError, "positions must"),
    ("function-shape", lambda m: trace(m, interventions={"blocks.3.mlp": _bad_function}),
     ShapeMismatchError, "expected a tensor of shape"),
    ("multi-token", lambda m: m.to_single_token(" Eiffel"), InvalidArgumentError, "2 tokens"),
    ("token-id-range", lambda m: m.to_single_token(10**6), InvalidArgumentError, "vocabulary"),
    # sweeps
    ("lengths", lambda m: sweep(m, corrupted="When Mary and John went to the big store, Mary gave a drink to"),
     InvalidArgumentError, "different token lengths"),
    ("metric-name", lambda m: sweep(m, metric="accuracy"), InvalidArgumentError, "unknown metric"),
    ("answers-missing", lambda m: sweep(m, correct=None, incorrect=None, metric="prob"), InvalidArgumentError, "needs correct"),
    ("answer-multi-token", lambda m: sweep(m, correct=" Eiffel"), InvalidArgumentError, "correct"),
    ("sweep-position-range", lambda m: sweep(m, positions=[14]), OutOfRangeError, "positions must be in"),
    ("by-position-repeat", lambda m: sweep(m, positions=[3, -11], by_position=True),
     InvalidArgumentError, "repeat"),
    ("direction", lambda m: sweep(m, direction="sideways"), InvalidArgumentError, "'denoise'"),
    ("layers-range", lambda m: sweep(m, layers=[30]), OutOfRangeError, "layers must be in"),
    ("heads-range", lambda m: sweep(m, component="attn_head", heads=[9]), OutOfRangeError, "heads must be in"),
    ("batch-size", lambda m: sweep(m, batch_size=0), InvalidArgumentError, "batch_size"),
    ("component", lambda m: sweep(m, component="attention_heads"), UnknownComponentError, "Did you mean: attn_head"),
    ("heads-without-heads", lambda m: sweep(m, component="mlp", heads=[0]), InvalidArgumentError, "heads"),
    ("engine", lambda m: sweep(m, engine="quick"), InvalidArgumentError, "'naive'"),
    ("neuron-range", lambda m: sweep(m, component="mlp_neuron", neurons=[5000]), OutOfRangeError, "d_mlp"),
    ("empty-layers", lambda m: sweep(m, layers=[]), InvalidArgumentError, "layers is empty"),
    ("metric-kwargs", lambda m: sweep(m, metric_kwargs={"answer": 1}), InvalidArgumentError, "metric_kwargs"),
    ("answer-count", lambda m: sweep(m, correct=[" Mary", " John"]), InvalidArgumentError, "answers for 1"),
    ("corrupted-missing", lambda m: activation_patching(m, CLEAN), InvalidArgumentError, "corrupted"),
    ("no-gap", lambda m: sweep(m, corrupted=CLEAN, layers=[3]), NormalizationError, "normalize=False"),
    # metrics
    ("metric-type", lambda m: get_metric(42), InvalidTypeError, "metric must be"),
    ("normalize-gap", lambda m: normalize(torch.ones(1), 1.0, 1.0), NormalizationError, "source - base"),
    # datasets
    ("dataset-empty", lambda m: PatchingDataset([], [], [], []), InvalidArgumentError, "no pairs"),
    ("dataset-n", lambda m: IOIDataset(m, n=0), InvalidArgumentError, "n must be"),
    ("dataset-corruption", lambda m: IOIDataset(m, n=2, corruption="shuffle"), InvalidArgumentError, "corruption"),
    ("dataset-names", lambda m: IOIDataset(m, n=2, names=["Mary", "Qqqqzzzt"]), InvalidArgumentError, "single tokens"),
    ("dataset-sweep-empty", lambda m: activation_patching(m, types.SimpleNamespace(
        clean=[], corrupted=[], correct=[], incorrect=[])), InvalidArgumentError, "no pairs"),
]


@pytest.fixture(scope="module")
def guarded(smollm2):
    """The model with a hook of the user's own, and its logits before any bad input."""
    calls: list[int] = []
    handle = smollm2.hf_model.get_submodule("model.layers.3.mlp").register_forward_hook(
        lambda module, args, out: calls.append(1))
    with torch.no_grad():
        ids = smollm2.to_tokens(PROMPT)
        reference = smollm2.hf_model(input_ids=ids).logits.clone()
    yield smollm2, calls, ids, reference
    handle.remove()


def test_the_matrix_has_at_least_forty_distinct_cases():
    assert len({name for name, *_ in CASES}) == len(CASES) >= 40


@pytest.mark.parametrize("name,call,error,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_cleanly(guarded, name, call, error, fragment):
    model, calls, ids, reference = guarded
    hooks_before = model.hook_snapshot()
    with pytest.raises(error) as info:
        call(model)
    assert isinstance(info.value, CausalPatchError)
    assert fragment in str(info.value), str(info.value)
    assert model.hook_snapshot() == hooks_before  # ours gone, the user's still there
    n = len(calls)
    with torch.no_grad():
        after = model.hf_model(input_ids=ids).logits
    assert len(calls) == n + 1  # the user's hook still fires
    assert torch.equal(after, reference)

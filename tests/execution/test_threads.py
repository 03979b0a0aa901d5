"""``threads=``, the run option that sets torch's CPU threads for one method call: applied
while the method computes (seen from inside the run), restored afterwards on every exit path
(normal return, an exception, Ctrl-C), refused before any forward pass when invalid, and
without effect on the numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import causalpatch as cp
from causalpatch.errors import InvalidArgumentError, InvalidTypeError
from causalpatch.methods.ablation import ablate
from causalpatch.methods.attribution import attribution_patching
from causalpatch.methods.causal_tracing import causal_tracing
from causalpatch.methods.path_patching import path_patching

CLEAN = ["When Mary and John went to the store, John gave a drink to"]
CORRUPTED = ["When Mary and John went to the store, Mary gave a drink to"]
ANSWERS = dict(correct=" Mary", incorrect=" John")

def _edges(model: Any, indices: Any) -> list[tuple[str, str]]:
    graph = cp.EdgeGraph.of(model)
    return [graph.edge_names(i) for i in indices]


def _third_of_the_graph(model: Any) -> Any:
    graph = cp.EdgeGraph.of(model)
    return cp.Circuit.from_edges(graph, _edges(model, range(0, graph.n_edges, 3)))


CALLS: dict[str, Callable[..., Any]] = {
    "activation_patching": lambda m, **kw: cp.activation_patching(
        m, CLEAN, CORRUPTED, component="attn_head", **ANSWERS, **kw),
    "attribution_patching": lambda m, **kw: attribution_patching(
        m, CLEAN, CORRUPTED, component="attn_head", verify_top_k=2, **ANSWERS, **kw),
    "atp*": lambda m, **kw: attribution_patching(
        m, CLEAN, CORRUPTED, component="attn_head", method="atp*", verify="auto", top_k=2,
        **ANSWERS, **kw),
    "ablate": lambda m, **kw: ablate(m, CLEAN, component="mlp", kind="zero", **ANSWERS, **kw),
    "path_patching": lambda m, **kw: path_patching(m, CLEAN, CORRUPTED, **ANSWERS, **kw),
    "causal_tracing": lambda m, **kw: causal_tracing(
        m, CLEAN[0], " Mary", answer=" John", samples=2, window=1, components=("mlp",), **kw),
    "edge_attribution": lambda m, **kw: cp.edge_attribution(
        m, CLEAN, CORRUPTED, method="eap", **ANSWERS, **kw),
    "edge_attribution exact": lambda m, **kw: cp.edge_attribution(
        m, CLEAN, CORRUPTED, method="exact", edges=_edges(m, range(6)),
        **ANSWERS, **kw),
    "evaluate_circuit": lambda m, **kw: cp.evaluate_circuit(
        m, CLEAN, _third_of_the_graph(m),
        corrupted=CORRUPTED, **ANSWERS, **kw),
    "faithfulness_curve": lambda m, **kw: cp.faithfulness_curve(
        m, CLEAN, cp.edge_attribution(m, CLEAN, CORRUPTED, **ANSWERS), sizes=[2, 8],
        corrupted=CORRUPTED, random_baseline=False, **ANSWERS, **kw),
}


def _target(current: int) -> int:
    """A thread count different from ``current`` (so that applying it is visible)."""
    return 2 if current == 1 else 1


def _effect(result: Any) -> torch.Tensor:
    if hasattr(result, "per_position"):  # causal tracing
        return result["mlp"].effect_matrix
    for name in ("effect_matrix", "scores", "per_pair"):  # sweeps, edges, one circuit
        if hasattr(result, name):
            return torch.nan_to_num(getattr(result, name))
    return result.faithfulness  # a curve


@pytest.mark.parametrize("name", list(CALLS))
def test_threads_are_applied_during_the_run_and_restored_after(name, make_tiny_lm):
    model = make_tiny_lm("llama")
    call = CALLS[name]
    before = torch.get_num_threads()
    want = _target(before)
    seen: list[int] = []

    def progress(done: int, total: int) -> None:  # called from inside the run
        seen.append(torch.get_num_threads())

    default = call(model, progress=False)
    assert torch.get_num_threads() == before
    threaded = call(model, threads=want, progress=progress)
    assert seen and set(seen) == {want}, seen
    assert torch.get_num_threads() == before
    # the numbers do not depend on the thread count: observed bitwise equal (0.0) for the six
    # sweep calls with 1 and 2 threads (the edge and circuit calls were added under the same bound); 1e-6 relative leaves room for a BLAS that splits a
    # reduction across threads (effects are of order 1, causal tracing's of order 1e-3)
    ref = _effect(default)
    assert (_effect(threaded) - ref).abs().max() <= 1e-6 * ref.abs().max()


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_threads_are_restored_when_the_run_fails(error, make_tiny_lm):
    model = make_tiny_lm("llama")
    before = torch.get_num_threads()
    want = _target(before)
    seen: list[int] = []

    def progress(done: int, total: int) -> None:
        seen.append(torch.get_num_threads())
        raise error("stop")

    with pytest.raises(error):
        cp.activation_patching(model, CLEAN, CORRUPTED, component="attn_head", **ANSWERS,
                               threads=want, progress=progress)
    assert seen == [want]
    assert torch.get_num_threads() == before
    assert model.hook_snapshot() == make_tiny_lm("llama").hook_snapshot()


@pytest.mark.parametrize("bad,error", [(0, InvalidArgumentError), (-2, InvalidArgumentError),
                                       (1.5, InvalidTypeError), ("2", InvalidTypeError),
                                       (True, InvalidTypeError)])
def test_bad_threads_are_refused_before_any_forward(bad, error, make_tiny_lm):
    model = make_tiny_lm("llama")
    calls: list[int] = []
    handle = model.hf_model.register_forward_pre_hook(lambda m, a: calls.append(1))
    before = torch.get_num_threads()
    try:
        with pytest.raises(error, match="threads"):
            attribution_patching(model, CLEAN, CORRUPTED, component="attn_head", threads=bad,
                                 **ANSWERS)
    finally:
        handle.remove()
    assert calls == []
    assert torch.get_num_threads() == before


# -- the calls with no progress callback: the logit lens, DLA and SAE training ------------------
def _train_sae(model: Any, **kw: Any) -> Any:
    from causalpatch.sae.train import train_sae, training_texts

    docs = list(training_texts(("known_facts",)))[:300]
    return train_sae(model, "blocks.1.resid_post", 32, k=4, train_tokens=1000, eval_tokens=200,
                     context=32, epochs=1, docs=docs, **kw)


UNPROGRESSED: dict[str, Callable[..., Any]] = {
    "logit_lens": lambda m, **kw: cp.logit_lens(m, CLEAN[0], answer=" Mary", **kw),
    "direct_logit_attribution": lambda m, **kw: cp.direct_logit_attribution(
        m, CLEAN, "head", **ANSWERS, **kw),
    "train_sae": _train_sae,
}


def _numbers(result: Any) -> torch.Tensor:
    if isinstance(result, tuple):  # train_sae: (sae, report)
        return result[0].W_enc.detach()
    return result.answer_prob if hasattr(result, "answer_prob") else result.values


@pytest.mark.parametrize("name", list(UNPROGRESSED))
def test_threads_of_the_lens_dla_and_sae_training(name, make_tiny_lm):
    """Seen from inside every forward pass (a plain PyTorch pre-hook on the model), restored
    afterwards, refused before any forward when invalid, and without effect on the numbers."""
    model = make_tiny_lm("llama")
    call = UNPROGRESSED[name]
    before = torch.get_num_threads()
    want = _target(before)
    seen: list[int] = []
    handle = model.hf_model.register_forward_pre_hook(
        lambda m, a: seen.append(torch.get_num_threads()))
    try:
        with pytest.raises(InvalidArgumentError, match="threads"):
            call(model, threads=0)
        assert seen == []
        default = call(model)
        assert seen and set(seen) == {before}
        seen.clear()
        threaded = call(model, threads=want)
    finally:
        handle.remove()
    assert seen and set(seen) == {want}, seen
    assert torch.get_num_threads() == before
    # observed bitwise equal (0.0) with 1 and 2 threads; 1e-6 relative as above
    ref = _numbers(default)
    assert (_numbers(threaded) - ref).abs().max() <= 1e-6 * ref.abs().max()

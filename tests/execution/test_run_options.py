"""One set of run options for every method, and a checkpoint every dataset method resumes from.

Every method that evaluates pairs or prompts takes ``progress``, ``executor``, ``batch_size``,
``memory_mb``, ``checkpoint`` and ``threads`` with the same defaults
(:mod:`causalpatch.options`); a run killed after its first group resumes from the checkpoint to
exactly the numbers of an uninterrupted run, without evaluating the finished group again.
"""

from __future__ import annotations

import inspect
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
from causalpatch.methods.sae_patching import sae_attribution, sae_patching
from causalpatch.options import DEFAULT_MEMORY_MB, RunOptions

METHODS = [cp.activation_patching, attribution_patching, ablate, path_patching, causal_tracing,
           sae_patching, sae_attribution]
DEFAULTS = {"progress": None, "executor": None, "batch_size": None,
            "memory_mb": DEFAULT_MEMORY_MB, "checkpoint": None, "threads": None}

# two pairs of different token lengths: two groups
CLEAN = ["When Mary and John went to the store, John gave a drink to",
         "Mary and John went to the store, John gave a drink to"]
CORRUPTED = ["When Mary and John went to the store, Mary gave a drink to",
             "Mary and John went to the store, Mary gave a drink to"]
ANSWERS = dict(correct=[" Mary", " Mary"], incorrect=[" John", " John"])


@pytest.mark.parametrize("method", METHODS, ids=lambda f: f.__name__)
def test_every_method_takes_the_same_run_options(method):
    params = inspect.signature(method).parameters
    for name, default in DEFAULTS.items():
        assert name in params, f"{method.__name__} has no {name}="
        assert params[name].default == default, (method.__name__, name)
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, (method.__name__, name)


def test_bad_run_options_are_refused_before_any_forward(tiny_lm):
    with pytest.raises(InvalidArgumentError, match="memory_mb"):
        RunOptions.make(tiny_lm, memory_mb=0)
    with pytest.raises(InvalidTypeError, match="progress"):
        RunOptions.make(tiny_lm, progress="yes")
    with pytest.raises(InvalidTypeError, match="checkpoint"):
        RunOptions.make(tiny_lm, checkpoint=3)
    with pytest.raises(InvalidArgumentError, match="batch_size"):
        RunOptions.make(tiny_lm, batch_size=0)
    with pytest.raises(InvalidArgumentError, match="threads"):
        RunOptions.make(tiny_lm, threads=0)
    with pytest.raises(InvalidTypeError, match="threads"):
        RunOptions.make(tiny_lm, threads=2.0)
    with pytest.raises(InvalidTypeError, match="threads"):
        RunOptions.make(tiny_lm, threads=True)


def _killed_after_first_group(after: int) -> Callable[[int, int], None]:
    """A progress callback that interrupts the run once more than ``after`` units are done."""

    def progress(done: int, total: int) -> None:
        if done > after:
            raise KeyboardInterrupt

    return progress


def _first_report() -> tuple[list[int], Callable[[int, int], None]]:
    seen: list[int] = []
    return seen, lambda done, total: seen.append(done)


CASES: dict[str, tuple[Callable[..., Any], dict[str, Any], int]] = {
    # name: (call, kwargs, progress units of the first group)
    "activation_patching": (lambda m, **kw: cp.activation_patching(
        m, CLEAN, CORRUPTED, component="attn_head", **ANSWERS, **kw), {}, 0),
    "attribution_patching": (lambda m, **kw: attribution_patching(
        m, CLEAN, CORRUPTED, component="attn_head", **ANSWERS, **kw), {}, 0),
    "ablate": (lambda m, **kw: ablate(m, CLEAN, component="attn_head", kind="zero", **ANSWERS,
                                      **kw), {}, 0),
    "path_patching": (lambda m, **kw: path_patching(m, CLEAN, CORRUPTED, **ANSWERS, **kw), {},
                      0),
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_killed_dataset_run_resumes_from_its_checkpoint(name, tmp_path, make_tiny_lm):
    model = make_tiny_lm("llama")
    call, kwargs, _ = CASES[name]
    full = call(model, **kwargs, progress=False)
    n_cells = full.effect_matrix.numel()
    path = tmp_path / "run.ckpt.json"
    with pytest.raises(KeyboardInterrupt):
        call(model, **kwargs, checkpoint=str(path), progress=_killed_after_first_group(n_cells))
    assert path.exists()
    seen, report = _first_report()
    resumed = call(model, **kwargs, checkpoint=str(path), progress=report)
    assert seen and seen[0] == n_cells  # the first pair was restored whole, not evaluated
    assert torch.equal(resumed.effect_matrix, full.effect_matrix)
    assert resumed.clean_metric == full.clean_metric
    assert resumed.corrupted_metric == full.corrupted_metric
    assert model.hook_snapshot() == make_tiny_lm("llama").hook_snapshot()


def test_causal_tracing_resumes_without_tracing_finished_prompts(tmp_path, make_tiny_lm):
    model = make_tiny_lm("llama")
    prompts = [CLEAN[0], CLEAN[1], CORRUPTED[0]]
    kwargs = dict(samples=2, window=2, components=("mlp", "resid_post"))
    full = causal_tracing(model, prompts, " Mary", progress=False, **kwargs)
    path = tmp_path / "trace.ckpt.json"
    with pytest.raises(KeyboardInterrupt):  # prompts are counted: dies while tracing the 2nd
        causal_tracing(model, prompts, " Mary", checkpoint=str(path),
                       progress=_killed_after_first_group(1), **kwargs)
    seen, report = _first_report()
    resumed = causal_tracing(model, prompts, " Mary", checkpoint=str(path), progress=report,
                             **kwargs)
    assert seen[0] == 1  # the first prompt came from the checkpoint
    for kind in kwargs["components"]:
        assert torch.equal(resumed[kind].effect_matrix, full[kind].effect_matrix)
    assert torch.equal(resumed.p_clean, full.p_clean)
    for a, b in zip(resumed.per_position, full.per_position):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(a, b) for a, b in zip(resumed.noise, full.noise))

"""``causalpatch patch`` gives the same numbers as ``activation_patching`` with the same
arguments: the tiny LLaMA is saved as a local Hugging Face folder (``conftest.tiny_llama_dir``),
the CLI loads it by path (nothing monkeypatched) and writes ``result.json``; its effect matrix,
read as plain JSON, equals the API's on the same folder.

Both sides run the same code on the same float32 weights in one process, so they must agree
exactly (:data:`TOL` = 0); one case also starts the real console entry point in a subprocess,
where thread counts may differ (:data:`TOL_PROCESS`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT, assert_matches_reference
from typer.testing import CliRunner

import causalpatch.cli as cli
from causalpatch import InterpretableModel, activation_patching

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"
#: same process, same weights, same code path: equal
TOL = 0.0
#: another process (its own thread count): float32 rounding of tiny-model effects
TOL_PROCESS = 1e-5
runner = CliRunner()

CASES = [
    dict(component="resid_post"),  # by position by default for resid_*
    dict(component="attn_head", layers="0,2"),
    dict(component="attn_head_k", metric="prob"),
    dict(component="attn_head_q", heads="1,3", direction="noise"),
    dict(component="mlp", metric="kl", by_position=True),
    dict(component="resid_pre", metric="ce_diff", positions="9,-1", by_position=True),
    dict(component="attn", metric="logprob", direction="noise", by_position=False),
]


def _cli_args(folder, out, case) -> list[str]:
    args = ["patch", "--model", str(folder), "--clean", CLEAN, "--corrupted", CORRUPTED,
            "--correct", " Mary", "--incorrect", " John", "--out", str(out), "--quiet"]
    for key in ("component", "metric", "direction", "layers", "heads", "positions"):
        if key in case:
            args += [f"--{key}", case[key]]
    if "by_position" in case:
        args.append("--by-position" if case["by_position"] else "--no-by-position")
    return args


def _api(model, case) -> torch.Tensor:
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    kw = dict(component=case["component"], metric=case.get("metric", "logit_diff"),
              direction=case.get("direction", "denoise"),
              by_position=case.get("by_position", case["component"].startswith("resid")))
    for key in ("layers", "heads", "positions"):
        if key in case:
            kw[key] = ints(case[key])
    return activation_patching(model, CLEAN, CORRUPTED, correct=" Mary", incorrect=" John",
                               progress=False, **kw).effect_matrix


def _effects(out) -> torch.Tensor:
    data = json.loads((out / "result.json").read_text())
    return torch.tensor(data["result"]["effect_matrix"], dtype=torch.float64)


@pytest.fixture(scope="module")
def folder_model(tiny_llama_dir):
    return InterpretableModel(str(tiny_llama_dir))


@pytest.fixture
def plain_cli():
    cli.State.quiet = False
    cli.State.debug = False
    yield
    cli.State.quiet = False


@pytest.mark.parametrize("case", CASES, ids=[c["component"] for c in CASES])
def test_cli_result_equals_api(tiny_llama_dir, folder_model, case, tmp_path, plain_cli,
                               one_thread):
    out = tmp_path / "o"
    res = runner.invoke(cli.app, _cli_args(tiny_llama_dir, out, case))
    assert res.exit_code == 0, res.output
    got = _effects(out)
    expected = _api(folder_model, case).double()
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= TOL
    assert expected.abs().max().item() > 1e-2  # the sweep moved something


def test_console_entry_point_in_a_subprocess_equals_api(tiny_llama_dir, folder_model, tmp_path):
    case = dict(component="attn_head_v", metric="logit_diff", layers="1,2")
    out = tmp_path / "o"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "causalpatch.cli",
                           *_cli_args(tiny_llama_dir, out, case)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = _effects(out)
    expected = _api(folder_model, case).double()
    assert got.shape == expected.shape == (2, 2)  # 2 layers x 2 key/value heads
    assert_matches_reference(got, expected, 0.0, rtol=TOL_PROCESS, min_cells=4,
                             what="console entry point")


TRACE_PROMPT, TRACE_SUBJECT = "The Eiffel Tower is in the city of", "Eiffel Tower"


@pytest.mark.parametrize("settings", [
    dict(components="mlp,attn", window="2", samples="2", seed="0", noise="3.0"),
    dict(components="resid_post", window="1", samples="3", seed="4", noise="1.5"),
], ids=["windows", "resid_post"])
def test_cli_trace_equals_api(tiny_llama_dir, folder_model, settings, tmp_path, plain_cli,
                              one_thread):
    """``causalpatch trace --prompt`` writes one result per component; each equals
    ``causal_tracing`` with the same prompt, subject, answer, noise, samples, seed and window
    (same process, same code path: equal)."""
    from causalpatch import PatchingResult, causal_tracing

    out = tmp_path / "trace"
    args = ["trace", "--model", str(tiny_llama_dir), "--prompt", TRACE_PROMPT, "--subject",
            TRACE_SUBJECT, "--answer", " Paris", "--out", str(out), "--quiet"]
    for key, value in settings.items():
        args += [f"--{key}", value]
    res = runner.invoke(cli.app, args)
    assert res.exit_code == 0, res.output
    kinds = tuple(settings["components"].split(","))
    api = causal_tracing(folder_model, TRACE_PROMPT, TRACE_SUBJECT, answer=" Paris",
                         position_groups=False, components=kinds,
                         window=int(settings["window"]), samples=int(settings["samples"]),
                         seed=int(settings["seed"]), noise=float(settings["noise"]))
    n_tokens = len(folder_model.to_str_tokens(TRACE_PROMPT))
    for kind in kinds:  # one file per component, or result.json for one component
        name = f"{kind}_by_position.json" if len(kinds) > 1 else "result.json"
        got = PatchingResult.from_json(out / name).effect_matrix.double()
        expected = api[kind].effect_matrix.double()
        assert got.shape == expected.shape == (folder_model.n_layers, n_tokens)
        assert (got - expected).abs().max().item() <= TOL  # bitwise
        assert (expected.abs() > 1e-6).sum() >= 4, kind  # indirect effects, not all 0

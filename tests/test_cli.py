"""The command line: outputs, tables, JSON, one-line errors with exit code 2, help examples."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import causalpatch.cli as cli
from causalpatch.result import PatchingResult

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"
runner = CliRunner()


@pytest.fixture
def use_session_model(smollm2, monkeypatch):
    monkeypatch.setattr(cli, "_load", lambda model, dtype=None: smollm2)
    cli._State.quiet = False
    cli._State.debug = False


def test_patch_writes_result_heatmap_and_report(use_session_model, tmp_path):
    out = tmp_path / "ioi"
    res = runner.invoke(cli.app, ["patch", "--clean", CLEAN, "--corrupted", CORRUPTED,
                                  "--correct", " Mary", "--incorrect", " John",
                                  "--component", "attn_head", "--layers", "20,23,29",
                                  "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert {p.name for p in out.iterdir()} == {"result.json", "heatmap.png", "report.html"}
    result = PatchingResult.from_json(out / "result.json")
    assert result.effect_matrix.shape == (3, 9)
    assert "top 10 components" in res.output and "layer" in res.output


def test_patch_json_output_is_machine_readable(use_session_model, tmp_path):
    res = runner.invoke(cli.app, ["patch", "--clean", CLEAN, "--corrupted", CORRUPTED,
                                  "--correct", " Mary", "--incorrect", " John", "--by-position",
                                  "--layers", "0,29", "--direction", "noise", "--json",
                                  "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["results"][0]["shape"] == [2, 14]
    assert data["results"][0]["direction"] == "noise"


@pytest.mark.parametrize("args,fragment", [
    (["--component", "attn_heads"], "unknown component"),
    (["--correct", " Eiffel"], "2 tokens"),
    (["--layers", "1,x"], "comma-separated"),
    (["--direction", "up"], "direction"),
])
def test_user_errors_are_one_line_with_exit_code_2(use_session_model, tmp_path, args, fragment):
    base = ["patch", "--clean", CLEAN, "--corrupted", CORRUPTED, "--correct", " Mary",
            "--incorrect", " John", "--out", str(tmp_path)]
    res = runner.invoke(cli.app, base + args)
    assert res.exit_code == 2
    assert fragment in res.output and "Traceback" not in res.output
    assert res.output.strip().startswith("error:")


def test_debug_shows_the_traceback(use_session_model, tmp_path):
    res = runner.invoke(cli.app, ["--debug", "patch", "--clean", CLEAN, "--corrupted", "Hi",
                                  "--correct", " Mary", "--incorrect", " John",
                                  "--out", str(tmp_path)])
    assert res.exit_code == 2 and "Traceback" in res.output


def test_models_lists_aliases_and_adapters():
    res = runner.invoke(cli.app, ["models", "--json"])
    data = json.loads(res.stdout)
    assert any(a["alias"] == "smollm2" and a["installed"] for a in data["aliases"])
    assert {"llama", "gpt2", "gemma3", "qwen2", "qwen3", "gpt_neox"} <= {
        a["name"] for a in data["adapters"]}


def test_info_lists_components(use_session_model):
    res = runner.invoke(cli.app, ["info", "smollm2", "--json"])
    data = json.loads(res.stdout)
    assert data["n_layers"] == 30 and "blocks.L.attn.z" in data["components"]


@pytest.mark.parametrize("command", ["patch", "ioi", "trace", "models", "info"])
def test_every_command_help_shows_an_example(command):
    res = runner.invoke(cli.app, [command, "--help"])
    assert res.exit_code == 0 and "Example" in res.output and "causalpatch" in res.output


@pytest.fixture
def use_tiny_model(make_tiny_lm, monkeypatch, one_thread):
    tiny = make_tiny_lm("llama")
    monkeypatch.setattr(cli, "_load", lambda model, dtype=None: tiny)
    cli._State.quiet = False
    cli._State.debug = False
    return tiny


def test_trace_one_prompt_writes_json_png_and_report(use_tiny_model, tmp_path):
    out = tmp_path / "trace"
    res = runner.invoke(cli.app, ["trace", "--prompt", "The Eiffel Tower is in the city of",
                                  "--subject", "Eiffel Tower", "--answer", " Paris",
                                  "--samples", "2", "--components", "mlp,attn",
                                  "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert {p.name for p in out.iterdir()} == {
        "mlp_by_position.json", "mlp_by_position.png", "attn_by_position.json",
        "attn_by_position.png", "report.html"}
    result = PatchingResult.from_json(out / "mlp_by_position.json")
    n_tokens = len(use_tiny_model.to_str_tokens("The Eiffel Tower is in the city of"))
    assert result.method == "causal_tracing" and result.metric == "prob"
    assert result.effect_matrix.shape == (3, n_tokens)
    assert result.extra["answers"] == [use_tiny_model.to_single_token(" Paris")]
    assert "top 10 components" in res.output


@pytest.mark.parametrize("args,fragment", [
    (["--subject", "Eiffel Tower"], "either --prompt"),
    (["--prompt", "The Eiffel Tower is in the city of"], "--subject is required"),
    (["--prompt", "The Eiffel Tower is in the city of", "--subject", "Rome"], "not found"),
    (["--dataset", "ioi"], "unknown --dataset"),
])
def test_trace_user_errors(use_tiny_model, tmp_path, args, fragment):
    res = runner.invoke(cli.app, ["trace", *args, "--out", str(tmp_path)])
    assert res.exit_code == 2
    assert fragment in res.output and "Traceback" not in res.output


@pytest.mark.real
def test_trace_known_facts_dataset(use_session_model, tmp_path, one_thread):
    res = runner.invoke(cli.app, ["trace", "--dataset", "known_facts", "--n", "1",
                                  "--samples", "1", "--components", "attn", "--window", "10",
                                  "--json", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["results"][0]["shape"] == [30, 6]
    result = PatchingResult.from_json(tmp_path / "result.json")
    assert result.axes == ("layer", "group") and result.extra["n_prompts"] == 1
    assert {p.name for p in tmp_path.iterdir()} == {"result.json", "heatmap.png", "report.html"}

"""``causalpatch circuit`` on the tiny LLaMA saved to a folder: the files written and the JSON
numbers equal to the API's (``edge_attribution``, ``EdgeResult.circuit``,
``evaluate_circuit``) for the same arguments, the terminal table, and argument errors (exit 2)
before the weights load."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import causalpatch.cli as cli
from causalpatch import Circuit, InterpretableModel, edge_attribution, evaluate_circuit
from causalpatch.graph import EdgeResult
from causalpatch.methods.circuits import CircuitEvaluation

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"
runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    """The folder and the model loaded from it by the API."""
    return str(tiny_llama_dir), InterpretableModel(str(tiny_llama_dir))


@pytest.fixture(autouse=True)
def _state(one_thread):
    cli.State.reset()
    yield
    cli.State.reset()


def _args(folder: str, out, *more: str) -> list[str]:
    return ["circuit", "--model", folder, "--clean", CLEAN, "--corrupted", CORRUPTED,
            "--correct", " Mary", "--incorrect", " John", "--out", str(out), *more]


def test_circuit_json_equals_the_api(tiny, tmp_path):
    folder, model = tiny
    out = tmp_path / "c"
    res = runner.invoke(cli.app, _args(folder, out, "--edges", "40", "--top", "5", "--json"))
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    kw = dict(correct=" Mary", incorrect=" John")
    scores = edge_attribution(model, CLEAN, CORRUPTED, **kw)
    chosen = scores.circuit(40)
    api = evaluate_circuit(model, CLEAN, chosen, corrupted=CORRUPTED, **kw)
    assert [(r["src"], r["dst"]) for r in data["top"]] == [(s, d) for s, d, _ in scores.top(5)]
    assert data["circuit"]["faithfulness"] == pytest.approx(api.faithfulness, abs=1e-6)
    assert data["circuit"]["n_edges"] == chosen.n_edges <= 40
    assert {p.name for p in out.iterdir()} == {"edges.json", "circuit.json",
                                               "faithfulness.json", "report.html"}
    page = (out / "report.html").read_text()
    assert data["files"]["report"] == str(out / "report.html")
    assert f"faithfulness {api.faithfulness:+.3f} with {chosen.n_edges}" in page
    assert "id='edges-table-0'" in page and "id='edges-table-1'" in page
    assert Circuit.from_json(out / "circuit.json").edges == chosen.edges
    assert EdgeResult.from_json(out / "edges.json").top(5) == scores.top(5)
    saved = json.loads((out / "faithfulness.json").read_text())
    assert saved["faithfulness"] == pytest.approx(api.faithfulness, abs=1e-6)
    back = CircuitEvaluation.from_json(out / "faithfulness.json")
    assert (back.faithfulness, back.n_edges, back.connected) == (
        saved["faithfulness"], chosen.n_edges, api.connected)
    assert torch.equal(back.per_pair, api.per_pair)  # float32 both ways, written as floats

    # `causalpatch report` reads every file the command wrote (the folder) into one page
    page_out = tmp_path / "again.html"
    res = runner.invoke(cli.app, ["report", str(out), "--out", str(page_out)])
    assert res.exit_code == 0, res.output
    again = page_out.read_text()
    assert f"faithfulness {api.faithfulness:+.3f} with {chosen.n_edges}" in again
    assert "id='edges-table-0'" in again and "id='edges-table-1'" in again


def test_circuit_terminal_table(tiny, tmp_path):
    folder, _ = tiny
    res = runner.invoke(cli.app, _args(folder, tmp_path / "t", "--greedy", "--top", "3"))
    assert res.exit_code == 0, res.output
    assert "top 3 of" in res.output and "faithfulness" in res.output
    assert "greedy" in res.output and "wrote" in res.output


@pytest.mark.parametrize("more,fragment", [
    (["--method", "exact"], "--method"),
    (["--edges", "0"], "--edges must be at least 1"),
    (["--ig-steps", "0"], "--ig-steps"),
    (["--dataset", "ioi"], "not both"),
    (["--corrupted", "When Mary went"], "same length"),
])
def test_circuit_argument_errors_before_the_load(tiny, tmp_path, monkeypatch, more, fragment):
    folder, _ = tiny

    def no_load(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(cli.runtime, "load_model", no_load)
    res = runner.invoke(cli.app, [*_args(folder, tmp_path / "e"), *more])
    assert res.exit_code == 2, res.output
    assert fragment in res.output

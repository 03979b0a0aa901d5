"""``causalpatch lens`` and ``causalpatch dla`` on the tiny LLaMA saved to a folder: the files
written, the JSON numbers equal to the API's for the same arguments, argument errors (exit 2)
before the weights load, and ``--help`` without torch."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import causalpatch.cli as cli
from causalpatch import InterpretableModel, direct_logit_attribution, logit_lens
from causalpatch.methods.lens import LENS_STATS, UNITS, DLAResult, LensResult

PROMPT = "When Mary and John went to the store, John gave a drink to"
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


def _run(args: list[str]) -> dict:
    res = runner.invoke(cli.app, args)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_lens_json_equals_the_api(tiny, tmp_path):
    folder, model = tiny
    out = tmp_path / "lens"
    data = _run(["lens", "--model", folder, "--prompt", PROMPT, "--answer", " Mary",
                 "--positions", "-1,2", "--k", "3", "--json", "--out", str(out)])
    api = logit_lens(model, PROMPT, answer=" Mary", positions=[-1, 2], k=3)
    assert data["result"] == json.loads(api.to_json())
    assert {p.name for p in out.iterdir()} == {"result.json", "heatmap.png", "report.html"}
    saved = LensResult.from_json(out / "result.json")
    assert torch.equal(saved.answer_rank, api.answer_rank)
    assert data["files"]["result"] == str(out / "result.json")
    assert "<html" in (out / "report.html").read_text().lower()


def test_lens_terminal_summary_and_quiet(tiny, tmp_path):
    folder, _ = tiny
    res = runner.invoke(cli.app, ["lens", "--model", folder, "--prompt", PROMPT,
                                  "--out", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    assert "logit lens of" in res.output and "wrote" in res.output
    res = runner.invoke(cli.app, ["lens", "--model", folder, "--prompt", PROMPT, "--quiet",
                                  "--out", str(tmp_path / "b")])
    assert res.exit_code == 0 and res.stdout.strip() == ""
    assert (tmp_path / "b" / "result.json").exists()


@pytest.mark.parametrize("unit", ["component", "head"])
def test_dla_json_equals_the_api(tiny, tmp_path, unit):
    folder, model = tiny
    data = _run(["dla", "--model", folder, "--prompt", PROMPT, "--correct", " Mary",
                 "--incorrect", " John", "--unit", unit, "--json", "--out", str(tmp_path)])
    api = direct_logit_attribution(model, PROMPT, unit, correct=" Mary", incorrect=" John")
    assert data["result"] == json.loads(api.to_json())
    assert {p.name for p in tmp_path.iterdir()} == {"result.json", "heatmap.png", "report.html"}
    saved = DLAResult.from_json(tmp_path / "result.json")
    assert saved.parts == api.parts


def test_dla_terminal_summary(tiny, tmp_path):
    folder, _ = tiny
    res = runner.invoke(cli.app, ["dla", "--model", folder, "--prompt", PROMPT, "--correct",
                                  " Mary", "--position", "-2", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "direct logit attribution (component)" in res.output


@pytest.fixture
def no_weights(monkeypatch):
    def refuse(model, dtype=None):
        raise AssertionError("the weights were loaded before the argument error")

    monkeypatch.setattr(cli.runtime, "load_model", refuse)


@pytest.mark.parametrize("args,fragment", [
    (["lens", "--prompt", " "], "--prompt is empty"),
    (["lens", "--prompt", PROMPT, "--positions", "1,x"], "comma-separated"),
    (["lens", "--prompt", PROMPT, "--positions", "99"], "out of range"),
    (["lens", "--prompt", PROMPT, "--k", "0"], "--k must be at least 1"),
    (["lens", "--prompt", PROMPT, "--answer", "Mary"], "--answer ' Mary'"),
    (["lens", "--prompt", PROMPT, "--stat", "entropie"], "Did you mean 'entropy'"),
    (["lens", "--prompt", PROMPT, "--stat", "answer_rank"], "needs --answer"),
    (["dla", "--prompt", PROMPT], "--correct is required"),
    (["dla", "--prompt", PROMPT, "--dataset", "ioi"], "either --prompt"),
    (["dla", "--dataset", "ioi", "--correct", " Mary"], "own answers"),
    (["dla", "--dataset", "facts"], "unknown --dataset"),
    (["dla", "--prompt", PROMPT, "--correct", " Mary", "--unit", "heads"], "Did you mean"),
    (["dla", "--prompt", PROMPT, "--correct", " Mary", "--incorrect", " Mary"], "the same"),
    (["dla", "--prompt", PROMPT, "--correct", " Eiffel Tower"], "2 tokens"),
    (["dla", "--prompt", PROMPT, "--correct", " Mary", "--position", "-99"], "out of range"),
])
def test_argument_errors_exit_2_before_the_weights_load(tiny, tmp_path, no_weights, args,
                                                         fragment):
    folder, _ = tiny
    res = runner.invoke(cli.app, [*args, "--model", folder, "--out", str(tmp_path / "o")])
    assert res.exit_code == 2, res.output
    assert fragment in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o").exists()


def test_out_file_is_rejected_before_the_weights_load(tiny, tmp_path, no_weights):
    folder, _ = tiny
    (tmp_path / "f").write_text("x")
    res = runner.invoke(cli.app, ["lens", "--model", folder, "--prompt", PROMPT,
                                  "--out", str(tmp_path / "f")])
    assert res.exit_code == 2 and "is a file" in res.output


def test_the_mirrors_match_the_library():
    from causalpatch.cli.commands import dla, lens

    assert lens.LENS_STATS == LENS_STATS
    assert dla.DLA_UNITS == UNITS


@pytest.mark.parametrize("argv", [["lens", "--help"], ["dla", "--help"]])
def test_help_imports_no_torch(argv):
    from test_cli_startup import _fresh

    got = _fresh(f"""
        import json, sys
        from causalpatch.cli import app
        try:
            app({argv!r}, standalone_mode=False)
        except SystemExit:
            pass
        print(json.dumps({{m: m in sys.modules for m in ("torch", "transformers")}}))
    """)
    assert got == {"torch": False, "transformers": False}


def test_argument_errors_on_a_local_folder_import_no_torch(tiny_llama_dir, tmp_path):
    from test_cli_startup import _fresh

    argv = ["lens", "--model", str(tiny_llama_dir), "--prompt", PROMPT, "--answer", "Mary",
            "--out", str(tmp_path / "o")]
    got = _fresh(f"""
        import io, json, sys, contextlib
        from causalpatch.cli import app
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                code = app({argv!r}, standalone_mode=False) or 0
            except SystemExit as exc:
                code = exc.code
            except BaseException as exc:
                code = getattr(exc, "exit_code", repr(exc))
        print(json.dumps({{"code": code, "err": err.getvalue(),
                          **{{m: m in sys.modules for m in ("torch", "transformers")}}}}))
    """)
    assert got["code"] == 2 and "--answer ' Mary'" in got["err"], got
    assert not got["torch"] and not got["transformers"]


@pytest.mark.real
def test_dla_ioi_dataset_equals_the_api(smollm2, monkeypatch, tmp_path, one_thread):
    from causalpatch.datasets import IOIDataset

    monkeypatch.setattr(cli.runtime, "load_model", lambda model, dtype=None: smollm2)
    data = _run(["dla", "--dataset", "ioi", "--n", "2", "--seed", "1", "--json",
                 "--out", str(tmp_path)])
    api = direct_logit_attribution(smollm2, IOIDataset(smollm2, n=2, seed=1), "component")
    assert data["result"] == json.loads(api.to_json())
    assert len(data["result"]["prompts"]) == 2 and data["result"]["metric"] == "logit_diff"


def test_lens_and_dla_print_title_and_headline_and_join_a_report(tiny, tmp_path):
    """Both commands print their title and main finding (the report summary's line); their
    result files go into ``causalpatch report`` beside a patching result, each a section with
    its line in the summary."""
    from causalpatch.render.lens import dla_headline, dla_title, lens_headline, lens_title

    folder, model = tiny
    res = runner.invoke(cli.app, ["lens", "--model", folder, "--prompt", PROMPT, "--answer",
                                  " Mary", "--out", str(tmp_path / "lens")])
    assert res.exit_code == 0, res.output
    lens = LensResult.from_json(tmp_path / "lens" / "result.json")
    shown = " ".join(res.output.split())
    assert lens_title(lens) in shown and " ".join(lens_headline(lens).split())[1:] in shown
    res = runner.invoke(cli.app, ["dla", "--model", folder, "--prompt", PROMPT, "--correct",
                                  " Mary", "--incorrect", " John", "--out",
                                  str(tmp_path / "dla")])
    assert res.exit_code == 0, res.output
    dla = DLAResult.from_json(tmp_path / "dla" / "result.json")
    shown = " ".join(res.output.split())
    assert dla_title(dla) in shown and dla_headline(dla)[1:] in shown
    data = _run(["dla", "--model", folder, "--prompt", PROMPT, "--correct", " Mary",
                 "--json", "--out", str(tmp_path / "dla2")])
    assert data["title"].startswith("Direct logit attribution (component)")
    assert data["takeaway"].startswith("logit(' Mary') =")

    res = runner.invoke(cli.app, ["patch", "--model", folder, "--clean", PROMPT, "--corrupted",
                                  PROMPT.replace("John gave", "Mary gave"), "--correct", " Mary",
                                  "--incorrect", " John", "--layers", "0,1",
                                  "--out", str(tmp_path / "patch")])
    assert res.exit_code == 0, res.output
    out = tmp_path / "all.html"
    res = runner.invoke(cli.app, ["report", str(tmp_path / "patch" / "result.json"),
                                  str(tmp_path / "lens"), str(tmp_path / "dla" / "result.json"),
                                  "--out", str(out), "--plotly", "cdn"])
    assert res.exit_code == 0, res.output
    page = out.read_text()
    summary = page.split("<section id='summary'>")[1].split("</section>")[0]
    assert summary.count("<li>") == 3 and "Logit lens:" in summary
    assert "Direct logit attribution (component)" in summary
    assert "id='result-2'" in page and "class='cp-lens'" in page

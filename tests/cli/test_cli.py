"""The command line: outputs, tables, JSON, one-line errors with exit code 2, help examples,
checks before the weights load, quiet/JSON modes, global flags, output fallbacks, reports.

Most tests use the tiny model: ``runtime.load_model`` (weights) and ``model_info.inspect_model``
(config and tokenizer) are monkeypatched, so no test here loads a model from disk except the
``real`` ones."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

import causalpatch.cli as cli
from causalpatch.result import PatchingResult

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"
runner = CliRunner()


@pytest.fixture
def use_session_model(smollm2, monkeypatch):
    monkeypatch.setattr(cli.runtime, "load_model", lambda model, dtype=None: smollm2)
    monkeypatch.setattr(cli.model_info, "inspect_model",
                        lambda model, need_kinds=False: cli.ModelInfo.of(smollm2))
    cli.State.quiet = False
    cli.State.debug = False


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


@pytest.mark.parametrize("command", ["patch", "ioi", "trace", "report", "models", "info"])
def test_every_command_help_shows_an_example(command):
    res = runner.invoke(cli.app, [command, "--help"])
    assert res.exit_code == 0 and "Example" in res.output and "causalpatch" in res.output


@pytest.fixture
def use_tiny_model(make_tiny_lm, monkeypatch, one_thread):
    tiny = make_tiny_lm("llama")
    monkeypatch.setattr(cli.runtime, "load_model", lambda model, dtype=None: tiny)
    monkeypatch.setattr(cli.model_info, "inspect_model",
                        lambda model, need_kinds=False: cli.ModelInfo.of(tiny))
    cli.State.quiet = False
    cli.State.debug = False
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
    assert result.extra["window"] == 10  # the default, as causal_tracing(window=10)
    assert "top 10 components" in res.output


@pytest.mark.parametrize("args,fragment", [
    (["--subject", "Eiffel Tower"], "either --prompt"),
    (["--prompt", "The Eiffel Tower is in the city of"], "--subject is required"),
    (["--prompt", "The Eiffel Tower is in the city of", "--subject", "Rome"], "not found"),
    (["--dataset", "ioi"], "unknown --dataset"),
    (["--dataset", "known_facts", "--noise", "0"], "--noise must be positive"),
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


# -- issue 12: checks before the weights load, modes, flags, outputs, reports ---------------------
@pytest.fixture
def no_weights(use_tiny_model, monkeypatch):
    """The tiny model's config and tokenizer, and a ``load_model`` that must never run."""
    def refuse(model, dtype=None):
        raise AssertionError("the weights were loaded before the argument error")

    monkeypatch.setattr(cli.runtime, "load_model", refuse)
    return use_tiny_model


def _patch_args(tmp_path, *extra):
    return ["patch", "--model", "tiny", "--clean", CLEAN, "--corrupted", CORRUPTED,
            "--correct", " Mary", "--incorrect", " John", "--out", str(tmp_path / "o"), *extra]


@pytest.mark.parametrize("extra,fragment", [
    (["--component", "attn_heads"], "Did you mean: attn_head"),
    (["--correct", "Mary"], "--correct ' Mary'"),  # no leading space: 4 tokens, ' Mary' is one
    (["--correct", " Eiffel Tower"], "2 tokens"),
    (["--corrupted", CORRUPTED + " the"], "equal token length"),
    (["--component", "attn_head", "--by-position", "--corrupted", "Mary gave"],
     "equal token length"),
    (["--clean", "  "], "--clean is empty"),
    (["--correct", ""], "--correct is empty"),
    (["--layers", "0,99"], "out of range: this model has 3 layers"),
    (["--component", "blocks.7.mlp"], "out of range"),
    (["--component", "attn_head", "--heads", "0,9"], "4 heads"),
    (["--component", "mlp", "--heads", "1"], "has no heads"),
    (["--metric", "logit_dif"], "Did you mean 'logit_diff'"),
    (["--format", "gif"], "--format"),
    (["--dtype", "int8"], "--dtype"),
    (["--incorrect", " Mary"], "the same"),
])
def test_argument_errors_come_before_the_weights_load(no_weights, tmp_path, extra, fragment):
    res = runner.invoke(cli.app, _patch_args(tmp_path, *extra))
    assert res.exit_code == 2, res.output
    assert fragment in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o").exists()


def test_bad_out_paths_are_reported_first(no_weights, tmp_path, monkeypatch):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    res = runner.invoke(cli.app, _patch_args(tmp_path)[:-2] + ["--out", str(a_file)])
    assert res.exit_code == 2 and "is a file, but it must be a folder" in res.output
    res = runner.invoke(cli.app, _patch_args(tmp_path)[:-2] + ["--out", str(a_file / "sub")])
    assert res.exit_code == 2 and "cannot be created" in res.output
    monkeypatch.setattr(cli.outputs, "probe_dir", lambda folder: "Read-only file system")
    res = runner.invoke(cli.app, _patch_args(tmp_path))
    assert res.exit_code == 2 and "not writable" in res.output and "Read-only" in res.output


def test_leading_space_warning_when_both_spellings_are_one_token():
    class Tok:
        ids = {"Mary": [7], " Mary": [8], " John": [9]}

        def encode(self, text, add_special_tokens=False):
            return self.ids.get(text, [1, 2])

        def decode(self, ids):
            return "?"

    info = cli.ModelInfo("m", Tok(), {}, "llama", cli.ConfigDims(2, 2), [], [])
    cli.State.reset()
    cli.check_answer(info, " Mary", [CLEAN], "--correct")
    assert cli.State.warnings == []
    cli.check_answer(info, "Mary", [CLEAN], "--correct")
    assert "no leading space" in cli.State.warnings[0] and "' Mary'" in cli.State.warnings[0]
    cli.check_answer(info, "Mary", [CLEAN + " "], "--correct")  # the prompt ends in a space
    assert len(cli.State.warnings) == 1


def test_resid_defaults_to_by_position_and_quiet_is_silent(use_tiny_model, tmp_path):
    res = runner.invoke(cli.app, _patch_args(tmp_path, "--layers", "0,2"))
    assert res.exit_code == 0, res.output
    assert "patched by position" in res.output
    assert PatchingResult.from_json(tmp_path / "o" / "result.json").axes == ("layer", "position")
    quiet = runner.invoke(cli.app, ["--quiet", *_patch_args(tmp_path, "--layers", "0")])
    assert quiet.exit_code == 0 and quiet.output == ""
    after = runner.invoke(cli.app, [*_patch_args(tmp_path, "--no-by-position", "--layers", "0"),
                                    "--quiet"])  # a global flag after the subcommand
    assert after.exit_code == 0 and after.output == ""
    assert PatchingResult.from_json(tmp_path / "o" / "result.json").axes == ("layer",)


def test_json_prints_only_json_with_warnings_inside(use_tiny_model, tmp_path):
    res = runner.invoke(cli.app, _patch_args(tmp_path, "--no-by-position", "--layers", "1",
                                             "--json"))
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["results"][0]["shape"] == [1] and "every layer" in data["warnings"][0]
    assert res.stderr == ""


def test_global_flags_after_the_subcommand():
    assert cli.hoist_global_flags(
        typer.main.get_command(cli.app), None,
        ["patch", "--clean", "-q", "--quiet", "--json", "--", "-v"]) == [
        "--quiet", "patch", "--clean", "-q", "--json", "--", "-v"]
    res = runner.invoke(cli.app, ["models", "--quiet"])
    assert res.exit_code == 0 and res.output == ""
    res = runner.invoke(cli.app, ["--json", "models"])
    assert json.loads(res.stdout)["aliases"]
    res = runner.invoke(cli.app, ["sae", "info", "/nonexistent", "--quiet"])
    assert res.exit_code == 2 and "does not exist" in res.output


def test_results_survive_a_failed_write(use_tiny_model, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cli.outputs, "write_outputs", broken)
    res = runner.invoke(cli.app, _patch_args(tmp_path, "--layers", "0"))
    assert res.exit_code == 1 and "No space left" in res.output
    saved = res.output.split("were saved to ")[1].split(":")[0].strip()
    result = PatchingResult.from_json(f"{saved}/result.json")
    assert result.component == "resid_post" and "causalpatch report" in res.output


def test_figure_format_and_report_command(use_tiny_model, tmp_path):
    res = runner.invoke(cli.app, _patch_args(tmp_path, "--layers", "0,1", "--format", "svg"))
    assert res.exit_code == 0, res.output
    assert (tmp_path / "o" / "heatmap.svg").read_text().lstrip().startswith(("<?xml", "<svg"))
    out = tmp_path / "r" / "report.html"
    res = runner.invoke(cli.app, ["report", str(tmp_path / "o" / "result.json"),
                                  str(tmp_path / "o"), "--out", str(out), "--plotly", "cdn"])
    assert res.exit_code == 0, res.output
    assert out.stat().st_size < 1_000_000 and "cdn.plot.ly" in out.read_text()
    bad = runner.invoke(cli.app, ["report", str(tmp_path / "missing.json"), "--out", str(out)])
    assert bad.exit_code == 2 and "does not exist" in bad.output
    bad = runner.invoke(cli.app, ["report", str(tmp_path / "o"), "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "is a folder" in bad.output
    bad = runner.invoke(cli.app, ["report", str(tmp_path / "o"), "--plotly", "web"])
    assert bad.exit_code == 2 and "--plotly" in bad.output


def test_progress_is_the_librarys_bar(use_tiny_model, tmp_path, monkeypatch):
    """The commands draw no bars of their own: they pass progress=None (the library's auto
    tqdm bar, causalpatch.assemble.progress_callback) or False (--json, --no-progress, -q)."""
    import causalpatch.assemble as assemble
    import causalpatch.methods.causal_tracing as tracing

    library = assemble.progress_callback
    asked = []

    def recording(progress, total, label="patching"):
        if not callable(progress):  # the method's own request (a callback is only forwarded)
            asked.append((progress, total, label))
        return library(progress, total, label)

    monkeypatch.setattr(assemble, "progress_callback", recording)
    monkeypatch.setattr(tracing, "progress_callback", recording)  # its own `from` import
    res = runner.invoke(cli.app, _patch_args(tmp_path, "--layers", "0,1,2"))
    assert res.exit_code == 0, res.output
    assert asked == [(None, 42, "patching")]  # 3 layers x 14 positions, auto mode
    for flag in ("--json", "--no-progress", "--quiet"):
        asked.clear()
        res = runner.invoke(cli.app, [*_patch_args(tmp_path, "--layers", "0"), flag])
        assert res.exit_code == 0, res.output
        assert asked == [(False, 14, "patching")]
    asked.clear()
    res = runner.invoke(cli.app, ["trace", "--prompt", "The Eiffel Tower is in the city of",
                                  "--subject", "Eiffel Tower", "--samples", "1",
                                  "--components", "mlp", "--out", str(tmp_path / "t")])
    assert res.exit_code == 0, res.output
    assert asked[0] == (None, 1, "causal tracing")  # one prompt
    import torch

    from causalpatch import activation_patching

    seen = []
    activation_patching(use_tiny_model, CLEAN, CORRUPTED, component="resid_post",
                        by_position=True, correct=" Mary", incorrect=" John",
                        progress=lambda done, total: seen.append((done, total)))
    assert len(seen) > 3 and seen[-1][0] == seen[-1][1] and seen[0][0] < seen[-1][1]


def test_help_examples_copy_paste(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    res = runner.invoke(cli.app, ["patch", "--help"], terminal_width=80)
    assert res.exit_code == 0
    assert f'CORRUPTED="{CORRUPTED}"' in res.output and f'CLEAN="{CLEAN}"' in res.output
    for word in cli.SWEEP_COMPONENTS:
        assert word in res.output
    res = runner.invoke(cli.app, ["trace", "--help"], terminal_width=80)
    assert '--prompt "The Eiffel Tower is in the city of"' in res.output


def _flat(text: str) -> str:
    """Terminal output with its line breaks and runs of spaces made single spaces."""
    return " ".join(text.split())


def test_sweep_commands_print_title_baselines_and_takeaway(use_tiny_model, tmp_path):
    """``patch`` and ``trace`` print, per result, what was run, the baselines and the
    takeaway (the report's words), before the table; ``--json`` carries them too."""
    from causalpatch.render.text import baselines_text, takeaway, title_words

    res = runner.invoke(cli.app, _patch_args(tmp_path, "--component", "attn_head"))
    assert res.exit_code == 0, res.output
    result = PatchingResult.from_json(tmp_path / "o" / "result.json")
    shown = _flat(res.output)
    for line in (title_words(result), baselines_text(result), takeaway(result)):
        assert _flat(line) in shown, line
    assert shown.index(_flat(takeaway(result))) < shown.index("top 10 components")
    assert f"clean {result.clean_metric:.4f}, corrupted {result.corrupted_metric:.4f}" in shown
    data = json.loads(runner.invoke(cli.app, _patch_args(
        tmp_path, "--component", "attn_head", "--json")).stdout)
    assert data["results"][0]["takeaway"] == takeaway(result)
    assert data["results"][0]["title"] == "Activation patching: attention heads"

    out = tmp_path / "trace"
    res = runner.invoke(cli.app, ["trace", "--prompt", "The Eiffel Tower is in the city of",
                                  "--subject", "Eiffel Tower", "--samples", "2", "--window", "2",
                                  "--components", "mlp,attn", "--out", str(out)])
    assert res.exit_code == 0, res.output
    shown = _flat(res.output)
    for name in ("mlp_by_position", "attn_by_position"):
        traced = PatchingResult.from_json(out / f"{name}.json")
        assert _flat(takeaway(traced)) in shown
        assert "has the largest indirect effect" in takeaway(traced)
    assert "Causal tracing: restoring the MLP output (window of 2 layers), subject " \
           "'Eiffel Tower' noised" in shown
    assert "indirect effect" in res.output.split("top 10 components")[1]  # the table column
    assert (f"p(answer): clean run {traced.clean_metric:.4f}, subject noised "
            f"{traced.corrupted_metric:.4f}") in shown
    report = (out / "report.html").read_text()
    assert report.count("<li><a href='#result-") == 2  # the summary: one line per component


def test_ioi_prints_every_steps_story_and_its_report_opens_with_a_summary(
        use_tiny_model, tmp_path, monkeypatch):
    """``ioi``'s four steps each print title, baselines and takeaway; its report opens with
    one summary line per step, each linking to its section. (The tiny tokenizer knows too few
    names for ``IOIDataset``: its IOI-like pairs stand in for the dataset.)"""
    import causalpatch.datasets
    from causalpatch.render.text import baselines_text, headline, takeaway, title_words
    from conftest import IOI_PAIRS, TextPairs

    class Pairs(TextPairs):
        def __len__(self) -> int:  # the command counts the dataset's pairs
            return len(self.clean)

    monkeypatch.setattr(causalpatch.datasets, "IOIDataset",
                        lambda model, n, seed, equal_length=False: Pairs.of(IOI_PAIRS[:n]))
    out = tmp_path / "ioi"
    res = runner.invoke(cli.app, ["ioi", "--n", "2", "--no-progress", "--out", str(out)])
    assert res.exit_code == 0, res.output
    shown = _flat(res.output)
    names = ["resid_post_by_position", "attn_by_position", "mlp_by_position", "attn_head"]
    results = [PatchingResult.from_json(out / f"{name}.json") for name in names]
    for result in results:
        for line in (title_words(result), baselines_text(result), takeaway(result)):
            assert _flat(line) in shown, line
    # the numbers are the API's on the same pairs: same code, weights and threads, so equal
    # (observed bitwise 0; the saved JSON holds float32 values exactly)
    import torch

    from causalpatch import activation_patching

    for result, (component, by_position) in zip(results, [
            ("resid_post", True), ("attn", True), ("mlp", True), ("attn_head", False)]):
        api = activation_patching(use_tiny_model, Pairs.of(IOI_PAIRS[:2]), component=component,
                                  by_position=by_position, progress=False)
        assert torch.equal(result.effect_matrix, api.effect_matrix), component
        assert result.n_pairs == api.n_pairs == 2
    page = (out / "report.html").read_text()
    summary = page.split("<section id='summary'>")[1].split("</section>")[0]
    for i, result in enumerate(results):
        assert f"<li><a href='#result-{i}'>" in summary
        assert html_escape(headline(result)) in summary


def html_escape(text: str) -> str:
    import html

    return html.escape(text, quote=True)

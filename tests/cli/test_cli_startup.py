"""Start-up cost of the command line and the package, tested structurally (no timings).

``import causalpatch``, ``import causalpatch.cli``, ``causalpatch --help``, ``causalpatch models``
and the argument checks that read only a local model folder must not import torch or
transformers (benchmarks/bench_cli.py measures the times). Each check runs in a fresh
interpreter, because this test process has torch loaded already. Also: every name of
``causalpatch.__all__`` still imports, and the CLI's copies of the library's vocabularies
(kept so that the CLI needs no torch for its first checks) match the library.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

import causalpatch
import causalpatch.cli as cli

HEAVY = ("torch", "transformers")


def _fresh(code: str) -> dict:
    """Run ``code`` in a new interpreter; it must print one JSON object as its last line."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_importing_the_package_and_the_cli_imports_no_torch():
    got = _fresh("""
        import json, sys
        import causalpatch
        import causalpatch.cli
        print(json.dumps({m: m in sys.modules for m in ("torch", "transformers")}))
    """)
    assert got == {"torch": False, "transformers": False}


@pytest.mark.parametrize("argv", [["--help"], ["patch", "--help"], ["models"],
                                  ["models", "--json", "--quiet"], ["report", "--help"]])
def test_help_and_models_run_without_torch(argv):
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


def test_python_dash_m_causalpatch_is_the_command_line():
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "causalpatch", "--help"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Usage: causalpatch" in " ".join(done.stdout.split()) and "patch" in done.stdout
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines()}
    assert "torch" not in imported and "transformers" not in imported


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """The tiny LLaMA saved as a local Hugging Face folder (config, tokenizer.json, weights)."""
    from conftest import tiny_hf_model, tiny_tokenizer

    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_hf_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("extra,fragment", [
    (["--layers", "0,99"], "3 layers"),
    (["--correct", "Mary"], "--correct ' Mary'"),
    (["--corrupted", "When Mary and John went to the store, Mary gave a drink to me"],
     "equal token length"),
    (["--component", "attn_heads"], "Did you mean"),
])
def test_argument_errors_on_a_local_folder_import_no_torch(tiny_folder, extra, fragment):
    argv = ["patch", "--model", str(tiny_folder),
            "--clean", "When Mary and John went to the store, John gave a drink to",
            "--corrupted", "When Mary and John went to the store, Mary gave a drink to",
            "--correct", " Mary", "--incorrect", " John", "--out", str(tiny_folder / "o"),
            *extra]
    got = _fresh(f"""
        import io, json, sys, contextlib
        from causalpatch.cli import app
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                code = app({argv!r}, standalone_mode=False) or 0  # click returns Exit codes
            except SystemExit as exc:
                code = exc.code
            except BaseException as exc:  # typer.Exit
                code = getattr(exc, "exit_code", repr(exc))
        print(json.dumps({{"code": code, "err": err.getvalue(),
                          **{{m: m in sys.modules for m in ("torch", "transformers")}}}}))
    """)
    assert got["code"] == 2 and fragment in got["err"], got
    assert not got["torch"] and not got["transformers"]


def test_fast_tokenizer_matches_transformers(tiny_folder):
    from causalpatch.loading import load_tokenizer

    fast = cli.FastTokenizer(tiny_folder / "tokenizer.json")
    slow = load_tokenizer(str(tiny_folder))
    for text in ("When Mary and John went to the store", " Mary", "Mary", "  two  spaces ",
                 "The Eiffel Tower is in the city of"):
        assert fast(text)["input_ids"] == list(slow(text)["input_ids"])
        ids = fast.encode(text, add_special_tokens=False)
        assert ids == slow.encode(text, add_special_tokens=False)
        assert [fast.decode([i]) for i in ids] == [slow.decode([i]) for i in ids]
    info = cli.model_info.fast_inspect(str(tiny_folder))
    assert info is not None and (info.dims.n_layers, info.dims.n_heads) == (3, 4)


@pytest.mark.parametrize("name", sorted(causalpatch.__all__))
def test_every_exported_name_still_imports(name):
    value = getattr(causalpatch, name)
    namespace: dict = {}
    exec(f"from causalpatch import {name}", namespace)
    assert namespace[name] is value
    assert name in dir(causalpatch)


def test_unknown_attributes_and_submodules():
    with pytest.raises(AttributeError):
        causalpatch.no_such_thing  # noqa: B018
    assert causalpatch.loading.__name__ == "causalpatch.loading"


def test_the_cli_vocabularies_match_the_library():
    from causalpatch.adapters import ADAPTERS
    from causalpatch.adapters.base import SEED_MODULE_NAMES
    from causalpatch.loading import ALIASES as MODEL_ALIASES
    from causalpatch.methods.causal_tracing import TRACE_COMPONENTS
    from causalpatch.metrics import METRICS
    from causalpatch.names import ALIASES, site_kinds
    from causalpatch.plan import SWEEP_COMPONENTS
    from causalpatch.render.figure import FIGURE_FORMATS
    from causalpatch.render.html import PLOTLY_MODES

    assert cli.SWEEP_COMPONENTS == SWEEP_COMPONENTS
    assert set(cli.METRICS) == set(METRICS)
    assert set(cli.TRACE_COMPONENTS) == set(TRACE_COMPONENTS)
    assert cli.FIGURE_FORMATS == tuple(FIGURE_FORMATS)
    assert cli.PLOTLY_MODES == tuple(PLOTLY_MODES)
    words = set(cli.COMPONENT_WORDS)
    kinds = {k for a in ADAPTERS for k in site_kinds(a)}
    library = (set(ALIASES) - set(SEED_MODULE_NAMES)) | kinds
    assert library <= words, f"add to causalpatch.cli.COMPONENT_WORDS: {library - words}"
    assert set(MODEL_ALIASES) <= {"smollm2", "smollm2-135m", "gemma3-270m"} | set(MODEL_ALIASES)

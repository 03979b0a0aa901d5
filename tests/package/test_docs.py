"""Every ```python block in README.md and docs/*.md runs, so the docs never go stale.

The blocks load ``InterpretableModel("smollm2")``; to keep the suite fast the test hands them the
session's already loaded SmolLM2 instead of loading it again (same class, same weights).
"""

from __future__ import annotations

import re

import matplotlib
import pytest
from conftest import REPO_ROOT

import causalpatch

PAGES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def _blocks() -> list[tuple[str, int, str]]:
    found = []
    for page in PAGES:
        for i, match in enumerate(BLOCK.finditer(page.read_text(encoding="utf-8"))):
            found.append((page.name, i, match.group(1)))
    return found


def test_docs_have_examples():
    names = {name for name, _, _ in _blocks()}
    assert {"README.md", "patching.md", "metrics.md", "trace.md"} <= names


@pytest.mark.parametrize("page,index,code", _blocks(),
                         ids=[f"{p}#{i}" for p, i, _ in _blocks()])
def test_doc_example_runs(page, index, code, smollm2, tmp_path, monkeypatch):
    matplotlib.use("Agg")
    real = causalpatch.InterpretableModel

    def reuse(name, *args, **kwargs):
        if name == "smollm2" and not args and not kwargs:
            return smollm2
        return real(name, *args, **kwargs)

    monkeypatch.setattr(causalpatch, "InterpretableModel", reuse)
    monkeypatch.chdir(tmp_path)
    before = smollm2.hook_snapshot()
    exec(compile(code, f"{page}#{index}", "exec"), {"__name__": f"doc_{index}"})
    assert smollm2.hook_snapshot() == before


#: Words only this project's own history explains (its planning notes and task tracker), which a
#: reader of the docs cannot know. ``seed=0``, ``--seed`` and "seeded" are ordinary words.
HISTORY_WORDS = re.compile(
    r"\bseeds'|\bthe seeds?\b|\bseed (?:framework|document|snippet|api)s?\b"
    r"|\bissues? #?\d+|\bthe issue\b|\bissue's\b", re.IGNORECASE)


def test_docs_do_not_mention_the_projects_history():
    found = [f"{page.name}:{n}: {line.strip()}" for page in PAGES
             for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1)
             if HISTORY_WORDS.search(line)]
    assert found == [], "\n".join(found)


def test_readme_and_cli_page_name_every_command():
    import typer

    from causalpatch.cli import app

    commands = sorted(typer.main.get_command(app).commands)  # type: ignore[attr-defined]
    assert {"patch", "ioi", "trace", "lens", "dla", "report", "sae"} <= set(commands)
    for page in (REPO_ROOT / "README.md", REPO_ROOT / "docs" / "cli.md"):
        text = page.read_text(encoding="utf-8")
        missing = [c for c in commands if not re.search(rf"(?:`|causalpatch ){c}\b", text)]
        assert missing == [], f"{page.name} does not name the command(s) {missing}"

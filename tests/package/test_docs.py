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

"""docs/causal_tracing.md's findings equal the committed JSON of ``benchmarks/rome_controls.py``.

Each row of :data:`QUOTES` is a piece of the page with ``{}`` where a number stands, the JSON
file behind the numbers, one key path per number and its rounding. The test formats each JSON
value with its rounding, puts it into the text and checks that the page holds exactly that text
(any run of whitespace, line breaks included, counts as one space). A page edited without
rerunning the script, or JSON regenerated without the page, fails here and says which.

Key paths are ``/``-separated keys and list indices; ``"a - b"`` is the difference of two
values. Roundings are Python format specs; ``%`` specs format a fraction as a percentage and
``min`` quotes seconds as whole minutes.

Every ``docs/img/rome_*.png`` also has its JSON beside it (same stem) with the command, commit,
seed, settings and the plotted numbers, and the figures say they used 10 noise samples.
"""

from __future__ import annotations

import json
import re
from functools import cache
from typing import Any

import pytest
from conftest import REPO_ROOT

CONTROLS = "docs/img/rome_controls.json"
RESID, MLP, ATTN = "docs/img/rome_resid.json", "docs/img/rome_mlp.json", "docs/img/rome_attn.json"
LS, LT, FS = "last subject token", "last token", "first subject token"
F = "figures/"
W = "mlp_windows/"

#: (quoted text with ``{}`` per number, JSON file, key paths, roundings: one for all or one per
#: number).
QUOTES: list[tuple[str, str, tuple[str, ...], str | tuple[str, ...]]] = [
]


@cache
def load(path: str) -> Any:
    return json.loads((REPO_ROOT / path).read_text())


@cache
def page() -> str:
    return squash((REPO_ROOT / "docs" / "causal_tracing.md").read_text())


def squash(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def lookup(data: Any, path: str) -> Any:
    """The value at a ``/``-separated key path; ``"a - b"``: the difference of two paths."""
    if " - " in path:
        left, right = path.split(" - ")
        return lookup(data, left) - lookup(data, right)
    for key in path.split("/"):
        data = data[int(key)] if isinstance(data, list) else data[key]
    return data


def render(value: Any, spec: str) -> str:
    """``value`` rounded as the page writes it (a typographic minus for negative numbers)."""
    if spec == "min":
        return format(value / 60, ".0f")
    if spec == "d":
        assert value == int(value), f"{value} is not a whole number"
        value = int(value)
    return format(value, spec).replace("-", "\u2212")


def quoted(text: str, data: Any, paths: tuple[str, ...], specs: str | tuple[str, ...]) -> str:
    if isinstance(specs, str):
        specs = (specs,) * len(paths)
    assert len(specs) == len(paths) == text.count("{}"), text
    return squash(text.format(*(render(lookup(data, p), s) for p, s in zip(paths, specs))))


def test_the_page_quotes_these_runs():
    assert len(QUOTES) >= 20, "the page's findings are checked number by number"
    assert "python benchmarks/rome_controls.py" in page()


@pytest.mark.parametrize("text,source,paths,specs", QUOTES, ids=[q[0][:50] for q in QUOTES])
def test_quoted_number_matches_its_json(text, source, paths, specs):
    expected = quoted(text, load(source), paths, specs)
    if expected in page():
        return
    pieces = [squash(p).strip() for p in text.split("{}") if squash(p).strip()]
    missing = [p for p in pieces if p not in page()]
    where = (f"the page no longer has the text {missing}" if missing else
             f"a number differs from {source}")
    raise AssertionError(f"docs/causal_tracing.md: {where}; expected to find {expected!r}")


def test_every_rome_figure_has_its_json():
    images = sorted((REPO_ROOT / "docs" / "img").glob("rome_*.png"))
    assert {p.name for p in images} >= {"rome_resid.png", "rome_mlp.png", "rome_attn.png"}
    for image in images:
        data = json.loads(image.with_suffix(".json").read_text())
        assert data["figure"] == image.name
        assert data["command"].startswith("python benchmarks/rome_controls.py"), data["command"]
        assert data["commit"] and data["seed"] == 0
        assert data["settings"]["samples"] == 10, "the documented figures use 10 noise samples"
        effect = data["data"]["effect"]  # [group][layer], as drawn
        assert len(effect) == 6 and all(len(row) == 30 for row in effect)
        assert len(data["data"]["ci95_lower"]) == 6
        assert f"![" in page() and f"img/{image.name}" in page(), f"the page shows {image.name}"

"""Every figure in ``docs/`` has its provenance, and the numbers quoted from it match.

* Every image under ``docs/`` (``.png``, ``.svg``, ``.jpg``, any depth) has a JSON of the same
  stem beside it or in ``docs/data/`` (written by ``scripts/provenance.py``) that names the
  command that made it, the commit and the seed; the command's script exists in the repository
  and is one of the lines of the Makefile's ``figures`` target, so ``make figures`` remakes it
  (so is the script of every other JSON under ``docs/`` that records a command).
* ``docs/figures.md`` lists every image with the script that made it, and the JSON agrees.
* The numbers the README quotes from its figure equal the figure's JSON (:data:`QUOTES`: the
  text with ``{}`` where each number stands, one key path and rounding per number, as in
  ``test_doc_numbers.py``).
"""

from __future__ import annotations

import json
import re
import shlex
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO_ROOT

DOCS = REPO_ROOT / "docs"
IMAGE_SUFFIXES = (".png", ".svg", ".jpg", ".jpeg")
IMAGES = sorted(p for p in DOCS.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
RESID = "docs/img/ioi_resid_post.json"
HEADS = "docs/img/ioi_heads.json"
#: The README's IOI figure: column 0 of ``data/columns`` is S2, column 1 is END (by position).
S2, END = "data/columns/0/", "data/columns/1/"

#: (page, quoted text with ``{}`` per number, JSON file, key paths, roundings: one for all or
#: one per number). Key paths are ``/``-separated keys and list indices into the JSON.
QUOTES: list[tuple[str, str, str, tuple[str, ...], str | tuple[str, ...]]] = [
    ("README.md", "`python examples/ioi_smollm2.py --docs`, {} IOI pairs", RESID,
     ("settings/n_pairs",), "d"),
    ("README.md", "position {} (S2) carries the answer through layer 18 (restoring layer 10 "
     "there recovers {} [{}, {}] of the clean logit difference)", RESID,
     (S2 + "position", S2 + "effect/10", S2 + "ci95_lower/10", S2 + "ci95_upper/10"),
     ("d", ".2f", ".2f", ".2f")),
    ("README.md", "the last position ({}) from layer 23 on ({} [{}, {}] at layer 23)", RESID,
     (END + "position", END + "effect/23", END + "ci95_lower/23", END + "ci95_upper/23"),
     ("d", ".2f", ".2f", ".2f")),
    ("README.md", "at layers 20–22 the answer is split between them (S2 {}, END {} at layer "
     "21)", RESID, (S2 + "effect/21", END + "effect/21"), ".2f"),
]


def rel(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT))


def provenance_of(image: Path) -> Path | None:
    """The image's JSON: beside it, else ``docs/data/<stem>.json``; None when neither exists."""
    for candidate in (image.with_suffix(".json"), DOCS / "data" / f"{image.stem}.json"):
        if candidate.exists():
            return candidate
    return None


@cache
def load(path: str) -> Any:
    return json.loads((REPO_ROOT / path).read_text())


def script_of(command: str) -> str:
    """The script a recorded command runs: the first ``.py`` word (``python x.py --flag``)."""
    words = shlex.split(command)
    scripts = [w for w in words if w.endswith(".py")]
    assert scripts, f"the command {command!r} names no Python script"
    return scripts[0]


def makefile_target(name: str) -> str:
    """The recipe of one Makefile target: its tab-indented lines after ``name:``."""
    lines = (REPO_ROOT / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{name}:"))
    recipe = []
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        recipe.append(line)
    return "\n".join(recipe)


def test_docs_have_images_to_check():
    """Not vacuous: the README's figure and the report screenshot are among the images."""
    names = {p.name for p in IMAGES}
    assert {"ioi_resid_post.png", "ioi_heads.png", "report.png",
            "attribution_vs_exact.png"} <= names, names


@pytest.mark.parametrize("image", IMAGES, ids=[rel(p) for p in IMAGES])
def test_every_image_has_its_provenance_json(image):
    """command, commit and seed are recorded; the command's script exists and `make figures`
    runs it."""
    found = provenance_of(image)
    assert found is not None, (
        f"{rel(image)} has no JSON: the script that draws it should call "
        f"scripts/provenance.py write_figure_json({rel(image)!r}, ...)")
    record = json.loads(found.read_text())
    missing = {"command", "commit", "seed"} - set(record)
    assert not missing, f"{rel(found)} lacks {sorted(missing)}"
    assert isinstance(record["commit"], str) and re.fullmatch(
        r"[0-9a-f]{7,40}(\+dirty)?", record["commit"]), (rel(found), record["commit"])
    script = script_of(record["command"])
    assert (REPO_ROOT / script).is_file(), f"{rel(found)}: {script} is not in the repository"
    assert script in makefile_target("figures"), (
        f"{rel(found)} was made by {script}, which the Makefile's `figures` target does not run")


def test_every_recorded_command_is_a_make_figures_line():
    """Every JSON under docs/ that records its command (figures' and numbers' alike, e.g.
    docs/data/positive_control.json) names a script that `make figures` runs."""
    recorded = {}
    for path in sorted(DOCS.rglob("*.json")):
        record = json.loads(path.read_text())
        if isinstance(record, dict) and isinstance(record.get("command"), str):
            recorded[rel(path)] = script_of(record["command"])
    assert "docs/data/positive_control.json" in recorded, sorted(recorded)  # not vacuous
    target = makefile_target("figures")
    assert {p: s for p, s in recorded.items() if s not in target} == {}


def test_figures_page_names_every_image_and_its_script():
    """docs/figures.md has one table row per image, naming the script its JSON records."""
    page = (DOCS / "figures.md").read_text()
    for image in IMAGES:
        row = next((line for line in page.splitlines()
                    if line.startswith("|") and f"`{rel(image)[len('docs/'):]}`" in line), None)
        assert row is not None, f"docs/figures.md has no row for {rel(image)}"
        found = provenance_of(image)
        if found is not None:  # a missing JSON fails the test above, with its own message
            script = script_of(json.loads(found.read_text())["command"])
            assert f"`{script}" in row, (
                f"docs/figures.md: the row of {rel(image)} does not name {script}")


def test_the_ioi_figures_record_their_intervals():
    """The README's figure and the heads figure hold every cell's 95% interval, and each
    interval contains its effect (the mean over the pairs lies inside a percentile bootstrap
    interval here; observed: always, by at least 1e-4)."""
    for path in (RESID, HEADS):
        data = load(path)["data"]
        effect, lower, upper = (data[k] for k in ("effect", "ci95_lower", "ci95_upper"))
        flat = [(e, lo, hi) for er, lr, ur in zip(effect, lower, upper)
                for e, lo, hi in zip(er, lr, ur)]
        assert len(flat) >= 30 * 9, path
        assert all(lo <= hi for _, lo, hi in flat), path
        top = data["top"][0]
        assert top["ci95"][0] <= top["effect"] <= top["ci95"][1], (path, top)
    assert load(RESID)["data"]["columns"][0]["role"] == "S2"
    assert load(RESID)["data"]["columns"][1]["role"] == "END"


def value(data: Any, path: str) -> Any:
    for key in path.split("/"):
        data = data[int(key)] if isinstance(data, list) else data[key]
    return data


def norm(text: str) -> str:
    return re.sub(r"\s+", " ", text)


@pytest.mark.parametrize("quote", QUOTES, ids=[f"{q[0]}:{q[1][:40]}" for q in QUOTES])
def test_quoted_numbers_equal_the_json(quote):
    page, text, source, paths, roundings = quote
    specs = (roundings,) * len(paths) if isinstance(roundings, str) else roundings
    numbers = [format(value(load(source), p), s)
               for p, s in zip(paths, specs)]
    expected = norm(text.format(*numbers))
    assert expected in norm((REPO_ROOT / page).read_text()), (
        f"{page} should say {expected!r} ({source})")

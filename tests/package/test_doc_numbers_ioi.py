"""The IOI numbers of docs/path_patching.md equal the JSON examples/path_patching_ioi.py wrote.

``docs/data/path_patching_ioi.json`` holds every number the page's section "The IOI circuit on
SmolLM2" quotes (``python examples/path_patching_ioi.py --pairs 32 --docs``). Each row of
:data:`QUOTES` is a piece of the page with ``{}`` where each number stands and, per number, its
key path into that JSON and its format; the test fills the numbers in from the JSON and checks
that the page holds exactly that text (runs of whitespace count as one space). A page edited
without rerunning the script, or a rerun without editing the page, fails here.

Formats: ``pct`` is a ``[value, lower, upper]`` triple quoted as ``-37% [-45, -30]`` with U+2212 minus signs (whole
percent, the typographic minus the page uses); ``t2`` the same with two decimals and no
percent sign; ``p0`` a fraction quoted as a whole percentage; ``f0``/``f2``/``e``/``d``/``s``
plain numbers, integers and strings; ``min`` seconds quoted as whole minutes. The figures' JSON (``docs/img/ioi_path_*.json``, written by
``scripts/provenance.py``) must exist beside each image and hold the same numbers.
"""

# ruff: noqa: E501  (QUOTES holds whole table rows of the page, with its minus signs)
from __future__ import annotations

import json
import re
from functools import cache
from typing import Any

import pytest
from conftest import REPO_ROOT

PAGE = "docs/path_patching.md"
FINDINGS = "docs/data/path_patching_ioi.json"
IMAGES = ("docs/img/ioi_path_direct.png", "docs/img/ioi_path_via_queries.png")
D, H = "splits/discovery/", "splits/heldout/"

#: (quoted text with ``{}`` per number, one (key path, format) per number)
QUOTES: list[tuple[str, tuple[tuple[str, str], ...]]] = [
    ('`python examples/path_patching_ioi.py --pairs 32 --docs` ({} minutes on one thread of a busy',
     (('seconds/total', 'min'),)),
    ('mean clean logit difference. The clean logit difference is {}',
     ((D + 'clean_logit_diff', 't2'),)),
    ('(discovery) and {} (held-out); the pABC prompts give',
     ((H + 'clean_logit_diff', 't2'),)),
    ('{} and {}, close to 0, so on pABC the two scales',
     ((D + 'pabc_logit_diff', 't2'), (H + 'pabc_logit_diff', 't2'),)),
    ('| 23.3 | {} | {} | {} | {} |',
     ((D + 'direct/heads/23.3/pct', 'pct'), (D + 'direct/all/23.3/pct', 'pct'), (H + 'direct/heads/23.3/pct', 'pct'), (H + 'direct/all/23.3/pct', 'pct'),)),
    ('| 29.1 | {} | {} | {} | {} |',
     ((D + 'direct/heads/29.1/pct', 'pct'), (D + 'direct/all/29.1/pct', 'pct'), (H + 'direct/heads/29.1/pct', 'pct'), (H + 'direct/all/29.1/pct', 'pct'),)),
    ('| 23.0 | {} | {} | {} | {} |',
     ((D + 'direct/heads/23.0/pct', 'pct'), (D + 'direct/all/23.0/pct', 'pct'), (H + 'direct/heads/23.0/pct', 'pct'), (H + 'direct/all/23.0/pct', 'pct'),)),
    ('| 24.4 | {} | {} | {} | {} |',
     ((D + 'direct/heads/24.4/pct', 'pct'), (D + 'direct/all/24.4/pct', 'pct'), (H + 'direct/heads/24.4/pct', 'pct'), (H + 'direct/all/24.4/pct', 'pct'),)),
    ('| 29.0 | {} | {} | {} | {} |',
     ((D + 'direct/heads/29.0/pct', 'pct'), (D + 'direct/all/29.0/pct', 'pct'), (H + 'direct/heads/29.0/pct', 'pct'), (H + 'direct/all/29.0/pct', 'pct'),)),
    ('| 23.2 | {} | {} | {} | {} |',
     ((D + 'direct/heads/23.2/pct', 'pct'), (D + 'direct/all/23.2/pct', 'pct'), (H + 'direct/heads/23.2/pct', 'pct'), (H + 'direct/all/23.2/pct', 'pct'),)),
    ("{}, {}, {}, {}, {}), 23.3's",
     ((H + 'top_direct/0', 's'), (H + 'top_direct/1', 's'), (H + 'top_direct/2', 's'), (H + 'top_direct/3', 's'), (H + 'top_direct/4', 's'),)),
    ('| 20.0 | {} | {} | {} | {} |',
     ((D + 'via_q/heads/20.0/pct', 'pct'), (D + 'via_q/all/20.0/pct', 'pct'), (H + 'via_q/heads/20.0/pct', 'pct'), (H + 'via_q/all/20.0/pct', 'pct'),)),
    ('| 19.2 | {} | {} | {} | {} |',
     ((D + 'via_q/heads/19.2/pct', 'pct'), (D + 'via_q/all/19.2/pct', 'pct'), (H + 'via_q/heads/19.2/pct', 'pct'), (H + 'via_q/all/19.2/pct', 'pct'),)),
    ('Every other head is within ±{}% (discovery,',
     ((D + 'other_heads_max_abs_via_q_pct', 'f2'),)),
    ('| 23.3 | {} | {} | {} | {} | {} | {} |',
     ((D + 'attention/23.3/IO', 't2'), (D + 'attention/23.3/S1', 't2'), (D + 'attention/23.3/S2', 't2'), (D + 'attention/23.3/IO-S', 't2'), ('copy_scores/heads/23.3/positive', 'p0'), ('copy_scores/heads/23.3/negative', 'p0'),)),
    ('| 29.1 | {} | {} | {} | {} | {} | {} |',
     ((D + 'attention/29.1/IO', 't2'), (D + 'attention/29.1/S1', 't2'), (D + 'attention/29.1/S2', 't2'), (D + 'attention/29.1/IO-S', 't2'), ('copy_scores/heads/29.1/positive', 'p0'), ('copy_scores/heads/29.1/negative', 'p0'),)),
    ('| 23.0 | {} | {} | {} | {} | {} | {} |',
     ((D + 'attention/23.0/IO', 't2'), (D + 'attention/23.0/S1', 't2'), (D + 'attention/23.0/S2', 't2'), (D + 'attention/23.0/IO-S', 't2'), ('copy_scores/heads/23.0/positive', 'p0'), ('copy_scores/heads/23.0/negative', 'p0'),)),
    ('| 24.4 | {} | {} | {} | {} | {} | {} |',
     ((D + 'attention/24.4/IO', 't2'), (D + 'attention/24.4/S1', 't2'), (D + 'attention/24.4/S2', 't2'), (D + 'attention/24.4/IO-S', 't2'), ('copy_scores/heads/24.4/positive', 'p0'), ('copy_scores/heads/24.4/negative', 'p0'),)),
    ('| 29.0 | {} | {} | {} | {} | {} | {} |',
     ((D + 'attention/29.0/IO', 't2'), (D + 'attention/29.0/S1', 't2'), (D + 'attention/29.0/S2', 't2'), (D + 'attention/29.0/IO-S', 't2'), ('copy_scores/heads/29.0/positive', 'p0'), ('copy_scores/heads/29.0/negative', 'p0'),)),
    ("{}, 23.0 → IO {}, 24.4 → IO {}). The copy score is the paper's:",
     ((H + 'attention/23.3/S2', 't2'), (H + 'attention/23.0/IO', 't2'), (H + 'attention/24.4/IO', 't2'),)),
    ('the share of the {} single-token names whose own token is among the top',
     (('copy_scores/names', 'd'),)),
    ("{} logits of the whole vocabulary when the head's OV circuit is applied to",
     (('copy_scores/top', 'd'),)),
    ('{} have a copy score of at least 50% (29.1 and 29.2)',
     (('copy_scores/heads_positive_at_least_half', 'd'),)),
    ('and {} a negative one (29.0). So:',
     (('copy_scores/heads_negative_at_least_half', 'd'),)),
    ('- **29.1** copies names and **29.0** suppresses them (copy scores {} and {}), but from END',
     (('copy_scores/heads/29.1/positive', 'p0'), ('copy_scores/heads/29.0/negative', 'p0'),)),
    ('position, as the paper; 16 pABC prompts per template) keep {} of the',
     ((D + 'backup/kept_pct', 'pct'),)),
    ('clean logit difference (held-out {}). Their own direct logit attribution',
     ((H + 'backup/kept_pct', 'pct'),)),
    ('at END falls from {} to {} logits;',
     ((D + 'backup/movers_dla_clean', 't2'), (D + 'backup/movers_dla_ablated', 't2'),)),
    ("every other head's together rises by {} (held-out",
     ((D + 'backup/others_dla_rise', 't2'),)),
    ('{}). The rise is mostly the negative candidates letting go: 24.4',
     ((H + 'backup/others_dla_rise', 't2'),)),
    ('rises by {} (from {} to',
     ((D + 'backup/top_rise/24.4/rise', 't2'), (D + 'backup/top_rise/24.4/clean', 't2'),)),
    ('{}) and 29.0 by {}; the',
     ((D + 'backup/top_rise/24.4/ablated', 't2'), (D + 'backup/top_rise/29.0/rise', 't2'),)),
    ("largest rise of a head that supported the answer is 23.1's {}.",
     ((D + 'backup/top_rise/23.1/rise', 't2'),)),
    ('within {} logits.) `ablate(kind="mean",',
     ((D + 'backup/dla_readout_max_difference', 'e'),)),
    ('the logit difference by {} (23.3, direct',
     ((D + 'backup/single_ablation/23.3/ablate_change', 't2'),)),
    ('attribution {}), {}',
     ((D + 'backup/single_ablation/23.3/dla_clean', 't2'), (D + 'backup/single_ablation/29.1/ablate_change', 't2'),)),
    ('(29.1, {}) and {}',
     ((D + 'backup/single_ablation/29.1/dla_clean', 't2'), (D + 'backup/single_ablation/23.0/ablate_change', 't2'),)),
    ('(23.0, {}): 23.0 alone is mostly compensated.',
     ((D + 'backup/single_ablation/23.0/dla_clean', 't2'),)),
    ('20.0, 19.2) mean-ablated the same way (MLPs intact) keeps {} of the',
     ((D + 'faithfulness/candidates', 'pct'),)),
    ('clean logit difference on the discovery half and {} held out;',
     ((H + 'faithfulness/candidates', 'pct'),)),
    ('the three name-mover candidates alone keep {} and',
     ((D + 'faithfulness/name_movers', 'pct'),)),
    ('{}. Controls: every head ablated,',
     ((H + 'faithfulness/name_movers', 'pct'),)),
    ('{} (held-out {}); five random sets of seven',
     ((D + 'faithfulness/none', 'pct'), (H + 'faithfulness/none', 'pct'),)),
    ('heads, {}, {}, {}, {} and {}%.',
     ((D + 'faithfulness/random_sets/0', 'f0'), (D + 'faithfulness/random_sets/1', 'f0'), (D + 'faithfulness/random_sets/2', 'f0'), (D + 'faithfulness/random_sets/3', 'f0'), (D + 'faithfulness/random_sets/4', 'f0'),)),
]


@cache
def findings() -> dict[str, Any]:
    return json.loads((REPO_ROOT / FINDINGS).read_text(encoding="utf-8"))


@cache
def page() -> str:
    return re.sub(r"\s+", " ", (REPO_ROOT / PAGE).read_text(encoding="utf-8"))


def lookup(data: Any, path: str) -> Any:
    for key in path.split("/"):
        data = data[int(key)] if isinstance(data, list) else data[key]
    return data


def minus(text: str) -> str:
    return text.replace("-", "\u2212")


def number(value: Any, fmt: str) -> str:
    if fmt == "pct":
        v, lo, hi = (f"{x:.0f}" for x in value)
        return minus(f"{v}% [{lo}, {hi}]")
    if fmt == "t2":
        v, lo, hi = (f"{x:.2f}" for x in value)
        return minus(f"{v} [{lo}, {hi}]")
    if fmt == "p0":
        return minus(f"{100 * value:.0f}%")
    if fmt == "f2":
        return minus(f"{value:.2f}")
    if fmt == "f0":
        return minus(f"{value:.0f}")
    if fmt == "e":
        return f"{value:.0e}"
    if fmt == "min":
        return f"{round(value / 60)}"
    if fmt == "d":
        return f"{int(value)}"
    if fmt == "s":
        return str(value)
    raise ValueError(f"unknown format {fmt!r}")


def expected(text: str, keys: tuple[tuple[str, str], ...]) -> str:
    return text.format(*(number(lookup(findings(), path), fmt) for path, fmt in keys))


@pytest.mark.parametrize("text,keys", QUOTES, ids=[q[0][:40] for q in QUOTES])
def test_page_quotes_the_json(text: str, keys: tuple[tuple[str, str], ...]) -> None:
    want = re.sub(r"\s+", " ", expected(text, keys))
    assert want in page(), f"{PAGE} should say {want!r} ({FINDINGS})"


def test_every_quote_names_a_number_of_the_json() -> None:
    assert len(QUOTES) >= 20
    for text, keys in QUOTES:
        assert text.count("{}") == len(keys), text


def test_the_page_names_the_command_and_sizes() -> None:
    data = findings()
    assert "python examples/path_patching_ioi.py --pairs 32 --docs" in page()
    assert data["pairs"] == 32 and data["n_boot"] == 1000


@pytest.mark.parametrize("image", IMAGES)
def test_each_ioi_figure_has_its_json(image: str) -> None:
    png = REPO_ROOT / image
    meta_path = png.with_suffix(".json")
    assert png.is_file() and meta_path.is_file(), f"{image} needs {meta_path.name} beside it"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    assert meta["figure"] == png.name
    assert meta["command"].startswith("python examples/path_patching_ioi.py")
    assert "--docs" in meta["command"] and meta["seed"] == findings()["seed"]
    key = "direct" if "direct" in image else "via_q"
    for split in ("discovery", "heldout"):
        for freeze in ("heads", "all"):
            assert meta["data"][f"{split}_{freeze}"] == findings()["splits"][split][key][freeze]

"""The table of ``docs/circuits.md`` (the ten largest EAP edges of one IOI pair on SmolLM2, with
EAP-IG and the exact edge effect) has no committed JSON behind it, so this test recomputes it
with the page's own call and checks every quoted number and the order of the edges.

Each number is quoted to 3 decimals: the recomputed value must round to it, allowing for
float32 differences of other thread counts (:data:`SLACK`).
"""

from __future__ import annotations

import re

import pytest
from conftest import REPO_ROOT

from causalpatch import edge_attribution

pytestmark = [pytest.mark.real, pytest.mark.usefixtures("one_thread")]

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"
#: half of the last quoted digit (rounding) plus float32 run-to-run differences of normalised
#: scores (other batch shapes and thread counts: ~1e-6 observed in test_edges); a wrong row is
#: off by far more (EAP and exact differ by 0.18 on a20.h0 -> m20).
SLACK = 5e-4 + 2e-5


def _table() -> list[tuple[str, str, float, float, float]]:
    page = (REPO_ROOT / "docs" / "circuits.md").read_text()
    # the table right after "the ten largest EAP edges" (the page has other edge tables)
    start = page.index("the ten largest EAP edges")
    header = page.index("| edge | eap | eap_ig | exact |", start)
    end = page.find("\n\n", header)
    text = page[header:end if end != -1 else len(page)]
    number = r"([+-][\d.]+)"
    rows = re.findall(rf"^\| (\S+) -> (\S+) \| {number} \| {number} \| {number} \|$", text,
                      flags=re.MULTILINE)
    return [(src, dst, float(a), float(b), float(c)) for src, dst, a, b, c in rows]


def test_circuits_table_is_what_the_pages_call_computes(smollm2):
    rows = _table()
    assert len(rows) == 10, "the page's table of the ten largest EAP edges"
    kw = dict(correct=" Mary", incorrect=" John", progress=False)
    eap = edge_attribution(smollm2, CLEAN, CORRUPTED, **kw)
    top = [(s, d) for s, d, _ in eap.top(10)]
    assert top == [(s, d) for s, d, *_ in rows], "the table lists eap.top(10) in order"
    ig = edge_attribution(smollm2, CLEAN, CORRUPTED, method="eap_ig", ig_steps=5, **kw)
    exact = edge_attribution(smollm2, CLEAN, CORRUPTED, method="exact", edges=top, **kw)
    for src, dst, q_eap, q_ig, q_exact in rows:
        for name, result, quoted in (("eap", eap, q_eap), ("eap_ig", ig, q_ig),
                                     ("exact", exact, q_exact)):
            got = result.score(src, dst)
            assert abs(got - quoted) <= SLACK, f"{src} -> {dst} {name}: {got:+.4f} vs {quoted}"

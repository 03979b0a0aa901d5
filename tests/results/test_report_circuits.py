"""The report's circuit sections: edge results drawn as a circuit by layer, circuits, the
faithfulness curve and a circuit's evaluation.

Checked against the results themselves: the embedded JSON's edges, scores, intervals and
nodes are the result's (``EdgeResult.top``, ``ci``, ``Circuit.edges``/``nodes``,
``FaithfulnessCurve.faithfulness``); headless Chromium draws one line per edge (dashed or
dotted for key and value inputs, red or blue by sign) with nothing on the console, and the
page stays offline and escaped. The Chromium helpers are the report tests' own
(``test_report.py``; Debian's ``chromium`` package is required, as there).
"""

from __future__ import annotations

import dataclasses
import html
import json
import re
import warnings
from html.parser import HTMLParser

import pytest
import torch
from conftest import IOI_PAIRS, TextPairs, tiny_model
from test_report import HOSTILE, chromium, page_problems, scripts_of

from causalpatch import edge_attribution
from causalpatch.errors import InvalidArgumentError, InvalidTypeError
from causalpatch.methods.circuits import (DisconnectedCircuitWarning, evaluate_circuit,
                                          faithfulness_curve)
from causalpatch.render.circuit import MAX_VIEW_EDGES, edge_intervals, receiver_kind
from causalpatch.render.html import report

#: Intervals of the drawn edges only against ``EdgeResult.ci()`` of every edge, absolute:
#: the same resamples, the subset's ``counts @ values`` product summed in another blocking;
#: observed 0.0 (bitwise equal) on the tiny LLaMA; bound: a few float32 ulps of values ~2.
CI_ATOL = 1e-6


@pytest.fixture(scope="module")
def circuits():
    """EAP on the tiny LLaMA over 3 pairs (per-pair values kept), the pruned circuit of its 30
    best edges, a faithfulness curve and that circuit's evaluation."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = tiny_model("llama")
        data = TextPairs.of(IOI_PAIRS[:3])
        scores = edge_attribution(model, data, method="eap", keep_per_pair=True)
        chosen = scores.circuit(30)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DisconnectedCircuitWarning)
            curve = faithfulness_curve(model, data, scores,
                                       sizes=[0, 5, 20, 60, scores.graph.n_edges])
        evaluation = evaluate_circuit(model, data, chosen)
    finally:
        torch.set_num_threads(before)
    return {"scores": scores, "circuit": chosen, "curve": curve, "evaluation": evaluation}


def figures_of(page: str) -> list:
    (body,) = [b for attrs, b in scripts_of(page) if "application/json" in attrs]
    return json.loads(body)


def touched(edges: list[tuple[str, str]]) -> set[str]:
    """The nodes a set of edges touches: senders and the nodes of the receivers."""
    return {s for s, _ in edges} | {receiver_kind(d)[0] for _, d in edges}


# -- the embedded data ----------------------------------------------------------------------------
def test_edge_view_holds_the_results_best_edges_scores_and_intervals(circuits):
    scores = circuits["scores"]
    page = report(scores)
    (figure,) = figures_of(page)
    data = figure["circuit"]
    n_view = min(MAX_VIEW_EDGES, scores.graph.n_edges)
    assert data["weighted"] and data["n"] == 50 and len(data["edges"]) == n_view
    assert data["n_graph_edges"] == scores.graph.n_edges == 262
    top = scores.top(n_view)
    assert [(e["src"], e["dst"]) for e in data["edges"]] == [(s, d) for s, d, _ in top]
    # the page's numbers are the result's float32 values exactly
    assert [e["score"] for e in data["edges"]] == [v for _, _, v in top]
    index = [scores.graph.edge_index(s, d) for s, d, _ in top]
    assert [e["change"] for e in data["edges"]] == scores.change[index].tolist()
    # nodes: exactly those the view's edges touch, each edge pointing at its own two
    names = [n[0] for n in data["nodes"]]
    assert set(names) == touched([(s, d) for s, d, _ in top]) and len(names) == len(set(names))
    for e in data["edges"]:
        assert names[e["from"]] == e["src"] and names[e["to"]] == receiver_kind(e["dst"])[0]
        assert e["kind"] == receiver_kind(e["dst"])[1]
        assert f"score {float(scores.score(e['src'], e['dst'])):+.4f}" in e["hover"]
    # the 95% intervals are EdgeResult.ci()'s, for the drawn edges
    lower, upper = scores.ci()
    mine = edge_intervals(scores, index)
    assert mine is not None
    gap = max((torch.tensor(mine[0]) - lower[index]).abs().max(),
              (torch.tensor(mine[1]) - upper[index]).abs().max())
    assert gap <= CI_ATOL, gap
    assert [e["ci"] for e in data["edges"]] == [list(p) for p in zip(*mine)]
    assert "95% CI [" in data["edges"][0]["hover"]
    # the table lists the same edges, those past the drawn 50 hidden
    table = page.split("id='edges-table-0'")[1].split("</table>")[0]
    assert table.count("<tr") == 1 + n_view and table.count("<tr hidden>") == n_view - 50
    assert "95% CI low" in table and f"{top[0][2]:+.4f}" in table


def test_sign_convention_and_line_styles_are_stated(circuits):
    page = report(circuits["scores"], top_edges=7)
    assert "base = clean, source = corrupted: a positive score means patching this edge" in page
    assert "dashed a key (.k); dotted a value (.v)" in page
    (figure,) = figures_of(page)
    assert figure["circuit"]["n"] == 7
    assert figure["dash"] == {"q": "solid", "k": "dash", "v": "dot", "mlp": "solid",
                              "logits": "solid"}


def test_circuit_view_draws_the_circuits_edges_and_nodes(circuits):
    chosen = circuits["circuit"]
    assert 0 < chosen.n_edges <= 30
    (figure,) = figures_of(report(chosen))
    data = figure["circuit"]
    assert not data["weighted"] and data["n"] == chosen.n_edges
    assert [(e["src"], e["dst"]) for e in data["edges"]] == chosen.edges
    assert all(e["score"] is None for e in data["edges"])
    # pruned: every node the circuit keeps is drawn, and only those
    assert {n[0] for n in data["nodes"]} == set(chosen.nodes)


def test_faithfulness_curve_and_evaluation_sections(circuits):
    curve, evaluation = circuits["curve"], circuits["evaluation"]
    page = report([curve, evaluation])
    figures = figures_of(page)
    assert figures[1] is None  # the evaluation is a static table
    best, rand = figures[0]["data"]
    assert best["x"] == curve.fractions
    assert best["y"] == curve.faithfulness.tolist()
    assert rand["y"] == curve.random_faithfulness.tolist()
    assert [c[1] for c in best["customdata"]] == curve.n_edges
    assert [c[1] for c in rand["customdata"]] == curve.random_n_edges
    assert "faithfulness %{y:+.4f}" in best["hovertemplate"]
    for text in (f"CPR (area under the curve, higher is better) {curve.cpr:.4f}",
                 f"CMD (area between the curve and 1, lower is better) {curve.cmd:.4f}",
                 f"random circuits of the same sizes: CPR {curve.random_cpr:.4f}",
                 f"faithfulness {evaluation.faithfulness:+.3f} with {evaluation.n_edges}"):
        assert text in page, text


def test_to_html_of_edges_and_curve_is_the_one_report(circuits, tmp_path):
    scores, curve = circuits["scores"], circuits["curve"]
    page = scores.to_html(tmp_path / "edges.html", title="edges", top_edges=9)
    assert (tmp_path / "edges.html").read_text() == page
    assert page == report([scores], title="edges", top_edges=9)
    assert figures_of(page)[0]["circuit"]["n"] == 9
    text = curve.to_html(tmp_path / "curve.html")
    assert (tmp_path / "curve.html").read_text() == text
    assert "<title>causalpatch: Faithfulness curve: 5 circuit sizes (logit_diff)</title>" in text


def test_without_per_pair_values_there_are_no_intervals(circuits):
    scores = dataclasses.replace(circuits["scores"], per_pair=None)
    page = report(scores)
    data = figures_of(page)[0]["circuit"]
    assert all(e["ci"] is None and "CI" not in e["hover"] for e in data["edges"])
    assert "95% CI low" not in page and "none (needs keep_per_pair=True" in page


def test_user_text_is_escaped_and_the_page_is_offline(circuits):
    scores = dataclasses.replace(circuits["scores"], model_name=HOSTILE[1], metric=HOSTILE[0])
    page = report([scores, circuits["curve"]], title=HOSTILE[0])
    outside = re.sub(r"<script[^>]*>.*?</script>", "", page, flags=re.DOTALL)
    assert "<script>alert" not in outside and "<img" not in outside
    assert f"<title>{html.escape(HOSTILE[0])}</title>" in page
    assert html.escape(HOSTILE[1]) in outside and html.escape(HOSTILE[0]) in outside
    assert len(scripts_of(page)) == 3  # plotly.js, the figures (JSON), the init script
    data = figures_of(page)[0]["circuit"]
    assert all("<script>" not in e["hover"] and "&lt;script&gt;" in e["hover"]
               for e in data["edges"])  # the metric's name, escaped for plotly
    # offline: nothing fetched, a CSP that allows no network
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", outside)
    csp = re.search(r'http-equiv=.Content-Security-Policy. content="([^"]*)"', page).group(1)
    assert "default-src 'none'" in csp and "http" not in csp


def test_report_arguments(circuits):
    with pytest.raises(InvalidArgumentError, match="top_edges must be a positive int"):
        report(circuits["scores"], top_edges=0)
    with pytest.raises(InvalidTypeError, match="EdgeResult, Circuit, FaithfulnessCurve"):
        report([circuits["scores"], "not a result"])


# -- headless Chromium ---------------------------------------------------------------------------
class _Lines(HTMLParser):
    """Per plot element ``plot-N``: its attributes and the ``style`` of every ``path.js-line``
    (plotly's drawn line of a scatter trace), and per table the ``hidden`` rows."""

    def __init__(self) -> None:
        super().__init__()
        self.attrs: dict[str, dict[str, str]] = {}
        self.lines: dict[str, list[str]] = {}
        self.hidden: dict[str, int] = {}
        self.rows: dict[str, list[list[str]]] = {}
        self.current: str | None = None
        self.table: str | None = None

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        if re.fullmatch(r"plot-\d+", a.get("id", "")):
            self.current = a["id"]
            self.attrs[self.current], self.lines[self.current] = a, []
        if tag == "table":
            self.table = a.get("id")
        if tag == "tr" and "hidden" in a and self.table:
            self.hidden[self.table] = self.hidden.get(self.table, 0) + 1
        if tag == "tr" and self.table:
            self.rows.setdefault(self.table, []).append([])
        if tag == "td" and self.table:
            self.rows[self.table][-1].append(a.get("data-v", ""))
        if tag == "path" and self.current and "js-line" in a.get("class", "").split():
            self.lines[self.current].append(a.get("style", ""))

    def handle_endtag(self, tag):
        if tag == "section":
            self.current = None


def test_chromium_draws_the_circuit_the_curve_and_nothing_on_the_console(circuits, tmp_path):
    """With ``#edges-0=12`` the edge view draws 12 lines (the 12 best edges: one per edge,
    dashed/dotted exactly for key/value inputs, red exactly for positive scores) between the
    nodes they touch; the circuit draws each of its edges; the curve its two lines; the
    table hides the rows past 12 and ``#sort-0=4`` sorts it by score (the header's click
    handler); and nothing reaches the console."""
    scores, chosen = circuits["scores"], circuits["circuit"]
    path = tmp_path / "circuits.html"
    report([scores, chosen, circuits["curve"], circuits["evaluation"]], path,
           title="circuits <b>on</b> the tiny LLaMA")
    dom = chromium(path, tmp_path, "--dump-dom", fragment="edges-0=12&sort-0=4")
    assert page_problems(dom, []) == [], dom.stderr[-3000:]
    scan = _Lines()
    scan.feed(dom.stdout)
    top = scores.top(12)
    assert scan.attrs["plot-0"]["data-edges"] == "12"
    assert int(scan.attrs["plot-0"]["data-nodes"]) == len(touched([(s, d) for s, d, _ in top]))
    lines = scan.lines["plot-0"]
    assert len(lines) == 12
    dashed = sum("stroke-dasharray" in style for style in lines)
    assert dashed == sum(receiver_kind(d)[1] in ("k", "v") for _, d, _ in top) > 0
    red = sum("rgb(178, 24, 43)" in style for style in lines)
    assert red == sum(v > 0 for _, _, v in top) and 0 < red < 12
    widths = [float(re.search(r"stroke-width: ([\d.]+)px", s).group(1)) for s in lines]
    assert max(widths) == pytest.approx(8.0)  # the largest |score| is the widest line
    assert scan.attrs["plot-1"]["data-edges"] == str(chosen.n_edges)
    assert int(scan.attrs["plot-1"]["data-nodes"]) == len(chosen.nodes)
    assert len(scan.lines["plot-1"]) == chosen.n_edges
    assert len(scan.lines["plot-2"]) >= 2  # best and random circuits (and their legend keys)
    n_view = min(MAX_VIEW_EDGES, scores.graph.n_edges)
    assert scan.hidden["edges-table-0"] == n_view - 12
    assert "edges-table-1" not in scan.hidden  # the circuit's table shows every edge
    # sorted by score, ascending: the same rows (rank, src, dst, score) in another order
    rows = [r for r in scan.rows["edges-table-0"] if r]
    got = [float(r[4]) for r in rows]
    assert got == sorted(got) and len(rows) == n_view
    assert sorted((int(r[0]), r[1], r[2], float(r[4])) for r in rows) == [
        (k + 1, s, d, v) for k, (s, d, v) in enumerate(scores.top(n_view))]
    assert [int(r[0]) for r in rows] != list(range(1, n_view + 1))

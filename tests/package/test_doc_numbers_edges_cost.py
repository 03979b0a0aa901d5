"""The cost table of docs/circuits.md is ``benchmarks/edges_cost.py --render`` of the committed
JSON, the JSON says how it was made, and the benchmark's own parts work on the tiny LLaMA (the
benchmark itself runs on SmolLM2): EAP-IG's loop re-implemented on hooks gives ``eap_ig``'s
scores, the one-forward-per-edge loop gives the engine's exact scores, and every ratio is the
quotient of the times it reports."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import IOI_PAIRS, REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import edges_cost as C

JSON = REPO_ROOT / "benchmarks" / "results" / "edges_cost.json"
DOC = REPO_ROOT / "docs" / "circuits.md"

#: EAP-IG's loop against ``eap_ig`` on the tiny LLaMA, in metric units relative to the largest
#: score: observed 3.5e-7 (float32: the loop sums steps and batches in another order).
IG_RTOL = 1e-6
#: The one-forward-per-edge loop against the engine's exact scores on the tiny LLaMA, in metric
#: units (logit differences of order 1): observed 6.0e-7 (float32 rounding of the logits: the
#: loop runs the whole prompt in two rows, the engine the positions after the first difference).
EXACT_ATOL = 3e-6


def _doc_table() -> str:
    """The table that follows the Cost section's heading in docs/circuits.md."""
    text = DOC.read_text(encoding="utf-8")
    section = text.split("\n## Cost", 1)[1]
    lines = section.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| measured |"))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append(line)
    return "\n".join(table)


def test_docs_cost_table_is_the_render_of_the_committed_json():
    report = json.loads(JSON.read_text(encoding="utf-8"))
    assert _doc_table() == C.render(report)
    rendered = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "edges_cost.py"),
                               "--render", str(JSON)], capture_output=True, text=True,
                              check=True).stdout
    assert rendered.strip() == _doc_table()


def test_json_records_how_it_was_made():
    report = json.loads(JSON.read_text(encoding="utf-8"))
    assert report["command"].startswith("python benchmarks/edges_cost.py")
    assert report["commit"] and report["threads"] >= 1 and report["repeats"] >= 1
    assert len(report["load_average_before"]) == 3 and len(report["load_average_after"]) == 3
    assert {"machine", "cpus", "python", "torch"} <= set(report["host"])
    r = report["results"]
    assert r["pairs"] == 32 and r["ig_steps"] == 5
    fe = r["forward_equivalents_per_pair"]
    assert fe["eap"] == r["seconds"]["eap"] / r["seconds"]["forward"]
    assert r["targets"]["eap_within_4_fe"] == (fe["eap"] <= 4)


@pytest.fixture
def tiny_data(make_tiny_lm):
    from causalpatch.datasets import PatchingDataset

    model = make_tiny_lm("llama")
    rows = [IOI_PAIRS[0], IOI_PAIRS[2]]  # two lengths: two gradient batches
    data = PatchingDataset([r[0] for r in rows], [r[1] for r in rows],
                           [model.to_single_token(r[2]) for r in rows],
                           [model.to_single_token(r[3]) for r in rows], model=model)
    return model, data


def test_measure_on_the_tiny_llama(tiny_data, one_thread):
    model, data = tiny_data
    before = model.hook_snapshot()
    receivers = ("a1.h1.k", "a2.h0.q", "m1", "logits")
    row = C.measure(model, data, repeats=1, ig_steps=3, curve_pairs=1, loop_edges=4,
                    receivers=receivers, ref_pairs=2, eval_edges=20)
    assert model.hook_snapshot() == before
    json.dumps(row)
    s = row["seconds"]
    assert row["forward_equivalents_per_pair"]["eap"] == s["eap"] / s["forward"]
    assert row["curve"]["curve_over_eval"] == s["curve_20"] / s["evaluate_circuit"]
    ig = row["eap_ig_vs_reference"]
    assert ig["max_abs_score"] > 0
    assert ig["max_abs_diff"] <= IG_RTOL * ig["max_abs_score"]
    assert [e["receiver"] for e in row["exact"]] == list(receivers)
    for e in row["exact"]:
        assert e["max_abs_change"] > 0
        assert e["max_abs_change"] >= 100 * EXACT_ATOL  # not vacuous
        assert e["max_abs_diff_vs_loop"] <= EXACT_ATOL, e
        assert e["speedup"] == e["loop_s_scaled"] / e["engine_s"]
    # the rows the curve runs: more circuits, more rows; one circuit at least the layer calls
    c = row["curve"]
    assert c["layer_rows_curve"] > c["layer_rows_eval"] >= (1 + 1 + 2) * model.n_layers
    assert C.render({"results": row, "memory": {}}).startswith("| measured | target |")

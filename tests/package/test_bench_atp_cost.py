"""Smoke test of benchmarks/atp_cost.py's own pieces on the tiny LLaMA (the benchmark itself
runs on SmolLM2): every method is timed and turned into forward-equivalents per pair, the
recall of the exact top-k is what an independent count gives, and the row is JSON."""

from __future__ import annotations

import json
import math
import sys

import torch
from conftest import REPO_ROOT, TextPairs

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import atp_cost as C

DATA = TextPairs(["When Mary and John went to the store, John gave a drink to"],
                 ["When Mary and John went to the store, Mary gave a drink to"],
                 [" Mary"], [" John"])


def test_measure_reports_every_method_recall_and_targets(make_tiny_lm, one_thread):
    model = make_tiny_lm("llama")
    row = C.measure(model, DATA, component="attn_head", by_position=True, repeats=1, top_k=3)
    json.dumps(row)
    assert set(row["seconds"]) == {"forward", *C.METHODS}
    for method in C.METHODS:
        fe = row["forward_equivalents_per_pair"][method]
        assert math.isfinite(fe) and fe > 0
        assert fe == row["seconds"][method] / row["seconds"]["forward"]
    assert row["cells"] == model.n_layers * model.dims.n_heads * len(model.to_tokens(
        DATA.clean[0])[0])
    # recall, counted independently from the two results
    from causalpatch import activation_patching, attribution_patching

    exact = activation_patching(model, DATA, component="attn_head", by_position=True)
    proven = attribution_patching(model, DATA, component="attn_head", by_position=True,
                                  method="atp*", verify="auto", top_k=3)
    flat = exact.effect_matrix.abs().flatten()
    want = {tuple(int(c) for c in torch.unravel_index(torch.tensor(i), exact.shape))
            for i in torch.topk(flat, 3).indices.tolist()}
    got = {tuple(e["cell"]) for e in proven.extra["verified"]}
    assert row["recall_top_k"] == len(want & got) / 3
    assert row["verified_cells"] == len(got)
    assert set(row["targets"]) == {"atp*_within_L_plus_4", "screen_prove_within_20pct_of_exact",
                                   "recall_1"}
    assert row["targets"]["recall_1"] == (row["recall_top_k"] == 1.0)

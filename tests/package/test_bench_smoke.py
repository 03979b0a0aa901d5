"""Smoke test of the benchmark's own pieces (benchmarks/peers.py, bench_patching.py), on the tiny
LLaMA: the reference loop agrees with causalpatch, right padding is exact, and the page renders.
(The peers are a bench-only extra; the benchmark checks their agreement on every run.)
The benchmark itself is `make bench` / `bench_patching.py --quick`."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from conftest import REPO_ROOT, assert_matches_reference

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import bench_patching as B  # noqa: E402
import peers as P  # noqa: E402

CLEAN = ["When Mary and John went to the store, John gave a drink to",
         "When John and Mary went to the store, Mary gave a drink"]
CORRUPTED = ["When Mary and John went to the store, Mary gave a drink to",
             "When John and Mary went to the store, John gave a drink"]


#: Logit difference of a right-padded batch row against the prompt alone, float32 logits of the
#: tiny LLaMA. Observed 0 (bitwise equal); allowed: about 10 float32 ulps of a logit of ~1,
#: because a batch of 2 with longer rows may take other matmul kernels on another machine.
PADDING_TOL = 1e-6
#: Relative tolerance of the benchmark's ablation loop against ``ablate``
#: (:func:`conftest.assert_matches_reference`). Observed 4.4e-7 (|diff| 1.8e-7 on effects up to
#: 0.4): the loop runs each prompt alone, ``ablate`` batches them (other summation orders).
ABLATE_RTOL = 4e-6


@pytest.fixture(scope="module")
def tiny(make_tiny_lm):
    return make_tiny_lm("llama")


def _answers(model):
    mary, john = model.to_single_token(" Mary"), model.to_single_token(" John")
    return [mary, john], [john, mary]


def test_right_padding_is_exact(tiny, one_thread):
    correct, incorrect = _answers(tiny)
    batch = P.make_pair_batch(tiny.tokenizer, CLEAN, CORRUPTED, correct, incorrect)
    assert batch.clean.shape[0] == 2 and batch.last.tolist()[0] > batch.last.tolist()[1]
    with torch.no_grad():
        padded = batch.logit_diff(tiny.hf_model(input_ids=batch.corrupted).logits)
        for i, text in enumerate(CORRUPTED):
            ids = tiny.tokenizer(text, return_tensors="pt").input_ids
            assert torch.equal(ids[0], tiny.to_tokens(text)[0])  # same tokens causalpatch uses
            last = tiny.hf_model(input_ids=ids).logits[0, -1]
            diff = abs(float(padded[i]) - float(last[correct[i]] - last[incorrect[i]]))
            if os.environ.get("CAUSALPATCH_TOL_REPORT"):
                print(f"\n[tol] right padding row {i}: {diff:.3g}")
            assert diff <= PADDING_TOL


def test_ablation_loop_matches_ablate(tiny, one_thread):
    from causalpatch import ablate

    correct, incorrect = _answers(tiny)
    ids = [tiny.tokenizer(p, return_tensors="pt").input_ids for p in CLEAN]
    loop = P.loop_zero_ablate_heads(tiny.hf_model, ids, correct, incorrect)
    ours = ablate(tiny, CLEAN, component="attn_head", kind="zero", correct=correct,
                  incorrect=incorrect).effect_matrix
    assert loop.shape == ours.shape
    # zero-ablation effects (ablated - original: unpatched value 0), by the suite's rule
    assert_matches_reference(ours.float(), loop, 0.0, rtol=ABLATE_RTOL, min_cells=4,
                             what="benchmark loop vs ablate")


def test_page_renders_failures_visibly():
    rec = {"impl": "fast", "label": B.LABELS["fast"], "forwards": 0, "rows": 0, "seconds": 1.0,
           "times": [1.0], "runs": 1, "fast_speedup": 1.0, "vs_naive": 5.0, "max_abs_diff": 1e-7,
           "forward_equivalents": 3.0, "rows_per_pass": 10, "layer_tokens": 100,
           "floor_forward_equivalents": 1.5, "floor_s": 0.4,
           "engine_stats": {"rows": 4},
           "memory": {"peak_mib": 2000.0, "added_mib": 1000.0, "base_mib": 1000.0,
                      "rows_per_pass": 10, "peak_ratio": 2.0, "added_ratio": 10.0,
                      "plain": {"peak_mib": 1000.0, "added_mib": 100.0}}}
    naive = {**rec, "impl": "naive", "label": B.LABELS["naive"], "seconds": 5.0,
             "fast_speedup": 5.0, "vs_naive": 1.0, "memory": None}
    tl = {"impl": "tl", "label": B.LABELS["tl"], "forwards": 10, "rows": 10,
          "not_run": "not run: would take 10 forwards"}
    sweep = {"name": "mlp_neuron", "title": "t", "n_pairs": 1, "n_cells": 4, "layers": [0],
             "mean_tokens": 5.0, "reference": "naive", "plain_forward_s": 0.3,
             "unit_cost_s": 4e-3, "impls": [rec, naive, tl], "prompts": ["p"]}
    report = {"command": "x", "date": "d", "load_s": 1.0, "load_before": "0", "load_after": "0",
              "machine": {"cpu": "c", "cores": 2, "usable_cores": 2, "ram_gib": 1.0,
                          "platform": "p", "python": "3"},
              "versions": {k: "v" for k in ("torch", "transformers", "transformer-lens",
                                            "nnsight", "causalpatch", "causalpatch_commit")},
              "config": {"quick": False, "repeats": 3, "threads": 2}, "sweeps": [sweep]}
    report["headline"] = B.headline([sweep])
    assert report["headline"][0]["met"] is False  # 5x < 20x
    md = B.render_markdown(report)
    # the fast time the target needs (5.0 s / 20) beside the compute floor
    assert "| mlp_neuron | naive | ≥20x | 5.0x | **no** | 1.000 | 0.250 | 0.400 |" in md
    assert "Compute floor: 100 layer-tokens × 4000.0 µs" in md and "(2.50× the floor)" in md
    assert "**2.00**" in md  # memory over the 1.5x target is marked
    assert "not run: would take 10 forwards" in md

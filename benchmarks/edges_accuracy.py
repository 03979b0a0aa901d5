"""How well EAP and EAP-IG rank edges against exact edge patching, on SmolLM2 IOI pairs.

Scores every edge of SmolLM2-135M-Instruct's graph (123,211 edges) with
:func:`causalpatch.edge_attribution` ``method="eap"`` and ``"eap_ig"`` over ``--pairs`` IOI
pairs (noising, ``logit_diff``), then runs ``method="exact"`` on a candidate set: the union of
each method's top ``--top`` edges and ``--random`` edges drawn uniformly (seed 0). Reports:

* Spearman's rho between each estimate and the exact score over the **random** edges (an
  unbiased sample of the graph);
* top-k recall over the candidate set: the fraction of the exact top-k edges (by |score|)
  that the method's own top-k holds, k = 10 and 20 (exact scores exist only for candidates,
  so an edge that neither method ranks high and the draw missed cannot count: the recall is
  an upper bound on the recall over the whole graph);
* the largest |estimate - exact| among the exact top 20.

Run (writes the JSON the docs quote)::

    python benchmarks/edges_accuracy.py --pairs 8 --threads 2 \
        --json benchmarks/results/edges_accuracy.json
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def top(score: torch.Tensor, k: int) -> set[int]:
    return set(torch.argsort(score, descending=True, stable=True)[:k].tolist())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--top", type=int, default=50)
    parser.add_argument("--random", type=int, default=200)
    parser.add_argument("--ig-steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from causalpatch import InterpretableModel, edge_attribution
    from causalpatch.datasets import IOIDataset

    model = InterpretableModel("smollm2")
    data = IOIDataset(model, n=args.pairs)
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    eap = edge_attribution(model, data, progress=False)
    seconds["eap"] = time.perf_counter() - t
    t = time.perf_counter()
    ig = edge_attribution(model, data, method="eap_ig", ig_steps=args.ig_steps, progress=False)
    seconds["eap_ig"] = time.perf_counter() - t
    graph = eap.graph
    gen = torch.Generator().manual_seed(0)
    drawn = torch.randperm(graph.n_edges, generator=gen)[: args.random].tolist()
    ranked = [int(i) for r in (eap, ig)
              for i in torch.argsort(r.scores.abs(), descending=True)[: args.top]]
    candidates = sorted(set(drawn) | set(ranked))
    t = time.perf_counter()
    exact = edge_attribution(model, data, method="exact",
                             edges=[graph.edge_names(i) for i in candidates], progress=False)
    seconds["exact"] = time.perf_counter() - t
    cand = torch.tensor(candidates)
    rand = torch.tensor(sorted(drawn))
    out: dict[str, Any] = {
        "model": "SmolLM2-135M-Instruct", "pairs": args.pairs, "n_edges": graph.n_edges,
        "ig_steps": args.ig_steps, "n_candidates": len(candidates), "n_random": len(drawn),
        "seconds": seconds, "threads": args.threads, "methods": {}}
    x_all = exact.scores[cand]
    for name, result in (("eap", eap), ("eap_ig", ig)):
        est = result.scores[cand]
        stats: dict[str, Any] = {
            "spearman_random": spearman(exact.scores[rand], result.scores[rand])}
        for k in (10, 20):
            stats[f"recall_top{k}"] = len(top(x_all.abs(), k) & top(est.abs(), k)) / k
        best = torch.argsort(x_all.abs(), descending=True)[:20]
        stats["max_abs_error_top20"] = float((est[best] - x_all[best]).abs().max())
        out["methods"][name] = stats
    best = torch.argsort(x_all.abs(), descending=True)[:10]
    out["exact_top10"] = [
        {"edge": "{} -> {}".format(*graph.edge_names(int(cand[i]))),
         "exact": float(x_all[i]), "eap": float(eap.scores[cand[i]]),
         "eap_ig": float(ig.scores[cand[i]])} for i in best]
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()

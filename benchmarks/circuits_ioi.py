"""The IOI circuit of SmolLM2: faithfulness curves of EAP and EAP-IG circuits beside random
circuits, and the top circuit's edges checked exactly.

On ``--pairs`` IOI pairs (noising, ``logit_diff``), scores every edge of SmolLM2-135M's graph
with :func:`causalpatch.edge_attribution` ``method="eap"`` and ``"eap_ig"``, then for each:

* :func:`causalpatch.faithfulness_curve` at MIB's sizes (fractions 0, 0.001, ..., 0.5, 1 of
  the edges), top edges by ``|score|``, pruned, with a random baseline (seed 0): per size the
  faithfulness, and CPR (area under the curve) and CMD (area between the curve and 1);
* the faithfulness of the greedy circuit (EAP-IG's search) of ``--edges`` edges beside the
  top-``--edges`` circuit;
* the ``--check`` best edges of EAP-IG's top circuit scored with ``method="exact"`` (each
  edge patched alone), beside their EAP-IG score.

Run (writes the JSON docs/circuits.md quotes)::

    python benchmarks/circuits_ioi.py --pairs 8 --threads 2 \
        --json benchmarks/results/circuits_ioi.json
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from typing import Any

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--ig-steps", type=int, default=5)
    parser.add_argument("--edges", type=int, default=500)
    parser.add_argument("--check", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from causalpatch import (InterpretableModel, edge_attribution, evaluate_circuit,
                             faithfulness_curve)
    from causalpatch.datasets import IOIDataset
    from causalpatch.methods.circuits import DisconnectedCircuitWarning

    warnings.simplefilter("ignore", DisconnectedCircuitWarning)  # the empty circuit, size 0
    model = InterpretableModel("smollm2")
    data = IOIDataset(model, n=args.pairs, seed=0)
    seconds: dict[str, float] = {}
    out: dict[str, Any] = {"model": model.name, "n_pairs": len(data), "metric": "logit_diff",
                           "direction": "noise", "ig_steps": args.ig_steps}
    scores = {}
    for method in ("eap", "eap_ig"):
        t = time.perf_counter()
        scores[method] = edge_attribution(model, data, method=method, ig_steps=args.ig_steps,
                                          progress=False)
        seconds[method] = time.perf_counter() - t
    out["n_graph_edges"] = scores["eap"].graph.n_edges
    for method, result in scores.items():
        t = time.perf_counter()
        curve = faithfulness_curve(model, data, result, progress=False)
        seconds[f"curve_{method}"] = time.perf_counter() - t
        top = result.circuit(args.edges)
        greedy = result.circuit(args.edges, greedy=True)
        t = time.perf_counter()
        faith = {name: evaluate_circuit(model, data, c, progress=False).faithfulness
                 for name, c in (("top", top), ("greedy", greedy))}
        seconds[f"circuits_{method}"] = time.perf_counter() - t
        out[method] = {"curve": curve.to_dict(),
                       "circuit": {"requested": args.edges, "top_edges": top.n_edges,
                                   "top_nodes": len(top.nodes), "greedy_edges": greedy.n_edges,
                                   "top_faithfulness": faith["top"],
                                   "greedy_faithfulness": faith["greedy"]}}
        print(f"{method}: CPR {curve.cpr:.3f} CMD {curve.cmd:.3f} (random CPR "
              f"{curve.random_cpr:.3f} CMD {curve.random_cmd:.3f}); {args.edges} edges: top "
              f"{faith['top']:.3f} ({top.n_edges} kept), greedy {faith['greedy']:.3f}",
              flush=True)
    best = scores["eap_ig"].circuit(args.edges)
    ranked = sorted(best.edges, key=lambda e: -abs(scores["eap_ig"].score(*e)))[:args.check]
    t = time.perf_counter()
    exact = edge_attribution(model, data, method="exact", edges=ranked, progress=False)
    seconds["exact_check"] = time.perf_counter() - t
    out["checked"] = [{"src": s, "dst": d, "eap_ig": scores["eap_ig"].score(s, d),
                       "eap": scores["eap"].score(s, d), "exact": exact.score(s, d)}
                      for s, d in ranked]
    out["seconds"] = seconds
    out["eap_ig"]["circuit"]["edges"] = [list(e) for e in best.edges]
    text = json.dumps(out, indent=1)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(text)
    print(json.dumps({k: v for k, v in out.items() if k not in ("eap", "eap_ig")}, indent=1))


if __name__ == "__main__":
    main()

"""The IOI circuit on SmolLM2 with path patching: name-mover and S-inhibition candidates.

Run (about two minutes on two CPU cores)::

    python examples/path_patching_ioi.py [--pairs 32] [--out out/path_patching_ioi]

1. Every head -> logits (``freeze="heads"``): heads whose output moves the answer directly
   (name-mover candidates; Wang et al. 2022, section 3.1).
2. Every head -> the queries of the top three name-mover candidates: heads that tell them
   which name to attend to (S-inhibition candidates, section 3.2).

Writes ``direct.json``/``direct.png``, ``via_queries.json``/``via_queries.png`` and a
``report.html`` to ``--out``, the docs figures to ``docs/img/`` with ``--docs``, and prints the
top heads of both sweeps with their effects.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from causalpatch import InterpretableModel, path_patching, report
from causalpatch.datasets import IOIDataset

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("out/path_patching_ioi"))
    parser.add_argument("--docs", action="store_true", help="also write docs/img figures")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    model = InterpretableModel("smollm2")
    ioi = IOIDataset(model, n=args.pairs, seed=args.seed)
    t0 = time.perf_counter()
    direct = path_patching(model, ioi, senders="attn_head", receivers="logits")
    t_direct = time.perf_counter() - t0
    movers = [idx for idx, value in direct.top_components(3, by="value") if value > 0]
    t0 = time.perf_counter()
    via_q = path_patching(model, ioi, senders="attn_head", receivers=movers, receiver_input="q")
    t_q = time.perf_counter() - t0

    summary = {
        "model": model.name, "pairs": len(ioi), "seed": args.seed,
        "direct_seconds": round(t_direct, 1), "via_queries_seconds": round(t_q, 1),
        "name_mover_candidates": [[list(i), round(v, 4)] for i, v in direct.top_components(8)],
        "receivers": [list(m) for m in movers],
        "s_inhibition_candidates": [[list(i), round(v, 4)] for i, v in via_q.top_components(8)],
    }
    for name, result, title in (
            ("direct", direct, f"Path patching, every head -> logits ({model.name}, "
                               f"{len(ioi)} IOI pairs)"),
            ("via_queries", via_q, f"Every head -> queries of {movers} ({model.name}, "
                                   f"{len(ioi)} IOI pairs)")):
        result.to_json(args.out / f"{name}.json")
        fig = result.plot(title=title)
        fig.savefig(args.out / f"{name}.png", dpi=130, bbox_inches="tight")
        if args.docs:
            fig.savefig(ROOT / "docs" / "img" / f"ioi_path_{name}.png", dpi=130,
                        bbox_inches="tight")
    report([direct, via_q], args.out / "report.html", title="IOI path patching on SmolLM2")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

"""How well AtP and AtP* rank components against exact activation patching, over many pairs.

For each task (IOI, factual recall; ``--pairs`` pairs each, SmolLM2-135M-Instruct, float32) and
each component kind (``attn_head``, ``attn_head_q``, ``attn_head_k``, ``mlp``: all positions
jointly; ``resid_post`` by position), runs the exact sweep
(:func:`causalpatch.activation_patching`) and the first-order estimates
(:func:`causalpatch.attribution_patching`, ``method="atp"`` and ``"atp*"``), then reports,
over the dataset's mean effects:

* Spearman's rho between the estimate and the exact effect (with a 95% bootstrap interval over
  pairs: pairs resampled, both mean effects recomputed from ``per_pair``);
* top-k recall: the fraction of the exact top-k cells (by |effect|) that the method's top-k
  holds, for k = 10 and 20 (AtP* ranks by ``max(|estimate|, GradDrop)``, as its screen does);
* false negatives: exact top-20 cells the method ranks below its top 40 (the cells a
  screen of twice the budget would miss).

Run (writes the JSON the docs quote)::

    python benchmarks/atp_accuracy.py --pairs 32 --threads 2 \
        --json benchmarks/results/atp_accuracy.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

import torch

COMPONENTS = ("attn_head", "attn_head_q", "attn_head_k", "mlp", "resid_post")
#: Sweep options per component: ``resid_post`` over all positions jointly restores the whole
#: residual stream (every layer's exact effect is 1.0, a ranking of ties), so it is by position.
OPTIONS: dict[str, dict[str, Any]] = {"resid_post": {"by_position": True}}
#: A by-position sweep needs pairs of one token length: such components run on ``--pairs``
#: pairs of the most common length among this many times as many pairs of the same seed.
DRAW_FACTOR = 6


def one_length(model: Any, make: Any, n: int) -> tuple[int, Any]:
    """``(length, data)``: ``n`` pairs of one token length (the most common one) from
    ``make(n * DRAW_FACTOR)``."""
    length, same = next(iter(make(n * DRAW_FACTOR).by_length(model).items()))
    if len(same) < n:
        raise SystemExit(f"only {len(same)} pairs of one length ({length} tokens) among "
                         f"{n * DRAW_FACTOR}; lower --pairs or raise DRAW_FACTOR")
    return length, same.subset(range(n))


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.flatten().argsort().argsort().double()
    rb = b.flatten().argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def top(score: torch.Tensor, k: int) -> set[int]:
    return set(torch.argsort(score.flatten(), descending=True, stable=True)[:k].tolist())


def rank_stats(exact: torch.Tensor, estimate: torch.Tensor, score: torch.Tensor
               ) -> dict[str, Any]:
    out: dict[str, Any] = {"spearman": spearman(exact, estimate)}
    for k in (10, 20):
        k_ = min(k, exact.numel())
        out[f"recall_top{k}"] = len(top(exact.abs(), k_) & top(score, k_)) / k_
    k_ = min(20, exact.numel())
    out["false_negatives_top20_outside_top40"] = len(
        top(exact.abs(), k_) - top(score, min(2 * k_, exact.numel())))
    return out


def bootstrap_rho(exact_pp: torch.Tensor, est_pp: torch.Tensor, n_boot: int, seed: int
                  ) -> list[float]:
    """95% interval of Spearman's rho of the mean effects over resampled pairs."""
    gen = torch.Generator().manual_seed(seed)
    n = exact_pp.shape[0]
    rhos = []
    for _ in range(n_boot):
        idx = torch.randint(n, (n,), generator=gen)
        rhos.append(spearman(exact_pp[idx].mean(0), est_pp[idx].mean(0)))
    lo, hi = torch.tensor(rhos).quantile(torch.tensor([0.025, 0.975], dtype=torch.float64)
                                         .float()).tolist()
    return [lo, hi]


def render(out: dict[str, Any]) -> str:
    """The markdown table docs/attribution_patching.md quotes, from this script's JSON."""
    lines = ["| task | component | method | Spearman rho [95% CI] | top-10 recall | top-20 recall "
             "| false negatives |", "|---|---|---|---|---:|---:|---:|"]
    for key, row in out["results"].items():
        task, component = key.split("/")
        for method in ("atp", "atp*"):
            st = row[method]
            lo, hi = st["spearman_ci95"]
            lines.append(
                f"| {task} | `{component}` | {'AtP' if method == 'atp' else 'AtP*'} | "
                f"{st['spearman']:.3f} [{lo:.3f}, {hi:.3f}] | {st['recall_top10']:.2f} | "
                f"{st['recall_top20']:.2f} | {st['false_negatives_top20_outside_top40']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-boot", type=int, default=200)
    parser.add_argument("--components", default=",".join(COMPONENTS))
    parser.add_argument("--json", default=None)
    parser.add_argument("--update", action="store_true",
                        help="replace only this run's rows in an existing --json file")
    parser.add_argument("--render", default=None, metavar="JSON",
                        help="print the docs' markdown table of a finished run's JSON and exit")
    args = parser.parse_args()
    if args.render:
        with open(args.render, encoding="utf-8") as fh:
            print(render(json.load(fh)))
        return
    torch.set_num_threads(args.threads)
    from causalpatch import InterpretableModel, activation_patching, attribution_patching
    from causalpatch.datasets import FactualRecallDataset, IOIDataset

    model = InterpretableModel("smollm2")
    makers = {"ioi": lambda n: IOIDataset(model, n=n, seed=0),
              "factual": lambda n: FactualRecallDataset(model, n=n, seed=0)}
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=False).stdout.strip() or None
    out: dict[str, Any] = {"model": model.name, "pairs": args.pairs, "threads": args.threads,
                           "commit": commit, "seed": 0,
                           "command": "python benchmarks/atp_accuracy.py " + " ".join(
                               sys.argv[1:]),
                           "n_boot": args.n_boot, "results": {}}
    for task, make in makers.items():
        for component in args.components.split(","):
            row: dict[str, Any] = {}
            opts = OPTIONS.get(component, {})
            if opts.get("by_position"):
                length, data = one_length(model, make, args.pairs)
                row["pairs_note"] = (f"{args.pairs} pairs of one token length ({length}), "
                                     f"the most common among "
                                     f"{args.pairs * DRAW_FACTOR} pairs of seed 0")
            else:
                data = make(args.pairs)
            t0 = time.perf_counter()
            exact = activation_patching(model, data, component=component, progress=False,
                                        **opts)
            row["exact_s"] = time.perf_counter() - t0
            assert exact.per_pair is not None
            estimates: dict[str, torch.Tensor] = {}
            for method in ("atp", "atp*"):
                t0 = time.perf_counter()
                est = attribution_patching(model, data, component=component, method=method,
                                           progress=False, **opts)
                seconds = time.perf_counter() - t0
                score = est.effect_matrix.abs()
                if method == "atp*":
                    drop = torch.tensor(est.extra["graddrop"], dtype=torch.float32)
                    score = torch.maximum(score, drop.reshape(score.shape))
                stats = rank_stats(exact.effect_matrix, est.effect_matrix, score)
                assert est.per_pair is not None
                stats["spearman_ci95"] = bootstrap_rho(exact.per_pair, est.per_pair,
                                                       args.n_boot, seed=0)
                stats["seconds"] = seconds
                row[method] = stats
                estimates[method] = est.effect_matrix
            # the exact top 20 with both estimates: where the misses are
            flat = exact.effect_matrix.flatten()
            order = torch.argsort(flat.abs(), descending=True, stable=True)[:20].tolist()
            shape = tuple(exact.effect_matrix.shape)
            row["exact_top20"] = [
                {"cell": list(torch.unravel_index(torch.tensor(i), shape)[j].item()
                              for j in range(len(shape))),
                 "exact": float(flat[i]),
                 **{m: float(estimates[m].flatten()[i]) for m in ("atp", "atp*")}}
                for i in order]
            out["results"][f"{task}/{component}"] = row
            print(task, component, {m: {k: (round(v, 3) if isinstance(v, float) else v)
                                        for k, v in row[m].items() if k != "spearman_ci95"}
                                    for m in ("atp", "atp*")}, flush=True)
    if args.json:
        if args.update and os.path.exists(args.json):
            with open(args.json, encoding="utf-8") as fh:
                old = json.load(fh)
            for key in out["results"]:  # rows of this run replace the old run's, say by what
                old["results"][key] = {**out["results"][key], "commit": out["commit"],
                                       "command": out["command"]}
            out = old
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()

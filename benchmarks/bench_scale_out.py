"""Scale-out benchmark: an IOI ``attn_head`` sweep on a local Ray instance vs the local loop.

Runs, in one process and one after another (never at the same time):

1. the local run with ``torch.set_num_threads(THREADS)`` (default 2: the whole machine);
2. the same sweep with ``executor=RayExecutor(num_workers=W, num_cpus_per_worker=1)`` on a
   local Ray instance (``ray.init(num_cpus=W)``), cold: Ray starts its actors and each loads
   SmolLM2 from the ``"smollm2"`` specification;
3. the same again, warm (the actors are kept: no model load);
4. warm Ray sweeps of 8, 16 and 32 pairs (and the 64-pair one above) while a thread samples
   the driver's RSS, to show that the driver's memory does not grow with the number of pairs.

It prints a Markdown table and writes JSON (``--json PATH``). Numbers are wall-clock seconds
on this machine; Ray's overhead (connect, actor start, model load per worker, scheduling) is
reported separately from the workers' compute.

Usage::

    .venv/bin/python benchmarks/bench_scale_out.py --pairs 64 --workers 2 --json out/scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import torch


class RssSampler:
    """Peak resident memory of this process while the ``with`` block runs (MiB)."""

    def __init__(self, every: float = 0.05) -> None:
        import psutil

        self.proc, self.every, self.peak, self.start = psutil.Process(), every, 0, 0
        self._stop = threading.Event()

    def __enter__(self) -> RssSampler:
        self.start = self.peak = self.proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.start) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the local run")
    parser.add_argument("--memory-pairs", default="8,16,32")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from causalpatch import InterpretableModel, activation_patching
    from causalpatch.datasets import IOIDataset
    from causalpatch.executors import RayExecutor

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = InterpretableModel("smollm2")
    load_s = time.perf_counter() - t0
    data = IOIDataset(model, n=args.pairs, seed=0)
    out: dict[str, Any] = {"pairs": args.pairs, "workers": args.workers,
                           "local_threads": args.threads, "driver_model_load_s": load_s,
                           "cells": args.pairs * model.n_layers * model.n_heads}

    t0 = time.perf_counter()
    local = activation_patching(model, data, component="attn_head")
    out["local_s"] = time.perf_counter() - t0

    torch.set_num_threads(1)  # the driver only stores results while the workers compute
    ray.init(address="local", num_cpus=args.workers, include_dashboard=False,
             log_to_driver=False)
    ex = RayExecutor(num_workers=args.workers, num_cpus_per_worker=1)
    try:
        runs = {}
        for name in ("cold", "warm"):
            t0 = time.perf_counter()
            with RssSampler() as rss:
                result = activation_patching(model, data, component="attn_head", executor=ex)
            wall = time.perf_counter() - t0
            summary = result.extra["executor"]
            runs[name] = {
                "wall_s": wall, "startup_s": summary["startup_s"],
                "connect_s": summary["connect_s"],
                "model_load_s": [w["load_s"] for w in summary["workers"]],
                "compute_s": [w["compute_s"] for w in summary["workers"]],
                "scheduling_s": summary["scheduling_s"], "shards": summary["shards"],
                "cells_per_s": [w["cells_per_s"] for w in summary["workers"]],
                "max_abs_diff": float((result.effect_matrix - local.effect_matrix).abs().max()),
                "bit_identical": bool(torch.equal(result.effect_matrix, local.effect_matrix)),
                "driver_rss_growth_mib": rss.growth_mib,
            }
        out["ray"] = runs
        memory = [{"pairs": args.pairs, "driver_rss_growth_mib": runs["warm"][
            "driver_rss_growth_mib"], "driver_rss_peak_mib": float("nan")}]
        for n in [int(x) for x in args.memory_pairs.split(",") if x]:
            subset = IOIDataset(model, n=n, seed=0)
            with RssSampler() as rss:
                activation_patching(model, subset, component="attn_head", executor=ex)
            memory.append({"pairs": n, "driver_rss_growth_mib": rss.growth_mib,
                           "driver_rss_peak_mib": rss.peak / 2**20})
        out["driver_memory"] = memory
    finally:
        ex.shutdown()
        ray.shutdown()

    print("| run | wall s | of which Ray startup (connect + actors + model load) | "
          "worker compute s | scheduling s | equal to local |")
    print("|---|---|---|---|---|---|")
    print(f"| local, {args.threads} threads | {out['local_s']:.1f} | - | {out['local_s']:.1f} | "
          f"- | - |")
    for name, r in out["ray"].items():
        same = "bit-identical" if r["bit_identical"] else f"max diff {r['max_abs_diff']:.1e}"
        print(f"| Ray {name}, {args.workers} workers x 1 thread | {r['wall_s']:.1f} | "
              f"{r['startup_s']:.1f} (model load {', '.join(f'{x:.1f}' for x in r['model_load_s'])}) | "
              f"{', '.join(f'{x:.1f}' for x in r['compute_s'])} | {r['scheduling_s']:.2f} | "
              f"{same} |")
    for m in out["driver_memory"]:
        print(f"driver RSS growth during a {m['pairs']}-pair Ray sweep: "
              f"{m['driver_rss_growth_mib']:.1f} MiB (peak {m['driver_rss_peak_mib']:.0f} MiB)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

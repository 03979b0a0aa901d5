"""Compare the fast engine of two causalpatch checkouts on the same sweeps, interleaved.

Usage::

    python benchmarks/bench_versions.py OLD_SRC NEW_SRC [--rounds 3]

``OLD_SRC``/``NEW_SRC`` are ``src`` folders of two checkouts (e.g. a ``git worktree`` of an older
commit). Each round runs one subprocess per checkout (old, new, old, new, ...): it loads the
embedded SmolLM2 once, runs the IOI ``resid_post`` by-position sweep and the ``attn_head``
sweep three times each (``BENCH_THREADS`` torch threads, default 2) and prints the minimum wall time. The table reports, per sweep, the
minimum over rounds and the ratio new/old (< 1 is faster), plus the largest difference between
the two versions' effect matrices.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, os, time
import torch
torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
from causalpatch import InterpretableModel, activation_patching
model = InterpretableModel("smollm2")
clean = "When Mary and John went to the store, John gave a drink to"
corrupted = "When Mary and John went to the store, Mary gave a drink to"
out = {}
for name, kw in (("resid_post x position", dict(component="resid_post", by_position=True)),
                 ("attn_head", dict(component="attn_head"))):
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        r = activation_patching(model, clean, corrupted, correct=" Mary", incorrect=" John", **kw)
        times.append(time.perf_counter() - t0)
    out[name] = {"seconds": min(times), "effect": r.effect_matrix.flatten().tolist()}
print("RESULT" + json.dumps(out))
"""


def run(src: str) -> dict:
    env = {**os.environ, "PYTHONPATH": src}
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True,
                          check=True)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    best: dict[str, dict[str, float]] = {"old": {}, "new": {}}
    effects: dict[str, dict[str, list[float]]] = {"old": {}, "new": {}}
    for _ in range(args.rounds):
        for which in ("old", "new"):
            for sweep, data in run(getattr(args, which)).items():
                prev = best[which].get(sweep, float("inf"))
                best[which][sweep] = min(prev, data["seconds"])
                effects[which][sweep] = data["effect"]
    print("| sweep | old (s) | new (s) | new / old | max abs diff of effects |")
    print("|---|---|---|---|---|")
    for sweep in best["old"]:
        old, new = best["old"][sweep], best["new"][sweep]
        diff = max(abs(a - b) for a, b in zip(effects["old"][sweep], effects["new"][sweep]))
        print(f"| {sweep} | {old:.3f} | {new:.3f} | {new / old:.2f} | {diff:.1e} |")


if __name__ == "__main__":
    main()

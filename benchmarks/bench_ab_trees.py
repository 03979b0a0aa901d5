"""Two source trees of causalpatch side by side in one process: the one-pair sweeps of
``make bench`` (resid_post by position, attn_head; one IOI pair on SmolLM2), interleaved, min
of N, with the largest difference of their effect matrices.

Used to check that a refactor of the core leaves the sweeps' speed and numbers as they were:

    git worktree add /tmp/old <commit>
    .venv/bin/python benchmarks/bench_ab_trees.py --old /tmp/old/src --new src --repeats 5 \
        --json benchmarks/results/ab_<name>.json

Both trees wrap the same Hugging Face model (loaded once); each call runs with its own tree's
modules in ``sys.modules``. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from types import ModuleType
from typing import Any

import torch

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"
SWEEPS = {"resid_post_by_position": dict(component="resid_post", by_position=True),
          "attn_head": dict(component="attn_head")}


def _ours() -> list[str]:
    return [k for k in sys.modules if k == "causalpatch" or k.startswith("causalpatch.")]


def load(src: str) -> tuple[ModuleType, dict[str, ModuleType]]:
    """Import the package from ``src`` alone; returns it and its modules."""
    for key in _ours():
        del sys.modules[key]
    sys.path.insert(0, src)
    try:
        package = importlib.import_module("causalpatch")
    finally:
        sys.path.remove(src)
    return package, {k: sys.modules[k] for k in _ours()}


def use(modules: dict[str, ModuleType]) -> None:
    for key in _ours():
        del sys.modules[key]
    sys.modules.update(modules)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", required=True, help="src folder of the reference tree")
    parser.add_argument("--new", required=True, help="src folder of the tree under test")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    old, old_mods = load(args.old)
    new, new_mods = load(args.new)
    use(new_mods)
    m_new = new.InterpretableModel("smollm2")
    use(old_mods)
    m_old = old.InterpretableModel(m_new.hf_model, tokenizer=m_new.tokenizer)
    trees = (("old", old, old_mods, m_old), ("new", new, new_mods, m_new))
    out: dict[str, Any] = {"repeats": args.repeats, "threads": args.threads,
                           "old": args.old, "new": args.new, "sweeps": {}}
    for name, kwargs in SWEEPS.items():
        times: dict[str, list[float]] = {"old": [], "new": []}
        effects = {}
        for _ in range(args.repeats):
            for tag, package, modules, model in trees:
                use(modules)
                t0 = time.perf_counter()
                result = package.activation_patching(model, CLEAN, CORRUPTED, correct=" Mary",
                                                     incorrect=" John", progress=False, **kwargs)
                times[tag].append(time.perf_counter() - t0)
                effects[tag] = result.effect_matrix
        row = {"old_min_s": min(times["old"]), "new_min_s": min(times["new"]),
               "new_over_old": min(times["new"]) / min(times["old"]),
               "max_abs_diff": float((effects["old"] - effects["new"]).abs().max()),
               "old_s": times["old"], "new_s": times["new"]}
        out["sweeps"][name] = row
        print(f"{name}: old {row['old_min_s']:.3f} s, new {row['new_min_s']:.3f} s, "
              f"new/old {row['new_over_old']:.3f}, max |diff| {row['max_abs_diff']:.2g}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()

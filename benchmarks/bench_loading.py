"""First (cold weight cache) vs second (warm cache) load of a GGUF model.

Each load runs in its own fresh Python process, so nothing is shared but the cache folder:

1. ``cold``: an empty ``$CAUSALPATCH_CACHE``; the GGUF is parsed, de-quantised and written to
   the cache.
2. ``warm`` (``--warm`` times): the same cache; the model loads from the safetensors entry.
3. ``nocache`` (with ``--nocache``): ``CAUSALPATCH_NO_CACHE=1``, the load as it was before the
   cache existed.

Each child times ``load_hf(resolve_source(model))`` only (interpreter start and ``import
transformers`` are reported separately as ``import_s``). It also prints the logits of one
prompt's last position, and the parent checks that every load gave identical logits.

Run: ``python benchmarks/bench_loading.py [--model smollm2] [--warm 2] [--nocache]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch, transformers
torch.set_num_threads(2)
from causalpatch.loading import load_hf, resolve_source
t1 = time.perf_counter()
model, tokenizer = load_hf(resolve_source(sys.argv[1]), quiet=True)
t2 = time.perf_counter()
ids = tokenizer("The Eiffel Tower is in the city of", return_tensors="pt")["input_ids"]
with torch.no_grad():
    last = model(ids).logits[0, -1]
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "logits": last.tolist()}))
"""


def run_child(model: str, env: dict[str, str]) -> dict[str, object]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**env, "PYTHONPATH": os.pathsep.join([src, env.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", CHILD, model], env=env, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--warm", type=int, default=2, help="warm loads after the cold one")
    parser.add_argument("--nocache", action="store_true", help="also time a load without cache")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="causalpatch-bench-cache-") as cache:
        env = {**os.environ, "CAUSALPATCH_CACHE": cache}
        env.pop("CAUSALPATCH_NO_CACHE", None)
        runs: list[tuple[str, dict[str, object]]] = []
        if args.nocache:
            runs.append(("nocache", run_child(args.model, {**env, "CAUSALPATCH_NO_CACHE": "1"})))
        runs.append(("cold", run_child(args.model, env)))
        for _ in range(args.warm):
            runs.append(("warm", run_child(args.model, env)))
        size = sum(p.stat().st_size for p in Path(cache).rglob("*") if p.is_file())
    load1 = os.getloadavg()[0]
    for label, r in runs:
        print(f"{label:8s} load {r['load_s']:7.2f} s   (interpreter + imports {r['import_s']:.2f} s)")
    cold = next(r["load_s"] for label, r in runs if label == "cold")
    warm = [r["load_s"] for label, r in runs if label == "warm"]
    if warm:
        best = min(warm)
        print(f"cold / best warm = {cold / best:.1f}x   (cache entry {size / 2**20:.0f} MiB)")
    same = all(r["logits"] == runs[0][1]["logits"] for _, r in runs)
    print(f"identical last-position logits in every run: {same}")
    print(f"machine: {os.cpu_count()} cores, 1-min load average {load1:.2f} at the end, "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()

"""Hook overhead and hook memory hygiene.

1. Trace overhead on SmolLM2: a plain ``transformers`` forward vs ``model.trace`` with a
   read-only hook on every layer (``blocks.L.resid_post`` cached for all 30 layers), and vs a
   trace with an intervention hook on every layer. Minimum of ``--repeats`` runs of 20 forwards.
2. Leaks: 10,000 traced forwards with interventions and caching on a tiny LLaMA; RSS growth
   between forward 1,000 and forward 10,000 (target < 5%), and no hook left behind.

Run: ``python benchmarks/bench_hooks.py``.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import causalpatch.interventions as iv  # noqa: E402
from causalpatch import InterpretableModel  # noqa: E402

PROMPT = "When Mary and John went to the store, John gave a drink to"


def rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def overhead(repeats: int) -> dict[str, float]:
    model = InterpretableModel("smollm2")
    ids = model.to_tokens(PROMPT)
    names = [f"blocks.{i}.resid_post" for i in range(model.n_layers)]
    steer = {f"blocks.{i}.mlp": iv.scale(1.0) for i in range(model.n_layers)}

    def plain() -> None:
        with torch.no_grad():
            model.hf_model(input_ids=ids)

    def cached() -> None:
        model.trace(PROMPT, cache=names).run()

    def intervened() -> None:
        model.trace(PROMPT, interventions=steer).run()

    out = {}
    for name, fn in (("plain forward", plain), ("trace, cache every layer", cached),
                     ("trace, intervention on every layer", intervened)):
        fn()
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(20):
                fn()
            best = min(best, (time.perf_counter() - t0) / 20)
        out[name] = best
    return out


def leaks(n: int) -> tuple[float, float, bool]:
    from conftest import id_llama

    model = id_llama(n_layers=4)  # the checkpoint tests' tiny LLaMA (ckpt_worker.tiny_model)
    before_hooks = model.hook_snapshot()
    prompt = [[5, 9, 13, 17, 21, 25]]
    start = 0.0
    for i in range(n):
        model.trace(prompt, interventions={"blocks.1.attn.z": iv.zero(heads=[1]),
                                           "blocks.2.mlp": iv.scale(0.5)},
                    cache=["blocks.0.resid_post", "blocks.3.attn.z"]).run()
        if i == 999:
            start = rss_mib()
    end = rss_mib()
    return start, end, model.hook_snapshot() == before_hooks


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--forwards", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    times = overhead(args.repeats)
    base = times["plain forward"]
    for name, t in times.items():
        print(f"{name:38s} {t * 1e3:7.2f} ms  ({(t / base - 1) * 100:+.1f}% vs plain)")
    start, end, clean = leaks(args.forwards)
    print(f"RSS after 1,000 traced forwards {start:.1f} MiB, after {args.forwards:,}: "
          f"{end:.1f} MiB ({(end / start - 1) * 100:+.2f}%); hooks left behind: "
          f"{'none' if clean else 'YES'}")


if __name__ == "__main__":
    main()

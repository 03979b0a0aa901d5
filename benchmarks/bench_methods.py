"""Timings of path patching and causal tracing on SmolLM2-135M, and the ROME figures.

Two parts, one model load:

* ``path``: IOI (``IOIDataset``, 32 pairs by default). First the direct effect of every head
  on the logits (``receivers="logits"``), which picks out name-mover-like heads; then every
  head's effect through the queries of the top three of those heads (``receiver_input="q"``),
  which picks out the heads that tell the name movers where to look (S-inhibition-like).
  Prints both wall times (target: under 60 s each) and the top heads.
* ``rome``: causal tracing averaged over ROME's known facts that SmolLM2 gets right (100 by
  default), in ROME's six position groups, with the MLP and attention windows of 10 layers as
  in the paper's figures; writes ``docs/img/rome_mlp.png`` and ``docs/img/rome_attn.png``
  (``--out-json`` also saves the results). This takes a while on a CPU: about
  ``n_facts x n_samples x 7 s`` with one free core.

Run: ``python benchmarks/bench_methods.py path``, ``... rome`` or ``... all``
(``--threads``, ``--pairs``, ``--facts``, ``--samples``, ``--window``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
IMG = ROOT / "docs" / "img"


def bench_path(model, n_pairs: int, seed: int = 0) -> dict:
    """Time the two IOI path-patching sweeps; returns timings and top heads."""
    from causalpatch import path_patching
    from causalpatch.datasets import IOIDataset

    ioi = IOIDataset(model, n=n_pairs, seed=seed)
    path_patching(model, ioi.subset([0]), senders="attn_head", receivers="logits")  # warm-up
    t0 = time.perf_counter()
    direct = path_patching(model, ioi, senders="attn_head", receivers="logits")
    t_direct = time.perf_counter() - t0
    print(f"path patching, every head -> logits, {len(ioi)} IOI pairs: {t_direct:.1f} s")
    print(direct.summary())
    movers = [idx for idx, value in direct.top_components(3, by="value") if value > 0]
    t0 = time.perf_counter()
    via_q = path_patching(model, ioi, senders="attn_head", receivers=movers, receiver_input="q")
    t_q = time.perf_counter() - t0
    print(f"\npath patching, every head -> queries of {movers}, {len(ioi)} pairs: {t_q:.1f} s")
    print(via_q.summary())
    return {"n_pairs": len(ioi), "direct_s": t_direct, "via_q_s": t_q, "movers": movers,
            "direct_top": direct.top_components(5), "via_q_top": via_q.top_components(5)}


def bench_rome(model, n_facts: int, n_samples: int, window: int, seed: int = 0,
               out_json: str | None = None) -> dict:
    """Average causal tracing over known facts; writes the two ROME figures."""
    from causalpatch import causal_tracing_dataset
    from causalpatch.datasets import known_facts

    facts = known_facts(model, n_facts, seed=seed)
    print(f"{len(facts)} known facts that {model.name} gets right")
    done = [time.perf_counter()]

    def progress(k: int, total: int) -> None:
        if k % 10 == 0 or k == total:
            elapsed = time.perf_counter() - done[0]
            print(f"  {k}/{total} facts, {elapsed:.0f} s", flush=True)

    t0 = time.perf_counter()
    result = causal_tracing_dataset(model, facts, noise=3.0, n_samples=n_samples, seed=seed,
                                    components=("mlp", "attn"), window=window,
                                    progress=progress)
    elapsed = time.perf_counter() - t0
    print(f"causal tracing of {len(facts)} facts ({n_samples} noise samples, window {window}): "
          f"{elapsed:.0f} s")
    print(result.summary())
    IMG.mkdir(parents=True, exist_ok=True)
    for kind in ("mlp", "attn"):
        res = result[kind]
        title = (f"Restoring {'MLP' if kind == 'mlp' else 'attention'} outputs "
                 f"(window {window}) — {model.name}, {len(facts)} known facts, "
                 f"{n_samples} noise samples")
        fig = result.plot(kind, title=title)
        path = IMG / f"rome_{kind}.png"
        fig.savefig(path, dpi=130)
        print(f"wrote {path}")
        print("mean IE per group (max over layers, at layer):")
        for g, name in enumerate(res.labels["group"]):
            column = res.effect_matrix[:, g]
            print(f"  {name:>24}: {float(column.max()):+.4f} at layer {int(column.argmax())}"
                  f"  (n={res.extra['group_counts'][g]})")
    print(f"p_clean {float(result.p_clean.mean()):.3f}, p_corrupted "
          f"{float(result.p_corrupted.mean()):.3f}")
    if out_json:
        payload = {kind: json.loads(result[kind].to_json()) for kind in result}
        payload["p_clean"] = result.p_clean.tolist()
        payload["p_corrupted"] = result.p_corrupted.tolist()
        Path(out_json).write_text(json.dumps(payload), encoding="utf-8")
        print(f"wrote {out_json}")
    return {"n_facts": len(facts), "seconds": elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("part", choices=["path", "rome", "all"], nargs="?", default="path")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--facts", type=int, default=100)
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--out-json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from causalpatch import InterpretableModel

    model = InterpretableModel("smollm2")
    print(f"{model!r}\ntorch threads: {args.threads}\n")
    if args.part in ("path", "all"):
        bench_path(model, args.pairs)
    if args.part in ("rome", "all"):
        bench_rome(model, args.facts, args.samples, args.window, out_json=args.out_json)


if __name__ == "__main__":
    main()

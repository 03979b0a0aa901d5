"""Side-by-side benchmark of patching sweeps on SmolLM2-135M (float32, 2 threads).

One process, one model load. For the IOI pair ("When Mary and John went to the store, John gave
a drink to" / "... Mary gave a drink to") it times, as the minimum of ``--repeats`` runs:

* the full ``resid_post`` layer x position sweep (30 x 14), and
* the all-heads sweep (``attn_head``, 30 x 9, all positions jointly),

with causalpatch's engine, causalpatch's naive reference (one forward per patch),
TransformerLens 4.x (``TransformerBridge`` + its ``patching`` module) and nnsight 0.8 (one
trace per patch, and batched invokes). It prints wall times, speed-ups and the max abs
difference of every effect matrix from causalpatch's, measures peak memory of a sweep against a
plain batched forward of the same batch size (in subprocesses), and writes the table to
``docs/benchmarks.md``.

Run: ``make bench`` (installs the peers in the bench extra, torch stays at 2.13.0), or
``python benchmarks/bench_patching.py --repeats 3``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"


def best_of(fn: Callable[[], torch.Tensor], repeats: int) -> tuple[float, torch.Tensor]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    assert out is not None
    return min(times), out


def memory_probe(mode: str) -> None:
    """Run in a subprocess: peak RSS (MiB) added by a sweep or a plain forward of its batch."""
    from causalpatch import InterpretableModel, activation_patching

    torch.set_num_threads(2)
    model = InterpretableModel("smollm2")
    ids = model.to_tokens(CORRUPTED)
    with torch.no_grad():
        model.hf_model(input_ids=ids)  # warm up allocator and kernels
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if mode == "sweep":
        result = activation_patching(model, CLEAN, CORRUPTED, component="resid_post",
                                     by_position=True, correct=" Mary", incorrect=" John")
        rows = int(result.extra.get("rows", 150))
    else:
        rows = int(mode.split(":")[1])
        with torch.no_grad():
            model.hf_model(input_ids=ids.expand(rows, -1))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"mode": mode, "rows": rows, "peak_added_mib": after - before}))


def _probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--memory-probe", mode], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-peers", action="store_true")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--memory-probe", default=None)
    parser.add_argument("--out", default=str(HERE.parent / "docs" / "benchmarks.md"))
    args = parser.parse_args()
    if args.memory_probe:
        memory_probe(args.memory_probe)
        return

    torch.set_num_threads(2)
    from causalpatch import InterpretableModel, activation_patching

    t0 = time.perf_counter()
    model = InterpretableModel("smollm2")
    load_s = time.perf_counter() - t0
    hf, tok = model.hf_model, model.tokenizer
    correct, incorrect = model.to_single_token(" Mary"), model.to_single_token(" John")
    rows: list[dict] = []

    def ours(component: str, by_position: bool, method: str = "fast") -> torch.Tensor:
        return activation_patching(model, CLEAN, CORRUPTED, component=component,
                                   by_position=by_position, engine=method, correct=" Mary",
                                   incorrect=" John").effect_matrix

    sweeps = {
        "resid_post 30x14": ("resid_post", True),
        "attn_head 30x9": ("attn_head", False),
    }
    peers: dict[str, list[tuple[str, Callable[[], torch.Tensor]]]] = {k: [] for k in sweeps}
    if not args.skip_peers:
        import peers as P

        bridge = P.boot_tl_bridge(hf, tok)
        lm = P.wrap_nnsight(hf, tok)
        common = (hf, tok, CLEAN, CORRUPTED, correct, incorrect)
        peers["resid_post 30x14"] = [
            ("TransformerLens 4 (patching module)",
             lambda: P.tl_resid_post_sweep(*common, bridge=bridge)),
            ("nnsight 0.8, one trace per patch",
             lambda: P.nnsight_resid_post_sweep_per_trace(*common, lm=lm)),
            ("nnsight 0.8, batched invokes",
             lambda: P.nnsight_resid_post_sweep_batched(*common, lm=lm)),
        ]
        peers["attn_head 30x9"] = [
            ("TransformerLens 4 (patching module)",
             lambda: P.tl_head_sweep(*common, bridge=bridge)),
            ("nnsight 0.8, batched invokes", lambda: P.nnsight_head_sweep(*common, lm=lm)),
        ]

    for name, (component, by_position) in sweeps.items():
        ours(component, by_position)  # warm-up
        t_ours, ref = best_of(lambda: ours(component, by_position), args.repeats)
        rows.append({"sweep": name, "impl": "causalpatch (fast engine)", "s": t_ours,
                     "diff": 0.0})
        contenders = list(peers[name])
        if not args.skip_naive:
            contenders.insert(0, ("causalpatch naive (1 forward/patch)",
                                  lambda: ours(component, by_position, "naive")))
        for label, fn in contenders:
            t, out = best_of(fn, args.repeats)
            diff = (out.float().reshape(ref.shape) - ref).abs().max().item()
            rows.append({"sweep": name, "impl": label, "s": t, "diff": diff})
        for row in rows:
            if row["sweep"] == name:
                row["speedup"] = row["s"] / t_ours
                print(f"{name:18s} {row['impl']:40s} {row['s']:8.3f} s  x{row['speedup']:6.1f}"
                      f"  max|diff| {row['diff']:.2e}", flush=True)

    mem_sweep = _probe("sweep")
    mem_forward = _probe(f"forward:{mem_sweep['rows']}")
    ratio = mem_sweep["peak_added_mib"] / max(mem_forward["peak_added_mib"], 1e-9)
    print(f"peak memory: sweep {mem_sweep['peak_added_mib']:.1f} MiB, plain forward of "
          f"{mem_sweep['rows']} rows {mem_forward['peak_added_mib']:.1f} MiB (ratio {ratio:.2f})")

    lines = [
        "# Benchmarks",
        "",
        "Produced by `python benchmarks/bench_patching.py --repeats "
        f"{args.repeats}` (also `make bench`) in one process on this machine: "
        f"{platform.processor() or platform.machine()}, 2 threads, torch {torch.__version__}, "
        f"SmolLM2-135M-Instruct in float32 (load {load_s:.1f} s). Wall time is the minimum of "
        f"{args.repeats} runs of the whole call (baselines included); the speed-up is relative "
        "to causalpatch's fast engine; max |diff| is the largest absolute difference of the "
        "normalised effect matrix from the fast engine's.",
        "",
        "IOI pair: \"When Mary and John went to the store, John gave a drink to\" / \"... Mary "
        "gave a drink to\", metric: logit difference ' Mary' - ' John', denoising.",
        "",
        "| sweep | implementation | wall time (s) | slower than causalpatch | max abs diff |",
        "|---|---|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(f"| {row['sweep']} | {row['impl']} | {row['s']:.3f} | "
                     f"{row['speedup']:.1f}x | {row['diff']:.1e} |")
    lines += [
        "",
        f"Peak memory added by the resid_post sweep: {mem_sweep['peak_added_mib']:.1f} MiB; by a "
        f"plain batched forward of the same {mem_sweep['rows']} rows: "
        f"{mem_forward['peak_added_mib']:.1f} MiB (ratio {ratio:.2f}; measured as growth of the "
        "peak RSS in a fresh subprocess after loading the model).",
        "",
        "Differences of ~1e-6 from TransformerLens come from its eager attention (the others "
        "use PyTorch's SDPA kernel).",
        "",
    ]
    Path(args.out).write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

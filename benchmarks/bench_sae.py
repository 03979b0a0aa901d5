"""SAE feature patching speed on SmolLM2-135M (recorded in docs/sae_patching.md).

1. **Exact patching of every feature** of a 4096-feature SAE at one position of one IOI pair
   (``sae_patching(features="all", positions=[p])``, fast engine), against the naive baseline
   of one full forward per feature (timed in the same run: ``--naive-sample`` plain forwards
   of the base prompt, the cheapest a per-feature loop can be, times the number of features).
2. **Attribution for all features** (``sae_attribution``, every feature at every position) in
   forward-equivalents: its time over the time of one forward of the same prompt.
3. The dense worst case: every feature row changes (each feature set to 1.0 at S2), so the
   engine skips nothing; the same comparison.
4. A consistency check: the fast engine equals the naive engine on a sample of features.

The 4096-feature SAE is trained once with the same settings as ``causalpatch sae train``
(``--features 4096``) and cached in ``benchmarks/.cache`` (about 15 minutes on one core).

Run: ``python benchmarks/bench_sae.py [--threads 1] [--repeats 3] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from causalpatch import InterpretableModel, sae_attribution, sae_patching
from causalpatch.datasets import IOIDataset
from causalpatch.engine import last_logits, patched_logits, run_base_and_source
from causalpatch.plan import SitePatch
from causalpatch.sae import load_sae, save_sae, train_sae

CACHE = Path(__file__).resolve().parent / ".cache" / "smollm2-blocks.20.resid_post-topk-4096"


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sae", type=Path, default=CACHE)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--naive-sample", type=int, default=64,
                        help="forwards timed for the one-forward-per-feature baseline")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = InterpretableModel("smollm2")
    if not (args.sae / "cfg.json").exists():
        print(f"training a 4096-feature SAE into {args.sae} (once)")
        sae, report = train_sae(model, "blocks.20.resid_post", 4096, log=print)
        print(report.summary())
        save_sae(sae, args.sae, storage_dtype=torch.float16)
    sae = load_sae(args.sae)
    report = sae.metadata.get("training_report", {})
    data = IOIDataset(model, n=1, seed=0, equal_length=True)
    clean, corrupted = data.clean[0], data.corrupted[0]
    ids_clean = model.to_tokens(clean)
    ids_corr = model.to_tokens(corrupted)
    s2 = int((ids_clean[0] != ids_corr[0]).nonzero()[0])
    T = ids_clean.shape[1]
    print(f"SAE: {sae.architecture} k={sae.k}, {sae.d_sae} features at {sae.site} "
          f"(EV {report.get('explained_variance', float('nan')):.3f}, "
          f"L0 {report.get('l0', float('nan')):.1f}); pair: {clean!r} / {corrupted!r}; "
          f"{T} tokens, S2 = {s2}; torch threads {torch.get_num_threads()}")

    # one forward of the base prompt (the unit), and the naive per-feature baseline
    def forward() -> torch.Tensor:
        with torch.no_grad():
            return last_logits(model, ids_corr)

    forward()
    t_forward = statistics.median(timed(forward, 1)[0] for _ in range(max(5, args.repeats)))
    t_sample, _ = timed(lambda: [forward() for _ in range(args.naive_sample)], 1)
    t_naive = t_sample / args.naive_sample * sae.d_sae

    rows = []
    for label, pos in (("S2", s2), ("END", T - 1)):
        def exact(pos: int = pos):
            return sae_patching(model, sae, clean, corrupted, features="all", positions=[pos],
                                references=False, correct=data.correct[0],
                                incorrect=data.incorrect[0])

        exact()  # warm-up
        t_exact, result = timed(exact, args.repeats)
        rows.append({"position": f"{label} ({pos})", "seconds": t_exact,
                     "naive_seconds": t_naive, "speedup": t_naive / t_exact,
                     "rows": result.extra.get("rows", 0),
                     "noop": result.extra.get("noop_cells", 0)})

    # the dense worst case: every row changes (each feature in turn set to 1.0 at S2, error term
    # from the base run), so nothing is skipped; the engine directly, on the same pair
    site = model.site(sae.site)
    run = run_base_and_source(model, ids_corr[0].tolist(), ids_clean[0].tolist(), [site],
                              [(SitePatch(site, (s2,)),)])
    x = run.base.acts[site.name][0, s2]
    with torch.no_grad():
        f = sae.encode(x)
        f_rows = f.repeat(sae.d_sae, 1)
        f_rows[torch.arange(sae.d_sae), torch.arange(sae.d_sae)] = 1.0
        values = x + (sae.decode(f_rows) - sae.decode(f))
    dense = [(SitePatch(site, (s2,), None, values[j:j + 1]),) for j in range(sae.d_sae)]

    def dense_run():
        stats: dict = {}
        patched_logits(model, run, dense, stats=stats)
        return stats

    t_dense, dense_stats = timed(dense_run, 1)
    rows.append({"position": f"S2 ({s2}), dense: all {sae.d_sae} rows change",
                 "seconds": t_dense, "naive_seconds": t_naive, "speedup": t_naive / t_dense,
                 "rows": dense_stats.get("rows", 0), "noop": dense_stats.get("skipped", 0)})

    def attribution():
        return sae_attribution(model, sae, clean, corrupted, features="all", by_position=True,
                               correct=data.correct[0], incorrect=data.incorrect[0])

    attribution()
    t_attr, attr = timed(attribution, max(3, args.repeats))

    # consistency: fast == naive engine on a sample of the features that differ
    live = [j for j in torch.argsort(sae_patching(
        model, sae, clean, corrupted, positions=[s2], references=False,
        correct=data.correct[0], incorrect=data.incorrect[0]).effect_matrix.abs(),
        descending=True)[:16].tolist()]
    kw = dict(features=live, positions=[s2], references=False, correct=data.correct[0],
              incorrect=data.incorrect[0])
    diff = float((sae_patching(model, sae, clean, corrupted, **kw).effect_matrix
                  - sae_patching(model, sae, clean, corrupted, engine="naive", **kw
                                 ).effect_matrix).abs().max())

    print(f"\none forward (last-position logits): {1000 * t_forward:.1f} ms; naive baseline "
          f"{sae.d_sae} forwards = {t_naive:.1f} s (from {args.naive_sample} timed)")
    print("\n| exact patching of every feature | time | one forward per feature | speedup | "
          "rows computed | exact no-ops |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['position']} | {r['seconds']:.2f} s | {r['naive_seconds']:.1f} s | "
              f"{r['speedup']:.0f}x | {r['rows']} | {r['noop']} |")
    print(f"\nattribution, {sae.d_sae} features x {T} positions: {t_attr:.3f} s = "
          f"{t_attr / t_forward:.2f} forward-equivalents (the batched base + source forward "
          f"{attr.timings['forward_s']:.3f} s, backward {attr.timings['backward_s']:.3f} s)")
    print(f"fast vs naive engine on the top 16 features at S2: max |difference| {diff:.2e}")
    if args.json is not None:
        args.json.write_text(json.dumps({
            "forward_s": t_forward, "naive_s": t_naive, "exact": rows, "attribution_s": t_attr,
            "attribution_forward_equivalents": t_attr / t_forward, "fast_vs_naive": diff,
            "threads": torch.get_num_threads(), "d_sae": sae.d_sae}, indent=1))


if __name__ == "__main__":
    main()

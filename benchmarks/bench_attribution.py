"""Cost and accuracy of attribution patching on SmolLM2-135M (IOI, float32, CPU).

Cost: times (minimum of ``--repeats`` runs) one plain forward pass of the corrupted prompt and
one :func:`attribution_patching` run estimating *every* head at *every* position
(``attn_head``, ``by_position=True``: 30 x 14 x 9 = 3780 cells), and prints the ratio. The
attribution pass is one source forward, one base forward and one backward; the target is at most
4 forward-pass equivalents. With ``--exact`` it also times the exact sweep of the same cells.

Accuracy (``--figure PATH``): runs attribution and exact activation patching for ``attn_head``
(all positions jointly) and ``resid_post`` by position, prints Pearson correlations (overall, and
without the position of the changed name token) and writes a two-panel scatter plot, estimate
against exact, with its JSON beside it (``scripts/provenance.py``: command, commit, settings,
both panels' matrices and correlations). The figure in ``docs/attribution_patching.md`` comes
from (``--figure-only`` skips the timings; ``make figures`` runs this, under a minute)::

    python benchmarks/bench_attribution.py --threads 1 --figure-only \
        --figure docs/img/attribution_vs_exact.png

Timings on a shared machine are only meaningful with as many threads as idle cores (an
oversubscribed OpenMP pool can slow every pass down tens of times; the *ratio* stays sane).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from provenance import write_figure_json

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"
ANSWERS = dict(correct=" Mary", incorrect=" John")
CHANGED = 9  # position of " John" / " Mary"


def best_of(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]).double())[0, 1])


def cost(model: Any, repeats: int, exact: bool) -> None:
    from causalpatch import activation_patching
    from causalpatch import attribution_patching

    ids = model.to_tokens(CORRUPTED)

    def forward() -> None:
        with torch.no_grad():
            model.hf_model(input_ids=ids)

    def attribution() -> Any:
        return attribution_patching(model, CLEAN, CORRUPTED, component="attn_head",
                                    by_position=True, **ANSWERS)

    def forward_last() -> None:
        with torch.no_grad():
            model.hf_model(input_ids=ids, logits_to_keep=1)

    forward()  # warm up kernels and the allocator
    attribution()
    t_fwd = best_of(forward, repeats)
    t_last = best_of(forward_last, repeats)
    t_attr = best_of(attribution, repeats)
    phases = attribution().timings
    print(f"plain forward ({ids.shape[1]} tokens):           {t_fwd * 1e3:8.1f} ms")
    print(f"  (last-position logits only:                    {t_last * 1e3:8.1f} ms)")
    print(f"attribution, all heads x positions (3780 cells): {t_attr * 1e3:8.1f} ms "
          f"= {t_attr / t_fwd:.2f} forward passes ({t_attr / t_last:.2f} last-logit ones)")
    print("  phases of one more run: " + ", ".join(
        f"{k}={v * 1e3:.1f} ms" for k, v in phases.items()
        if k.endswith("_s") and k not in ("verify_s",)))
    if exact:
        t_exact = best_of(lambda: activation_patching(model, CLEAN, CORRUPTED,
                                                      component="attn_head", by_position=True,
                                                      **ANSWERS), 1)
        print(f"exact activation patching, same cells:          {t_exact * 1e3:8.1f} ms "
              f"= {t_exact / t_fwd:.1f} forward passes ({t_exact / t_attr:.0f}x attribution)")


def accuracy(model: Any, figure: Path, started: float, threads: int) -> None:
    from matplotlib.figure import Figure

    from causalpatch import activation_patching
    from causalpatch import attribution_patching

    panels = []
    record: list[dict[str, Any]] = []
    for component, by_position in (("attn_head", False), ("resid_post", True)):
        kw = dict(component=component, by_position=by_position, **ANSWERS)
        est = attribution_patching(model, CLEAN, CORRUPTED, **kw).effect_matrix
        exact = activation_patching(model, CLEAN, CORRUPTED, **kw).effect_matrix
        r = pearson(est, exact)
        line = f"{component} ({'layer x position' if by_position else 'layer x head'}): r = {r:.3f}"
        if by_position:
            keep = [p for p in range(est.shape[1]) if p != CHANGED]
            r_rest = pearson(est[:, keep], exact[:, keep])
            r_changed = pearson(est[:, CHANGED], exact[:, CHANGED])
            line += (f"; without the changed token r = {r_rest:.3f}; at the changed token "
                     f"r = {r_changed:.3f}, estimate {est[:16, CHANGED].mean():.2f} vs exact "
                     f"{exact[:16, CHANGED].mean():.2f} (mean of layers 0-15)")
        else:
            top_e = sorted(((float(v), i) for i, v in enumerate(est.flatten())), reverse=True)[:5]
            line += "; top estimates (layer, head, estimate, exact): " + ", ".join(
                f"({i // 9}, {i % 9}, {v:.2f}, {float(exact.flatten()[i]):.2f})"
                for v, i in top_e)
        print(line)
        panels.append((component, by_position, est, exact, r))
        record.append({"component": component, "by_position": by_position, "pearson_r": r,
                       "line": line, "estimate": est.tolist(), "exact": exact.tolist()})

    fig = Figure(figsize=(10, 4.4), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, (_component, by_position, est, exact, r) in zip(axes, panels):
        lo = float(min(est.min(), exact.min())) - 0.05
        hi = float(max(est.max(), exact.max())) + 0.05
        ax.plot([lo, hi], [lo, hi], color="0.6", lw=1, ls="--", label="estimate = exact")
        if by_position:
            mask = torch.zeros_like(exact, dtype=torch.bool)
            mask[:, CHANGED] = True
            ax.scatter(exact[~mask], est[~mask], s=12, alpha=0.7, label="other positions")
            ax.scatter(exact[mask], est[mask], s=18, color="tab:red",
                       label=f"changed token (pos {CHANGED})")
            ax.set_title(f"resid_post, layer x position (r = {r:.2f})")
        else:
            ax.scatter(exact.flatten(), est.flatten(), s=12, alpha=0.7, label="heads")
            ax.set_title(f"attn_head, layer x head (r = {r:.2f})")
        ax.set_xlabel("exact effect (activation patching)")
        ax.set_ylabel("estimate (attribution patching)")
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle("SmolLM2-135M, IOI, logit_diff, denoising")
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=120)
    settings = {"model": model.name, "clean": CLEAN, "corrupted": CORRUPTED, **ANSWERS,
                "metric": "logit_diff", "direction": "denoise", "method": "atp",
                "changed_position": CHANGED, "threads": threads}
    write_figure_json(figure, seed=None, settings=settings, data=record, started=started)
    print(f"wrote {figure} and its JSON")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--exact", action="store_true", help="also time the exact sweep")
    parser.add_argument("--figure", type=Path, default=None, help="write the accuracy scatter")
    parser.add_argument("--figure-only", action="store_true",
                        help="with --figure: skip the timings, only draw the figure")
    args = parser.parse_args()
    if args.figure_only and args.figure is None:
        parser.error("--figure-only needs --figure PATH")
    started = time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    from causalpatch import InterpretableModel

    model = InterpretableModel("smollm2")
    print(f"{model.name}, {torch.get_num_threads()} thread(s), torch {torch.__version__}")
    if not args.figure_only:
        cost(model, args.repeats, args.exact)
    if args.figure is not None:
        accuracy(model, args.figure, started, torch.get_num_threads())


if __name__ == "__main__":
    main()

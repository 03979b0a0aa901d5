"""Which SAE features carry the names in IOI? SmolLM2-135M, an SAE at blocks.20.resid_post.

The numbers and figures of docs/sae_patching.md, from one command::

    python examples/sae_ioi.py [--sae tests/data/saes/smollm2-blocks.20.resid_post-topk-2048]
                               [--n 16] [--out docs/img]

1. Activation patching of ``resid_post`` by position: at layer 20 the name information sits
   at the second subject (S2) and at the last position (END).
2. ``sae_patching`` (exact) and ``sae_attribution`` (first order) of every feature at S2 and at
   END, on an IOI dataset (one template, so positions line up).
3. The 10 features with the largest exact effect at each position: effect, estimate, and their
   top-activating tokens in the SAE's own training text.
4. The 10 features together, all features together, and the error term alone, next to the
   site's own patching effect.

Writes ``sae_ioi_features.png``, ``sae_ioi_attribution.png``, ``sae_ioi_recovery.png`` and
``sae_ioi.json`` into ``--out`` and prints Markdown tables. About 3 minutes on one CPU core.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from causalpatch import InterpretableModel, activation_patching, sae_attribution, sae_patching
from causalpatch.datasets import IOIDataset
from causalpatch.sae import load_sae, token_sequences, top_activations, training_texts

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SAE = ROOT / "tests" / "data" / "saes" / "smollm2-blocks.20.resid_post-topk-2048"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sae", type=Path, default=DEFAULT_SAE)
    parser.add_argument("--n", type=int, default=16, help="IOI pairs")
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--text-sequences", type=int, default=240,
                        help="training-text sequences (128 tokens) searched for top activations")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    model = InterpretableModel("smollm2")
    sae = load_sae(args.sae)
    site = sae.site
    layer = int(site.split(".")[1])
    data = IOIDataset(model, n=args.n, seed=0, equal_length=True)
    toks = model.to_str_tokens(data.clean[0])
    differ = [p for p, (a, b) in enumerate(zip(model.to_tokens(data.clean[0])[0].tolist(),
                                               model.to_tokens(data.corrupted[0])[0].tolist()))
              if a != b]
    s2, end = differ[0], len(toks) - 1
    print(f"{len(data)} IOI pairs, e.g. {data.clean[0]!r}; S2 = position {s2} ({toks[s2]!r}), "
          f"END = {end} ({toks[end]!r})")

    resid = activation_patching(model, data, component="resid_post", layers=[layer],
                                by_position=True)
    site_by_pos = resid.effect_matrix[0]
    print(f"activation patching of {site} by position: S2 {site_by_pos[s2]:.3f}, END "
          f"{site_by_pos[end]:.3f}, others max {site_by_pos.abs().max():.3f}")

    t = time.perf_counter()
    exact = sae_patching(model, sae, data, positions=[s2, end], by_position=True)
    t_exact = time.perf_counter() - t
    t = time.perf_counter()
    attr = sae_attribution(model, sae, data, positions=[s2, end], by_position=True)
    t_attr = time.perf_counter() - t
    print(f"exact: {2 * sae.d_sae} cells x {len(data)} pairs in {t_exact:.1f}s "
          f"({exact.extra.get('rows', 0)} rows computed, {exact.extra.get('noop_cells', 0)} "
          f"exact no-ops); attribution in {t_attr:.1f}s")

    ref = exact.extra["reference"]
    names = {0: "S2", 1: "END"}
    summary: dict = {"site": site, "n_pairs": len(data), "positions": {"S2": s2, "END": end},
                     "activation_patching": {"S2": float(site_by_pos[s2]),
                                             "END": float(site_by_pos[end])},
                     "reference": ref, "seconds": {"exact": t_exact, "attribution": t_attr},
                     "rows_computed": exact.extra.get("rows"),
                     "noop_cells": exact.extra.get("noop_cells"), "positions_detail": {}}
    corr = torch.corrcoef(torch.stack([exact.effect_matrix.flatten(),
                                       attr.effect_matrix.flatten()]))[0, 1]
    summary["attribution_vs_exact_correlation"] = float(corr)
    tops: dict[int, list[int]] = {}
    for g in range(2):
        order = torch.argsort(exact.effect_matrix[g].abs(), descending=True)[: args.top]
        tops[g] = order.tolist()

    # top-activating tokens in the SAE's training text (the training split of the same corpus)
    meta = sae.metadata
    ids, _ = token_sequences(model, training_texts(), int(meta.get("context_size", 128)),
                             int(meta.get("seed", 0)))
    n_eval = -(-4096 // (ids.shape[1] - 1))
    text_ids = ids[n_eval : n_eval + args.text_sequences]
    wanted = sorted({j for v in tops.values() for j in v})
    examples = top_activations(model, sae, wanted, text_ids, k=4)

    # when do the features fire? mean activation by run and by the clean prompt's name order
    feats_name = f"{site}.sae.features"
    runs = {}
    for run, prompts in (("clean", data.clean), ("corrupted", data.corrupted)):
        tr = model.trace(prompts, saes=[sae], cache=[feats_name, site]).run()
        runs[run] = (tr.cache[feats_name], tr.cache[site])
    orders = list(data.orders)

    def fires(j: int, pos: int) -> dict[str, float]:
        out = {}
        for run in ("clean", "corrupted"):
            for order in ("ABBA", "BABA"):
                rows_ = [i for i, o in enumerate(orders) if o == order]
                out[f"{run} {order}"] = float(runs[run][0][rows_, pos, j].mean())
        return out

    for g, pos in ((0, s2), (1, end)):
        joint = sae_patching(model, sae, data, features=[tops[g]], positions=[pos],
                             references=False)
        rows = []
        for j in tops[g]:
            rows.append({"feature": j, "exact": float(exact.effect_matrix[g, j]),
                         "estimate": float(attr.effect_matrix[g, j]), "fires": fires(j, pos),
                         "examples": [e["context"] for e in examples[j][:3]],
                         "tokens": [e["token"] for e in examples[j]]})
        # how much of the clean - corrupted difference of the activation the SAE reconstructs
        dx = runs["clean"][1][:, pos] - runs["corrupted"][1][:, pos]
        dr = sae.decode(runs["clean"][0][:, pos]) - sae.decode(runs["corrupted"][0][:, pos])
        summary["positions_detail"][names[g]] = {
            "top": rows, "top_joint": float(joint.effect_matrix[0]),
            "site": ref["site"][g], "all_features": ref["all_features"][g],
            "error": ref["error"][g],
            "sum_of_top": float(sum(r["exact"] for r in rows)),
            "difference_explained": float(1 - ((dx - dr) ** 2).sum() / (dx ** 2).sum()),
            "differing_features": float((runs["clean"][0][:, pos] != runs["corrupted"][0][:, pos]
                                         ).sum(-1).float().mean())}

    print(f"\nattribution vs exact, all {2 * sae.d_sae} cells: correlation {corr:.3f}")
    for name, d in summary["positions_detail"].items():
        print(f"\n### {name} (position {summary['positions'][name]})\n")
        print("| feature | exact effect | attribution estimate | mean activation: clean ABBA / "
              "clean BABA / corrupted ABBA / corrupted BABA | top-activating tokens (training "
              "text) |\n|---|---|---|---|---|")
        for r in d["top"]:
            shown = ", ".join(repr(t) for t in r["tokens"][:4])
            act = " / ".join(f"{v:.2f}" for v in r["fires"].values())
            print(f"| {r['feature']} | {r['exact']:+.3f} | {r['estimate']:+.3f} | {act} | "
                  f"{shown} |")
        print(f"\nwhole site {d['site']:+.3f}; top {args.top} together {d['top_joint']:+.3f} "
              f"({d['top_joint'] / d['site']:.0%} of the site); all features "
              f"{d['all_features']:+.3f}; error term alone {d['error']:+.3f}; "
              f"{d['differing_features']:.1f} features differ per pair; the SAE reconstructs "
              f"{d['difference_explained']:.0%} of the clean - corrupted activation difference")
        for r in d["top"][:5]:
            print(f"  feature {r['feature']}: " + " | ".join(r["examples"]))

    args.out.mkdir(parents=True, exist_ok=True)
    _figures(exact, attr, tops, summary, args.out, args.top)
    summary["seconds"]["total"] = time.perf_counter() - t0
    (args.out / "sae_ioi.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"\nwrote {args.out}/sae_ioi_*.png and sae_ioi.json in "
          f"{summary['seconds']['total']:.0f}s")


def _figures(exact, attr, tops, summary, out: Path, k: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ("S2", "END")
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for g, ax in enumerate(axes):
        feats = tops[g]
        x = torch.arange(len(feats))
        ax.bar(x - 0.2, [float(exact.effect_matrix[g, j]) for j in feats], 0.4, label="exact")
        ax.bar(x + 0.2, [float(attr.effect_matrix[g, j]) for j in feats], 0.4,
               label="attribution")
        ax.set_xticks(x, [str(j) for j in feats], rotation=45)
        ax.set_title(f"top {k} features at {names[g]}")
        ax.set_xlabel("feature")
        ax.axhline(0, color="k", lw=0.5)
    axes[0].set_ylabel("normalised effect (denoising)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "sae_ioi_features.png", dpi=130)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    for g, marker in ((0, "o"), (1, "s")):
        ax.scatter(attr.effect_matrix[g], exact.effect_matrix[g], s=10, marker=marker,
                   label=names[g], alpha=0.7)
    lim = float(max(exact.effect_matrix.abs().max(), attr.effect_matrix.abs().max())) * 1.1
    ax.plot([-lim, lim], [-lim, lim], "k--", lw=0.7)
    ax.set_xlabel("attribution estimate")
    ax.set_ylabel("exact effect")
    ax.set_title(f"all features (r = {summary['attribution_vs_exact_correlation']:.2f})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "sae_ioi_attribution.png", dpi=130)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    kinds = [("site", "whole site"), ("all_features", "all features"),
             ("top_joint", f"top {k} features"), ("error", "error term alone")]
    x = torch.arange(len(kinds))
    for g, name in enumerate(names):
        d = summary["positions_detail"][name]
        ax.bar(x + (g - 0.5) * 0.4, [d[key] for key, _ in kinds], 0.4, label=name)
    ax.set_xticks(x, [label for _, label in kinds])
    ax.set_ylabel("normalised effect")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_title(f"what patching {summary['site']} recovers")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "sae_ioi_recovery.png", dpi=130)
    plt.close(fig)


if __name__ == "__main__":
    main()

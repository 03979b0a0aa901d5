"""Which SAE features carry the names in IOI? SmolLM2-135M-Instruct, an SAE at blocks.20.resid_post.

The numbers and figures of docs/sae_patching.md, from one command::

    python examples/sae_ioi.py [--sae tests/data/saes/smollm2-blocks.20.resid_post-topk-2048]
                               [--n 32] [--heldout-n 64] [--out docs/img]

1. Activation patching of ``resid_post`` by position: at layer 20 the name information sits
   at the second subject (S2) and at the last position (END).
2. ``sae_patching`` (exact) and ``sae_attribution`` (first order) of every feature at S2 and at
   END, on an IOI dataset of the first template (so positions line up): the discovery set.
3. The 10 features with the largest exact effect at each position: effect (95% bootstrap
   interval over pairs), estimate, when they fire, and their top-activating tokens in the SAE's
   own training text.
4. The 10 features together, all features together and the error term alone, next to the
   site's own patching effect, each with its interval.
5. How much of the clean - corrupted difference of the activation the SAE reconstructs
   (``difference_explained``) at every position where the two runs differ.
6. Attribution against exact effects over the cells that can be non-zero (a feature that fires
   in neither run of any pair at a position is an exact zero of both): Spearman's rho, top-k
   recall, Pearson's r with and without the largest cell, with intervals over pairs.
7. The cost of splicing the SAE in: next-token loss with the SAE's reconstruction in place of
   the activation (no error term) minus the clean loss, on the SAE's held-out text (interval
   over sequences) and on the IOI prompts, and what it does to the IOI logit difference.
8. Sufficiency on held-out templates: the END feature picked in step 3 patched alone (and, as
   controls, random features that change with the corruption there in at least half the
   pairs, the top 10 together and all features) on IOI
   pairs of the other 11 templates, and of those templates with names the discovery set never
   used; the share of the clean - corrupted logit difference each restores, with intervals.

Writes ``sae_ioi_features.png``, ``sae_ioi_attribution.png``, ``sae_ioi_recovery.png`` and
``sae_ioi_sufficiency.png``, each with a JSON of the same stem beside it (command, commit, seed,
settings, the plotted numbers; ``scripts/provenance.py``), and the run's summary
``sae_ioi.json`` into ``--out``, and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from causalpatch import InterpretableModel, activation_patching, sae_attribution, sae_patching
from causalpatch.datasets import IOIDataset
from causalpatch.datasets.ioi import IOI_TEMPLATES
from causalpatch.metrics import bootstrap_interval
from causalpatch.sae import (collect_activations, evaluate_sae, load_sae, token_sequences,
                             top_activations, training_texts)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from provenance import command, commit, write_figure_json  # noqa: E402

DEFAULT_SAE = ROOT / "tests" / "data" / "saes" / "smollm2-blocks.20.resid_post-topk-2048"
LEVEL = 0.95


# -- statistics ----------------------------------------------------------------------------------
def ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks of ``x`` ``[n]`` (1..n), ties given their average rank."""
    values, inverse = torch.unique(x, sorted=True, return_inverse=True)
    counts = torch.bincount(inverse, minlength=len(values)).double()
    first = torch.cumsum(counts, 0) - counts  # ranks below each distinct value
    return (first + (counts + 1) / 2)[inverse]


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    return pearson(ranks(a.double()), ranks(b.double()))


def recall_at(exact: torch.Tensor, estimate: torch.Tensor, k: int) -> float:
    """Share of the ``k`` largest ``|exact|`` cells among the ``k`` largest ``|estimate|``."""
    top_e = set(torch.argsort(exact.abs(), descending=True, stable=True)[:k].tolist())
    top_a = set(torch.argsort(estimate.abs(), descending=True, stable=True)[:k].tolist())
    return len(top_e & top_a) / k


def bootstrap(stat: Callable[[torch.Tensor], float], n: int, n_boot: int, seed: int
              ) -> list[float]:
    """Percentile interval (``LEVEL``) of ``stat(indices)`` over ``n_boot`` resamples of
    ``n`` items with replacement."""
    g = torch.Generator().manual_seed(seed)
    values = torch.tensor([stat(torch.randint(n, (n,), generator=g)) for _ in range(n_boot)],
                          dtype=torch.float64)
    values = values[~values.isnan()]
    a = (1 - LEVEL) / 2
    return [float(values.quantile(a)), float(values.quantile(1 - a))]


def interval(result: Any) -> tuple[torch.Tensor, torch.Tensor]:
    return result.ci(level=LEVEL, n_boot=ARGS.boot, seed=ARGS.seed)


# -- the run -------------------------------------------------------------------------------------
def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sae", type=Path, default=DEFAULT_SAE)
    parser.add_argument("--n", type=int, default=32, help="discovery IOI pairs (template 1)")
    parser.add_argument("--heldout-n", type=int, default=64,
                        help="IOI pairs of each held-out set (templates 2-12)")
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--controls", type=int, default=20,
                        help="random features (of those that change with the corruption at END "
                             "in at least half the held-out pairs), patched one at a time")
    parser.add_argument("--boot", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0,
                        help="discovery pairs; held-out pairs use seed + 1; resampling")
    parser.add_argument("--text-sequences", type=int, default=240,
                        help="training-text sequences (128 tokens) searched for top activations")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args()


ARGS = argparse.Namespace()


def main() -> None:
    global ARGS
    ARGS = args = parse()
    torch.set_num_threads(args.threads)
    t0, started = time.perf_counter(), time.time()
    at_commit = commit()  # before anything else: files edited while the run goes are not in it

    model = InterpretableModel("smollm2")
    sae = load_sae(args.sae)
    site = sae.site
    layer = int(site.split(".")[1])
    data = IOIDataset(model, n=args.n, seed=args.seed, equal_length=True)
    toks = model.to_str_tokens(data.clean[0])
    differ = [p for p, (a, b) in enumerate(zip(model.to_tokens(data.clean[0])[0].tolist(),
                                               model.to_tokens(data.corrupted[0])[0].tolist()))
              if a != b]
    s2, end = differ[0], len(toks) - 1
    print(f"{len(data)} IOI pairs, e.g. {data.clean[0]!r}; S2 = position {s2} ({toks[s2]!r}), "
          f"END = {end} ({toks[end]!r})")
    settings = {"sae": str(args.sae.resolve().relative_to(ROOT)) if args.sae.resolve()
                .is_relative_to(ROOT) else str(args.sae), "n_pairs": args.n,
                "heldout_n": args.heldout_n, "top": args.top, "controls": args.controls,
                "n_boot": args.boot, "level": LEVEL, "text_sequences": args.text_sequences,
                "threads": args.threads, "direction": "denoise", "metric": "logit_diff",
                "dataset": f"IOIDataset(model, n={args.n}, seed={args.seed}, "
                           "equal_length=True)"}

    resid = activation_patching(model, data, component="resid_post", layers=[layer],
                                by_position=True, progress=False)
    site_by_pos = resid.effect_matrix[0]
    site_lo, site_hi = interval(resid)
    print(f"activation patching of {site} by position: S2 {site_by_pos[s2]:.3f}, END "
          f"{site_by_pos[end]:.3f}, others max {site_by_pos.abs().max():.3f}")

    t = time.perf_counter()
    exact = sae_patching(model, sae, data, positions=[s2, end], by_position=True,
                         progress=False)
    t_exact = time.perf_counter() - t
    t = time.perf_counter()
    attr = sae_attribution(model, sae, data, positions=[s2, end], by_position=True,
                           progress=False)
    t_attr = time.perf_counter() - t
    print(f"exact: {2 * sae.d_sae} cells x {len(data)} pairs in {t_exact:.1f}s "
          f"({exact.extra.get('rows', 0)} rows computed, {exact.extra.get('noop_cells', 0)} "
          f"exact no-ops); attribution in {t_attr:.1f}s")
    ex_lo, ex_hi = interval(exact)

    ref = exact.extra["reference"]
    names = {0: "S2", 1: "END"}
    summary: dict[str, Any] = {
        "command": command(), "commit": at_commit, "seed": args.seed, "settings": settings,
        "site": site, "n_pairs": len(data), "positions": {"S2": s2, "END": end},
        "tokens": toks,
        "activation_patching": {"S2": float(site_by_pos[s2]), "END": float(site_by_pos[end])},
        "activation_patching_ci": {"S2": [float(site_lo[0, s2]), float(site_hi[0, s2])],
                                   "END": [float(site_lo[0, end]), float(site_hi[0, end])]},
        "reference": ref, "seconds": {"exact": t_exact, "attribution": t_attr},
        "rows_computed": exact.extra.get("rows"), "noop_cells": exact.extra.get("noop_cells"),
        "positions_detail": {}}
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

    # when do the features fire? activations by run and by the clean prompt's name order
    feats_name, err_name = f"{site}.sae.features", f"{site}.sae.error"
    runs = {}
    for run, prompts in (("clean", data.clean), ("corrupted", data.corrupted)):
        tr = model.trace(prompts, saes=[sae], cache=[feats_name, site, err_name]).run()
        runs[run] = {"features": tr.cache[feats_name], "x": tr.cache[site],
                     "error": tr.cache[err_name], "logits": tr.logits[:, -1].float()}
    orders = list(data.orders)
    rows_i = torch.arange(len(data))
    correct, incorrect = torch.tensor(data.correct), torch.tensor(data.incorrect)

    def logit_diff(logits: torch.Tensor) -> torch.Tensor:  # [n, vocab] -> [n]
        return logits[rows_i, correct] - logits[rows_i, incorrect]

    ld_clean, ld_corr = logit_diff(runs["clean"]["logits"]), logit_diff(
        runs["corrupted"]["logits"])
    summary["logit_diff"] = {"clean": float(ld_clean.mean()), "corrupted": float(ld_corr.mean())}

    def fires(j: int, pos: int) -> dict[str, float]:
        out = {}
        for run in ("clean", "corrupted"):
            for order in ("ABBA", "BABA"):
                rows_ = [i for i, o in enumerate(orders) if o == order]
                out[f"{run} {order}"] = float(runs[run]["features"][rows_, pos, j].mean())
        return out

    def error_alone(pos: int) -> tuple[float, list[float]]:
        """Patch only the error term at ``pos`` (clean run's, features the corrupted run's):
        the normalised effect and its interval (one forward of every corrupted prompt)."""
        clean_error = runs["clean"]["error"]

        def swap(err: torch.Tensor) -> torch.Tensor:
            new = err.clone()
            new[:, pos] = clean_error[:, pos].to(err.dtype)
            return new

        tr = model.trace(data.corrupted, saes=[sae], interventions={err_name: swap}).run()
        patched = logit_diff(tr.logits[:, -1].float())
        gap = float(ld_clean.mean() - ld_corr.mean())
        per_pair = ((patched - ld_corr) / gap).double()
        lo, hi = bootstrap_interval(per_pair[:, None], base=ld_corr.double(),
                                    source=ld_clean.double(), level=LEVEL, n_boot=args.boot,
                                    seed=args.seed)
        return float(per_pair.mean()), [float(lo[0]), float(hi[0])]

    for g, pos in ((0, s2), (1, end)):
        joint = sae_patching(model, sae, data, features=[tops[g], list(range(sae.d_sae))],
                             positions=[pos], references=False, progress=False)
        j_lo, j_hi = interval(joint)
        err_effect, err_ci = error_alone(pos)
        rows = []
        for j in tops[g]:
            rows.append({"feature": j, "exact": float(exact.effect_matrix[g, j]),
                         "exact_ci": [float(ex_lo[g, j]), float(ex_hi[g, j])],
                         "estimate": float(attr.effect_matrix[g, j]), "fires": fires(j, pos),
                         "examples": [e["context"] for e in examples[j][:3]],
                         "tokens": [e["token"] for e in examples[j]]})
        fc, fk = runs["clean"]["features"][:, pos], runs["corrupted"]["features"][:, pos]
        summary["positions_detail"][names[g]] = {
            "top": rows, "top_joint": float(joint.effect_matrix[0]),
            "top_joint_ci": [float(j_lo[0]), float(j_hi[0])],
            "all_features_joint": float(joint.effect_matrix[1]),
            "all_features_ci": [float(j_lo[1]), float(j_hi[1])],
            "site": ref["site"][g], "site_ci": summary["activation_patching_ci"][names[g]],
            "all_features": ref["all_features"][g], "error": ref["error"][g],
            "error_check": err_effect, "error_ci": err_ci,
            "sum_of_top": float(sum(r["exact"] for r in rows)),
            "differing_features": float((fc != fk).sum(-1).float().mean())}
        print(f"  {names[g]}: error alone {ref['error'][g]:.4f} (sae_patching) vs "
              f"{err_effect:.4f} (direct)")

    # -- 5. how much of the clean - corrupted difference the SAE reconstructs, per position
    summary["difference_explained"] = difference_explained(sae, runs, toks, s2, args)

    # -- 6. attribution against exact, over the cells that can be non-zero
    summary["attribution_vs_exact"], live_cells = attribution_stats(exact, attr, runs,
                                                                     (s2, end), args)
    summary["attribution_vs_exact_correlation"] = summary["attribution_vs_exact"][
        "pearson_all_cells"]

    # -- 7. the cost of splicing the SAE in
    summary["splice_cost"] = splice_cost(model, sae, ids[:n_eval], data, runs, logit_diff, args)

    # -- 8. sufficiency of the END feature on held-out templates (and names)
    summary["sufficiency"] = sufficiency(model, sae, data, tops[1], args)

    print_tables(summary, args)
    args.out.mkdir(parents=True, exist_ok=True)
    summary["seconds"]["total"] = time.perf_counter() - t0
    figures(exact, attr, live_cells, summary, args, settings, started)
    (args.out / "sae_ioi.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"\nwrote {args.out}/sae_ioi_*.png (+ .json) and sae_ioi.json in "
          f"{summary['seconds']['total']:.0f}s")


def difference_explained(sae: Any, runs: dict[str, dict[str, torch.Tensor]], toks: list[str],
                         s2: int, args: argparse.Namespace) -> dict[str, Any]:
    """Per position from S2 on (before it the two runs are identical: the difference is 0):
    ``1 - sum_i |dx_i - dr_i|^2 / sum_i |dx_i|^2`` with ``dx`` the clean - corrupted
    activation and ``dr`` the same difference of the SAE's reconstructions, its interval over
    pairs, the mean cosine of ``dx`` and ``dr``, and the sizes that explain a negative value:
    ``|dx|`` and the reconstruction error ``|x - x_hat|``, each relative to ``|x|``."""
    x_c, x_k = runs["clean"]["x"].double(), runs["corrupted"]["x"].double()
    r_c = sae.decode(runs["clean"]["features"]).double()
    r_k = sae.decode(runs["corrupted"]["features"]).double()
    before = float((x_c[:, :s2] - x_k[:, :s2]).abs().max())
    out: dict[str, Any] = {"identical_before_S2_max_abs_diff": before, "by_position": []}
    for pos in range(s2, len(toks)):
        dx = x_c[:, pos] - x_k[:, pos]
        dr = r_c[:, pos] - r_k[:, pos]
        res = ((dx - dr) ** 2).sum(-1)
        tot = (dx ** 2).sum(-1)

        def stat(idx: torch.Tensor, res: torch.Tensor = res, tot: torch.Tensor = tot) -> float:
            return float(1 - res[idx].sum() / tot[idx].sum())

        x_norm = x_c[:, pos].norm(dim=-1)
        out["by_position"].append({
            "position": pos, "token": toks[pos],
            "difference_explained": stat(torch.arange(len(dx))),
            "ci": bootstrap(stat, len(dx), args.boot, args.seed),
            "cosine": float(torch.nn.functional.cosine_similarity(dx, dr, dim=-1).mean()),
            "difference_over_norm": float((dx.norm(dim=-1) / x_norm).mean()),
            "recon_error_over_norm": float(((x_c[:, pos] - r_c[:, pos]).norm(dim=-1)
                                            / x_norm).mean())})
    return out


def attribution_stats(exact: Any, attr: Any, runs: dict[str, dict[str, torch.Tensor]],
                      positions: Sequence[int], args: argparse.Namespace
                      ) -> tuple[dict[str, Any], torch.Tensor]:
    """Attribution estimates against exact effects (per-pair tensors ``[n, 2, d_sae]``): the
    old Pearson r over every cell, and over the cells that can be non-zero (the feature fires
    in the clean or the corrupted run of at least one pair at that position; every other cell
    is 0 in both, exactly): Spearman's rho, Pearson's r with and without the largest cell,
    top-k recall; intervals by resampling pairs (the live cells recomputed per resample).
    Normalised effects share one scale per resample, which neither rho nor recall sees.
    Returns the statistics and the live cells ``[2, d_sae]`` (bool)."""
    pe, pa = exact.per_pair.double(), attr.per_pair.double()  # [n, 2, d_sae]
    fired = torch.stack([(runs["clean"]["features"][:, p] > 0)
                         | (runs["corrupted"]["features"][:, p] > 0) for p in positions], 1)
    n = pe.shape[0]

    def cells(idx: torch.Tensor, g: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        e, a, live = pe[idx].mean(0), pa[idx].mean(0), fired[idx].any(0)
        if g is not None:
            e, a, live = e[g], a[g], live[g]
        return e[live], a[live], live

    everything = torch.arange(n)
    e_all, a_all = exact.effect_matrix.flatten(), attr.effect_matrix.flatten()
    e, a, live = cells(everything)
    lever = int(e.abs().argmax())
    keep = torch.ones(len(e), dtype=torch.bool)
    keep[lever] = False
    lever_cell = live.nonzero()[lever].tolist()
    out: dict[str, Any] = {
        "cells": int(e_all.numel()), "live_cells": int(live.sum()),
        "live_cells_by_position": [int(v) for v in live.sum(-1)],
        "pearson_all_cells": pearson(e_all, a_all),
        "pearson_live": pearson(e, a),
        "pearson_live_without_largest": pearson(e[keep], a[keep]),
        "spearman_live": spearman(e, a),
        "spearman_live_ci": bootstrap(lambda i: spearman(*cells(i)[:2]), n, args.boot,
                                      args.seed),
        "largest_cell": {"position": ["S2", "END"][lever_cell[0]], "feature": lever_cell[1],
                         "exact": float(e[lever]), "estimate": float(a[lever])},
        "by_position": {}}
    # the share of the sum of squares around the mean the largest cell holds (its leverage)
    out["largest_cell_share_of_variance"] = float(((e[lever] - e.mean()) ** 2)
                                                  / ((e - e.mean()) ** 2).sum())
    for g, name in enumerate(("S2", "END")):
        eg, ag, _ = cells(everything, g)
        row: dict[str, Any] = {"live_cells": len(eg), "spearman": spearman(eg, ag),
                               "spearman_ci": bootstrap(lambda i, g=g: spearman(
                                   *cells(i, g)[:2]), n, args.boot, args.seed),
                               "pearson": pearson(eg, ag)}
        for k in (5, 10, 20):
            row[f"recall_top{k}"] = recall_at(eg, ag, k)
            row[f"recall_top{k}_ci"] = bootstrap(lambda i, g=g, k=k: recall_at(
                *cells(i, g)[:2], k), n, args.boot, args.seed)
        out["by_position"][name] = row
    return out, live


def splice_cost(model: Any, sae: Any, eval_ids: torch.Tensor, data: IOIDataset,
                runs: dict[str, dict[str, torch.Tensor]],
                logit_diff: Callable[[torch.Tensor], torch.Tensor],
                args: argparse.Namespace) -> dict[str, Any]:
    """Next-token loss (nats) with the SAE's reconstruction in place of the site's activation
    (no error term; first position and attention sinks untouched, as in the SAE's training
    report), on the SAE's held-out sequences (one :func:`evaluate_sae` per sequence, so the
    interval resamples sequences), on the IOI clean prompts, and the IOI logit difference at
    END with the same splice."""
    threshold = sae.metadata.get("sink_norm_threshold")
    per_seq = []
    for i in range(eval_ids.shape[0]):
        seq = eval_ids[i : i + 1]
        acts = collect_activations(model, sae.site, seq)
        per_seq.append(evaluate_sae(model, sae, acts, seq, max_norm=threshold))
    clean = torch.tensor([r["ce_clean"] for r in per_seq], dtype=torch.float64)
    spliced = torch.tensor([r["ce_spliced"] for r in per_seq], dtype=torch.float64)
    zero = torch.tensor([r["ce_zero"] for r in per_seq], dtype=torch.float64)
    delta = spliced - clean
    out: dict[str, Any] = {
        "text": {"sequences": int(eval_ids.shape[0]), "tokens_per_sequence":
                 int(eval_ids.shape[1] - 1), "ce_clean": float(clean.mean()),
                 "ce_spliced": float(spliced.mean()), "ce_zero": float(zero.mean()),
                 "delta_nats": float(delta.mean()),
                 "delta_ci": bootstrap(lambda i: float(delta[i].mean()), len(delta), args.boot,
                                       args.seed),
                 "ce_recovered": float((zero.mean() - spliced.mean())
                                       / (zero.mean() - clean.mean()))}}
    ioi_ids = model.to_tokens(data.clean)
    ioi_acts = collect_activations(model, sae.site, ioi_ids)
    ioi = evaluate_sae(model, sae, ioi_acts, ioi_ids, max_norm=threshold)
    out["ioi_prompts"] = {k: ioi[k] for k in ("explained_variance", "ce_clean", "ce_spliced",
                                              "ce_zero", "ce_recovered")}
    out["ioi_prompts"]["delta_nats"] = ioi["ce_spliced"] - ioi["ce_clean"]
    # the IOI logit difference with the SAE's reconstruction at every position but the first
    # (and sinks): keep_error=True with the error term zeroed there
    x = runs["clean"]["x"]
    keep = torch.ones(x.shape[:2], dtype=torch.bool)
    keep[:, 0] = False
    if threshold is not None:
        keep &= x.norm(dim=-1) <= threshold

    def drop_error(err: torch.Tensor) -> torch.Tensor:
        return torch.where(keep[..., None], torch.zeros_like(err), err)

    err_name = f"{sae.site}.sae.error"
    ld = {}
    for run, prompts in (("clean", data.clean), ("corrupted", data.corrupted)):
        tr = model.trace(prompts, saes=[sae], interventions={err_name: drop_error}).run()
        ld[run] = logit_diff(tr.logits[:, -1].float()).double()
    ld_c = logit_diff(runs["clean"]["logits"]).double()
    ld_k = logit_diff(runs["corrupted"]["logits"]).double()
    n = len(ld_c)
    out["ioi_logit_diff"] = {
        "clean": float(ld_c.mean()), "clean_spliced": float(ld["clean"].mean()),
        "corrupted": float(ld_k.mean()), "corrupted_spliced": float(ld["corrupted"].mean()),
        "gap": float((ld_c - ld_k).mean()),
        "gap_spliced": float((ld["clean"] - ld["corrupted"]).mean()),
        "gap_spliced_ci": bootstrap(lambda i: float((ld["clean"][i] - ld["corrupted"][i]).mean()),
                                    n, args.boot, args.seed),
        "sinks_besides_first": int((~keep[:, 1:]).sum())}
    return out


def sufficiency(model: Any, sae: Any, discovery: IOIDataset, top_end: list[int],
                args: argparse.Namespace) -> dict[str, Any]:
    """The END feature picked on the discovery set (``top_end[0]``), patched alone at each
    pair's last position on pairs from the other templates (and, second set, the other
    templates with names the discovery pairs never used); every feature's own effect there
    (so the headline's rank), the top 10 together, all features together, random features that
    change with the corruption at END in at least half the pairs as controls, and the whole
    site."""
    headline = top_end[0]
    used = set(discovery.io_names) | set(discovery.subject_names)
    unused = [x for x in discovery.names if x not in used]
    sets = {"heldout_templates": IOIDataset(model, n=args.heldout_n, seed=args.seed + 1,
                                            templates=IOI_TEMPLATES[1:]),
            "heldout_templates_and_names": IOIDataset(model, n=args.heldout_n,
                                                      seed=args.seed + 2,
                                                      templates=IOI_TEMPLATES[1:],
                                                      names=unused)}
    feats_name = f"{sae.site}.sae.features"
    d = sae.d_sae
    out: dict[str, Any] = {"headline": headline, "top": top_end, "unused_names": len(unused)}
    for key, data in sets.items():
        # which features change with the corruption at END, in how many pairs: the controls
        # are drawn from those that change in at least half the pairs (as the headline does)
        live = torch.zeros(d, dtype=torch.bool)
        changes = torch.zeros(d)
        for clean_prompt, corrupted_prompt in zip(data.clean, data.corrupted):
            f = [model.trace(p, saes=[sae], cache=[feats_name]).run().cache[feats_name][0, -1]
                 for p in (clean_prompt, corrupted_prompt)]
            live |= (f[0] > 0) | (f[1] > 0)
            changes += (f[0] != f[1]).float()
        pool = [j for j in (changes >= len(data) / 2).nonzero().flatten().tolist()
                if j not in top_end]
        controls = sorted(random.Random(args.seed).sample(pool, min(args.controls, len(pool))))
        cells: list[list[int]] = [[j] for j in range(d)] + [top_end, list(range(d))]
        res = sae_patching(model, sae, data, features=cells, positions=[-1], progress=False)
        site = activation_patching(model, data, component=sae.site, positions=[-1],
                                   progress=False)
        lo, hi = interval(res)
        s_lo, s_hi = interval(site)
        eff = res.effect_matrix
        single = eff[:d]
        rank = int((single.abs() > single[headline].abs()).sum()) + 1
        # the controls' mean effect, its interval from their mean per pair
        pp = res.per_pair.double()
        metrics = res.extra["pair_metrics"]
        c_lo, c_hi = bootstrap_interval(pp[:, controls].mean(1, keepdim=True),
                                        base=torch.tensor(metrics["base"], dtype=torch.float64),
                                        source=torch.tensor(metrics["source"],
                                                            dtype=torch.float64),
                                        level=LEVEL, n_boot=args.boot, seed=args.seed)
        order = torch.argsort(single.abs(), descending=True)[:10].tolist()
        templates = sorted({template_of(c) for c in data.clean})
        assert 0 not in templates, "a held-out pair uses the discovery template"
        out[key] = {
            "n_pairs": len(data), "templates_used": len(templates), "templates": templates,
            "example": data.clean[0],
            "logit_diff": {"clean": res.clean_metric, "corrupted": res.corrupted_metric},
            "headline": float(eff[headline]), "headline_ci": [float(lo[headline]),
                                                              float(hi[headline])],
            "headline_rank": rank,
            "top10": float(eff[d]), "top10_ci": [float(lo[d]), float(hi[d])],
            "all_features": float(eff[d + 1]), "all_features_ci": [float(lo[d + 1]),
                                                                   float(hi[d + 1])],
            "site": float(site.effect_matrix.flatten()[0]),
            "site_ci": [float(s_lo.flatten()[0]), float(s_hi.flatten()[0])],
            "error": res.extra["reference"]["error"][0],
            "live_features": int(live.sum()), "control_pool": len(pool),
            "headline_changes_in": int(changes[headline]),
            "controls": controls,
            "control_effects": [float(eff[j]) for j in controls],
            "control_mean": float(eff[controls].mean()),
            "control_mean_ci": [float(c_lo[0]), float(c_hi[0])],
            "control_max_abs": float(eff[controls].abs().max()),
            "top_features": [{"feature": j, "effect": float(eff[j]),
                              "ci": [float(lo[j]), float(hi[j])]} for j in order],
            "discovery_top10_in_heldout_top10": len(set(order) & set(top_end))}
    return out


def template_of(prompt: str) -> int:
    """The index in ``IOI_TEMPLATES`` of the one template ``prompt`` fills."""
    found = [t for t, form in enumerate(IOI_TEMPLATES)
             if re.fullmatch(re.sub(r"\\\{\w+\\\}", ".+", re.escape(form)), prompt)]
    if len(found) != 1:
        raise ValueError(f"{prompt!r} matches the templates {found}, expected exactly one")
    return found[0]


# -- output --------------------------------------------------------------------------------------
def ci_text(value: float, ci: Sequence[float], spec: str = ".3f") -> str:
    return f"{value:{spec}} [{ci[0]:{spec}}, {ci[1]:{spec}}]"


def print_tables(summary: dict[str, Any], args: argparse.Namespace) -> None:
    for name, d in summary["positions_detail"].items():
        print(f"\n### {name} (position {summary['positions'][name]})\n")
        print("| feature | exact effect [95% CI] | attribution estimate | mean activation: "
              "clean ABBA / clean BABA / corrupted ABBA / corrupted BABA | top-activating "
              "tokens (training text) |\n|---|---|---|---|---|")
        for r in d["top"]:
            shown = ", ".join(repr(t) for t in r["tokens"][:4])
            act = " / ".join(f"{v:.2f}" for v in r["fires"].values())
            print(f"| {r['feature']} | {ci_text(r['exact'], r['exact_ci'], '+.3f')} | "
                  f"{r['estimate']:+.3f} | {act} | {shown} |")
        print(f"\nwhole site {ci_text(d['site'], d['site_ci'])}; top {args.top} together "
              f"{ci_text(d['top_joint'], d['top_joint_ci'])}; all features "
              f"{ci_text(d['all_features_joint'], d['all_features_ci'])}; error term alone "
              f"{ci_text(d['error_check'], d['error_ci'])}; {d['differing_features']:.1f} "
              "features differ per pair")
        for r in d["top"][:5]:
            print(f"  feature {r['feature']}: " + " | ".join(r["examples"]))
    print("\n| position | token | difference explained [95% CI] | cosine | |dx| / |x| | "
          "|x - x_hat| / |x| |\n|---|---|---|---|---|---|")
    for r in summary["difference_explained"]["by_position"]:
        print(f"| {r['position']} | {r['token']!r} | "
              f"{ci_text(r['difference_explained'], r['ci'], '.2f')} | {r['cosine']:.2f} | "
              f"{r['difference_over_norm']:.2f} | {r['recon_error_over_norm']:.2f} |")
    a = summary["attribution_vs_exact"]
    print(f"\nattribution vs exact: r over all {a['cells']} cells {a['pearson_all_cells']:.3f}; "
          f"{a['live_cells']} live cells: r {a['pearson_live']:.3f}, without the largest "
          f"{a['pearson_live_without_largest']:.3f}, rho "
          f"{ci_text(a['spearman_live'], a['spearman_live_ci'], '.2f')}")
    for name, r in a["by_position"].items():
        print(f"  {name}: {r['live_cells']} live, rho "
              f"{ci_text(r['spearman'], r['spearman_ci'], '.2f')}, recall top 10 "
              f"{ci_text(r['recall_top10'], r['recall_top10_ci'], '.1f')}")
    c = summary["splice_cost"]
    print(f"\nsplice cost on held-out text: {c['text']['ce_clean']:.3f} -> "
          f"{c['text']['ce_spliced']:.3f} nats "
          f"({ci_text(c['text']['delta_nats'], c['text']['delta_ci'], '+.3f')}), "
          f"{c['text']['ce_recovered']:.1%} recovered; IOI prompts "
          f"{c['ioi_prompts']['ce_clean']:.3f} -> {c['ioi_prompts']['ce_spliced']:.3f}; "
          f"IOI gap {c['ioi_logit_diff']['gap']:.2f} -> {c['ioi_logit_diff']['gap_spliced']:.2f}")
    s = summary["sufficiency"]
    for key in ("heldout_templates", "heldout_templates_and_names"):
        r = s[key]
        print(f"\nsufficiency, {key} ({r['n_pairs']} pairs, {r['templates_used']} templates): "
              f"feature {s['headline']} {ci_text(r['headline'], r['headline_ci'])} (rank "
              f"{r['headline_rank']}); {len(r['controls'])} of {r['control_pool']} changing "
              f"features, mean "
              f"{ci_text(r['control_mean'], r['control_mean_ci'])}, max |.| "
              f"{r['control_max_abs']:.3f}; top 10 {ci_text(r['top10'], r['top10_ci'])}; all "
              f"features {ci_text(r['all_features'], r['all_features_ci'])}; site "
              f"{ci_text(r['site'], r['site_ci'])}")


def figures(exact: Any, attr: Any, live_cells: torch.Tensor, summary: dict[str, Any],
            args: argparse.Namespace, settings: dict[str, Any], started: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out, k = args.out, args.top
    names = ("S2", "END")
    # the commit the run started on (files edited while it ran do not make it "+dirty")
    at_start = {"commit": summary["commit"]}

    def err(values: Sequence[float], cis: Sequence[Sequence[float]]) -> list[list[float]]:
        return [[v - c[0] for v, c in zip(values, cis)], [c[1] - v for v, c in zip(values, cis)]]

    # 1. top features, exact (with intervals) and estimated
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    plotted: dict[str, Any] = {}
    for g, ax in enumerate(axes):
        rows = summary["positions_detail"][names[g]]["top"]
        x = torch.arange(len(rows)).tolist()
        ex = [r["exact"] for r in rows]
        ax.bar([i - 0.2 for i in x], ex, 0.4, yerr=err(ex, [r["exact_ci"] for r in rows]),
               capsize=2, label="exact (95% CI over pairs)")
        ax.bar([i + 0.2 for i in x], [r["estimate"] for r in rows], 0.4, label="attribution")
        ax.set_xticks(x, [str(r["feature"]) for r in rows], rotation=45)
        ax.set_title(f"top {k} features at {names[g]}")
        ax.set_xlabel("feature")
        ax.axhline(0, color="k", lw=0.5)
        plotted[names[g]] = [{"feature": r["feature"], "exact": r["exact"],
                              "exact_ci": r["exact_ci"], "estimate": r["estimate"]}
                             for r in rows]
    axes[0].set_ylabel("normalised effect (denoising)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "sae_ioi_features.png", dpi=130)
    plt.close(fig)
    write_figure_json(out / "sae_ioi_features.png", seed=args.seed, settings=settings,
                      data=plotted, started=started, extra=at_start)

    # 2. attribution against exact, the cells that can be non-zero; right: without the largest
    a = summary["attribution_vs_exact"]
    big = a["largest_cell"]
    fig, axes = plt.subplots(1, 2, figsize=(9.6, 4.4))
    plotted = {}
    rest = 0.0
    for g, marker in ((0, "o"), (1, "s")):
        live = live_cells[g]
        e, est = exact.effect_matrix[g][live], attr.effect_matrix[g][live]
        for ax in axes:
            ax.scatter(est, e, s=12, marker=marker, alpha=0.7,
                       label=f"{names[g]} ({int(live.sum())} live cells)")
        plotted[names[g]] = {"position": summary["positions"][names[g]],
                             "features": live.nonzero().flatten().tolist(),
                             "exact": e.tolist(), "estimate": est.tolist()}
        others = [abs(v) for f, v, w in zip(plotted[names[g]]["features"], e.tolist(),
                                            est.tolist())
                  for v in (v, w) if not (names[g] == big["position"]
                                          and f == big["feature"])]
        rest = max([rest, *others])
    axes[0].annotate(f"feature {big['feature']} ({big['position']})",
                     (big["estimate"], big["exact"]), textcoords="offset points",
                     xytext=(-90, -4), fontsize=8)
    lim = float(max(exact.effect_matrix.abs().max(), attr.effect_matrix.abs().max())) * 1.1
    for ax, bound in ((axes[0], lim), (axes[1], rest * 1.1)):
        ax.plot([-bound, bound], [-bound, bound], "k--", lw=0.7)
        ax.set_xlim(-bound, bound)
        ax.set_ylim(-bound, bound)
        ax.set_xlabel("attribution estimate")
    axes[0].set_ylabel("exact effect")
    axes[0].set_title(f"live cells: rho = {a['spearman_live']:.2f} "
                      f"[{a['spearman_live_ci'][0]:.2f}, {a['spearman_live_ci'][1]:.2f}], "
                      f"r = {a['pearson_live']:.3f}", fontsize=9)
    axes[1].set_title(f"zoomed, without feature {big['feature']}: r = "
                      f"{a['pearson_live_without_largest']:.3f}", fontsize=9)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "sae_ioi_attribution.png", dpi=130)
    plt.close(fig)
    write_figure_json(out / "sae_ioi_attribution.png", seed=args.seed, settings=settings,
                      data=plotted, started=started,
                      extra={**at_start, "statistics": a})

    # 3. what patching the site recovers: site, all features, top 10, error alone
    fig, ax = plt.subplots(figsize=(6.6, 3.6))
    kinds = [("site", "site_ci", "whole site"), ("all_features_joint", "all_features_ci",
                                                 "all features"),
             ("top_joint", "top_joint_ci", f"top {k} features"),
             ("error_check", "error_ci", "error term alone")]
    x = torch.arange(len(kinds)).tolist()
    plotted = {}
    for g, name in enumerate(names):
        d = summary["positions_detail"][name]
        vals = [d[key] for key, _, _ in kinds]
        cis = [d[c] for _, c, _ in kinds]
        ax.bar([i + (g - 0.5) * 0.4 for i in x], vals, 0.4, yerr=err(vals, cis), capsize=3,
               label=name)
        plotted[name] = {label: {"effect": v, "ci": c}
                         for (_, _, label), v, c in zip(kinds, vals, cis)}
    ax.set_xticks(x, [label for _, _, label in kinds])
    ax.set_ylabel("normalised effect (95% CI)")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_title(f"what patching {summary['site']} recovers")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "sae_ioi_recovery.png", dpi=130)
    plt.close(fig)
    write_figure_json(out / "sae_ioi_recovery.png", seed=args.seed, settings=settings,
                      data=plotted, started=started, extra=at_start)

    # 4. sufficiency on held-out templates
    s = summary["sufficiency"]
    fig, ax = plt.subplots(figsize=(7.2, 3.6))
    kinds = [("headline", "headline_ci", f"feature {s['headline']}"),
             ("control_mean", "control_mean_ci",
              f"random changing\nfeature (mean of {args.controls})"),
             ("top10", "top10_ci", f"top {k} together"),
             ("all_features", "all_features_ci", "all features"),
             ("site", "site_ci", "whole site")]
    x = torch.arange(len(kinds)).tolist()
    plotted = {}
    for g, (key, label) in enumerate((("heldout_templates", "held-out templates"),
                                      ("heldout_templates_and_names",
                                       "held-out templates and names"))):
        r = s[key]
        vals = [r[v] for v, _, _ in kinds]
        cis = [r[c] for _, c, _ in kinds]
        ax.bar([i + (g - 0.5) * 0.4 for i in x], vals, 0.4, yerr=err(vals, cis), capsize=3,
               label=f"{label} ({r['n_pairs']} pairs)")
        plotted[key] = {name: {"effect": v, "ci": c}
                        for (_, _, name), v, c in zip(kinds, vals, cis)}
    ax.set_xticks(x, [name for _, _, name in kinds], fontsize=8)
    ax.set_ylabel("share of clean - corrupted\nlogit difference restored (95% CI)")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_title("patched at END on IOI templates not used to pick the feature", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "sae_ioi_sufficiency.png", dpi=130)
    plt.close(fig)
    write_figure_json(out / "sae_ioi_sufficiency.png", seed=args.seed + 1, settings=settings,
                      data=plotted, started=started, extra=at_start)


if __name__ == "__main__":
    main()

"""The IOI circuit on SmolLM2 with path patching, with the controls a reviewer asks for.

Run (34 minutes on one CPU thread of a busy 2-core machine, 32 pairs per half)::

    python examples/path_patching_ioi.py [--pairs 32] [--out out/path_patching_ioi] [--docs]

Everything follows Wang et al. (2022) where SmolLM2 allows it: the corrupted prompts are pABC
(``IOIDataset(corruption="abc")``: the three name slots get three other names), and every
effect is also given on the paper's scale, the change of the logit difference as a share of
the clean one (``% of clean`` below). The data are split: the candidates are chosen on the
*discovery* half (templates 1-6 of :data:`IOI_TEMPLATES`, every other name of
:data:`IOI_NAMES`) and re-measured on the *held-out* half (templates 7-12, the other names).

1. Every head -> logits, ``freeze="heads"`` (the paper's: other heads frozen, MLPs recomputed)
   and ``freeze="all"`` (MLPs frozen too): name-mover (NM) candidates, the top 3 by direct
   effect, and negative ones, the bottom 2.
2. Every head -> the queries of the three NM candidates, both freezes: S-inhibition (SI)
   candidates, the top 2.
3. The candidates checked without patching: attention from END to IO, S1 and S2 (the model's
   attention patterns) and OV copy scores (each head's value/output weights applied to the
   name tokens' embeddings, read out through the final norm and unembedding).
4. Backup behaviour: the NM candidates mean-ablated together; every other head's direct logit
   attribution before and after. Also each NM alone through :func:`ablate`.
5. Faithfulness: every head *outside* the candidate set mean-ablated (pABC means per template
   and position, as the paper); the share of the clean logit difference kept, beside every
   head ablated and random sets of the same size.

Every quoted number has a 95% bootstrap interval over pairs (1,000 resamples, seed 0):
``result.ci()`` for path-patching effects, :func:`causalpatch.metrics.bootstrap_interval` on
per-pair values for the rest. Writes ``findings.json`` (all of it), the two figures with their
JSON, and a report to ``--out``; with ``--docs``, the figures and their JSON to ``docs/img/``
(``ioi_path_direct``, ``ioi_path_via_queries``) and the findings to
``docs/data/path_patching_ioi.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch

import causalpatch.interventions as iv
from causalpatch import InterpretableModel, ablate, direct_logit_attribution, path_patching, report
from causalpatch.datasets import IOIDataset
from causalpatch.datasets.ioi import IOI_NAMES, IOI_TEMPLATES
from causalpatch.graph import head_writes
from causalpatch.metrics import bootstrap_interval

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from provenance import write_figure_json  # noqa: E402

N_BOOT, CI_SEED = 1000, 0
SPLITS = {"discovery": (IOI_TEMPLATES[:6], IOI_NAMES[0::2]),
          "heldout": (IOI_TEMPLATES[6:], IOI_NAMES[1::2])}
REFERENCE_PER_TEMPLATE = 16   # pABC prompts per template for the mean-ablation means
RANDOM_SETS = 5               # random head sets of the candidate set's size (faithfulness)
COPY_TOP = 5                  # Wang et al.'s copy score: the name among the top 5 logits


# -- intervals ------------------------------------------------------------------------------------
def interval(values: torch.Tensor) -> list[float]:
    """``[mean, lower, upper]`` of per-pair ``values`` ``[n]`` (95% bootstrap over pairs)."""
    v = values.double().reshape(-1, 1)
    lo, hi = bootstrap_interval(v, n_boot=N_BOOT, seed=CI_SEED)
    return [float(v.mean()), float(lo[0]), float(hi[0])]


def ratio_interval(num: torch.Tensor, den: torch.Tensor) -> list[float]:
    """``[mean(num) / mean(den), lower, upper]``: a ratio of means over pairs, each resample
    divided by its own ``mean(den)`` (bootstrap_interval's normalised rule with base 0)."""
    num, den = num.double(), den.double()
    per_pair = (num / den.mean()).reshape(-1, 1)
    lo, hi = bootstrap_interval(per_pair, base=torch.zeros_like(den), source=den,
                                n_boot=N_BOOT, seed=CI_SEED)
    return [float(num.mean() / den.mean()), float(lo[0]), float(hi[0])]


def on_clean_scale(result: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A path-patching result on the paper's scale: ``100 * (mean patched - mean clean) /
    mean clean`` per cell (negative: the path carries the IO answer), with its interval.

    ``per_pair[i] = (patched_i - clean_i) / (mean pABC - mean clean)`` (noising: base = clean,
    source = pABC), so each pair's change is ``per_pair[i]`` times that gap."""
    metrics = result.extra["pair_metrics"]
    clean = torch.tensor(metrics["base"], dtype=torch.float64)
    source = torch.tensor(metrics["source"], dtype=torch.float64)
    change = result.per_pair.double() * (source.mean() - clean.mean())     # [n, *cells]
    n = change.shape[0]
    flat = (change / clean.mean()).reshape(n, -1)
    lo, hi = bootstrap_interval(flat, base=torch.zeros_like(clean), source=clean,
                                n_boot=N_BOOT, seed=CI_SEED)
    shape = result.effect_matrix.shape
    pct = 100 * change.mean(0) / clean.mean()
    return pct.float(), (100 * lo).reshape(shape).float(), (100 * hi).reshape(shape).float()


def cells(result: Any, heads: list[tuple[int, int]]) -> dict[str, dict[str, list[float]]]:
    """Per head ``"L.H"``: ``effect`` (normalised by pABC - clean) and ``pct`` (% of clean),
    each ``[value, lower, upper]``."""
    lo, hi = result.ci(level=0.95, n_boot=N_BOOT, seed=CI_SEED)
    pct, plo, phi = on_clean_scale(result)
    out = {}
    for layer, head in heads:
        out[f"{layer}.{head}"] = {
            "effect": [float(result.effect_matrix[layer, head]), float(lo[layer, head]),
                       float(hi[layer, head])],
            "pct": [float(pct[layer, head]), float(plo[layer, head]), float(phi[layer, head])]}
    return out


def ranked(result: Any, k: int, by: str) -> list[tuple[int, int]]:
    return [(int(i[0]), int(i[1])) for i, _ in result.top_components(k, by=by)]


# -- prompts by template ------------------------------------------------------------------------
def template_pattern(template: str) -> re.Pattern[str]:
    parts = re.split(r"(\{A\}|\{B\}|\{place\}|\{object\})", template)
    return re.compile("".join(r"\w+" if p.startswith("{") else re.escape(p) for p in parts))


def template_of(prompt: str, templates: tuple[str, ...]) -> int:
    matches = [i for i, t in enumerate(templates) if template_pattern(t).fullmatch(prompt)]
    assert len(matches) == 1, (prompt, matches)
    return matches[0]


def pabc_means(model: Any, templates: tuple[str, ...], names: tuple[str, ...], seed: int
               ) -> list[dict[int, torch.Tensor]]:
    """Per template, per layer: every head's ``attn.z`` averaged over pABC prompts of that
    template, position by position (``[pos, n_heads, d_head]``; a template's prompts all have
    one token length, since names, places and objects are single tokens)."""
    zs = [f"blocks.{layer}.attn.z" for layer in range(model.n_layers)]
    out = []
    for t, template in enumerate(templates):
        ref = IOIDataset(model, n=REFERENCE_PER_TEMPLATE, seed=seed + 1000 + t,
                         templates=[template], names=names, corruption="abc")
        _, cache = model.run_with_cache(ref.corrupted, names=zs)
        out.append({layer: cache[zs[layer]].float().mean(0)
                    for layer in range(model.n_layers)})
    return out


def ablated_run(model: Any, ioi: Any, templates: tuple[str, ...],
                means: list[dict[int, torch.Tensor]], ablated: set[tuple[int, int]],
                cache: list[str] | None = None) -> tuple[torch.Tensor, dict[str, list[Any]]]:
    """The clean prompts with the heads in ``ablated`` mean-ablated (pABC means of the
    prompt's template, every position): per-pair logit difference ``[n]`` and the cached
    values (per pair, ``[pos, ...]``). One trace per template (equal token lengths)."""
    ld = torch.zeros(len(ioi))
    cached: dict[str, list[Any]] = {name: [None] * len(ioi) for name in cache or []}
    groups: dict[int, list[int]] = {}
    for i, prompt in enumerate(ioi.clean):
        groups.setdefault(template_of(prompt, templates), []).append(i)
    for t, rows in groups.items():
        interventions = {}
        for layer in range(model.n_layers):
            heads = sorted(h for (lay, h) in ablated if lay == layer)
            if heads:
                value = means[t][layer][None][:, :, heads]                # [1, pos, k, d]
                interventions[f"blocks.{layer}.attn.z"] = iv.replace_with(value, heads=heads)
        with model.trace([ioi.clean[i] for i in rows], interventions=interventions,
                         cache=cache or None) as tr:
            logits = tr.last_logits.float()
            for j, i in enumerate(rows):
                ld[i] = logits[j, ioi.correct[i]] - logits[j, ioi.incorrect[i]]
                for name in cache or []:
                    cached[name][i] = tr.cache[name][j]
    return ld, cached


def head_dla(model: Any, ioi: Any, cached: dict[str, list[Any]]) -> torch.Tensor:
    """Direct logit attribution of every head at END, ``[n, n_layers, n_heads]``: each head's
    write (its ``z`` through its rows of the output projection) through the final norm frozen at
    that run's own final residual, onto ``W_U[IO] - W_U[S]``."""
    n, last = len(ioi), f"blocks.{model.n_layers - 1}.resid_post"
    out = torch.zeros(n, model.n_layers, model.n_heads, dtype=torch.float64)
    for i in range(n):
        final = cached[last][i][-1].double()
        frozen = model.runtime.freeze_final_norm(final)
        rows, _ = model.runtime.unembed_rows([ioi.correct[i], ioi.incorrect[i]])
        direction = frozen.pullback((rows[0] - rows[1]).double())
        for layer in range(model.n_layers):
            z = cached[f"blocks.{layer}.attn.z"][i][-1]                   # [n_heads, d_head]
            out[i, layer] = head_writes(model, layer, z).double() @ direction
    return out


# -- checks without patching ------------------------------------------------------------------
def attention_to_names(model: Any, ioi: Any, heads: list[tuple[int, int]]
                       ) -> dict[str, dict[str, list[float]]]:
    """Attention from END to the IO, S1 and S2 tokens, per head ``[mean, lower, upper]``, and
    ``IO-S``: attention to IO minus attention to S1 and S2 together."""
    layers = sorted({layer for layer, _ in heads})
    names = [f"blocks.{layer}.attn.pattern" for layer in layers]
    per = {h: {"IO": [], "S1": [], "S2": []} for h in heads}
    for i, prompt in enumerate(ioi.clean):
        roles = ioi.roles[i]
        pos = {r: roles.index(r) for r in ("IO", "S1", "S2")}
        _, cache = model.run_with_cache(prompt, names=names)
        for layer, head in heads:
            row = cache[f"blocks.{layer}.attn.pattern"][0, head, -1]
            for r, p in pos.items():
                per[(layer, head)][r].append(float(row[p]))
    out = {}
    for (layer, head), d in per.items():
        io, s1, s2 = (torch.tensor(d[r]) for r in ("IO", "S1", "S2"))
        out[f"{layer}.{head}"] = {"IO": interval(io), "S1": interval(s1), "S2": interval(s2),
                                  "IO-S": interval(io - s1 - s2)}
    return out


def copy_scores(model: Any, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Wang et al.'s OV copy scores of every head, ``[n_layers, n_heads]`` each (positive,
    negative): the share of names whose own token is among the top ``COPY_TOP`` logits of the
    whole vocabulary (negative: of minus the logits) when the head's OV circuit is applied to
    the name's token embedding. The head's input is its layer's own input norm of the
    embedding (a one-token run with the layer's input set to it: the head attends to that one
    position, so its ``z`` is its value vector); its write goes through the final norm and
    the unembedding."""
    ids = [model.to_single_token(" " + name) for name in names]
    emb = model.runtime.embed(torch.tensor(ids)[:, None]).detach()          # [k, 1, d_model]
    target = torch.tensor(ids)[:, None]
    pos = torch.zeros(model.n_layers, model.n_heads)
    neg = torch.zeros(model.n_layers, model.n_heads)
    for layer in range(model.n_layers):
        z_name = f"blocks.{layer}.attn.z"
        _, cache = model.run_with_cache([[t] for t in ids], names=[z_name], interventions={
            f"blocks.{layer}.resid_pre": iv.replace_with(emb)})
        writes = head_writes(model, layer, cache[z_name][:, 0])            # [k, H, d_model]
        with torch.no_grad():
            logits = model.runtime.unembed(writes, model.config).float()   # [k, H, vocab]
        for h in range(model.n_heads):
            top = logits[:, h].topk(COPY_TOP, dim=-1).indices
            bottom = (-logits[:, h]).topk(COPY_TOP, dim=-1).indices
            pos[layer, h] = (top == target).any(-1).float().mean()
            neg[layer, h] = (bottom == target).any(-1).float().mean()
    return pos, neg


# -- figures ------------------------------------------------------------------------------------
def figure(path: Path, title: str, pct: torch.Tensor, bars: dict[str, Any],
           heads: list[tuple[int, int]]) -> None:
    """Left: every head's effect (% of clean, freeze="heads") as a layer x head heatmap.
    Right: the top heads with 95% intervals, freeze="heads" and "all", discovery and held-out."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 5.2))
    ax, bx = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.5]})
    vmax = float(pct.abs().max())
    im = ax.imshow(pct.numpy(), cmap="RdBu", vmin=-vmax, vmax=vmax, aspect="auto")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title("discovery, freeze=\"heads\" (% of clean logit diff.)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05)
    labels = [f"{layer}.{head}" for layer, head in heads]
    width = 0.2
    for k, (key, style) in enumerate(bars.items()):
        vals = [style["cells"][lab]["pct"] for lab in labels]
        xs = [j + (k - 1.5) * width for j in range(len(labels))]
        mid = [v[0] for v in vals]
        err = [[v[0] - v[1] for v in vals], [v[2] - v[0] for v in vals]]
        bx.bar(xs, mid, width, yerr=err, label=key, color=style["color"], capsize=2)
    bx.axhline(0, color="black", lw=0.6)
    bx.set_xticks(range(len(labels)), labels)
    bx.set_xlabel("head (layer.head)")
    bx.set_ylabel("% of clean logit difference (95% CI)")
    bx.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130, bbox_inches="tight")


# -- the run ------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("out/path_patching_ioi"))
    parser.add_argument("--docs", action="store_true",
                        help="also write the docs figures, their JSON and the findings JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    seconds: dict[str, float] = {}

    def timed(key: str, fn: Any, *a: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        value = fn(*a, **kw)
        seconds[key] = round(time.perf_counter() - t0, 1)
        print(f"{key}: {seconds[key]} s", flush=True)
        return value

    model = InterpretableModel("smollm2")
    data = {split: IOIDataset(model, n=args.pairs, seed=args.seed + s, templates=t, names=n,
                              corruption="abc")
            for s, (split, (t, n)) in enumerate(SPLITS.items())}
    found: dict[str, Any] = {"model": model.name, "pairs": args.pairs, "seed": args.seed,
                             "n_boot": N_BOOT, "ci_seed": CI_SEED, "splits": {}}
    for split, ioi in data.items():
        found["splits"][split] = {"templates": list(SPLITS[split][0]),
                                  "names": len(ioi.names), "clean_example": ioi.clean[0],
                                  "corrupted_example": ioi.corrupted[0]}

    # 1-2. path patching on the discovery half, both freezes; candidates from freeze="heads"
    results: dict[str, dict[str, Any]] = {s: {} for s in data}
    disc = data["discovery"]
    for fr in ("heads", "all"):
        results["discovery"][f"direct_{fr}"] = timed(
            f"discovery direct {fr}", path_patching, model, disc, senders="attn_head",
            receivers="logits", freeze=fr)
    direct = results["discovery"]["direct_heads"]
    movers = ranked(direct, 3, "value")
    negative = ranked(direct, model.n_layers * model.n_heads, "value")[::-1][:2]
    for fr in ("heads", "all"):
        results["discovery"][f"via_q_{fr}"] = timed(
            f"discovery via_q {fr}", path_patching, model, disc, senders="attn_head",
            receivers=movers, receiver_input="q", freeze=fr)
    s_inhibition = ranked(results["discovery"]["via_q_heads"], 2, "value")
    candidates = movers + negative + s_inhibition
    found["candidates"] = {"name_movers": [list(h) for h in movers],
                           "negative": [list(h) for h in negative],
                           "s_inhibition": [list(h) for h in s_inhibition]}

    # the same runs on the held-out half, for the same heads
    held = data["heldout"]
    for fr in ("heads", "all"):
        results["heldout"][f"direct_{fr}"] = timed(
            f"heldout direct {fr}", path_patching, model, held, senders="attn_head",
            receivers="logits", freeze=fr)
        results["heldout"][f"via_q_{fr}"] = timed(
            f"heldout via_q {fr}", path_patching, model, held, senders="attn_head",
            receivers=movers, receiver_input="q", freeze=fr)

    direct_heads = movers + negative + [h for h in ranked(direct, 8, "abs")
                                        if h not in movers + negative]
    q_heads = s_inhibition + [h for h in ranked(results["discovery"]["via_q_heads"], 4, "abs")
                              if h not in s_inhibition]
    for split in data:
        r = results[split]
        base = torch.tensor(r["direct_heads"].extra["pair_metrics"]["base"])
        source = torch.tensor(r["direct_heads"].extra["pair_metrics"]["source"])
        found["splits"][split].update({
            "clean_logit_diff": interval(base), "pabc_logit_diff": interval(source),
            "clean_positive": int((base > 0).sum()),
            "direct": {fr: cells(r[f"direct_{fr}"], direct_heads) for fr in ("heads", "all")},
            "via_q": {fr: cells(r[f"via_q_{fr}"], q_heads) for fr in ("heads", "all")},
            "top_direct": [f"{a}.{b}" for a, b in ranked(r["direct_heads"], 5, "value")],
            "top_via_q": [f"{a}.{b}" for a, b in ranked(r["via_q_heads"], 3, "value")],
            "other_heads_max_abs_via_q_pct": float(max(
                abs(v) for (a, b), v in zip(
                    [(a, b) for a in range(model.n_layers) for b in range(model.n_heads)],
                    on_clean_scale(r["via_q_heads"])[0].flatten().tolist())
                if (a, b) not in s_inhibition)),
        })

    # 3. attention END -> IO / S and OV copy scores
    for split, ioi in data.items():
        found["splits"][split]["attention"] = timed(
            f"{split} attention", attention_to_names, model, ioi, movers + negative)
    pool = [n for n in IOI_NAMES if len(model.tokenizer.encode(" " + n,
                                                                add_special_tokens=False)) == 1]
    pos, neg = timed("copy scores", copy_scores, model, pool)
    flat_pos = pos.flatten()
    found["copy_scores"] = {
        "names": len(pool), "top": COPY_TOP,
        "heads": {f"{a}.{b}": {"positive": float(pos[a, b]), "negative": float(neg[a, b])}
                  for a, b in candidates},
        "all_heads_median_positive": float(flat_pos.median()),
        "all_heads_median_negative": float(neg.flatten().median()),
        "heads_positive_at_least_half": int((flat_pos >= 0.5).sum()),
        "heads_negative_at_least_half": int((neg.flatten() >= 0.5).sum()),
        "top_positive": [[f"{i // model.n_heads}.{i % model.n_heads}", float(flat_pos[i])]
                         for i in flat_pos.argsort(descending=True)[:8].tolist()],
        "top_negative": [[f"{i // model.n_heads}.{i % model.n_heads}", float(neg.flatten()[i])]
                         for i in neg.flatten().argsort(descending=True)[:8].tolist()],
    }

    # 4-5. mean ablation with pABC means per template and position
    zs = [f"blocks.{layer}.attn.z" for layer in range(model.n_layers)]
    last = f"blocks.{model.n_layers - 1}.resid_post"
    all_heads = {(a, b) for a in range(model.n_layers) for b in range(model.n_heads)}
    rng = random.Random(args.seed)
    randoms = [set(rng.sample(sorted(all_heads), len(candidates))) for _ in range(RANDOM_SETS)]
    for split, ioi in data.items():
        templates = SPLITS[split][0]
        means = timed(f"{split} pabc means", pabc_means, model, templates, SPLITS[split][1],
                      args.seed)
        full, clean_cache = ablated_run(model, ioi, templates, means, set(), [*zs, last])
        ablated_ld, abl_cache = ablated_run(model, ioi, templates, means, set(movers),
                                            [*zs, last])
        dla_clean = head_dla(model, ioi, clean_cache)
        dla_abl = head_dla(model, ioi, abl_cache)
        # the hand-made readout equals direct_logit_attribution on the clean run
        ref = direct_logit_attribution(model, ioi, unit="head")
        ref_heads = torch.stack([ref.per_prompt[:, ref.names.index(
            f"blocks.{a}.attn.head.{b}")] for a in range(model.n_layers)
            for b in range(model.n_heads)], 1).reshape(dla_clean.shape)
        dla_check = float((ref_heads - dla_clean).abs().max())
        rise = dla_abl - dla_clean                                            # [n, L, H]
        others = [h for h in sorted(all_heads) if h not in movers]
        rise_mean = rise.mean(0)
        top_rise = sorted(others, key=lambda h: -float(rise_mean[h]))[:4]
        single = ablate(model, ioi, component="attn_head", kind="mean", reference=ioi.corrupted,
                        layers=sorted({a for a, _ in movers}),
                        heads=sorted({b for _, b in movers}))
        layer_ix = single.labels["layer"]
        single_effects = {}
        for a, b in movers:
            per = single.per_pair[:, layer_ix.index(a), single.labels["head"].index(b)]
            single_effects[f"{a}.{b}"] = {"ablate_change": interval(per),
                                          "dla_clean": interval(dla_clean[:, a, b])}
        found["splits"][split]["backup"] = {
            "dla_readout_max_difference": dla_check,
            "logit_diff_full": interval(full),
            "logit_diff_movers_ablated": interval(ablated_ld),
            "kept_pct": [100 * v for v in ratio_interval(ablated_ld, full)],
            "movers_dla_clean": interval(sum(dla_clean[:, a, b] for a, b in movers)),
            "movers_dla_ablated": interval(sum(dla_abl[:, a, b] for a, b in movers)),
            "others_dla_rise": interval(sum(rise[:, a, b] for a, b in others)),
            "top_rise": {f"{a}.{b}": {"clean": interval(dla_clean[:, a, b]),
                                      "ablated": interval(dla_abl[:, a, b]),
                                      "rise": interval(rise[:, a, b])} for a, b in top_rise},
            "single_ablation": single_effects,
        }
        faith: dict[str, Any] = {}
        for key, kept in (("candidates", set(candidates)), ("name_movers", set(movers)),
                          ("none", set())):
            ld, _ = ablated_run(model, ioi, templates, means, all_heads - kept)
            faith[key] = [100 * v for v in ratio_interval(ld, full)]
        rand = []
        for kept in randoms:
            ld, _ = ablated_run(model, ioi, templates, means, all_heads - kept)
            rand.append(100 * ratio_interval(ld, full)[0])
        faith["random_sets"] = rand
        found["splits"][split]["faithfulness"] = faith
        print(split, json.dumps(found["splits"][split]["backup"]["kept_pct"]),
              json.dumps(faith), flush=True)

    # -- outputs ------------------------------------------------------------------------------
    found["seconds"] = {**seconds, "total": round(time.time() - started, 1)}
    settings = {"pairs": args.pairs, "threads": args.threads, "corruption": "abc",
                "direction": "noise", "splits": {k: {"templates": list(t), "names": list(n)}
                                                 for k, (t, n) in SPLITS.items()},
                "n_boot": N_BOOT, "ci_seed": CI_SEED,
                "reference_per_template": REFERENCE_PER_TEMPLATE}
    colors = {"discovery heads": "#1f4e9c", "discovery all": "#8fb3e8",
              "held-out heads": "#b2401f", "held-out all": "#f0a890"}
    for name, key, heads, title in (
            ("direct", "direct", direct_heads,
             f"Every head -> logits, {model.name}, pABC, {args.pairs} pairs per half"),
            ("via_queries", "via_q", q_heads,
             f"Every head -> queries of {', '.join(f'{a}.{b}' for a, b in movers)}, "
             f"{model.name}, pABC, {args.pairs} pairs per half")):
        bars = {label: {"color": colors[label],
                        "cells": found["splits"][split][key][fr]}
                for label, split, fr in (("discovery heads", "discovery", "heads"),
                                         ("discovery all", "discovery", "all"),
                                         ("held-out heads", "heldout", "heads"),
                                         ("held-out all", "heldout", "all"))}
        pct = on_clean_scale(results["discovery"][f"{key}_heads"])[0]
        targets = [args.out / f"{name}.png"]
        if args.docs:
            targets.append(ROOT / "docs" / "img" / f"ioi_path_{name}.png")
        for target in targets:
            figure(target, title, pct, bars, heads)
            payload = {"pct_of_clean_discovery_heads": pct.tolist(),
                       **{f"{split}_{fr}": found["splits"][split][key][fr]
                          for split in data for fr in ("heads", "all")}}
            write_figure_json(target, seed=args.seed, settings=settings, data=payload,
                              started=started)
        for split in data:
            for fr in ("heads", "all"):
                results[split][f"{key}_{fr}"].to_json(args.out / f"{split}_{key}_{fr}.json")
    report([results["discovery"]["direct_heads"], results["discovery"]["via_q_heads"]],
           args.out / "report.html", title="IOI path patching on SmolLM2 (pABC)")
    text = json.dumps(found, indent=1)
    (args.out / "findings.json").write_text(text + "\n", encoding="utf-8")
    if args.docs:
        (ROOT / "docs" / "data" / "path_patching_ioi.json").write_text(text + "\n",
                                                                       encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()

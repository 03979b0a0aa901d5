"""ROME's causal tracing on SmolLM2 with ROME's controls: the numbers behind docs/causal_tracing.md.

One command reproduces every figure and number the page quotes::

    python benchmarks/rome_controls.py

Runs (each saved to ``--cache``, ``benchmarks/results/rome_controls/``, in chunks of
``--chunk`` facts that a rerun with the same settings loads instead of recomputing; the runs go
round-robin chunk by chunk, so that stopped at any time every run has about as many facts):

* ``known.json``: which of ROME's 1,209 known facts SmolLM2 answers correctly (top-1), and
  where each one's subject starts;
* ``figures``: the first ``--fig-facts`` known facts, ``--fig-samples`` (10) noise samples,
  ``resid_post``, ``mlp`` and ``attn`` (windows of 10);
* ``controls``: the first ``--ctl-facts`` of those facts, ``--ctl-samples`` noise samples: MLP
  windows of 10 and of 6 (``"scaled"``) without layer 0 and of 1 layer; the noise's sigma from
  the subject tokens of every known fact; a BOS token in front; severed MLP and attention
  traces;
* ``late``: ``--late-facts`` known facts whose subject does not start at position 0 (taken
  after the first :data:`RESERVED`);
* ``token``: token-replacement corruption (``FactualRecallDataset``: the subject swapped for
  another subject of the same relation) by activation patching of ``resid_post``, ``mlp`` and
  ``attn`` at every (layer, position), on ``--token-pairs`` pairs whose clean fact is known;
* assembly: ``docs/img/rome_{resid,mlp,attn}.png`` with their JSON beside them
  (``scripts/provenance.py``) and ``docs/img/rome_controls.json``: every quoted number, with
  its standard error and 95% bootstrap interval over facts (1,000 resamples).

``--stages figures`` (or ``controls,late,token``) runs a subset, e.g. in two processes;
``--no-assemble`` skips the assembly. One torch thread by default (``--threads``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO_ROOT / "src"), str(REPO_ROOT / "scripts")]

from provenance import command, commit, write_figure_json  # noqa: E402

from causalpatch import (InterpretableModel, activation_patching,  # noqa: E402
                         causal_tracing_dataset)
from causalpatch.datasets import FactualRecallDataset, KnownFact, known_facts  # noqa: E402
from causalpatch.methods.causal_tracing import (GROUPS, position_groups,  # noqa: E402
                                                subject_embedding_std, subject_span)
from causalpatch.metrics import bootstrap_interval  # noqa: E402
from causalpatch.render.plots import plot_trace  # noqa: E402
from causalpatch.result import PatchingResult  # noqa: E402

#: Bootstrap resamples of every interval and the resampling's seed.
N_BOOT, BOOT_SEED = 1000, 0
IMG = REPO_ROOT / "docs" / "img"
FIGURES = {"resid_post": "rome_resid", "mlp": "rome_mlp", "attn": "rome_attn"}
#: The control traces: name -> causal_tracing_dataset keyword arguments (besides the facts,
#: samples and seed). "sigma_subject" gets noise_std= the subject std over every known fact.
CONTROLS: dict[str, dict[str, Any]] = {
    "mlp_w10_no0": dict(components=("mlp",), window=10, exclude_layers=(0,)),
    "mlp_w1": dict(components=("mlp",), window=1),
    "mlp_w6_no0": dict(components=("mlp",), window="scaled", exclude_layers=(0,)),
    "sigma_subject": dict(components=("mlp",), window=10),
    "bos": dict(components=("mlp",), window=10, prepend_bos=True),
    "severed": dict(components=("resid_post",), sever=("mlp", "attn")),
}
#: The components traced on the facts whose subject does not start at position 0.
LATE_COMPONENTS = ("resid_post", "mlp")
#: The first known facts are the figures' and the controls' pool (at most this many); the
#: facts whose subject starts later are taken after them.
RESERVED = 12
LAST_SUBJECT, LAST = GROUPS.index("last subject token"), GROUPS.index("last token")


# -- stages ------------------------------------------------------------------------------------
def traced_facts(result: Any) -> dict[str, Any]:
    """A causal-tracing result's per-fact data: spans, baselines, each component's
    ``[n_layers, n_tokens]`` indirect effects."""
    return {"spans": [list(s) for s in result.spans],
            "p_clean": result.p_clean.tolist(), "p_corrupted": result.p_corrupted.tolist(),
            "sigma": result.sigma, "answers": list(result.answers),
            "ie": {kind: [pp[kind].tolist() for pp in result.per_position] for kind in result},
            "windows": {kind: result[kind].extra["window"] for kind in result}}


def stage_known(model: Any) -> dict[str, Any]:
    facts = known_facts(model, None, seed=0)
    starts = [subject_span(model, f.prompt, f.subject)[0] for f in facts]
    return {"total": 1209, "known": len(facts),
            "facts": [[f.prompt, f.subject, f.attribute_token] for f in facts],
            "subject_starts": starts}


def facts_of(known: dict[str, Any]) -> list[KnownFact]:
    return [KnownFact(p, s, int(t)) for p, s, t in known["facts"]]


def late_facts(known: dict[str, Any], args: argparse.Namespace) -> list[KnownFact]:
    """Known facts whose subject does not start at position 0, after the :data:`RESERVED`
    first ones (the figures' and the controls' pool)."""
    return [f for i, f in enumerate(facts_of(known))
            if i >= RESERVED and known["subject_starts"][i] > 0][: args.late_facts]


def subject_std(model: Any, known: dict[str, Any], cache: Path) -> float:
    """ROME's sigma statistic over the subject tokens of every known fact (computed once)."""
    path = cache / "subject_std.json"
    if not path.exists():
        facts = facts_of(known)
        value = subject_embedding_std(model, [f.prompt for f in facts],
                                      [f.subject for f in facts])
        path.write_text(json.dumps({"subject_std": value, "facts": len(facts)}))
    return float(json.loads(path.read_text())["subject_std"])


def run_figures(model: Any, known: dict[str, Any], args: argparse.Namespace, lo: int, hi: int
                ) -> dict[str, Any]:
    """Facts ``lo..hi-1`` of the figures' run (fact i's noise is seeded ``i``, as in one call
    over every fact)."""
    result = causal_tracing_dataset(model, facts_of(known)[lo:hi], samples=args.fig_samples,
                                    seed=lo, components=tuple(FIGURES), window=10,
                                    progress=False)
    out = traced_facts(result)
    if lo == 0:  # the template of the figures (labels, settings)
        out["results"] = {kind: json.loads(result[kind].to_json()) for kind in FIGURES}
    return out


def run_control(model: Any, known: dict[str, Any], args: argparse.Namespace, name: str,
                lo: int, hi: int) -> dict[str, Any]:
    kw = dict(CONTROLS[name])
    if name == "sigma_subject":
        kw["noise_std"] = subject_std(model, known, args.cache)
    result = causal_tracing_dataset(model, facts_of(known)[lo:hi], samples=args.ctl_samples,
                                    seed=lo, progress=False, **kw)
    return traced_facts(result)


def run_late(model: Any, known: dict[str, Any], args: argparse.Namespace, lo: int, hi: int
             ) -> dict[str, Any]:
    facts = late_facts(known, args)[lo:hi]
    result = causal_tracing_dataset(model, facts, samples=args.ctl_samples, seed=lo,
                                    components=LATE_COMPONENTS, window=10, progress=False)
    return traced_facts(result) | {"prompts": [f.prompt for f in facts]}


def token_pairs(model: Any, known: dict[str, Any], args: argparse.Namespace
                ) -> tuple[Any, list[int]]:
    """The factual pairs whose clean fact SmolLM2 knows (the first ``--token-pairs``)."""
    known_prompts = {p for p, _, _ in known["facts"]}
    data = FactualRecallDataset(model, n=args.token_candidates, seed=0)
    return data, [i for i, c in enumerate(data.clean) if c in known_prompts][: args.token_pairs]


def run_token(model: Any, data: Any, rows: list[int]) -> dict[str, Any]:
    """Token replacement by activation patching: each pair's IE ``p(answer | patched) -
    p(answer | corrupted)`` at every (layer, position), for the clean prompt's answer."""
    out: dict[str, Any] = {"spans": [], "p_clean": [], "p_corrupted": [], "ie": {},
                           "clean": [], "corrupted": []}
    for i in rows:
        clean, corrupted, answer = data.clean[i], data.corrupted[i], data.correct[i]
        out["spans"].append(list(subject_span(model, clean, data.subjects[i])))
        out["clean"].append(clean)
        out["corrupted"].append(corrupted)
        for kind in FIGURES:
            res = activation_patching(model, clean, corrupted, component=kind, metric="prob",
                                      correct=answer, by_position=True, normalize=False,
                                      progress=False)
            base = float(res.corrupted_metric)  # p(answer) on the corrupted prompt
            out["ie"].setdefault(kind, []).append((res.effect_matrix.double() - base).tolist())
            if kind == "resid_post":
                out["p_clean"].append(float(res.clean_metric))
                out["p_corrupted"].append(base)
    return out


def nan_free(rows: list[list[float]]) -> list[list[float | None]]:
    return [[None if math.isnan(x) else x for x in row] for row in rows]


# -- chunks ------------------------------------------------------------------------------------
def chunk_path(args: argparse.Namespace, part: str, lo: int) -> Path:
    return args.cache / f"{part}_{lo:03d}.json"


def chunk_key(args: argparse.Namespace, part: str) -> dict[str, Any]:
    """What a chunk's numbers depend on besides its facts (a chunk saved with other settings
    is not reused)."""
    samples = args.fig_samples if part == "figures" else args.ctl_samples
    key: dict[str, Any] = {"samples": samples, "chunk": args.chunk}
    if part in ("late", "token"):
        key["fig_facts" if part == "late" else "token_candidates"] = (
            RESERVED if part == "late" else args.token_candidates)
    return key


def parts(stage: str) -> list[str]:
    return [f"controls_{name}" for name in CONTROLS] if stage == "controls" else [stage]


def size(args: argparse.Namespace, part: str) -> int:
    if part == "figures":
        return args.fig_facts
    if part.startswith("controls_"):
        return args.ctl_facts
    return args.late_facts if part == "late" else args.token_pairs


def load_part(args: argparse.Namespace, part: str) -> dict[str, Any] | None:
    """Every saved chunk of ``part`` from fact 0 on, merged (None: not even the first)."""
    merged: dict[str, Any] | None = None
    for lo in range(0, size(args, part), args.chunk):
        path = chunk_path(args, part, lo)
        if not path.exists():
            break
        data = json.loads(path.read_text())
        if data.get("key") != chunk_key(args, part):
            break
        if merged is None:
            merged = data
            continue
        for field in ("spans", "p_clean", "p_corrupted", "answers", "prompts", "clean",
                      "corrupted"):
            if field in data:
                merged[field] = merged[field] + data[field]
        for kind, rows in data["ie"].items():
            merged["ie"][kind] = merged["ie"][kind] + rows
        merged["seconds"] += data["seconds"]
    return merged


def run_stages(model: Any, known: dict[str, Any], args: argparse.Namespace,
               wanted: list[str]) -> None:
    """Chunk by chunk, round-robin over the wanted stages, so that every stage has the same
    number of facts done whenever the run stops."""
    token: tuple[Any, list[int]] | None = None
    longest = max((size(args, p) for s in wanted for p in parts(s)), default=0)
    for lo in range(0, longest, args.chunk):
        for stage in wanted:
            for part in parts(stage):
                hi = min(lo + args.chunk, size(args, part))
                path = chunk_path(args, part, lo)
                if lo >= hi or (path.exists() and
                                json.loads(path.read_text()).get("key") == chunk_key(args, part)):
                    continue
                t0 = time.time()
                if part == "figures":
                    data = run_figures(model, known, args, lo, hi)
                elif part.startswith("controls_"):
                    data = run_control(model, known, args, part.removeprefix("controls_"), lo, hi)
                elif part == "late":
                    data = run_late(model, known, args, lo, hi)
                else:
                    token = token or token_pairs(model, known, args)
                    data = run_token(model, token[0], token[1][lo:hi])
                data.update(key=chunk_key(args, part), seconds=time.time() - t0,
                            commit=commit(), threads=args.threads)
                path.write_text(json.dumps(data))
                print(f"{part} facts {lo}..{hi - 1}: {time.time() - t0:.0f} s", flush=True)


def draw_figures(model: Any, fig: dict[str, Any], args: argparse.Namespace, started: float
                 ) -> None:
    """``docs/img/rome_{resid,mlp,attn}.png`` from the figures' facts, each with its JSON."""
    IMG.mkdir(parents=True, exist_ok=True)
    names = {"resid_post": "hidden state", "mlp": "MLP outputs (window 10)",
             "attn": "attention outputs (window 10)"}
    n = len(fig["spans"])
    for kind, stem in FIGURES.items():
        g = grouped(fig["ie"][kind], fig["spans"])  # [facts, layers, groups]
        have = ~torch.isnan(g[:, 0, :])  # [facts, groups]
        counts = [int(c) for c in have.sum(0)]
        effect = torch.stack([g[have[:, k], :, k].mean(0) if counts[k] else
                              torch.zeros(g.shape[1], dtype=torch.float64)
                              for k in range(len(GROUPS))], 1)  # [layers, groups]
        template = PatchingResult.from_json(json.dumps(fig["results"][kind]))
        result = dataclasses.replace(
            template, effect_matrix=effect.float(), per_pair=None, std=None,
            clean_metric=float(torch.tensor(fig["p_clean"]).mean()),
            corrupted_metric=float(torch.tensor(fig["p_corrupted"]).mean()),
            extra=template.extra | {"group_counts": counts, "n_prompts": n})
        title = (f"Restoring {names[kind]} — {model.name}, {n} known facts, "
                 f"{args.fig_samples} noise samples")
        lower, upper = bootstrap_interval(g.float(), n_boot=N_BOOT, seed=BOOT_SEED,
                                          skip_missing=True)  # [layers, groups]
        draw_with_intervals(result, effect, lower, upper, title, IMG / f"{stem}.png")
        write_figure_json(
            IMG / f"{stem}.png", seed=0,
            settings={"facts": n, "samples": args.fig_samples, "noise": 3.0,
                      "noise_std": "vocab", "window": 10 if kind != "resid_post" else 1,
                      "component": kind, "threads": args.threads,
                      "facts_from": "known_facts(model, None, seed=0), the first ones"},
            data={"layers": list(range(model.n_layers)), "groups": list(GROUPS),
                  "group_counts": counts, "effect": effect.T.tolist(),
                  "ci95_lower": nan_free(lower.T.tolist()),
                  "ci95_upper": nan_free(upper.T.tolist())},
            started=started,
            extra={"commit": args.commit,  # at the start: the files written here are not edits
                   "p_clean": float(torch.tensor(fig["p_clean"]).mean()),
                   "p_corrupted": float(torch.tensor(fig["p_corrupted"]).mean()),
                   "trace_seconds": fig["seconds"]})


def draw_with_intervals(result: PatchingResult, effect: torch.Tensor, lower: torch.Tensor,
                        upper: torch.Tensor, title: str, path: Path) -> None:
    """The ROME heatmap (left) and, beside it, the last subject token's and the last token's
    effect by layer with their 95% bootstrap intervals over facts (right); ``effect``,
    ``lower``, ``upper``: ``[layers, groups]``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(14.5, 4.6), layout="constrained")
    left, right = fig.subfigures(1, 2, width_ratios=[1.75, 1])
    plot_trace(result, ax=left.add_subplot())
    ax = right.add_subplot()
    layers = list(range(effect.shape[0]))
    for name, colour in (("last subject token", "tab:orange"), ("last token", "tab:blue")):
        k = list(GROUPS).index(name)
        ax.plot(layers, effect[:, k].tolist(), color=colour, label=name)
        ax.fill_between(layers, lower[:, k].tolist(), upper[:, k].tolist(), color=colour,
                        alpha=0.25, linewidth=0)
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_xlabel("layer (centre of the window)" if result.component != "resid_post"
                  else "layer")
    ax.set_ylabel("indirect effect (95% CI over facts)")
    ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(title)
    fig.savefig(path, dpi=130)
    plt.close(fig)


# -- assembly ----------------------------------------------------------------------------------
def grouped(ie: list[list[list[float]]], spans: list[list[int]]) -> torch.Tensor:
    """Per-fact IE in ROME's groups: ``[n_facts, n_layers, 6]``, NaN where a fact has no such
    group."""
    out = []
    for fact, (s0, s1) in zip(ie, spans):
        effect = torch.tensor(fact, dtype=torch.float64)  # [n_layers, n_tokens]
        cells = torch.full((effect.shape[0], len(GROUPS)), math.nan, dtype=torch.float64)
        for g, cols in enumerate(position_groups(effect.shape[1], (s0, s1))):
            if cols:
                cells[:, g] = effect[:, cols].mean(1)
        out.append(cells)
    return torch.stack(out)


def stat(per_fact: torch.Tensor) -> dict[str, Any]:
    """Mean over facts, standard error and 95% bootstrap interval of ``per_fact [n]`` (NaN:
    facts without the cell, left out)."""
    x = per_fact[~torch.isnan(per_fact)].double()
    if len(x) < 2:  # no spread from fewer than two facts
        return {"mean": float(x.mean()) if len(x) else None, "se": None, "ci95": None,
                "n": len(x)}
    lo, hi = bootstrap_interval(x.float().unsqueeze(1), n_boot=N_BOOT, seed=BOOT_SEED)
    return {"mean": float(x.mean()), "se": float(x.std() / math.sqrt(len(x))),
            "ci95": [float(lo[0]), float(hi[0])], "n": len(x)}


def column(g: torch.Tensor, group: int, first: int = 0) -> dict[str, Any]:
    """One group's mean IE by layer ``[n_layers]`` (over the facts that have the group), its
    peak layer (from layer ``first`` on) and the peak's statistics over facts."""
    have = ~torch.isnan(g[:, 0, group])
    if not have.any():
        return {"by_layer": None, "peak_layer": None, "peak": {"n": 0}}
    means = g[have, :, group].mean(0)
    layer = first + int(means[first:].argmax())
    return {"by_layer": [round(float(v), 6) for v in means], "peak_layer": layer,
            "peak": stat(g[:, layer, group])}


def at(g: torch.Tensor, group: int, layer: int) -> dict[str, Any]:
    return stat(g[:, layer, group])


def paired(a: torch.Tensor, b: torch.Tensor) -> dict[str, Any]:
    """``a - b`` fact by fact (same facts in the same order)."""
    return stat(a - b)


def summarize(name: str, run: dict[str, Any], kind: str, rows: slice | None = None
              ) -> dict[str, Any]:
    spans = run["spans"] if rows is None else run["spans"][rows]
    ie = run["ie"][kind] if rows is None else run["ie"][kind][rows]
    g = grouped(ie, spans)
    out = {"n_facts": len(spans), "groups": {GROUPS[k]: column(g, k) for k in range(len(GROUPS))}}
    print(f"{name} {kind}: last subject peak {out['groups']['last subject token']['peak']}")
    return out


def assemble(stages: dict[str, Any], args: argparse.Namespace, started: float) -> dict[str, Any]:
    known, fig, ctl = stages["known"], stages["figures"], stages["controls"]
    n_ctl = len(ctl["mlp_w10_no0"]["spans"])  # every control has these facts
    out: dict[str, Any] = {
        "command": command(), "commit": args.commit, "noise_seed": 0,
        "bootstrap": {"n_boot": N_BOOT, "seed": BOOT_SEED, "level": 0.95},
        "known": {"known": known["known"], "total": known["total"],
                  "fraction": known["known"] / known["total"],
                  "subject_at_0": sum(s == 0 for s in known["subject_starts"]),
                  "subject_at_0_fraction": sum(s == 0 for s in known["subject_starts"])
                  / known["known"]},
        "sizes": {"fig_facts": len(fig["spans"]), "fig_samples": args.fig_samples,
                  "ctl_facts": n_ctl, "ctl_samples": args.ctl_samples,
                  "late_facts": len(stages["late"]["spans"]),
                  "token_pairs": len(stages["token"]["spans"])},
        "seconds": {"figures": fig["seconds"], "late": stages["late"]["seconds"],
                    "token": stages["token"]["seconds"],
                    "controls": {k: v["seconds"] for k, v in ctl.items() if isinstance(v, dict)}},
    }
    # -- the figures' run ------------------------------------------------------------------------
    out["figures"] = {"p_clean": stat(torch.tensor(fig["p_clean"])),
                      "p_corrupted": stat(torch.tensor(fig["p_corrupted"])),
                      "sigma": fig["sigma"],
                      "subject_at_0": sum(s[0] == 0 for s in fig["spans"])}
    figs = {kind: grouped(fig["ie"][kind], fig["spans"]) for kind in FIGURES}
    for kind in FIGURES:
        out["figures"][kind] = {GROUPS[k]: column(figs[kind], k) for k in range(len(GROUPS))}
    # -- MLP windows: the same facts, first n_ctl of the figures' run for window 10 ---------------
    mlp10 = figs["mlp"][:n_ctl]
    windows: dict[str, Any] = {"w10": {GROUPS[k]: column(mlp10, k) for k in (LAST_SUBJECT, LAST)}}
    windows["w10"]["samples"] = args.fig_samples
    for name in ("mlp_w10_no0", "mlp_w1", "mlp_w6_no0"):
        g = grouped(ctl[name]["ie"]["mlp"], ctl[name]["spans"])
        windows[name.removeprefix("mlp_")] = {
            GROUPS[k]: column(g, k) for k in (LAST_SUBJECT, LAST)} | {
            "window": ctl[name]["windows"]["mlp"], "samples": args.ctl_samples,
            "layer0_window_at_last_subject": at(g, LAST_SUBJECT, 0)}
    g1 = grouped(ctl["mlp_w1"]["ie"]["mlp"], ctl["mlp_w1"]["spans"])
    windows["w1"]["last subject token from layer 1"] = column(g1, LAST_SUBJECT, first=1)
    g10 = mlp10
    windows["w10"]["layer0_window_at_last_subject"] = at(g10, LAST_SUBJECT, 0)
    # the largest effect of a window at the last subject token that holds no layer 0
    g_no0 = grouped(ctl["mlp_w10_no0"]["ie"]["mlp"], ctl["mlp_w10_no0"]["spans"])
    windows["w10_no0_vs_w10_at_peak"] = paired(
        g_no0[:, windows["w10"]["last subject token"]["peak_layer"], LAST_SUBJECT],
        g10[:, windows["w10"]["last subject token"]["peak_layer"], LAST_SUBJECT])
    out["mlp_windows"] = windows
    # -- sigma from the subject tokens --------------------------------------------------------
    sub = ctl["sigma_subject"]
    out["sigma_subject"] = {
        "subject_std": ctl["subject_std"], "sigma": sub["sigma"], "vocab_sigma": fig["sigma"],
        "p_corrupted": stat(torch.tensor(sub["p_corrupted"])),
        "p_corrupted_vocab_same_facts": stat(torch.tensor(fig["p_corrupted"][:n_ctl])),
        "mlp": summarize("sigma_subject", sub, "mlp")["groups"],
        "vocab_mlp_same_facts": {GROUPS[k]: column(mlp10, k) for k in range(len(GROUPS))}}
    # -- BOS in front -------------------------------------------------------------------------
    bos = ctl["bos"]
    out["bos"] = {"p_clean": stat(torch.tensor(bos["p_clean"])),
                  "p_corrupted": stat(torch.tensor(bos["p_corrupted"])),
                  "p_clean_same_facts_no_bos": stat(torch.tensor(fig["p_clean"][:n_ctl])),
                  "mlp": summarize("bos", bos, "mlp")["groups"],
                  "no_bos_mlp_same_facts": {GROUPS[k]: column(mlp10, k)
                                            for k in range(len(GROUPS))}}
    # -- subject start: the figures' facts at 0 against the late-start facts ------------------
    at0 = [i for i, s in enumerate(fig["spans"]) if s[0] == 0]
    late = stages["late"]
    split: dict[str, Any] = {"n_start_0": len(at0), "n_late": len(late["spans"]),
                             "late_samples": args.ctl_samples,
                             "late_p_clean": stat(torch.tensor(late["p_clean"])),
                             "late_p_corrupted": stat(torch.tensor(late["p_corrupted"]))}
    for kind in LATE_COMPONENTS:
        g0 = figs[kind][at0]
        gl = grouped(late["ie"][kind], late["spans"])
        split[kind] = {"start_0": {GROUPS[k]: column(g0, k) for k in range(len(GROUPS))},
                       "late": {GROUPS[k]: column(gl, k) for k in range(len(GROUPS))}}
    out["subject_start"] = split
    # -- severed ------------------------------------------------------------------------------
    sev = ctl["severed"]
    gs = {kind: grouped(sev["ie"][kind], sev["spans"]) for kind in sev["ie"]}
    sev_out: dict[str, Any] = {kind: {GROUPS[k]: column(g, k) for k in (LAST_SUBJECT, LAST)}
                               for kind, g in gs.items()}
    # ROME Fig. 3: at the last subject token, the hidden state's effect with later MLPs (or
    # attention) severed, against the plain one, over the layers where the plain one peaks
    plain = gs["resid_post"][:, :, LAST_SUBJECT]
    for kind in ("resid_post_sever_mlp", "resid_post_sever_attn"):
        sev_out[f"{kind}_minus_plain_by_layer"] = [
            round(float((gs[kind][:, layer, LAST_SUBJECT] - plain[:, layer]).mean()), 6)
            for layer in range(plain.shape[1])]
        for layer in (0, 5, 10, 15):
            sev_out[f"{kind}_minus_plain_layer{layer}"] = paired(
                gs[kind][:, layer, LAST_SUBJECT], plain[:, layer])
            sev_out[f"{kind}_layer{layer}"] = at(gs[kind], LAST_SUBJECT, layer)
    for layer in (0, 5, 10, 15):
        sev_out[f"resid_post_layer{layer}"] = at(gs["resid_post"], LAST_SUBJECT, layer)
    out["severed"] = sev_out
    # -- token replacement ------------------------------------------------------------------------
    tok = stages["token"]
    tok_out: dict[str, Any] = {"n_pairs": len(tok["spans"]),
                               "p_clean": stat(torch.tensor(tok["p_clean"])),
                               "p_corrupted": stat(torch.tensor(tok["p_corrupted"]))}
    for kind in FIGURES:
        g = grouped(tok["ie"][kind], tok["spans"])
        tok_out[kind] = {GROUPS[k]: column(g, k) for k in range(len(GROUPS))}
        tok_out[kind]["last subject token from layer 1"] = column(g, LAST_SUBJECT, first=1)
    tok_out["same_facts_as_figures"] = sum(c in {p for p, _, _ in known["facts"][: len(
        fig["spans"])]} for c in tok["clean"])
    out["token_replacement"] = tok_out
    out["wall_seconds"] = round(time.time() - started, 1)
    return out


# -- main --------------------------------------------------------------------------------------
STAGES = ("figures", "controls", "late", "token")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default=",".join(STAGES),
                        help="comma-separated stages to run (saved chunks are loaded from "
                             "--cache); the assembly follows unless --no-assemble")
    parser.add_argument("--no-assemble", action="store_true")
    parser.add_argument("--fig-facts", type=int, default=12)
    parser.add_argument("--fig-samples", type=int, default=10)
    parser.add_argument("--ctl-facts", type=int, default=10)
    parser.add_argument("--ctl-samples", type=int, default=3)
    parser.add_argument("--late-facts", type=int, default=8)
    parser.add_argument("--token-pairs", type=int, default=12)
    parser.add_argument("--token-candidates", type=int, default=300)
    parser.add_argument("--chunk", type=int, default=2, help="facts per saved chunk")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path,
                        default=REPO_ROOT / "benchmarks" / "results" / "rome_controls")
    parser.add_argument("--json", type=Path, default=IMG / "rome_controls.json")
    args = parser.parse_args()
    if max(args.fig_facts, args.ctl_facts) > RESERVED:
        parser.error(f"--fig-facts and --ctl-facts must be at most {RESERVED} (the facts after "
                     "them are the late-start facts' pool)")
    torch.set_num_threads(args.threads)
    args.commit = commit()  # before this run writes anything
    started = time.time()
    args.cache.mkdir(parents=True, exist_ok=True)
    model = InterpretableModel("smollm2")
    known_path = args.cache / "known.json"
    if not known_path.exists():
        known_path.write_text(json.dumps(stage_known(model)))
    known = json.loads(known_path.read_text())
    wanted = [s.strip() for s in args.stages.split(",") if s.strip() in STAGES]
    run_stages(model, known, args, wanted)
    if args.no_assemble:
        return
    stages: dict[str, Any] = {"known": known}
    for stage in STAGES:
        loaded = {part: load_part(args, part) for part in parts(stage)}
        if any(v is None for v in loaded.values()):
            print(f"stage {stage} has no saved facts yet; no assembly")
            return
        if stage == "controls":
            # every control over the same facts: as many as the least advanced one has (and
            # the figures' run, their window-10 reference)
            n = min([len(v["spans"]) for v in loaded.values() if v is not None]
                    + [len(stages["figures"]["spans"])])
            stages[stage] = {part.removeprefix("controls_"): truncate(v, n)
                             for part, v in loaded.items()}
            stages[stage]["subject_std"] = subject_std(model, known, args.cache)
        else:
            stages[stage] = loaded[stage]
    draw_figures(model, stages["figures"], args, started)
    summary = assemble(stages, args, started)
    args.json.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {args.json}")


def truncate(run: dict[str, Any] | None, n: int) -> dict[str, Any]:
    """The first ``n`` facts of a merged run."""
    assert run is not None
    out = dict(run)
    for field in ("spans", "p_clean", "p_corrupted", "answers"):
        out[field] = run[field][:n]
    out["ie"] = {kind: rows[:n] for kind, rows in run["ie"].items()}
    return out


if __name__ == "__main__":
    main()

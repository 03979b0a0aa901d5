"""Indirect object identification on SmolLM2-135M-Instruct, end to end.

1. Check the model does the task on an IOI dataset.
2. Find where the answer is carried: residual stream by layer x position.
3. Find the heads that matter (denoising) and those that are necessary (noising).
4. Write figures (each heatmap beside its largest cells with 95% bootstrap intervals over the
   pairs), the results' JSON and one interactive report.

Run::

    python examples/ioi_smollm2.py [--out out/ioi_example] [--n 32] [--threads 1] [--docs]

32 IOI pairs (``IOIDataset(n=32, seed=0, equal_length=True)``, swap corruption: S2 becomes the
other name), a resid_post sweep by position and two attn_head sweeps (denoising, noising);
about two minutes on one thread. ``--docs`` also writes the figures the README and the docs show,
``docs/img/ioi_resid_post.png`` and ``docs/img/ioi_heads.png``, each with its JSON beside it
(command, commit, seed, settings, the effects and their intervals). ``make demo`` (8 pairs,
four smaller sweeps) took 56 s on a quiet machine (docs/cli.md).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from causalpatch import InterpretableModel, activation_patching, report
from causalpatch.datasets import IOIDataset
from causalpatch.render.figure import ResultFigure

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from provenance import write_figure_json  # noqa: E402

#: The dataset's draw and the bootstrap's resampling.
SEED = 0
#: Bootstrap resamples of every interval and the cells listed beside each heatmap.
N_BOOT, TOP = 1000, 10


def cell_name(result: Any, index: tuple[int, ...]) -> str:
    """``L23 pos 13: ' to'`` / ``L23H3``: a short label of one cell of ``effect_matrix``."""
    parts = dict(zip(result.axes, index))
    if "head" in parts:
        return f"L{parts['layer']}H{parts['head']}"
    return f"L{parts['layer']} {result.labels['position'][parts['position']]}"


def top_cells(result: Any, lower: torch.Tensor, upper: torch.Tensor, k: int
              ) -> list[dict[str, Any]]:
    """The ``k`` cells of largest ``|effect|`` with their intervals, largest first."""
    flat = result.effect_matrix.flatten()
    order = torch.argsort(flat.abs(), descending=True, stable=True)[:k]
    cells = []
    for i in order.tolist():
        index = tuple(int(j) for j in torch.unravel_index(torch.tensor(i), result.shape))
        cells.append({"cell": dict(zip(result.axes, index)), "name": cell_name(result, index),
                      "effect": round(float(flat[i]), 4),
                      "ci95": [round(float(lower.flatten()[i]), 4),
                               round(float(upper.flatten()[i]), 4)]})
    return cells


def columns_by_layer(result: Any, lower: torch.Tensor, upper: torch.Tensor, roles: list[str],
                     k: int = 2) -> list[dict[str, Any]]:
    """The ``k`` positions of a layer x position result with the largest summed ``|effect|``:
    each one's IOI role (``roles``, one per position), effect and 95% interval at every
    layer."""
    m = result.effect_matrix
    order = torch.argsort(m.abs().sum(0), descending=True, stable=True)[:k]
    return [{"position": int(p), "role": roles[int(p)],
             "label": result.labels["position"][int(p)],
             "effect": [round(float(v), 4) for v in m[:, p]],
             "ci95_lower": [round(float(v), 4) for v in lower[:, p]],
             "ci95_upper": [round(float(v), 4) for v in upper[:, p]]}
            for p in sorted(order.tolist())]


def figure(result: Any, cells: list[dict[str, Any]], columns: list[dict[str, Any]] | None,
           n_pairs: int) -> ResultFigure:
    """The heatmap (left) and its intervals (right): for a layer x position result the
    ``columns`` by layer with a 95% band, otherwise the ``cells`` as bars with 95% intervals."""
    fig = ResultFigure(figsize=(7.0, 4.6), layout="constrained")
    heat, side = fig.subplots(1, 2, width_ratios=[1.7, 1])
    result.plot(ax=heat)
    if columns:
        for column, colour in zip(columns, ("#b2182b", "#2166ac", "#1b7837")):
            layers = list(range(len(column["effect"])))
            side.plot(column["effect"], layers, color=colour, linewidth=1.2,
                      label=f"{column['role'] or 'position ' + str(column['position'])}")
            side.fill_betweenx(layers, column["ci95_lower"], column["ci95_upper"],
                               color=colour, alpha=0.25, linewidth=0)
        side.invert_yaxis()
        side.set_ylabel("layer", fontsize=8)
        side.legend(fontsize=7, loc="lower left", frameon=False)
        side.set_title(f"two largest columns by layer,\n95% interval over {n_pairs} pairs",
                       fontsize=8)
    else:
        y = list(range(len(cells)))[::-1]
        effect = [c["effect"] for c in cells]
        err = [[c["effect"] - c["ci95"][0] for c in cells],
               [c["ci95"][1] - c["effect"] for c in cells]]
        side.barh(y, effect, color=["#b2182b" if v > 0 else "#2166ac" for v in effect],
                  height=0.6)
        side.errorbar(effect, y, xerr=err, fmt="none", ecolor="black", capsize=2,
                      linewidth=0.8)
        side.set_yticks(y, [c["name"] for c in cells])
        side.set_title(f"largest {len(cells)} cells,\n95% interval over {n_pairs} pairs",
                       fontsize=8)
    side.axvline(0, color="black", linewidth=0.6)
    side.tick_params(labelsize=7)
    side.set_xlabel("effect (0 = none, 1 = full)", fontsize=8)
    for spine in ("top", "right"):
        side.spines[spine].set_visible(False)
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/ioi_example"))
    parser.add_argument("--n", type=int, default=32, help="IOI pairs")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--docs", action="store_true",
                        help="also write docs/img/ioi_resid_post.png and ioi_heads.png + JSON")
    args = parser.parse_args()
    started = time.time()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    model = InterpretableModel("smollm2")
    print(model.summary())

    data = IOIDataset(model, n=args.n, seed=SEED, equal_length=True)
    logits = model.trace(data.clean).run().last_logits
    rows = torch.arange(len(data))
    diff = logits[rows, data.correct] - logits[rows, data.incorrect]
    print(f"IOI logit difference on {len(data)} prompts: mean {diff.mean():.2f}, "
          f"correct on {(diff > 0).float().mean():.0%}")

    resid = activation_patching(model, data, component="resid_post", by_position=True)
    print(resid.summary())
    heads = activation_patching(model, data, component="attn_head")
    print(heads.summary())
    necessary = activation_patching(model, data, component="attn_head", direction="noise")
    print(necessary.summary())

    for result, name in ((resid, "resid_post"), (heads, "heads"), (necessary, "heads_noise")):
        result.save(args.out / f"{name}.json")
    report([resid, heads, necessary], args.out / "report.html", title="IOI on SmolLM2-135M")
    print(f"wrote {args.out}/report.html")

    settings = {"model": model.name, "n_pairs": len(data), "dataset": "IOIDataset(n="
                f"{args.n}, seed={SEED}, equal_length=True)", "corruption": "swap",
                "metric": "logit_diff", "normalized": True, "threads": args.threads,
                "ci": {"level": 0.95, "n_boot": N_BOOT, "seed": SEED, "over": "pairs"}}
    task = {"logit_diff_mean": round(float(diff.mean()), 4),
            "fraction_correct": round(float((diff > 0).float().mean()), 4),
            "clean_metric": round(float(resid.clean_metric), 4),
            "corrupted_metric": round(float(resid.corrupted_metric), 4)}
    targets = [args.out] + ([ROOT / "docs" / "img"] if args.docs else [])
    for result, name, direction in ((resid, "ioi_resid_post", "denoise"),
                                    (heads, "ioi_heads", "denoise")):
        lower, upper = result.ci(level=0.95, n_boot=N_BOOT, seed=SEED)
        cells = top_cells(result, lower, upper, TOP)
        print(f"{name}: " + ", ".join(f"{c['name']} {c['effect']:+.2f} "
                                      f"[{c['ci95'][0]:+.2f}, {c['ci95'][1]:+.2f}]"
                                      for c in cells[:5]))
        columns = (columns_by_layer(result, lower, upper, data.roles[0])
                   if "position" in result.axes else None)
        data_out = {"axes": list(result.axes), "labels": result.labels,
                    "effect": result.effect_matrix.tolist(), "ci95_lower": lower.tolist(),
                    "ci95_upper": upper.tolist(), "top": cells, "columns": columns}
        extra: dict[str, Any] = {"task": task, "direction": direction}
        if name == "ioi_heads":  # the noising sweep is in the report; its top heads here
            nlo, nhi = necessary.ci(level=0.95, n_boot=N_BOOT, seed=SEED)
            extra["noise_top"] = top_cells(necessary, nlo, nhi, TOP)
        fig = figure(result, cells, columns, len(data))
        for folder in targets:
            path = folder / f"{name}.png"
            fig.save(path, dpi=200)
            write_figure_json(path, seed=SEED, settings=settings, data=data_out,
                              started=started, extra=extra)
            print(f"wrote {path} and its JSON")


if __name__ == "__main__":
    main()

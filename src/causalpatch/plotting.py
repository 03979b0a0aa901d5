"""Static matplotlib figures of results, readable in a paper.

Object API only (``matplotlib.figure.Figure``): no pyplot state, no rcParams changes, nothing
done at import time. Diverging colour map centred at 0 with symmetric limits; token strings as
tick labels on position axes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .result import PatchingResult

CMAP = "RdBu_r"
AXIS_TITLES = {"layer": "layer", "position": "position (token)", "head": "head",
               "neuron": "neuron", "site": "site", "group": "position group"}


def _limit(values: torch.Tensor) -> float:
    vmax = float(values.abs().max()) if values.numel() else 1.0
    return vmax if vmax > 0 else 1.0


def _title(result: PatchingResult, title: str | None) -> str:
    if title:
        return title
    kind = "effect" if result.normalized else f"raw {result.metric}"
    return f"{result.method.replace('_', ' ')}: {result.component} ({result.metric} {kind}, " \
           f"{result.direction})"


def _heatmap(fig: Any, ax: Any, mat: torch.Tensor, rows: list[Any], cols: list[Any],
             row_axis: str, col_axis: str, vmax: float, label: str) -> None:
    image = ax.imshow(mat.numpy(), cmap=CMAP, vmin=-vmax, vmax=vmax, aspect="auto",
                      interpolation="nearest")
    ax.set_ylabel(AXIS_TITLES.get(row_axis, row_axis))
    ax.set_xlabel(AXIS_TITLES.get(col_axis, col_axis))
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([str(r) for r in rows], fontsize=7)
    ax.set_xticks(range(len(cols)))
    rotate = 60 if col_axis == "position" else 0
    ax.set_xticklabels([str(c) for c in cols], fontsize=7, rotation=rotate,
                       ha="right" if rotate else "center")
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    bar.set_label(label)


def plot_result(result: PatchingResult, ax: Any = None, title: str | None = None) -> Any:
    """Bar chart (1-D), heatmap (2-D) or one heatmap per last-axis entry (3-D)."""
    from matplotlib.figure import Figure

    m = result.effect_matrix.float()
    label = "effect (0 = none, 1 = full)" if result.normalized else result.metric
    labels = [result.labels.get(a, list(range(n))) for a, n in zip(result.axes, m.shape)]
    if m.dim() == 3:
        n = m.shape[2]
        cols = min(n, 3)
        rows = -(-n // cols)
        fig = Figure(figsize=(5.2 * cols, 0.28 * m.shape[0] * rows + 2.5), layout="constrained")
        axes = fig.subplots(rows, cols, squeeze=False)
        vmax = _limit(m)
        for k in range(rows * cols):
            a = axes[k // cols][k % cols]
            if k >= n:
                a.set_visible(False)
                continue
            _heatmap(fig, a, m[:, :, k], labels[0], labels[1], result.axes[0], result.axes[1],
                     vmax, label)
            a.set_title(f"{result.axes[2]} {labels[2][k]}", fontsize=9)
        fig.suptitle(_title(result, title))
        return fig
    if ax is None:
        height = 4.0 if m.dim() == 1 else max(4.0, 0.25 * m.shape[0] + 1.5)
        width = 7.0 if m.dim() == 1 else max(6.0, 0.45 * m.shape[1] + 3)
        fig = Figure(figsize=(width, height), layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    if m.dim() == 1:
        values = m.numpy()
        colors = ["#b2182b" if v > 0 else "#2166ac" for v in values]
        ax.bar(range(len(values)), values, color=colors)
        if result.std is not None:
            ax.errorbar(range(len(values)), values, yerr=result.std.numpy(), fmt="none",
                        ecolor="black", capsize=2, linewidth=0.8)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(values)))
        ax.set_xticklabels([str(x) for x in labels[0]], fontsize=7)
        ax.set_xlabel(AXIS_TITLES.get(result.axes[0], result.axes[0]))
        ax.set_ylabel(label)
    else:
        _heatmap(fig, ax, m, labels[0], labels[1], result.axes[0], result.axes[1], _limit(m),
                 label)
    ax.set_title(_title(result, title), fontsize=10)
    return fig

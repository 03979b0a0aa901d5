"""Static matplotlib figures of results, readable in a paper.

Object API only (``matplotlib.figure.Figure``): no pyplot state (until you call a figure's
``show()``), no rcParams changes, and matplotlib is imported inside the functions, so importing
causalpatch stays side-effect free.

* 1-D results: a bar chart over the axis (red positive, blue negative; error bars from
  ``std``).
* 2-D results: a heatmap, rows the first axis (e.g. layer), columns the second (head or
  position, with the token strings as tick labels).
* 3-D results, e.g. ``(layer, position, head)``: a grid of heatmaps of the first two axes, one
  per entry of the last axis, all on one colour scale with one colour bar. When an ``ax`` is
  given, when there would be more than :data:`MAX_PANELS` panels, or for 4+ axes, one heatmap
  of the largest-magnitude (signed) effect over the trailing axes instead.
* Causal tracing (:func:`plot_trace`): ROME's layer x position-group heatmap on a sequential
  colour scale.

Heatmaps use the diverging map :data:`CMAP` with limits symmetric around 0, so white is "no
effect"; NaN cells are grey. Long axes show every k-th tick label (at most :data:`MAX_TICKS`).

New figures are :class:`~causalpatch.render.figure.ResultFigure` objects: ordinary ``Figure``
objects whose ``show()`` works although pyplot did not create them (it hands the figure to
pyplot first; on a plain object-API ``Figure``, ``show()`` raises ``AttributeError``).

Results are duck-typed: anything with ``effect_matrix``, ``axes``, ``std``, ``normalized``,
``method``, ``component``, ``metric``, ``direction`` and ``cell_text(axis, i)`` can be drawn.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from ..result import PatchingResult

CMAP = "RdBu_r"
"""Diverging colour map: red = positive effect, blue = negative."""
POSITIVE, NEGATIVE = "#b2182b", "#2166ac"
MAX_TICKS = 48
MAX_PANELS = 16
AXIS_TITLES = {"layer": "layer", "position": "position (token)", "head": "head",
               "neuron": "neuron", "site": "site", "group": "position group"}


def symmetric_limit(values: np.ndarray) -> float:
    """``max |value|`` over the finite values (1.0 when there is none or it is 0)."""
    import numpy as np

    finite = np.abs(values[np.isfinite(values)])
    vmax = float(finite.max()) if finite.size else 0.0
    return vmax if vmax > 0 else 1.0


def max_magnitude(values: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """The signed value of largest magnitude along ``axis``, and its index (NaN-aware)."""
    import numpy as np

    key = np.where(np.isfinite(values), np.abs(values), -1.0)
    index = key.argmax(axis=axis)
    picked = np.take_along_axis(values, np.expand_dims(index, axis), axis=axis)
    return picked.squeeze(axis), index


def title_of(result: PatchingResult) -> str:
    """Default title: method, component, metric, direction."""
    kind = "effect" if result.normalized else "(raw)"
    return (f"{result.method.replace('_', ' ')}: {result.component} - {result.metric} {kind}, "
            f"{result.direction}")


def value_label(result: PatchingResult) -> str:
    """Colour bar / y-axis label."""
    return "effect (0 = none, 1 = full)" if result.normalized else result.metric


def _texts(result: PatchingResult, axis: str, n: int) -> list[str]:
    return [result.cell_text(axis, i) for i in range(n)]


def _clamp(value: float, low: float, high: float) -> float:
    return max(low, min(high, value))


def _set_ticks(ax: Any, which: str, texts: list[str], axis_name: str, show: bool = True) -> None:
    n = len(texts)
    step = max(1, math.ceil(n / MAX_TICKS))
    ticks = list(range(0, n, step))
    if which == "x":
        ax.set_xticks(ticks)
        if not show:
            ax.set_xticklabels([])
            return
        rotate = axis_name == "position" or max((len(texts[i]) for i in ticks), default=0) > 4
        ax.set_xticklabels([texts[i] for i in ticks], fontsize=7, rotation=60 if rotate else 0,
                           ha="right" if rotate else "center", rotation_mode="anchor")
        ax.set_xlabel(AXIS_TITLES.get(axis_name, axis_name))
    else:
        ax.set_yticks(ticks)
        if not show:
            ax.set_yticklabels([])
            return
        ax.set_yticklabels([texts[i] for i in ticks], fontsize=7)
        ax.set_ylabel(AXIS_TITLES.get(axis_name, axis_name))


def _cmap() -> Any:
    from matplotlib import colormaps

    return colormaps[CMAP].with_extremes(bad="#d0d0d0")


def _heatmap(ax: Any, mat: np.ndarray, rows: list[str], cols: list[str], row_axis: str,
             col_axis: str, vmax: float, show_x: bool = True, show_y: bool = True) -> Any:
    image = ax.imshow(mat, cmap=_cmap(), vmin=-vmax, vmax=vmax, aspect="auto",
                      interpolation="nearest")
    _set_ticks(ax, "y", rows, row_axis, show_y)
    _set_ticks(ax, "x", cols, col_axis, show_x)
    return image


def plot_result(result: PatchingResult, ax: Any = None, title: str | None = None) -> Any:
    """Draw ``result`` (see the module docstring) and return the matplotlib ``Figure``.

    Without ``ax`` the figure is a new :class:`~causalpatch.render.figure.ResultFigure` (so
    ``plot_result(r).show()`` works); with ``ax`` it is ``ax.figure``, the caller's figure.
    Always a figure, never an ``Axes``.
    """
    import numpy as np

    from .figure import ResultFigure

    m = result.effect_matrix.double().numpy()
    axes = result.axes
    names = [_texts(result, a, n) for a, n in zip(axes, m.shape)]
    heading = title or title_of(result)
    vlabel = value_label(result)

    if m.ndim == 1:
        if ax is None:
            fig = ResultFigure(figsize=(_clamp(0.22 * len(m) + 2.5, 5.0, 14.0), 3.8),
                               layout="constrained")
            ax = fig.add_subplot()
        fig = ax.figure
        x = np.arange(len(m))
        ax.bar(x, np.nan_to_num(m), color=[POSITIVE if v > 0 else NEGATIVE for v in m])
        if result.std is not None:
            ax.errorbar(x, m, yerr=result.std.double().numpy(), fmt="none", ecolor="black",
                        capsize=2, linewidth=0.8)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xlim(-0.6, len(m) - 0.4)
        _set_ticks(ax, "x", names[0], axes[0])
        ax.set_ylabel(vlabel)
        ax.set_title(heading, fontsize=10)
        return fig

    reduce = m.ndim > 3 or ax is not None or (m.ndim == 3 and m.shape[2] > MAX_PANELS)
    if m.ndim == 2 or reduce:
        if m.ndim > 2:
            trailing = " x ".join(axes[2:])
            m, _ = max_magnitude(m.reshape(m.shape[0], m.shape[1], -1), axis=2)
            heading = f"{heading}\n(largest |effect| over {trailing})"
        if ax is None:
            fig = ResultFigure(figsize=(_clamp(0.38 * m.shape[1] + 3.2, 5.0, 18.0),
                                        _clamp(0.24 * m.shape[0] + 2.0, 3.5, 14.0)),
                               layout="constrained")
            ax = fig.add_subplot()
        fig = ax.figure
        image = _heatmap(ax, m, names[0], names[1], axes[0], axes[1], symmetric_limit(m))
        bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03)
        bar.set_label(vlabel)
        ax.set_title(heading, fontsize=10)
        return fig

    # 3-D: one panel per entry of the last axis, shared colour scale.
    n = m.shape[2]
    ncols = min(4, math.ceil(math.sqrt(n)))
    nrows = math.ceil(n / ncols)
    panel_w = _clamp(0.24 * m.shape[1] + 1.4, 2.4, 5.0)
    panel_h = _clamp(0.12 * m.shape[0] + 1.3, 2.0, 5.0)
    fig = ResultFigure(figsize=(panel_w * ncols + 1.2, panel_h * nrows + 1.0),
                       layout="constrained")
    grid = fig.subplots(nrows, ncols, squeeze=False)
    vmax = symmetric_limit(m)
    image, shown = None, []
    for k in range(nrows * ncols):
        panel = grid[k // ncols][k % ncols]
        if k >= n:
            panel.set_visible(False)
            continue
        image = _heatmap(panel, m[:, :, k], names[0], names[1], axes[0], axes[1], vmax,
                         show_x=k + ncols >= n, show_y=k % ncols == 0)
        panel.set_title(f"{axes[2]} {names[2][k]}", fontsize=9)
        shown.append(panel)
    bar = fig.colorbar(image, ax=shown, shrink=0.8)
    bar.set_label(vlabel)
    fig.suptitle(heading, fontsize=11)
    return fig


#: Sequential colour maps of ROME's causal-tracing figures: hidden states purple, MLP green,
#: attention red.
TRACE_CMAPS: dict[str, str] = {"resid_post": "Purples", "resid_pre": "Purples", "mlp": "Greens",
                               "attn": "Reds"}


def plot_trace(result: PatchingResult, ax: Any = None, title: str | None = None) -> Any:
    """ROME-style heatmap of a causal-tracing result (``method="causal_tracing"``).

    Rows are the position groups (or tokens), columns the layers, as in Meng et al.'s figures,
    on a sequential colour scale from 0 (:data:`TRACE_CMAPS`: purple for hidden states, green
    for MLPs, red for attention). Groups no prompt contributed to
    (``extra["group_counts"]`` 0) are left blank. Returns the Figure (a new
    :class:`~causalpatch.render.figure.ResultFigure` without ``ax``, else ``ax.figure``).
    """
    import numpy as np

    from .figure import ResultFigure

    matrix = result.effect_matrix.numpy().T.astype(float)  # [groups/positions, layers]
    counts = result.extra.get("group_counts")
    if counts is not None:
        matrix[np.asarray(counts) == 0, :] = np.nan
    row_axis = result.axes[1]
    rows = list(result.labels[row_axis])
    if counts is not None:
        rows = [f"{r} ({c})" for r, c in zip(rows, counts)]
    if ax is None:
        fig = ResultFigure(figsize=(max(6.0, 0.22 * matrix.shape[1] + 3), 0.42 * len(rows) + 1.6),
                           layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    cmap = TRACE_CMAPS.get(result.component, "Purples")
    finite = matrix[np.isfinite(matrix)]
    vmax = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    image = ax.imshow(np.ma.masked_invalid(matrix), aspect="auto", cmap=cmap, vmin=0.0,
                      vmax=vmax, interpolation="nearest")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(rows)
    layers = list(result.labels["layer"])
    step = max(1, len(layers) // 15)
    ax.set_xticks(range(0, len(layers), step))
    ax.set_xticklabels([str(v) for v in layers[::step]])
    ax.set_xlabel("layer" + (f" (window {result.extra.get('window')})"
                             if result.component in ("mlp", "attn") else ""))
    colorbar = fig.colorbar(image, ax=ax)
    colorbar.set_label("indirect effect  p(restored) - p(corrupted)")
    if title is None:
        n = result.extra.get("n_prompts", 1)
        title = (f"causal tracing: restore {result.component} — {result.model_name}, "
                 f"{n} prompt{'s' if n != 1 else ''}")
    ax.set_title(title)
    return fig


__all__ = ["CMAP", "TRACE_CMAPS", "max_magnitude", "plot_result", "plot_trace",
           "symmetric_limit", "title_of", "value_label"]

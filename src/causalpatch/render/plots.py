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

Sizes are for print: new figures are :data:`COLUMN_WIDTH` (3.4 in, one column of a two-column
paper) wide, 3-D panel grids :data:`TEXT_WIDTH` (7 in); fonts are 7-9 pt at that size. The
title names the method and the component in words, the model, the number of pairs and the
metric (:func:`~causalpatch.render.text.figure_title`). A position axis says whether its ticks
are roles every pair shares (``position (role)``) or the tokens of pair 0.

Heatmaps use the diverging map :data:`CMAP` with limits symmetric around 0 (``vmax=`` sets
them, e.g. to share one scale across figures), so white is "no effect"; NaN cells are grey.
Long axes show every k-th tick label, as many as fit (at most :data:`MAX_TICKS`).

New figures are :class:`~causalpatch.render.figure.ResultFigure` objects: ordinary ``Figure``
objects whose ``show()`` works although pyplot did not create them (it hands the figure to
pyplot first; on a plain object-API ``Figure``, ``show()`` raises ``AttributeError``) and
whose ``save(path)`` writes PNG (300 dpi), SVG or PDF by suffix or ``format=``.

Results are duck-typed: anything with ``effect_matrix``, ``axes``, ``std``, ``normalized``,
``method``, ``component``, ``metric``, ``direction`` and ``cell_text(axis, i)`` can be drawn.
"""

from __future__ import annotations

import math
import textwrap
from typing import TYPE_CHECKING, Any

from .text import axis_title, figure_title, metric_words, short_model_name, subject_text

if TYPE_CHECKING:
    import numpy as np

    from ..result import PatchingResult

CMAP = "RdBu_r"
"""Diverging colour map: red = positive effect, blue = negative."""
POSITIVE, NEGATIVE = "#b2182b", "#2166ac"
MAX_TICKS = 48
MAX_PANELS = 16
COLUMN_WIDTH = 3.4
"""Default figure width in inches: one column of a two-column paper."""
TEXT_WIDTH = 7.0
"""Default width of 3-D panel grids: the full text width of a two-column paper."""
FONT_SIZE = 7.0
"""Tick-label size in points at :data:`COLUMN_WIDTH` (axis labels +1, title +1)."""


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
    """Default title: the method and component in words; model, pair count, metric."""
    return figure_title(result)


def value_label(result: PatchingResult) -> str:
    """Colour bar / y-axis label."""
    if result.normalized:
        if result.method == "attribution_patching":
            return "estimated effect (0 none, 1 full)"
        return "effect (0 none, 1 full)"
    if result.method == "ablation":
        return f"change in {metric_words(result.metric)}"
    return metric_words(result.metric)


def _texts(result: PatchingResult, axis: str, n: int) -> list[str]:
    return [result.cell_text(axis, i) for i in range(n)]


def _clamp(value: float, low: float, high: float) -> float:
    return max(low, min(high, value))


def _set_ticks(ax: Any, which: str, texts: list[str], title: str, axis_name: str, fs: float,
               span_in: float, show: bool = True) -> None:
    """Every k-th tick label, as many as fit in ``span_in`` inches at ``fs`` points."""
    n = len(texts)
    fit = max(2, int(span_in * 72 / (fs * 1.45)))
    step = max(1, math.ceil(n / min(MAX_TICKS, fit)))
    ticks = list(range(0, n, step))
    if which == "x":
        ax.set_xticks(ticks)
        if not show:
            ax.set_xticklabels([])
            return
        rotate = axis_name == "position" or max((len(texts[i]) for i in ticks), default=0) > 3
        ax.set_xticklabels([texts[i] for i in ticks], fontsize=fs, rotation=60 if rotate else 0,
                           ha="right" if rotate else "center", rotation_mode="anchor")
        ax.set_xlabel(title, fontsize=fs + 1)
    else:
        ax.set_yticks(ticks)
        if not show:
            ax.set_yticklabels([])
            return
        ax.set_yticklabels([texts[i] for i in ticks], fontsize=fs)
        ax.set_ylabel(title, fontsize=fs + 1)
    ax.tick_params(length=2, width=0.5, pad=1.5)


def _cmap() -> Any:
    from matplotlib import colormaps

    return colormaps[CMAP].with_extremes(bad="#d0d0d0")


def _heatmap(ax: Any, result: PatchingResult, mat: np.ndarray, rows: list[str], cols: list[str],
             row_axis: str, col_axis: str, vmax: float, fs: float, size_in: tuple[float, float],
             show_x: bool = True, show_y: bool = True) -> Any:
    image = ax.imshow(mat, cmap=_cmap(), vmin=-vmax, vmax=vmax, aspect="auto",
                      interpolation="nearest")
    _set_ticks(ax, "y", rows, axis_title(result, row_axis), row_axis, fs, size_in[1], show_y)
    _set_ticks(ax, "x", cols, axis_title(result, col_axis), col_axis, fs, size_in[0], show_x)
    for spine in ax.spines.values():
        spine.set_linewidth(0.5)
    return image


def _colorbar(fig: Any, image: Any, ax: Any, label: str, fs: float, **kwargs: Any) -> Any:
    bar = fig.colorbar(image, ax=ax, **kwargs)
    bar.set_label(label, fontsize=fs)
    bar.ax.tick_params(labelsize=fs, length=2, width=0.5)
    bar.outline.set_linewidth(0.5)
    return bar


def plot_result(result: PatchingResult, ax: Any = None, title: str | None = None,
                vmax: float | None = None, width: float | None = None) -> Any:
    """Draw ``result`` (see the module docstring) and return the matplotlib ``Figure``.

    Without ``ax`` the figure is a new :class:`~causalpatch.render.figure.ResultFigure` (so
    ``plot_result(r).show()`` and ``.save("fig.pdf")`` work), :data:`COLUMN_WIDTH` inches wide
    (:data:`TEXT_WIDTH` for a 3-D panel grid) unless ``width`` says otherwise, with fonts sized
    for print at that width. With ``ax`` it is ``ax.figure``, the caller's figure. Always a
    figure, never an ``Axes``.

    Args:
        result: the result.
        ax: an ``Axes`` to draw into.
        title: overrides the default title (:func:`~causalpatch.render.text.figure_title`);
            ``""`` for none.
        vmax: colour limit of heatmaps (``-vmax..vmax``), e.g. to share one scale across
            figures; default ``max |effect|``.
        width: figure width in inches (new figures only).
    """
    import numpy as np

    from .figure import ResultFigure

    m = result.effect_matrix.double().numpy()
    axes = result.axes
    names = [_texts(result, a, n) for a, n in zip(axes, m.shape)]
    heading = title_of(result) if title is None else title
    if title is None:  # wrap the default title to the figure (paper columns are narrow)
        chars = int(((width or (TEXT_WIDTH if m.ndim == 3 and ax is None else COLUMN_WIDTH))
                     * 72) / (FONT_SIZE * 0.62))
        heading = "\n".join(textwrap.fill(line, max(30, chars)) for line in heading.split("\n"))
    vlabel = value_label(result)
    limit = symmetric_limit(m) if vmax is None or not vmax > 0 else float(vmax)

    def font_for(fig_width: float) -> float:
        return FONT_SIZE * _clamp(fig_width / COLUMN_WIDTH, 1.0, 1.5)

    if m.ndim == 1:
        if ax is None:
            w = width or COLUMN_WIDTH
            fig = ResultFigure(figsize=(w, _clamp(0.45 * w + 0.9, 2.2, 4.0)),
                               layout="constrained")
            ax = fig.add_subplot()
        fig = ax.figure
        fw, fh = fig.get_size_inches()
        fs = font_for(fw)
        x = np.arange(len(m))
        ax.bar(x, np.nan_to_num(m), color=[POSITIVE if v > 0 else NEGATIVE for v in m],
               width=0.8)
        if result.std is not None:
            ax.errorbar(x, m, yerr=result.std.double().numpy(), fmt="none", ecolor="black",
                        capsize=1.5, linewidth=0.6)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_xlim(-0.6, len(m) - 0.4)
        _set_ticks(ax, "x", names[0], axis_title(result, axes[0]), axes[0], fs, fw * 0.8)
        ax.set_ylabel(vlabel, fontsize=fs + 1)
        ax.tick_params(axis="y", labelsize=fs, length=2, width=0.5)
        for spine in ("top", "right"):
            ax.spines[spine].set_visible(False)
        if heading:
            ax.set_title(heading, fontsize=fs + 1)
        return fig

    reduce = m.ndim > 3 or ax is not None or (m.ndim == 3 and m.shape[2] > MAX_PANELS)
    if m.ndim == 2 or reduce:
        if m.ndim > 2:
            trailing = " x ".join(axes[2:])
            m, _ = max_magnitude(m.reshape(m.shape[0], m.shape[1], -1), axis=2)
            if vmax is None:
                limit = symmetric_limit(m)
            heading = f"{heading}\n(largest |effect| over {trailing})" if heading else heading
        if ax is None:
            w = width or COLUMN_WIDTH
            fig = ResultFigure(figsize=(w, _clamp(0.11 * m.shape[0] + 1.5, 2.2, 6.5)),
                               layout="constrained")
            ax = fig.add_subplot()
        fig = ax.figure
        fw, fh = fig.get_size_inches()
        fs = font_for(fw)
        image = _heatmap(ax, result, m, names[0], names[1], axes[0], axes[1], limit, fs,
                         (fw * 0.75, fh * 0.7))
        _colorbar(fig, image, ax, vlabel, fs, fraction=0.05, pad=0.02)
        if heading:
            ax.set_title(heading, fontsize=fs + 1)
        return fig

    # 3-D: one panel per entry of the last axis, shared colour scale.
    n = m.shape[2]
    ncols = min(4, math.ceil(math.sqrt(n)))
    nrows = math.ceil(n / ncols)
    w = width or TEXT_WIDTH
    panel_w = (w - 0.8) / ncols
    panel_h = _clamp(0.05 * m.shape[0] + 0.8, 1.3, 2.6)
    fig = ResultFigure(figsize=(w, panel_h * nrows + 0.8), layout="constrained")
    fs = FONT_SIZE * _clamp(panel_w / 1.6, 0.85, 1.2)
    grid = fig.subplots(nrows, ncols, squeeze=False)
    image, shown = None, []
    for k in range(nrows * ncols):
        panel = grid[k // ncols][k % ncols]
        if k >= n:
            panel.set_visible(False)
            continue
        image = _heatmap(panel, result, m[:, :, k], names[0], names[1], axes[0], axes[1], limit,
                         fs, (panel_w * 0.8, panel_h * 0.7), show_x=k + ncols >= n,
                         show_y=k % ncols == 0)
        panel.set_title(f"{axes[2]} {names[2][k]}", fontsize=fs)
        shown.append(panel)
    _colorbar(fig, image, shown, vlabel, fs, shrink=0.8)
    if heading:
        fig.suptitle(heading, fontsize=fs + 2)
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
    ax.set_ylabel("position (* = subject token)" if row_axis == "position"
                  else "position group (prompts with it)")
    layers = list(result.labels["layer"])
    step = max(1, len(layers) // 15)
    ax.set_xticks(range(0, len(layers), step))
    ax.set_xticklabels([str(v) for v in layers[::step]])
    ax.set_xlabel("layer" + (f" (window {result.extra.get('window')})"
                             if result.component in ("mlp", "attn") else ""))
    colorbar = fig.colorbar(image, ax=ax)
    base = result.corrupted_metric
    colorbar.set_label("indirect effect  p(restored) - p(subject noised)"
                       + (f"\n0 = subject noised (p = {base:.3g})" if base is not None else ""))
    if title is None:
        title = trace_title(result)
    ax.set_title(title, fontsize=10)
    return fig


def trace_title(result: PatchingResult) -> str:
    """Three short lines: what was restored (and the window), the subject and the noise, the
    model and the prompts."""
    extra = result.extra if isinstance(result.extra, dict) else {}
    n = extra.get("n_prompts", 1)
    window = extra.get("window")
    first = f"Causal tracing: restore {result.component}"
    if result.component in ("mlp", "attn") and window is not None:
        first += f" (window {window})"
    second = subject_text(result) + " noised"
    if "noise" in extra:
        second += f" ({float(extra['noise']):g} x embedding std"
        second += f", {extra['samples']} samples)" if extra.get("samples") else ")"
    third = (f"{short_model_name(result.model_name) or 'model'} · "
             f"{n} prompt{'s' if n != 1 else ''}")
    return "\n".join((first, second, third))


__all__ = ["CMAP", "COLUMN_WIDTH", "TEXT_WIDTH", "TRACE_CMAPS", "max_magnitude", "plot_result",
           "plot_trace", "symmetric_limit", "title_of", "trace_title", "value_label"]

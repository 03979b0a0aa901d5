"""Self-contained interactive HTML reports.

:func:`report` writes ONE HTML file that needs no network: plotly.js (plotly's offline bundle,
``plotly.offline.get_plotlyjs()``) is inlined once however many results there are. Each result
gets an interactive plotly heatmap (bar chart for 1-D results; 3-D results get a slider over
the last axis, starting on the largest-magnitude effect over it) whose hover text shows the
layer, head, position token and effect; a top-components table; and the run's metadata (model,
prompts, tokens, metric, direction, baselines, timings, method metadata). The page header lists
the versions of causalpatch, torch, transformers and plotly.

Safety: every piece of user text (prompts, tokens, labels, titles, model names) is HTML-escaped;
the plot data is JSON inside a ``<script type="application/json">`` element with ``</`` written
as ``<\\/``, so a hostile prompt shows as text and cannot close the element. Text plotly draws is
escaped too (plotly reads a few HTML tags in labels). A Content-Security-Policy allows only the
page's own two scripts (by sha256) and no network access at all; plotly's "share to cloud"
button is switched off.

Size: plotly.js is about 4.8 MB; data is rounded to 5 significant digits, so a report with a
30x9 and three 30x14 heatmaps is about 4.87 MB (4.65 MiB).

Results are duck-typed (see :func:`is_result`): this module never imports
``causalpatch.result``.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import itertools
import json
import math
import os
import platform
from collections.abc import Sequence
from importlib import metadata
from typing import TYPE_CHECKING, Any

from .._io import atomic_write_text
from ..errors import InvalidArgumentError, InvalidTypeError
from .markdown import timing_name
from .plots import max_magnitude, plot_result, symmetric_limit

if TYPE_CHECKING:
    from ..result import PatchingResult

# ColorBrewer RdBu, reversed: blue negative, white 0, red positive (matplotlib's "RdBu_r").
COLORSCALE = [[i / 10, c] for i, c in enumerate([
    "#053061", "#2166ac", "#4393c3", "#92c5de", "#d1e5f0", "#f7f7f7",
    "#fddbc7", "#f4a582", "#d6604d", "#b2182b", "#67001f"])]
POSITIVE, NEGATIVE = "#b2182b", "#2166ac"
MAX_PROMPTS = 10
MAX_EXTRA_CHARS = 20_000
_SIG_DIGITS = 5
RESULT_ATTRIBUTES = ("effect_matrix", "axes", "labels", "shape", "std", "method", "component",
                     "metric", "direction", "normalized", "cell_text", "top_cells")
"""What :func:`report` needs of a result (a ``PatchingResult`` has all of them)."""


def is_result(value: Any) -> bool:
    """True for a ``PatchingResult`` or any object with its :data:`RESULT_ATTRIBUTES`."""
    return all(hasattr(value, name) for name in RESULT_ATTRIBUTES)


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries a result depends on ("not installed" if absent)."""
    out = {}
    for name in ("causalpatch", "torch", "transformers", "plotly"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    out["python"] = platform.python_version()
    return out


def script_json(value: Any) -> str:
    """JSON that is safe inside a ``<script>`` element and still valid JSON.

    ``</`` becomes ``<\\/`` (so no ``</script>`` can close the element), ``<!--`` becomes
    ``\\u003c!--`` and U+2028/U+2029 are escaped.
    """
    return (json.dumps(value, allow_nan=False, ensure_ascii=False)
            .replace("</", "<\\/").replace("<!--", "\\u003c!--")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _pt(value: Any) -> str:
    """Text for plotly to draw: plotly reads <b>, <br>, <a href> and entities in labels."""
    return html.escape(str(value), quote=False)


def _tmpl(value: Any) -> str:
    """Literal text inside a plotly hovertemplate (``%{`` must not start a field)."""
    return _pt(value).replace("{", "&#123;").replace("}", "&#125;")


def _num(value: float) -> float | None:
    if not math.isfinite(value):
        return None
    return float(f"{value:.{_SIG_DIGITS}g}")


def _nums(values: Any) -> Any:
    if isinstance(values, list):
        return [_nums(v) for v in values]
    return _num(values)


def _unique(texts: list[str]) -> list[str]:
    """Plotly category labels must be unique; repeated ones get " (2)", " (3)", ..."""
    seen: dict[str, int] = {}
    out = []
    for text in texts:
        seen[text] = seen.get(text, 0) + 1
        out.append(text if seen[text] == 1 else f"{text} ({seen[text]})")
    return out


def result_title(result: PatchingResult) -> str:
    """Heading of one result: method, component, metric, direction."""
    return (f"{result.method.replace('_', ' ')}: {result.component} ({result.metric}, "
            f"{result.direction})")


def figure_spec(result: PatchingResult) -> dict[str, Any]:
    """The plotly figure (``data`` and ``layout``) of one result, all text escaped for plotly."""
    import numpy as np

    m = result.effect_matrix.double().numpy()
    axes = result.axes
    names = [_unique([_pt(result.cell_text(a, i)) for i in range(n)])
             for a, n in zip(axes, m.shape)]
    vmax = _num(symmetric_limit(m))
    value_name = "effect" if result.normalized else _pt(result.metric)
    std = None if result.std is None else result.std.double().numpy()
    font = {"family": "system-ui, -apple-system, Segoe UI, Helvetica, Arial, sans-serif"}
    layout: dict[str, Any] = {
        "title": {"text": _pt(result_title(result)), "font": {"size": 15}},
        "font": font, "paper_bgcolor": "white", "plot_bgcolor": "white",
        "margin": {"l": 70, "r": 30, "t": 60, "b": 60},
    }

    def axis_layout(axis: str, reverse: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {"title": {"text": _pt(axis)}, "type": "category",
                               "automargin": True}
        if axis == "position":
            out["tickangle"] = -40
        if reverse:
            out["autorange"] = "reversed"
        return out

    if m.ndim == 1:
        template = f"{_tmpl(axes[0])} %{{x}}<br>{_tmpl(value_name)} %{{y:+.4f}}"
        trace: dict[str, Any] = {
            "type": "bar", "x": names[0], "y": _nums(m.tolist()),
            "marker": {"color": [POSITIVE if v > 0 else NEGATIVE for v in m.tolist()]},
        }
        if std is not None:
            trace["error_y"] = {"type": "data", "array": _nums(std.tolist()), "visible": True,
                                "thickness": 1, "width": 2, "color": "#333"}
            trace["customdata"] = _nums(std.tolist())
            template += "<br>std %{customdata:.4f}"
        trace["hovertemplate"] = template + "<extra></extra>"
        layout.update(height=400, xaxis=axis_layout(axes[0]), bargap=0.15,
                      yaxis={"title": {"text": value_name}, "zeroline": True,
                             "zerolinecolor": "#444", "gridcolor": "#eee"})
        return {"data": [trace], "layout": layout}

    row_axis, col_axis = axes[0], axes[1]
    base = f"{_tmpl(row_axis)} %{{y}}<br>{_tmpl(col_axis)} %{{x}}<br>"
    value_part = f"{_tmpl(value_name)} %{{z:+.4f}}"
    height = int(min(1400, max(340, 17 * m.shape[0] + 190)))
    trace = {"type": "heatmap", "x": names[1], "y": names[0], "colorscale": COLORSCALE,
             "zmin": -vmax, "zmax": vmax, "zauto": False, "xgap": 1, "ygap": 1,
             "colorbar": {"title": {"text": value_name}, "thickness": 14}}
    layout.update(height=height, xaxis=axis_layout(col_axis), yaxis=axis_layout(row_axis, True))
    if m.ndim == 2:
        trace["z"] = _nums(m.tolist())
        template = base + value_part
        if std is not None:
            trace["customdata"] = _nums(std.tolist())
            template += "<br>std %{customdata:.4f}"
        trace["hovertemplate"] = template + "<extra></extra>"
        return {"data": [trace], "layout": layout}

    # 3-D and more: trailing axes flattened into one "panel" axis with a slider over it.
    flat = m.reshape(m.shape[0], m.shape[1], -1)
    std_flat = None if std is None else std.reshape(flat.shape)
    if m.ndim == 3:
        panel_axis, panel_names = axes[2], names[2]
    else:
        panel_axis = " / ".join(axes[2:])
        panel_names = [", ".join(f"{_pt(a)} {names[2 + d][i]}" for d, (a, i)
                                 in enumerate(zip(axes[2:], coords)))
                       for coords in itertools.product(*map(range, m.shape[2:]))]
    reduced, which = max_magnitude(flat, axis=2)
    which_names = np.array(panel_names, dtype=object)[which].tolist()
    overview = {"z": [_nums(reduced.tolist())], "customdata": [which_names],
                "hovertemplate": [base + f"{_tmpl(panel_axis)} %{{customdata}} (largest)<br>"
                                  + value_part + "<extra></extra>"]}
    steps = [{"label": "max |effect|", "method": "restyle", "args": [overview, [0]]}]
    for k, name in enumerate(panel_names):
        template = base + f"{_tmpl(panel_axis)} {_tmpl(name)}<br>" + value_part
        update: dict[str, Any] = {"z": [_nums(flat[:, :, k].tolist())]}
        if std_flat is not None:
            update["customdata"] = [_nums(std_flat[:, :, k].tolist())]
            template += "<br>std %{customdata:.4f}"
        update["hovertemplate"] = [template + "<extra></extra>"]
        steps.append({"label": name, "method": "restyle", "args": [update, [0]]})
    trace.update({key: value[0] for key, value in overview.items()})
    layout["height"] = height + 90
    layout["sliders"] = [{
        "active": 0, "steps": steps, "pad": {"t": 95, "b": 10}, "len": 1.0,
        "currentvalue": {"prefix": f"{_pt(panel_axis)}: ", "font": {"size": 13}},
    }]
    return {"data": [trace], "layout": layout}


def _cell_value(result: PatchingResult, coords: tuple[int, ...]) -> tuple[float, float | None]:
    value = float(result.effect_matrix[coords])
    std = None if result.std is None else float(result.std[coords])
    return value, std


def top_table(result: PatchingResult, k: int = 10) -> str:
    """HTML table of the ``k`` largest-magnitude cells (axis labels, effect, std)."""
    head = "".join(f"<th>{_esc(a)}</th>" for a in result.axes) + "<th>effect</th>"
    if result.std is not None:
        head += "<th>std</th>"
    rows = []
    for coords, effect in result.top_cells(k):
        cells = "".join(f"<td>{_esc(result.cell_text(a, c))}</td>"
                        for a, c in zip(result.axes, coords))
        cells += f"<td class='num'>{effect:+.4f}</td>"
        if result.std is not None:
            cells += f"<td class='num'>{_cell_value(result, coords)[1]:.4f}</td>"
        rows.append(f"<tr>{cells}</tr>")
    return f"<table class='top'><tr>{head}</tr>{''.join(rows)}</table>"


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def metadata_table(result: PatchingResult) -> str:
    """HTML tables of the run: settings, baselines, prompts, tokens, timings, extra."""
    kind = ("normalised: (patched - base) / (source - base)" if result.normalized
            else "raw values")
    items = [
        ("model", result.model_name or "(unnamed)"),
        ("method", result.method), ("component", result.component),
        ("metric", f"{result.metric} ({kind})"), ("direction", result.direction),
        ("shape", " x ".join(f"{a} {n}" for a, n in zip(result.axes, result.shape))),
    ]
    if result.clean_metric is not None:
        items.append((f"clean {result.metric}", _fmt(result.clean_metric)))
    if result.corrupted_metric is not None:
        items.append((f"corrupted {result.metric}", _fmt(result.corrupted_metric)))
    items.append(("pairs", str(result.n_pairs)))
    if result.timings:
        items.append(("timings", ", ".join(
            f"{timing_name(k)} {v:.2f} s" for k, v in result.timings.items())))
    rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in items)
    parts = [f"<table class='meta'>{rows}</table>"]

    n = max(len(result.clean_prompts), len(result.corrupted_prompts))
    if n:
        prompt_rows = []
        for i in range(min(n, MAX_PROMPTS)):
            clean = result.clean_prompts[i] if i < len(result.clean_prompts) else ""
            corrupted = result.corrupted_prompts[i] if i < len(result.corrupted_prompts) else ""
            prompt_rows.append(f"<tr><td class='num'>{i}</td><td><code>{_esc(clean)}</code></td>"
                               f"<td><code>{_esc(corrupted)}</code></td></tr>")
        more = (f"<p class='note'>... and {n - MAX_PROMPTS} more pairs</p>"
                if n > MAX_PROMPTS else "")
        parts.append("<h4>Prompts</h4><table class='prompts'><tr><th>#</th><th>clean</th>"
                     f"<th>corrupted</th></tr>{''.join(prompt_rows)}</table>{more}")
    if result.clean_tokens:
        chips = "".join(f"<span class='tok'><sub>{i}</sub><code>{_esc(t)}</code></span>"
                        for i, t in enumerate(result.clean_tokens[0]))
        parts.append(f"<h4>Tokens of the first clean prompt</h4><div class='toks'>{chips}</div>")
    if result.extra:
        try:
            text = json.dumps(result.extra, indent=1, sort_keys=True, default=str)
        except (TypeError, ValueError):
            text = repr(result.extra)
        if len(text) > MAX_EXTRA_CHARS:
            text = text[:MAX_EXTRA_CHARS] + f"\n... ({len(text) - MAX_EXTRA_CHARS} more chars)"
        parts.append("<details><summary>method metadata (extra)</summary>"
                     f"<pre>{_esc(text)}</pre></details>")
    return "".join(parts)


_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:24px auto;
 color:#222;max-width:1400px;padding:0 16px}
h1{font-size:24px;margin-bottom:4px} h2{font-size:19px;margin-top:36px;
 border-bottom:1px solid #ddd;padding-bottom:4px} h3{font-size:15px;margin:14px 0 6px}
h4{font-size:13px;margin:12px 0 4px}
table{border-collapse:collapse;margin:6px 0;font-size:13px}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f6f6f6} td.num{text-align:right;font-variant-numeric:tabular-nums}
table.meta th{width:170px} .versions,.note{color:#666;font-size:12px}
.cols{display:grid;grid-template-columns:minmax(260px,1fr) 2fr;gap:28px}
@media (max-width:900px){.cols{grid-template-columns:1fr}}
.plot{width:100%;min-height:300px} code{white-space:pre-wrap;font-size:12px}
.toks{display:flex;flex-wrap:wrap;gap:4px} .tok{border:1px solid #ccc;border-radius:3px;
 padding:1px 4px;background:#fafafa} .tok sub{color:#888;margin-right:3px}
.tok code{white-space:pre} pre{font-size:11px;max-height:320px;overflow:auto;background:#f8f8f8;
 padding:8px} nav li{font-size:14px}
"""

_INIT = """(function () {
  var figures = JSON.parse(document.getElementById("cp-figures").textContent);
  var config = {responsive: true, displaylogo: false, showSendToCloud: false,
                plotlyServerURL: "", modeBarButtonsToRemove: ["sendChartToCloud"],
                toImageButtonOptions: {format: "png", filename: "causalpatch", scale: 2}};
  figures.forEach(function (f) { Plotly.newPlot(f.id, f.data, f.layout, config); });
})();"""


def _csp_hash(script: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode() + "'"


def report(results: PatchingResult | Sequence[PatchingResult],
           path: str | os.PathLike[str] | None = None,
           title: str = "causalpatch report") -> str:
    """Build one self-contained HTML report of one or several results.

    Args:
        results: a result or a sequence of them (e.g. resid, attn, mlp and heads of one
            experiment). plotly.js is inlined once whatever their number.
        path: where to write it (atomically); None only returns the HTML text.
        title: page title and heading (escaped; None means the default).

    Returns:
        The HTML text.

    Raises:
        InvalidArgumentError: no results.
        InvalidTypeError: an item is not a :class:`~causalpatch.result.PatchingResult` (nor
            shaped like one, see :func:`is_result`).
    """
    from plotly.offline import get_plotlyjs

    items = [results] if is_result(results) else list(results)
    if not items:
        raise InvalidArgumentError("report needs at least one result, got none")
    for item in items:
        if not is_result(item):
            raise InvalidTypeError(
                f"report takes PatchingResult objects, got {type(item).__name__}")
    title = "causalpatch report" if title is None else str(title)

    sections, figures, toc = [], [], []
    for i, result in enumerate(items):
        heading = f"{i + 1}. {result_title(result)}"
        plot_id = f"plot-{i}"
        figures.append({"id": plot_id, **figure_spec(result)})
        toc.append(f"<li><a href='#result-{i}'>{_esc(result_title(result))}</a></li>")
        sections.append(
            f"<section id='result-{i}'><h2>{_esc(heading)}</h2>"
            f"<div id='{plot_id}' class='plot'></div>"
            f"<div class='cols'><div><h3>Top components</h3>{top_table(result)}</div>"
            f"<div><h3>Run</h3>{metadata_table(result)}</div></div></section>")
    plotly_js = get_plotlyjs()
    csp = ("default-src 'none'; script-src " + _csp_hash(plotly_js) + " " + _csp_hash(_INIT)
           + "; style-src 'unsafe-inline'; img-src data: blob:; font-src data:; "
           "form-action 'none'; base-uri 'none'")
    versions = ", ".join(f"{k} {v}" for k, v in library_versions().items())
    nav = f"<nav><ol>{''.join(toc)}</ol></nav>" if len(items) > 1 else ""
    page = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<meta http-equiv='Content-Security-Policy' content=\"{csp}\">"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        "<meta name='generator' content='causalpatch'>"
        f"<title>{_esc(title)}</title><style>{_STYLE}</style>\n"
        f"<script>{plotly_js}</script>\n</head><body>"
        f"<h1>{_esc(title)}</h1><p class='versions'>{_esc(versions)}</p>{nav}"
        f"{''.join(sections)}\n"
        f"<script type='application/json' id='cp-figures'>{script_json(figures)}</script>\n"
        f"<script>{_INIT}</script>\n</body></html>\n"
    )
    if path is not None:
        atomic_write_text(path, page)
    return page


def compact_html(result: PatchingResult) -> str:
    """Small notebook view: a summary line, a small inline PNG heatmap and the top-5 table.

    3-D results are drawn as one heatmap of the largest-magnitude effect over the last axis.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 3.6), layout="constrained")
    plot_result(result, ax=fig.add_subplot())
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=72)
    image = base64.b64encode(buffer.getvalue()).decode()
    line = (f"{result.method} of {result.component} on {result.model_name or 'a model'}: "
            f"{result.metric}, {result.direction}, "
            f"{' x '.join(f'{a} {n}' for a, n in zip(result.axes, result.shape))}")
    baselines = []
    if result.clean_metric is not None:
        baselines.append(f"clean {result.clean_metric:.4f}")
    if result.corrupted_metric is not None:
        baselines.append(f"corrupted {result.corrupted_metric:.4f}")
    return (f"<div class='causalpatch-result' style='font-size:12px'>"
            f"<div><b>{_esc(line)}</b></div>"
            + (f"<div>{_esc('; '.join(baselines))}</div>" if baselines else "")
            + f"<img alt='effect plot' style='max-width:100%' "
              f"src='data:image/png;base64,{image}'/>{top_table(result, 5)}</div>")


__all__ = ["COLORSCALE", "RESULT_ATTRIBUTES", "compact_html", "figure_spec", "is_result",
           "library_versions", "metadata_table", "report", "result_title", "script_json",
           "top_table"]

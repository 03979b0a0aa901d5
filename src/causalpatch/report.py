"""Self-contained interactive HTML reports.

:func:`report` writes one HTML file with plotly.js inlined (no network needed to view it), one
interactive heatmap or bar chart per result (hover: layer, head, position token, effect), the
top-components table and the run's metadata. All user text (prompts, tokens, titles, model
names) is HTML-escaped, and JSON embedded in ``<script>`` has ``</`` escaped, so a hostile prompt
shows as text.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Sequence
from importlib import metadata
from typing import TYPE_CHECKING, Any

from ._io import atomic_write_text

if TYPE_CHECKING:
    from .result import PatchingResult


def _versions() -> dict[str, str]:
    out = {}
    for name in ("causalpatch", "torch", "transformers"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _script_json(value: Any) -> str:
    """JSON safe to embed in a ``<script>`` element."""
    return (json.dumps(value, allow_nan=False).replace("</", "<\\/").replace("<!--", "<\\!--")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def _figure_spec(result: PatchingResult, title: str) -> list[dict[str, Any]]:
    """Plotly data+layout dicts (one per panel) for a result."""
    m = result.effect_matrix.float()
    names = [result.labels.get(a, list(range(n))) for a, n in zip(result.axes, m.shape)]
    vmax = float(m.abs().max()) or 1.0
    colorbar = {"title": {"text": "effect" if result.normalized else result.metric}}
    if m.dim() == 1:
        axis = result.axes[0]
        return [{
            "data": [{"type": "bar", "x": [str(x) for x in names[0]], "y": m.tolist(),
                      "marker": {"color": m.tolist(), "colorscale": "RdBu_r",
                                 "cmin": -vmax, "cmax": vmax},
                      "hovertemplate": f"{axis} %{{x}}<br>effect %{{y:.4f}}<extra></extra>"}],
            "layout": {"title": {"text": title}, "xaxis": {"title": {"text": axis}},
                       "yaxis": {"title": {"text": "effect"}}, "height": 380},
        }]
    panels = []
    mats = [(m, "")] if m.dim() == 2 else [
        (m[:, :, k], f" — {result.axes[2]} {names[2][k]}") for k in range(m.shape[2])]
    row_axis, col_axis = result.axes[0], result.axes[1]
    for mat, suffix in mats:
        panels.append({
            "data": [{"type": "heatmap", "z": mat.tolist(),
                      "x": [str(c) for c in names[1]], "y": [str(r) for r in names[0]],
                      "colorscale": "RdBu_r", "zmid": 0,
                      "zmin": -vmax, "zmax": vmax, "colorbar": colorbar,
                      "hovertemplate": (f"{row_axis} %{{y}}<br>{col_axis} %{{x}}<br>"
                                        "effect %{z:.4f}<extra></extra>")}],
            "layout": {"title": {"text": title + suffix},
                       "xaxis": {"title": {"text": col_axis}, "type": "category"},
                       "yaxis": {"title": {"text": row_axis}, "type": "category",
                                 "autorange": "reversed"},
                       "height": max(360, 16 * mat.shape[0] + 160)},
        })
    return panels


def _table(result: PatchingResult, k: int = 10) -> str:
    head = "".join(f"<th>{html.escape(a)}</th>" for a in result.axes) + "<th>effect</th>"
    rows = []
    for index, effect in result.top_components(k):
        idx = index if isinstance(index, tuple) else (index,)
        cells = []
        for axis, value in zip(result.axes, idx):
            text = str(value)
            if axis == "position":
                positions = result.extra.get("positions") or []
                if value in positions:
                    text = str(result.labels["position"][positions.index(value)])
            cells.append(f"<td>{html.escape(text)}</td>")
        rows.append("<tr>" + "".join(cells) + f"<td>{effect:+.4f}</td></tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _metadata(result: PatchingResult) -> str:
    items = [
        ("method", result.method), ("component", result.component), ("metric", result.metric),
        ("direction", result.direction), ("model", result.model_name),
        ("shape", " x ".join(f"{a}={n}" for a, n in zip(result.axes, result.shape))),
        ("clean metric", "" if result.clean_metric is None else f"{result.clean_metric:.4f}"),
        ("corrupted metric",
         "" if result.corrupted_metric is None else f"{result.corrupted_metric:.4f}"),
        ("pairs", str(result.extra.get("n_pairs", len(result.clean_prompts)))),
        ("timings", ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items())),
    ]
    prompts = list(zip(result.clean_prompts, result.corrupted_prompts))[:5]
    for i, (c, k) in enumerate(prompts):
        items.append((f"clean prompt {i}", c))
        items.append((f"corrupted prompt {i}", k))
    if result.clean_tokens:
        items.append(("clean tokens", " | ".join(result.clean_tokens[0])))
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
                   for k, v in items)
    return f"<table class='meta'>{rows}</table>"


_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px} h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0;font-size:13px}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
table.meta th{background:#f6f6f6;width:160px} .plot{width:100%}
.versions{color:#666;font-size:12px}
"""


def report(results: PatchingResult | Sequence[PatchingResult],
           path: str | os.PathLike[str] | None = None, title: str | None = None) -> str:
    """Build one self-contained HTML report of one or several results.

    Args:
        results: a result or a list (e.g. resid, attn, mlp and heads of one experiment).
        path: where to write it (atomically); None only returns the HTML text.
        title: page title (escaped).

    Returns:
        The HTML text.
    """
    from plotly.offline import get_plotlyjs

    from .result import PatchingResult

    items = [results] if isinstance(results, PatchingResult) else list(results)
    title = title or "causalpatch report"
    sections, plots = [], []
    for i, result in enumerate(items):
        rtitle = f"{result.method.replace('_', ' ')}: {result.component} ({result.metric}, " \
                 f"{result.direction})"
        divs = []
        for j, spec in enumerate(_figure_spec(result, rtitle)):
            div_id = f"plot-{i}-{j}"
            divs.append(f"<div id='{div_id}' class='plot'></div>")
            plots.append((div_id, spec))
        sections.append(
            f"<section><h2>{html.escape(rtitle)}</h2>{''.join(divs)}"
            f"<h3>Top components</h3>{_table(result)}<h3>Run</h3>{_metadata(result)}</section>")
    calls = "\n".join(
        f"Plotly.newPlot({_script_json(div)}, {_script_json(spec['data'])}, "
        f"{_script_json(spec['layout'])}, {{responsive: true, displaylogo: false}});"
        for div, spec in plots)
    versions = ", ".join(f"{k} {v}" for k, v in _versions().items())
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style>"
        f"<script>{get_plotlyjs()}</script></head><body>"
        f"<h1>{html.escape(title)}</h1><p class='versions'>{html.escape(versions)}</p>"
        f"{''.join(sections)}<script>{calls}</script></body></html>"
    )
    if path is not None:
        atomic_write_text(path, page)
    return page


def compact_html(result: PatchingResult) -> str:
    """Small notebook view: summary line, an inline PNG of the plot and the top table."""
    import base64
    import io

    fig = result.plot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    image = base64.b64encode(buffer.getvalue()).decode()
    return (f"<div><b>{html.escape(repr(result))}</b><br>"
            f"<img src='data:image/png;base64,{image}'/>{_table(result, 5)}</div>")

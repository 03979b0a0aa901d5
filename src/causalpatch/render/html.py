"""Interactive HTML reports.

:func:`report` writes ONE HTML file. By default (``plotly="inline"``) it needs no network:
plotly.js (plotly's offline bundle, ``plotly.offline.get_plotlyjs()``) is inlined once however
many results there are; ``plotly="cdn"`` loads it from cdn.plot.ly instead (a small file that
needs network to draw). The page has:

* with several sections, a **Summary** first: each section's title and its main finding
  (:func:`~.text.headline`), one line each, linking to the section;
* one **Prompts** table per distinct set of prompt pairs (clean, corrupted, answers as text),
  with the tokens of the first clean prompt and their roles; sections built from another set
  than the first section say so;
* per result: a title that says what was done (:func:`~.text.title_words`: path patching's
  senders -> receivers and freeze mode, the ablation kind, attribution's estimates, causal
  tracing's restored state and noised subject; identical titles get " (2)"), a
  plain-language **takeaway** in the method's own terms (which cells recover most of the
  effect, with numbers; attribution values as estimates with the verified exact value beside
  each; an ablation's baseline metric before and after; causal tracing's indirect effect), the
  method's settings as a visible list (senders, receivers and what is frozen; ablation kind
  and baseline; subject, noise, window and baselines of causal tracing; the verified exact
  values), an interactive plotly heatmap (bar chart for 1-D results; 3-D results get a slider
  over the last axis, starting on the largest-magnitude effect over it) whose hover text shows
  the layer, head, position (token or role) and effect; a **per-pair view** (select a pair to
  see its own heatmap, prompts, answers and top cells; ``#pair-0=2`` in the URL preselects
  pair 2 of section 0); a top-components table; and the run's metadata (model, metric,
  direction, baselines, answers, what the position labels are, timings, method metadata);
* causal tracing drawn as its PNG (:func:`~.plots.plot_trace`): positions (subject tokens
  marked ``*``) or ROME's groups down, layers across, the component's sequential colour map
  from 0 (the subject-noised run) to the largest indirect effect;
* logit-lens and direct-logit-attribution results (duck-typed, :mod:`~.lens`) as static
  sections: the lens table and the DLA bars with their closure check;
* edge-attribution results, circuits, faithfulness curves and circuit evaluations
  (duck-typed, :mod:`~.circuit`): the circuit drawn (nodes by layer, the ``top_edges`` best
  edges weighted and signed, a control to change how many, hover for scores and intervals)
  over a sortable table of its edges; the faithfulness curve with its random baseline, CPR
  and CMD; an evaluation's numbers;
* a checkbox switching every heatmap between its own colour range and one range shared by
  all results of the same kind (normalised effects, or raw values of one metric);
  ``shared_scale=True`` starts shared.

The page header lists the versions of causalpatch, torch, transformers and plotly.

Safety: every piece of user text (prompts, tokens, labels, titles, model names) is HTML-escaped;
the plot data is JSON inside a ``<script type="application/json">`` element with ``</`` written
as ``<\\/``, so a hostile prompt shows as text and cannot close the element. Text plotly draws is
escaped too (plotly reads a few HTML tags in labels). A Content-Security-Policy allows only the
page's own two scripts (by sha256; with ``plotly="cdn"``: cdn.plot.ly and the init script) and
no other network access; plotly's "share to cloud" button is switched off. The page script
sets text only through ``textContent``.

Size: plotly.js is about 4.8 MB inlined; data is rounded to 5 significant digits, so a report
with a 30x9 and three 30x14 heatmaps is about 4.9 MB inline and about 0.1 MB with
``plotly="cdn"``. Per-pair views hold at most :data:`MAX_PAIR_VIEWS` pairs and
:data:`MAX_PAIR_VALUES` numbers per result.

Results are duck-typed (see :func:`is_result`): this module never imports
``causalpatch.result``.
"""

from __future__ import annotations

import base64
import hashlib
import io
import itertools
import json
import math
import os
import platform
from collections.abc import Mapping
from importlib import metadata
from typing import TYPE_CHECKING, Any

from .._io import atomic_write_text
from ..errors import InvalidArgumentError, InvalidTypeError
from ..metrics import CI_N_BOOT, CI_SEED
from .markdown import timing_name
from .circuit import CIRCUIT_JS, DEFAULT_EDGES, is_circuit_section
from .circuit import section as circuit_section
from .circuit import section_headline as circuit_headline
from .circuit import section_title as circuit_title
from .lens import (
    dla_headline,
    dla_html,
    dla_title,
    is_dla,
    is_lens,
    lens_headline,
    lens_html,
    lens_title,
)
from .plots import TRACE_CMAPS, max_magnitude, plot_result, plot_trace, symmetric_limit
from .text import (
    axis_title,
    baselines_text,
    component_words,
    esc,
    headline,
    metric_words,
    n_pairs_of,
    pairs_text,
    plotly_text,
    position_roles,
    run_words,
    takeaway,
    title_words,
    value_heading,
    verified_cells,
)

if TYPE_CHECKING:
    from typing_extensions import TypeIs

    from ..result import PatchingResult

# ColorBrewer RdBu, reversed: blue negative, white 0, red positive (matplotlib's "RdBu_r").
COLORSCALE = [[i / 10, c] for i, c in enumerate([
    "#053061", "#2166ac", "#4393c3", "#92c5de", "#d1e5f0", "#f7f7f7",
    "#fddbc7", "#f4a582", "#d6604d", "#b2182b", "#67001f"])]
POSITIVE, NEGATIVE = "#b2182b", "#2166ac"
MAX_PROMPTS = 20
"""Prompt pairs listed per prompt set (the rest is counted)."""
MAX_EXTRA_CHARS = 20_000
MAX_PAIR_VIEWS = 64
"""Pairs selectable in a result's per-pair view."""
MAX_PAIR_VALUES = 200_000
"""Numbers stored for one result's per-pair view (fewer pairs are selectable beyond it)."""
PLOTLY_MODES = ("inline", "cdn")
"""Values of ``report(plotly=...)``."""
_SIG_DIGITS = 5
RESULT_ATTRIBUTES = ("effect_matrix", "axes", "labels", "shape", "std", "method", "component",
                     "metric", "direction", "normalized", "cell_text", "top_cells")
"""What :func:`report` needs of a result (a ``PatchingResult`` has all of them)."""


def is_result(value: Any) -> TypeIs[PatchingResult]:
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




def _tmpl(value: Any) -> str:
    """Literal text inside a plotly hovertemplate (``%{`` must not start a field)."""
    return plotly_text(value).replace("{", "&#123;").replace("}", "&#125;")


def _num(value: float) -> float | None:
    if not math.isfinite(value):
        return None
    return float(f"{value:.{_SIG_DIGITS}g}")


def _limit(value: float) -> float:
    """A colour limit (finite), rounded like the page's other numbers."""
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
    """Heading of one result: what was done in words (:func:`~.text.title_words`: path
    patching's senders -> receivers and freeze mode, the ablation kind, attribution's
    estimates, causal tracing's restored state), then the internal name, metric, direction."""
    if result.method == "causal_tracing":
        how = "indirect effect on p(answer)"
    elif result.method == "ablation":
        how = result.metric
    else:
        how = f"{result.metric}, {result.direction}"
    return f"{title_words(result)} ({result.component}; {how})"


def _font() -> dict[str, str]:
    return {"family": "system-ui, -apple-system, Segoe UI, Helvetica, Arial, sans-serif"}


def _axis_layout(result: PatchingResult, axis: str, reverse: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"title": {"text": plotly_text(axis_title(result, axis))},
                           "type": "category", "automargin": True}
    if axis == "position":
        out["tickangle"] = -40
    if reverse:
        out["autorange"] = "reversed"
    return out


def heatmap_limit(result: PatchingResult) -> float | None:
    """The result's own colour limit (``max |effect|``), or None for 1-D results (bars) and
    causal tracing (a sequential scale from 0, never shared)."""
    m = result.effect_matrix.double().numpy()
    if m.ndim < 2 or result.method == "causal_tracing":  # its own sequential scale from 0
        return None
    return _limit(symmetric_limit(m))


def scale_group(result: PatchingResult) -> str:
    """Results in one group may share a colour scale: normalised effects, or one raw metric."""
    return "normalized" if result.normalized else f"raw:{result.metric}"


def cell_intervals(result: PatchingResult) -> tuple[Any, Any] | None:
    """Every cell's 95% bootstrap interval over the pairs as two float64 arrays shaped like
    ``effect_matrix`` (``result.interval95()``: :data:`~causalpatch.metrics.CI_N_BOOT`
    resamples, seed :data:`~causalpatch.metrics.CI_SEED`), or None when the result has none
    (one pair, no per-pair effects, or an object without ``interval95``)."""
    get = getattr(result, "interval95", None)
    interval = get() if callable(get) else None
    if interval is None:
        return None
    return interval[0].double().numpy(), interval[1].double().numpy()


def _hover_extras(std: Any, interval: tuple[Any, Any] | None) -> tuple[Any, str]:
    """``customdata`` and the hover lines that read it: a cell's std (a bare number when it
    is the only value) and its 95% interval (``[std?, lower, upper]`` per cell). ``std`` and
    the bounds are arrays of one shape; ``(None, "")`` without either."""
    import numpy as np

    columns = [] if std is None else [std]
    lines = [] if std is None else ["std %{customdata:.4f}"]
    if interval is None:
        return (None, "") if std is None else (_nums(std.tolist()), "<br>" + lines[0])
    k = len(columns)
    columns += list(interval)
    if lines:
        lines = ["std %{customdata[0]:.4f}"]
    lines.append(f"95% CI [%{{customdata[{k}]:+.4f}}, %{{customdata[{k + 1}]:+.4f}}]")
    return _nums(np.stack(columns, axis=-1).tolist()), "".join("<br>" + t for t in lines)


def figure_spec(result: PatchingResult, vmax: float | None = None) -> dict[str, Any]:
    """The plotly figure (``data`` and ``layout``) of one result, all text escaped for plotly.

    ``vmax`` sets the colour range ``-vmax..vmax`` of heatmaps (default ``max |effect|``).
    """
    import numpy as np

    m = result.effect_matrix.double().numpy()
    if result.method == "causal_tracing" and m.ndim == 2:
        return trace_figure_spec(result)
    axes = result.axes
    names = [_unique([plotly_text(result.cell_text(a, i)) for i in range(n)])
             for a, n in zip(axes, m.shape)]
    limit = _limit(vmax if vmax is not None and 0 < vmax < math.inf else symmetric_limit(m))
    value_name = _value_name(result)
    std = None if result.std is None else result.std.double().numpy()
    interval = cell_intervals(result)
    layout: dict[str, Any] = {
        "title": {"text": plotly_text(result_title(result)), "font": {"size": 15}},
        "font": _font(), "paper_bgcolor": "white", "plot_bgcolor": "white",
        "margin": {"l": 70, "r": 30, "t": 60, "b": 60},
    }

    if m.ndim == 1:
        template = f"{_tmpl(axes[0])} %{{x}}<br>{_tmpl(value_name)} %{{y:+.4f}}"
        trace: dict[str, Any] = {
            "type": "bar", "x": names[0], "y": _nums(m.tolist()),
            "marker": {"color": [POSITIVE if v > 0 else NEGATIVE for v in m.tolist()]},
        }
        if std is not None:
            trace["error_y"] = {"type": "data", "array": _nums(std.tolist()), "visible": True,
                                "thickness": 1, "width": 2, "color": "#333"}
        elif interval is not None:  # error bars: the 95% interval (hover says so)
            trace["error_y"] = {"type": "data", "symmetric": False, "visible": True,
                                "array": _nums((interval[1] - m).clip(min=0).tolist()),
                                "arrayminus": _nums((m - interval[0]).clip(min=0).tolist()),
                                "thickness": 1, "width": 2, "color": "#333"}
        custom, lines = _hover_extras(std, interval)
        if custom is not None:
            trace["customdata"], template = custom, template + lines
        trace["hovertemplate"] = template + "<extra></extra>"
        layout.update(height=400, xaxis=_axis_layout(result, axes[0]), bargap=0.15,
                      yaxis={"title": {"text": value_name}, "zeroline": True,
                             "zerolinecolor": "#444", "gridcolor": "#eee"})
        return {"data": [trace], "layout": layout}

    row_axis, col_axis = axes[0], axes[1]
    base = f"{_tmpl(row_axis)} %{{y}}<br>{_tmpl(col_axis)} %{{x}}<br>"
    value_part = f"{_tmpl(value_name)} %{{z:+.4f}}"
    height = int(min(1400, max(340, 17 * m.shape[0] + 190)))
    trace = {"type": "heatmap", "x": names[1], "y": names[0], "colorscale": COLORSCALE,
             "zmin": -limit, "zmax": limit, "zauto": False, "xgap": 1, "ygap": 1,
             "colorbar": {"title": {"text": value_name}, "thickness": 14}}
    layout.update(height=height, xaxis=_axis_layout(result, col_axis),
                  yaxis=_axis_layout(result, row_axis, True))
    if m.ndim == 2:
        trace["z"] = _nums(m.tolist())
        template = base + value_part
        custom, lines = _hover_extras(std, interval)
        if custom is not None:
            trace["customdata"], template = custom, template + lines
        trace["hovertemplate"] = template + "<extra></extra>"
        return {"data": [trace], "layout": layout}

    # 3-D and more: trailing axes flattened into one "panel" axis with a slider over it.
    flat = m.reshape(m.shape[0], m.shape[1], -1)
    std_flat = None if std is None else std.reshape(flat.shape)
    interval_flat = None if interval is None else tuple(b.reshape(flat.shape) for b in interval)
    panel_axis, panel_names = _panel_names(result, names)
    reduced, which = max_magnitude(flat, axis=2)
    which_names = np.array(panel_names, dtype=object)[which].tolist()
    overview = {"z": [_nums(reduced.tolist())], "customdata": [which_names],
                "hovertemplate": [base + f"{_tmpl(panel_axis)} %{{customdata}} (largest)<br>"
                                  + value_part + "<extra></extra>"]}
    steps = [{"label": "max |effect|", "method": "restyle", "args": [overview, [0]]}]
    for k, name in enumerate(panel_names):
        template = base + f"{_tmpl(panel_axis)} {_tmpl(name)}<br>" + value_part
        update: dict[str, Any] = {"z": [_nums(flat[:, :, k].tolist())]}
        custom, lines = _hover_extras(
            None if std_flat is None else std_flat[:, :, k],
            None if interval_flat is None else (interval_flat[0][:, :, k],
                                                interval_flat[1][:, :, k]))
        if custom is not None:
            update["customdata"], template = [custom], template + lines
        update["hovertemplate"] = [template + "<extra></extra>"]
        steps.append({"label": name, "method": "restyle", "args": [update, [0]]})
    trace.update({key: value[0] for key, value in overview.items()})
    layout["height"] = height + 90
    layout["sliders"] = [{
        "active": 0, "steps": steps, "pad": {"t": 95, "b": 10}, "len": 1.0,
        "currentvalue": {"prefix": f"{plotly_text(panel_axis)}: ", "font": {"size": 13}},
    }]
    return {"data": [trace], "layout": layout}


def trace_colorscale(component: str, steps: int = 11) -> list[list[Any]]:
    """The plotly colour scale of a causal-tracing component: the same sequential matplotlib
    map as its PNG (:data:`~.plots.TRACE_CMAPS`: purple hidden states, green MLP, red
    attention), sampled at ``steps`` points."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    cmap = colormaps[TRACE_CMAPS.get(component, "Purples")]
    return [[i / (steps - 1), to_hex(cmap(i / (steps - 1)))] for i in range(steps)]


def trace_figure_spec(result: PatchingResult) -> dict[str, Any]:
    """A causal-tracing heatmap drawn as its PNG (:func:`~.plots.plot_trace`) draws it: rows
    are the positions (first token on top; subject tokens marked ``*``) or ROME's position
    groups, columns the layers, on the component's sequential colour scale from 0 (the run with
    the subject noised) to the largest indirect effect. The hover text gives the indirect effect
    and the restored probability ``p(subject noised) + IE``."""
    import numpy as np

    matrix = result.effect_matrix.double().numpy().T  # [groups/positions, layers]
    row_axis = result.axes[1]
    rows = [str(r) for r in result.labels[row_axis]]
    counts = result.extra.get("group_counts") if isinstance(result.extra, dict) else None
    if isinstance(counts, list) and len(counts) == len(rows):
        matrix = matrix.copy()
        matrix[np.asarray(counts) == 0, :] = np.nan
        rows = [f"{r} ({c})" for r, c in zip(rows, counts)]
    layers = [str(v) for v in result.labels["layer"]]
    finite = matrix[np.isfinite(matrix)]
    vmax = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    base = result.corrupted_metric
    window = result.extra.get("window") if isinstance(result.extra, dict) else None
    x_title = "layer" + (f" (window {window})" if result.component in ("mlp", "attn")
                         and window is not None else "")
    y_title = ("position (* = subject token)" if row_axis == "position"
               else "position group (prompts with it)")
    bar_title = "indirect effect" + (f"<br>0 = subject noised<br>(p = {base:.3g})"
                                     if base is not None else "")
    template = "position %{y}<br>layer %{x}<br>indirect effect %{z:+.4f}"
    trace: dict[str, Any] = {
        "type": "heatmap", "x": _unique([plotly_text(t) for t in layers]),
        "y": _unique([plotly_text(t) for t in rows]), "z": _nums(matrix.tolist()),
        "colorscale": trace_colorscale(result.component), "zmin": 0.0, "zmax": _limit(vmax),
        "zauto": False, "xgap": 1, "ygap": 1,
        "colorbar": {"title": {"text": bar_title}, "thickness": 14}}
    interval = cell_intervals(result)  # per-position results of several prompts
    if base is not None and interval is None:
        trace["customdata"] = _nums((matrix + base).tolist())
        template += "<br>p(restored) %{customdata:.4f}"
    elif interval is not None:
        columns = [b.T for b in interval] if base is None else [matrix + base,
                                                                 *(b.T for b in interval)]
        trace["customdata"] = _nums(np.stack(columns, axis=-1).tolist())
        k = len(columns) - 2
        if base is not None:
            template += "<br>p(restored) %{customdata[0]:.4f}"
        template += f"<br>95% CI [%{{customdata[{k}]:+.4f}}, %{{customdata[{k + 1}]:+.4f}}]"
    trace["hovertemplate"] = template + "<extra></extra>"
    height = int(min(1000, max(300, 26 * len(rows) + 170)))
    layout: dict[str, Any] = {
        "title": {"text": plotly_text(result_title(result)), "font": {"size": 15}},
        "font": _font(), "paper_bgcolor": "white", "plot_bgcolor": "#eeeeee",
        "margin": {"l": 70, "r": 30, "t": 60, "b": 60}, "height": height,
        "xaxis": {"title": {"text": plotly_text(x_title)}, "type": "category", "automargin": True},
        "yaxis": {"title": {"text": plotly_text(y_title)}, "type": "category", "automargin": True,
                  "autorange": "reversed"}}
    return {"data": [trace], "layout": layout}


def _value_name(result: PatchingResult) -> str:
    """What the colour bar and hover call a value (plotly-escaped): ``effect``, ``estimate``
    (attribution patching), the ablation's ``change in <metric>``, or the raw metric."""
    if result.method == "attribution_patching" and result.normalized:
        return "estimate"
    if result.method == "ablation":
        return plotly_text(f"change in {result.metric}")
    return "effect" if result.normalized else plotly_text(result.metric)


def _panel_names(result: PatchingResult, names: list[list[str]]) -> tuple[str, list[str]]:
    """Name of the flattened trailing axes and of each of their entries (plotly-escaped)."""
    axes, shape = result.axes, result.shape
    if len(axes) == 3:
        return axes[2], names[2]
    return " / ".join(axes[2:]), [
        ", ".join(f"{plotly_text(a)} {names[2 + d][i]}"
                  for d, (a, i) in enumerate(zip(axes[2:], coords)))
        for coords in itertools.product(*map(range, shape[2:]))]


# -- per-pair view --------------------------------------------------------------------------------
def _pair_roles(result: PatchingResult, i: int) -> list[str] | None:
    roles = result.extra.get("position_roles") if isinstance(result.extra, dict) else None
    if isinstance(roles, list) and i < len(roles) and isinstance(roles[i], list):
        return [r if isinstance(r, str) else "" for r in roles[i]]
    return None


def _token_positions(result: PatchingResult) -> list[Any]:
    n = result.shape[result.axes.index("position")]
    positions = result.extra.get("positions") if isinstance(result.extra, dict) else None
    if isinstance(positions, list) and len(positions) == n:
        return positions
    return list(range(n))


def pair_axis_texts(result: PatchingResult, axis: str, i: int) -> list[str]:
    """Tick texts of ``axis`` for pair ``i``: on the position axis that pair's own role and
    token (when known: ``"9: S2 ' John'"``), else the result's labels."""
    n = result.shape[result.axes.index(axis)]
    if axis != "position":
        return [str(result.cell_text(axis, j)) for j in range(n)]
    roles = _pair_roles(result, i)
    all_tokens = getattr(result, "clean_tokens", None) or []
    tokens = all_tokens[i] if i < len(all_tokens) else None
    if roles is None and (tokens is None or i == 0):
        return [str(result.labels["position"][j]) for j in range(n)]
    out = []
    for j, p in enumerate(_token_positions(result)):
        if isinstance(p, bool) or not isinstance(p, int):
            out.append(str(result.labels["position"][j]))
            continue
        role = roles[p] if roles is not None and -len(roles) <= p < len(roles) else ""
        token = repr(tokens[p]) if tokens is not None and -len(tokens) <= p < len(tokens) else ""
        out.append(f"{p}: " + " ".join(t for t in (role, token) if t) if role or token
                   else str(p))
    return out


def answer_text(result: PatchingResult, i: int) -> str:
    """``"' Mary' (correct) vs ' John' (incorrect)"`` for pair ``i``, from the result's answer
    text, else token ids (pair 0 only), else ``""``."""
    method = getattr(result, "answer_texts", None)
    texts = method() if callable(method) else None
    if texts and i < len(texts):
        correct, incorrect = texts[i]
        parts = [f"{correct!r} (correct)" if correct is not None else "",
                 f"{incorrect!r} (incorrect)" if incorrect is not None else ""]
        return " vs ".join(p for p in parts if p)
    ids = result.extra.get("answers") if isinstance(result.extra, dict) else None
    if i == 0 and isinstance(ids, list) and ids and isinstance(ids[0], list):
        shown = [str(v) for v in ids[0] if v is not None]
        return ("token ids " + " / ".join(shown)) if shown else ""
    return ""


def pair_view(result: PatchingResult, max_pairs: int = MAX_PAIR_VIEWS) -> dict[str, Any] | None:
    """The per-pair figure of a result with ``per_pair`` values (None without them).

    ``{"data", "layout", "views", "details", "n_pairs", "shown"}``: the figure shows pair 0;
    ``views[i]`` restyles it to pair ``i`` and ``details[i]`` holds that pair's prompts,
    answers and top cells. 3-D results show the largest-magnitude effect over the trailing axes.
    """
    import numpy as np

    per_pair = getattr(result, "per_pair", None)
    if per_pair is None or per_pair.shape[0] < 2:
        return None
    values = per_pair.double().numpy()
    n = values.shape[0]
    axes = result.axes
    cells = int(np.prod(values.shape[1:3])) if values.ndim > 2 else int(values.shape[1])
    shown = max(1, min(n, max_pairs, MAX_PAIR_VALUES // max(1, 2 * cells)))
    names = [_unique([plotly_text(result.cell_text(a, i)) for i in range(size)])
             for a, size in zip(axes, result.shape)]
    value_name = _value_name(result)
    panel_axis = panel_names = None
    if values.ndim > 3:
        panel_axis, panel_names = _panel_names(result, names)
    mats, whiches = [], []
    for i in range(shown):
        m = values[i]
        which = None
        if m.ndim > 2:
            m, which = max_magnitude(m.reshape(m.shape[0], m.shape[1], -1), axis=2)
        mats.append(m)
        whiches.append(which)
    limit = _limit(symmetric_limit(np.stack(mats)))
    views, details = [], []
    for i, m in enumerate(mats):
        texts = [_unique([plotly_text(t) for t in pair_axis_texts(result, a, i)]) for a in axes[:2]]
        view: dict[str, Any]
        if m.ndim == 1:
            view = {"x": [texts[0]], "y": [_nums(m.tolist())],
                    "marker.color": [[POSITIVE if v > 0 else NEGATIVE for v in m.tolist()]]}
        else:
            view = {"x": [texts[1]], "y": [texts[0]], "z": [_nums(m.tolist())]}
            if whiches[i] is not None:
                view["customdata"] = [np.array(panel_names, dtype=object)[whiches[i]].tolist()]
        views.append(view)
        top = []
        flat = np.where(np.isfinite(values[i]), np.abs(values[i]), -1.0).reshape(-1)
        for idx in np.argsort(-flat, kind="stable")[:3].tolist():
            coords = np.unravel_index(idx, values[i].shape)
            where = ", ".join(f"{a} {pair_axis_texts(result, a, i)[c]}"
                              for a, c in zip(axes, coords))
            top.append(f"{where}: {values[i][coords]:+.3f}")
        details.append({
            "clean": result.clean_prompts[i] if i < len(result.clean_prompts) else "",
            "corrupted": result.corrupted_prompts[i] if i < len(result.corrupted_prompts) else "",
            "answers": answer_text(result, i), "top": "; ".join(top)})
    first = views[0]
    layout: dict[str, Any] = {"font": _font(), "paper_bgcolor": "white", "plot_bgcolor": "white",
                              "margin": {"l": 70, "r": 30, "t": 30, "b": 60}}
    if mats[0].ndim == 1:
        trace: dict[str, Any] = {
            "type": "bar", "x": first["x"][0], "y": first["y"][0],
            "marker": {"color": first["marker.color"][0]},
            "hovertemplate": f"{_tmpl(axes[0])} %{{x}}<br>{_tmpl(value_name)} %{{y:+.4f}}"
                             "<extra></extra>"}
        layout.update(height=340, xaxis=_axis_layout(result, axes[0]), bargap=0.15,
                      yaxis={"title": {"text": value_name}, "zeroline": True,
                             "zerolinecolor": "#444", "gridcolor": "#eee",
                             "range": [-limit * 1.05, limit * 1.05]})
    else:
        template = (f"{_tmpl(axes[0])} %{{y}}<br>{_tmpl(axes[1])} %{{x}}<br>")
        if whiches[0] is not None:
            trailing = panel_axis if panel_axis is not None else axes[2]
            template += f"{_tmpl(trailing)} %{{customdata}} (largest)<br>"
        template += f"{_tmpl(value_name)} %{{z:+.4f}}<extra></extra>"
        trace = {"type": "heatmap", "x": first["x"][0], "y": first["y"][0], "z": first["z"][0],
                 "colorscale": COLORSCALE, "zmin": -limit, "zmax": limit, "zauto": False,
                 "xgap": 1, "ygap": 1, "hovertemplate": template,
                 "colorbar": {"title": {"text": value_name}, "thickness": 14}}
        if "customdata" in first:
            trace["customdata"] = first["customdata"][0]
        height = int(min(1200, max(300, 15 * mats[0].shape[0] + 160)))
        layout.update(height=height, xaxis=_axis_layout(result, axes[1]),
                      yaxis=_axis_layout(result, axes[0], True))
        # a pair's own tokens: the position axis title says "token" rather than "pair 0"
        for key, axis in (("xaxis", axes[1]), ("yaxis", axes[0])):
            if axis == "position":
                layout[key]["title"]["text"] = "position (this pair)"
    out = {"data": [trace], "layout": layout, "views": views, "details": details,
           "n_pairs": n, "shown": shown}
    if result.method == "causal_tracing" and mats[0].ndim == 2:
        _as_trace_view(result, out, mats)
    return out


def _as_trace_view(result: PatchingResult, view: dict[str, Any], mats: list[Any]) -> None:
    """Turn a causal-tracing per-prompt view into its PNG's form (as
    :func:`trace_figure_spec`): positions down, layers across, the sequential colour map
    from 0 to the largest indirect effect of the prompts shown."""
    import numpy as np

    spans = result.extra.get("subject_spans") if isinstance(result.extra, dict) else None
    for i, (v, m) in enumerate(zip(view["views"], mats)):
        v["x"], v["y"], v["z"] = v["y"], v["x"], [_nums(np.asarray(m).T.tolist())]
        if isinstance(spans, list) and i < len(spans) and len(spans[i]) == 2:
            s0, s1 = spans[i]  # this prompt's own subject tokens
            v["y"] = [[t if not s0 <= j < s1 or t.endswith("*") else t + "*"
                       for j, t in enumerate(v["y"][0])]]
    stacked = np.stack(mats)
    finite = stacked[np.isfinite(stacked)]
    vmax = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    first = view["views"][0]
    view["data"] = [{
        "type": "heatmap", "x": first["x"][0], "y": first["y"][0], "z": first["z"][0],
        "colorscale": trace_colorscale(result.component), "zmin": 0.0, "zmax": _limit(vmax),
        "zauto": False, "xgap": 1, "ygap": 1,
        "hovertemplate": "position %{y}<br>layer %{x}<br>indirect effect %{z:+.4f}"
                         "<extra></extra>",
        "colorbar": {"title": {"text": "indirect effect"}, "thickness": 14}}]
    layout = view["layout"]
    layout["xaxis"] = {"title": {"text": "layer"}, "type": "category", "automargin": True}
    layout["yaxis"] = {"title": {"text": "position (this prompt; * = subject token)"},
                       "type": "category", "automargin": True, "autorange": "reversed"}
    layout["plot_bgcolor"] = "#eeeeee"


def _pair_section(i: int, view: dict[str, Any], result: PatchingResult) -> str:
    options = [f"<option value='{k}'>pair {k}: {esc(_short(d['clean'], 70))}</option>"
               for k, d in enumerate(view["details"])]
    more = (f"<span class='note'> (first {view['shown']} of {view['n_pairs']} pairs)</span>"
            if view["shown"] < view["n_pairs"] else "")
    d0 = view["details"][0]
    kind = "normalised by the mean gap over all pairs" if result.normalized else "raw values"
    if result.method == "causal_tracing":
        kind = "each prompt's indirect effects; pair = prompt"
    return (
        f"<details class='pairs' open><summary>Per pair ({esc(pairs_text(view['n_pairs']))}; "
        f"{esc(kind)})</summary>"
        f"<label>pair <select id='pair-select-{i}' data-section='{i}'>{''.join(options)}"
        f"</select></label>{more}"
        f"<table class='meta pair-info' id='pair-info-{i}'>"
        f"<tr><th>clean</th><td><code data-field='clean'>{esc(d0['clean'])}</code></td></tr>"
        f"<tr><th>corrupted</th><td><code data-field='corrupted'>{esc(d0['corrupted'])}"
        f"</code></td></tr>"
        f"<tr><th>answers</th><td data-field='answers'>{esc(d0['answers'])}</td></tr>"
        f"<tr><th>largest cells</th><td data-field='top'>{esc(d0['top'])}</td></tr></table>"
        f"<div id='pairplot-{i}' class='plot pairplot' data-pair='0'></div></details>")


def _short(text: str, n: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


# -- tables ---------------------------------------------------------------------------------------
def _cell_value(result: PatchingResult, coords: tuple[int, ...]) -> tuple[float, float | None]:
    value = float(result.effect_matrix[coords])
    std = None if result.std is None else float(result.std[coords])
    return value, std


def top_table(result: PatchingResult, k: int = 10) -> str:
    """HTML table of the ``k`` largest-magnitude cells (axis labels, value, std); attribution
    patching's values are headed ``estimate``, with an ``exact`` column where cells were
    verified (``extra["verified"]``)."""
    checked = verified_cells(result) if result.method == "attribution_patching" else {}
    head = "".join(f"<th>{esc(a)}</th>" for a in result.axes)
    head += f"<th>{esc(value_heading(result))}</th>"
    if checked:
        head += "<th>exact</th>"
    if result.std is not None:
        head += "<th>std</th>"
    rows = []
    for coords, effect in result.top_cells(k):
        cells = "".join(f"<td>{esc(result.cell_text(a, c))}</td>"
                        for a, c in zip(result.axes, coords))
        exact = checked.get(tuple(int(c) for c in coords))
        shown = effect if exact is None else exact["estimate"]
        cells += f"<td class='num'>{shown:+.4f}</td>"
        if checked:
            cells += ("<td class='num'>–</td>" if exact is None
                      else f"<td class='num'>{exact['exact']:+.4f}</td>")
        if result.std is not None:
            cells += f"<td class='num'>{_cell_value(result, coords)[1]:.4f}</td>"
        rows.append(f"<tr>{cells}</tr>")
    return f"<table class='top'><tr>{head}</tr>{''.join(rows)}</table>"


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def position_note(result: PatchingResult) -> str | None:
    """What the position labels are, or None without a position axis."""
    if "position" not in result.axes:
        return None
    n = n_pairs_of(result)
    if position_roles(result) is not None:
        return f"roles shared by all {pairs_text(n)} (positions without a role: tokens of pair 0)"
    if n > 1:
        roles = result.extra.get("position_roles") if isinstance(result.extra, dict) else None
        why = ("the pairs give some positions different roles" if roles
               else "the pairs have no roles")
        return f"tokens of pair 0 ({why}); the values average {pairs_text(n)}"
    return "tokens of the prompt"


def metadata_table(result: PatchingResult) -> str:
    """HTML tables of the run: settings, baselines, answers, timings, extra."""
    kind = ("normalised: (patched - base) / (source - base)" if result.normalized
            else "raw values")
    items = [
        ("model", result.model_name or "(unnamed)"),
        ("method", result.method), ("component", f"{result.component} "
                                                  f"({component_words(result.component)})"),
        ("metric", f"{result.metric} ({metric_words(result.metric)}; {kind})"),
        ("direction", result.direction),
        ("shape", " x ".join(f"{a} {n}" for a, n in zip(result.axes, result.shape))),
    ]
    names = (f"clean {result.metric}", f"corrupted {result.metric}")
    if result.method == "causal_tracing":
        items[3] = ("metric", "indirect effect on p(answer): p(restored) - p(subject noised)")
        names = ("p(answer), clean run", "p(answer), subject noised")
    elif result.method == "ablation":
        items[3] = ("metric", f"{result.metric} ({metric_words(result.metric)}): ablated - "
                              "baseline")
        names = (f"baseline {result.metric} (nothing ablated)", names[1])
    if result.clean_metric is not None:
        items.append((names[0], _fmt(result.clean_metric)))
    if result.corrupted_metric is not None:
        items.append((names[1], _fmt(result.corrupted_metric)))
    unit = "prompts" if result.method in ("ablation", "causal_tracing") else "pairs"
    items.append((unit, str(n_pairs_of(result))))
    if cell_intervals(result) is not None:
        items.append(("intervals", f"hover a cell: its 95% bootstrap interval over the {unit} "
                                   f"({CI_N_BOOT} resamples, seed {CI_SEED})"))
    answers = answer_text(result, 0)
    if answers:
        items.append(("answers (pair 0)", answers))
    note = position_note(result)
    if note:
        items.append(("position labels", note))
    if result.timings:
        items.append(("timings", ", ".join(
            f"{timing_name(k)} {v:.2f} s" for k, v in result.timings.items())))
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in items)
    parts = [f"<table class='meta'>{rows}</table>"]
    if result.extra:
        try:
            text = json.dumps(result.extra, indent=1, sort_keys=True, default=str)
        except (TypeError, ValueError):
            text = repr(result.extra)
        if len(text) > MAX_EXTRA_CHARS:
            text = text[:MAX_EXTRA_CHARS] + f"\n... ({len(text) - MAX_EXTRA_CHARS} more chars)"
        parts.append("<details><summary>method metadata (extra)</summary>"
                     f"<pre>{esc(text)}</pre></details>")
    return "".join(parts)


def _prompt_key(result: PatchingResult) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return tuple(result.clean_prompts), tuple(result.corrupted_prompts)


def _set_name(k: int) -> str:
    letters = ""
    k += 1
    while k:
        k, r = divmod(k - 1, 26)
        letters = chr(65 + r) + letters
    return letters


def prompts_table(result: PatchingResult) -> str:
    """The prompt pairs of a result (clean, corrupted, answers) and its first clean tokens."""
    n = max(len(result.clean_prompts), len(result.corrupted_prompts))
    parts = []
    if n:
        has_answers = any(answer_text(result, i) for i in range(min(n, MAX_PROMPTS)))
        rows = []
        for i in range(min(n, MAX_PROMPTS)):
            clean = result.clean_prompts[i] if i < len(result.clean_prompts) else ""
            corrupted = result.corrupted_prompts[i] if i < len(result.corrupted_prompts) else ""
            answers = f"<td>{esc(answer_text(result, i))}</td>" if has_answers else ""
            rows.append(f"<tr><td class='num'>{i}</td><td><code>{esc(clean)}</code></td>"
                        f"<td><code>{esc(corrupted)}</code></td>{answers}</tr>")
        more = (f"<p class='note'>... and {n - MAX_PROMPTS} more pairs</p>"
                if n > MAX_PROMPTS else "")
        parts.append("<table class='prompts'><tr><th>#</th><th>clean</th><th>corrupted</th>"
                     + ("<th>answers</th>" if has_answers else "")
                     + f"</tr>{''.join(rows)}</table>{more}")
    if result.clean_tokens:
        roles = _pair_roles(result, 0) or []
        chips = []
        for i, t in enumerate(result.clean_tokens[0]):
            role = roles[i] if i < len(roles) else ""
            tag = f"<b class='role'>{esc(role)}</b>" if role else ""
            chips.append(f"<span class='tok'><sub>{i}</sub><code>{esc(t)}</code>{tag}</span>")
        parts.append("<h4>Tokens of the first clean prompt" + (" (with roles)" if roles else "")
                     + f"</h4><div class='toks'>{''.join(chips)}</div>")
    return "".join(parts) or "<p class='note'>No prompts recorded.</p>"


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
.tok .role{color:#b2182b;font-size:11px;margin-left:3px}
.tok code{white-space:pre} pre{font-size:11px;max-height:320px;overflow:auto;background:#f8f8f8;
 padding:8px} nav li{font-size:14px}
.takeaway{background:#f4f8fb;border-left:4px solid #2166ac;padding:8px 12px;font-size:14px;
 margin:10px 0} .prompt-note{font-size:13px;color:#444} .prompt-note.other{color:#8a4b00}
details.pairs{margin:10px 0;border:1px solid #e4e4e4;padding:6px 10px}
details.pairs summary{font-weight:600;font-size:14px;cursor:pointer}
.controls{font-size:13px;margin:8px 0}
ol.summary li{font-size:14px;margin:3px 0} ul.run{font-size:13px;margin:4px 0 8px;color:#333}
#cp-plotly-missing{color:#8a0000;font-weight:600}
table.sortable th{cursor:pointer} table.sortable th[data-sort=up]::after{content:" \\25B2"}
table.sortable th[data-sort=down]::after{content:" \\25BC"}
"""

_INIT = """(function () {
  var doc = JSON.parse(document.getElementById("cp-figures").textContent);
  if (typeof Plotly === "undefined") {
    var missing = document.getElementById("cp-plotly-missing");
    missing.textContent = "plotly.js did not load (this report links it from cdn.plot.ly and " +
      "needs network); rebuild it with plotly=\\"inline\\" to view it offline.";
    return;
  }
  var config = {responsive: true, displaylogo: false, showSendToCloud: false,
                plotlyServerURL: "", modeBarButtonsToRemove: ["sendChartToCloud"],
                toImageButtonOptions: {format: "png", filename: "causalpatch", scale: 2}};
  function mark(id) {
    var gd = document.getElementById(id), t = gd.data && gd.data[0];
    if (t && t.type === "heatmap") { gd.setAttribute("data-zmax", String(t.zmax)); }
  }
  function plot(id, fig) {
    return Plotly.newPlot(id, fig.data, fig.layout, config).then(function () { mark(id); });
  }
""" + CIRCUIT_JS + """  function showPair(i, k) {
    var f = doc[i], view = f.pairs.views[k], detail = f.pairs.details[k];
    var id = "pairplot-" + i, info = document.getElementById("pair-info-" + i);
    if (!view) { return; }
    document.getElementById("pair-select-" + i).value = String(k);
    ["clean", "corrupted", "answers", "top"].forEach(function (key) {
      info.querySelector("[data-field='" + key + "']").textContent = detail[key];
    });
    var fresh = JSON.parse(f.pairs.pristine), trace = fresh.data[0];
    Object.keys(view).forEach(function (key) {
      if (key === "marker.color") { trace.marker = {color: view[key][0]}; }
      else { trace[key] = view[key][0]; }
    });
    Plotly.react(id, fresh.data, fresh.layout, config).then(function () {
      document.getElementById(id).setAttribute("data-pair", String(k));
    });
  }
  function setScale(shared) {
    doc.forEach(function (f) {
      if (!f || f.scale === undefined || f.scale === null) { return; }
      var v = shared ? f.scale.shared : f.scale.own;
      Plotly.restyle(f.id, {zmin: [-v], zmax: [v]}, [0]).then(function () { mark(f.id); });
    });
  }
  var wanted = {}, wantedEdges = {}, sorts = [];
  window.location.hash.replace(/^#/, "").split("&").forEach(function (part) {
    var m = /^pair-(\\d+)=(\\d+)$/.exec(part), e = /^edges-(\\d+)=(\\d+)$/.exec(part);
    var s = /^sort-(\\d+)=(\\d+)$/.exec(part);
    if (m) { wanted[m[1]] = parseInt(m[2], 10); }
    if (e) { wantedEdges[e[1]] = parseInt(e[2], 10); }
    if (s) { sorts.push(s); }
  });
  document.querySelectorAll("table.sortable").forEach(sortable);
  sorts.forEach(function (s) {
    var th = document.querySelectorAll("#edges-table-" + s[1] + " thead th")[parseInt(s[2], 10)];
    if (th) { th.click(); }
  });
  doc.forEach(function (f, i) {
    if (!f) { return; }
    if (f.circuit) { drawCircuit(f, i)(wantedEdges[i]); return; }
    plot(f.id, f);
    if (f.logx) {
      var logx = document.getElementById(f.logx);
      logx.addEventListener("change", function () {
        Plotly.relayout(f.id, {"xaxis.type": logx.checked ? "log" : "linear"});
      });
    }
    if (f.pairs) {
      f.pairs.pristine = JSON.stringify({data: f.pairs.data, layout: f.pairs.layout});
      plot("pairplot-" + i, f.pairs).then(function () {
        if (wanted[i] !== undefined) { showPair(i, wanted[i]); }
      });
      document.getElementById("pair-select-" + i).addEventListener("change", function (e) {
        showPair(i, parseInt(e.target.value, 10));
      });
    }
  });
  var box = document.getElementById("cp-shared-scale");
  if (box) { box.addEventListener("change", function () { setScale(box.checked); }); }
})();"""


def _csp_hash(script: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode() + "'"


def _plotly_cdn_url() -> str:
    from plotly.offline import get_plotlyjs_version

    return f"https://cdn.plot.ly/plotly-{get_plotlyjs_version()}.min.js"


def section_title(result: Any) -> str:
    """The title of a report section: :func:`result_title`, or the lens/DLA title."""
    if is_result(result):
        return result_title(result)
    if is_circuit_section(result):
        return circuit_title(result)
    return lens_title(result) if is_lens(result) else dla_title(result)


def section_headline(result: Any) -> str:
    """A section's main finding in one line (the report's summary lists one per section)."""
    if is_result(result):
        return headline(result)
    if is_circuit_section(result):
        return circuit_headline(result)
    return lens_headline(result) if is_lens(result) else dla_headline(result)


def report(results: Any,
           path: str | os.PathLike[str] | None = None,
           title: str = "causalpatch report", *, plotly: str = "inline",
           shared_scale: bool = False, max_pairs: int = MAX_PAIR_VIEWS,
           top_edges: int = DEFAULT_EDGES) -> str:
    """Build one HTML report of one or several results (see the module docstring).

    Args:
        results: a result or a sequence of them (e.g. resid, attn, mlp and heads of one
            experiment): :class:`~causalpatch.result.PatchingResult` objects of any method,
            causal-tracing results (a section per component), and logit-lens and
            direct-logit-attribution results
            (:class:`~causalpatch.methods.lens.LensResult`, ``DLAResult``), edge-attribution
            results (:class:`~causalpatch.graph.EdgeResult`), circuits
            (:class:`~causalpatch.graph.Circuit`), faithfulness curves and circuit evaluations
            (:class:`~causalpatch.methods.circuits.FaithfulnessCurve`,
            ``CircuitEvaluation``), each a section.
        path: where to write it (atomically); None only returns the HTML text.
        title: page title and heading (escaped; None means the default).
        plotly: ``"inline"`` (default): plotly.js inlined once, the file opens offline;
            ``"cdn"``: loaded from cdn.plot.ly (small file; needs network to draw).
        shared_scale: start with one colour range for all heatmaps of the same kind
            (normalised, or one raw metric); a checkbox in the page switches.
        max_pairs: pairs selectable in each per-pair view.
        top_edges: edges drawn at first in each edge result's circuit view (the page's
            control changes it; the view holds at least
            :data:`~.circuit.MAX_VIEW_EDGES`).

    Returns:
        The HTML text.

    Raises:
        InvalidArgumentError: no results, an unknown ``plotly`` mode, or ``top_edges`` not a
            positive int.
        InvalidTypeError: an item is none of the kinds above (nor shaped like one, see
            :func:`is_result` and :mod:`~.circuit`).
    """
    single = (is_result(results) or is_lens(results) or is_dla(results)
              or is_circuit_section(results))
    everything = []
    for item in [results] if single or isinstance(results, Mapping) else list(results):
        if isinstance(item, Mapping):  # a CausalTracingResult: one section per component
            everything += list(item.values())
        else:
            everything.append(item)
    if not everything:
        raise InvalidArgumentError("report needs at least one result, got none")
    for item in everything:
        if not (is_result(item) or is_lens(item) or is_dla(item)
                or is_circuit_section(item)):
            raise InvalidTypeError(
                f"report takes PatchingResult, LensResult, DLAResult, EdgeResult, Circuit, "
                f"FaithfulnessCurve or CircuitEvaluation objects, got {type(item).__name__}")
    if isinstance(top_edges, bool) or not isinstance(top_edges, int) or top_edges < 1:
        raise InvalidArgumentError(
            f"top_edges must be a positive int (edges drawn in a circuit view), got "
            f"{top_edges!r}")
    # the patching results (with heatmaps, prompt sets and colour scales) by section number
    patching = {i: r for i, r in enumerate(everything) if is_result(r)}
    items = list(patching.values())
    if plotly not in PLOTLY_MODES:
        raise InvalidArgumentError(
            f"plotly must be one of {', '.join(map(repr, PLOTLY_MODES))}, got {plotly!r}")
    title = "causalpatch report" if title is None else str(title)

    # colour scales: each heatmap's own range, and the range shared by its group
    own = [heatmap_limit(r) for r in items]
    shared_of: dict[str, float] = {}
    members: dict[str, int] = {}
    for r, v in zip(items, own):
        if v is not None:
            group = scale_group(r)
            shared_of[group] = max(shared_of.get(group, 0.0), v)
            members[group] = members.get(group, 0) + 1
    can_share = any(n > 1 for n in members.values())

    # prompt sets, in order of first use
    keys: list[Any] = []
    set_of: list[int] = []
    for r in items:
        key = _prompt_key(r)
        if key not in keys:
            keys.append(key)
        set_of.append(keys.index(key))
    users: dict[int, list[int]] = {}
    for section, k in zip(patching, set_of):
        users.setdefault(k, []).append(section + 1)

    titles = _unique([section_title(r) for r in everything])
    sections: list[str] = []
    figures: list[dict[str, Any] | None] = []
    summary: list[str] = []
    for i, result in enumerate(everything):
        summary.append(f"<li><a href='#result-{i}'>{esc(titles[i])}</a>: "
                       f"{esc(section_headline(result))}</li>")
        if i not in patching and is_circuit_section(result):
            html_part, figure_part = circuit_section(result, i, f"{i + 1}. {titles[i]}",
                                                     top_edges)
            figures.append(figure_part)
            sections.append(html_part)
            continue
        if i not in patching:
            figures.append(None)  # lens and DLA sections are static HTML
            view_html = (lens_html(result, page=False) if is_lens(result)
                         else dla_html(result, page=False))
            sections.append(f"<section id='result-{i}' class='static'>"
                             f"<h2>{esc(f'{i + 1}. {titles[i]}')}</h2>"
                             f"<p class='takeaway'>{esc(section_headline(result))}.</p>"
                             f"{view_html}</section>")
            continue
        j = items.index(result)
        heading = f"{i + 1}. {titles[i]}"
        plot_id = f"plot-{i}"
        scale = None
        if own[j] is not None:
            scale = {"own": own[j], "shared": shared_of[scale_group(result)]}
        vmax = scale["shared"] if scale and shared_scale else None
        figure: dict[str, Any] = {"id": plot_id, **figure_spec(result, vmax=vmax),
                                  "scale": scale}
        view = pair_view(result, max_pairs)
        if view is not None:
            figure["pairs"] = {k: view[k] for k in ("data", "layout", "views", "details")}
        figures.append(figure)
        k = set_of[j]
        n = n_pairs_of(result)
        if not keys[k][0] and not keys[k][1]:
            note = "<p class='prompt-note'>Prompts: not recorded.</p>"
        elif len(keys) == 1:
            note = (f"<p class='prompt-note'>Prompts: the <a href='#prompts'>prompt table</a> "
                    f"({esc(pairs_text(n))}).</p>")
        elif k == set_of[0]:
            note = (f"<p class='prompt-note'>Prompts: <a href='#prompts-{_set_name(k)}'>set "
                    f"{_set_name(k)}</a> ({esc(pairs_text(n))}).</p>")
        else:
            note = (f"<p class='prompt-note other'><b>Built from other prompts</b> than the "
                    f"first section: <a href='#prompts-{_set_name(k)}'>set {_set_name(k)}</a> "
                    f"({esc(pairs_text(n))}).</p>")
        run = run_words(result)
        run_html = ("<ul class='run'>" + "".join(f"<li>{esc(w)}</li>" for w in run) + "</ul>"
                    if run else "")
        sections.append(
            f"<section id='result-{i}'><h2>{esc(heading)}</h2>"
            f"<p class='takeaway'>{esc(takeaway(result))}</p>{run_html}{note}"
            f"<div id='{plot_id}' class='plot'></div>"
            + (_pair_section(i, view, result) if view is not None else "")
            + f"<div class='cols'><div><h3>Top components</h3>{top_table(result)}</div>"
            f"<div><h3>Run</h3>{metadata_table(result)}</div></div></section>")

    prompt_parts = []
    for k, key in enumerate(keys):
        first = items[set_of.index(k)]
        if len(keys) == 1:
            prompt_parts.append(prompts_table(first))
        else:
            used = ", ".join(map(str, users[k]))
            prompt_parts.append(
                f"<h3 id='prompts-{_set_name(k)}'>Set {_set_name(k)} "
                f"({esc(pairs_text(max(len(key[0]), len(key[1]))))}; sections {used})</h3>"
                + prompts_table(first))
    prompts_html = (f"<section id='prompts'><h2>Prompts</h2>{''.join(prompt_parts)}</section>"
                    if items else "")

    if plotly == "inline":
        from plotly.offline import get_plotlyjs

        plotly_js = get_plotlyjs()
        plotly_tag = f"<script>{plotly_js}</script>"
        script_src = _csp_hash(plotly_js)
    else:
        url = _plotly_cdn_url()
        plotly_tag = f"<script src='{esc(url)}' charset='utf-8'></script>"
        script_src = "https://cdn.plot.ly"
    csp = ("default-src 'none'; script-src " + script_src + " " + _csp_hash(_INIT)
           + "; style-src 'unsafe-inline'; img-src data: blob:; font-src data:; "
           "form-action 'none'; base-uri 'none'")
    versions = ", ".join(f"{k} {v}" for k, v in library_versions().items())
    nav = (f"<section id='summary'><h2>Summary</h2><ol class='summary'>{''.join(summary)}"
           "</ol></section>" if len(everything) > 1 else "")
    checked = " checked" if shared_scale else ""
    controls = ("<p class='controls'><label><input type='checkbox' id='cp-shared-scale'"
                f"{checked}> one colour scale for all heatmaps of the same kind</label></p>"
                if can_share else "")
    page = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<meta http-equiv='Content-Security-Policy' content=\"{csp}\">"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        "<meta name='generator' content='causalpatch'>"
        f"<title>{esc(title)}</title><style>{_STYLE}</style>\n"
        f"{plotly_tag}\n</head><body>"
        f"<h1>{esc(title)}</h1><p class='versions'>{esc(versions)}</p>"
        f"<p id='cp-plotly-missing'></p>{nav}{controls}{prompts_html}"
        f"{''.join(sections)}\n"
        f"<script type='application/json' id='cp-figures'>{script_json(figures)}</script>\n"
        f"<script>{_INIT}</script>\n</body></html>\n"
    )
    if path is not None:
        atomic_write_text(path, page)
    return page


def compact_html(result: PatchingResult) -> str:
    """Small notebook view: a summary line, the takeaway, a small inline PNG heatmap and the
    top-5 table.

    3-D results are drawn as one heatmap of the largest-magnitude effect over the last axis.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 3.6), layout="constrained")
    if result.method == "causal_tracing" and len(result.axes) == 2:
        plot_trace(result, ax=fig.add_subplot())  # ROME's orientation and colours
    else:
        plot_result(result, ax=fig.add_subplot())
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=72)
    image = base64.b64encode(buffer.getvalue()).decode()
    line = (f"{result_title(result)} on {result.model_name or 'a model'}: "
            f"{' x '.join(f'{a} {n}' for a, n in zip(result.axes, result.shape))}")
    run = run_words(result)
    if result.method != "causal_tracing":  # its run words hold its baselines
        run.append(baselines_text(result))
    return (f"<div class='causalpatch-result' style='font-size:12px'>"
            f"<div><b>{esc(line)}</b></div>"
            + "".join(f"<div>{esc(w)}</div>" for w in run)
            + f"<div style='margin:4px 0'>{esc(takeaway(result))}</div>"
            + f"<img alt='effect plot' style='max-width:100%' "
              f"src='data:image/png;base64,{image}'/>{top_table(result, 5)}</div>")


__all__ = ["COLORSCALE", "MAX_PAIR_VIEWS", "PLOTLY_MODES", "RESULT_ATTRIBUTES", "answer_text",
           "cell_intervals",
           "compact_html", "figure_spec", "is_result", "library_versions", "metadata_table",
           "pair_view", "position_note", "prompts_table", "report", "result_title",
           "script_json", "top_table"]

"""Report sections of edge attribution and circuits: the graph drawn, the edges tabled, the
faithfulness curve plotted.

Duck-typed (this module imports neither :mod:`causalpatch.graph` nor the methods, which sit
above ``render/``):

* an **edge result** (:class:`~causalpatch.graph.EdgeResult`, :data:`EDGE_ATTRIBUTES`): the
  circuit view of its ``n`` best edges by ``|score|`` (a control in the page changes ``n``),
  and a sortable table of them;
* a **circuit** (:class:`~causalpatch.graph.Circuit`, :data:`CIRCUIT_ATTRIBUTES`): the same
  view of its edges, unweighted;
* a **faithfulness curve** (:class:`~causalpatch.methods.circuits.FaithfulnessCurve`,
  :data:`CURVE_ATTRIBUTES`): faithfulness against the fraction of edges, with the random
  baseline, CPR and CMD;
* a **circuit evaluation** (:class:`~causalpatch.methods.circuits.CircuitEvaluation`,
  :data:`EVALUATION_ATTRIBUTES`): its numbers as a table.

The circuit view is drawn in the page by :data:`CIRCUIT_JS` (part of the report's one init
script) from the JSON :func:`circuit_data` makes: nodes by column (``input`` on the left, then
per layer a column of its heads ``a{L}.h{H}`` and a column for its MLP ``m{L}``, ``logits`` on
the right; columns that no drawn node uses are left out), one plotly line per edge with width
proportional to ``|score|`` and colour by sign, the receiver's input told by the line's
style (query or MLP/logits input: solid, key: dashed, value: dotted). Nodes that no drawn edge
touches are not drawn. Every text plotly draws is HTML-escaped here.
"""

from __future__ import annotations

import math
from typing import Any

from ..metrics import CI_N_BOOT, CI_SEED, bootstrap_interval
from ..errors import NormalizationError
from .text import esc, pairs_text, plotly_text

#: Edges drawn by default in a circuit view (the page's control changes it).
DEFAULT_EDGES = 50
#: Edges an edge result's view holds at most (the control's upper end); at least the
#: ``top_edges`` asked for.
MAX_VIEW_EDGES = 300
#: Edges a circuit's view holds at most.
MAX_CIRCUIT_EDGES = 1000

EDGE_ATTRIBUTES = ("graph", "scores", "change", "base_value", "source_value", "method",
                   "direction", "metric", "n_pairs", "top")
"""What a report needs of an edge-attribution result (:class:`~causalpatch.graph.EdgeResult`)."""
CIRCUIT_ATTRIBUTES = ("graph", "mask", "edges", "nodes", "pruned", "connected")
"""What a report needs of a circuit (:class:`~causalpatch.graph.Circuit`)."""
CURVE_ATTRIBUTES = ("sizes", "fractions", "n_edges", "faithfulness", "cpr", "cmd",
                    "n_graph_edges")
"""What a report needs of a faithfulness curve."""
EVALUATION_ATTRIBUTES = ("faithfulness", "circuit_value", "clean_value", "corrupted_value",
                         "n_edges", "n_graph_edges", "connected")
"""What a report needs of a circuit evaluation."""
#: Line style of an edge by the input it feeds.
DASH = {"q": "solid", "k": "dash", "v": "dot", "mlp": "solid", "logits": "solid"}


def is_edges(value: Any) -> bool:
    """True for an edge-attribution result (duck-typed on :data:`EDGE_ATTRIBUTES`)."""
    return all(hasattr(value, name) for name in EDGE_ATTRIBUTES)


def is_circuit(value: Any) -> bool:
    """True for a circuit (duck-typed on :data:`CIRCUIT_ATTRIBUTES`)."""
    return all(hasattr(value, name) for name in CIRCUIT_ATTRIBUTES)


def is_curve(value: Any) -> bool:
    """True for a faithfulness curve (duck-typed on :data:`CURVE_ATTRIBUTES`)."""
    return all(hasattr(value, name) for name in CURVE_ATTRIBUTES)


def is_evaluation(value: Any) -> bool:
    """True for a circuit evaluation (duck-typed on :data:`EVALUATION_ATTRIBUTES`)."""
    return (all(hasattr(value, name) for name in EVALUATION_ATTRIBUTES)
            and not is_curve(value))


def is_circuit_section(value: Any) -> bool:
    """Any of the four kinds of this module."""
    return is_edges(value) or is_circuit(value) or is_curve(value) or is_evaluation(value)




def _num(value: float) -> float | None:
    """A JSON number, as stored (the float32 value exactly); None for NaN/inf."""
    value = float(value)
    return value if math.isfinite(value) else None


# -- the graph's names ------------------------------------------------------------------------
def node_place(name: str, n_layers: int, n_heads: int) -> tuple[int, float]:
    """``(column, y)`` of a node: ``input`` column 0, layer ``L``'s heads column ``1 + 2L``
    (head 0 on top), its MLP ``2 + 2L``, ``logits`` ``1 + 2 n_layers``; y centred on 0."""
    if name == "input":
        return 0, 0.0
    if name == "logits":
        return 1 + 2 * n_layers, 0.0
    if name.startswith("m"):
        return 2 + 2 * int(name[1:]), 0.0
    layer, head = name[1:].split(".h")
    return 1 + 2 * int(layer), (n_heads - 1) / 2 - int(head)


def column_label(column: int, n_layers: int) -> str:
    """``input``, ``L3 attn``, ``L3 mlp`` or ``logits``."""
    if column == 0:
        return "input"
    if column == 1 + 2 * n_layers:
        return "logits"
    layer, odd = divmod(column - 1, 2)
    return f"L{layer} {'mlp' if odd else 'attn'}"


def receiver_kind(dst: str) -> tuple[str, str]:
    """``(node, kind)`` of a receiver: ``a3.h2.k`` -> ``("a3.h2", "k")``, ``m3`` -> ``("m3",
    "mlp")``, ``logits`` -> ``("logits", "logits")``."""
    if dst == "logits":
        return dst, "logits"
    if dst.startswith("m"):
        return dst, "mlp"
    node, kind = dst.rsplit(".", 1)
    return node, kind


def edge_intervals(result: Any, order: list[int]) -> tuple[list[float], list[float]] | None:
    """95% bootstrap intervals of the scores of edges ``order`` (the rule of
    ``EdgeResult.ci()``, :data:`~causalpatch.metrics.CI_N_BOOT` resamples, seed
    :data:`~causalpatch.metrics.CI_SEED`, computed for these edges only: every edge's interval
    uses the same resamples, so a subset's equals the whole's), or None when the result has no
    per-pair values or the gap is not stable over resamples."""
    import torch

    per_pair = getattr(result, "per_pair", None)
    metrics = (getattr(result, "extra", None) or {}).get("pair_metrics") or {}
    if per_pair is None or "base" not in metrics or "source" not in metrics or not order:
        return None
    if int(per_pair.shape[0]) < 2:
        return None
    base = torch.tensor(metrics["base"], dtype=torch.float64)
    source = torch.tensor(metrics["source"], dtype=torch.float64)
    values = per_pair[:, order].double() / (source.mean() - base.mean())
    try:
        lo, up = bootstrap_interval(values, base=base, source=source, n_boot=CI_N_BOOT,
                                    seed=CI_SEED)
    except NormalizationError:
        return None
    return lo.tolist(), up.tolist()


def _ranked(result: Any, k: int) -> list[int]:
    """Indices of the ``k`` scored edges with the largest ``|score|``, largest first (ties in
    storage order, as ``EdgeResult.top``)."""
    import torch

    scores = result.scores
    key = torch.where(torch.isnan(scores), torch.full_like(scores, -1.0), scores.abs())
    n_scored = int((~torch.isnan(scores)).sum())
    return torch.argsort(key, descending=True, stable=True)[:min(k, n_scored)].tolist()


def circuit_data(result: Any, top_edges: int = DEFAULT_EDGES) -> dict[str, Any]:
    """The JSON the page draws a circuit view from.

    ``{"nodes": [[name, column, y], ...], "columns": {column: label}, "edges": [{"src",
    "dst", "from", "to", "kind", "score", "change", "ci", "hover"}, ...], "n": edges drawn at
    first, "weighted": bool, "n_graph_edges", "n_layers", "n_heads"}``; ``from``/``to`` index
    ``nodes``; edges of an edge result by ``|score|`` (largest first), of a circuit in storage
    order. ``score``/``change``/``ci`` are None for a circuit.
    """
    graph = result.graph
    weighted = is_edges(result)
    if weighted:
        order = _ranked(result, max(top_edges, MAX_VIEW_EDGES))
        intervals = edge_intervals(result, order)
        scores = [float(result.scores[i]) for i in order]
        changes = [float(result.change[i]) for i in order]
        names = [graph.edge_names(i) for i in order]
    else:
        names = list(result.edges)[:MAX_CIRCUIT_EDGES]
        intervals, scores, changes = None, [], []
    nodes: list[list[Any]] = []
    index: dict[str, int] = {}

    def node(name: str) -> int:
        if name not in index:
            index[name] = len(nodes)
            column, y = node_place(name, graph.n_layers, graph.n_heads)
            nodes.append([plotly_text(name), column, y])
        return index[name]

    edges = []
    for k, (src, dst) in enumerate(names):
        target, kind = receiver_kind(dst)
        edge: dict[str, Any] = {"src": src, "dst": dst, "from": node(src), "to": node(target),
                                "kind": kind, "score": None, "change": None, "ci": None}
        hover = f"<b>{plotly_text(src)} → {plotly_text(dst)}</b>"
        if weighted:
            edge["score"], edge["change"] = _num(scores[k]), _num(changes[k])
            hover += f"<br>score {scores[k]:+.4f}"
            if intervals is not None:
                lo, up = intervals[0][k], intervals[1][k]
                edge["ci"] = [_num(lo), _num(up)]
                hover += f"<br>95% CI [{lo:+.4f}, {up:+.4f}]"
            hover += f"<br>change {changes[k]:+.4g} ({plotly_text(result.metric)})<br>rank {k + 1}"
        edge["hover"] = hover
        edges.append(edge)
    columns = sorted({c for _, c, _ in nodes})
    return {"nodes": nodes, "edges": edges,
            "columns": {str(c): column_label(c, graph.n_layers) for c in columns},
            "n": min(top_edges, len(edges)) if weighted else len(edges),
            "weighted": weighted, "n_graph_edges": graph.n_edges,
            "n_layers": graph.n_layers, "n_heads": graph.n_heads}


# -- titles and headlines ---------------------------------------------------------------------
METHOD_WORDS = {"eap": "EAP", "eap_ig": "EAP-IG", "exact": "exact edge patching"}


def section_title(result: Any) -> str:
    """The heading of a circuit-kind section."""
    if is_edges(result):
        method = METHOD_WORDS.get(result.method, result.method)
        n_scored = int((~result.scores.isnan()).sum())
        return (f"Edge attribution ({method}): {n_scored:,} of {result.graph.n_edges:,} edges "
                f"({result.metric}, {result.direction})")
    if is_circuit(result):
        return f"Circuit: {result.n_edges:,} of {result.graph.n_edges:,} edges"
    if is_curve(result):
        return (f"Faithfulness curve: {len(result.sizes)} circuit sizes "
                f"({getattr(result, 'metric', 'metric')})")
    return f"Circuit evaluation: {result.n_edges:,} of {result.n_graph_edges:,} edges"


def section_headline(result: Any) -> str:
    """A circuit-kind section's main finding in one line."""
    if is_edges(result):
        top = result.top(1) if int((~result.scores.isnan()).sum()) else []
        if not top:
            return "no edge was scored"
        src, dst, value = top[0]
        return (f"largest edge {src} -> {dst}, score {value:+.3g} (mean of "
                f"{pairs_text(result.n_pairs)})")
    if is_circuit(result):
        linked = "connects" if result.connected else "does not connect"
        return f"{len(result.nodes)} nodes; it {linked} input to logits"
    if is_curve(result):
        text = f"CPR {result.cpr:.3f}, CMD {result.cmd:.3f}"
        if getattr(result, "random_cpr", None) is not None:
            text += f" (random circuits: CPR {result.random_cpr:.3f}, CMD {result.random_cmd:.3f})"
        return text
    return (f"faithfulness {result.faithfulness:+.3f} with {result.n_edges:,} of "
            f"{result.n_graph_edges:,} edges")


# -- the sections -----------------------------------------------------------------------------
def sign_caption(direction: str) -> str:
    """What an edge's colour means (the sign convention of ``EdgeResult.scores``)."""
    if direction == "noise":
        runs = ("base = clean, source = corrupted: a positive score means patching this edge "
                "alone to the corrupted run moves the metric toward the corrupted run's value "
                "(the edge carries the behaviour)")
    else:
        runs = ("base = corrupted, source = clean: a positive score means patching this edge "
                "alone from the clean run restores the clean behaviour")
    return ("Colour is the sign of the score, red positive and blue negative; width is "
            "proportional to |score|. Score = (mean patched - mean base) / (mean source - "
            f"mean base) over the pairs, with only this edge patched; {direction}: {runs}.")


STYLE_CAPTION = ("Line style is the input the edge feeds: solid a head's query (.q), an MLP "
                 "or the logits; dashed a key (.k); dotted a value (.v). Hover an edge for "
                 "its score, a node for its edges.")


def _control(i: int, data: dict[str, Any]) -> str:
    total = len(data["edges"])
    return (f"<p class='controls'><label>edges drawn <input type='number' "
            f"id='circuit-n-{i}' min='1' max='{total}' value='{data['n']}' step='1'></label> "
            f"of the {total:,} in this view (the graph has {data['n_graph_edges']:,})</p>")


def edges_table(i: int, data: dict[str, Any], metric: str) -> str:
    """The sortable table of a view's edges (rows past the drawn count are hidden by the
    page's script)."""
    weighted = data["weighted"]
    has_ci = weighted and any(e["ci"] is not None for e in data["edges"])
    heads = ["#", "src", "dst", "into"]
    if weighted:
        heads += ["score"] + (["95% CI low", "95% CI high"] if has_ci else []) + [
            f"change ({metric})"]
    rows = []
    for k, e in enumerate(data["edges"]):
        cells = [(k + 1, str(k + 1)), (e["src"], esc(e["src"])), (e["dst"], esc(e["dst"])),
                 (e["kind"], esc(e["kind"]))]
        if weighted:
            cells.append((e["score"], f"{e['score']:+.4f}" if e["score"] is not None else "–"))
            if has_ci:
                for v in e["ci"] or (None, None):
                    cells.append((v, "–" if v is None else f"{v:+.4f}"))
            cells.append((e["change"], "–" if e["change"] is None else f"{e['change']:+.4g}"))
        hidden = " hidden" if k >= data["n"] else ""
        tds = "".join(
            f"<td class='num' data-v='{esc(v)}'>{text}</td>" if isinstance(v, (int, float))
            and not isinstance(v, bool) else f"<td data-v='{esc('' if v is None else v)}'>"
            f"{text}</td>" for v, text in cells)
        rows.append(f"<tr{hidden}>{tds}</tr>")
    head = "".join(f"<th title='sort'>{esc(h)}</th>" for h in heads)
    return (f"<table class='sortable edges' id='edges-table-{i}'><thead><tr>{head}</tr>"
            f"</thead><tbody>{''.join(rows)}</tbody></table>")


def _run_table(rows: list[tuple[str, Any]]) -> str:
    return ("<table class='meta'>" + "".join(
        f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows) + "</table>")


def curve_figure(curve: Any, plot_id: str) -> dict[str, Any]:
    """The plotly figure of a faithfulness curve: faithfulness against the fraction of the
    graph's edges requested (hover: the edges requested and left after pruning)."""
    x = [_num(v) for v in curve.fractions]
    template = ("%{customdata[0]:,} edges requested (%{x:.4g} of the graph)<br>"
                "%{customdata[1]:,} after pruning<br>faithfulness %{y:+.4f}")
    data = [{"type": "scatter", "mode": "lines+markers", "name": "best circuits",
             "x": x, "y": [_num(v) for v in curve.faithfulness.tolist()],
             "customdata": [[s, n] for s, n in zip(curve.sizes, curve.n_edges)],
             "line": {"color": "#b2182b", "width": 2},
             "hovertemplate": "best circuit<br>" + template + "<extra></extra>"}]
    if getattr(curve, "random_faithfulness", None) is not None:
        data.append({"type": "scatter", "mode": "lines+markers", "name": "random circuits",
                     "x": x, "y": [_num(v) for v in curve.random_faithfulness.tolist()],
                     "customdata": [[s, n] for s, n in zip(curve.sizes, curve.random_n_edges)],
                     "line": {"color": "#777", "width": 1.5, "dash": "dash"},
                     "hovertemplate": "random circuit<br>" + template + "<extra></extra>"})
    layout = {"height": 380, "margin": {"l": 70, "r": 30, "t": 20, "b": 60},
              "paper_bgcolor": "white", "plot_bgcolor": "white", "hovermode": "closest",
              "xaxis": {"title": {"text": "fraction of the graph's edges (requested)"},
                        "gridcolor": "#eee", "zeroline": False},
              "yaxis": {"title": {"text": "faithfulness"}, "gridcolor": "#eee",
                        "zeroline": True, "zerolinecolor": "#444"},
              "shapes": [{"type": "line", "xref": "paper", "x0": 0, "x1": 1, "y0": 1, "y1": 1,
                          "line": {"color": "#2166ac", "width": 1, "dash": "dot"}}],
              "legend": {"orientation": "h", "y": 1.08}}
    return {"id": plot_id, "data": data, "layout": layout, "logx": f"{plot_id}-logx"}


def section(result: Any, i: int, heading: str, top_edges: int = DEFAULT_EDGES
            ) -> tuple[str, dict[str, Any] | None]:
    """``(html, figure)`` of one circuit-kind section ``i`` (``figure`` None: static)."""
    plot_id = f"plot-{i}"
    head = (f"<section id='result-{i}' class='circuit'><h2>{esc(heading)}</h2>"
            f"<p class='takeaway'>{esc(section_headline(result))}.</p>")
    if is_edges(result) or is_circuit(result):
        data = circuit_data(result, top_edges)
        if is_edges(result):
            caption = (f"The edges with the largest |score| of the {data['n_graph_edges']:,} "
                       f"(as many as the control says; not pruned); nodes no drawn edge touches "
                       f"are not drawn. {sign_caption(result.direction)} {STYLE_CAPTION}")
            ci = any(e["ci"] is not None for e in data["edges"])
            run = [("model", result.model_name or "-"), ("method", result.method),
                   ("metric", result.metric), ("direction", result.direction),
                   ("pairs", result.n_pairs),
                   ("base run (mean metric)", f"{result.base_value:.4f}"),
                   ("source run (mean metric)", f"{result.source_value:.4f}"),
                   ("intervals", "95% bootstrap over the pairs" if ci else "none (needs "
                    "keep_per_pair=True and several pairs)")]
            metric = result.metric
        else:
            more = len(result.edges) - len(data["edges"])
            first = f" (the first {len(data['edges']):,})" if more > 0 else ""
            caption = (f"Every edge of the circuit{first}, unweighted; only the circuit's "
                       f"nodes are drawn. {STYLE_CAPTION}")
            run = [("edges", f"{result.n_edges:,} of {result.graph.n_edges:,}"),
                   ("nodes", len(result.nodes)), ("input -> logits", result.connected)]
            metric = ""
        figure = {"id": plot_id, "circuit": data, "dash": DASH}
        body = (f"<p class='note'>{esc(caption)}</p>{_control(i, data)}"
                f"<div id='{plot_id}' class='plot'></div>"
                f"<div class='cols'><div><h3>Run</h3>{_run_table(run)}</div>"
                f"<div><h3>Edges</h3><p class='note'>Click a heading to sort.</p>"
                f"{edges_table(i, data, metric)}</div></div>")
        return head + body + "</section>", figure
    if is_curve(result):
        figure = curve_figure(result, plot_id)
        text = (f"CPR (area under the curve, higher is better) {result.cpr:.4f}; CMD (area "
                f"between the curve and 1, lower is better) {result.cmd:.4f}")
        if getattr(result, "random_cpr", None) is not None:
            text += (f"; random circuits of the same sizes: CPR {result.random_cpr:.4f}, "
                     f"CMD {result.random_cmd:.4f}")
        text += (". Faithfulness = (M(circuit) - M(corrupted)) / (M(clean) - M(corrupted)): "
                 "1 = the circuit alone gives the clean behaviour, 0 = none of it.")
        run = [("metric", getattr(result, "metric", "")),
               ("pairs", getattr(result, "n_pairs", "")),
               ("clean (mean metric)", f"{result.clean_value:.4f}"),
               ("corrupted (mean metric)", f"{result.corrupted_value:.4f}"),
               ("graph edges", f"{result.n_graph_edges:,}"),
               ("selection", ", ".join(f"{k}={v}" for k, v in
                                       (getattr(result, "selection", None) or {}).items()))]
        body = (f"<p class='note'>{esc(text)}</p><p class='controls'><label><input "
                f"type='checkbox' id='{plot_id}-logx'> log x axis (drops size 0)</label></p>"
                f"<div id='{plot_id}' class='plot'></div><h3>Run</h3>{_run_table(run)}")
        return head + body + "</section>", figure
    run = [("faithfulness", f"{result.faithfulness:+.4f}"),
           ("metric of the circuit (mean)", f"{result.circuit_value:.4f}"),
           ("clean (mean metric)", f"{result.clean_value:.4f}"),
           ("corrupted (mean metric)", f"{result.corrupted_value:.4f}"),
           ("edges", f"{result.n_edges:,} of {result.n_graph_edges:,}"),
           ("input -> logits", result.connected),
           ("metric", getattr(result, "metric", "")), ("pairs", getattr(result, "n_pairs", ""))]
    note = ("Faithfulness = (M(circuit) - M(corrupted)) / (M(clean) - M(corrupted)), every "
            "edge outside the circuit patched to the corrupted run.")
    return head + f"<p class='note'>{esc(note)}</p>{_run_table(run)}</section>", None


CIRCUIT_JS = """
  function drawCircuit(f, i) {
    var c = f.circuit, gd = document.getElementById(f.id);
    var box = document.getElementById("circuit-n-" + i);
    var rows = document.querySelectorAll("#edges-table-" + i + " tbody tr");
    function draw(n) {
      n = Math.max(1, Math.min(c.edges.length, n || c.n));
      var shown = c.edges.slice(0, n), used = {}, cols = {}, deg = {}, big = 0;
      shown.forEach(function (e) {
        used[e.from] = used[e.to] = true;
        deg[e.from] = deg[e.from] || [0, 0]; deg[e.to] = deg[e.to] || [0, 0];
        deg[e.from][1] += 1; deg[e.to][0] += 1;
        if (e.score !== null) { big = Math.max(big, Math.abs(e.score)); }
      });
      var ids = Object.keys(used).map(Number).sort(function (a, b) { return a - b; });
      ids.forEach(function (k) { cols[c.nodes[k][1]] = true; });
      var colList = Object.keys(cols).map(Number).sort(function (a, b) { return a - b; });
      var xOf = {};
      colList.forEach(function (col, j) { xOf[col] = j; });
      var traces = shown.map(function (e) {
        var a = c.nodes[e.from], b = c.nodes[e.to], x0 = xOf[a[1]], y0 = a[2];
        var x1 = xOf[b[1]], y1 = b[2], span = x1 - x0;
        var bend = span > 1 ? 0.22 * (span - 1) * (e.to % 2 ? 1 : -1) : 0;
        var mx = (x0 + x1) / 2, my = (y0 + y1) / 2 + bend, xs = [], ys = [];
        for (var t = 0; t <= 16; t++) {
          var u = t / 16, w = 1 - u;
          xs.push(w * w * x0 + 2 * w * u * mx + u * u * x1);
          ys.push(w * w * y0 + 2 * w * u * my + u * u * y1);
        }
        var width = (e.score === null || big === 0) ? 1.5 : 0.6 + 7.4 * Math.abs(e.score) / big;
        var colour = e.score === null ? "#555" : (e.score >= 0 ? "#b2182b" : "#2166ac");
        return {type: "scatter", mode: "lines", x: xs, y: ys, text: e.hover,
                hoverinfo: "text", opacity: 0.75, showlegend: false,
                line: {width: width, color: colour, dash: f.dash[e.kind] || "solid"}};
      });
      traces.push({type: "scatter", mode: "markers+text", showlegend: false,
        x: ids.map(function (k) { return xOf[c.nodes[k][1]]; }),
        y: ids.map(function (k) { return c.nodes[k][2]; }),
        text: ids.map(function (k) { return c.nodes[k][0]; }), textposition: "top center",
        textfont: {size: 10}, hoverinfo: "text",
        hovertext: ids.map(function (k) {
          return "<b>" + c.nodes[k][0] + "<\\/b><br>drawn edges: " + deg[k][0] + " in, " +
            deg[k][1] + " out";
        }),
        marker: {size: 11, color: "#fff", line: {color: "#222", width: 1.5}}});
      var layout = {height: Math.min(900, Math.max(360, 46 * c.n_heads + 140)),
        margin: {l: 30, r: 30, t: 20, b: 50}, paper_bgcolor: "white",
        plot_bgcolor: "white", hovermode: "closest", showlegend: false,
        xaxis: {tickvals: colList.map(function (col, j) { return j; }),
                ticktext: colList.map(function (col) { return c.columns[String(col)]; }),
                showgrid: false, zeroline: false, range: [-0.5, colList.length - 0.5]},
        yaxis: {visible: false, range: [-(c.n_heads + 1) / 2 - 0.4, (c.n_heads + 1) / 2 + 0.4]}};
      if (box) { box.value = String(n); }
      Plotly.react(gd, traces, layout, config).then(function () {
        gd.setAttribute("data-edges", String(n));
        gd.setAttribute("data-nodes", String(ids.length));
      });
      rows.forEach(function (row) {
        row.hidden = parseInt(row.cells[0].getAttribute("data-v"), 10) > n;
      });
    }
    if (box) {
      box.addEventListener("change", function () { draw(parseInt(box.value, 10)); });
    }
    return draw;
  }
  function sortable(table) {
    var heads = table.querySelectorAll("thead th"), body = table.tBodies[0];
    heads.forEach(function (th, j) {
      th.addEventListener("click", function () {
        var up = th.getAttribute("data-sort") !== "up";
        heads.forEach(function (h) { h.removeAttribute("data-sort"); });
        th.setAttribute("data-sort", up ? "up" : "down");
        var list = Array.prototype.slice.call(body.rows);
        list.sort(function (a, b) {
          var x = a.cells[j].getAttribute("data-v"), y = b.cells[j].getAttribute("data-v");
          var nx = parseFloat(x), ny = parseFloat(y), d;
          if (!isNaN(nx) && !isNaN(ny)) { d = nx - ny; } else { d = x < y ? -1 : x > y ? 1 : 0; }
          return up ? d : -d;
        });
        list.forEach(function (row) { body.appendChild(row); });
      });
    });
  }
"""
"""The page script's circuit part: ``drawCircuit(figure, section)`` returns the function that
draws the first ``n`` edges (and hides the table rows past them); ``sortable(table)`` sorts a
table by a clicked column (numbers numerically). It holds no ``</`` (the page script may not)."""


__all__ = ["CIRCUIT_ATTRIBUTES", "CIRCUIT_JS", "DEFAULT_EDGES", "EDGE_ATTRIBUTES",
           "EVALUATION_ATTRIBUTES", "CURVE_ATTRIBUTES", "MAX_CIRCUIT_EDGES", "MAX_VIEW_EDGES",
           "circuit_data", "column_label", "curve_figure", "edge_intervals", "edges_table",
           "is_circuit", "is_circuit_section", "is_curve", "is_edges", "is_evaluation",
           "node_place", "receiver_kind", "section", "section_headline", "section_title",
           "sign_caption"]

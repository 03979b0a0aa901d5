"""Figures and HTML views of logit-lens and direct-logit-attribution results.

Duck-typed on :class:`~causalpatch.methods.lens.LensResult` (``layers``, ``positions``,
``tokens``, ``top_tokens``, ``top_probs``, ``entropy``, ``kl``, ``answer_*``) and
:class:`~causalpatch.methods.lens.DLAResult` (``unit``, ``names``, ``values``, ``matrix()``,
``top()``, ``logit_diff``...). matplotlib is imported inside the functions; the HTML views are
self-contained (inline CSS, no scripts), for ``to_html`` files and notebooks (``_repr_html_``).
"""

from __future__ import annotations

import math
from typing import Any

from .plots import COLUMN_WIDTH, FONT_SIZE, NEGATIVE, POSITIVE, TEXT_WIDTH
from .text import esc

#: Colour maps of the lens statistics (sequential: more = darker).
LENS_CMAPS = {"top": "Blues", "answer_prob": "Greens", "answer_rank": "Greens_r",
              "entropy": "Purples", "kl": "Oranges"}
LENS_LABELS = {"top": "probability of the top token", "answer_prob": "probability of {answer}",
               "answer_rank": "rank of {answer} (log scale)", "entropy": "entropy (nats)",
               "kl": "KL(final || layer) (nats)"}
#: Cells up to which the lens heatmap writes each cell's top token.
MAX_ANNOTATED_CELLS = 40 * 40



def shown_token(token: str) -> str:
    """A token as a cell shows it: without its surrounding spaces, or quoted when it is only
    whitespace (``' '``, ``'\\n'``), so that no cell looks empty."""
    return token.strip() or repr(token)


def _lens_values(result: Any, stat: str) -> Any:
    """The ``[layers, positions]`` numpy array of ``stat``."""
    if stat == "top":
        return result.top_probs[..., 0].double().numpy()
    if stat in ("answer_prob", "answer_rank"):
        values = getattr(result, stat)
        if values is None:
            from ..errors import InvalidArgumentError

            raise InvalidArgumentError(
                f"stat={stat!r} needs an answer: call logit_lens(..., answer=' Paris')")
        return values.double().numpy()
    return getattr(result, stat).double().numpy()


def plot_lens(result: Any, stat: str = "top", ax: Any = None, title: str | None = None) -> Any:
    """Layer x position heatmap of one lens statistic (layer 0 at the bottom); with
    ``stat="top"`` each cell shows its top token. Returns the ``Figure``."""
    import numpy as np
    from matplotlib.colors import LogNorm

    from .figure import ResultFigure

    values = _lens_values(result, stat)
    n_layers, n_pos = values.shape
    if ax is None:
        width = min(TEXT_WIDTH, max(COLUMN_WIDTH, 0.55 * n_pos + 1.2))
        height = min(9.0, max(2.4, 0.2 * n_layers + 1.2))
        fig = ResultFigure(figsize=(width, height), layout="constrained")
        ax = fig.add_subplot()
    fig = ax.figure
    fs = FONT_SIZE
    norm = None
    kwargs: dict[str, Any] = {}
    if stat == "answer_rank":
        norm = LogNorm(vmin=1, vmax=max(2.0, float(values.max())))
    elif stat in ("top", "answer_prob"):
        kwargs = {"vmin": 0.0, "vmax": 1.0}
    image = ax.imshow(values, cmap=LENS_CMAPS[stat], origin="lower", aspect="auto",
                      interpolation="nearest", norm=norm, **kwargs)
    ax.set_yticks(np.arange(n_layers))
    ax.set_yticklabels([str(x) for x in result.layers], fontsize=fs)
    ax.set_xticks(np.arange(n_pos))
    ax.set_xticklabels([f"{result.tokens[p]!r}"[:14] for p in result.positions], fontsize=fs,
                       rotation=60, ha="right")
    ax.set_ylabel("layer", fontsize=fs + 1)
    ax.set_xlabel("position (input token)", fontsize=fs + 1)
    if stat == "top" and n_layers * n_pos <= MAX_ANNOTATED_CELLS:
        for i in range(n_layers):
            for j in range(n_pos):
                text = shown_token(result.top_tokens[i][j][0])[:8]
                ax.text(j, i, text, ha="center", va="center", fontsize=max(4.0, fs - 2.5),
                        color="white" if values[i, j] > 0.6 else "black")
    answer = repr(result.answer_text) if getattr(result, "answer_text", None) else "the answer"
    bar = fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02)
    bar.set_label(LENS_LABELS[stat].format(answer=answer), fontsize=fs)
    bar.ax.tick_params(labelsize=fs)
    heading = (f"Logit lens: {result.model_name}" if title is None else title)
    if heading:
        ax.set_title(heading, fontsize=fs + 1)
    return fig


def dla_target(result: Any) -> str:
    """``logit(' Mary') - logit(' John')``, or ``logit(correct) - logit(incorrect)`` when the
    prompts have different answers."""
    same = len(set(result.correct_text)) == 1 and (
        not result.incorrect_text or len(set(result.incorrect_text)) == 1)
    good = repr(result.correct_text[0]) if same else "correct"
    if not result.incorrect_text:
        return f"logit({good})"
    bad = repr(result.incorrect_text[0]) if same else "incorrect"
    return f"logit({good}) - logit({bad})"


def _dla_heading(result: Any) -> str:
    cap = " pre-cap" if result.softcap else ""
    n = len(result.prompts)
    over = "1 prompt" if n == 1 else f"mean over {n} prompts"
    return (f"Direct logit attribution ({result.unit}): {result.model_name}\n"
            f"{dla_target(result)}{cap} = {result.logit_diff:.3f}, {over}")


def plot_dla(result: Any, ax: Any = None, title: str | None = None, k: int = 20) -> Any:
    """Bars per layer (attn and MLP side by side for ``unit="component"``), a layer x head
    heatmap (``"head"``), or the ``k`` largest parts (``"neuron"``). Returns the ``Figure``."""
    import numpy as np
    from matplotlib import colormaps

    from .figure import ResultFigure
    from .plots import CMAP, symmetric_limit

    heading = _dla_heading(result) if title is None else title
    fs = FONT_SIZE
    if ax is None:
        fig = ResultFigure(figsize=(COLUMN_WIDTH * 1.4, 2.8), layout="constrained")
        ax = fig.add_subplot()
    fig = ax.figure
    if result.unit == "head":
        mat, cols = result.matrix()
        m = mat.numpy()
        limit = symmetric_limit(m)
        image = ax.imshow(m, cmap=colormaps[CMAP], vmin=-limit, vmax=limit, origin="lower",
                          aspect="auto", interpolation="nearest")
        ax.set_xlabel("head", fontsize=fs + 1)
        ax.set_ylabel("layer", fontsize=fs + 1)
        ax.set_xticks(np.arange(len(cols)))
        ax.set_xticklabels(cols, fontsize=fs)
        ax.tick_params(axis="y", labelsize=fs)
        bar = fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02)
        target = "logit difference" if result.metric == "logit_diff" else "logit"
        bar.set_label(f"direct effect on the {target}", fontsize=fs)
        bar.ax.tick_params(labelsize=fs)
    elif result.unit in ("component", "layer"):
        mat, cols = result.matrix()
        m = mat.numpy()
        x = np.arange(m.shape[0])
        width = 0.8 / m.shape[1]
        colours = ["#d95f02", "#1b9e77"] if m.shape[1] == 2 else ["#555555"]
        for j, name in enumerate(cols):
            ax.bar(x + (j - (m.shape[1] - 1) / 2) * width, m[:, j], width=width,
                   color=colours[j % len(colours)], label=name)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_xlabel("layer", fontsize=fs + 1)
        ax.set_ylabel("direct effect", fontsize=fs + 1)
        ax.tick_params(labelsize=fs)
        others = [f"{n}: {v:+.2f}" for n, v in result.parts.items()
                  if not n.startswith("blocks.")]
        if m.shape[1] == 2:
            ax.legend(fontsize=fs, frameon=False)
        if others:
            ax.text(0.01, 0.98, ", ".join(others), transform=ax.transAxes, va="top",
                    fontsize=fs - 1)
    else:
        top = result.top(k)
        names = [n for n, _ in top][::-1]
        vals = [v for _, v in top][::-1]
        ax.barh(np.arange(len(vals)), vals, color=[POSITIVE if v > 0 else NEGATIVE
                                                   for v in vals])
        ax.set_yticks(np.arange(len(vals)))
        ax.set_yticklabels(names, fontsize=fs - 1)
        ax.axvline(0, color="black", linewidth=0.6)
        ax.set_xlabel("direct effect", fontsize=fs + 1)
        ax.tick_params(axis="x", labelsize=fs)
        fig.set_size_inches(COLUMN_WIDTH * 1.4, max(2.8, 0.16 * len(vals) + 1.2))
    for spine in ("top", "right"):
        ax.spines[spine].set_visible(False)
    if heading:
        ax.set_title(heading, fontsize=fs + 1)
    return fig


_CSS = ("<style>.cp-lens{font:12px system-ui,sans-serif}.cp-lens table{border-collapse:collapse}"
        ".cp-lens td,.cp-lens th{border:1px solid #ddd;padding:2px 4px;font:11px monospace;"
        "white-space:pre;text-align:center}.cp-lens th{background:#f4f4f4}"
        ".cp-lens .bar{display:inline-block;height:10px}</style>")


def _page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
            f"{_CSS}</head><body>{body}</body></html>")


def lens_html(result: Any, page: bool = True) -> str:
    """The lens as an HTML table: rows are layers (last layer on top), columns positions; each
    cell is the top token, shaded by its probability, with the top-k in its tooltip (and the
    answer's probability and rank when given)."""
    has_answer = getattr(result, "answer_prob", None) is not None
    head = "".join(f"<th>{esc(repr(result.tokens[p]))}<br>{p}</th>" for p in result.positions)
    body = []
    for i in reversed(range(len(result.layers))):
        cells = []
        for j in range(len(result.positions)):
            prob = float(result.top_probs[i, j, 0])
            tip = "\n".join(f"{t!r}: {float(result.top_probs[i, j, r]):.3f}"
                            for r, t in enumerate(result.top_tokens[i][j]))
            if has_answer:
                tip += (f"\n{result.answer_text!r}: p={float(result.answer_prob[i, j]):.3g}, "
                        f"rank {int(result.answer_rank[i, j])}")
            tip += (f"\nentropy {float(result.entropy[i, j]):.3f}, "
                    f"KL {float(result.kl[i, j]):.3f}")
            shade = f"rgba(33,102,172,{0.08 + 0.8 * prob:.2f})"
            colour = "#fff" if prob > 0.6 else "#000"
            cells.append(f"<td title='{esc(tip)}' style='background:{shade};color:{colour}'>"
                         f"{esc(shown_token(result.top_tokens[i][j][0]))}</td>")
        body.append(f"<tr><th>{esc(result.layers[i])}</th>{''.join(cells)}</tr>")
    note = ""
    if has_answer:
        ranks = ", ".join(f"{result.layers[i]}: {int(result.answer_rank[i, -1])}"
                          for i in range(len(result.layers)))
        note = (f"<p>Rank of {esc(repr(result.answer_text))} at the last position, by layer: "
                f"{esc(ranks)}</p>")
    content = (f"<div class='cp-lens'><h3>Logit lens — {esc(result.model_name)}</h3>"
               f"<p>{esc(result.prompt)}</p><table><tr><th>layer</th>{head}</tr>"
               f"{''.join(body)}</table>{note}</div>")
    return _page("Logit lens", content) if page else _CSS + content


def dla_html(result: Any, page: bool = True, k: int = 25) -> str:
    """The attribution as HTML: what is attributed, the closure check (parts sum vs the logit
    difference) and the ``k`` largest parts as bars."""
    top = result.top(k)
    scale = max((abs(v) for _, v in top), default=1.0) or 1.0
    rows = []
    for name, value in top:
        width = 160 * abs(value) / scale
        colour = POSITIVE if value > 0 else NEGATIVE
        rows.append(f"<tr><td style='text-align:left'>{esc(name)}</td><td>{value:+.4f}</td>"
                    f"<td style='text-align:left'><span class='bar' style='width:{width:.0f}px;"
                    f"background:{colour}'></span></td></tr>")
    total = float(result.values.sum())
    cap = (f" (pre-cap; the model's capped difference is {result.model_logit_diff:.4f})"
           if result.softcap else "")
    heading = esc(_dla_heading(result)).replace("\n", "<br>")
    content = (f"<div class='cp-lens'><h3>{heading}</h3>"
               f"<p>logit difference {result.logit_diff:.4f}{esc(cap)}; the {len(result.names)} "
               f"parts sum to {total:.4f} (largest gap over prompts "
               f"{result.sum_error:.2g})</p><table><tr><th>part</th><th>value</th><th></th></tr>"
               f"{''.join(rows)}</table></div>")
    if not math.isfinite(total):
        content += "<p>non-finite parts</p>"
    return _page("Direct logit attribution", content) if page else _CSS + content


# -- report sections: what each result is and its main finding, in one line ---------------------
LENS_ATTRIBUTES = ("prompt", "tokens", "positions", "layers", "top_tokens", "top_probs",
                   "entropy", "kl")
"""What a report needs of a logit-lens result (:class:`~causalpatch.methods.lens.LensResult`)."""
DLA_ATTRIBUTES = ("unit", "names", "values", "logit_diffs", "correct_text", "prompts", "top")
"""What a report needs of a DLA result (:class:`~causalpatch.methods.lens.DLAResult`)."""


def is_lens(value: Any) -> bool:
    """True for a logit-lens result (duck-typed on :data:`LENS_ATTRIBUTES`)."""
    return all(hasattr(value, name) for name in LENS_ATTRIBUTES)


def is_dla(value: Any) -> bool:
    """True for a direct-logit-attribution result (duck-typed on :data:`DLA_ATTRIBUTES`)."""
    return all(hasattr(value, name) for name in DLA_ATTRIBUTES)


def lens_title(result: Any) -> str:
    """``"Logit lens: 'The Eiffel Tower is in the city of' (30 layers x 1 position)"``."""
    prompt = str(result.prompt)
    prompt = prompt if len(prompt) <= 60 else prompt[:59] + "…"
    n_pos = len(result.positions)
    return (f"Logit lens: {prompt!r} ({len(result.layers)} layers x {n_pos} "
            f"position{'s' if n_pos != 1 else ''})")


def lens_headline(result: Any) -> str:
    """The lens's main finding at the last position of its axis: the answer's probability and
    rank at the last layer and the first layer where it is the top token; without an answer,
    the final top token and the first layer from which it stays on top."""
    j = len(result.positions) - 1
    where = f"at {result.tokens[result.positions[j]]!r} (position {result.positions[j]})"
    if getattr(result, "answer_prob", None) is not None and result.answer_rank is not None:
        ranks = [int(result.answer_rank[i, j]) for i in range(len(result.layers))]
        first = next((result.layers[i] for i, r in enumerate(ranks) if r == 1), None)
        text = (f"{result.answer_text!r} {where}: p = {float(result.answer_prob[-1, j]):.3g}, "
                f"rank {ranks[-1]} at the last layer")
        if first is None:
            return text + "; never the top token"
        if all(r == 1 for r in ranks[result.layers.index(first):]):
            return text + f"; the top token from layer {first} on"
        return text + f"; first the top token at layer {first}"
    final = result.top_tokens[-1][j][0]
    tops = [result.top_tokens[i][j][0] for i in range(len(result.layers))]
    since = len(tops) - 1
    while since > 0 and tops[since - 1] == final:
        since -= 1
    return (f"top token {where}: {final!r} (p = {float(result.top_probs[-1, j, 0]):.3g}) at "
            f"the last layer, on top from layer {result.layers[since]}")


def dla_title(result: Any) -> str:
    """``"Direct logit attribution (head): logit(' Mary') - logit(' John')"``."""
    return f"Direct logit attribution ({result.unit}): {dla_target(result)}"


def dla_headline(result: Any) -> str:
    """The attributed difference and its largest part, with that part's share."""
    total = result.logit_diff
    lead = f"{dla_target(result)} = {total:.3g}"
    top = result.top(1)
    if not top:
        return lead
    name, value = top[0]
    share = f" ({value / total * 100:+.0f}% of it)" if abs(total) > 1e-9 else ""
    n = len(result.prompts)
    over = "1 prompt" if n == 1 else f"mean of {n} prompts"
    return f"{lead} ({over}); largest part {name} {value:+.3g}{share}"


__all__ = ["DLA_ATTRIBUTES", "LENS_ATTRIBUTES", "dla_headline", "dla_html", "dla_target",
           "dla_title", "is_dla", "is_lens", "lens_headline", "lens_html", "lens_title",
           "plot_dla", "plot_lens", "shown_token"]

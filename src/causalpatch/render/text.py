"""Plain-language text about results: component and metric names in words, axis titles, and
the one-paragraph takeaway the report prints above each plot.

* :func:`component_words`: ``"attn_head"`` -> ``"attention heads"``, ``"blocks.9.attn"`` ->
  ``"attention output of layer 9"``.
* :func:`axis_title`: the title of an axis; for the position axis it says whether the ticks are
  roles shared by every pair (``"position (role)"``) or the tokens of pair 0.
* :func:`takeaway`: which cells recover most of the effect, with numbers, e.g. "Restoring
  attention heads from the clean run: layer 9 head 3 at END (position 14) recovers 42% of the
  clean-corrupted logit difference gap (positive in 30 of 32 pairs). ..."

Results are duck-typed (``effect_matrix``, ``axes``, ``shape``, ``normalized``, ``method``,
``component``, ``metric``, ``direction``, ``cell_text``, ``top_cells``; ``per_pair``,
``n_pairs``, ``model_name`` and ``position_roles()`` are used when present).
"""

from __future__ import annotations

import html
import math
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..result import PatchingResult

#: Component (and site kind) names in words; plural for sweeps over every layer.
COMPONENT_WORDS: dict[str, str] = {
    "resid_pre": "residual stream (block input)",
    "resid_mid": "residual stream (between attention and MLP)",
    "resid_post": "residual stream (block output)",
    "attn": "attention output", "attn_out": "attention output", "hook_attn_out": "attention output",
    "mlp": "MLP output", "mlp_out": "MLP output", "hook_mlp_out": "MLP output",
    "attn_head": "attention heads", "attn.z": "attention heads",
    "attn_head_q": "attention head queries", "attn.q": "attention head queries",
    "attn_head_k": "attention head keys", "attn.k": "attention head keys",
    "attn_head_v": "attention head values", "attn.v": "attention head values",
    "mlp_neuron": "MLP neurons", "mlp.post": "MLP neurons",
    "attn.in": "attention input", "mlp.in": "MLP input",
}
METHOD_WORDS: dict[str, str] = {
    "activation_patching": "Activation patching", "attribution_patching": "Attribution patching",
    "path_patching": "Path patching", "ablation": "Ablation", "causal_tracing": "Causal tracing",
    "sae_patching": "SAE feature patching",
}
METRIC_WORDS: dict[str, str] = {
    "logit_diff": "logit difference", "logit": "logit", "prob": "probability",
    "prob_diff": "probability difference", "logprob": "log-probability", "kl": "KL divergence",
    "l2": "L2 distance", "cosine": "cosine similarity", "ce_diff": "cross-entropy difference",
    "greater_than": "p(later year) - p(earlier year)",
}
AXIS_TITLES = {"layer": "layer", "position": "position (token)", "head": "head",
               "neuron": "neuron", "site": "site", "group": "position group"}
_SITE = re.compile(r"^blocks\.(\d+)\.(.+)$")


def component_words(component: str) -> str:
    """A component or site name in words (the name itself when it is not known)."""
    if component in COMPONENT_WORDS:
        return COMPONENT_WORDS[component]
    match = _SITE.match(component)
    if match and match.group(2) in COMPONENT_WORDS:
        words = COMPONENT_WORDS[match.group(2)]
        if words.endswith("s") and not words.endswith("ss"):  # "attention heads" -> "head"
            words = words[:-1]
        return f"{words} of layer {match.group(1)}"
    return component


def method_words(method: str) -> str:
    return METHOD_WORDS.get(method, method.replace("_", " ").capitalize())


def metric_words(metric: str) -> str:
    return METRIC_WORDS.get(metric, metric.replace("_", " "))


def short_model_name(name: str) -> str:
    """``"HuggingFaceTB/SmolLM2-135M"`` -> ``"SmolLM2-135M"`` (a folder path -> its last part)."""
    name = str(name or "").rstrip("/")
    return name.rsplit("/", 1)[-1] if name else ""


def n_pairs_of(result: PatchingResult) -> int:
    n = getattr(result, "n_pairs", None)
    if isinstance(n, int) and not isinstance(n, bool):
        return n
    per_pair = getattr(result, "per_pair", None)
    return int(per_pair.shape[0]) if per_pair is not None else 1


def pairs_text(n: int) -> str:
    return f"{n} pair{'s' if n != 1 else ''}"


def esc(value: Any) -> str:
    """``value`` as text safe in HTML, quotes included (attributes and element text)."""
    return html.escape(str(value), quote=True)


def plotly_text(value: Any) -> str:
    """Text for plotly to draw: plotly reads <b>, <br>, <a href> and entities in labels."""
    return html.escape(str(value), quote=False)


def position_roles(result: PatchingResult) -> list[str] | None:
    """The result's per-entry roles of the position axis, or None (duck-typed)."""
    method = getattr(result, "position_roles", None)
    roles = method() if callable(method) else None
    return roles if isinstance(roles, list) else None


def axis_title(result: PatchingResult, axis: str) -> str:
    """Axis title; the position axis says what its tick labels are.

    ``"position (role)"`` when every pair agrees on the roles of the positions,
    ``"position (tokens of pair 0)"`` when several pairs were averaged without such roles,
    ``"position (token)"`` for one pair.
    """
    if axis == "position":
        if position_roles(result) is not None:
            return "position (role)"
        if n_pairs_of(result) > 1:
            return "position (tokens of pair 0)"
    return AXIS_TITLES.get(axis, axis)


def figure_title(result: PatchingResult) -> str:
    """Two-line figure title: what was patched in words; model, pairs, metric, direction."""
    first = title_words(result)
    parts = []
    model = short_model_name(getattr(result, "model_name", ""))
    if model:
        parts.append(model)
    parts.append(pairs_text(n_pairs_of(result)))
    metric = metric_words(result.metric)
    if result.method == "causal_tracing":
        metric = "indirect effect on p(answer)"
    elif result.method != "ablation":
        metric += f", {result.direction}"
    parts.append(metric)
    return first + "\n" + " · ".join(parts)


def _unit_label(item: Any) -> str:
    """``[2, 1]`` -> ``"L2H1"``, ``[3, None]`` -> ``"L3 MLP"``."""
    if isinstance(item, (list, tuple)) and len(item) == 2:
        layer, head = item
        return f"L{layer} MLP" if head is None else f"L{layer}H{head}"
    return str(item)


def _listed(items: list[Any], limit: int = 4) -> str:
    shown = ", ".join(_unit_label(x) for x in items[:limit])
    return shown + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


FREEZE_WORDS = {"heads": "other heads frozen", "all": "other heads and MLPs frozen"}


def path_words(result: PatchingResult) -> tuple[str, str, str]:
    """Path patching's ``(senders, receivers, freeze)`` in words, from ``extra``."""
    extra = _extra(result)
    senders = extra.get("senders") or []
    if result.component == "senders" and senders:
        sent = _listed(list(senders))
    else:
        sent = component_words(result.component)
    receivers = extra.get("receivers")
    kinds = [str(k) for k in extra.get("receiver_input") or []]
    if receivers == "logits" or receivers is None:
        recv = "logits (direct path)"
    else:
        recv = _listed(list(receivers))
        if kinds:
            recv += " via " + "/".join(kinds)
    freeze = extra.get("freeze")
    frozen = FREEZE_WORDS.get(str(freeze), f"freeze {freeze}") if freeze else ""
    return sent, recv, frozen


def title_words(result: PatchingResult) -> str:
    """What was done, in words, for a heading: ``"Path patching: attention heads → L2H1 via q,
    other heads frozen"``, ``"Mean ablation: MLP output"``, ``"Attribution patching (AtP*
    estimates): attention heads"``, ``"Causal tracing: restoring the MLP output (window of 10
    layers), subject 'Eiffel Tower' noised"``."""
    what = component_words(result.component)
    if result.method == "path_patching":
        sent, recv, frozen = path_words(result)
        return f"Path patching: {sent} → {recv}" + (f", {frozen}" if frozen else "")
    if result.method == "attribution_patching":
        return f"Attribution patching ({estimate_words(result)}): {what}"
    if result.method == "ablation":
        kind = ablation_kind(result)
        return f"{kind.capitalize()} ablation: {what}" if kind else f"Ablation: {what}"
    if result.method == "causal_tracing":
        return (f"Causal tracing: restoring {trace_component_words(result)}, "
                f"{subject_text(result)} noised")
    return f"{method_words(result.method)}: {what}"


def run_words(result: PatchingResult) -> list[str]:
    """The method's own settings a reader needs beside the plot (empty for plain patching):
    senders, receivers and what is frozen; the ablation kind and baseline; the subject, noise,
    window and baselines of causal tracing; the estimates' kind and the verified exact values."""
    extra = _extra(result)
    out: list[str] = []
    if result.method == "path_patching":
        sent, recv, frozen = path_words(result)
        senders = extra.get("senders") or []
        out.append(f"senders: {sent}" + (f" ({len(senders)})" if senders else ""))
        out.append(f"receivers: {recv}")
        if frozen:
            out.append(f"frozen: {extra.get('frozen') or frozen}")
    elif result.method == "ablation":
        kind = ablation_kind(result)
        if kind:
            out.append(f"ablation kind: {kind}")
        if result.clean_metric is not None:
            out.append(f"baseline {metric_words(result.metric)} (nothing ablated): "
                       f"{result.clean_metric:.4g}")
        out.append(f"effect: ablated - baseline {metric_words(result.metric)}")
    elif result.method == "causal_tracing":
        spans = extra.get("subject_spans")
        subject = subject_text(result)
        if isinstance(spans, list) and len(spans) == 1 and isinstance(spans[0], list):
            s0, s1 = spans[0]
            subject += f" (tokens {s0}–{s1 - 1}, marked * on the position axis)"
        subjects = extra.get("subjects")
        if isinstance(subjects, list) and len(subjects) > 1:
            shown = ", ".join(repr(x) for x in subjects[:3] if isinstance(x, str))
            subject = (f"subjects of {len(subjects)} prompts ({shown}"
                       + (", ..." if len(subjects) > 3 else "") + "); positions averaged in "
                       "ROME's groups relative to each subject")
        out.append(subject)
        if "noise" in extra:
            sigma = extra.get("sigma")
            noise = f"noise {float(extra['noise']):g} x the embeddings' std"
            if isinstance(sigma, (int, float)):
                noise += f" (sigma = {float(sigma):.3g})"
            if extra.get("samples"):
                noise += f", {extra['samples']} samples"
            out.append(noise)
        if "window" in extra:
            out.append(f"window: {extra['window']} layer{'s' if extra['window'] != 1 else ''} "
                       "restored together")
        out.append(baselines_text(result))
    elif result.method == "attribution_patching":
        out.append(f"values: {estimate_words(result)} of the normalised effect")
        checked = verified_cells(result)
        if checked:
            out.append("verified exactly: " + "; ".join(
                f"{cell_words(result, c)}: estimated {v['estimate'] * 100:+.0f}%, "
                f"exact {v['exact'] * 100:+.0f}%" for c, v in list(checked.items())[:10])
                + (f" (+{len(checked) - 10} more)" if len(checked) > 10 else ""))
    return out


def value_heading(result: PatchingResult) -> str:
    """The name of a result's values in tables: ``effect``, ``estimate`` (attribution
    patching), ``indirect effect`` (causal tracing), ``change`` (ablation)."""
    if result.method == "attribution_patching":
        return "estimate"
    if result.method == "causal_tracing":
        return "indirect effect"
    if result.method == "ablation":
        return "change"
    return "effect"


def baselines_text(result: PatchingResult) -> str:
    """One line with the metric on the runs the effects are measured from, in the method's
    terms (causal tracing: the answer's probability, clean and with the subject noised;
    ablation: the metric with nothing ablated)."""
    clean, corrupted = result.clean_metric, result.corrupted_metric
    if result.method == "causal_tracing":
        parts = []
        if clean is not None:
            parts.append(f"clean run {clean:.4f}")
        if corrupted is not None:
            parts.append(f"subject noised {corrupted:.4f}")
        return ("p(answer): " + ", ".join(parts)
                + " (indirect effect = p(restored) - p(subject noised))")
    if result.method == "ablation":
        return (f"baseline ({result.metric}): nothing ablated "
                + ("?" if clean is None else f"{clean:.4f}") + " (effects: ablated - baseline)")
    parts = [] if clean is None else [f"clean {clean:.4f}"]
    if corrupted is not None:
        parts.append(f"corrupted {corrupted:.4f}")
    scale = " (effects: 0 = corrupted, 1 = clean)" if result.normalized else ""
    return f"baselines ({result.metric}): " + ", ".join(parts) + scale


def cell_words(result: PatchingResult, coords: tuple[int, ...]) -> str:
    """``"layer 9 head 3 at END (position 14)"`` for array coordinates."""
    parts, where = [], ""
    for axis, c in zip(result.axes, coords):
        text = str(result.cell_text(axis, c))
        if axis == "position":
            pos, sep, rest = text.partition(": ")
            where = f" at {rest} (position {pos})" if sep and rest else f" at position {text}"
        elif axis == "site":
            parts.append(text)
        elif axis == "group":  # causal tracing's position groups: "at the last subject token"
            where = f" at the {text}"
        else:
            parts.append(f"{axis} {text}")
    return " ".join(parts).strip() + where if parts else where.strip()


def _pct(value: float) -> str:
    return f"{abs(value) * 100:.0f}%"


def _sign_agreement(result: PatchingResult, coords: tuple[int, ...], value: float) -> str:
    per_pair = getattr(result, "per_pair", None)
    if per_pair is None or per_pair.shape[0] < 2 or value == 0:
        return ""
    index = (slice(None), *coords)  # a name: mypy misreads `x[(a, *b)]` as 3.11-only `x[a, *b]`
    column = per_pair[index]
    same = int((column > 0).sum()) if value > 0 else int((column < 0).sum())
    sign = "positive" if value > 0 else "negative"
    return f"{sign} in {same} of {column.shape[0]} pairs"


def takeaway(result: PatchingResult, k: int = 3, threshold: float = 0.1) -> str:
    """A few plain-language sentences on what the result says, with numbers.

    Normalised results name the cells that recover (denoise) or destroy (noise) most of the
    clean-corrupted gap, in percent, how often the top cell's sign holds over pairs, how many
    cells reach ``threshold``, and the most negative cell when it matters. Raw results name the
    largest values in the metric's unit. Each method says it in its own terms: attribution
    patching's values are *estimates* (with the exact value beside each verified one),
    an ablation names its kind and the metric before and after, causal tracing speaks of the
    indirect effect of restoring a state and of the answer's probability with the subject
    noised.
    """
    return " ".join(takeaway_sentences(result, k, threshold))


def headline(result: PatchingResult, k: int = 3, threshold: float = 0.1) -> str:
    """The result's main finding in one line: the takeaway's first sentence without its lead
    (what was done, which a title already says)."""
    first = takeaway_sentences(result, k, threshold)[0]
    _, sep, finding = first.partition(": ")
    return finding[:1].upper() + finding[1:] if sep and finding else first


def takeaway_sentences(result: PatchingResult, k: int = 3, threshold: float = 0.1
                       ) -> list[str]:
    """:func:`takeaway` as a list of sentences (the first is :func:`headline`)."""
    finite = result.effect_matrix[~result.effect_matrix.isnan()]
    n_cells = int(result.effect_matrix.numel())
    n = n_pairs_of(result)
    unit = "prompt" if result.method in ("ablation", "causal_tracing") else "pair"
    over = f"mean of {n} {unit}{'s' if n != 1 else ''}"
    what = component_words(result.component)
    metric = metric_words(result.metric)
    if finite.numel() == 0:
        return [f"Every cell of this result is undefined (NaN); nothing to conclude ({over})."]
    top = [(c, v) for c, v in result.top_cells(k) if math.isfinite(v)]
    (c0, v0), rest = top[0], top[1:]
    agreement = _sign_agreement(result, c0, v0).replace(" pairs", f" {unit}s")
    close = f"; {agreement})." if agreement else ")."
    if result.method == "causal_tracing":
        return _trace_sentences(result, top, over, close)
    if result.method == "ablation":
        return _ablation_sentences(result, top, over, close)
    if not result.normalized:
        lead = f"{method_words(result.method)} of {what}"
        out = [f"{lead}: {cell_words(result, c0)} gives a {metric} of {v0:+.3g} ({over}{close}"]
        if rest:
            out.append("Next: " + ", ".join(f"{cell_words(result, c)} ({v:+.3g})"
                                            for c, v in rest) + ".")
        return out
    estimate = result.method == "attribution_patching"
    denoise = result.direction != "noise"
    if denoise:
        lead = f"Restoring {what} from the clean run"
        verb = "recovers"
    else:
        lead = f"Patching corrupted {what} into the clean run"
        verb = "removes"
    if estimate:
        lead += f" ({estimate_words(result)})"
    gap = f"the clean-corrupted {metric} gap"
    if abs(v0) < threshold:
        out = [f"{lead}: no single cell {'is estimated to ' + verb[:-1] if estimate else verb} "
               f"{threshold * 100:.0f}% or more of {gap}; the largest is "
               f"{cell_words(result, c0)} at {amount_text(result, c0, v0, signed=True)} "
               f"({over}).", "The effect is spread out, or this component does not carry it."]
        return out + _estimate_sentences(result)
    if v0 > 0:
        first = (f"{lead}: {cell_words(result, c0)} {verb} {amount_text(result, c0, v0)} of "
                 f"{gap} ({over}{close}")
    else:
        first = (f"{lead}: {cell_words(result, c0)} has the largest effect, "
                 f"{amount_text(result, c0, v0, signed=True)} of {gap}, i.e. it pushes the "
                 f"wrong way ({over}{close}")
    out = [first]
    rest = [(c, v) for c, v in rest if abs(v) >= threshold]
    if rest:
        out.append("Next: " + ", ".join(
            f"{cell_words(result, c)} ({percent_text(result, c, v, signed=True)})"
            for c, v in rest) + ".")
    strong = int((finite.abs() >= threshold).sum())
    if n_cells > 1:
        out.append(f"{strong} of {n_cells} cells reach |effect| ≥ {threshold * 100:.0f}%"
                   + (" (estimated)." if estimate else "."))
    lowest = float(finite.min())
    if lowest <= -threshold and v0 > 0:
        coords, value = _argmin(result)
        out.append(f"The most negative, {cell_words(result, coords)}, moves it "
                   f"{amount_text(result, coords, value)} the other way.")
    return out + _estimate_sentences(result)


# -- attribution patching: estimates and the exact values verified beside them ------------------
def _extra(result: PatchingResult) -> dict[str, Any]:
    extra = getattr(result, "extra", None)
    return extra if isinstance(extra, dict) else {}


def estimate_words(result: PatchingResult) -> str:
    """``"AtP* estimates"`` / ``"AtP estimates"`` (first-order): what attribution patching's
    values are."""
    method = _extra(result).get("attribution_method")
    return "AtP* estimates" if method == "atp*" else "AtP estimates"


def verified_cells(result: PatchingResult) -> dict[tuple[int, ...], dict[str, float]]:
    """Cells whose exact value was computed (``extra["verified"]``: ``verify_top_k`` or
    screen-then-prove): coordinates -> ``{"estimate": e, "exact": x}``."""
    out: dict[tuple[int, ...], dict[str, float]] = {}
    for entry in _extra(result).get("verified") or []:
        if not isinstance(entry, dict):
            continue
        cell = entry.get("cell")
        if isinstance(cell, list) and all(isinstance(c, int) for c in cell):
            try:
                out[tuple(cell)] = {"estimate": float(entry["estimate"]),
                                    "exact": float(entry["exact"])}
            except (KeyError, TypeError, ValueError):
                continue
    return out


def percent_text(result: PatchingResult, coords: tuple[int, ...], value: float,
                 signed: bool = False) -> str:
    """A normalised value in percent; for attribution patching ``"estimated 65%"``, or
    ``"estimated 65%, exact 58%"`` where the cell was verified."""
    def pct(v: float) -> str:
        return f"{v * 100:+.0f}%" if signed else _pct(v)

    if result.method != "attribution_patching":
        return pct(value)
    checked = verified_cells(result).get(tuple(int(c) for c in coords))
    if checked is None:
        return f"estimated {pct(value)}"
    return f"estimated {pct(checked['estimate'])}, exact {pct(checked['exact'])}"


def amount_text(result: PatchingResult, coords: tuple[int, ...], value: float,
                signed: bool = False) -> str:
    """A normalised value in percent inside a sentence; for attribution patching ``"an
    estimated 65%"``, or ``"an estimated 65% (exact 58%)"`` where the cell was verified."""
    if result.method != "attribution_patching":
        return f"{value * 100:+.0f}%" if signed else _pct(value)
    checked = verified_cells(result).get(tuple(int(c) for c in coords))
    est = value if checked is None else checked["estimate"]
    text = f"an estimated {est * 100:+.0f}%" if signed else f"an estimated {_pct(est)}"
    if checked is None:
        return text
    exact = checked["exact"]
    return text + (f" (exact {exact * 100:+.0f}%)" if signed else f" (exact {_pct(exact)})")


def _estimate_sentences(result: PatchingResult) -> list[str]:
    if result.method != "attribution_patching":
        return []
    extra = _extra(result)
    checked = verified_cells(result)
    out = [f"These are {estimate_words(result)}, not patched values"
           + (f"; {len(checked)} cell{'s' if len(checked) != 1 else ''} were verified with the "
              "exact patching engine." if checked else
              "; verify them with verify_top_k= or verify=\"auto\".")]
    bound = extra.get("missed_bound")
    if isinstance(bound, dict) and "max_abs_effect" in bound:
        holds = "below" if bound.get("holds") else "NOT below"
        out.append(f"The unverified cells' random-subset check bounds what they hide at "
                   f"|effect| ≤ {float(bound['max_abs_effect']) * 100:.0f}%, {holds} the "
                   f"top-k threshold {float(bound.get('threshold', 0.0)) * 100:.0f}%.")
    return out


# -- ablation: kind, and the metric before and after ----------------------------------------------
def ablation_kind(result: PatchingResult) -> str:
    """The ablation kind (``"zero"``, ``"mean"``, ``"resample"``, ...) or ``""``."""
    kind = _extra(result).get("kind")
    return str(kind) if kind else ""


def _ablation_sentences(result: PatchingResult, top: list[tuple[tuple[int, ...], float]],
                        over: str, close: str) -> list[str]:
    kind = ablation_kind(result)
    metric = metric_words(result.metric)
    what = component_words(result.component)
    lead = f"{kind.capitalize()}-ablating {what}" if kind else f"Ablating {what}"
    base = getattr(result, "clean_metric", None)
    (c0, v0), rest = top[0], top[1:]
    if base is None:
        first = (f"{lead}: ablating {cell_words(result, c0)} changes the {metric} by {v0:+.3g} "
                 f"({over}{close}")
    else:
        first = (f"{lead}: ablating {cell_words(result, c0)} changes the {metric} from "
                 f"{base:.3g} to {base + v0:.3g} ({v0:+.3g}; {over}{close}")
    out = [first]
    if rest:
        out.append("Next: " + ", ".join(f"{cell_words(result, c)} ({v:+.3g})"
                                        for c, v in rest) + ".")
    return out


# -- causal tracing: ROME's indirect effect --------------------------------------------------------
def trace_component_words(result: PatchingResult) -> str:
    """``"the MLP output (window of 10 layers)"``: what causal tracing restores."""
    what = "the " + component_words(result.component)
    window = _extra(result).get("window")
    if result.component in ("mlp", "attn") and isinstance(window, int) and window > 1:
        what += f" (window of {window} layers)"
    return what


def subject_text(result: PatchingResult) -> str:
    """``"subject 'Eiffel Tower'"``, or ``"subject"`` when prompts have different subjects."""
    subjects = _extra(result).get("subjects")
    if isinstance(subjects, list) and len(subjects) == 1 and isinstance(subjects[0], str):
        return f"subject {subjects[0]!r}"
    return "subject"


def _trace_sentences(result: PatchingResult, top: list[tuple[tuple[int, ...], float]],
                     over: str, close: str) -> list[str]:
    lead = (f"Restoring {trace_component_words(result)} at one layer and position after "
            f"noising the {subject_text(result)}")
    (c0, v0), rest = top[0], top[1:]
    corrupted = getattr(result, "corrupted_metric", None)
    clean = getattr(result, "clean_metric", None)
    first = (f"{lead}: {cell_words(result, c0)} has the largest indirect effect, {v0:+.3g}")
    inner = ""
    if corrupted is not None:
        first += (f": p(answer) goes from {corrupted:.3g} (subject noised) to "
                  f"{corrupted + v0:.3g}")
        if clean is not None:
            inner = f"clean run {clean:.3g}; "
    out = [first + f" ({inner}{over}{close}"]
    if rest:
        out.append("Next: " + ", ".join(f"{cell_words(result, c)} ({v:+.3g})"
                                        for c, v in rest) + ".")
    return out


def _argmin(result: PatchingResult) -> tuple[tuple[int, ...], float]:
    flat = result.effect_matrix.flatten().clone()
    flat[flat.isnan()] = math.inf
    idx = int(flat.argmin())
    coords = []
    for size in reversed(result.shape):
        coords.append(idx % size)
        idx //= size
    coords_t = tuple(reversed(coords))
    return coords_t, float(result.effect_matrix[coords_t])


__all__ = ["AXIS_TITLES", "COMPONENT_WORDS", "ablation_kind", "amount_text", "axis_title",
           "baselines_text", "cell_words", "component_words", "estimate_words", "figure_title",
           "headline", "method_words", "metric_words", "n_pairs_of", "pairs_text", "path_words",
           "percent_text", "position_roles", "run_words", "short_model_name", "subject_text",
           "takeaway", "takeaway_sentences", "title_words", "trace_component_words",
           "value_heading", "verified_cells"]

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

import math
import re
from typing import TYPE_CHECKING

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
    first = f"{method_words(result.method)}: {component_words(result.component)}"
    parts = []
    model = short_model_name(getattr(result, "model_name", ""))
    if model:
        parts.append(model)
    parts.append(pairs_text(n_pairs_of(result)))
    metric = metric_words(result.metric)
    if result.method not in ("causal_tracing",):
        metric += f", {result.direction}"
    parts.append(metric)
    return first + "\n" + " · ".join(parts)


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
    largest values in the metric's unit.
    """
    finite = result.effect_matrix[~result.effect_matrix.isnan()]
    n_cells = int(result.effect_matrix.numel())
    n = n_pairs_of(result)
    over = f"mean of {pairs_text(n)}"
    what = component_words(result.component)
    metric = metric_words(result.metric)
    if finite.numel() == 0:
        return f"Every cell of this result is undefined (NaN); nothing to conclude ({over})."
    top = [(c, v) for c, v in result.top_cells(k) if math.isfinite(v)]
    if not result.normalized:
        if result.method == "ablation":
            lead = f"Ablating {what}"
            verb = "changes the"
        else:
            lead = f"{method_words(result.method)} of {what}"
            verb = "gives a"
        (c0, v0), rest = top[0], top[1:]
        text = f"{lead}: {cell_words(result, c0)} {verb} {metric} of {v0:+.3g} ({over}"
        agreement = _sign_agreement(result, c0, v0)
        text += f"; {agreement})." if agreement else ")."
        if rest:
            text += " Next: " + ", ".join(f"{cell_words(result, c)} ({v:+.3g})"
                                          for c, v in rest) + "."
        return text
    denoise = result.direction != "noise"
    if result.method == "causal_tracing":
        lead, verb = f"Restoring {what}", "recovers"
    elif denoise:
        lead = f"Restoring {what} from the clean run"
        verb = "recovers"
    else:
        lead = f"Patching corrupted {what} into the clean run"
        verb = "removes"
    gap = f"the clean-corrupted {metric} gap"
    (c0, v0), rest = top[0], top[1:]
    if abs(v0) < threshold:
        return (f"{lead}: no single cell {verb} {threshold * 100:.0f}% or more of {gap}; the "
                f"largest is {cell_words(result, c0)} at {v0 * 100:+.1f}% ({over}). The effect is "
                "spread out, or this component does not carry it.")
    if v0 > 0:
        text = f"{lead}: {cell_words(result, c0)} {verb} {_pct(v0)} of {gap} ({over}"
    else:
        text = (f"{lead}: {cell_words(result, c0)} has the largest effect, {v0 * 100:+.0f}% of "
                f"{gap}, i.e. it pushes the wrong way ({over}")
    agreement = _sign_agreement(result, c0, v0)
    text += f"; {agreement})." if agreement else ")."
    rest = [(c, v) for c, v in rest if abs(v) >= threshold]
    if rest:
        text += " Next: " + ", ".join(f"{cell_words(result, c)} ({v * 100:+.0f}%)"
                                      for c, v in rest) + "."
    strong = int((finite.abs() >= threshold).sum())
    if n_cells > 1:
        text += (f" {strong} of {n_cells} cells reach |effect| ≥ {threshold * 100:.0f}%.")
    lowest = float(finite.min())
    if lowest <= -threshold and v0 > 0:
        coords, value = _argmin(result)
        text += (f" The most negative, {cell_words(result, coords)}, moves it "
                 f"{_pct(value)} the other way.")
    return text


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


__all__ = ["AXIS_TITLES", "COMPONENT_WORDS", "axis_title", "cell_words", "component_words",
           "figure_title", "method_words", "metric_words", "n_pairs_of", "pairs_text",
           "position_roles", "short_model_name", "takeaway"]

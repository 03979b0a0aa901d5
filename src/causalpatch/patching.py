"""Activation patching sweeps: which layers, positions and heads carry a behaviour?

Run the model on a *clean* and a *corrupted* prompt, splice activations of one run into the
other, and measure with a metric how much of the behaviour moves.

* **Denoising** (default): patch clean activations into the corrupted run.
  ``base = corrupted``, ``source = clean``; an effect of 1.0 means the patch alone restores the
  clean behaviour.
* **Noising**: patch corrupted activations into the clean run. ``base = clean``,
  ``source = corrupted``; 1.0 means the patch alone fully breaks the behaviour.

In both, ``effect = (patched - base) / (source - base)`` (see :func:`causalpatch.metrics.normalize`).

Example::

    from causalpatch import InterpretableModel, activation_patching
    model = InterpretableModel("smollm2")
    result = activation_patching(
        model,
        "When Mary and John went to the store, John gave a drink to",
        "When Mary and John went to the store, Mary gave a drink to",
        component="resid_post", by_position=True,
        metric="logit_diff", correct=" Mary", incorrect=" John")
    result.effect_matrix.shape   # (30, 14): layer x position
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

import torch

from .engine import (Patch, PairRun, RunActivations, SitePatch, collect_sites,
                     fast_patched_logits, fast_supported, naive_patched_logits, run_pair)
from .errors import (InvalidArgumentError, InvalidTypeError, OutOfRangeError)
from .metrics import Metric, MetricInputs, get_metric, normalize
from .names import Site
from .tracing import Prompts, token_lists

if TYPE_CHECKING:
    from .model import InterpretableModel
    from .result import PatchingResult


class Direction(str, Enum):
    """Which run is patched into which."""

    DENOISE = "denoise"
    """Clean activations into the corrupted run (recovery; 1.0 = fully restored)."""
    NOISE = "noise"
    """Corrupted activations into the clean run (damage; 1.0 = fully broken)."""


#: Component names of a sweep -> (site kind, unit axis).
COMPONENTS: dict[str, tuple[str, str | None]] = {
    "resid_pre": ("resid_pre", None),
    "resid_mid": ("resid_mid", None),
    "resid_post": ("resid_post", None),
    "attn": ("attn", None),
    "mlp": ("mlp", None),
    "attn_head": ("attn.z", "head"),
    "attn_head_q": ("attn.q", "head"),
    "attn_head_k": ("attn.k", "head"),
    "attn_head_v": ("attn.v", "head"),
    "mlp_neuron": ("mlp.post", "neuron"),
}


@dataclass(frozen=True)
class Pair:
    """One clean/corrupted pair as token ids with its answer tokens."""

    clean: list[int]
    corrupted: list[int]
    correct: int | None
    incorrect: int | None


@dataclass(frozen=True)
class ComponentPlan:
    """What a sweep patches: for each result cell, the sites and entries."""

    component: str
    kind: str | None  # per-layer site kind, or None for one named site
    single_site: str | None
    unit_axis: str | None  # "head" | "neuron" | None
    layers: list[int]
    units: list[int] | None


# -- argument handling (all before any compute) -------------------------------------------------
def _direction(direction: str | Direction) -> Direction:
    try:
        return Direction(direction)
    except ValueError:
        raise InvalidArgumentError(
            f"unknown direction {direction!r}; expected 'denoise' (clean into corrupted) or "
            "'noise' (corrupted into clean)") from None


def _answer(model: InterpretableModel, value: Any, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = int(value.item()) if value.numel() == 1 else value.tolist()
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        try:
            return model.to_single_token(value)
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(f"{what}: {exc}") from None
    raise InvalidTypeError(f"{what} must be a token string like ' Paris' or a token id, got {value!r}")


def resolve_answers(model: InterpretableModel, metric_kwargs: Mapping[str, Any] | None,
                    correct: Any, incorrect: Any) -> tuple[Any, Any]:
    """Merge ``correct=``/``incorrect=`` with ``metric_kwargs`` (correct_token/incorrect_token)."""
    kwargs = dict(metric_kwargs or {})
    unknown = set(kwargs) - {"correct_token", "incorrect_token", "correct", "incorrect"}
    if unknown:
        raise InvalidArgumentError(
            f"unknown metric_kwargs {sorted(unknown)}; expected correct_token and incorrect_token")
    correct = correct if correct is not None else kwargs.get("correct_token", kwargs.get("correct"))
    incorrect = incorrect if incorrect is not None else kwargs.get(
        "incorrect_token", kwargs.get("incorrect"))
    return correct, incorrect


def make_pairs(model: InterpretableModel, clean: Any, corrupted: Any, correct: Any,
               incorrect: Any) -> list[Pair]:
    """Tokenise clean/corrupted (strings, ids, equal-length batches or a dataset) into pairs."""
    if hasattr(clean, "clean") and hasattr(clean, "corrupted") and corrupted is None:
        dataset = clean
        if len(dataset.clean) == 0:
            raise InvalidArgumentError("dataset has no pairs")
        clean, corrupted = dataset.clean, dataset.corrupted
        correct = correct if correct is not None else list(getattr(dataset, "correct", []) or [])
        incorrect = incorrect if incorrect is not None else list(
            getattr(dataset, "incorrect", []) or [])
        correct = correct or None
        incorrect = incorrect or None
    if corrupted is None:
        raise InvalidArgumentError(
            "corrupted is required: pass the corrupted prompt(s), or a dataset as `clean`")
    clean_rows = token_lists(model, clean, "clean")
    corrupted_rows = token_lists(model, corrupted, "corrupted")
    if len(clean_rows) != len(corrupted_rows):
        raise InvalidArgumentError(
            f"clean has {len(clean_rows)} prompts but corrupted has {len(corrupted_rows)}; they "
            "must pair up one to one")
    n = len(clean_rows)
    corrects = _per_pair(model, correct, n, "correct")
    incorrects = _per_pair(model, incorrect, n, "incorrect")
    pairs = []
    for i, (c, k) in enumerate(zip(clean_rows, corrupted_rows)):
        if len(c) != len(k):
            idx = f" (pair {i})" if n > 1 else ""
            raise InvalidArgumentError(
                f"clean and corrupted prompts{idx} have different token lengths: clean has "
                f"{len(c)} tokens, corrupted has {len(k)}. Patching needs aligned positions: "
                "choose prompts whose differing words are the same number of tokens (check with "
                "model.to_str_tokens); causalpatch does not align them silently")
        pairs.append(Pair(c, k, corrects[i], incorrects[i]))
    return pairs


def _per_pair(model: InterpretableModel, value: Any, n: int, what: str) -> list[int | None]:
    if isinstance(value, torch.Tensor) and value.numel() > 1:
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise InvalidArgumentError(f"{what} has {len(value)} answers for {n} prompt pairs")
        return [_answer(model, v, what) for v in value]
    token = _answer(model, value, what)
    return [token] * n


def _index_list(value: Any, what: str) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, range):
        value = list(value)
    if isinstance(value, torch.Tensor):
        value = value.flatten().tolist()
    if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise InvalidTypeError(f"{what} must be an int or a list of ints, got {value!r}")
    if not value:
        raise InvalidArgumentError(f"{what} is empty; pass None for all")
    return list(value)


def plan_component(model: InterpretableModel, component: str, layers: Any, heads: Any,
                   neurons: Any = None) -> ComponentPlan:
    """Validate ``component``/``layers``/``heads`` and describe the sweep's cells."""
    if not isinstance(component, str):
        raise InvalidTypeError(f"component must be a string, got {type(component).__name__}")
    layer_list = _index_list(layers, "layers")
    n_layers = model.n_layers
    single = None
    if component in COMPONENTS:
        kind, unit_axis = COMPONENTS[component]
    elif component in model.adapter.sites or component in model.adapter.aliases:
        kind = model.adapter.aliases.get(component, component)
        unit_axis = "head" if model.adapter.sites[kind].view.per_head else None
    else:
        try:
            site = model.site(component)
        except KeyError:
            raise InvalidArgumentError(
                f"unknown component {component!r}; expected one of {', '.join(COMPONENTS)}, a "
                "per-layer site kind (e.g. 'attn.in'), or a full site name such as "
                "'blocks.5.mlp'") from None
        single, kind = site.name, None
        unit_axis = "head" if site.per_head else None
        if layer_list is not None:
            raise InvalidArgumentError(
                f"layers={layer_list} cannot be combined with the single site {component!r}")
        layer_list = [site.layer if site.layer is not None else -1]
    if kind is not None:
        model.site(f"blocks.0.{kind}")  # errors clearly if the architecture lacks it
        if layer_list is None:
            layer_list = list(range(n_layers))
        for layer in layer_list:
            if not 0 <= layer < n_layers:
                raise OutOfRangeError(
                    f"layers contains {layer}, out of range: this model has {n_layers} layers, "
                    f"so layers must be in [0, {n_layers - 1}]")
        if len(set(layer_list)) != len(layer_list):
            raise InvalidArgumentError(f"layers has repeated entries: {layer_list}")
    units = None
    if unit_axis == "head":
        sample = model.site(single) if single else model.site(f"blocks.0.{kind}")
        n_units = sample.view.n_heads(model.dims)
        units = _index_list(heads, "heads") or list(range(n_units))
        for h in units:
            if not 0 <= h < n_units:
                raise OutOfRangeError(
                    f"heads contains {h}, out of range: {component!r} has {n_units} heads, so "
                    f"heads must be in [0, {n_units - 1}]")
    elif unit_axis == "neuron":
        units = _index_list(neurons, "neurons") or list(range(model.d_mlp))
        for u in units:
            if not 0 <= u < model.d_mlp:
                raise OutOfRangeError(
                    f"neurons contains {u}, out of range: d_mlp is {model.d_mlp}, so neurons "
                    f"must be in [0, {model.d_mlp - 1}]")
        if heads is not None:
            raise InvalidArgumentError("heads= is for per-head components; use neurons=")
    elif heads is not None:
        raise InvalidArgumentError(
            f"heads={heads!r} given but component {component!r} has no heads; use "
            "component='attn_head' (or attn_head_q/k/v)")
    return ComponentPlan(component, kind, single, unit_axis, layer_list, units)


def resolve_positions(positions: Any, by_position: bool, length: int) -> list[int] | None:
    """Validate ``positions`` against a prompt length; returns absolute indices or None (all)."""
    plist = _index_list(positions, "positions")
    if plist is None:
        return list(range(length)) if by_position else None
    out = []
    for p in plist:
        if not -length <= p < length:
            raise OutOfRangeError(
                f"positions contains {p}, out of range for prompts of {length} tokens: positions "
                f"must be in [{-length}, {length - 1}]")
        out.append(p % length)
    if by_position and len(set(out)) != len(out):
        raise InvalidArgumentError(
            f"positions {plist} repeat a position (as absolute indices {out}); with "
            "by_position=True each position is its own cell, so list each once")
    return out


def build_patches(model: InterpretableModel, plan: ComponentPlan, positions: list[int] | None,
                  by_position: bool, length: int) -> tuple[list[Patch], tuple[int, ...]]:
    """The patch of every cell, in row-major order of the result's axes, and the shape."""
    all_pos = tuple(range(length)) if positions is None else tuple(positions)
    pos_groups = [(p,) for p in all_pos] if by_position else [all_pos]
    unit_groups: list[tuple[int, ...] | None] = (
        [(u,) for u in plan.units] if plan.units is not None else [None])
    patches: list[Patch] = []
    for layer in plan.layers:
        site = model.site(plan.single_site) if plan.single_site else model.site(
            f"blocks.{layer}.{plan.kind}")
        for group in pos_groups:
            for units in unit_groups:
                patches.append((SitePatch(site, group, units),))
    shape: tuple[int, ...] = (len(plan.layers),)
    if by_position:
        shape += (len(pos_groups),)
    if plan.units is not None:
        shape += (len(plan.units),)
    return patches, shape


# -- running -----------------------------------------------------------------------------------
def run_sites(model: InterpretableModel, ids: list[int], sites: Sequence[Site]
              ) -> tuple[RunActivations, torch.Tensor]:
    """One forward pass: activations at ``sites`` (``[1, pos, ...]``) and last-position logits."""
    tr = model.trace([ids], cache=[s.name for s in sites]).run()
    return RunActivations(dict(tr.cache)), tr.last_logits[0].float()


def run_pair_or_sites(model: InterpretableModel, base_ids: list[int], source_ids: list[int],
                      sites: Sequence[Site], patches: Sequence[Patch], method: str) -> PairRun:
    """Base and source runs: shared-prefix :func:`engine.run_pair` for the fast engine, or two
    plain forward passes for the naive reference (whose context is then ``None``)."""
    if method == "fast" and fast_supported(patches):
        return run_pair(model, base_ids, source_ids, sites)
    base, base_last = run_sites(model, base_ids, sites)
    source, source_last = run_sites(model, source_ids, sites)
    ids = torch.tensor([base_ids], dtype=torch.long, device=model.device)
    return PairRun(ids, base, source, base_last, source_last, None)


def patched_logits(model: InterpretableModel, base_ids: list[int], patches: Sequence[Patch],
                   base: RunActivations, source: RunActivations, base_last: torch.Tensor,
                   method: str = "fast", batch_size: int | None = None,
                   memory_mb: float = 1024.0,
                   progress: Callable[[int], None] | None = None,
                   prepared: Any = None, stats: dict[str, int] | None = None) -> torch.Tensor:
    """Dispatch to the fast engine or the naive reference; ``[n_patches, vocab]`` logits.

    ``prepared`` is the base run's staircase context from :func:`engine.run_pair`.
    """
    ids = torch.tensor([base_ids], dtype=torch.long, device=model.device)
    if method == "naive" or not fast_supported(patches):
        return naive_patched_logits(model, ids, patches, source, progress)
    return fast_patched_logits(model, ids, patches, base, source, base_last, batch_size,
                               memory_mb, progress, prepared, stats)


def _check_method(method: str, batch_size: int | None) -> None:
    if method not in ("fast", "naive"):
        raise InvalidArgumentError(
            f"unknown method {method!r}; expected 'fast' (default) or 'naive' (one forward per "
            "patch, the reference)")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise InvalidArgumentError(
            f"batch_size must be a positive int or None (automatic), got {batch_size!r}")


def activation_patching(
    model: InterpretableModel,
    clean: Prompts | Any,
    corrupted: Prompts | None = None,
    component: str = "resid_post",
    metric: str | Metric | Callable[..., Any] | None = None,
    metric_kwargs: Mapping[str, Any] | None = None,
    *,
    correct: Any = None,
    incorrect: Any = None,
    layers: Sequence[int] | int | None = None,
    heads: Sequence[int] | int | None = None,
    neurons: Sequence[int] | int | None = None,
    positions: Sequence[int] | int | None = None,
    by_position: bool = False,
    direction: str | Direction = "denoise",
    method: str = "fast",
    batch_size: int | None = None,
    memory_mb: float = 1024.0,
    normalize_effects: bool = True,
    normalize: bool | None = None,
    checkpoint: str | None = None,
    progress: bool | Callable[[int, int], None] = False,
) -> PatchingResult:
    """Patch every layer (x position x head) and measure the effect on a metric.

    Args:
        model: the :class:`InterpretableModel`.
        clean: clean prompt(s): a string, token ids, an equal-length list, or a dataset
            (anything with ``.clean``, ``.corrupted``, ``.correct``, ``.incorrect``).
        corrupted: corrupted prompt(s), same token lengths as ``clean``.
        component: ``resid_pre | resid_mid | resid_post | attn | mlp | attn_head |
            attn_head_q | attn_head_k | attn_head_v | mlp_neuron``, a per-layer site kind, or
            one full site name (``"blocks.5.mlp"``).
        metric: ``logit_diff | logit | prob | logprob | ce_diff | l2 | mse | cosine | kl`` or
            a callable ``(logits [batch, vocab]) -> [batch]``. Default: the dataset's metric,
            else ``logit_diff``.
        metric_kwargs / correct / incorrect: answer tokens (strings must be single tokens).
        layers, heads, neurons: subsets (default all).
        positions: patch only these positions (jointly, or one cell each with ``by_position``).
        by_position: a separate patch per position (adds a position axis).
        direction: ``"denoise"`` or ``"noise"``.
        method: ``"fast"`` (exact staircase engine) or ``"naive"`` (one forward per patch).
        batch_size: patch rows per engine pass (default: from ``memory_mb``).
        normalize: False returns raw patched metric values instead of effects.
        checkpoint: a file path: finished pairs/cells are saved there and a rerun resumes.
        progress: True for a progress bar, or a callback ``(done, total)``.

    Returns:
        :class:`PatchingResult` with ``effect_matrix`` of shape ``(n_layers,)``,
        ``(n_layers, n_heads)``, ``(n_layers, n_positions)`` or
        ``(n_layers, n_positions, n_heads)``.
    """
    from .sweep import run_sweep

    do_normalize = normalize_effects if normalize is None else bool(normalize)
    return run_sweep(model, clean, corrupted, component=component, metric=metric,
                     metric_kwargs=metric_kwargs, correct=correct, incorrect=incorrect,
                     layers=layers, heads=heads, neurons=neurons, positions=positions,
                     by_position=by_position, direction=direction, method=method,
                     batch_size=batch_size, memory_mb=memory_mb, normalize=do_normalize,
                     checkpoint=checkpoint, progress=progress)


class CausalTrace:
    """Several patches applied together, measured once.

    Example::

        with model.causal_trace(clean, corrupted) as ct:
            ct.patch("blocks.5.mlp")
            ct.patch("layers.9.self_attn", positions=[-1])
            effect = ct.metric("logit_diff", correct_token=" Mary", incorrect_token=" John")

    ``metric`` returns the normalised effect ``(patched - base) / (source - base)`` (denoising:
    the fraction of the clean behaviour restored).
    """

    def __init__(self, model: InterpretableModel, clean: Prompts, corrupted: Prompts,
                 direction: str | Direction = "denoise") -> None:
        self.model = model
        self.direction = _direction(direction)
        self.pairs = make_pairs(model, clean, corrupted, None, None)
        self._patches: list[tuple[Site, list[int] | None, list[int] | None]] = []

    def __enter__(self) -> CausalTrace:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def patch(self, name: str, positions: Sequence[int] | int | None = None,
              heads: Sequence[int] | int | None = None) -> CausalTrace:
        """Register a site to patch (all positions unless ``positions``)."""
        site = self.model.site(name)
        length = min(len(p.clean) for p in self.pairs)
        pos = resolve_positions(positions, False, length)
        head_list = _index_list(heads, "heads")
        if head_list is not None:
            if not site.per_head:
                raise InvalidArgumentError(f"heads given for {name!r}, which has no heads")
            n = site.view.n_heads(self.model.dims)
            bad = [h for h in head_list if not 0 <= h < n]
            if bad:
                raise OutOfRangeError(f"heads {bad} out of range for {name!r}: [0, {n - 1}]")
        self._patches.append((site, pos, head_list))
        return self

    def metric(self, metric: str | Metric | Callable[..., Any] = "l2", **metric_kwargs: Any
               ) -> float:
        """Run all registered patches at once; the mean normalised effect over pairs."""
        if not self._patches:
            raise InvalidArgumentError("no patches registered: call ct.patch(name) first")
        m = get_metric(metric)
        correct, incorrect = resolve_answers(self.model, metric_kwargs, None, None)
        effects = []
        for pair in self.pairs:
            c = _answer(self.model, correct, "correct")
            k = _answer(self.model, incorrect, "incorrect")
            base_ids, src_ids = ((pair.corrupted, pair.clean) if self.direction is
                                 Direction.DENOISE else (pair.clean, pair.corrupted))
            sites = [s for s, _, _ in self._patches]
            patch = tuple(SitePatch(s, tuple(range(len(base_ids)) if pos is None else pos),
                                    None if heads is None else tuple(heads))
                          for s, pos, heads in self._patches)
            run = run_pair_or_sites(self.model, base_ids, src_ids, sites, [patch], "fast")
            base_last, source_last = run.base_last, run.source_last
            logits = patched_logits(self.model, base_ids, [patch], run.base, run.source,
                                    base_last, prepared=run.prepared)
            inputs = _inputs(m, c, k, source_last)
            values = m(torch.stack([logits[0], base_last, source_last]), inputs.expand(3))
            effects.append(float(normalize(values[:1], values[1], values[2], m.name)[0]))
        return sum(effects) / len(effects)


def _inputs(metric: Metric, correct: int | None, incorrect: int | None,
            source_last: torch.Tensor) -> MetricInputs:
    for need, value in (("correct", correct), ("incorrect", incorrect)):
        if need in metric.needs and value is None:
            raise InvalidArgumentError(
                f"metric {metric.name!r} needs {need} answer tokens: pass {need}=' Mary' (a "
                f"single token) or metric_kwargs={{'{need}_token': id}}")
    return MetricInputs(
        target_logits=source_last.unsqueeze(0),
        correct=None if correct is None else torch.tensor([correct]),
        incorrect=None if incorrect is None else torch.tensor([incorrect]),
    )

"""Plans: what a method computes, validated before any forward pass.

* :class:`Pair` / :func:`make_pairs` — clean/corrupted prompts (or a dataset) as token ids with
  their answer tokens; a dataset's answers are used unless answers are given explicitly.
* :class:`ComponentPlan` / :func:`plan_component` — which sites, layers and units (heads,
  neurons) a sweep covers, and the result's axes.
* :func:`resolve_positions` — positions resolved against *each pair's own* length (negative
  positions count from that pair's end).
* :class:`SitePatch` / :func:`build_patches` — the patch of every result cell.

Every function here raises a specific error (argument, value, fix) and touches no model weights.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .enums import Engine, parse
from .errors import InvalidArgumentError, InvalidTypeError, OutOfRangeError, UnknownComponentError
from .hooks import read_only_error
from .metrics import (DEFAULT_METRIC, DEFAULT_METRIC_WITHOUT_ANSWERS, Metric, MetricInputs,
                      get_metric)
from .names import ALIASES, Site, canonical_kind, site_kinds
from .tokens import token_lists

if TYPE_CHECKING:
    from .model import HookedModel

#: The sweep words users pass as ``component=`` (besides any per-layer site kind).
SWEEP_COMPONENTS = ("resid_pre", "resid_mid", "resid_post", "attn", "mlp", "attn_head",
                    "attn_head_q", "attn_head_k", "attn_head_v", "mlp_neuron")


# -- small argument checks ---------------------------------------------------------------------
def index_list(value: Any, what: str) -> list[int] | None:
    """``None`` (all), an int, a range, a tensor or a list of ints -> a list of ints."""
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


def engine_choice(engine: str | Engine, method: str | None = None) -> Engine:
    """``engine=`` (or its deprecated spelling ``method=``) as an :class:`Engine`."""
    if method is not None:
        warnings.warn("method= is deprecated for the execution strategy; use engine='fast' or "
                      "engine='naive' (`method` names the algorithm)", DeprecationWarning,
                      stacklevel=3)
        engine = method
    return parse(Engine, engine, "engine")


def check_int(value: Any, what: str, minimum: int, allow_none: bool = False) -> None:
    """``value`` is an int ``>= minimum`` (or ``None`` when allowed)."""
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidTypeError(f"{what} must be an int, got {value!r}")
    if value < minimum:
        raise InvalidArgumentError(f"{what} must be >= {minimum}, got {value}")


def check_index(value: Any, size: int, what: str, noun: str) -> int:
    """``value`` (an int or a one-element tensor) as an index into ``size`` ``noun``.

    Raises:
        InvalidTypeError: not an int.
        OutOfRangeError: outside ``[0, size - 1]`` (the message names ``what`` and the range).
    """
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = int(value.item())
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidTypeError(f"{what} must be an int, got {value!r}")
    if not 0 <= value < size:
        raise OutOfRangeError(
            f"{what} {value} is out of range: this model has {size} {noun}, so {noun} must be "
            f"in [0, {size - 1}]")
    return value


# -- answers and pairs -------------------------------------------------------------------------
@dataclass(frozen=True)
class Pair:
    """One clean/corrupted pair as token ids with its answer tokens."""

    clean: list[int]
    corrupted: list[int]
    correct: int | None
    incorrect: int | None

    def runs(self, denoise: bool) -> tuple[list[int], list[int]]:
        """``(base, source)`` token ids: denoising patches clean into corrupted."""
        return (self.corrupted, self.clean) if denoise else (self.clean, self.corrupted)


def answer_token(model: HookedModel, value: Any, what: str) -> int | None:
    """A single answer token id from a string (``" Paris"``), an id or a 1-element tensor."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = int(value.item()) if value.numel() == 1 else value.tolist()
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        try:
            return model.to_single_token(value)
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(f"{what}: {exc}") from None
    raise InvalidTypeError(
        f"{what} must be a single-token string like ' Paris' or a token id, got {value!r}")


def answer_tokens(model: HookedModel, value: Any, n: int, what: str) -> list[int | None]:
    """One answer per prompt: a single answer repeated, or a list of ``n`` answers."""
    if isinstance(value, torch.Tensor) and value.numel() > 1:
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise InvalidArgumentError(
                f"{what} has {len(value)} answers for {n} prompts: give one answer, or one per "
                "prompt")
        return [answer_token(model, v, what) for v in value]
    token = answer_token(model, value, what)
    return [token] * n


def resolve_answers(metric_kwargs: Mapping[str, Any] | None, correct: Any, incorrect: Any
                    ) -> tuple[Any, Any]:
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


def is_dataset(obj: Any) -> bool:
    """A dataset: anything with ``.clean`` and ``.corrupted`` prompt lists."""
    return (not isinstance(obj, (str, list, tuple, torch.Tensor)) and hasattr(obj, "clean")
            and hasattr(obj, "corrupted"))


def choose_metric(metric: Any, pairs: Sequence[Pair], dataset: Any = None) -> Metric:
    """The metric of every entry point: the one given, else the dataset's (``.metric``), else
    ``logit_diff`` when every pair has both answer tokens, else ``l2``."""
    if metric is None and dataset is not None and is_dataset(dataset):
        metric = getattr(dataset, "metric", None)
    if metric is None:
        answered = all(p.correct is not None and p.incorrect is not None for p in pairs)
        metric = DEFAULT_METRIC if answered else DEFAULT_METRIC_WITHOUT_ANSWERS
    return get_metric(metric)


def make_pairs(model: HookedModel, clean: Any, corrupted: Any, correct: Any = None,
               incorrect: Any = None) -> list[Pair]:
    """Tokenise clean/corrupted (strings, ids, equal-length lists or a dataset) into pairs.

    A dataset's ``correct``/``incorrect`` answers are used unless answers are given here.
    """
    if corrupted is None and is_dataset(clean):
        dataset = clean
        if len(dataset.clean) == 0:
            raise InvalidArgumentError("dataset has no pairs")
        clean, corrupted = dataset.clean, dataset.corrupted
        if correct is None:
            correct = list(getattr(dataset, "correct", []) or []) or None
        if incorrect is None:
            incorrect = list(getattr(dataset, "incorrect", []) or []) or None
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
    corrects = answer_tokens(model, correct, n, "correct")
    incorrects = answer_tokens(model, incorrect, n, "incorrect")
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


def metric_inputs(metric: Metric, correct: Sequence[int | None], incorrect: Sequence[int | None],
                  target_logits: torch.Tensor | None) -> MetricInputs:
    """Metric inputs for rows with these answers; errors if the metric needs a missing one.

    Args:
        correct, incorrect: one answer per row (``None`` where absent).
        target_logits: ``[rows, vocab]`` the source logits (distance metrics), or ``None``.
    """
    for need, values in (("correct", correct), ("incorrect", incorrect)):
        if need in metric.needs and any(v is None for v in values):
            raise InvalidArgumentError(
                f"metric {metric.name!r} needs {need} answer tokens: pass {need}=' Mary' (a "
                f"single token) or metric_kwargs={{'{need}_token': id}}")
    have = lambda values: None if any(v is None for v in values) else torch.tensor(  # noqa: E731
        list(values), dtype=torch.long)
    return MetricInputs(target_logits=target_logits, correct=have(correct),
                        incorrect=have(incorrect))


def check_answers(metric: Metric, pairs: Sequence[Pair]) -> None:
    """Every pair has the answer tokens ``metric`` needs (before any compute)."""
    metric_inputs(metric, [p.correct for p in pairs], [p.incorrect for p in pairs], None)


# -- components --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ComponentPlan:
    """What a sweep patches: the site of every layer and the units of each site.

    Attributes:
        component: what the user asked for.
        kind: per-layer site kind (``"attn.z"``), or ``None`` for one named site.
        single_site: the one named site (``"blocks.5.mlp"``), or ``None``.
        unit_axis: ``"head"``, ``"neuron"`` or ``None`` (the whole vector).
        layers: layer indices of the result's layer axis.
        units: head or neuron indices, or ``None``.
        sites: the site of each entry of ``layers`` (one for a single named site).
    """

    component: str
    kind: str | None
    single_site: str | None
    unit_axis: str | None
    layers: list[int]
    units: list[int] | None
    sites: tuple[Site, ...]


def _unknown_component(model: HookedModel, component: str) -> UnknownComponentError:
    words = list(dict.fromkeys([*SWEEP_COMPONENTS, *site_kinds(model.adapter, model.config),
                                *ALIASES]))
    close = difflib.get_close_matches(component, words, n=3, cutoff=0.6)
    try:
        model.site(component)
    except UnknownComponentError as exc:
        close += [c for c in difflib.get_close_matches(
            component, model.component_names(), n=3, cutoff=0.6) if c not in close]
        del exc
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return UnknownComponentError(
        f"unknown component {component!r}.{hint} Expected one of {', '.join(SWEEP_COMPONENTS)}, "
        "a per-layer site kind (e.g. 'attn.in'), or a full site name such as 'blocks.5.mlp'")


def plan_component(model: HookedModel, component: str, layers: Any = None, heads: Any = None,
                   neurons: Any = None) -> ComponentPlan:
    """Validate ``component``/``layers``/``heads``/``neurons`` and describe the sweep's cells.

    ``layers`` may hold negative indices (``-1`` = the last layer).

    Raises:
        UnknownComponentError: ``component`` names nothing (with close matches).
        OutOfRangeError / InvalidArgumentError / InvalidTypeError: bad subsets.
    """
    if not isinstance(component, str):
        raise InvalidTypeError(f"component must be a string, got {type(component).__name__}")
    layer_list = index_list(layers, "layers")
    n_layers = model.n_layers
    kind: str | None = canonical_kind(component)
    single = None
    if kind in site_kinds(model.adapter):  # every kind of the family, even if unsupported
        sample = model.layer_site(kind, 0)  # explains why a kind is undefined for this config
        unit_axis = "neuron" if component == "mlp_neuron" else (
            "head" if sample.per_head else None)
        if layer_list is None:
            layer_list = list(range(n_layers))
        resolved = []
        for layer in layer_list:
            if not -n_layers <= layer < n_layers:
                raise OutOfRangeError(
                    f"layers contains {layer}, out of range: this model has {n_layers} layers, "
                    f"so layers must be in [{-n_layers}, {n_layers - 1}]")
            resolved.append(layer % n_layers)
        if len(set(resolved)) != len(resolved):
            raise InvalidArgumentError(f"layers has repeated entries: {layer_list}")
        layer_list = resolved
        sites = tuple(model.layer_site(kind, layer) for layer in layer_list)
    else:
        try:
            sample = model.site(component)
        except UnknownComponentError:
            raise _unknown_component(model, component) from None
        if layer_list is not None:
            raise InvalidArgumentError(
                f"layers={layer_list} cannot be combined with the single site {component!r}; "
                "pass a per-layer kind such as component='mlp' with layers=...")
        single, kind = sample.name, None
        unit_axis = "head" if sample.per_head else None
        layer_list = [sample.layer if sample.layer is not None else -1]
        sites = (sample,)
    if any(site.hook == "pattern" for site in sites):  # refused before any forward
        raise read_only_error(component)
    units = None
    if unit_axis == "head":
        n_units = sample.view.n_heads(model.dims)
        units = index_list(heads, "heads") or list(range(n_units))
        for h in units:
            if not 0 <= h < n_units:
                raise OutOfRangeError(
                    f"heads contains {h}, out of range: {component!r} has {n_units} heads, so "
                    f"heads must be in [0, {n_units - 1}]")
        if neurons is not None:
            raise InvalidArgumentError("neurons= is for component='mlp_neuron'; use heads=")
    elif unit_axis == "neuron":
        units = index_list(neurons, "neurons") or list(range(model.d_mlp))
        for u in units:
            if not 0 <= u < model.d_mlp:
                raise OutOfRangeError(
                    f"neurons contains {u}, out of range: d_mlp is {model.d_mlp}, so neurons "
                    f"must be in [0, {model.d_mlp - 1}]")
        if heads is not None:
            raise InvalidArgumentError("heads= is for per-head components; use neurons=")
    else:
        if heads is not None:
            raise InvalidArgumentError(
                f"heads={heads!r} given but component {component!r} has no heads; use "
                "component='attn_head' (or attn_head_q/k/v)")
        if neurons is not None:
            raise InvalidArgumentError(
                f"neurons={neurons!r} given but component {component!r} has no neuron axis; "
                "use component='mlp_neuron'")
    return ComponentPlan(component, kind, single, unit_axis, layer_list, units, sites)


# -- positions ---------------------------------------------------------------------------------
def resolve_positions(positions: Any, by_position: bool, length: int) -> list[int] | None:
    """Positions as absolute indices into a prompt of ``length`` tokens (``None``: all).

    Call it once per pair: ``-1`` is each pair's own last token.
    """
    plist = index_list(positions, "positions")
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


def pair_positions(pairs: Sequence[Pair], positions: Any, by_position: bool
                   ) -> list[list[int] | None]:
    """:func:`resolve_positions` for every pair; ``by_position`` needs one common length."""
    lengths = sorted({len(p.clean) for p in pairs})
    if by_position and len(lengths) > 1:
        raise InvalidArgumentError(
            f"by_position=True needs all pairs to have the same token length, got lengths "
            f"{lengths}; group pairs by length or use by_position=False")
    return [resolve_positions(positions, by_position, len(p.clean)) for p in pairs]


# -- patches -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SitePatch:
    """Entries of one site to take from the source run (or to set to given values).

    Attributes:
        site: where.
        positions: absolute token positions (non-negative).
        units: head (per-head sites) or neuron indices, or ``None`` for the whole vector.
        values: optional replacement values carried by the patch itself, one per entry in
            :meth:`entries` order, stacked: ``[n_entries, *entry_shape]`` (an entry is
            ``act[pos]`` or ``act[pos, unit]``). ``None`` (the default) takes the source run's
            values. A sweep whose rows each need their own vector at a site (e.g. an SAE
            feature patch: ``x_base + decode(f') - decode(f_base)``) passes them here, and the
            engines use them exactly as they use source values (no-op entries are skipped).
        frozen: hold the entries at the *base* run's values (or at ``values``) against the
            row's other changes: written in every row whatever they equal, never making a row
            live by themselves (a patch of frozen entries alone is the base run). E.g. causal
            tracing's severed restorations keep later MLP outputs at their corrupted values.
    """

    site: Site
    positions: tuple[int, ...]
    units: tuple[int, ...] | None = None
    values: torch.Tensor | None = field(default=None, compare=False, repr=False)
    frozen: bool = False

    def __post_init__(self) -> None:
        if self.values is not None:
            n = len(self.positions) * (len(self.units) if self.units is not None else 1)
            if not isinstance(self.values, torch.Tensor) or self.values.shape[0] != n:
                got = (tuple(self.values.shape) if isinstance(self.values, torch.Tensor)
                       else type(self.values).__name__)
                raise InvalidArgumentError(
                    f"SitePatch values must stack one value per entry ({n} entries at "
                    f"{self.site.name}), got {got}")

    def entries(self) -> list[tuple[int, int | None]]:
        units: Sequence[int | None] = self.units if self.units is not None else (None,)
        return [(p, u) for p in self.positions for u in units]


Patch = tuple[SitePatch, ...]
"""One row of a sweep: several site patches applied together."""


def build_patches(plan: ComponentPlan, positions: list[int] | None, by_position: bool,
                  length: int) -> list[Patch]:
    """The patch of every cell, in row-major order of the result's axes."""
    all_pos = tuple(range(length)) if positions is None else tuple(positions)
    pos_groups = [(p,) for p in all_pos] if by_position else [all_pos]
    unit_groups: list[tuple[int, ...] | None] = (
        [(u,) for u in plan.units] if plan.units is not None else [None])
    return [(SitePatch(site, group, units),)
            for site in plan.sites for group in pos_groups for units in unit_groups]


def result_axes(model: HookedModel, plan: ComponentPlan, positions: list[int] | None,
                by_position: bool, tokens: Sequence[int]
                ) -> tuple[tuple[str, ...], dict[str, list[Any]], tuple[int, ...]]:
    """Axes, labels and shape of a sweep's result.

    A single named site without positions or units gives the 1-element axis ``("site",)``.
    """
    axes: tuple[str, ...] = ()
    labels: dict[str, list[Any]] = {}
    shape: tuple[int, ...] = ()
    if plan.single_site is None:
        axes, labels["layer"], shape = ("layer",), list(plan.layers), (len(plan.layers),)
    if by_position:
        assert positions is not None
        toks = model.to_str_tokens(list(tokens))
        axes += ("position",)
        labels["position"] = [f"{p}: {toks[p]!r}" for p in positions]
        shape += (len(positions),)
    if plan.unit_axis is not None:
        axes += (plan.unit_axis,)
        labels[plan.unit_axis] = list(plan.units or [])
        shape += (len(plan.units or []),)
    if not axes:
        axes, labels, shape = ("site",), {"site": [plan.single_site]}, (1,)
    return axes, labels, shape

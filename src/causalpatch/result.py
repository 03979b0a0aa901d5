"""``PatchingResult``: the effect matrix of a sweep with its labels and metadata.

Every method (activation, attribution and path patching, ablations, causal tracing) returns
one. Axes are named (``layer``, ``position``, ``head``, ``neuron``; ``site`` for a single named
site); ``labels[axis]`` holds the tick labels: layer indices (possibly a subset), head and neuron
indices, and ``"5: ' John'"`` (token position and token string) for positions.

Example::

    result.top_components(3)      # [((23, 3), 0.58), ((29, 1), 0.27), ...] for (layer, head)
    result.important(0.1)         # every cell with |effect| >= 0.1, largest first
    print(result.summary()); print(result.takeaway())
    result.to_json("ioi.json"); PatchingResult.from_json("ioi.json")
    result.to_dataframe()         # one row per cell
    result.plot().save("heads.pdf")   # matplotlib Figure sized for a paper column
    result.save("heads.png")      # or .svg/.pdf/.json/.md/.html
    write_report(["heads.json", "resid.json"], "report.html")

Optional metadata in ``extra`` that the renderers use (see docs/reports.md):

* ``extra["answer_text"]``: ``[[correct, incorrect], ...]`` per pair, the decoded answer tokens
  (strings or None), so a report rebuilt from JSON shows answers as text.
* ``extra["position_roles"]``: ``[[role, ...], ...]`` per pair, one role per token of the clean
  prompt (``""`` for none), e.g. IOI's ``IO``, ``S1``, ``S2``, ``END``. When every pair agrees on
  the role of every position of the position axis, the axis shows roles
  (:meth:`PatchingResult.position_roles`); otherwise it says "tokens of pair 0".

Rendering lives in :mod:`causalpatch.render` (Markdown, matplotlib, the HTML report); the
methods here delegate to it.

Saved JSON files carry a format name, a version and a sha256 checksum of the payload; loading
checks all three and every field, and raises :class:`~causalpatch.errors.CorruptResultError` for
a truncated, hand-edited or otherwise invalid file. Files are parsed as data only (``json``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ._io import atomic_write_text
from .errors import (
    CausalPatchError,
    CorruptResultError,
    InvalidArgumentError,
    InvalidTypeError,
    NonFiniteError,
    NormalizationError,
)
from .metrics import CI_N_BOOT, CI_SEED, bootstrap_interval
from .render.html import PLOTLY_MODES, compact_html, report
from .render.markdown import timing_name
from .render.markdown import to_markdown as render_markdown
from .render.plots import plot_result
from .render.text import baselines_text as render_baselines
from .render.text import takeaway as render_takeaway
from .render.text import title_words as render_title

if TYPE_CHECKING:
    from .render.figure import ResultFigure

FORMAT = "causalpatch-result"
"""Value of the ``format`` field of a saved result."""
VERSION = 1
"""Version of the saved-result format this causalpatch writes and reads."""
AXES = ("layer", "position", "head", "neuron")
"""The usual axis names, in their usual order (``site`` names a single named site)."""
SAVE_SUFFIXES = (".png", ".svg", ".pdf", ".json", ".md", ".html", ".htm")
"""File suffixes :meth:`PatchingResult.save` understands."""

_TENSORS = ("effect_matrix", "per_pair", "std")
_REQUIRED = ("effect_matrix", "axes", "labels", "component", "metric")
_STRINGS = ("component", "metric", "direction", "method", "model_name")


@dataclass(eq=False)
class PatchingResult:
    """Result of a patching sweep.

    Attributes:
        effect_matrix: float32 tensor (CPU), one dimension per entry of ``axes``.
        axes: axis names, e.g. ``("layer",)``, ``("layer", "head")``, ``("layer", "position")``
            or ``("layer", "position", "head")``.
        labels: axis name -> tick labels, one per entry of that axis. Layer, head and neuron
            labels are ints (the actual indices; layers may be a subset), position labels are
            strings like ``"5: ' John'"``. Axes without labels get ``0..n-1``.
        component, metric, direction, method: what was measured and how.
        model_name: the model's name.
        clean_prompts, corrupted_prompts: the prompt pairs (text).
        clean_tokens: token strings per clean prompt (at least the first).
        clean_metric, corrupted_metric: the metric on the unpatched runs (mean over pairs).
        normalized: True when ``effect = (patched - base) / (source - base)``.
        per_pair: ``[n_pairs, *effect_matrix.shape]`` per-pair effects, or None.
        std: standard deviation over pairs (same shape as ``effect_matrix``), or None.
        timings: seconds spent, by phase.
        extra: method-specific metadata. It must hold only JSON values (dicts with string
            keys, lists, strings, finite numbers, booleans, None) to survive a JSON round trip
            unchanged; ``extra["positions"]``, when present, lists the token position of each
            entry of the position axis; ``extra["answer_text"]`` and
            ``extra["position_roles"]`` (module docstring) give answers as text and roles.

    Two results are equal (``==``) when every field is equal, tensors included.
    """

    effect_matrix: torch.Tensor
    axes: tuple[str, ...]
    labels: dict[str, list[Any]]
    component: str
    metric: str
    direction: str = "denoise"
    method: str = "activation_patching"
    model_name: str = ""
    clean_prompts: list[str] = field(default_factory=list)
    corrupted_prompts: list[str] = field(default_factory=list)
    clean_tokens: list[list[str]] = field(default_factory=list)
    clean_metric: float | None = None
    corrupted_metric: float | None = None
    normalized: bool = True
    per_pair: torch.Tensor | None = None
    std: torch.Tensor | None = None
    timings: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.axes, str) or not isinstance(self.axes, Iterable):
            raise InvalidTypeError(
                f"axes must be a tuple of axis names like ('layer', 'head'), got {self.axes!r}")
        self.axes = tuple(self.axes)
        if not self.axes:
            raise InvalidArgumentError(
                "axes is empty: a result has at least one axis (('site',) for one named site)")
        for axis in self.axes:
            if not isinstance(axis, str) or not axis:
                raise InvalidTypeError(f"axis names must be non-empty strings, got {axis!r}")
        if len(set(self.axes)) != len(self.axes):
            raise InvalidArgumentError(f"axes {self.axes} name an axis twice")
        self.effect_matrix = _float_tensor("effect_matrix", self.effect_matrix)
        shape = self.shape
        if len(shape) != len(self.axes):
            raise InvalidArgumentError(
                f"effect_matrix has {len(shape)} dimensions (shape {shape}) but axes are "
                f"{self.axes}")
        if 0 in shape:
            raise InvalidArgumentError(f"effect_matrix is empty (shape {shape})")
        if not isinstance(self.labels, Mapping):
            raise InvalidTypeError(
                f"labels must be a dict axis -> list of labels, got {type(self.labels).__name__}")
        labels: dict[str, list[Any]] = {}
        for axis, values in self.labels.items():
            if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
                raise InvalidTypeError(
                    f"labels[{axis!r}] must be a list of labels, got {values!r}")
            labels[axis] = list(values)
        for axis, size in zip(self.axes, shape):
            if axis not in labels:
                labels[axis] = list(range(size))
            elif len(labels[axis]) != size:
                raise InvalidArgumentError(
                    f"axis {axis!r} has {size} entries but {len(labels[axis])} labels")
        self.labels = labels
        if self.per_pair is not None:
            self.per_pair = _float_tensor("per_pair", self.per_pair)
            if self.per_pair.dim() != len(shape) + 1 or tuple(self.per_pair.shape[1:]) != shape:
                raise InvalidArgumentError(
                    f"per_pair has shape {tuple(self.per_pair.shape)}, expected "
                    f"(n_pairs, {', '.join(map(str, shape))})")
        if self.std is not None:
            self.std = _float_tensor("std", self.std)
            if tuple(self.std.shape) != shape:
                raise InvalidArgumentError(
                    f"std has shape {tuple(self.std.shape)}, expected {shape} like effect_matrix")
        for name in ("clean_metric", "corrupted_metric"):
            value = getattr(self, name)
            if value is not None:
                try:
                    setattr(self, name, float(value))
                except (TypeError, ValueError):
                    raise InvalidTypeError(
                        f"{name} must be a number or None, got {value!r}") from None
        for name in _STRINGS:
            if not isinstance(getattr(self, name), str):
                raise InvalidTypeError(f"{name} must be a string, got {getattr(self, name)!r}")
        self.clean_prompts = list(self.clean_prompts)
        self.corrupted_prompts = list(self.corrupted_prompts)
        self.clean_tokens = [list(tokens) for tokens in self.clean_tokens]
        self.normalized = bool(self.normalized)
        if not isinstance(self.timings, Mapping) or not isinstance(self.extra, Mapping):
            raise InvalidTypeError("timings and extra must be dicts")
        self.timings = dict(self.timings)
        self.extra = dict(self.extra)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PatchingResult):
            return NotImplemented
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if f.name in _TENSORS:
                if (a is None) != (b is None):
                    return False
                if a is not None and (a.shape != b.shape or not torch.equal(a, b)):
                    return False
            elif a != b:
                return False
        return True

    __hash__ = None  # type: ignore[assignment]  # mutable, like any dataclass with __eq__

    def __repr__(self) -> str:
        return (f"PatchingResult(method={self.method!r}, component={self.component!r}, "
                f"metric={self.metric!r}, direction={self.direction!r}, "
                f"axes={self.axes}, shape={self.shape})")

    # -- access --------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of ``effect_matrix``."""
        return tuple(self.effect_matrix.shape)

    @property
    def layers(self) -> list[Any] | None:
        """Layer labels (layer indices), or None without a layer axis."""
        return self.labels.get("layer") if "layer" in self.axes else None

    @property
    def heads(self) -> list[Any] | None:
        """Head labels (head indices), or None without a head axis."""
        return self.labels.get("head") if "head" in self.axes else None

    @property
    def positions(self) -> list[Any] | None:
        """Position labels (``"5: ' John'"``), or None without a position axis."""
        return self.labels.get("position") if "position" in self.axes else None

    @property
    def neurons(self) -> list[Any] | None:
        """Neuron labels (neuron indices), or None without a neuron axis."""
        return self.labels.get("neuron") if "neuron" in self.axes else None

    def _token_positions(self) -> list[Any]:
        """Token position of each entry of the position axis."""
        n = self.shape[self.axes.index("position")]
        positions = self.extra.get("positions")
        if isinstance(positions, list) and len(positions) == n:
            return positions
        return list(range(n))

    def index_value(self, axis: str, i: int) -> Any:
        """The value :meth:`top_components` reports for entry ``i`` of ``axis``.

        The label for most axes (layer index, head index, ...), the token position for the
        position axis.
        """
        if axis == "position":
            return self._token_positions()[i]
        return self.labels[axis][i]

    def cell_text(self, axis: str, i: int) -> str:
        """Display text of entry ``i`` of ``axis``: its label (``"5: ' John'"`` for positions).

        On the position axis the label is the role (``"9: S2"``) when every pair agrees on
        the roles (:meth:`position_roles`) and the position has one.
        """
        if axis == "position":
            roles = self.position_roles()
            if roles is not None and roles[i]:
                return f"{self._token_positions()[i]}: {roles[i]}"
        return str(self.labels[axis][i])

    def position_roles(self) -> list[str] | None:
        """Role of each entry of the position axis (``""`` where none), or None.

        Taken from ``extra["position_roles"]`` (per pair, one role per token). None without a
        position axis, without roles, when the positions are not single token positions, or
        when two pairs give one position different roles (e.g. IOI with ``order="both"``: the
        indirect object comes first in ABBA pairs, second in BABA pairs).
        """
        if "position" not in self.axes:
            return None
        per_pair = self.extra.get("position_roles")
        if not isinstance(per_pair, list) or not per_pair:
            return None
        out: list[str] = []
        for p in self._token_positions():
            if isinstance(p, bool) or not isinstance(p, int):
                return None
            found = set()
            for roles in per_pair:
                if not isinstance(roles, list) or not -len(roles) <= p < len(roles):
                    return None
                found.add(roles[p] if isinstance(roles[p], str) else "")
            if len(found) != 1:
                return None
            out.append(found.pop())
        return out if any(out) else None

    def answer_texts(self) -> list[tuple[str | None, str | None]] | None:
        """``[(correct, incorrect), ...]`` per pair as text (``extra["answer_text"]``), or None.

        Missing answers are None (e.g. a metric without an incorrect token).
        """
        raw = self.extra.get("answer_text")
        if not isinstance(raw, list) or not raw:
            return None
        out = []
        for item in raw:
            if isinstance(item, str):
                item = [item, None]
            if not isinstance(item, list) or not item:
                return None
            pair = [v if isinstance(v, str) else None for v in list(item)[:2]]
            pair += [None] * (2 - len(pair))
            out.append((pair[0], pair[1]))
        return out

    def describe_cell(self, coords: tuple[int, ...]) -> str:
        """``"layer 9, position 5: ' John'"`` for array coordinates of a cell."""
        return ", ".join(f"{a} {self.cell_text(a, c)}" for a, c in zip(self.axes, coords))

    def describe_index(self, index: Any) -> str:
        """``"layer 9, head 3"`` for an index returned by :meth:`top_components`."""
        values = index if isinstance(index, tuple) else (index,)
        parts = []
        for axis, value in zip(self.axes, values):
            text = str(value)
            if axis == "position":
                positions = self._token_positions()
                if value in positions:
                    text = self.cell_text(axis, positions.index(value))
            parts.append(f"{axis} {text}")
        return ", ".join(parts)

    @property
    def is_raw(self) -> bool:
        """The cells are raw patched metric values (``normalize=False``), not effects or
        changes: rankings then order them by their change from the unpatched run."""
        return self.extra.get("scale") == "raw"

    @property
    def unpatched_metric(self) -> float:
        """The mean metric of the run patched into: the corrupted run when denoising, the
        clean run otherwise (0.0 when the result does not record it)."""
        if self.direction == "denoise" and self.corrupted_metric is not None:
            return self.corrupted_metric
        return 0.0 if self.clean_metric is None else self.clean_metric

    def top_components(self, k: int = 5, by: str = "abs") -> list[tuple[Any, float]]:
        """The ``k`` cells with the largest effect, largest first.

        Returns ``[(index, effect), ...]``. ``index`` is a tuple with one value per axis:
        the label for integer axes (layer index, head index, neuron index) and the token
        position for the position axis. For 1-D results it is the bare label instead of a
        1-tuple, so ``top_components(1)[0][0]`` is a layer number for per-layer sweeps.
        Ties keep row-major order; NaN cells come last.

        Args:
            k: how many cells (fewer when the result has fewer cells).
            by: ``"abs"`` (largest magnitude, default) or ``"value"`` (largest signed value).
                Raw results (``normalize=False``) are ranked by the change of the metric from
                the unpatched run (:attr:`unpatched_metric`); the values returned stay raw.
        """
        out: list[tuple[Any, float]] = []
        for coords, effect in self.top_cells(k, by):
            values = tuple(self.index_value(a, c) for a, c in zip(self.axes, coords))
            out.append((values[0] if len(values) == 1 else values, effect))
        return out

    def top_cells(self, k: int = 5, by: str = "abs") -> list[tuple[tuple[int, ...], float]]:
        """Like :meth:`top_components` with array coordinates (always tuples) as indices.

        Returns ``[(coords, effect), ...]``, e.g. ``[((9, 2), 0.58), ...]`` where
        ``effect_matrix[9, 2] == 0.58``; :meth:`describe_cell` names a cell.
        """
        if by not in ("abs", "value"):
            raise InvalidArgumentError(f"by must be 'abs' or 'value', got {by!r}")
        if isinstance(k, bool) or not isinstance(k, int):
            raise InvalidTypeError(f"k must be an int, got {k!r}")
        flat = self.effect_matrix.flatten()
        change = flat - self.unpatched_metric if self.is_raw else flat
        key = change.abs() if by == "abs" else change.clone()
        key[torch.isnan(key)] = -math.inf
        order = torch.argsort(key, descending=True, stable=True)[: max(0, k)]
        out = []
        for idx in order.tolist():
            coords = []
            rem = idx
            for size in reversed(self.shape):
                coords.append(rem % size)
                rem //= size
            out.append((tuple(reversed(coords)), float(flat[idx])))
        return out

    def important(self, threshold: float = 0.1, by: str = "abs") -> list[ImportantCell]:
        """Every cell whose effect reaches ``threshold``, largest first.

        Returns a list of :class:`ImportantCell`: tuples ``(index, effect)`` exactly like
        :meth:`top_components` (``index`` a ``(layer, head)`` tuple, a bare layer for 1-D
        results, token positions on a position axis) that also have named fields
        (``.layer``, ``.head``, ``.position``, ``.neuron``, ``.effect``,
        ``.patching_effect``, ``.name`` such as ``"L9H3"``). NaN cells are never included.

        Args:
            threshold: keep cells with ``|effect| >= threshold`` (``by="abs"``) or
                ``effect >= threshold`` (``by="value"``).
            by: ``"abs"`` (default) or ``"value"``; also the sort order.

        Example::

            for cell in heads.important(0.1):
                print(cell.name, f"{cell.effect:+.2f}")      # L9H3 +0.42
        """
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) \
                or not math.isfinite(threshold):
            raise InvalidTypeError(f"threshold must be a finite number, got {threshold!r}")
        if by not in ("abs", "value"):
            raise InvalidArgumentError(f"by must be 'abs' or 'value', got {by!r}")
        flat = self.effect_matrix.flatten()
        key = flat.abs() if by == "abs" else flat
        count = int((key >= threshold).sum())  # NaN compares False
        out = []
        for coords, effect in self.top_cells(count, by):
            values = tuple(self.index_value(a, c) for a, c in zip(self.axes, coords))
            out.append(ImportantCell(values[0] if len(values) == 1 else values, effect,
                                     dict(zip(self.axes, values)), coords))
        return out

    def find_important_heads(self, threshold: float = 0.1) -> list[ImportantCell]:
        """The seeds' spelling of :meth:`important` for head results.

        ``[cell for cell in heads if |effect| >= threshold]`` sorted by ``|effect|``, largest
        first; each has ``.layer``, ``.head`` and ``.patching_effect`` like the seeds'
        ``HeadPatchingResult`` and unpacks as ``((layer, head), effect)``.

        Raises:
            InvalidArgumentError: the result has no head axis.
        """
        if "head" not in self.axes:
            raise InvalidArgumentError(
                f"find_important_heads needs a result with a head axis (component='attn_head'); "
                f"this one has axes {self.axes}: use important(threshold)")
        return self.important(threshold)

    def takeaway(self, k: int = 3, threshold: float = 0.1) -> str:
        """Plain-language sentences on what the result shows, with numbers.

        E.g. "Restoring attention heads from the clean run: layer 9 head 3 recovers 42% of the
        clean-corrupted logit difference gap (mean of 32 pairs; positive in 30 of 32 pairs).
        Next: ...". See :func:`causalpatch.render.text.takeaway`.
        """
        return render_takeaway(self, k=k, threshold=threshold)

    def ci(self, level: float = 0.95, n_boot: int = 1000, seed: int = 0
           ) -> tuple[torch.Tensor, torch.Tensor]:
        """Bootstrap confidence interval of every cell's effect over the pairs.

        The pairs are resampled with replacement ``n_boot`` times and each cell's effect is
        recomputed on every resample by the rule that made it (normalised effects divide by the
        resample's own clean-corrupted gap, ``extra["pair_metrics"]``); the interval is the
        percentile interval of those ``n_boot`` values (see
        :func:`causalpatch.metrics.bootstrap_interval`). It measures how much the effect depends
        on which pairs were drawn, not the error of an estimate: a first-order method's interval
        is the spread of its estimates.

        Returns:
            ``(lower, upper)``, float32 tensors shaped like ``effect_matrix``.

        Raises:
            InvalidArgumentError: the result has no per-pair effects (one pair, or a method
                that aggregates per group, such as causal tracing's position groups), or a
                normalised result lacks its per-pair metrics (saved by an older version).
        """
        if self.per_pair is None:
            raise InvalidArgumentError(
                f"ci() needs per-pair effects and this result has none ({self.n_pairs} pair(s)"
                f"{'' if self.n_pairs < 2 else ', aggregated per group by the method'}): run "
                "the method on a dataset of several prompt pairs")
        if not self._has_pair_metrics():
            raise InvalidArgumentError(
                "ci() of a normalised result needs each pair's unpatched metrics "
                "(extra['pair_metrics']), which this result does not hold: rerun the "
                "method to get them")
        return self._bootstrap(self.per_pair, level, n_boot, seed)

    def _has_pair_metrics(self) -> bool:
        metrics = self.extra.get("pair_metrics") or {}
        return not self.normalized or ("base" in metrics and "source" in metrics)

    def _bootstrap(self, per_pair: torch.Tensor, level: float = 0.95, n_boot: int = 1000,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`bootstrap_interval` of ``per_pair`` (``[n_pairs, *cells]``) with this
        result's per-pair metrics when it is normalised."""
        base = source = None
        if self.normalized:
            metrics = self.extra["pair_metrics"]
            base = torch.tensor(metrics["base"], dtype=torch.float64)
            source = torch.tensor(metrics["source"], dtype=torch.float64)
        return bootstrap_interval(per_pair, base=base, source=source, level=level,
                                  n_boot=n_boot, seed=seed)

    def interval95(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``ci(level=0.95, n_boot=CI_N_BOOT, seed=CI_SEED)``, the interval the report and
        :meth:`to_json` show, or None when the result cannot have one (see :meth:`ci`; also a
        normalised result whose clean-corrupted gap vanishes in some resample)."""
        if self.per_pair is None or self.n_pairs < 2 or not self._has_pair_metrics():
            return None
        try:
            return self._bootstrap(self.per_pair, n_boot=CI_N_BOOT, seed=CI_SEED)
        except NormalizationError:
            return None

    def summary(self, k: int = 5) -> str:
        """A few lines of text: what was run, baselines, shape, top components, timings."""
        kind = "normalised effect" if self.normalized else "raw values"
        lines = [
            f"{self.method} of {self.component!r} on {self.model_name or 'an unnamed model'}",
            f"  {render_title(self)}",
            f"  metric: {self.metric} ({kind}), direction: {self.direction}",
        ]
        if self.clean_metric is not None or self.corrupted_metric is not None:
            lines.append(f"  {render_baselines(self)}")
        answers = self.answer_texts()
        if answers:
            c, i = answers[0]
            lines.append(f"  answers (pair 0): correct {c!r}, incorrect {i!r}")
        lines.append(f"  shape: {' x '.join(map(str, self.shape))} ({' x '.join(self.axes)}), "
                     f"pairs: {self.n_pairs}")
        lines.append(f"  top {k} by |effect|:")
        std = self.std.flatten().tolist() if self.std is not None else None
        top = self.top_cells(k)
        flats = []
        for coords, _ in top:
            flat = 0
            for coord, size in zip(coords, self.shape):
                flat = flat * size + coord
            flats.append(flat)
        interval = self._top_interval(flats)
        for j, ((coords, effect), flat) in enumerate(zip(top, flats)):
            line = f"    {self.describe_cell(coords)}: {effect:+.4f}"
            if interval is not None:
                line += f" [95% CI {interval[0][j]:+.4f}, {interval[1][j]:+.4f}]"
            if std is not None:
                line += f" (std {std[flat]:.4f})"
            lines.append(line)
        if self.timings:
            lines.append("  time: " + ", ".join(
                f"{timing_name(name)} {value:.2f} s" for name, value in self.timings.items()))
        return "\n".join(lines)

    def _top_interval(self, flats: list[int]) -> tuple[list[float], list[float]] | None:
        """95% bootstrap intervals of the flat cells ``flats`` (``summary``), or None when the
        result cannot have them (see :meth:`ci`)."""
        if self.per_pair is None or not flats or not self._has_pair_metrics():
            return None
        try:
            lower, upper = self._bootstrap(
                self.per_pair.reshape(self.per_pair.shape[0], -1)[:, flats],
                n_boot=CI_N_BOOT, seed=CI_SEED)
        except NormalizationError:  # an unstable gap: summary() shows no interval, ci() says why
            return None
        return lower.tolist(), upper.tolist()

    @property
    def n_pairs(self) -> int:
        """Number of prompt pairs (or prompts, for ablations) the result averages over."""
        n = self.extra.get("n_pairs")
        if isinstance(n, int) and not isinstance(n, bool):
            return n
        if self.per_pair is not None:
            return int(self.per_pair.shape[0])
        return max(len(self.clean_prompts), 1)

    # -- serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tensors as nested lists, copies of the containers).

        Raises:
            InvalidTypeError: ``labels``, ``timings`` or ``extra`` hold a value JSON cannot
                store (tensors and numpy arrays become lists; tuples become lists).
        """
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _TENSORS:
                out[f.name] = None if value is None else value.tolist()
            else:
                out[f.name] = _plain(value, f.name)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PatchingResult:
        """Rebuild a result from :meth:`to_dict` output, checking every field.

        Raises:
            CorruptResultError: a field is missing, unknown, of the wrong type, not finite, or
                the shapes of the tensors and labels disagree.
        """
        if not isinstance(data, Mapping):
            raise CorruptResultError(f"result payload must be an object, got {type(data).__name__}")
        names = [f.name for f in fields(cls)]
        missing = [n for n in _REQUIRED if n not in data]
        if missing:
            raise CorruptResultError(f"result is missing the fields {missing}")
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise CorruptResultError(
                f"result has unknown fields {unknown} (written by a newer causalpatch?)")
        kwargs = copy.deepcopy(dict(data))
        _check_types(kwargs)
        for name in _TENSORS:
            if kwargs.get(name) is None:
                continue
            try:
                tensor = torch.tensor(kwargs[name], dtype=torch.float32)
            except (TypeError, ValueError, RuntimeError, OverflowError):
                raise CorruptResultError(
                    f"result field {name!r} is not a rectangular array of numbers") from None
            if not torch.isfinite(tensor).all():
                raise CorruptResultError(f"result field {name!r} holds NaN or infinite values")
            kwargs[name] = tensor
        try:
            return cls(**kwargs)
        except CausalPatchError as exc:
            raise CorruptResultError(f"result fields are inconsistent: {exc}") from None

    def to_json(self, path: str | os.PathLike[str] | None = None) -> str:
        """JSON text with format name, version and sha256 checksum of the payload.

        A result with per-pair effects (at least 2 pairs) also gets ``"ci95": {"lower",
        "upper", "level", "n_boot", "seed"}`` beside the payload: :meth:`interval95`, bounds
        nested like ``effect_matrix``. It is derived from ``per_pair`` and so not covered by
        the checksum; :meth:`from_json` ignores it (files without it load the same).

        Args:
            path: when given, the text is also written there atomically (temporary file in the
                same folder, ``fsync``, ``os.replace``).

        Raises:
            NonFiniteError: a tensor, baseline, timing or ``extra`` value is NaN or infinite
                (such a file could not be loaded back).
            InvalidTypeError: ``extra`` (or labels, timings) holds a non-JSON value.
        """
        for name in _TENSORS:
            tensor = getattr(self, name)
            if tensor is not None and not torch.isfinite(tensor).all():
                bad = int((~torch.isfinite(tensor)).sum())
                raise NonFiniteError(
                    f"cannot save the result: {name} holds {bad} NaN or infinite values")
        payload = self.to_dict()
        where = _find_nonfinite({k: v for k, v in payload.items() if k not in _TENSORS})
        if where is not None:
            raise NonFiniteError(f"cannot save the result: {where} is NaN or infinite")
        doc: dict[str, Any] = {"format": FORMAT, "version": VERSION,
                               "sha256": _checksum(payload), "result": payload}
        interval = self.interval95()
        if interval is not None:  # derived from per_pair, so outside the checksum
            doc["ci95"] = {"lower": interval[0].tolist(), "upper": interval[1].tolist(),
                           "level": 0.95, "n_boot": CI_N_BOOT, "seed": CI_SEED}
        text = json.dumps(doc, indent=1, sort_keys=True, allow_nan=False) + "\n"
        if path is not None:
            atomic_write_text(path, text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | bytes | os.PathLike[str]) -> PatchingResult:
        """Load a result saved by :meth:`to_json`, from JSON text or a file path.

        A ``str`` that starts with ``{`` or ``[``, is blank or spans several lines is read as
        JSON text; any other ``str``, or a path object, as a file path.

        Raises:
            CorruptResultError: the text is empty, truncated or not JSON, is not a causalpatch
                result, has another format version, fails its checksum (edited after saving),
                or holds missing fields, wrong shapes or non-finite numbers.
            FileNotFoundError: the path does not exist.
        """
        source = "text"
        raw: str | bytes
        if isinstance(text_or_path, (bytes, bytearray)):
            raw = bytes(text_or_path)
        elif isinstance(text_or_path, str) and (text_or_path.lstrip().startswith(("{", "["))
                                                 or not text_or_path.strip()
                                                 or "\n" in text_or_path):
            raw = text_or_path
        elif isinstance(text_or_path, (str, os.PathLike)):
            path = Path(text_or_path)
            if not path.is_file():
                raise FileNotFoundError(f"result file {str(path)!r} does not exist")
            source, raw = f"file {str(path)!r}", path.read_bytes()
        else:
            raise InvalidTypeError(
                f"from_json takes JSON text or a path, got {type(text_or_path).__name__}")
        if isinstance(raw, bytes):
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise CorruptResultError(f"result {source} is not UTF-8 text") from None
        if not raw.strip():
            raise CorruptResultError(f"result {source} is empty")
        try:
            doc = json.loads(raw, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as exc:
            raise CorruptResultError(
                f"result {source} is not valid JSON (truncated or edited?): {exc}") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise CorruptResultError(
                f"result {source} is not a causalpatch result (no \"format\": \"{FORMAT}\")")
        version = doc.get("version")
        if version != VERSION:
            newer = isinstance(version, int) and version > VERSION
            raise CorruptResultError(
                f"result {source} has format version {version!r}; this causalpatch reads "
                f"version {VERSION}" + (" (upgrade causalpatch)" if newer else ""))
        digest = doc.get("sha256")
        if not isinstance(digest, str) or len(digest) != 64:
            raise CorruptResultError(f"result {source} has no sha256 checksum")
        payload = doc.get("result")
        if not isinstance(payload, dict):
            raise CorruptResultError(f"result {source} has no \"result\" object")
        try:
            actual = _checksum(payload)
        except ValueError:
            raise CorruptResultError(f"result {source} holds a non-finite number") from None
        if actual != digest:
            raise CorruptResultError(
                f"result {source} fails its sha256 checksum: it was edited or damaged after "
                "saving")
        try:
            return cls.from_dict(payload)
        except CorruptResultError as exc:
            raise CorruptResultError(f"result {source}: {exc}") from None

    # -- tables ---------------------------------------------------------------------------------
    def to_markdown(self, max_rows: int = 100, max_cols: int = 40, digits: int = 3) -> str:
        """Markdown: a metadata header and the effect table.

        1-D results: one row per entry (with a ``std`` column when present). 2-D results:
        rows are the first axis, columns the second. 3-D results: one table per entry of the
        middle axis (e.g. per position: layers x heads). More axes: rows are the combinations
        of all axes but the last.

        Args:
            max_rows: rows per table; the rest is left out with a note.
            max_cols: columns per table; the rest is left out with a note.
            digits: decimals of each effect.
        """
        return render_markdown(self, max_rows=max_rows, max_cols=max_cols, digits=digits)

    def to_dataframe(self) -> Any:
        """Long-format pandas DataFrame: one row per cell.

        Columns: one per axis (the values :meth:`top_components` reports: layer index, head
        index, token position), ``token`` (the position label, when there is a position axis),
        ``effect`` and ``std`` (when present).
        """
        import numpy as np
        import pandas as pd

        grid = np.indices(self.shape).reshape(len(self.shape), -1)
        columns: dict[str, Any] = {}
        for d, axis in enumerate(self.axes):
            n = self.shape[d]
            values = [self.index_value(axis, i) for i in range(n)]
            columns[axis] = pd.Series(np.array(values, dtype=object)[grid[d]]).infer_objects()
            if axis == "position":
                texts = np.array([self.cell_text(axis, i) for i in range(n)], dtype=object)
                columns["token"] = pd.Series(texts[grid[d]])
        columns["effect"] = self.effect_matrix.double().flatten().numpy()
        if self.std is not None:
            columns["std"] = self.std.double().flatten().numpy()
        return pd.DataFrame(columns)

    # -- pictures and files -----------------------------------------------------------------------
    def plot(self, ax: Any = None, title: str | None = None, vmax: float | None = None,
             width: float | None = None) -> ResultFigure:
        """A matplotlib figure sized for a paper (object API, no pyplot state).

        1-D: bar chart over the axis (error bars when ``std`` is set). 2-D: heatmap, rows the
        first axis, columns the second, token strings (or roles) as tick labels on a position
        axis. 3-D: a grid of heatmaps (first x second axis), one per entry of the last axis (e.g.
        one per head), sharing one colour scale; with ``ax`` given, more than 16 panels or more
        axes, one heatmap of the largest-magnitude effect over the trailing axes instead.
        Heatmaps use a diverging colour map (red positive, blue negative) with limits symmetric
        around 0.

        New figures are 3.4 in wide (one column of a two-column paper; 3-D grids 7 in) with
        7-9 pt fonts, titled with the method and component in words, the model, the number of
        pairs and the metric. ``.show()`` opens the figure with pyplot's backend (it is handed
        to pyplot on the first ``show()``) and ``.save("fig.pdf")`` writes PNG/SVG/PDF. With
        ``ax`` the figure is ``ax.figure``. Never an ``Axes``.

        Args:
            ax: a matplotlib ``Axes`` to draw into (its figure is returned).
            title: overrides the default title; ``""`` for none.
            vmax: colour limit of heatmaps (``-vmax..vmax``); default ``max |effect|``.
            width: figure width in inches (e.g. 7.0 for the full text width).
        """
        return plot_result(self, ax=ax, title=title, vmax=vmax, width=width)

    def save(self, path: str | os.PathLike[str], format: str | None = None,
             dpi: int = 300) -> Path:
        """Save atomically, in a format chosen by ``format`` or else by the suffix.

        ``png``/``svg``/``pdf``: :meth:`plot` (PNG at ``dpi``); ``json``: :meth:`to_json`;
        ``md``: :meth:`to_markdown`; ``html``/``htm``: :meth:`to_html`.

        Raises:
            InvalidArgumentError: any other format or suffix.
            FileNotFoundError: the folder does not exist.
        """
        path = Path(path)
        kind = ("." + str(format).lower().lstrip(".")) if format is not None \
            else path.suffix.lower()
        if kind in (".png", ".svg", ".pdf"):
            self.plot().save(path, format=kind[1:], dpi=dpi)
        elif kind == ".json":
            self.to_json(path)
        elif kind == ".md":
            atomic_write_text(path, self.to_markdown())
        elif kind in (".html", ".htm"):
            self.to_html(path)
        else:
            what = f"format {format!r}" if format is not None \
                else f"unknown suffix {kind or '(none)'!r}"
            raise InvalidArgumentError(
                f"cannot save to {str(path)!r}: {what}; use one of " + ", ".join(SAVE_SUFFIXES))
        return path

    def to_html(self, path: str | os.PathLike[str] | None = None, title: str | None = None,
                plotly: str = "inline") -> str:
        """An interactive HTML report of this result.

        See :func:`causalpatch.render.html.report`; ``path`` (when given) is written
        atomically; ``plotly="cdn"`` loads plotly.js from its CDN instead of inlining it.
        Returns the HTML text.
        """
        return report([self], path,
                      title=title or f"causalpatch: {render_title(self)}",
                      plotly=plotly)

    def _repr_html_(self) -> str:
        return compact_html(self)


class ImportantCell(tuple):  # no __slots__: instances carry the named fields
    """One cell of :meth:`PatchingResult.important`: the tuple ``(index, effect)``.

    It compares, unpacks and prints like the ``(index, effect)`` pairs of
    :meth:`~PatchingResult.top_components`, and also has named fields: ``index``, ``effect``
    (alias ``patching_effect``, the seeds' name), ``layer``, ``head``, ``position``, ``neuron``
    and ``site`` (None when the result has no such axis), ``coords`` (array coordinates into
    ``effect_matrix``) and ``name`` (``"L9H3"`` for a head, ``"L9"`` for a layer).
    """

    _values: dict[str, Any]
    _coords: tuple[int, ...]

    def __new__(cls, index: Any, effect: float, values: dict[str, Any] | None = None,
                coords: tuple[int, ...] = ()) -> ImportantCell:
        cell = super().__new__(cls, (index, effect))
        cell._values = dict(values or {})
        cell._coords = tuple(coords)
        return cell

    def __getnewargs__(self) -> tuple[Any, ...]:
        return (self[0], self[1], self._values, self._coords)

    index = property(lambda self: self[0], doc="as in top_components")
    effect = property(lambda self: self[1], doc="the effect (normalised or raw)")
    patching_effect = effect
    layer = property(lambda self: self._values.get("layer"))
    head = property(lambda self: self._values.get("head"))
    position = property(lambda self: self._values.get("position"))
    neuron = property(lambda self: self._values.get("neuron"))
    site = property(lambda self: self._values.get("site"))
    coords = property(lambda self: self._coords)

    @property
    def name(self) -> str:
        """``"L9H3"`` (layer 9 head 3), ``"L9N120"``, ``"L9P5"`` (position 5) or ``"L9"``."""
        text = f"L{self.layer}" if self.layer is not None else ""
        for axis, letter in (("position", "P"), ("head", "H"), ("neuron", "N")):
            if self._values.get(axis) is not None:
                text += f"{letter}{self._values[axis]}"
        return text or str(self.site if self.site is not None else self.index)

    hook_name = name  # the seeds' HeadPatchingResult.hook_name

    def __repr__(self) -> str:
        return f"ImportantCell(index={self[0]!r}, effect={self[1]!r})"


def write_report(results_or_paths: PatchingResult | str | os.PathLike[str]
                 | Iterable[PatchingResult | str | os.PathLike[str]],
                 out: str | os.PathLike[str] | None = None, *, title: str | None = None,
                 plotly: str = "inline", shared_scale: bool = False) -> str:
    """One HTML report of several results, given as objects or as saved JSON files.

    Args:
        results_or_paths: results, paths of files written by :meth:`PatchingResult.to_json`
            (``result.save("x.json")``), or a mix, in report order.
        out: the HTML file to write (atomically); None only returns the text.
        title: page title (default ``"causalpatch report"``).
        plotly: ``"inline"`` (default: plotly.js in the file, opens offline, ~4.8 MB) or
            ``"cdn"`` (a ``<script src>`` to cdn.plot.ly, small, needs network).
        shared_scale: start with one colour scale for all heatmaps of the same kind (a
            checkbox in the page switches).

    Returns:
        The HTML text.

    Raises:
        CorruptResultError: a file is not a valid result (names the file).
        FileNotFoundError: a path does not exist.
        InvalidArgumentError: no results, or an unknown ``plotly`` mode.
    """
    if isinstance(results_or_paths, (PatchingResult, str, os.PathLike)):
        items: list[Any] = [results_or_paths]
    else:
        items = list(results_or_paths)
    if plotly not in PLOTLY_MODES:
        raise InvalidArgumentError(
            f"plotly must be one of {', '.join(PLOTLY_MODES)}, got {plotly!r}")
    loaded = []
    for item in items:
        if isinstance(item, (str, os.PathLike)):
            loaded.append(PatchingResult.from_json(Path(item)))
        else:
            loaded.append(item)
    return report(loaded, out, title=title or "causalpatch report", plotly=plotly,
                  shared_scale=shared_scale)


# -- helpers ------------------------------------------------------------------------------------
def _float_tensor(name: str, value: Any) -> torch.Tensor:
    try:
        tensor = value.detach() if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InvalidTypeError(f"{name} cannot be made a tensor: {exc}") from None
    if tensor.is_complex():
        raise InvalidTypeError(f"{name} must be real, got dtype {tensor.dtype}")
    return tensor.to(device="cpu", dtype=torch.float32)


def _plain(value: Any, where: str) -> Any:
    """A deep copy of ``value`` made of JSON types only."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise InvalidTypeError(
                    f"{where} has a key {key!r} of type {type(key).__name__}; JSON keys are "
                    "strings")
            out[key if isinstance(key, str) else json.dumps(key)] = _plain(
                item, f"{where}[{key!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(item, f"{where}[{i}]") for i, item in enumerate(value)]
    raise InvalidTypeError(
        f"{where} holds a {type(value).__name__}, which a JSON result file cannot store")


def _find_nonfinite(value: Any, where: str = "") -> str | None:
    """Path of the first NaN/inf float in a JSON-like value, or None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else where or "value"
    if isinstance(value, dict):
        for key, item in value.items():
            found = _find_nonfinite(item, f"{where}[{key!r}]" if where else str(key))
            if found:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _find_nonfinite(item, f"{where}[{i}]")
            if found:
                return found
    return None


def _checksum(payload: Any) -> str:
    """sha256 of the canonical JSON of the payload (sorted keys, ASCII, no NaN)."""
    body = json.dumps(payload, sort_keys=True, allow_nan=False)
    return hashlib.sha256(body.encode("ascii")).hexdigest()


def _reject_constant(name: str) -> float:
    raise ValueError(f"non-finite number {name} in result JSON")


def _check_types(data: dict[str, Any]) -> None:
    """Type checks of a loaded payload (before tensors are built)."""

    def bad(name: str, expected: str) -> CorruptResultError:
        return CorruptResultError(
            f"result field {name!r} should be {expected}, got {_short(data[name])}")

    def is_num(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if not isinstance(data["axes"], (list, tuple)) or not all(
            isinstance(a, str) for a in data["axes"]):
        raise bad("axes", "a list of axis names")
    labels = data["labels"]
    if not isinstance(labels, dict) or not all(isinstance(v, list) for v in labels.values()):
        raise bad("labels", "an object axis -> list of labels")
    for name in _STRINGS:
        if name in data and not isinstance(data[name], str):
            raise bad(name, "a string")
    for name in ("clean_prompts", "corrupted_prompts"):
        if name in data and not (isinstance(data[name], list)
                                 and all(isinstance(p, str) for p in data[name])):
            raise bad(name, "a list of strings")
    if "clean_tokens" in data and not (
            isinstance(data["clean_tokens"], list)
            and all(isinstance(t, list) and all(isinstance(s, str) for s in t)
                    for t in data["clean_tokens"])):
        raise bad("clean_tokens", "a list of lists of strings")
    for name in ("clean_metric", "corrupted_metric"):
        value = data.get(name)
        if value is not None and not (is_num(value) and math.isfinite(value)):
            raise bad(name, "a finite number or null")
    if "normalized" in data and not isinstance(data["normalized"], bool):
        raise bad("normalized", "true or false")
    if "timings" in data and not (isinstance(data["timings"], dict) and all(
            is_num(v) and math.isfinite(v) for v in data["timings"].values())):
        raise bad("timings", "an object of finite numbers")
    if "extra" in data and not isinstance(data["extra"], dict):
        raise bad("extra", "an object")
    where = _find_nonfinite(data.get("extra"), "extra")
    if where is not None:
        raise CorruptResultError(f"result field {where} is NaN or infinite")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."

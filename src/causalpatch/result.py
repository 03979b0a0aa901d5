"""``PatchingResult``: the effect matrix of a sweep with its labels and metadata.

Every method (activation, attribution and path patching, ablations, causal tracing) returns
one. Axes are named (``layer``, ``position``, ``head``, ``neuron``, ...); ``labels[axis]`` holds
the tick labels (layer indices, ``"9: ' John'"`` for positions, head indices).

Example::

    result.top_components(3)      # [((23, 3), 0.58), ((29, 1), 0.27), ...] for (layer, head)
    print(result.summary())
    result.to_json("ioi.json"); PatchingResult.from_json("ioi.json")
    result.to_dataframe()         # one row per cell
    result.plot()                 # matplotlib Figure
    result.save("heads.png")      # or .svg/.pdf/.json/.md/.html
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from ._io import atomic_write_bytes, atomic_write_text
from .errors import CorruptResultError, InvalidArgumentError

FORMAT = "causalpatch-result"
VERSION = 1
_TENSORS = ("effect_matrix", "per_pair", "std")


@dataclass
class PatchingResult:
    """Result of a patching sweep.

    Attributes:
        effect_matrix: float32 tensor, one axis per entry of ``axes``.
        axes: axis names, e.g. ``("layer", "head")``.
        labels: axis name -> tick labels.
        component, metric, direction, method: what was measured and how.
        clean_metric, corrupted_metric: the metric on the unpatched runs (mean over pairs).
        normalized: True when ``effect = (patched - base) / (source - base)``.
        per_pair: ``[n_pairs, *shape]`` per-pair effects (datasets), or None.
        std: standard deviation over pairs, or None.
        timings: seconds spent, by phase.
        extra: method-specific, JSON-serialisable metadata.
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
        self.axes = tuple(self.axes)
        self.effect_matrix = torch.as_tensor(self.effect_matrix, dtype=torch.float32)
        if self.effect_matrix.dim() != len(self.axes):
            raise InvalidArgumentError(
                f"effect_matrix has {self.effect_matrix.dim()} dims but axes are {self.axes}")
        for axis, size in zip(self.axes, self.effect_matrix.shape):
            if axis in self.labels and len(self.labels[axis]) != size:
                raise InvalidArgumentError(
                    f"axis {axis!r} has {size} entries but {len(self.labels[axis])} labels")

    # -- access --------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.effect_matrix.shape)

    @property
    def layers(self) -> list[Any] | None:
        return self.labels.get("layer")

    @property
    def heads(self) -> list[Any] | None:
        return self.labels.get("head")

    @property
    def positions(self) -> list[Any] | None:
        return self.labels.get("position")

    def _index_label(self, axis: str, i: int) -> Any:
        if axis == "position":
            positions = self.extra.get("positions")
            return positions[i] if isinstance(positions, list) and len(positions) > i else i
        labels = self.labels.get(axis)
        return labels[i] if labels is not None else i

    def top_components(self, k: int = 5, by: str = "abs") -> list[tuple[Any, float]]:
        """The ``k`` cells with the largest effect.

        Returns ``[(index, effect), ...]``: ``index`` is a tuple of labels (layer index, head
        index, token position) for N-D results and the bare label for 1-D results (so
        ``top_components(1)[0][0]`` is a layer number for per-layer sweeps).

        Args:
            by: ``"abs"`` (largest magnitude, default) or ``"value"`` (largest signed value).
        """
        if by not in ("abs", "value"):
            raise InvalidArgumentError(f"by must be 'abs' or 'value', got {by!r}")
        flat = self.effect_matrix.flatten()
        key = flat.abs() if by == "abs" else flat
        order = torch.argsort(key, descending=True, stable=True)[: max(0, k)]
        out = []
        for idx in order.tolist():
            coords = []
            rem = idx
            for size in reversed(self.shape):
                coords.append(rem % size)
                rem //= size
            coords.reverse()
            labels = tuple(self._index_label(a, c) for a, c in zip(self.axes, coords))
            out.append((labels[0] if len(labels) == 1 else labels, float(flat[idx])))
        return out

    def summary(self, k: int = 5) -> str:
        """A few lines: what was run, baselines, shape, top components, timings."""
        lines = [
            f"{self.method} of {self.component!r} on {self.model_name or 'model'}",
            f"  metric: {self.metric} ({'normalised effect' if self.normalized else 'raw'}), "
            f"direction: {self.direction}",
        ]
        if self.clean_metric is not None and self.corrupted_metric is not None:
            lines.append(f"  clean {self.metric}: {self.clean_metric:.4f}, corrupted: "
                         f"{self.corrupted_metric:.4f}")
        n_pairs = self.extra.get("n_pairs", len(self.clean_prompts) or 1)
        lines.append(f"  shape: {self.shape} ({' x '.join(self.axes)}), pairs: {n_pairs}")
        lines.append(f"  top {k}:")
        for index, effect in self.top_components(k):
            name = ", ".join(f"{a}={v}" for a, v in zip(
                self.axes, index if isinstance(index, tuple) else (index,)))
            lines.append(f"    {name}: {effect:+.4f}")
        if self.timings:
            lines.append("  time: " + ", ".join(f"{k}={v:.2f}s" for k, v in self.timings.items()))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"PatchingResult(method={self.method!r}, component={self.component!r}, "
                f"metric={self.metric!r}, direction={self.direction!r}, shape={self.shape})")

    # -- serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tensors as nested lists)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _TENSORS:
                value = None if value is None else value.tolist()
            elif f.name == "axes":
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PatchingResult:
        """Rebuild from :meth:`to_dict` output, validating it."""
        names = {f.name for f in fields(cls)}
        required = {"effect_matrix", "axes", "labels", "component", "metric"}
        missing = required - set(data)
        if missing:
            raise CorruptResultError(f"result is missing fields {sorted(missing)}")
        unknown = set(data) - names
        if unknown:
            raise CorruptResultError(f"result has unknown fields {sorted(unknown)}")
        kwargs = dict(data)
        try:
            for name in _TENSORS:
                if kwargs.get(name) is not None:
                    tensor = torch.tensor(kwargs[name], dtype=torch.float32)
                    if not torch.isfinite(tensor).all():
                        raise CorruptResultError(f"result field {name!r} holds NaN or inf")
                    kwargs[name] = tensor
            kwargs["axes"] = tuple(kwargs["axes"])
            result = cls(**kwargs)
        except CorruptResultError:
            raise
        except (TypeError, ValueError, RuntimeError) as exc:
            raise CorruptResultError(f"result does not hold a valid effect matrix: {exc}") from None
        for name in ("per_pair", "std"):
            value = getattr(result, name)
            if value is not None and name == "std" and tuple(value.shape) != result.shape:
                raise CorruptResultError(f"{name} has shape {tuple(value.shape)}, expected "
                                         f"{result.shape}")
        return result

    def to_json(self, path: str | os.PathLike[str] | None = None) -> str:
        """JSON text with a format tag and a sha256 checksum; written atomically to ``path``."""
        payload = self.to_dict()
        body = json.dumps(payload, sort_keys=True, allow_nan=False)
        doc = {"format": FORMAT, "version": VERSION,
               "sha256": hashlib.sha256(body.encode()).hexdigest(), "result": payload}
        text = json.dumps(doc, indent=1, sort_keys=True, allow_nan=False)
        if path is not None:
            atomic_write_text(path, text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | os.PathLike[str]) -> PatchingResult:
        """Load a result saved by :meth:`to_json` (JSON text or a file path).

        Raises:
            CorruptResultError: truncated, hand-edited (checksum mismatch), wrong format, wrong
                shapes or non-finite values.
        """
        source = "text"
        text = os.fspath(text_or_path)
        if not text.lstrip().startswith("{"):
            path = Path(text)
            if not path.exists():
                raise FileNotFoundError(f"result file {text!r} does not exist")
            source, text = repr(str(path)), path.read_text(encoding="utf-8")
        try:
            doc = json.loads(text, parse_constant=_reject_constant)
        except (json.JSONDecodeError, ValueError) as exc:
            raise CorruptResultError(
                f"result {source} is not valid JSON (truncated or edited?): {exc}") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise CorruptResultError(f"result {source} is not a causalpatch result file")
        if doc.get("version") != VERSION:
            raise CorruptResultError(
                f"result {source} has format version {doc.get('version')!r}; this causalpatch "
                f"reads version {VERSION}")
        payload = doc.get("result")
        if not isinstance(payload, dict):
            raise CorruptResultError(f"result {source} has no result payload")
        body = json.dumps(payload, sort_keys=True, allow_nan=False)
        if hashlib.sha256(body.encode()).hexdigest() != doc.get("sha256"):
            raise CorruptResultError(
                f"result {source} fails its checksum: it was edited or damaged after saving")
        return cls.from_dict(payload)

    def to_markdown(self, max_rows: int = 200, digits: int = 3) -> str:
        """Metadata header and the effect table (3-D results: one table per middle index)."""
        head = [f"### {self.method}: `{self.component}` ({self.metric}, {self.direction})", ""]
        if self.model_name:
            head.append(f"- model: {self.model_name}")
        if self.clean_metric is not None:
            head.append(f"- clean {self.metric}: {self.clean_metric:.4f}; corrupted: "
                        f"{self.corrupted_metric:.4f}")
        head.append(f"- shape: {self.shape} ({' x '.join(self.axes)})")
        head.append("")
        m = self.effect_matrix
        fmt = f"{{:+.{digits}f}}"

        def table(mat: torch.Tensor, row_axis: str, col_axis: str | None) -> list[str]:
            rows_l = self.labels.get(row_axis, list(range(mat.shape[0])))
            if col_axis is None:
                lines = [f"| {row_axis} | effect |", "|---|---:|"]
                for label, v in list(zip(rows_l, mat.tolist()))[:max_rows]:
                    lines.append(f"| {_md(label)} | {fmt.format(v)} |")
                return lines
            cols = self.labels.get(col_axis, list(range(mat.shape[1])))
            lines = ["| " + row_axis + " \\ " + col_axis + " | " +
                     " | ".join(_md(c) for c in cols) + " |",
                     "|---|" + "---:|" * len(cols)]
            for label, row in list(zip(rows_l, mat.tolist()))[:max_rows]:
                lines.append(f"| {_md(label)} | " + " | ".join(fmt.format(v) for v in row) + " |")
            return lines

        body: list[str] = []
        if m.dim() == 1:
            body = table(m, self.axes[0], None)
        elif m.dim() == 2:
            body = table(m, self.axes[0], self.axes[1])
        else:
            mids = self.labels.get(self.axes[1], list(range(m.shape[1])))
            for j, mid in enumerate(mids):
                body += [f"**{self.axes[1]} {mid}**", ""]
                body += table(m[:, j], self.axes[0], self.axes[2]) + [""]
        return "\n".join(head + body) + "\n"

    def to_dataframe(self) -> Any:
        """Long format: one row per cell, a column per axis, ``effect`` (and ``std``)."""
        import itertools

        import pandas as pd

        ranges = [range(n) for n in self.shape]
        records = []
        std = self.std
        for idx in itertools.product(*ranges):
            row: dict[str, Any] = {a: self._index_label(a, i) for a, i in zip(self.axes, idx)}
            if "position" in self.axes:
                row["token"] = self.labels["position"][idx[self.axes.index("position")]]
            row["effect"] = float(self.effect_matrix[idx])
            if std is not None:
                row["std"] = float(std[idx])
            records.append(row)
        return pd.DataFrame.from_records(records)

    # -- pictures -------------------------------------------------------------------------------
    def plot(self, ax: Any = None, title: str | None = None) -> Any:
        """A matplotlib Figure: bars for 1-D, a heatmap for 2-D, one heatmap per head (3-D)."""
        from .plotting import plot_result

        return plot_result(self, ax=ax, title=title)

    def to_html(self, path: str | os.PathLike[str] | None = None, title: str | None = None) -> str:
        """A self-contained interactive HTML report of this result."""
        from .report import report

        return report([self], path, title=title or f"causalpatch: {self.component}")

    def _repr_html_(self) -> str:
        from .report import compact_html

        return compact_html(self)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Save by suffix: .png/.svg/.pdf (plot), .json, .md, .html."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix in (".png", ".svg", ".pdf"):
            import io

            fig = self.plot()
            buffer = io.BytesIO()
            fig.savefig(buffer, format=suffix[1:], dpi=150, bbox_inches="tight")
            atomic_write_bytes(path, buffer.getvalue())
        elif suffix == ".json":
            self.to_json(path)
        elif suffix == ".md":
            atomic_write_text(path, self.to_markdown())
        elif suffix in (".html", ".htm"):
            self.to_html(path)
        else:
            raise InvalidArgumentError(
                f"cannot save to {str(path)!r}: unknown suffix {suffix!r}; use .png, .svg, .pdf, "
                ".json, .md or .html")
        return path


def _md(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _reject_constant(name: str) -> float:
    raise ValueError(f"non-finite number {name} in result JSON")

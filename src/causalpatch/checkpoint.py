"""Durable sweep checkpoints: finished cells survive a killed process.

A checkpoint is a small JSON file holding a *fingerprint* of the sweep (model, token ids,
component, metric, direction, ...) and the raw metric value of every finished cell. It is
rewritten atomically (write a temporary file in the same folder, ``fsync``, ``os.replace``) after
every chunk, so a reader sees either the previous or the new version, never a torn one. A rerun
with the same arguments loads it and computes only the missing cells; a checkpoint written by a
different sweep is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._io import atomic_write_text
from .errors import CheckpointMismatchError, CorruptResultError

FORMAT = "causalpatch-checkpoint/1"


def model_fingerprint(model: Any) -> str:
    """A cheap identity of the weights: config, dtype and a sample of the embedding."""
    h = hashlib.sha256()
    h.update(model.config.to_json_string(use_diff=False).encode())
    h.update(str(model.dtype).encode())
    emb = model.hf_model.get_submodule(model.adapter.embed).weight
    sample = emb.detach().flatten()[:: max(1, emb.numel() // 4096)].float().cpu()
    h.update(sample.numpy().tobytes())
    return h.hexdigest()


def fingerprint(model: Any, pairs: list[Any], args: dict[str, Any]) -> str:
    """Hash of everything that determines a sweep's cell values."""
    payload = {
        "model": model_fingerprint(model),
        "pairs": [[p.clean, p.corrupted, p.correct, p.incorrect] for p in pairs],
        "args": args,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class SweepCheckpoint:
    """Finished cells of a sweep, persisted at ``path``."""

    path: Path
    key: str
    n_pairs: int
    n_cells: int
    cells: dict[int, dict[int, float]] = field(default_factory=dict)
    ends: dict[int, tuple[float, float | None]] = field(default_factory=dict)
    """Per finished pair, its base and source metric (``None``: the method has no source)."""
    payloads: dict[int, Any] = field(default_factory=dict)
    """Per finished group (keyed by its first pair), the method's JSON payload."""

    @classmethod
    def open(cls, path: str | os.PathLike[str], key: str, n_pairs: int, n_cells: int
             ) -> SweepCheckpoint:
        """Load a matching checkpoint or start a new one.

        Raises:
            CheckpointMismatchError: the file belongs to a different sweep or model.
            CorruptResultError: the file is not a readable checkpoint.
        """
        path = Path(path)
        ckpt = cls(path, key, n_pairs, n_cells)
        if not path.exists():
            if not path.parent.exists():
                raise CheckpointMismatchError(
                    f"checkpoint folder {str(path.parent)!r} does not exist; create it first")
            ckpt._save()
            return ckpt
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CorruptResultError(
                f"checkpoint {str(path)!r} is not valid JSON ({exc}); delete it to start over"
            ) from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise CorruptResultError(
                f"{str(path)!r} is not a causalpatch checkpoint (format {FORMAT!r} expected)")
        if data.get("key") != key or data.get("n_cells") != n_cells or data.get(
                "n_pairs") != n_pairs:
            raise CheckpointMismatchError(
                f"checkpoint {str(path)!r} was written by a different sweep (other model, "
                "prompts or arguments); refusing to mix results. Use another path or delete it")
        for pair, cells in data.get("cells", {}).items():
            ckpt.cells[int(pair)] = {int(j): float(v) for j, v in cells.items()}
        for pair, (base, source) in data.get("ends", {}).items():
            ckpt.ends[int(pair)] = (float(base), None if source is None else float(source))
        ckpt.payloads = {int(k): v for k, v in data.get("payloads", {}).items()}
        return ckpt

    def done(self, pair: int) -> dict[int, float]:
        """Finished cells of one pair: ``{cell index: raw metric value}``."""
        return dict(self.cells.get(pair, {}))

    def record(self, pair: int, cells: list[int], values: list[float]) -> None:
        """Add finished cells and persist atomically."""
        self.record_group([pair], cells, [values])

    def record_group(self, pairs: list[int], cells: list[int], values: list[list[float]],
                     base: list[float] | None = None, source: list[float] | None = None,
                     payload: Any = None) -> None:
        """Add the finished cells of several pairs (``values[r]`` for ``pairs[r]``), their base
        and source metrics and the group's JSON ``payload``, and persist them in one atomic
        write: a group is recorded whole or not at all."""
        for r, (pair, row) in enumerate(zip(pairs, values)):
            bucket = self.cells.setdefault(pair, {})
            for j, v in zip(cells, row):
                bucket[j] = float(v)
            if base is not None:
                self.ends[pair] = (float(base[r]), None if source is None else float(source[r]))
        if payload is not None:
            self.payloads[pairs[0]] = payload
        self._save()

    def finished(self, pairs: list[int]) -> bool:
        """Every cell, the base and source metrics of ``pairs`` are recorded (a rerun need not
        evaluate them at all)."""
        return all(len(self.cells.get(p, {})) == self.n_cells and p in self.ends for p in pairs)

    def _save(self) -> None:
        data = {"format": FORMAT, "key": self.key, "n_pairs": self.n_pairs,
                "n_cells": self.n_cells,
                "cells": {str(p): {str(j): v for j, v in c.items()} for p, c in self.cells.items()},
                "ends": {str(p): list(e) for p, e in self.ends.items()},
                "payloads": {str(p): v for p, v in self.payloads.items()}}
        atomic_write_text(self.path, json.dumps(data))

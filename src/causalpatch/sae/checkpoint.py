"""What :func:`~causalpatch.sae.train.train_sae` keeps so that an interrupted training run
continues where it stopped, to the same weights.

A checkpoint is three files beside each other (``P`` is the path given as ``checkpoint=``):

* ``P`` (JSON): the *manifest*: the format, the settings of the run (model fingerprint, site,
  sizes, optimiser settings, a hash of the texts...) and their hash, the *key*. It is written
  once, before any forward pass; a run with other settings is refused before it computes
  anything (:class:`~causalpatch.errors.CheckpointMismatchError`, naming the settings that
  differ).
* ``P.activations.safetensors`` (stem + suffix): the collected activations (training and
  held-out tokens, attention sinks already left out) and the sink threshold, written once
  after the collection.
* ``P.state.safetensors``: after every finished epoch (and, if asked, every N steps within
  one), the SAE's weights, Adam's state (``step``, ``exp_avg``, ``exp_avg_sq`` per weight, as
  tensors), the generator's state, the dead-feature counters and the steps and epochs done.

Every file is written atomically (a temporary file in the same folder, ``fsync``,
``os.replace``), so an interrupt at any moment leaves the previous version. The tensor files
carry the key in their safetensors metadata: a file left by another run is ignored. Only JSON
and safetensors are ever read (nothing is unpickled).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .._io import atomic_write_bytes, atomic_write_text
from ..errors import CheckpointMismatchError, CorruptResultError

FORMAT = "causalpatch-sae-training/1"


def settings_key(settings: dict[str, Any]) -> str:
    """The hash of a run's settings (JSON, sorted keys)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def sibling(path: Path, part: str) -> Path:
    """``run.json`` -> ``run.PART.safetensors`` in the same folder."""
    return path.with_name(f"{path.stem}.{part}.safetensors")


def header_metadata(path: Path) -> dict[str, str] | None:
    """The ``__metadata__`` of a safetensors file, read from its header (no tensor is loaded);
    None when the file is missing or not a safetensors file."""
    try:
        with open(path, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            if size > 100_000_000:
                return None
            header = json.loads(fh.read(size))
    except (OSError, struct.error, ValueError):
        return None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


class Status(NamedTuple):
    """What a checkpoint holds (:func:`checkpoint_status`)."""

    activations: bool
    epochs_done: int
    epochs: int
    steps_done: int = 0
    steps: int = 0


def checkpoint_status(path: str | os.PathLike[str]) -> Status:
    """``(activations saved, epochs finished, epochs, steps done, steps)`` of the checkpoint
    at ``path`` (all zero if there is none). Reads only the manifest and the files'
    headers."""
    path = Path(path)
    try:
        manifest = json.loads(path.read_text("utf-8"))
        key, epochs = manifest["key"], int(manifest["settings"]["epochs"])
    except (OSError, ValueError, KeyError, TypeError):
        return Status(False, 0, 0)
    acts = header_metadata(sibling(path, "activations"))
    state = header_metadata(sibling(path, "state"))
    if not state or state.get("key") != key:
        return Status(bool(acts and acts.get("key") == key), 0, epochs)
    return Status(bool(acts and acts.get("key") == key), int(state["epoch"]), epochs,
                  int(state["step"]), int(state["steps"]))


@dataclass
class TrainingCheckpoint:
    """An SAE training run's checkpoint at ``path`` (the manifest; module docstring)."""

    path: Path
    key: str
    settings: dict[str, Any]

    @classmethod
    def open(cls, path: str | os.PathLike[str], settings: dict[str, Any]) -> TrainingCheckpoint:
        """Load the checkpoint of a run with these ``settings``, or start a new one.

        Raises:
            CheckpointMismatchError: the checkpoint belongs to a run with other settings, or
                its folder does not exist.
            CorruptResultError: ``path`` is not a readable SAE training checkpoint.
        """
        path = Path(path)
        ckpt = cls(path, settings_key(settings), settings)
        if not path.exists():
            if not path.parent.is_dir():
                raise CheckpointMismatchError(
                    f"checkpoint folder {str(path.parent)!r} does not exist; create it first")
            atomic_write_text(path, json.dumps({"format": FORMAT, "key": ckpt.key,
                                                "settings": settings}, indent=1))
            return ckpt
        try:
            data = json.loads(path.read_text("utf-8"))
        except (OSError, ValueError) as exc:
            raise CorruptResultError(f"checkpoint {str(path)!r} is not valid JSON ({exc}); "
                                     "delete it to start over") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise CorruptResultError(f"{str(path)!r} is not an SAE training checkpoint "
                                     f"(format {FORMAT!r} expected); delete it or use another "
                                     "path")
        if data.get("key") != ckpt.key:
            found = data.get("settings")
            old: dict[str, Any] = found if isinstance(found, dict) else {}
            diff = [f"{name}: {old.get(name)!r} there, {settings[name]!r} here"
                    for name in settings if old.get(name) != settings[name]]
            raise CheckpointMismatchError(
                f"checkpoint {str(path)!r} was written by an SAE training run with other "
                f"settings ({'; '.join(diff) or 'another format'}); refusing to mix runs. "
                "Use the same settings, another checkpoint path, or delete it")
        return ckpt

    # -- the tensor files ---------------------------------------------------------------------
    def _load(self, part: str) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        file = sibling(self.path, part)
        meta = header_metadata(file)
        if not meta or meta.get("key") != self.key:
            return None  # none yet, or left by another run
        from safetensors.torch import load

        return load(file.read_bytes()), meta

    def _save(self, part: str, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
        from safetensors.torch import save

        data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                    metadata={**meta, "key": self.key})
        atomic_write_bytes(sibling(self.path, part), data)

    def load_activations(self) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        """The saved activations and their metadata, or None."""
        return self._load("activations")

    def save_activations(self, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
        self._save("activations", tensors, meta)

    def load_state(self) -> dict[str, torch.Tensor] | None:
        """The last saved training state (``fit_sae``'s ``state``), or None."""
        loaded = self._load("state")
        return None if loaded is None else loaded[0]

    def save_state(self, state: dict[str, torch.Tensor]) -> None:
        """A training state (with the scalars ``step``, ``epoch`` and ``steps``)."""
        self._save("state", state, {name: str(int(state[name]))
                                    for name in ("step", "epoch", "steps")})

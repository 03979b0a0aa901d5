"""The small closed vocabularies of causalpatch, one enum each.

Every enum is a ``str`` enum, so ``Direction("noise")`` and plain strings are interchangeable in
every public argument; :func:`parse` turns a user's string into a member with an error that
names the argument and lists the choices.
"""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

from .errors import InvalidArgumentError


class Direction(str, Enum):
    """Which run is patched into which."""

    DENOISE = "denoise"
    """Clean activations into the corrupted run (recovery; 1.0 = fully restored)."""
    NOISE = "noise"
    """Corrupted activations into the clean run (damage; 1.0 = fully broken)."""


class Engine(str, Enum):
    """How a sweep's patched runs are executed (the numbers are the same)."""

    FAST = "fast"
    """The staircase engine: no-op patches skipped, shared prefix, rows start at their layer."""
    NAIVE = "naive"
    """The reference: one full forward pass per patch, with hooks."""


class AblationKind(str, Enum):
    """What an ablated activation is replaced by."""

    ZERO = "zero"
    """Zeros."""
    MEAN = "mean"
    """The mean activation over a reference set (over rows and real token positions)."""
    RESAMPLE = "resample"
    """The same site's activation in another row of the reference set."""


class Freeze(str, Enum):
    """What path patching holds at its base value while a sender's change travels."""

    HEADS = "heads"
    """Every other attention head's output (Wang et al.'s path patching): MLPs are recomputed,
    so paths through MLPs count."""
    ALL = "all"
    """Every other head's output and every MLP output: only the direct path through the
    residual stream counts."""


class ReceiverInput(str, Enum):
    """Which input of a path-patching receiver carries the path."""

    Q = "q"
    """The receiver heads' queries."""
    K = "k"
    """Their keys (under grouped-query attention, the key/value head the query head reads)."""
    V = "v"
    """Their values (likewise per key/value head)."""
    RESID = "resid"
    """The final residual stream at the last position (``receivers="logits"``)."""


E = TypeVar("E", bound=Enum)


def parse(enum: type[E], value: object, argument: str) -> E:
    """``enum(value)`` with an :class:`InvalidArgumentError` naming ``argument`` and the choices."""
    try:
        return enum(value)
    except ValueError:
        choices = ", ".join(repr(m.value) for m in enum)
        raise InvalidArgumentError(
            f"unknown {argument} {value!r}; expected one of {choices}") from None

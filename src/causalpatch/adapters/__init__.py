"""Architecture adapters: one small declarative table per model family.

To support a new family, write ``adapters/<family>.py`` with an :class:`Adapter` listing the
module paths of its sites (copy the closest existing adapter) and add it to ``ADAPTERS``.
"""

from __future__ import annotations

from typing import Any

from ..errors import UnsupportedArchitectureError
from . import gemma, gpt2, llama, neox, qwen
from .base import Adapter, ModelDims, SiteSpec, View

ADAPTERS: tuple[Adapter, ...] = (
    llama.ADAPTER,
    qwen.QWEN2,
    qwen.QWEN3,
    gemma.ADAPTER,
    gemma.GEMMA1,
    gpt2.ADAPTER,
    neox.ADAPTER,
)


def supported_model_types() -> list[str]:
    """Every ``config.model_type`` that has an adapter."""
    return sorted(t for a in ADAPTERS for t in a.model_types)


def adapter_for(config: Any) -> Adapter:
    """Return the adapter serving ``config.model_type``.

    Raises:
        UnsupportedArchitectureError: naming the supported types and how to add one.
    """
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise UnsupportedArchitectureError(
        f"unsupported architecture: config.model_type={model_type!r} has no adapter. "
        f"Supported model types: {', '.join(supported_model_types())}. To add one, write a "
        "small adapter in causalpatch/adapters/ mapping its module paths (see "
        "adapters/llama.py) and register it in causalpatch.adapters.ADAPTERS."
    )


__all__ = ["ADAPTERS", "Adapter", "ModelDims", "SiteSpec", "View", "adapter_for",
           "supported_model_types"]

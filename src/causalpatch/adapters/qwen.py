"""Qwen2 / Qwen2.5 / Qwen3: the LLaMA layout; Qwen3 adds per-head q/k RMS norms."""

from __future__ import annotations

from .base import Adapter, SiteSpec
from .llama import LLAMA_SITES

QWEN3_SITES: dict[str, SiteSpec] = {
    **LLAMA_SITES,
    "attn.q_normed": SiteSpec("self_attn.q_norm", "output", doc="per-head queries after q_norm"),
    "attn.k_normed": SiteSpec("self_attn.k_norm", "output", doc="per-head keys after k_norm"),
}

QWEN2 = Adapter(
    name="qwen2",
    model_types=("qwen2",),
    layers="model.layers",
    final_norm="model.norm",
    unembed="lm_head",
    embed="model.embed_tokens",
    sites=LLAMA_SITES,
)

QWEN3 = Adapter(
    name="qwen3",
    model_types=("qwen3",),
    layers="model.layers",
    final_norm="model.norm",
    unembed="lm_head",
    embed="model.embed_tokens",
    sites=QWEN3_SITES,
)

"""GPT-2: fused ``c_attn`` (q|k|v), Conv1D projections, learned position embeddings."""

from __future__ import annotations

from .base import Adapter, ChunkHeads, Heads, PATTERN_DOC, SiteSpec

GPT2_SITES: dict[str, SiteSpec] = {
    "resid_mid": SiteSpec("ln_2", "input", doc="residual after attention"),
    "attn": SiteSpec("attn", "output", doc="attention output before the residual add"),
    "attn.z": SiteSpec("attn.c_proj", "input", Heads("q"), "per-head output before c_proj"),
    "attn.q": SiteSpec("attn.c_attn", "output", ChunkHeads(0), "per-head queries"),
    "attn.k": SiteSpec("attn.c_attn", "output", ChunkHeads(1), "per-head keys"),
    "attn.v": SiteSpec("attn.c_attn", "output", ChunkHeads(2), "per-head values"),
    "attn.pattern": SiteSpec("attn", "pattern", doc=PATTERN_DOC),
    "attn.in": SiteSpec("ln_1", "output", doc="normalised attention input"),
    "mlp": SiteSpec("mlp", "output", doc="MLP output before the residual add"),
    "mlp.in": SiteSpec("ln_2", "output", doc="normalised MLP input"),
    "mlp.pre": SiteSpec("mlp.c_fc", "output", doc="MLP pre-activations"),
    "mlp.post": SiteSpec("mlp.c_proj", "input", doc="MLP hidden activations (neurons)"),
}

ADAPTER = Adapter(
    name="gpt2",
    model_types=("gpt2",),
    layers="transformer.h",
    final_norm="transformer.ln_f",
    unembed="lm_head",
    embed="transformer.wte",
    sites=GPT2_SITES,
    norm="layer",
    pos_embed="transformer.wpe",
)

"""LLaMA family: LLaMA 2/3, SmolLM/SmolLM2 (``llama``), SmolLM3, Mistral (pre-norm, separate
q/k/v, gated MLP)."""

from __future__ import annotations

from .base import Adapter, Heads, PATTERN_DOC, SiteSpec

#: Sites shared by every model whose decoder layer follows the LLaMA layout. Other adapters
#: (Qwen, Gemma 1) start from this table and change what differs.
LLAMA_SITES: dict[str, SiteSpec] = {
    "resid_mid": SiteSpec("post_attention_layernorm", "input", doc="residual after attention"),
    "attn": SiteSpec("self_attn", "output", doc="attention output before the residual add"),
    "attn.z": SiteSpec("self_attn.o_proj", "input", Heads("q"), "per-head output before o_proj"),
    "attn.q": SiteSpec("self_attn.q_proj", "output", Heads("q"), "per-head queries (pre-RoPE)"),
    "attn.k": SiteSpec("self_attn.k_proj", "output", Heads("kv"), "per-head keys (pre-RoPE)"),
    "attn.v": SiteSpec("self_attn.v_proj", "output", Heads("kv"), "per-head values"),
    "attn.pattern": SiteSpec("self_attn", "pattern", doc=PATTERN_DOC),
    "attn.in": SiteSpec("input_layernorm", "output", doc="normalised attention input"),
    "mlp": SiteSpec("mlp", "output", doc="MLP output before the residual add"),
    "mlp.in": SiteSpec("post_attention_layernorm", "output", doc="normalised MLP input"),
    "mlp.gate": SiteSpec("mlp.gate_proj", "output", doc="gate projection (pre-activation)"),
    "mlp.up": SiteSpec("mlp.up_proj", "output", doc="up projection"),
    "mlp.post": SiteSpec("mlp.down_proj", "input", doc="MLP hidden activations (neurons)"),
}


ADAPTER = Adapter(
    name="llama",
    model_types=("llama", "mistral", "smollm3"),
    layers="model.layers",
    final_norm="model.norm",
    unembed="lm_head",
    embed="model.embed_tokens",
    sites=LLAMA_SITES,
)

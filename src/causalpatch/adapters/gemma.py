"""Gemma 3 (text): sandwich norms around attention and MLP.

Gemma normalises each block's output *before* the residual add, so ``attn`` is the output of
``post_attention_layernorm`` and ``mlp`` the output of ``post_feedforward_layernorm``: exactly
what is added to the residual stream. ``resid_mid`` is the input of
``pre_feedforward_layernorm``.
"""

from __future__ import annotations

from .base import Adapter, Heads, SiteSpec

GEMMA_SITES: dict[str, SiteSpec] = {
    "resid_mid": SiteSpec("pre_feedforward_layernorm", "input", doc="residual after attention"),
    "attn": SiteSpec("post_attention_layernorm", "output", doc="normalised attention output"),
    "attn.raw": SiteSpec("self_attn", "output", doc="attention output before its post-norm"),
    "attn.z": SiteSpec("self_attn.o_proj", "input", Heads("q"), "per-head output before o_proj"),
    "attn.q": SiteSpec("self_attn.q_proj", "output", Heads("q"), "per-head queries"),
    "attn.k": SiteSpec("self_attn.k_proj", "output", Heads("kv"), "per-head keys"),
    "attn.v": SiteSpec("self_attn.v_proj", "output", Heads("kv"), "per-head values"),
    "attn.in": SiteSpec("input_layernorm", "output", doc="normalised attention input"),
    "mlp": SiteSpec("post_feedforward_layernorm", "output", doc="normalised MLP output"),
    "mlp.raw": SiteSpec("mlp", "output", doc="MLP output before its post-norm"),
    "mlp.in": SiteSpec("pre_feedforward_layernorm", "output", doc="normalised MLP input"),
    "mlp.gate": SiteSpec("mlp.gate_proj", "output", doc="gate projection (pre-activation)"),
    "mlp.up": SiteSpec("mlp.up_proj", "output", doc="up projection"),
    "mlp.post": SiteSpec("mlp.down_proj", "input", doc="MLP hidden activations (neurons)"),
}

ADAPTER = Adapter(
    name="gemma3",
    model_types=("gemma3_text", "gemma3", "gemma2", "gemma"),
    layers="model.layers",
    final_norm="model.norm",
    unembed="lm_head",
    embed="model.embed_tokens",
    sites=GEMMA_SITES,
    aliases={"self_attn": "attn.raw", "self_attn.o_proj": "attn.z", "mlp.down_proj": "mlp.post"},
    logit_softcap_attr="final_logit_softcapping",
)

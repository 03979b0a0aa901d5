"""Gemma 1, 2 and 3 (text).

Gemma 2 and 3 put sandwich norms around attention and MLP: each block's output is normalised
*before* the residual add, so ``attn`` is the output of ``post_attention_layernorm`` and ``mlp``
the output of ``post_feedforward_layernorm``: exactly what is added to the residual stream.
``resid_mid`` is the input of ``pre_feedforward_layernorm``.

Gemma 1 has no sandwich norms: its decoder layer is the LLaMA layout (``input_layernorm``,
``self_attn``, ``post_attention_layernorm``, ``mlp``), so it uses the LLaMA site table. Its
``sqrt(d_model)`` embedding scale is applied inside ``embed_tokens`` and changes no site.

Only the text-only models are served: the multimodal Gemma 3 (``model_type="gemma3"``,
``Gemma3ForConditionalGeneration``) nests its decoder under ``model.language_model`` and is not
supported.
"""

from __future__ import annotations

from .base import Adapter, Heads, PATTERN_DOC, SiteSpec
from .llama import LLAMA_SITES

GEMMA_SITES: dict[str, SiteSpec] = {
    "resid_mid": SiteSpec("pre_feedforward_layernorm", "input", doc="residual after attention"),
    "attn": SiteSpec("post_attention_layernorm", "output", doc="normalised attention output"),
    "attn.raw": SiteSpec("self_attn", "output", doc="attention output before its post-norm"),
    "attn.z": SiteSpec("self_attn.o_proj", "input", Heads("q"), "per-head output before o_proj"),
    "attn.q": SiteSpec("self_attn.q_proj", "output", Heads("q"), "per-head queries"),
    "attn.k": SiteSpec("self_attn.k_proj", "output", Heads("kv"), "per-head keys"),
    "attn.v": SiteSpec("self_attn.v_proj", "output", Heads("kv"), "per-head values"),
    "attn.pattern": SiteSpec("self_attn", "pattern", doc=PATTERN_DOC),
    "attn.in": SiteSpec("input_layernorm", "output", doc="normalised attention input"),
    "mlp": SiteSpec("post_feedforward_layernorm", "output", doc="normalised MLP output"),
    "mlp.raw": SiteSpec("mlp", "output", doc="MLP output before its post-norm"),
    "mlp.in": SiteSpec("pre_feedforward_layernorm", "output", doc="normalised MLP input"),
    "mlp.gate": SiteSpec("mlp.gate_proj", "output", doc="gate projection (pre-activation)"),
    "mlp.up": SiteSpec("mlp.up_proj", "output", doc="up projection"),
    "mlp.post": SiteSpec("mlp.down_proj", "input", doc="MLP hidden activations (neurons)"),
}

#: Gemma 2 and Gemma 3 (text): sandwich norms, final logit soft-cap.
ADAPTER = Adapter(
    name="gemma3",
    model_types=("gemma3_text", "gemma2"),
    layers="model.layers",
    final_norm="model.norm",
    unembed="lm_head",
    embed="model.embed_tokens",
    sites=GEMMA_SITES,
    logit_softcap_attr="final_logit_softcapping",
    norm="rms_offset",
    post_norm_inputs={"attn": "attn.raw", "mlp": "mlp.raw"},
)

#: Gemma 1: the LLaMA layout (no sandwich norms, no soft-cap).
GEMMA1 = Adapter(
    name="gemma",
    model_types=("gemma",),
    layers="model.layers",
    final_norm="model.norm",
    unembed="lm_head",
    embed="model.embed_tokens",
    sites=LLAMA_SITES,
    norm="rms_offset",
)

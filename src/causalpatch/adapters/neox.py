"""GPT-NeoX / Pythia: fused per-head interleaved QKV, optional parallel residual."""

from __future__ import annotations

from typing import Any

from .base import Adapter, Heads, InterleavedHeads, PATTERN_DOC, SiteSpec

NEOX_SITES: dict[str, SiteSpec] = {
    "resid_mid": SiteSpec("post_attention_layernorm", "input", doc="residual after attention"),
    "attn": SiteSpec("attention", "output", doc="attention output before the residual add"),
    "attn.z": SiteSpec("attention.dense", "input", Heads("q"), "per-head output before dense"),
    "attn.q": SiteSpec("attention.query_key_value", "output", InterleavedHeads(0), "queries"),
    "attn.k": SiteSpec("attention.query_key_value", "output", InterleavedHeads(1), "keys"),
    "attn.v": SiteSpec("attention.query_key_value", "output", InterleavedHeads(2), "values"),
    "attn.pattern": SiteSpec("attention", "pattern", doc=PATTERN_DOC),
    "attn.in": SiteSpec("input_layernorm", "output", doc="normalised attention input"),
    "mlp": SiteSpec("mlp", "output", doc="MLP output before the residual add"),
    "mlp.in": SiteSpec("post_attention_layernorm", "output", doc="normalised MLP input"),
    "mlp.pre": SiteSpec("mlp.dense_h_to_4h", "output", doc="MLP pre-activations"),
    "mlp.post": SiteSpec("mlp.dense_4h_to_h", "input", doc="MLP hidden activations (neurons)"),
}


def _unsupported(config: Any) -> dict[str, str]:
    if getattr(config, "use_parallel_residual", False):
        reason = (
            "this GPT-NeoX model uses a parallel residual (attention and MLP both read "
            "resid_pre), so there is no residual stream between them"
        )
        return {"resid_mid": reason}
    return {}


ADAPTER = Adapter(
    name="gpt_neox",
    model_types=("gpt_neox",),
    layers="gpt_neox.layers",
    final_norm="gpt_neox.final_layer_norm",
    unembed="lm_head",
    embed="gpt_neox.embed_in",
    sites=NEOX_SITES,
    unsupported=_unsupported,
    norm="layer",
)

"""Declarative architecture adapters.

An adapter is the *only* code in causalpatch that knows Hugging Face module paths. It maps each
canonical per-layer site name (``attn``, ``mlp``, ``attn.z``, ...) to

* a module path relative to the decoder layer (``"self_attn.o_proj"``),
* a hook kind: ``"input"`` (the module's first input), ``"output"`` (its output, the first
  element when the module returns a tuple) or ``"pattern"`` (the attention module's weights
  ``[batch, head, query, key]``, read-only),
* a :class:`View` that turns the hooked tensor into the canonical activation (for example
  ``[batch, pos, n_heads * d_head]`` into ``[batch, pos, n_heads, d_head]``) and back.

``resid_pre`` (the decoder layer's input) and ``resid_post`` (its output) are the same for every
architecture and need no entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # annotations only: listing the adapters (`causalpatch models`) needs no torch
    import torch

#: ``"pattern"``: the attention weights ``[batch, head, query, key]`` the module computes
#: (read-only; see :class:`causalpatch.adapters.runtime.PatternTap`). ``"scores"``: the same
#: module's attention logits (:func:`causalpatch.adapters.runtime.attention_scores`), read by
#: AtP*'s key fix on a copy of an ``attn.pattern`` site (no site table names it).
HookKind = Literal["input", "output", "pattern", "scores"]
#: The description of every family's ``attn.pattern`` site.
PATTERN_DOC = "attention weights [batch, head, query, key] (read-only)"

#: LLaMA-style module names the seeds' examples use (``layers.9.self_attn``), as canonical site
#: kinds, for families whose modules are named differently (GPT-2's ``attn``, NeoX's
#: ``attention``). A family's own module of that name takes precedence.
SEED_MODULE_NAMES: dict[str, str] = {"self_attn": "attn"}


class View:
    """Identity view: the hooked tensor *is* the activation, ``[batch, pos, d]``."""

    def read(self, t: torch.Tensor, dims: ModelDims) -> torch.Tensor:
        return t

    def write(self, t: torch.Tensor, act: torch.Tensor, dims: ModelDims) -> torch.Tensor:
        return act

    @property
    def per_head(self) -> bool:
        return False

    def n_heads(self, dims: ModelDims) -> int:
        """Heads of a per-head view; only asked of views whose :attr:`per_head` is True."""
        raise TypeError(f"{type(self).__name__} is not a per-head view")


@dataclass(frozen=True)
class Heads(View):
    """Split the last dim into heads: ``[b, p, H*dh] <-> [b, p, H, dh]``.

    ``group`` is ``"q"`` for query heads (``n_heads``) or ``"kv"`` for key/value heads
    (``n_kv_heads`` under grouped-query attention).
    """

    group: Literal["q", "kv"] = "q"

    @property
    def per_head(self) -> bool:
        return True

    def n_heads(self, dims: ModelDims) -> int:
        return dims.n_heads if self.group == "q" else dims.n_kv_heads

    def read(self, t: torch.Tensor, dims: ModelDims) -> torch.Tensor:
        return t.unflatten(-1, (self.n_heads(dims), dims.d_head))

    def write(self, t: torch.Tensor, act: torch.Tensor, dims: ModelDims) -> torch.Tensor:
        return act.flatten(-2)


@dataclass(frozen=True)
class ChunkHeads(View):
    """One of ``n_chunks`` equal chunks of the last dim, then split into heads.

    GPT-2's fused ``c_attn`` output is ``[q | k | v]``: ``ChunkHeads(0, 3)`` is the query.
    """

    index: int
    n_chunks: int = 3

    @property
    def per_head(self) -> bool:
        return True

    def n_heads(self, dims: ModelDims) -> int:
        return dims.n_heads

    def read(self, t: torch.Tensor, dims: ModelDims) -> torch.Tensor:
        chunk = t.shape[-1] // self.n_chunks
        part = t[..., self.index * chunk : (self.index + 1) * chunk]
        return part.unflatten(-1, (dims.n_heads, dims.d_head))

    def write(self, t: torch.Tensor, act: torch.Tensor, dims: ModelDims) -> torch.Tensor:
        chunk = t.shape[-1] // self.n_chunks
        out = t.clone()
        out[..., self.index * chunk : (self.index + 1) * chunk] = act.flatten(-2)
        return out


@dataclass(frozen=True)
class InterleavedHeads(View):
    """GPT-NeoX's fused QKV: ``[b, p, H * (3*dh)]`` viewed per head, ``index`` picks q/k/v."""

    index: int
    n_parts: int = 3

    @property
    def per_head(self) -> bool:
        return True

    def n_heads(self, dims: ModelDims) -> int:
        return dims.n_heads

    def read(self, t: torch.Tensor, dims: ModelDims) -> torch.Tensor:
        per = t.unflatten(-1, (dims.n_heads, self.n_parts * dims.d_head))
        return per[..., self.index * dims.d_head : (self.index + 1) * dims.d_head]

    def write(self, t: torch.Tensor, act: torch.Tensor, dims: ModelDims) -> torch.Tensor:
        per = t.unflatten(-1, (dims.n_heads, self.n_parts * dims.d_head)).clone()
        per[..., self.index * dims.d_head : (self.index + 1) * dims.d_head] = act
        return per.flatten(-2)


IDENTITY = View()


@dataclass(frozen=True)
class SiteSpec:
    """Where a canonical site lives inside one decoder layer."""

    module: str
    hook: HookKind
    view: View = IDENTITY
    doc: str = ""


@dataclass(frozen=True)
class ModelDims:
    """Sizes of a model, read from its config by the adapter."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    d_mlp: int
    vocab_size: int


def _first(config: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def default_dims(config: Any) -> ModelDims:
    """Read sizes from the usual config field names (LLaMA, GPT-2 and NeoX spellings)."""
    n_layers = _first(config, "num_hidden_layers", "n_layer", "num_layers")
    n_heads = _first(config, "num_attention_heads", "n_head")
    d_model = _first(config, "hidden_size", "n_embd", "d_model")
    n_kv = _first(config, "num_key_value_heads", default=n_heads)
    d_head = _first(config, "head_dim", default=d_model // n_heads)
    d_mlp = _first(config, "intermediate_size", "n_inner", default=4 * d_model)
    return ModelDims(
        n_layers=int(n_layers),
        n_heads=int(n_heads),
        n_kv_heads=int(n_kv),
        d_model=int(d_model),
        d_head=int(d_head),
        d_mlp=int(d_mlp),
        vocab_size=int(config.vocab_size),
    )


@dataclass(frozen=True)
class Adapter:
    """Everything causalpatch needs to know about one model family.

    Attributes:
        name: family name shown to users (``"llama"``).
        model_types: ``config.model_type`` values this adapter serves.
        layers: path of the ``ModuleList`` of decoder layers from the ``*ForCausalLM`` root.
        final_norm: path of the final normalisation module.
        unembed: path of the output projection (``lm_head``).
        embed: path of the token embedding.
        sites: canonical per-layer site name -> :class:`SiteSpec`.
        dims: reads :class:`ModelDims` from a config.
        logit_softcap_attr: config attribute holding a final logit soft-cap, if any.
        unsupported: site name -> reason it is not defined for a given config.
        norm: how the final norm (and any post-block norm) computes, for the linear readout
            of the logit lens and direct logit attribution: ``"rms"`` (``x / rms(x) * w``),
            ``"rms_offset"`` (Gemma: ``x / rms(x) * (1 + w)``) or ``"layer"`` (LayerNorm:
            ``(x - mean) / std * w + b``). Checked against the module on every use.
        pos_embed: path of a learned absolute position embedding added to the token
            embedding before the first layer (GPT-2's ``wpe``), or ``None``.
        post_norm_inputs: block (``"attn"``/``"mlp"``) -> the site kind its post-block norm
            normalises, for families whose residual write is a norm of the block output
            (Gemma 2/3: ``attn`` is ``post_attention_layernorm(attn.raw)``).
    """

    name: str
    model_types: tuple[str, ...]
    layers: str
    final_norm: str
    unembed: str
    embed: str
    sites: dict[str, SiteSpec]
    dims: Callable[[Any], ModelDims] = default_dims
    logit_softcap_attr: str | None = None
    unsupported: Callable[[Any], dict[str, str]] = lambda config: {}
    norm: Literal["rms", "rms_offset", "layer"] = "rms"
    pos_embed: str | None = None
    post_norm_inputs: dict[str, str] = field(default_factory=dict)

"""``HookedModel``: a Hugging Face causal LM with canonical component names.

The model layer of the pipeline: loading, names, tokens, hooks and one forward pass. It calls
no method; :class:`causalpatch.InterpretableModel` (``interpretable.py``) adds the seeds'
helpers (``model.activation_patching``, ``model.causal_trace``) on top.

Example::

    from causalpatch import InterpretableModel
    model = InterpretableModel("smollm2")            # the embedded SmolLM2-135M
    logits, cache = model.run_with_cache("The Eiffel Tower is in the city of",
                                         names=["blocks.10.attn.z"])
    cache["blocks.10.attn.z"].shape                  # [1, 9, 9, 64]: batch, pos, head, d_head
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from .adapters import Adapter, ModelDims, adapter_for
from .adapters.runtime import Runtime
from .errors import InvalidArgumentError, InvalidTypeError
from .hooks import Hook, hook_counts, hooked
from .loading import Source, load_hf, resolve_source
from .names import Site, canonical_names, layer_site, resolve, site_kinds
from .tokens import Batch, Prompts, make_batch, token_lists
from .tracing import Trace


class HookedModel:
    """Wrap a Hugging Face causal language model for patching experiments.

    Args:
        model: an alias (``"smollm2"``, ``"gemma3-270m"``), a path to a ``.gguf`` file or a
            Hugging Face folder, a hub name, or an already loaded ``PreTrainedModel``.
        tokenizer: required when ``model`` is a loaded model.
        dtype: e.g. ``torch.float16``; default keeps the checkpoint's dtype (float32 for GGUF).
        device: ``"cpu"`` (default) or another torch device.
        trust_remote_code: off by default; only for hub/local folders you trust.
        allow_pickle: allow ``.bin`` pickle weights (refused by default).
    """

    def __init__(self, model: str | os.PathLike[str] | nn.Module, tokenizer: Any = None, *,
                 dtype: torch.dtype | None = None, device: str | None = None,
                 trust_remote_code: bool = False, allow_pickle: bool = False) -> None:
        if isinstance(model, nn.Module):
            if tokenizer is None:
                raise InvalidArgumentError(
                    "tokenizer is required when passing a loaded model: "
                    "InterpretableModel(hf_model, tokenizer=tokenizer)")
            hf_model, self.name = model, getattr(model.config, "_name_or_path", "") or type(
                model).__name__
            if dtype is not None:
                hf_model = hf_model.to(dtype)
            if device is not None:
                hf_model = hf_model.to(device)
        elif isinstance(model, (str, os.PathLike)):
            source: Source = resolve_source(model)
            hf_model, tokenizer = load_hf(source, dtype=None, device=device,
                                          trust_remote_code=trust_remote_code,
                                          allow_pickle=allow_pickle)
            if dtype is not None:  # GGUF models refuse .half() but accept .to(dtype)
                hf_model = hf_model.to(dtype)
            self.name = source.display_name
        else:
            raise InvalidTypeError(
                "model must be an alias or path string, or a loaded transformers model; got "
                f"{type(model).__name__}")
        self.adapter: Adapter = adapter_for(hf_model.config)
        self.hf_model = hf_model.eval()
        self.tokenizer = tokenizer
        self.config = hf_model.config
        self.dims: ModelDims = self.adapter.dims(self.config)
        self.runtime = Runtime(self.hf_model, self.adapter, self.dims.n_layers)
        self._sites: dict[str, Site] = {}
        self._layer_sites: dict[tuple[str, int], Site] = {}

    # -- sizes ---------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self.dims.n_layers

    @property
    def n_heads(self) -> int:
        return self.dims.n_heads

    @property
    def n_kv_heads(self) -> int:
        return self.dims.n_kv_heads

    @property
    def d_model(self) -> int:
        return self.dims.d_model

    @property
    def d_head(self) -> int:
        return self.dims.d_head

    @property
    def d_mlp(self) -> int:
        return self.dims.d_mlp

    @property
    def vocab_size(self) -> int:
        return self.dims.vocab_size

    @property
    def architecture(self) -> str:
        return self.adapter.name

    @property
    def device(self) -> torch.device:
        return next(self.hf_model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf_model.parameters()).dtype

    @property
    def pad_token_id(self) -> int:
        for attr in ("pad_token_id", "eos_token_id"):
            value = getattr(self.tokenizer, attr, None)
            if value is not None:
                return int(value)
        return 0

    def __repr__(self) -> str:
        d = self.dims
        return (f"{type(self).__name__}({self.name!r}, architecture={self.architecture}, "
                f"n_layers={d.n_layers}, n_heads={d.n_heads}, n_kv_heads={d.n_kv_heads}, "
                f"d_model={d.d_model}, d_head={d.d_head}, d_mlp={d.d_mlp}, "
                f"vocab_size={d.vocab_size}, dtype={self.dtype})")

    def summary(self) -> str:
        """A short human-readable description of the model and its per-layer components."""
        n_params = sum(p.numel() for p in self.hf_model.parameters())
        lines = [repr(self), f"  parameters: {n_params / 1e6:.1f}M",
                 "  per-layer components (blocks.L.<name>):"]
        for kind in site_kinds(self.adapter, self.config):
            spec = self.adapter.sites.get(kind)
            doc = spec.doc if spec is not None else {
                "resid_pre": "input of the decoder layer",
                "resid_post": "output of the decoder layer"}.get(kind, "")
            lines.append(f"    {kind:<14} {doc}")
        return "\n".join(lines)

    # -- names ---------------------------------------------------------------------------------
    def site(self, name: str) -> Site:
        """Resolve a component name (canonical, short or raw module path) to a :class:`Site`."""
        if name not in self._sites:
            self._sites[name] = resolve(name, self.adapter, self.dims, self.hf_model,
                                        self.config)
        return self._sites[name]

    def layer_site(self, kind: str, layer: int) -> Site:
        """The :class:`Site` of a per-layer ``kind`` (``"attn.z"``, ``"attn_head"``...) at ``layer``."""
        key = (kind, layer)
        if key not in self._layer_sites:
            self._layer_sites[key] = layer_site(kind, layer, self.adapter, self.dims,
                                                self.hf_model, self.config)
        return self._layer_sites[key]

    def component_names(self) -> list[str]:
        """Every canonical component name, layer by layer."""
        return canonical_names(self.adapter, self.dims, self.config)

    # -- tokens --------------------------------------------------------------------------------
    def to_tokens(self, prompts: Prompts) -> torch.Tensor:
        """Token ids ``[batch, pos]`` (right-padded with the pad id when lengths differ)."""
        return make_batch(token_lists(self, prompts), self.pad_token_id).input_ids

    def to_str_tokens(self, prompt: str | Sequence[int] | torch.Tensor) -> list[str]:
        """The token strings of one prompt, e.g. ``['The', ' E', 'iff', 'el', ...]``."""
        rows = token_lists(self, prompt)
        if len(rows) != 1:
            raise InvalidArgumentError(
                f"to_str_tokens takes one prompt, got {len(rows)}; call it per prompt")
        return [self.tokenizer.decode([t]) for t in rows[0]]

    def to_single_token(self, text: str | int) -> int:
        """The id of ``text`` when it is exactly one token (e.g. ``" Paris"``).

        Raises:
            InvalidArgumentError: ``text`` is several tokens (the message lists them).
        """
        if isinstance(text, int) and not isinstance(text, bool):
            if not 0 <= text < self.vocab_size:
                raise InvalidArgumentError(
                    f"token id {text} is outside the vocabulary [0, {self.vocab_size - 1}]")
            return text
        if not isinstance(text, str) or text == "":
            raise InvalidArgumentError(f"answer token must be a non-empty string or id, got {text!r}")
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) != 1:
            pieces = [self.tokenizer.decode([i]) for i in ids]
            raise InvalidArgumentError(
                f"{text!r} is {len(ids)} tokens for this tokenizer ({pieces}), expected exactly "
                "one; answers must be single tokens (mind the leading space, e.g. ' Paris')")
        return int(ids[0])

    # -- running ---------------------------------------------------------------------------------
    def forward(self, batch: Batch, hooks: Sequence[Hook] = ()) -> torch.Tensor:
        """Run the model on a :class:`Batch` with ``hooks``; returns logits ``[batch, pos, vocab]``."""
        mask = batch.attention_mask if batch.padded else None
        with hooked(self.hf_model, hooks, self.dims):
            return self.runtime.forward(batch.input_ids, attention_mask=mask)[0]

    def trace(self, prompts: Prompts, interventions: Mapping[str, Any] | None = None,
              cache: Sequence[str] | bool | str | None = None) -> Trace:
        """One forward pass with interventions and caching; see :class:`Trace`.

        Args:
            prompts: a string, a list of strings (padded batch) or token ids.
            interventions: ``{component name: intervention | [interventions]}``.
            cache: component names to record, ``True`` for every canonical component.
        """
        return Trace(self, prompts, interventions, cache)

    def run_with_cache(self, prompts: Prompts, names: Sequence[str] | bool | None = True,
                       interventions: Mapping[str, Any] | None = None,
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(logits [batch, pos, vocab], {name: activation})`` for one forward pass."""
        tr = Trace(self, prompts, interventions, names).run()
        assert tr.logits is not None
        return tr.logits, tr.cache

    def generate_top_tokens(self, prompt: str, k: int = 5) -> list[tuple[str, float]]:
        """The ``k`` most likely next tokens after ``prompt`` with their probabilities."""
        tr = Trace(self, prompt).run()
        probs = torch.softmax(tr.last_logits[0].float(), dim=-1)
        top = probs.topk(k)
        return [(self.tokenizer.decode([int(i)]), float(p)) for p, i in
                zip(top.values, top.indices)]

    def hook_snapshot(self) -> dict[str, tuple[int, int]]:
        """Counts of hooks per module, to check that nothing leaked."""
        return hook_counts(self.hf_model)

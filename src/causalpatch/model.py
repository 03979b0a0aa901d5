"""``InterpretableModel``: a Hugging Face causal LM with canonical component names.

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
from .errors import InvalidArgumentError, InvalidTypeError
from .hooks import Hook, hook_counts, hooked
from .loading import Source, load_hf, resolve_source
from .names import Site, canonical_names, resolve, site_kinds
from .tracing import Batch, Prompts, Trace, make_batch, token_lists


class InterpretableModel:
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
        self._sites: dict[str, Site] = {}

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
        return (f"InterpretableModel({self.name!r}, architecture={self.architecture}, "
                f"n_layers={d.n_layers}, n_heads={d.n_heads}, n_kv_heads={d.n_kv_heads}, "
                f"d_model={d.d_model}, d_head={d.d_head}, d_mlp={d.d_mlp}, "
                f"vocab_size={d.vocab_size}, dtype={self.dtype})")

    def summary(self) -> str:
        """A short human-readable description of the model and its component names."""
        kinds = ", ".join(site_kinds(self.adapter, self.config))
        n_params = sum(p.numel() for p in self.hf_model.parameters())
        return (f"{self!r}\n  parameters: {n_params / 1e6:.1f}M\n  per-layer components "
                f"(blocks.L.<name>): {kinds}")

    # -- names ---------------------------------------------------------------------------------
    def site(self, name: str) -> Site:
        """Resolve a component name (canonical, short or raw module path) to a :class:`Site`."""
        if name not in self._sites:
            self._sites[name] = resolve(name, self.adapter, self.dims, self.hf_model,
                                        self.config)
        return self._sites[name]

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
        with hooked(self.hf_model, hooks, self.dims):
            kwargs: dict[str, Any] = {"input_ids": batch.input_ids, "use_cache": False}
            if batch.padded:
                kwargs["attention_mask"] = batch.attention_mask
            return self.hf_model(**kwargs).logits

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

    # -- patching helpers (seed API) -------------------------------------------------------------
    def activation_patching(self, clean_text: str, corrupted_text: str, component: str = "mlp",
                            metric: Any = "l2", plot: bool = False, **kwargs: Any
                            ) -> dict[int, float]:
        """Per-layer recovery in percent, ``{layer: recovery_percent}`` (the seeds' helper)."""
        from .patching import activation_patching

        result = activation_patching(self, clean_text, corrupted_text, component=component,
                                     metric=metric, **kwargs)
        if plot:
            result.plot()
        matrix = result.effect_matrix
        if matrix.dim() != 1:
            raise InvalidArgumentError(
                f"model.activation_patching returns one value per layer, but component="
                f"{component!r} gives shape {tuple(matrix.shape)}; use "
                "causalpatch.activation_patching for per-head or per-position results")
        return {int(layer): float(v) * 100 for layer, v in zip(result.layers, matrix.tolist())}

    def causal_trace(self, clean: Prompts, corrupted: Prompts) -> Any:
        """A context for multi-site patches: ``ct.patch(name)`` then ``ct.metric(...)``."""
        from .patching import CausalTrace

        return CausalTrace(self, clean, corrupted)

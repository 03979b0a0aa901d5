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

    with model.trace("Paris is the capital of France"):   # the seeds' reading style
        logits = model.output.save()                  # [1, 7, vocab]
        h = model.layers[10].output.save()            # blocks.10.resid_post
    len(model.layers)                                 # 30
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from .adapters import Adapter, ModelDims, adapter_for
from .adapters.runtime import Runtime
from .errors import (
    InvalidArgumentError,
    InvalidTypeError,
    OutOfRangeError,
    UnknownComponentError,
)
from .hooks import Hook, hook_counts, hooked
from .loading import LoadSpec, Source, check_placement, load_hf, resolve_source
from .names import Site, canonical_names, layer_site, resolve, site_kinds
from .sae import attach_saes
from .tokens import Batch, Prompts, make_batch, token_lists
from .tracing import WRITE_FORMS, SavedTensor, Trace, current_trace


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
        device_map: place a model larger than one device with Hugging Face accelerate:
            ``"auto"`` / ``"balanced"`` / ``"sequential"`` or ``{module name: device}`` with
            devices ``"cpu"``, ``"disk"``, ``"cuda:N"`` (or ``N``), ``"mps"``. Passed to
            ``from_pretrained``; the model is never moved afterwards, and accelerate's hooks
            (``AlignDevicesHook``) stay exactly as placed: causalpatch's hooks are added next to
            them for one forward pass and removed.
        max_memory: ``{device: size}`` budget for ``device_map="auto"``, e.g.
            ``{0: "20GiB", "cpu": "64GiB"}``.
        offload_folder: where weights mapped to ``"disk"`` are stored.

    Attributes:
        load_spec: a :class:`~causalpatch.loading.LoadSpec` (how to load this model again, in
            another process, e.g. a Ray worker), or ``None`` for a model passed in loaded.
    """

    def __init__(self, model: str | os.PathLike[str] | nn.Module, tokenizer: Any = None, *,
                 dtype: torch.dtype | None = None, device: str | None = None,
                 trust_remote_code: bool = False, allow_pickle: bool = False,
                 device_map: str | dict[str, Any] | None = None,
                 max_memory: dict[Any, Any] | None = None,
                 offload_folder: str | os.PathLike[str] | None = None) -> None:
        self.load_spec: LoadSpec | None = None
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise InvalidTypeError(
                f"dtype must be a torch.dtype such as torch.float16, got {dtype!r}")
        if isinstance(model, nn.Module):
            if device_map is not None or max_memory is not None or offload_folder is not None:
                raise InvalidArgumentError(
                    "device_map/max_memory/offload_folder apply when loading from a name or "
                    "path; a loaded model is used as it was placed (pass "
                    "device_map=... to from_pretrained yourself, or give the path here)")
            if tokenizer is None:
                raise InvalidArgumentError(
                    "tokenizer is required when passing a loaded model: "
                    "InterpretableModel(hf_model, tokenizer=tokenizer)")
            hf_model, self.name = model, getattr(model.config, "_name_or_path", "") or type(
                model).__name__
            dispatched = getattr(hf_model, "hf_device_map", None) is not None
            if dispatched and (dtype is not None or device is not None):
                raise InvalidArgumentError(
                    "this model is placed by accelerate (it has an hf_device_map); moving or "
                    "casting it would drop accelerate's hooks. Pass dtype/device_map to "
                    "from_pretrained instead")
            if dtype is not None:
                hf_model = hf_model.to(dtype)
            if device is not None:
                hf_model = hf_model.to(device)
        elif isinstance(model, (str, os.PathLike)):
            check_placement(device, device_map, max_memory, offload_folder)
            source: Source = resolve_source(model)
            placed = device_map is not None
            hf_model, tokenizer = load_hf(source, dtype=dtype if placed else None,
                                          device=device, trust_remote_code=trust_remote_code,
                                          allow_pickle=allow_pickle, device_map=device_map,
                                          max_memory=max_memory, offload_folder=offload_folder)
            if dtype is not None and not placed:  # GGUF refuses .half() but accepts .to(dtype)
                hf_model = hf_model.to(dtype)
            self.name = source.display_name
            self.load_spec = LoadSpec(
                name=_spec_name(model), dtype=None if dtype is None else str(dtype).split(".")[-1],
                device=device, device_map=device_map,
                max_memory=None if max_memory is None else dict(max_memory),
                offload_folder=None if offload_folder is None else os.path.abspath(
                    os.fspath(offload_folder)),
                trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
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
        """Where input ids go: the embedding's device (for a model placed with a
        ``device_map``, the device its embedding runs on; offloaded parts run on the CPU)."""
        placement = self.device_map
        if placement:
            where = _placed_device(placement, self.adapter.embed)
            if where is not None:
                return where
        return next(self.hf_model.parameters()).device

    @property
    def device_map(self) -> dict[str, Any] | None:
        """accelerate's placement of the model (``{module: device}``), or ``None``."""
        return getattr(self.hf_model, "hf_device_map", None)

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

    # -- the seeds' reading style inside ``with model.trace(...)`` --------------------------------
    @property
    def output(self) -> SavedTensor:
        """The logits ``[batch, pos, vocab]`` of the innermost open ``with model.trace(...)``
        block, with ``.save()`` (the seeds' ``model.output.save()``).

        Raises:
            InvalidArgumentError: no trace block of this model is open.
        """
        out = self.open_trace("model.output").output
        assert out is not None
        return out

    @output.setter
    def output(self, value: Any) -> None:
        self.open_trace("model.output").output = value  # raises: the logits are read-only

    @property
    def layers(self) -> Layers:
        """The decoder layers, for the seeds' ``len(model.layers)`` and
        ``model.layers[i].output.save()`` inside a trace block (see :class:`ModuleRef`)."""
        return Layers(self)

    def open_trace(self, what: str = "this value") -> Trace:
        """The innermost ``with model.trace(...)`` block open for this model (this thread)."""
        tr = current_trace(self)
        if tr is None:
            raise InvalidArgumentError(
                f"{what} is read inside `with model.trace(prompt):`, and no trace of this model "
                "is open; outside a trace use model.run_with_cache(prompt, names=[...])")
        return tr

    # -- names ---------------------------------------------------------------------------------
    def site(self, name: str) -> Site:
        """Resolve a component name (canonical, short or raw module path) to a :class:`Site`."""
        if name not in self._sites:
            self._sites[name] = resolve(name, self.adapter, self.dims, self.hf_model,
                                        self.config)
        return self._sites[name]

    def layer_site(self, kind: str, layer: int) -> Site:
        """The :class:`Site` of a per-layer ``kind`` (``"attn.z"``, ``"attn_head"``...) at
        ``layer``."""
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
            raise InvalidArgumentError(
                f"answer token must be a non-empty string or id, got {text!r}")
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) != 1:
            pieces = [self.tokenizer.decode([i]) for i in ids]
            raise InvalidArgumentError(
                f"{text!r} is {len(ids)} tokens for this tokenizer ({pieces}), expected exactly "
                "one; answers must be single tokens (mind the leading space, e.g. ' Paris')")
        return int(ids[0])

    # -- running ---------------------------------------------------------------------------------
    def forward(self, batch: Batch, hooks: Sequence[Hook] = ()) -> torch.Tensor:
        """Run the model on a :class:`Batch` with ``hooks``; returns logits
        ``[batch, pos, vocab]``."""
        mask = batch.attention_mask if batch.padded else None
        with hooked(self.hf_model, hooks, self.dims):
            return self.runtime.forward(batch.input_ids, attention_mask=mask)[0]

    def trace(self, prompts: Prompts, interventions: Mapping[str, Any] | None = None,
              cache: Sequence[str] | bool | str | None = None, *,
              saes: Sequence[Any] | None = None, keep_error: bool = True) -> Trace:
        """One forward pass with interventions and caching; see :class:`Trace`.

        Args:
            prompts: a string, a list of strings (padded batch) or token ids.
            interventions: ``{component name: intervention | [interventions]}``.
            cache: component names to record, ``True`` for every canonical component.
            saes: sparse autoencoders to splice in (see :mod:`causalpatch.sae`); their values
                are names like ``blocks.20.resid_post.sae.features``.
            keep_error: keep each SAE's error term (exact splice) or drop it.
        """
        return Trace(self, prompts, interventions, cache, attach_saes(self, saes, keep_error))

    def run_with_cache(self, prompts: Prompts, names: Sequence[str] | bool | None = True,
                       interventions: Mapping[str, Any] | None = None, *,
                       saes: Sequence[Any] | None = None, keep_error: bool = True,
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(logits [batch, pos, vocab], {name: activation})`` for one forward pass.

        The cache (an :class:`~causalpatch.tracing.ActivationCache`) is keyed by the names
        given; any other spelling of a cached site works as a key too, and a name not given is
        computed on first read (one more forward pass)."""
        tr = Trace(self, prompts, interventions, names, attach_saes(self, saes, keep_error)).run()
        assert tr.logits is not None
        return tr.logits, tr.cache

    def attention_pattern(self, prompt: str | Sequence[int] | torch.Tensor, layer: int,
                          heads: int | Sequence[int] | None = None) -> torch.Tensor:
        """Layer ``layer``'s attention weights on one prompt: ``[head, query, key]`` for the
        chosen ``heads`` (all by default), from ``blocks.{layer}.attn.pattern``. To draw them
        over the prompt's tokens use :func:`causalpatch.render.plot_attention_pattern`.

        Raises:
            OutOfRangeError: ``layer`` or a head is out of range.
        """
        name = self.layer_site("attn.pattern", int(layer)).name
        chosen = list(range(self.n_heads)) if heads is None else (
            [heads] if isinstance(heads, int) else list(heads))
        for h in chosen:
            if not -self.n_heads <= int(h) < self.n_heads:
                raise OutOfRangeError(
                    f"head {h} is out of range: this model has {self.n_heads} heads per layer")
        if len(token_lists(self, prompt)) != 1:
            raise InvalidArgumentError("attention_pattern takes one prompt")
        _, cache = self.run_with_cache(prompt, names=[name])
        return cache[name][0, chosen]

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


class ModuleRef:
    """A module of the model by name, read inside ``with model.trace(...)``.

    ``model.layers[3]`` is the decoder layer, ``model.layers[3].mlp`` / ``.self_attn`` / ``.attn``
    its blocks, and any sub-module path (``model.layers[3].mlp.down_proj``) or canonical
    kind (``model.layers[3].attn.z``) works as an attribute. ``.output`` is the value of the
    name (``layers.3`` -> ``blocks.3.resid_post``, ``layers.3.mlp`` -> ``blocks.3.mlp``, a raw
    module's output), ``.input`` the module's input (``layers.3.input`` ->
    ``blocks.3.resid_pre``, ``layers.3.mlp.down_proj.input`` -> ``blocks.3.mlp.post``); both
    have ``.save()``. The same names work in ``cache=`` and ``interventions=``.
    """

    _model: HookedModel
    name: str

    def __init__(self, model: HookedModel, name: str) -> None:
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "name", name)

    def __setattr__(self, attr: str, value: Any) -> None:
        """``.output = x`` / ``.input = x`` inside a trace replace the whole value (as in
        nnsight); any other assignment is refused (it would change nothing)."""
        if attr in ("output", "input"):
            name = self.name if attr == "output" else f"{self.name}.input"
            self._model.open_trace(f"{self.name}.{attr}").assign(name, value)
            return
        raise InvalidArgumentError(
            f"{self.name}.{attr} = ... would change nothing: modules cannot be replaced or "
            f"given attributes through model.layers. To change a value in the forward pass, "
            f"write it inside `with model.trace(...)`: {WRITE_FORMS}")

    @property
    def site(self) -> Site:
        """The :class:`Site` of this module's output."""
        return self._model.site(self.name)

    @property
    def output(self) -> SavedTensor:
        """This module's output in the open trace (``.save()`` returns the tensor); writes to
        it (``output[:] = x``, ``output[:, p] = x``) and ``.output = x`` take effect in the
        pass, see :class:`~causalpatch.tracing.TracedTensor`."""
        return self._model.open_trace(f"{self.name}.output").value(self.name)

    @property
    def input(self) -> SavedTensor:
        """This module's input in the open trace (``.save()`` returns the tensor)."""
        return self._model.open_trace(f"{self.name}.input").value(f"{self.name}.input")

    def __getattr__(self, child: str) -> ModuleRef:
        if child.startswith("_"):
            raise AttributeError(child)
        name = f"{self.name}.{child}"
        try:
            self._model.site(name)
        except UnknownComponentError as exc:
            raise AttributeError(f"{name!r} names no component: {exc}") from None
        return ModuleRef(self._model, name)

    def __repr__(self) -> str:
        return f"ModuleRef({self.name!r} -> {self.site.name})"


class Layers(Sequence[ModuleRef]):
    """``model.layers``: ``len()`` is the number of decoder layers; ``[i]`` (negative counts
    from the end) is a :class:`ModuleRef` named ``layers.i``."""

    def __init__(self, model: HookedModel) -> None:
        self._model = model

    def __len__(self) -> int:
        return self._model.n_layers

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(len(self))[i]]
        if isinstance(i, bool) or not hasattr(i, "__index__"):
            raise InvalidTypeError(f"layer index must be an int, got {type(i).__name__}")
        n = len(self)
        j = int(i) + n if int(i) < 0 else int(i)
        if not 0 <= j < n:
            raise IndexError(f"layer {int(i)} is out of range: this model has {n} layers")
        return ModuleRef(self._model, f"layers.{j}")

    def __repr__(self) -> str:
        return f"Layers({len(self)})"


def _spec_name(model: str | os.PathLike[str]) -> str:
    """An alias or hub name as given; a path that exists here made absolute."""
    text = os.fspath(model)
    expanded = os.path.expanduser(text)
    return os.path.abspath(expanded) if os.path.exists(expanded) else text


def _placed_device(placement: Mapping[str, Any], module: str) -> torch.device | None:
    """The device accelerate runs ``module`` on: its own entry or its closest parent's."""
    best, where = -1, None
    for name, device in placement.items():
        if name == "" or module == name or module.startswith(name + "."):
            if len(name) > best:
                best, where = len(name), device
    if where is None:
        return None
    if where in ("disk", "cpu", "meta"):
        return torch.device("cpu")
    return torch.device(f"cuda:{where}") if isinstance(where, int) else torch.device(where)

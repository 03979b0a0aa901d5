"""The one forward runtime: how causalpatch calls a Hugging Face causal LM and its layers.

Everything that depends on ``transformers`` calling conventions lives here: the name of the cache
keyword (``past_key_values`` or ``cache``), ``logits_to_keep``, where a module's first tensor
argument sits (positionally or as ``hidden_states``), how a decoder layer returns its output
(a tensor in transformers 5, a tuple before), the ``Cache`` objects and their per-layer
key/value storage, and the final norm, unembedding and logit soft-cap.

Two ways to run a model, both on the real modules:

* :meth:`Runtime.forward` — a whole forward pass (optionally on top of a prefix cache, keeping
  only the last position's logits).
* :class:`LayerCall` + :meth:`Runtime.run_layer` — "run from layer L": a decoder layer called
  by hand with exactly the arguments Hugging Face passed it in a recorded forward pass (masks,
  rotary embeddings, sliding windows are Hugging Face's own), on a batch of rows that share one
  prefix cache.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
import torch.nn as nn

from ..errors import InvalidArgumentError, UnsupportedArchitectureError
from .base import Adapter

#: Keyword names under which Hugging Face passes a cache to a model or a layer.
_CACHE_KEYS = ("past_key_values", "cache", "layer_past")


# -- first tensor in / out of a module (for hooks) -------------------------------------------
def first_input(args: tuple, kwargs: Mapping[str, Any]
                ) -> tuple[torch.Tensor, Callable[[torch.Tensor], tuple[tuple, dict]]]:
    """A module call's first tensor argument and a function that rebuilds the call with it
    replaced: ``(tensor, rebuild)`` where ``rebuild(new) -> (args, kwargs)``."""
    if args:
        return args[0], lambda new: ((new, *args[1:]), dict(kwargs))
    key = "hidden_states" if "hidden_states" in kwargs else next(
        k for k, v in kwargs.items() if isinstance(v, torch.Tensor))
    return kwargs[key], lambda new: (args, {**kwargs, key: new})


def first_output(output: Any) -> tuple[torch.Tensor, Callable[[torch.Tensor], Any]]:
    """A module's output tensor (the first element of a tuple output) and a rebuild function."""
    if isinstance(output, tuple):
        return output[0], lambda new: (new, *output[1:])
    return output, lambda new: new


# -- attention patterns ------------------------------------------------------------------------
#: The attention implementation name under which :class:`PatternTap` routes one attention call.
_TAP_KEY = "causalpatch_pattern"
_REGISTERED: list[bool] = []


def _tapped_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, attention_mask: Any, **kwargs: Any) -> Any:
    """The model's own attention implementation, unchanged, plus its weights recorded: the
    eager implementation's weights when the model runs eager attention, otherwise the
    family's own ``eager_attention_forward`` on the same queries, keys, mask, scaling,
    soft-cap and sliding window (its output is discarded)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    tap: PatternTap = getattr(module, "config")._causalpatch_tap  # noqa: B009  # nn.Module attr
    eager = _eager_function(module)
    real = ALL_ATTENTION_FUNCTIONS.get_interface(tap.implementation or "eager", eager)
    out = real(module, query, key, value, attention_mask, **kwargs)
    if tap.scores:
        tap.record(attention_scores(query, key, attention_mask, kwargs.get("scaling"),
                                    kwargs.get("softcap")))
        return out
    weights = out[1] if isinstance(out, tuple) and len(out) > 1 else None
    if weights is None or tap.implementation not in (None, "eager"):
        mask = _additive_mask(attention_mask, query, key)
        weights = eager(module, query, key, value, mask, **kwargs)[1]
    tap.record(weights)
    return out


def _eager_function(module: nn.Module) -> Callable[..., Any]:
    """The ``eager_attention_forward`` of ``module``'s modelling file (its soft-cap, scaling
    and grouped-query handling are the family's own)."""
    import sys

    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise UnsupportedArchitectureError(
            f"{type(module).__name__} has no eager_attention_forward in its modelling file; "
            "attn.pattern cannot be read for this model")
    return fn


def attention_scores(query: torch.Tensor, key: torch.Tensor, attention_mask: Any,
                     scaling: float | None = None, softcap: float | None = None
                     ) -> torch.Tensor:
    """The attention logits ``[batch, head, query, key]`` the families' eager attention
    softmaxes: ``softcap * tanh(q . k * scaling / softcap)`` (no tanh without a soft-cap;
    ``scaling`` defaults to ``d_head ** -0.5``, as the eager functions do) plus the mask, and
    ``-inf`` where the mask forbids the key. ``query`` ``[b, H, q, d]``, ``key``
    ``[b, KV, k, d]`` after rotary embedding and any q/k norm (query head ``h`` reads key
    head ``h // (H / KV)``), in the model's dtype, computed as the eager function does.

    Used by AtP*'s closed-form key fix (:func:`causalpatch.engine.key_pattern_changes`), which
    checks each time that the softmax of these logits times the values reproduces the
    layer's own attention output before it relies on them."""
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    groups = query.shape[1] // key.shape[1]
    keys = key.repeat_interleave(groups, dim=1) if groups > 1 else key
    scores = torch.matmul(query, keys.transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    mask = _additive_mask(attention_mask, query, key)[..., : key.shape[-2]]
    scores = scores + mask
    return scores.masked_fill(mask <= torch.finfo(mask.dtype).min / 2, float("-inf"))


def _additive_mask(mask: Any, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """The eager (additive, float) form of the mask the model built for its implementation:
    ``None`` (SDPA's implicit causal mask, aligned at the last key), a boolean mask (True:
    attend) or an additive one."""
    dtype = query.dtype
    low = torch.finfo(dtype).min
    q, k = query.shape[-2], key.shape[-2]
    if mask is None:
        rows = torch.arange(q, device=query.device)[:, None] + (k - q)
        cols = torch.arange(k, device=query.device)[None, :]
        out = torch.zeros(q, k, dtype=dtype, device=query.device)
        return out.masked_fill(cols > rows, low)[None, None]
    if not isinstance(mask, torch.Tensor):
        raise UnsupportedArchitectureError(
            f"attn.pattern needs a tensor attention mask (eager or sdpa attention); this model's "
            f"attention implementation passes a {type(mask).__name__}")
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, low)
    return mask


class PatternTap:
    """Records an attention module's weights ``[batch, head, query, key]`` during its forward,
    without changing what it computes.

    :meth:`before` (a forward pre-hook) gives the module, for this one call, a shallow copy of
    its config whose attention implementation is :func:`_tapped_attention`, which calls the
    model's own implementation and records the weights; :meth:`after` (a forward hook) puts
    the module's config back, and :meth:`close` does so for calls an exception interrupted.
    The model's own config is never changed.
    """

    def __init__(self, record: Callable[[torch.Tensor], None], scores: bool = False) -> None:
        self.record = record
        self.scores = scores  # record the logits (attention_scores) instead of the weights
        self.implementation: str | None = None
        self._saved: list[tuple[nn.Module, Any]] = []

    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        from transformers.modeling_utils import AttentionInterface

        config = getattr(module, "config", None)
        if config is None:
            raise UnsupportedArchitectureError(
                f"{type(module).__name__} has no config; attn.pattern cannot be read")
        if not _REGISTERED:
            AttentionInterface.register(_TAP_KEY, _tapped_attention)
            _REGISTERED.append(True)
        tapped = copy.copy(config)
        self.implementation = getattr(config, "_attn_implementation", None)
        tapped._attn_implementation_internal = _TAP_KEY
        tapped._causalpatch_tap = self
        self._saved.append((module, config))
        module.config = tapped

    def after(self, module: nn.Module, args: Any, output: Any) -> None:
        self.close()

    def close(self) -> None:
        while self._saved:
            module, config = self._saved.pop()
            module.config = config


# -- recorded layer calls --------------------------------------------------------------------
@dataclass
class LayerCall:
    """How Hugging Face called one decoder layer, with the hidden state and cache taken out.

    Attributes:
        hidden: ``[1, q, d_model]`` the layer's input in the recorded run.
        args: positional arguments after the hidden state (the cache slot set to ``None``).
        kwargs: keyword arguments (the cache slot set to ``None``).
        cache_slot: where the cache goes: ``("arg", index)``, ``("kw", name)`` or ``None``.
    """

    hidden: torch.Tensor
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    cache_slot: tuple[str, Any] | None

    def bind(self, cache: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The call's ``(args, kwargs)`` with ``cache`` in its slot."""
        if self.cache_slot is None or cache is None:
            return self.args, self.kwargs
        where, key = self.cache_slot
        if where == "arg":
            return tuple(cache if j == key else a for j, a in enumerate(self.args)), self.kwargs
        return self.args, {**self.kwargs, key: cache}


    def window(self, offset: int) -> LayerCall | None:
        """The same call on the last ``q - offset`` of its ``q`` positions (the first
        ``offset`` of them moved into the prefix cache), or ``None`` when that cannot be derived
        exactly from this call (then record the window with a real forward).

        Position-indexed arguments (rotary ``position_embeddings``, ``position_ids``,
        ``cache_position``, the 4-D ``attention_mask``) are sliced to the window's rows; the
        keys axis of the mask is unchanged (the window sees the same keys). A missing mask
        is only exact when the window has one query (an implicit causal mask would otherwise
        be aligned at the wrong corner); an unknown position-shaped tensor makes it ``None``.
        """
        if offset == 0:
            return self
        q = self.hidden.shape[1]
        if not 0 < offset < q:
            return None

        def cut(key: Any, value: Any) -> tuple[bool, Any]:
            if value is None:
                if key == "attention_mask" and q - offset > 1:
                    return False, None
                return True, None
            if isinstance(value, tuple) and key == "position_embeddings":
                parts = [cut("rotary", v) for v in value]
                return all(ok for ok, _ in parts), tuple(v for _, v in parts)
            if not isinstance(value, torch.Tensor):
                return True, value
            if key == "attention_mask":
                if value.dim() != 4 or value.shape[-2] != q:
                    return False, None
                return True, value[..., offset:, :]
            if key in ("position_ids", "cache_position"):
                return value.shape[-1] == q, value[..., offset:]
            if key == "rotary":
                return value.dim() >= 2 and value.shape[-2] == q, value[..., offset:, :]
            return q not in value.shape, value

        args, kwargs = [], {}
        for j, value in enumerate(self.args):
            ok, new = cut(f"arg{j}", value)
            if not ok:
                return None
            args.append(new)
        for key, value in self.kwargs.items():
            ok, new = cut(key, value)
            if not ok:
                return None
            kwargs[key] = new
        if "attention_mask" not in self.kwargs and q - offset > 1:
            return None  # the mask is positional (or absent): cannot tell
        return LayerCall(self.hidden[:, offset:], tuple(args), kwargs, self.cache_slot)

    def row(self, index: int) -> LayerCall:
        """The same call for row ``index`` alone of a call recorded on ``rows = hidden.shape[0]``
        rows of equal length: every tensor argument (at any depth of tuples, lists and dicts)
        whose leading axis is the batch axis of ``rows > 1`` entries is cut to that row (the
        hidden state copied); tensors with a leading axis of 1 (broadcast over rows: rotary
        tables, ``position_ids``) and 1-D tensors (``cache_position``) are kept as they are."""
        rows = self.hidden.shape[0]
        if rows == 1:
            return self

        def cut(value: Any) -> Any:
            if isinstance(value, torch.Tensor):
                return value[index : index + 1] if value.dim() >= 2 and value.shape[0] == rows \
                    else value
            if isinstance(value, (tuple, list)):
                return type(value)(cut(v) for v in value)
            if isinstance(value, dict):
                return {k: cut(v) for k, v in value.items()}
            return value

        # a copy: the row outlives the batch, which need not stay allocated for it
        return LayerCall(self.hidden[index : index + 1].clone(), tuple(cut(a) for a in self.args),
                         {k: cut(v) for k, v in self.kwargs.items()}, self.cache_slot)


def _is_cache(value: Any) -> bool:
    from transformers.cache_utils import Cache

    return isinstance(value, Cache)


def parse_layer_call(args: tuple, kwargs: Mapping[str, Any]) -> LayerCall:
    """Split a recorded decoder-layer call into hidden state, other arguments and cache slot."""
    kw = dict(kwargs)
    hidden = args[0] if args else kw.pop("hidden_states")
    rest = list(args[1:])
    slot: tuple[str, Any] | None = None
    for j, arg in enumerate(rest):  # GPT-2 passes its cache positionally
        if _is_cache(arg):
            rest[j], slot = None, ("arg", j)
    for key, value in list(kw.items()):
        if _is_cache(value) or (key in _CACHE_KEYS and value is None):
            kw[key] = None
            slot = slot or ("kw", key)
    return LayerCall(hidden.detach(), tuple(rest), kw, slot)


def first_argument(args: tuple, kwargs: Mapping[str, Any]) -> torch.Tensor:
    """The first tensor argument of a recorded module call (e.g. the final norm's input)."""
    return (args[0] if args else next(iter(kwargs.values()))).detach()


# -- the runtime -------------------------------------------------------------------------------
class Runtime:
    """Runs one Hugging Face causal LM: whole forwards, single layers and the unembedding.

    Args:
        hf_model: the ``*ForCausalLM`` module.
        adapter: its architecture adapter (module paths).
        n_layers: number of decoder layers.
    """

    def __init__(self, hf_model: nn.Module, adapter: Adapter, n_layers: int) -> None:
        self.hf_model = hf_model
        self.adapter = adapter
        self.n_layers = n_layers

    # -- paths -------------------------------------------------------------------------------
    @cached_property
    def layer_paths(self) -> list[str]:
        """Module path of every decoder layer, in order."""
        return [f"{self.adapter.layers}.{i}" for i in range(self.n_layers)]

    @property
    def final_norm_path(self) -> str:
        return self.adapter.final_norm

    def layer(self, index: int) -> nn.Module:
        return self.hf_model.get_submodule(self.layer_paths[index])

    def mlp_branch_path(self, index: int) -> str:
        """Path of the module that takes decoder layer ``index``'s MLP branch input (its
        ``mlp.in`` norm): cut to one position there, the MLP runs on that position only and the
        layer's residual add broadcasts it (see :func:`causalpatch.hooks.last_position_only`)."""
        return f"{self.layer_paths[index]}.{self.adapter.sites['mlp.in'].module}"

    @cached_property
    def _params(self) -> set[str]:
        return set(inspect.signature(self.hf_model.forward).parameters)

    # -- whole forward passes ----------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                cache: Any = None, keep_cache: bool = False, last_only: bool = False
                ) -> tuple[torch.Tensor, Any]:
        """One forward pass of ``input_ids`` ``[batch, pos]``.

        Args:
            attention_mask: ``[batch, pos]`` for padded batches.
            cache: a prefix cache (from an earlier ``forward(..., keep_cache=True)``); it is
                deep-copied, so the caller's cache is never extended.
            keep_cache: return the cache of this run.
            last_only: compute logits only at the last position (``[batch, 1, vocab]``).

        Returns:
            ``(logits [batch, pos or 1, vocab], cache or None)``.
        """
        kwargs: dict[str, Any] = {"input_ids": input_ids,
                                  "use_cache": keep_cache or cache is not None}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        if cache is not None:
            kwargs["cache" if "cache" in self._params else "past_key_values"] = copy.deepcopy(
                cache)
        if last_only and "logits_to_keep" in self._params:
            kwargs["logits_to_keep"] = 1
        out = self.hf_model(**kwargs)
        logits = out.logits if not last_only else out.logits[:, -1:]
        if not kwargs["use_cache"]:
            return logits, None
        found = getattr(out, "cache", None)
        return logits, found if found is not None else getattr(out, "past_key_values", None)

    # -- single layers -------------------------------------------------------------------------
    def run_layer(self, index: int, call: LayerCall, hidden: torch.Tensor,
                  prefix_cache: Any = None, prefix_rows: torch.Tensor | None = None
                  ) -> torch.Tensor:
        """Decoder layer ``index`` on ``hidden`` ``[rows, q, d_model]`` with the recorded call.

        ``prefix_cache`` holds the keys/values of the positions before the ``q`` computed ones
        (a Hugging Face cache; never modified). By default it has one row, broadcast to every
        row of ``hidden``; with ``prefix_rows`` (``[rows]`` long) row ``i`` of ``hidden`` uses
        row ``prefix_rows[i]`` of the cache instead (rows whose prefixes differ, e.g. noise
        draws).
        """
        cache = self.row_cache(prefix_cache, index, hidden.shape[0], prefix_rows)
        args, kwargs = call.bind(cache)
        out = self.layer(index)(hidden, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    @staticmethod
    def row_cache(template: Any, layer: int, rows: int, index: torch.Tensor | None = None
                  ) -> Any:
        """A shallow cache whose layer ``layer`` holds ``template``'s prefix for ``rows`` rows:
        its one row broadcast, or its rows ``index`` (``[rows]``) when given."""
        if template is None:
            return None
        cache = copy.copy(template)
        cache.layers = list(template.layers)
        entry = copy.copy(template.layers[layer])
        if getattr(entry, "keys", None) is not None and entry.keys.numel() > 0:
            if index is None:
                entry.keys = entry.keys.expand(rows, *entry.keys.shape[1:])
                entry.values = entry.values.expand(rows, *entry.values.shape[1:])
            else:
                index = index.to(entry.keys.device)
                entry.keys = entry.keys.index_select(0, index)
                entry.values = entry.values.index_select(0, index)
        cache.layers[layer] = entry
        return cache

    @staticmethod
    def crop_cache(cache: Any, length: int) -> Any:
        """A copy of ``cache`` holding only its first ``length`` positions (tensors shared, not
        copied), or ``None`` when a layer cannot be cut exactly (a sliding-window layer that
        already dropped positions, or an unknown layer type)."""
        from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

        out = copy.copy(cache)
        out.layers = []
        for entry in cache.layers:
            if type(entry) not in (DynamicLayer, DynamicSlidingWindowLayer):
                return None
            new = copy.copy(entry)
            if getattr(entry, "keys", None) is not None and entry.keys.numel() > 0:
                if isinstance(entry, DynamicSlidingWindowLayer):
                    return None  # its mask sizes depend on what it dropped: record instead
                if entry.keys.shape[-2] < length:
                    return None
                new.keys = entry.keys[..., :length, :]
                new.values = entry.values[..., :length, :]
            out.layers.append(new)
        return out

    @staticmethod
    def cache_rows(cache: Any, index: Sequence[int]) -> Any:
        """A cache whose rows are ``cache``'s rows ``index``, in order (repeats allowed: one row
        broadcast to several); a run of consecutive rows shares ``cache``'s tensors, other
        selections copy. ``None`` for ``None``."""
        if cache is None:
            return None
        index = list(index)
        lo = index[0] if index else 0
        consecutive = index == list(range(lo, lo + len(index)))
        out = copy.copy(cache)
        out.layers = []
        for entry in cache.layers:
            new = copy.copy(entry)
            if getattr(entry, "keys", None) is not None and entry.keys.numel() > 0:
                if consecutive:
                    new.keys = entry.keys[lo : lo + len(index)]
                    new.values = entry.values[lo : lo + len(index)]
                else:
                    at = torch.tensor(index, dtype=torch.long, device=entry.keys.device)
                    new.keys = entry.keys.index_select(0, at)
                    new.values = entry.values.index_select(0, at)
            out.layers.append(new)
        return out

    @staticmethod
    def stack_caches(caches: Sequence[Any]) -> Any:
        """One cache whose rows are the rows of ``caches`` (same layer types and lengths), in
        order: the ``prefix_cache`` of :meth:`run_layer` for rows of several prompts, picked with
        ``prefix_rows``."""
        if len(caches) == 1:
            return caches[0]
        out = copy.copy(caches[0])
        out.layers = []
        for entries in zip(*(c.layers for c in caches)):
            new = copy.copy(entries[0])
            if getattr(entries[0], "keys", None) is not None and entries[0].keys.numel() > 0:
                new.keys = torch.cat([e.keys for e in entries])
                new.values = torch.cat([e.values for e in entries])
            out.layers.append(new)
        return out

    # -- the readout ---------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The token embedding module's output for ``input_ids`` ``[..., pos]`` (what the
        ``embed`` site sees, e.g. Gemma's scaled embeddings): ``[..., pos, d_model]``."""
        return self.hf_model.get_submodule(self.adapter.embed)(input_ids)

    def unembed(self, hidden: torch.Tensor, config: Any,
                columns: Sequence[int] | None = None) -> torch.Tensor:
        """Final norm, output projection and soft-cap: ``[..., d_model] -> [..., vocab]``.

        With ``columns``, the result holds only those vocabulary entries, in ascending order
        without repeats: ``[..., len(set(columns))]`` (enough for metrics that read a few
        answer logits). Only they are computed when the output projection is a plain
        ``nn.Linear``; otherwise every logit is computed and those are taken.
        """
        root = self.hf_model
        head = root.get_submodule(self.adapter.unembed)
        normed = root.get_submodule(self.adapter.final_norm)(hidden)
        attr = self.adapter.logit_softcap_attr
        cap = getattr(config, attr, None) if attr else None
        cols = None if columns is None else sorted(set(columns))
        # an offloaded head (accelerate, weights on "disk"/"cpu" loaded per call) has meta
        # weights outside its own forward: compute every logit through the module then
        if cols is not None and isinstance(head, nn.Linear) and head.weight.device.type != "meta":
            weight = head.weight
            index = torch.tensor(cols, dtype=torch.long, device=weight.device)
            logits = normed.to(weight.device) @ weight[index].T
            if head.bias is not None:
                logits = logits + head.bias[index]
            return torch.tanh(logits / cap) * cap if cap else logits
        logits = head(normed)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits if cols is None else logits[..., cols]

    # -- the linear readout: logit lens and direct logit attribution --------------------------
    # Everything a method needs to project residual-stream writes onto the logits: the final
    # norm with its statistics frozen, the rows of the unembedding, each block's output
    # projection and, where a family normalises a block's output before the residual add
    # (Gemma 2/3), that post-block norm. Weights are returned as views, never copied.
    def final_softcap(self, config: Any) -> float | None:
        """The final logit soft-cap of this model (``tanh(logits / cap) * cap``), or ``None``."""
        attr = self.adapter.logit_softcap_attr
        cap = getattr(config, attr, None) if attr else None
        return float(cap) if cap else None

    def freeze_norm(self, path: str, x: torch.Tensor, dtype: torch.dtype = torch.float64
                    ) -> FrozenNorm:
        """The norm module at ``path`` with its statistics frozen at ``x`` ``[..., d_model]``
        (see :class:`FrozenNorm`), computed in ``dtype`` and checked against the module's own
        output on ``x``.

        Raises:
            UnsupportedArchitectureError: the module does not compute as the adapter's
                ``norm`` declares (the frozen map would not reproduce it).
        """
        module = self.hf_model.get_submodule(path)
        kind = self.adapter.norm
        weight = getattr(module, "weight", None)
        _check_loaded(weight, path)
        xs = x.detach().to(dtype)
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        if eps is None or kind not in ("rms", "rms_offset", "layer"):
            raise UnsupportedArchitectureError(
                f"cannot read the norm at {path!r} ({type(module).__name__}) as a "
                f"{kind!r} norm: it has no eps attribute or the kind is unknown")
        ones = torch.ones(x.shape[-1], dtype=dtype, device=x.device)
        gain = ones if weight is None else weight.detach().to(device=x.device, dtype=dtype)
        bias = None
        if kind == "layer":
            centred = xs - xs.mean(-1, keepdim=True)
            scale = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps)
            b = getattr(module, "bias", None)
            bias = None if b is None else b.detach().to(device=x.device, dtype=dtype)
        else:
            scale = torch.rsqrt(xs.pow(2).mean(-1, keepdim=True) + eps)
            if kind == "rms_offset":
                gain = gain + 1.0
        frozen = FrozenNorm(scale, gain, bias, kind == "layer")
        with torch.no_grad():
            actual = module(x.detach()).to(dtype)
        err = (frozen(xs) - actual).abs().max().item() if x.numel() else 0.0
        if not err <= 1e-4 * (1.0 + actual.abs().max().item()):
            raise UnsupportedArchitectureError(
                f"the norm at {path!r} ({type(module).__name__}) does not compute as this "
                f"adapter's norm={kind!r} declares (max difference {err:.3g}); the linear "
                "readout (logit lens / direct logit attribution) cannot be frozen exactly. Fix "
                "the adapter's `norm` field")
        return frozen

    def freeze_final_norm(self, x: torch.Tensor, dtype: torch.dtype = torch.float64
                          ) -> FrozenNorm:
        """The final norm frozen at its input ``x`` (the last layer's ``resid_post``)."""
        return self.freeze_norm(self.adapter.final_norm, x, dtype)

    def post_norm_input(self, block: str) -> str | None:
        """The site kind whose value block ``"attn"``/``"mlp"``'s post-block norm normalises
        into the residual write (Gemma 2/3: ``"attn.raw"``), or ``None`` when the block's
        projection output is added to the residual stream as it is."""
        return self.adapter.post_norm_inputs.get(block)

    def freeze_post_norm(self, index: int, block: str, raw: torch.Tensor,
                         dtype: torch.dtype = torch.float64) -> FrozenNorm:
        """Layer ``index``'s post-block norm of ``block`` frozen at the block's raw output
        ``raw`` (the value of :meth:`post_norm_input`'s site)."""
        if self.post_norm_input(block) is None:
            raise InvalidArgumentError(f"the {self.adapter.name} {block} block has no post-norm")
        path = f"{self.layer_paths[index]}.{self.adapter.sites[block].module}"
        return self.freeze_norm(path, raw, dtype)

    def output_projection(self, index: int, block: str
                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Layer ``index``'s output projection of ``block`` as ``(W [d_in, d_model], bias
        [d_model] or None)``, so that the projection's output is ``x @ W + bias`` for its input
        ``x``: the flattened ``attn.z`` (``d_in = n_heads * d_head``, head ``h`` owning rows
        ``h * d_head ... (h + 1) * d_head``) or ``mlp.post`` (``d_in = d_mlp``). The block's
        residual write is that output (after the post-block norm where there is one)."""
        kinds = {"attn": "attn.z", "mlp": "mlp.post"}
        if block not in kinds:
            raise InvalidArgumentError(f"block must be 'attn' or 'mlp', got {block!r}")
        spec = self.adapter.sites[kinds[block]]
        path = f"{self.layer_paths[index]}.{spec.module}"
        module = self.hf_model.get_submodule(path)
        weight = getattr(module, "weight", None)
        _check_loaded(weight, path)
        if isinstance(module, nn.Linear):
            w = module.weight.detach().T
        elif (isinstance(weight, torch.Tensor) and hasattr(module, "nf") and weight.dim() == 2
              and weight.shape[1] == module.nf):
            w = weight.detach()  # GPT-2's Conv1D: x @ weight + bias
        else:
            raise UnsupportedArchitectureError(
                f"the output projection at {path!r} ({type(module).__name__}) is neither a "
                "Linear nor a Conv1D; per-head/per-neuron attribution cannot read its weights")
        bias = getattr(module, "bias", None)
        return w, None if bias is None else bias.detach()

    def unembed_rows(self, tokens: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The unembedding rows of ``tokens``: ``(W [k, d_model], bias [k] or None)``, so that
        the pre-cap logit of token ``tokens[j]`` is ``ln_final(x) @ W[j] + bias[j]``."""
        path = self.adapter.unembed
        head = self.hf_model.get_submodule(path)
        _check_loaded(getattr(head, "weight", None), path)
        if not isinstance(head, nn.Linear):
            raise UnsupportedArchitectureError(
                f"the output projection at {path!r} ({type(head).__name__}) is not a Linear")
        index = torch.tensor(list(tokens), dtype=torch.long, device=head.weight.device)
        rows = head.weight.detach().index_select(0, index)
        bias = None if head.bias is None else head.bias.detach().index_select(0, index)
        return rows, bias

    def pos_embed_path(self) -> str | None:
        """Path of the learned absolute position embedding (GPT-2), or ``None``."""
        return self.adapter.pos_embed


@dataclass
class FrozenNorm:
    """A normalisation with its per-vector statistics frozen at one input ``x``: the affine map
    ``part -> centre(part) * scale * gain`` (linear), plus ``bias`` once. On ``x`` itself it
    gives the module's output, and since it is linear the frozen images of parts that sum to
    ``x`` sum to the module's output minus ``bias``: the exact decomposition behind direct logit
    attribution.

    Attributes:
        scale: ``[..., 1]`` ``1 / rms(x)`` (RMSNorm) or ``1 / std(x)`` (LayerNorm), per vector.
        gain: ``[d]`` the elementwise gain (``w``, or ``1 + w`` for Gemma).
        bias: ``[d]`` LayerNorm's bias, or ``None``.
        centred: LayerNorm: each part is centred (its mean over ``d`` removed) first.
    """

    scale: torch.Tensor
    gain: torch.Tensor
    bias: torch.Tensor | None
    centred: bool

    def linear(self, part: torch.Tensor) -> torch.Tensor:
        """The frozen linear map of ``part`` ``[..., d]`` (no bias)."""
        if self.centred:
            part = part - part.mean(-1, keepdim=True)
        return part * self.scale * self.gain

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        return out if self.bias is None else out + self.bias

    def pullback(self, u: torch.Tensor) -> torch.Tensor:
        """The vector ``v`` with ``linear(part) . u == part . v`` for every ``part`` (the
        adjoint: a readout direction ``u`` after the norm as a direction before it)."""
        v = u * self.scale * self.gain
        return v - v.mean(-1, keepdim=True) if self.centred else v


def _check_loaded(weight: Any, path: str) -> None:
    if isinstance(weight, torch.Tensor) and weight.device.type == "meta":
        raise InvalidArgumentError(
            f"the weights of {path!r} are offloaded (meta tensors outside the forward pass); "
            "the linear readout needs them in memory: load the model without disk offload")


def stack_paths(runtime: Runtime) -> Sequence[str]:
    """Paths a staircase needs recorded: every decoder layer, then the final norm."""
    return [*runtime.layer_paths, runtime.final_norm_path]

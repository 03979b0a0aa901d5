"""Path patching (Wang et al., 2022): a sender's effect through the direct path into receivers.

Activation patching a head measures everything downstream of it. Path patching isolates one
route: the effect of a *sender* (an attention head, or an MLP) that reaches the *receivers*
(chosen heads' query/key/value inputs, or the final residual stream read by the unembedding)
directly through the residual stream, without passing through any other head or MLP.

Two passes per sender, as in the IOI paper:

1. Run the *base* prompt with the sender's activation taken from the *source* prompt and every
   other head output (``attn.z``) and every MLP output frozen at its base-run value. Only the
   sender's change moves, and it reaches each later layer only through the residual stream.
   Record the receivers' inputs: ``attn.q``/``attn.k``/``attn.v`` of the receiver heads, or the
   final residual stream at the last position (``receiver_input="resid"``).
2. Run the base prompt again with only the receivers' recorded inputs patched in, and measure
   the metric at the last position.

``direction="noise"`` (default, as in the paper) patches corrupted values into the clean run;
``"denoise"`` patches clean values into the corrupted run. The effect is normalised like
:func:`causalpatch.activation_patching`: ``(patched - base) / (source - base)``.

How it is computed (exactly, up to float rounding): with everything but the sender frozen,
each decoder layer after the sender adds exactly its base-run branch outputs to the residual
stream, so the stream entering any later layer is the base stream plus the sender's change
``delta`` (the output of the sender's layer with and without the sender patched). Pass 1 runs
only the sender's layer (all senders of a layer as rows of one batch) and each receiver layer
up to its q/k/v projections; pass 2 runs only the layers from the first receiver on. Positions
before the first token where the two prompts differ are identical in every run, so their keys
and values come from the base run and only the remaining positions are computed.

Example::

    from causalpatch import InterpretableModel
    from causalpatch.datasets import IOIDataset
    from causalpatch.path_patching import path_patching

    model = InterpretableModel("smollm2")
    ioi = IOIDataset(model, n=8)
    direct = path_patching(model, ioi, senders="attn_head", receivers="logits")
    direct.effect_matrix.shape          # (30, 9): sender layer x sender head
"""

from __future__ import annotations

import inspect
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .engine import unembed
from .errors import InvalidArgumentError, InvalidTypeError, OutOfRangeError
from .hooks import Hook, StopForward, hooked, recorded_calls
from .metrics import Metric, MetricInputs, get_metric, normalize as normalize_fn
from .names import Site
from .patching import Direction, make_pairs, resolve_answers

if TYPE_CHECKING:
    from .model import InterpretableModel
    from .result import PatchingResult

SenderSpec = str | Sequence[tuple[int, int | None]]
ReceiverSpec = str | Sequence[tuple[int, int]]

_INPUT_KINDS = ("q", "k", "v")


# -- running decoder layers by hand -------------------------------------------------------------
class _PrefixKV:
    """Stands in for a Hugging Face cache during one decoder-layer call.

    Holds the keys/values of the positions before the computed window,
    ``[rows, n_kv_heads, start, d_head]``; the attention's ``cache.update`` call prepends them.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = keys, values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        keys = torch.cat([self.keys.to(key_states.dtype), key_states], dim=-2)
        values = torch.cat([self.values.to(value_states.dtype), value_states], dim=-2)
        return keys, values


def _model_params(model: InterpretableModel) -> set[str]:
    return set(inspect.signature(model.hf_model.forward).parameters)


def _cache_of(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def kv_of(cache: Any, n_layers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer ``(keys, values)`` ``[batch, n_kv_heads, pos, d_head]`` of a HF cache."""
    if hasattr(cache, "layers"):
        return [(cache.layers[i].keys, cache.layers[i].values) for i in range(n_layers)]
    return [(cache.key_cache[i], cache.value_cache[i]) for i in range(n_layers)]  # older caches


def full_run(model: InterpretableModel, ids: torch.Tensor, hooks: Sequence[Hook] = (),
             want_kv: bool = False
             ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]] | None]:
    """One forward pass of unpadded ``ids`` ``[batch, pos]`` with ``hooks``.

    Returns the last-position logits ``[batch, vocab]`` (float32) and, with ``want_kv``, each
    layer's keys/values ``[batch, n_kv_heads, pos, d_head]``.
    """
    params = _model_params(model)
    kwargs: dict[str, Any] = {"input_ids": ids, "use_cache": want_kv}
    if "logits_to_keep" in params:
        kwargs["logits_to_keep"] = 1
    with torch.no_grad(), hooked(model.hf_model, hooks, model.dims):
        out = model.hf_model(**kwargs)
    logits = out.logits[:, -1].float()
    kv = kv_of(_cache_of(out), model.n_layers) if want_kv else None
    return logits, kv


def cachers(store: dict[str, torch.Tensor], sites: Sequence[Site]) -> list[Hook]:
    """Read-only hooks saving each site's activation into ``store[site.name]``."""

    def saver(name: str) -> Callable[[torch.Tensor], None]:
        def save(act: torch.Tensor) -> None:
            store[name] = act.detach().clone()

        return save

    return [Hook(site, saver(site.name)) for site in sites]


class LayerStack:
    """Call a model's decoder layers one at a time on positions ``start..T-1`` of a prompt.

    The layers are the model's own modules, called with exactly the arguments Hugging Face
    passes them (masks, rotary embeddings), recorded from a real forward pass of the prompt's
    suffix on top of a cache of its prefix. Rows of ``hidden`` may be any number of variants
    of the prompt that agree on the token ids; each call takes the keys/values of the prefix
    positions for its rows.

    Args:
        model: the model.
        ids: the prompt's token ids (length ``T``).
        start: first computed position (``0 <= start < T``).
    """

    def __init__(self, model: InterpretableModel, ids: Sequence[int], start: int) -> None:
        from transformers.cache_utils import Cache

        self.model = model
        self.T = len(ids)
        self.start = start
        if not 0 <= start < self.T:
            raise OutOfRangeError(f"window start {start} outside a prompt of {self.T} tokens")
        hf = model.hf_model
        t = torch.tensor([list(ids)], dtype=torch.long, device=model.device)
        params = _model_params(model)
        kwargs: dict[str, Any] = {"input_ids": t[:, start:], "use_cache": start > 0}
        if "logits_to_keep" in params:
            kwargs["logits_to_keep"] = 1
        paths = [f"{model.adapter.layers}.{i}" for i in range(model.n_layers)]
        with torch.no_grad():
            if start > 0:
                prefix = hf(input_ids=t[:, :start], use_cache=True)
                kwargs["cache" if "cache" in params else "past_key_values"] = _cache_of(prefix)
            with recorded_calls(hf, paths) as calls:
                hf(**kwargs)
        self.modules = [hf.get_submodule(p) for p in paths]
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any], tuple[str, Any] | None]] = []
        for path in paths:
            args, kw = calls[path]
            kw = dict(kw)
            rest = list(args[1:]) if args else []
            if not args:
                kw.pop("hidden_states", None)
            slot: tuple[str, Any] | None = None
            for j, arg in enumerate(rest):
                if isinstance(arg, Cache):
                    rest[j], slot = None, ("arg", j)
            for key, value in list(kw.items()):
                if isinstance(value, Cache):
                    kw[key], slot = None, ("kw", key)
            self.calls.append((tuple(rest), kw, slot))

    @property
    def width(self) -> int:
        """Number of computed positions, ``T - start``."""
        return self.T - self.start

    def layer(self, index: int, hidden: torch.Tensor, hooks: Sequence[Hook] = (),
              prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
              stop_ok: bool = False) -> torch.Tensor | None:
        """Run decoder layer ``index`` on ``hidden`` ``[rows, T - start, d_model]``.

        Args:
            hooks: installed for this call only (via :func:`causalpatch.hooks.hooked`).
            prefix: keys/values of positions ``< start`` for these rows,
                ``[rows, n_kv_heads, start, d_head]`` (required when ``start > 0``).
            stop_ok: a hook may raise :class:`StopForward` to end the call early (returns None).

        Returns:
            The layer's output ``[rows, T - start, d_model]``.
        """
        args, kw, slot = self.calls[index]
        if slot is not None:
            if prefix is None:
                raise InvalidArgumentError("prefix keys/values are needed when start > 0")
            kv = _PrefixKV(*prefix)
            if slot[0] == "arg":
                args = tuple(kv if j == slot[1] else a for j, a in enumerate(args))
            else:
                kw = {**kw, slot[1]: kv}
        try:
            with torch.no_grad(), hooked(self.model.hf_model, hooks, self.model.dims):
                out = self.modules[index](hidden, *args, **kw)
        except StopForward:
            if stop_ok:
                return None
            raise
        return out[0] if isinstance(out, tuple) else out


# -- arguments -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Sender:
    layer: int
    head: int | None  # None: the layer's MLP

    @property
    def label(self) -> str:
        return f"L{self.layer} MLP" if self.head is None else f"L{self.layer}H{self.head}"


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            return int(value.item())
        raise InvalidTypeError(f"{what} must be an int, got {value!r}")
    return value


def _check_layer(layer: int, model: InterpretableModel, what: str) -> None:
    if not 0 <= layer < model.n_layers:
        raise OutOfRangeError(
            f"{what} layer {layer} is out of range: this model has {model.n_layers} layers, so "
            f"layers must be in [0, {model.n_layers - 1}]")


def _check_head(head: int, model: InterpretableModel, what: str) -> None:
    if not 0 <= head < model.n_heads:
        raise OutOfRangeError(
            f"{what} head {head} is out of range: this model has {model.n_heads} heads, so "
            f"heads must be in [0, {model.n_heads - 1}]")


def _receivers(model: InterpretableModel, receivers: ReceiverSpec,
               receiver_input: str | Sequence[str] | None
               ) -> tuple[list[tuple[int, int]] | None, tuple[str, ...]]:
    """``(receiver heads or None for the final residual, input kinds)``."""
    if isinstance(receivers, str):
        if receivers not in ("logits", "resid"):
            raise InvalidArgumentError(
                f"unknown receivers {receivers!r}; expected 'logits' (the final residual stream) "
                "or a list of (layer, head) pairs")
        if receiver_input not in (None, "resid"):
            raise InvalidArgumentError(
                f"receivers={receivers!r} is the final residual stream; receiver_input must be "
                f"'resid' (or None), got {receiver_input!r}")
        return None, ("resid",)
    if receiver_input == "resid":
        raise InvalidArgumentError(
            "receiver_input='resid' means the final residual stream: pass receivers='logits' "
            "instead of a list of heads")
    kinds_in = ("q",) if receiver_input is None else (
        (receiver_input,) if isinstance(receiver_input, str) else tuple(receiver_input))
    if not kinds_in or any(k not in _INPUT_KINDS for k in kinds_in):
        raise InvalidArgumentError(
            f"receiver_input must be 'q', 'k', 'v' (or several of them, e.g. ('q', 'k')) for "
            f"head receivers, or 'resid' with receivers='logits'; got {receiver_input!r}")
    kinds = tuple(dict.fromkeys(kinds_in))
    try:
        items = list(receivers)
    except TypeError:
        raise InvalidTypeError(
            f"receivers must be 'logits' or a list of (layer, head) pairs, got {receivers!r}"
        ) from None
    if not items:
        raise InvalidArgumentError("receivers is empty: give at least one (layer, head) pair")
    out = []
    for item in items:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise InvalidTypeError(f"each receiver must be a (layer, head) pair, got {item!r}")
        layer, head = _int(item[0], "receiver layer"), _int(item[1], "receiver head")
        _check_layer(layer, model, "receiver")
        _check_head(head, model, "receiver")
        out.append((layer, head))
    if len(set(out)) != len(out):
        raise InvalidArgumentError(f"receivers has repeated entries: {out}")
    return sorted(out), kinds


def _senders(model: InterpretableModel, senders: SenderSpec, last_layer: int | None
             ) -> tuple[list[_Sender], str]:
    """All senders (result cells in order) and the component name.

    ``last_layer``: the latest receiver layer, or None for the final residual stream.
    """
    n_layers, n_heads = model.n_layers, model.n_heads
    if isinstance(senders, str):
        if senders in ("attn_head", "head", "heads"):
            return [_Sender(layer, h) for layer in range(n_layers) for h in range(n_heads)], \
                "attn_head"
        if senders == "mlp":
            return [_Sender(layer, None) for layer in range(n_layers)], "mlp"
        raise InvalidArgumentError(
            f"unknown senders {senders!r}; expected 'attn_head', 'mlp' or a list of "
            "(layer, head) pairs (head None for the layer's MLP)")
    try:
        items = list(senders)
    except TypeError:
        raise InvalidTypeError(
            f"senders must be 'attn_head', 'mlp' or a list of (layer, head) pairs, got {senders!r}"
        ) from None
    if not items:
        raise InvalidArgumentError("senders is empty: give at least one (layer, head) pair")
    out = []
    for item in items:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise InvalidTypeError(
                f"each sender must be a (layer, head) pair (head None for the MLP), got {item!r}")
        layer = _int(item[0], "sender layer")
        _check_layer(layer, model, "sender")
        head = None if item[1] is None else _int(item[1], "sender head")
        if head is not None:
            _check_head(head, model, "sender")
        out.append(_Sender(layer, head))
    if len(set(out)) != len(out):
        raise InvalidArgumentError(f"senders has repeated entries: {[s.label for s in out]}")
    return out, "senders"


def _check_order(senders: list[_Sender], receivers: list[tuple[int, int]] | None,
                 explicit: bool) -> None:
    """Receivers must come after senders (a head reads the residual stream of its layer)."""
    if receivers is None:
        return
    if explicit:
        for s in senders:
            for layer, head in receivers:
                if layer <= s.layer:
                    raise InvalidArgumentError(
                        f"receiver layer {layer} must come after sender layer {s.layer}: "
                        f"receiver (layer {layer}, head {head}) cannot read the output of sender "
                        f"{s.label}; path patching needs every receiver in a later layer than "
                        "every sender")
    elif max(layer for layer, _ in receivers) == 0:
        raise InvalidArgumentError(
            "receiver layer 0 must come after sender layer 0: no sender comes before receivers "
            "in layer 0; choose receivers in later layers")


def _metric_inputs(metric: Metric, correct: int | None, incorrect: int | None,
                   source_last: torch.Tensor, n: int) -> MetricInputs:
    for need, value in (("correct", correct), ("incorrect", incorrect)):
        if need in metric.needs and value is None:
            raise InvalidArgumentError(
                f"metric {metric.name!r} needs {need} answer tokens: pass {need}=' Mary' (a "
                f"single token) or metric_kwargs={{'{need}_token': id}}")
    return MetricInputs(
        target_logits=source_last.float().view(1, -1).expand(n, -1),
        correct=None if correct is None else torch.full((n,), correct, dtype=torch.long),
        incorrect=None if incorrect is None else torch.full((n,), incorrect, dtype=torch.long),
    )


# -- one pair --------------------------------------------------------------------------------------
@dataclass
class _PairRuns:
    """Base and source runs of one pair and the layer stack over the differing window."""

    stack: LayerStack
    base: dict[str, torch.Tensor]  # site name -> [1, T, ...]
    source: dict[str, torch.Tensor]
    base_kv: list[tuple[torch.Tensor, torch.Tensor]] | None
    base_last: torch.Tensor  # [vocab]
    source_last: torch.Tensor


def _site(model: InterpretableModel, kind: str, layer: int) -> Site:
    return model.site(f"blocks.{layer}.{kind}")


def _final_site(model: InterpretableModel) -> Site:
    return _site(model, "resid_post", model.n_layers - 1)


def _pair_runs(model: InterpretableModel, base_ids: list[int], source_ids: list[int],
               sender_layers: Sequence[int], receiver_sites: Sequence[str] = ()) -> _PairRuns:
    n = model.n_layers
    T = len(base_ids)
    differ = [i for i in range(T) if base_ids[i] != source_ids[i]]
    start = min(differ[0], T - 1) if differ else T - 1
    base_sites = ([_site(model, k, layer) for layer in range(n)
                   for k in ("resid_pre", "attn.z", "mlp")] + [_final_site(model)]
                  + [model.site(name) for name in receiver_sites])
    source_sites = [_site(model, k, layer) for layer in sorted(set(sender_layers))
                    for k in ("attn.z", "mlp")]
    base: dict[str, torch.Tensor] = {}
    source: dict[str, torch.Tensor] = {}
    device = model.device
    base_t = torch.tensor([base_ids], dtype=torch.long, device=device)
    source_t = torch.tensor([source_ids], dtype=torch.long, device=device)
    base_last, base_kv = full_run(model, base_t, cachers(base, base_sites), want_kv=start > 0)
    source_last, _ = full_run(model, source_t, cachers(source, source_sites))
    stack = LayerStack(model, base_ids, start)
    return _PairRuns(stack, base, source, base_kv, base_last[0], source_last[0])


def _prefix(runs: _PairRuns, layer: int, rows: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    if runs.base_kv is None:
        return None
    s = runs.stack.start
    keys, values = runs.base_kv[layer]
    return (keys[:, :, :s].expand(rows, -1, -1, -1), values[:, :, :s].expand(rows, -1, -1, -1))


def _unit_index(model: InterpretableModel, kind: str, heads: Sequence[int]) -> list[int]:
    """Query heads -> the units of site ``attn.{kind}`` they read (kv heads for k/v)."""
    if kind == "q":
        return sorted(set(heads))
    group = model.n_heads // model.n_kv_heads
    return sorted({h // group for h in heads})


def _sender_deltas(model: InterpretableModel, runs: _PairRuns, chunk: list[_Sender]
                   ) -> torch.Tensor:
    """Pass 1, sender side: the change of the residual stream after each sender's layer,
    ``[rows, T - start, d_model]``, with everything but the sender frozen."""
    stack = runs.stack
    s = stack.start
    q = stack.width
    delta = torch.zeros(len(chunk), q, model.d_model, dtype=model.dtype, device=model.device)
    by_layer: dict[int, list[int]] = defaultdict(list)
    for r, sender in enumerate(chunk):
        by_layer[sender.layer].append(r)
    for layer, rows in sorted(by_layer.items()):
        n_rows = len(rows)
        batch = n_rows + 1  # the last row patches nothing: the reference output
        z_name, mlp_name = f"blocks.{layer}.attn.z", f"blocks.{layer}.mlp"
        z_base, z_src = runs.base[z_name][:, s:], runs.source[z_name][:, s:]
        mlp_base, mlp_src = runs.base[mlp_name][:, s:], runs.source[mlp_name][:, s:]
        head_rows = [i for i, r in enumerate(rows) if chunk[r].head is not None]
        heads = [chunk[rows[i]].head for i in head_rows]
        mlp_rows = [i for i, r in enumerate(rows) if chunk[r].head is None]
        head_rows_t = torch.tensor(head_rows, dtype=torch.long, device=model.device)
        heads_t = torch.tensor(heads, dtype=torch.long, device=model.device)
        mlp_rows_t = torch.tensor(mlp_rows, dtype=torch.long, device=model.device)

        def freeze_z(act: torch.Tensor, z_base: torch.Tensor = z_base, z_src: torch.Tensor = z_src,
                     head_rows_t: torch.Tensor = head_rows_t, heads_t: torch.Tensor = heads_t
                     ) -> torch.Tensor:
            out = z_base.to(act.dtype).expand(act.shape[0], -1, -1, -1).clone()
            if len(heads_t):
                # [q, n, d_head] -> [n, q, d_head]: row i gets head heads_t[i] from the source
                out[head_rows_t, :, heads_t] = z_src[0][:, heads_t].transpose(0, 1).to(act.dtype)
            return out

        def freeze_mlp(act: torch.Tensor, mlp_base: torch.Tensor = mlp_base,
                       mlp_src: torch.Tensor = mlp_src, mlp_rows_t: torch.Tensor = mlp_rows_t
                       ) -> torch.Tensor:
            out = mlp_base.to(act.dtype).expand(act.shape[0], -1, -1).clone()
            if len(mlp_rows_t):
                out[mlp_rows_t] = mlp_src.to(act.dtype)
            return out

        hidden = runs.base[f"blocks.{layer}.resid_pre"][:, s:].expand(batch, -1, -1)
        hooks = [Hook(_site(model, "attn.z", layer), freeze_z),
                 Hook(_site(model, "mlp", layer), freeze_mlp)]
        out = stack.layer(layer, hidden, hooks, _prefix(runs, layer, batch))
        assert out is not None
        delta[rows] = out[:n_rows] - out[n_rows:]
    return delta


def _record_inputs(model: InterpretableModel, runs: _PairRuns, chunk: list[_Sender],
                   delta: torch.Tensor, receivers: list[tuple[int, int]], kinds: tuple[str, ...]
                   ) -> dict[tuple[int, str], tuple[list[int], torch.Tensor]]:
    """Pass 1, receiver side: the receivers' inputs with the sender's change in the residual.

    Returns ``{(layer, kind): (units, values [rows, T - start, n_units, d_head])}``.
    """
    stack = runs.stack
    s = stack.start
    heads_by_layer: dict[int, list[int]] = defaultdict(list)
    for layer, head in receivers:
        heads_by_layer[layer].append(head)
    recorded: dict[tuple[int, str], tuple[list[int], torch.Tensor]] = {}
    for layer, heads in sorted(heads_by_layer.items()):
        units = {k: _unit_index(model, k, heads) for k in kinds}
        # rows whose sender is in an earlier layer: others see the base input exactly
        rows = [r for r, sender in enumerate(chunk) if sender.layer < layer]
        values = {}
        for kind in kinds:
            name = f"blocks.{layer}.attn.{kind}"
            base_units = runs.base[name][:, s:, units[kind]]
            values[kind] = base_units.expand(len(chunk), -1, -1, -1).clone()
        if rows:
            store: dict[str, torch.Tensor] = {}
            wanted = set(kinds)

            def reader(kind: str) -> Callable[[torch.Tensor], None]:
                def read(act: torch.Tensor) -> None:
                    store[kind] = act[:, :, units[kind]].detach().clone()
                    if wanted <= set(store):
                        raise StopForward  # q/k/v read: the rest of the layer is not needed
                return read

            hidden = runs.base[f"blocks.{layer}.resid_pre"][:, s:] + delta[rows]
            hooks = [Hook(_site(model, f"attn.{k}", layer), reader(k)) for k in kinds]
            stack.layer(layer, hidden, hooks, _prefix(runs, layer, len(rows)), stop_ok=True)
            for kind in kinds:
                values[kind][rows] = store[kind]
        for kind in kinds:
            recorded[(layer, kind)] = (units[kind], values[kind])
    return recorded


def _receiver_logits(model: InterpretableModel, runs: _PairRuns, n_rows: int,
                     recorded: dict[tuple[int, str], tuple[list[int], torch.Tensor]]
                     ) -> torch.Tensor:
    """Pass 2: the base run with the receivers' recorded inputs; ``[rows, vocab]`` logits."""
    stack = runs.stack
    s = stack.start
    first = min(layer for layer, _ in recorded)
    hidden = runs.base[f"blocks.{first}.resid_pre"][:, s:].expand(n_rows, -1, -1)
    for layer in range(first, model.n_layers):
        hooks = []
        for (rec_layer, kind), (units, values) in recorded.items():
            if rec_layer != layer:
                continue
            units_t = torch.tensor(units, dtype=torch.long, device=model.device)

            def write(act: torch.Tensor, units_t: torch.Tensor = units_t,
                      values: torch.Tensor = values) -> torch.Tensor:
                out = act.clone()
                out[:, :, units_t] = values.to(act.dtype)
                return out

            hooks.append(Hook(_site(model, f"attn.{kind}", layer), write))
        out = stack.layer(layer, hidden, hooks, _prefix(runs, layer, n_rows))
        assert out is not None
        hidden = out
    with torch.no_grad():
        return unembed(model, hidden[:, -1]).float()


def _pair_values(model: InterpretableModel, runs: _PairRuns, senders: list[_Sender],
                 receivers: list[tuple[int, int]] | None, kinds: tuple[str, ...],
                 batch_size: int) -> torch.Tensor:
    """Last-position logits ``[n_senders, vocab]`` of the path-patched runs of one pair."""
    out = torch.empty(len(senders), model.vocab_size)
    for lo in range(0, len(senders), batch_size):
        chunk = senders[lo : lo + batch_size]
        delta = _sender_deltas(model, runs, chunk)
        if receivers is None:
            final = runs.base[_final_site(model).name][:, -1] + delta[:, -1]
            with torch.no_grad():
                logits = unembed(model, final).float()
        else:
            recorded = _record_inputs(model, runs, chunk, delta, receivers, kinds)
            logits = _receiver_logits(model, runs, len(chunk), recorded)
        out[lo : lo + len(chunk)] = logits.cpu()
    return out


# -- public API ------------------------------------------------------------------------------------
def path_patching(
    model: InterpretableModel,
    clean: Any,
    corrupted: Any = None,
    senders: SenderSpec = "attn_head",
    receivers: ReceiverSpec = "logits",
    receiver_input: str | Sequence[str] | None = None,
    metric: str | Metric | Callable[..., Any] | None = None,
    metric_kwargs: Mapping[str, Any] | None = None,
    *,
    correct: Any = None,
    incorrect: Any = None,
    direction: str | Direction = "noise",
    batch_size: int | None = None,
) -> PatchingResult:
    """Path patching: each sender's effect on the metric through the receivers only.

    Args:
        model: the :class:`~causalpatch.InterpretableModel`.
        clean: clean prompt(s) (string, token ids, an equal-length list) or a dataset with
            ``.clean``, ``.corrupted``, ``.correct``, ``.incorrect`` (then ``corrupted=None``).
        corrupted: corrupted prompt(s), the same token length as ``clean`` pairwise.
        senders: ``"attn_head"`` (every head, result ``(n_layers, n_heads)``), ``"mlp"`` (every
            MLP, result ``(n_layers,)``) or a list of ``(layer, head)`` pairs, ``head=None``
            for the layer's MLP (result ``(n_senders,)``, axis ``"sender"``).
        receivers: ``"logits"`` (the final residual stream at the last position, i.e. the
            direct effect on the output) or a list of ``(layer, head)`` pairs.
        receiver_input: which input of the receiver heads carries the path: ``"q"`` (default
            for heads), ``"k"``, ``"v"``, or several (``("k", "v")``); ``"resid"`` with
            ``receivers="logits"``. Keys/values under grouped-query attention belong to a
            key/value head shared by ``n_heads / n_kv_heads`` query heads: patching the
            receiver's k/v patches them for the whole group.
        metric: ``logit_diff`` etc. (see :mod:`causalpatch.metrics`); default: the dataset's
            metric, else ``logit_diff``.
        metric_kwargs / correct / incorrect: answer tokens (single-token strings or ids).
        direction: ``"noise"`` (default, as in Wang et al.: corrupted sender values into the
            clean run; 1.0 = this path alone breaks the behaviour as much as corrupting the
            whole prompt) or ``"denoise"`` (clean sender values into the corrupted run).
        batch_size: senders per batch (rows of one pass); default 256.

    Returns:
        :class:`~causalpatch.result.PatchingResult` with ``method="path_patching"``,
        ``effect_matrix`` ``(n_layers, n_heads)`` / ``(n_layers,)`` / ``(n_senders,)`` of
        normalised effects ``(patched - base) / (source - base)`` (averaged over pairs as in
        :mod:`causalpatch.sweep`: normalised on the means). Senders in a layer at or after
        every receiver have no path to them: their effect is exactly 0 (not computed).

    Raises:
        InvalidArgumentError: a receiver at or before an explicitly listed sender's layer
            ("receiver layer L must come after sender layer S"), bad receivers/inputs,
            mismatched prompt lengths, missing answers.
        NormalizationError: the metric does not tell the clean and corrupted runs apart.
    """
    from .result import PatchingResult

    t0 = time.perf_counter()
    try:
        direction_ = Direction(direction)
    except ValueError:
        raise InvalidArgumentError(
            f"unknown direction {direction!r}; expected 'noise' (corrupted into clean) or "
            "'denoise' (clean into corrupted)") from None
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(
            batch_size, int) or batch_size < 1):
        raise InvalidArgumentError(f"batch_size must be a positive int or None, got {batch_size!r}")
    if metric is None:
        metric = getattr(clean, "metric", None) if corrupted is None else None
        metric = metric or "logit_diff"
    m = get_metric(metric)
    correct, incorrect = resolve_answers(model, metric_kwargs, correct, incorrect)
    pairs = make_pairs(model, clean, corrupted, correct, incorrect)
    recv, kinds = _receivers(model, receivers, receiver_input)
    sender_list, component = _senders(model, senders, None if recv is None else max(
        layer for layer, _ in recv))
    _check_order(sender_list, recv, explicit=component == "senders")
    last = model.n_layers if recv is None else max(layer for layer, _ in recv)
    live = [i for i, s in enumerate(sender_list) if s.layer < last]
    live_senders = [sender_list[i] for i in live]
    for pair in pairs:
        _metric_inputs(m, pair.correct, pair.incorrect, torch.zeros(1), 1)
    chunk = batch_size or 256
    receiver_sites = sorted({f"blocks.{layer}.attn.{k}" for layer, _ in recv or [] for k in kinds})
    t_setup = time.perf_counter() - t0

    raw = torch.empty(len(pairs), len(sender_list))
    base_values = torch.empty(len(pairs))
    source_values = torch.empty(len(pairs))
    for i, pair in enumerate(pairs):
        base_ids, source_ids = ((pair.clean, pair.corrupted) if direction_ is Direction.NOISE
                                else (pair.corrupted, pair.clean))
        runs = _pair_runs(model, base_ids, source_ids, sorted({s.layer for s in live_senders}),
                          receiver_sites)
        ends = m(torch.stack([runs.base_last, runs.source_last]).cpu(),
                 _metric_inputs(m, pair.correct, pair.incorrect, runs.source_last.cpu(), 2))
        base_values[i], source_values[i] = ends[0], ends[1]
        raw[i] = ends[0]  # senders without a path to the receivers: exactly the base run
        if live_senders:
            logits = _pair_values(model, runs, live_senders, recv, kinds, chunk)
            raw[i, live] = m(logits, _metric_inputs(m, pair.correct, pair.incorrect,
                                                    runs.source_last.cpu(), len(live)))
    t_run = time.perf_counter() - t0 - t_setup

    mean_base, mean_source = base_values.mean(), source_values.mean()
    effect = normalize_fn(raw.mean(0), mean_base, mean_source, m.name)
    per_pair = (raw - base_values[:, None]) / (mean_source - mean_base)
    std = per_pair.std(0, unbiased=False) if len(pairs) > 1 else None
    if component == "attn_head":
        shape: tuple[int, ...] = (model.n_layers, model.n_heads)
        axes: tuple[str, ...] = ("layer", "head")
        labels: dict[str, list[Any]] = {"layer": list(range(model.n_layers)),
                                        "head": list(range(model.n_heads))}
    elif component == "mlp":
        shape, axes, labels = (model.n_layers,), ("layer",), {"layer": list(range(model.n_layers))}
    else:
        shape, axes = (len(sender_list),), ("sender",)
        labels = {"sender": [s.label for s in sender_list]}
    clean_v, corrupted_v = ((base_values, source_values) if direction_ is Direction.NOISE
                            else (source_values, base_values))
    decode = model.tokenizer.decode
    return PatchingResult(
        effect_matrix=effect.reshape(shape).float(),
        axes=axes,
        labels=labels,
        component=component,
        metric=m.name,
        direction=direction_.value,
        method="path_patching",
        model_name=model.name,
        clean_prompts=[decode(p.clean) for p in pairs],
        corrupted_prompts=[decode(p.corrupted) for p in pairs],
        clean_tokens=[model.to_str_tokens(p.clean) for p in pairs[:1]],
        clean_metric=float(clean_v.mean()),
        corrupted_metric=float(corrupted_v.mean()),
        normalized=True,
        per_pair=per_pair.reshape(len(pairs), *shape).float() if len(pairs) > 1 else None,
        std=None if std is None else std.reshape(shape).float(),
        timings={"setup_s": t_setup, "run_s": t_run, "total_s": time.perf_counter() - t0},
        extra={"n_pairs": len(pairs),
               "senders": [[s.layer, s.head] for s in sender_list],
               "receivers": "logits" if recv is None else [list(r) for r in recv],
               "receiver_input": list(kinds),
               "frozen": "every other attn.z and every mlp output",
               "n_computed": len(live_senders),
               "answers": [[p.correct, p.incorrect] for p in pairs[:1]]},
    )


__all__ = ["path_patching"]

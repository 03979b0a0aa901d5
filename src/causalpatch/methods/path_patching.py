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
and values come from the base run and only the remaining positions are computed: the base and
source runs are :func:`causalpatch.engine.run_pair` (shared prefix, staircase context), the
decoder layers are called by :func:`causalpatch.engine.run_layer`, and pairs are aggregated by
:mod:`causalpatch.assemble`'s one rule.

Example::

    from causalpatch import InterpretableModel, path_patching
    from causalpatch.datasets import IOIDataset

    model = InterpretableModel("smollm2")
    ioi = IOIDataset(model, n=8)
    direct = path_patching(model, ioi, senders="attn_head", receivers="logits")
    direct.effect_matrix.shape          # (30, 9): sender layer x sender head
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from ..assemble import GroupValues, Scale, answer_columns, build_result, run_pairs
from ..engine import PairRun, Staircase, prepare_staircase, run_layer, run_pair, unembed
from ..enums import Direction, parse
from ..errors import (InvalidArgumentError, InvalidTypeError, OutOfRangeError,
                      UnknownComponentError, UnsupportedArchitectureError)
from ..executors import resolve_executor
from ..hooks import Hook, StopForward
from ..metrics import Metric
from ..names import Site
from ..plan import (Pair, check_answers, check_int, choose_metric, make_pairs, metric_inputs,
                    resolve_answers)

if TYPE_CHECKING:
    from ..model import HookedModel
    from ..result import PatchingResult

SenderSpec = str | Sequence[tuple[int, int | None]]
ReceiverSpec = str | Sequence[tuple[int, int]]

_INPUT_KINDS = ("q", "k", "v")


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


def _check_layer(layer: int, model: HookedModel, what: str) -> None:
    if not 0 <= layer < model.n_layers:
        raise OutOfRangeError(
            f"{what} layer {layer} is out of range: this model has {model.n_layers} layers, so "
            f"layers must be in [0, {model.n_layers - 1}]")


def _check_head(head: int, model: HookedModel, what: str) -> None:
    if not 0 <= head < model.n_heads:
        raise OutOfRangeError(
            f"{what} head {head} is out of range: this model has {model.n_heads} heads, so "
            f"heads must be in [0, {model.n_heads - 1}]")


def _receivers(model: HookedModel, receivers: ReceiverSpec,
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


def _senders(model: HookedModel, senders: SenderSpec) -> tuple[list[_Sender], str]:
    """All senders (result cells in order) and the component name."""
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


# -- one pair --------------------------------------------------------------------------------------
def _site(model: HookedModel, kind: str, layer: int) -> Site:
    return model.site(f"blocks.{layer}.{kind}")


def _check_separable_heads(model: HookedModel) -> None:
    """Path patching freezes and patches single heads: the model must expose every head's
    output on its own (the per-head ``attn.z`` site, resolved as every sweep resolves it)."""
    try:
        if _site(model, "attn.z", 0).per_head:
            return
        reason = ""
    except UnknownComponentError as err:
        reason = f" ({err})"
    raise UnsupportedArchitectureError(
        f"path patching needs each attention head's output separately (the per-head attn.z "
        f"site), which this {model.adapter.name} model does not have{reason}; use "
        "activation_patching(component='attn') for whole attention layers instead")


def _pair_sites(model: HookedModel, sender_layers: Sequence[int],
                receiver_sites: Sequence[str]) -> list[Site]:
    """Sites both runs of a pair record: the head and MLP outputs of the sender layers (frozen
    at their base values, the sender taken from the source) and the receivers' inputs."""
    sites = [_site(model, k, layer) for layer in sorted(set(sender_layers))
             for k in ("attn.z", "mlp")]
    sites += [model.site(name) for name in receiver_sites]
    return list({site.name: site for site in sites}.values())


def _staircase(run: PairRun) -> Staircase:
    """The base run's staircase: ``calls[L].hidden`` is the base residual stream entering
    layer ``L`` on positions ``start..T-1``, ``final_input`` the final norm's input."""
    assert run.prepared is not None
    return run.prepared


def _unit_index(model: HookedModel, kind: str, heads: Sequence[int]) -> list[int]:
    """Query heads -> the units of site ``attn.{kind}`` they read (kv heads for k/v)."""
    if kind == "q":
        return sorted(set(heads))
    group = model.n_heads // model.n_kv_heads
    return sorted({h // group for h in heads})


def _frozen_heads(z_base: torch.Tensor, z_src: torch.Tensor, rows: torch.Tensor,
                  heads: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """A hook on ``attn.z`` that sets every row's heads to the base run's ``z_base``
    ``[1, q, n_heads, d_head]``, except head ``heads[i]`` of row ``rows[i]``, taken from the
    source run's ``z_src``."""

    def freeze(act: torch.Tensor) -> torch.Tensor:
        out = z_base.to(act.dtype).expand(act.shape[0], -1, -1, -1).clone()
        if len(heads):
            # [q, n, d_head] -> [n, q, d_head]: row i gets head heads[i] from the source
            out[rows, :, heads] = z_src[0][:, heads].transpose(0, 1).to(act.dtype)
        return out

    return freeze


def _sender_deltas(model: HookedModel, run: PairRun, chunk: list[_Sender]) -> torch.Tensor:
    """Pass 1, sender side: the change of the residual stream after each sender's layer,
    ``[rows, T - start, d_model]``, with everything but the sender frozen."""
    stairs = _staircase(run)
    s = stairs.start
    q = run.base_ids.shape[1] - s
    delta = torch.zeros(len(chunk), q, model.d_model, dtype=model.dtype, device=model.device)
    by_layer: dict[int, list[int]] = defaultdict(list)
    for r, sender in enumerate(chunk):
        by_layer[sender.layer].append(r)
    for layer, rows in sorted(by_layer.items()):
        n_rows = len(rows)
        batch = n_rows + 1  # the last row patches nothing: the reference output
        z_name, mlp_name = f"blocks.{layer}.attn.z", f"blocks.{layer}.mlp"
        z_base, z_src = run.base.acts[z_name][:, s:], run.source.acts[z_name][:, s:]
        mlp_base, mlp_src = run.base.acts[mlp_name][:, s:], run.source.acts[mlp_name][:, s:]
        head_rows = [i for i, r in enumerate(rows) if chunk[r].head is not None]
        heads = [chunk[rows[i]].head for i in head_rows]
        mlp_rows = [i for i, r in enumerate(rows) if chunk[r].head is None]
        head_rows_t = torch.tensor(head_rows, dtype=torch.long, device=model.device)
        heads_t = torch.tensor(heads, dtype=torch.long, device=model.device)
        mlp_rows_t = torch.tensor(mlp_rows, dtype=torch.long, device=model.device)

        freeze_z = _frozen_heads(z_base, z_src, head_rows_t, heads_t)

        def freeze_mlp(act: torch.Tensor, mlp_base: torch.Tensor = mlp_base,
                       mlp_src: torch.Tensor = mlp_src, mlp_rows_t: torch.Tensor = mlp_rows_t
                       ) -> torch.Tensor:
            out = mlp_base.to(act.dtype).expand(act.shape[0], -1, -1).clone()
            if len(mlp_rows_t):
                out[mlp_rows_t] = mlp_src.to(act.dtype)
            return out

        hidden = stairs.calls[layer].hidden.expand(batch, -1, -1)
        hooks = [Hook(_site(model, "attn.z", layer), freeze_z),
                 Hook(_site(model, "mlp", layer), freeze_mlp)]
        out = run_layer(model, stairs, layer, hidden, hooks)
        assert out is not None
        delta[rows] = out[:n_rows] - out[n_rows:]
    return delta


def _heads_frozen_pass(model: HookedModel, run: PairRun, chunk: list[_Sender],
                       receivers: list[tuple[int, int]] | None, kinds: tuple[str, ...],
                       last_only: Staircase | None = None
                       ) -> tuple[dict[tuple[int, str], tuple[list[int], torch.Tensor]] | None,
                                  torch.Tensor | None]:
    """Pass 1 with ``freeze="heads"`` (the IOI paper's): every attention head output held at
    its base value except the sender's, every MLP recomputed, so the sender's change reaches
    the receivers through the residual stream and the MLPs but through no other head.

    Rows (one per sender, sorted by layer) enter the staircase at their sender's layer with the
    base residual stream. Returns the receivers' recorded inputs (as :func:`_record_inputs`)
    or, with ``receivers=None``, the final residual stream at the last position
    ``[rows, d_model]``.

    With every head frozen, no information moves between positions after the sender's layer,
    so the last position's final residual depends only on that position: with
    ``receivers=None`` the rows compute the last position alone (``last_only``: the base run's
    staircase started at the last position).
    """
    stairs = _staircase(run) if last_only is None else last_only
    s = stairs.start
    dev = model.device
    entry = [sender.layer for sender in chunk]
    heads_by_layer: dict[int, list[int]] = defaultdict(list)
    for layer, head in receivers or []:
        heads_by_layer[layer].append(head)
    stop = model.n_layers if receivers is None else max(heads_by_layer) + 1
    recorded: dict[tuple[int, str], tuple[list[int], torch.Tensor]] = {}
    units: dict[tuple[int, str], list[int]] = {}
    for layer, heads in heads_by_layer.items():
        for kind in kinds:
            units[(layer, kind)] = _unit_index(model, kind, heads)
            base = run.base.acts[f"blocks.{layer}.attn.{kind}"][:, s:, units[(layer, kind)]]
            recorded[(layer, kind)] = (units[(layer, kind)],
                                       base.expand(len(chunk), -1, -1, -1).clone())
    hidden = stairs.calls[entry[0]].hidden.expand(0, -1, -1)
    for layer in range(entry[0], stop):
        n_now = sum(1 for e in entry if e <= layer)
        if n_now > hidden.shape[0]:
            fresh = stairs.calls[layer].hidden
            hidden = torch.cat([hidden, fresh.expand(n_now - hidden.shape[0], -1, -1)])
        z_base = run.base.acts[f"blocks.{layer}.attn.z"][:, s:]
        z_src = run.source.acts[f"blocks.{layer}.attn.z"][:, s:]
        head_rows = [r for r in range(n_now) if entry[r] == layer and chunk[r].head is not None]
        mlp_rows = [r for r in range(n_now) if entry[r] == layer and chunk[r].head is None]
        head_rows_t = torch.tensor(head_rows, dtype=torch.long, device=dev)
        heads_t = torch.tensor([chunk[r].head for r in head_rows], dtype=torch.long, device=dev)

        freeze_z = _frozen_heads(z_base, z_src, head_rows_t, heads_t)

        hooks = [Hook(_site(model, "attn.z", layer), freeze_z)]
        if mlp_rows:
            mlp_src = run.source.acts[f"blocks.{layer}.mlp"][:, s:]
            rows_t = torch.tensor(mlp_rows, dtype=torch.long, device=dev)

            def sender_mlp(act: torch.Tensor, mlp_src: torch.Tensor = mlp_src,
                           rows_t: torch.Tensor = rows_t) -> torch.Tensor:
                out = act.clone()
                out[rows_t] = mlp_src.to(act.dtype)
                return out

            hooks.append(Hook(_site(model, "mlp", layer), sender_mlp))
        store: dict[str, torch.Tensor] = {}
        if layer in heads_by_layer:
            for kind in kinds:
                def read(act: torch.Tensor, kind: str = kind, layer: int = layer) -> None:
                    store[kind] = act[:, :, units[(layer, kind)]].detach().clone()

                hooks.append(Hook(_site(model, f"attn.{kind}", layer), read))
        out = run_layer(model, stairs, layer, hidden, hooks)
        assert out is not None
        if layer in heads_by_layer:  # rows whose sender comes earlier see the change
            early = [r for r in range(n_now) if entry[r] < layer]
            for kind in kinds:
                if early:
                    recorded[(layer, kind)][1][early] = store[kind][early]
        hidden = out
    if receivers is None:
        return None, hidden[:, -1]
    return recorded, None


def _record_inputs(model: HookedModel, run: PairRun, chunk: list[_Sender],
                   delta: torch.Tensor, receivers: list[tuple[int, int]], kinds: tuple[str, ...]
                   ) -> dict[tuple[int, str], tuple[list[int], torch.Tensor]]:
    """Pass 1, receiver side: the receivers' inputs with the sender's change in the residual.

    Returns ``{(layer, kind): (units, values [rows, T - start, n_units, d_head])}``.
    """
    stairs = _staircase(run)
    s = stairs.start
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
            base_units = run.base.acts[name][:, s:, units[kind]]
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

            hidden = stairs.calls[layer].hidden + delta[rows]
            hooks = [Hook(_site(model, f"attn.{k}", layer), reader(k)) for k in kinds]
            run_layer(model, stairs, layer, hidden, hooks, stop_ok=True)
            for kind in kinds:
                values[kind][rows] = store[kind]
        for kind in kinds:
            recorded[(layer, kind)] = (units[kind], values[kind])
    return recorded


def _readout(model: HookedModel, hidden: torch.Tensor, columns: Sequence[int] | None
             ) -> torch.Tensor:
    """``[rows, d_model]`` -> ``[rows, vocab]`` float32 logits (``[rows, len(set(columns))]``,
    those entries ascending, with ``columns``)."""
    with torch.no_grad():
        return unembed(model, hidden, columns).float()


def _receiver_logits(model: HookedModel, run: PairRun, chunk: list[_Sender],
                     recorded: dict[tuple[int, str], tuple[list[int], torch.Tensor]],
                     columns: Sequence[int] | None) -> torch.Tensor:
    """Pass 2: the base run with the receivers' recorded inputs; ``[rows, vocab]`` logits.

    Rows must be sorted by sender layer. A row joins the batch at the first receiver layer
    after its sender (before it, it is the base run).
    """
    stairs = _staircase(run)
    receiver_layers = sorted({layer for layer, _ in recorded})
    entry = [min(layer for layer in receiver_layers if layer > sender.layer) for sender in chunk]
    first = entry[0]
    hidden = stairs.calls[first].hidden.expand(0, -1, -1)
    for layer in range(first, model.n_layers):
        n_now = sum(1 for e in entry if e <= layer)
        if n_now > hidden.shape[0]:
            fresh = stairs.calls[layer].hidden
            hidden = torch.cat([hidden, fresh.expand(n_now - hidden.shape[0], -1, -1)])
        hooks = []
        for (rec_layer, kind), (units, values) in recorded.items():
            if rec_layer != layer:
                continue
            units_t = torch.tensor(units, dtype=torch.long, device=model.device)

            def write(act: torch.Tensor, units_t: torch.Tensor = units_t,
                      values: torch.Tensor = values[:n_now]) -> torch.Tensor:
                out = act.clone()
                out[:, :, units_t] = values.to(act.dtype)
                return out

            hooks.append(Hook(_site(model, f"attn.{kind}", layer), write))
        out = run_layer(model, stairs, layer, hidden, hooks)
        assert out is not None
        hidden = out
    return _readout(model, hidden[:, -1], columns)


def _pair_values(model: HookedModel, run: PairRun, senders: list[_Sender],
                 receivers: list[tuple[int, int]] | None, kinds: tuple[str, ...],
                 batch_size: int, columns: Sequence[int] | None = None,
                 freeze: str = "heads") -> torch.Tensor:
    """Last-position logits ``[n_senders, vocab]`` of the path-patched runs of one pair.

    ``columns``: compute only these logits, ``[n_senders, len(set(columns))]`` (see
    :func:`causalpatch.engine.unembed`).
    """
    out = torch.empty(len(senders), model.vocab_size if columns is None else len(set(columns)))
    order = sorted(range(len(senders)), key=lambda i: senders[i].layer)
    last_stairs = None
    if freeze == "heads" and receivers is None:
        last_stairs = prepare_staircase(model, run.base_ids, run.base_ids.shape[1] - 1)
    final = _staircase(run).final_input[:, -1]  # the final residual stream, last position
    for lo in range(0, len(order), batch_size):
        rows = order[lo : lo + batch_size]
        chunk = [senders[i] for i in rows]
        if freeze == "heads":
            recorded, final_rows = _heads_frozen_pass(model, run, chunk, receivers, kinds,
                                                      last_stairs)
            if receivers is None:
                assert final_rows is not None
                logits = _readout(model, final_rows, columns)
            else:
                assert recorded is not None
                logits = _receiver_logits(model, run, chunk, recorded, columns)
            out[rows] = logits.cpu()
            continue
        delta = _sender_deltas(model, run, chunk)
        if receivers is None:
            logits = _readout(model, final + delta[:, -1], columns)
        else:
            recorded = _record_inputs(model, run, chunk, delta, receivers, kinds)
            logits = _receiver_logits(model, run, chunk, recorded, columns)
        out[rows] = logits.cpu()
    return out


# -- public API ------------------------------------------------------------------------------------
def path_patching(
    model: HookedModel,
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
    freeze: str = "heads",
    batch_size: int | None = None,
    executor: Any = None,
) -> PatchingResult:
    """Path patching: each sender's effect on the metric through the receivers only.

    Args:
        model: the :class:`~causalpatch.HookedModel`.
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
            metric, else ``logit_diff`` when answers are given, else ``l2``.
        metric_kwargs / correct / incorrect: answer tokens (single-token strings or ids).
        direction: ``"noise"`` (default, as in Wang et al.: corrupted sender values into the
            clean run; 1.0 = this path alone breaks the behaviour as much as corrupting the
            whole prompt) or ``"denoise"`` (clean sender values into the corrupted run).
        freeze: what else is held at its base value while the sender's change travels to the
            receivers: ``"heads"`` (default, as in Wang et al.: every other attention head;
            MLPs are recomputed, so paths through MLPs count) or ``"all"`` (every other head
            and every MLP: only the direct path through the residual stream).
        batch_size: senders per batch (rows of one pass); default 512.
        executor: ``None`` (here), ``"ray"`` or a :class:`~causalpatch.executors.RayExecutor`:
            pairs are split into shards evaluated by Ray workers (results equal the local run).

    Returns:
        :class:`~causalpatch.result.PatchingResult` with ``method="path_patching"``,
        ``effect_matrix`` ``(n_layers, n_heads)`` / ``(n_layers,)`` / ``(n_senders,)`` of
        normalised effects ``(patched - base) / (source - base)``, averaged over pairs by the
        one rule of :mod:`causalpatch.assemble` (mean raw metric over pairs, then normalised;
        ``per_pair`` kept). Senders in a layer at or after every receiver have no path to
        them: their effect is exactly 0 (not computed).

    Raises:
        InvalidArgumentError: a receiver at or before an explicitly listed sender's layer
            ("receiver layer L must come after sender layer S"), bad receivers/inputs,
            mismatched prompt lengths, missing answers.
        NormalizationError: the metric does not tell the clean and corrupted runs apart.
    """
    t0 = time.perf_counter()
    # -- validate everything first ----------------------------------------------------------
    direction_ = parse(Direction, direction, "direction")
    _check_separable_heads(model)
    if freeze not in ("heads", "all"):
        raise InvalidArgumentError(
            f"unknown freeze {freeze!r}; expected 'heads' (every other head frozen, MLPs "
            "recomputed: the IOI paper's path patching) or 'all' (heads and MLPs frozen: the "
            "direct path only)")
    check_int(batch_size, "batch_size", 1, allow_none=True)
    executor_ = resolve_executor(executor, model)
    correct, incorrect = resolve_answers(metric_kwargs, correct, incorrect)
    pairs = make_pairs(model, clean, corrupted, correct, incorrect)
    m = choose_metric(metric, pairs, clean if corrupted is None else None)
    recv, kinds = _receivers(model, receivers, receiver_input)
    sender_list, component = _senders(model, senders)
    _check_order(sender_list, recv, explicit=component == "senders")
    check_answers(m, pairs)
    last = model.n_layers if recv is None else max(layer for layer, _ in recv)
    live = {j for j, s in enumerate(sender_list) if s.layer < last}
    chunk = batch_size or 512
    # logit_diff / logit read two / one logits: skip the rest of the unembedding
    columns = answer_columns(m, pairs)
    receiver_sites = sorted({f"blocks.{layer}.attn.{k}" for layer, _ in recv or [] for k in kinds})
    first_sender = min((sender_list[j].layer for j in live), default=0)
    frozen_layers = (range(first_sender, min(last + 1, model.n_layers)) if freeze == "heads"
                     else sorted({sender_list[j].layer for j in live}))
    sites = _pair_sites(model, frozen_layers, receiver_sites)
    denoise = direction_ is Direction.DENOISE
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
    t_setup = time.perf_counter() - t0

    # -- run: one pair per group --------------------------------------------------------------
    def build(model_: HookedModel, stats: dict[str, Any]) -> Callable[..., GroupValues]:
        return partial(evaluate, model_)

    def evaluate(model: HookedModel, group: list[int], cells: list[int],
                 tick: Callable[[int], None] | None) -> GroupValues:
        (i,) = group
        pair: Pair = pairs[i]
        base_ids, source_ids = pair.runs(denoise)
        run = run_pair(model, base_ids, source_ids, sites)
        inputs = metric_inputs(m, [pair.correct], [pair.incorrect],
                               run.source_last.float().cpu().unsqueeze(0))
        ends = m(torch.stack([run.base_last, run.source_last]).float().cpu(), inputs.expand(2))
        # senders without a path to the receivers: exactly the base run
        values = ends[:1].repeat(len(cells))
        todo = [k for k, j in enumerate(cells) if j in live]
        if todo:
            logits = _pair_values(model, run, [sender_list[cells[k]] for k in todo], recv, kinds,
                                  chunk, columns, freeze)
            narrowed = inputs if columns is None else inputs.on_columns(columns)
            values[todo] = m(logits, narrowed.expand(len(todo)))
        if tick is not None:
            tick(len(cells))
        return GroupValues(ends[:1], ends[1:], values.unsqueeze(0))

    values = run_pairs(model, pairs, len(sender_list), build=build, label="path patching",
                       executor=executor_)
    return build_result(
        model, values=values, scale=Scale.NORMALIZED, metric=m, axes=axes, labels=labels,
        shape=shape, component=component, method="path_patching", direction=direction_,
        clean=[p.clean for p in pairs], corrupted=[p.corrupted for p in pairs],
        answers=[[p.correct, p.incorrect] for p in pairs], timings={"setup_s": t_setup},
        extra={"senders": [[s.layer, s.head] for s in sender_list],
               "receivers": "logits" if recv is None else [list(r) for r in recv],
               "receiver_input": list(kinds),
               "freeze": freeze,
               "frozen": ("every other attn.z (MLPs recomputed)" if freeze == "heads"
                          else "every other attn.z and every mlp output"),
               "n_computed": len(live)}, t_start=t0, data=clean)


__all__ = ["path_patching"]

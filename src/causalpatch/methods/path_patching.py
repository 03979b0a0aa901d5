"""Path patching (Wang et al., 2022): a sender's effect through the direct path into receivers.

Activation patching a head measures everything downstream of it. Path patching isolates one
route: the effect of a *sender* (an attention head, or an MLP) that reaches the *receivers*
(chosen heads' query/key/value inputs, or the final residual stream read by the unembedding)
through the residual stream without passing through any other head (and, with
``freeze="all"``, through no MLP either).

Two passes per sender, as in the IOI paper:

1. Run the *base* prompt with the sender's activation taken from the *source* prompt and every
   other head output (``attn.z``) frozen at its base-run value. With ``freeze="heads"`` (the
   default, as in the paper) the MLPs are recomputed, so the sender's change reaches the
   receivers through the residual stream and the MLPs but through no other head; with
   ``freeze="all"`` every MLP output is frozen too, and the change reaches each later layer
   only through the residual stream. Record the receivers' inputs: ``attn.q``/``attn.k``/
   ``attn.v`` of the receiver heads, or the final residual stream at the last position
   (``receiver_input="resid"``).
2. Run the base prompt again with only the receivers' recorded inputs patched in, and measure
   the metric at the last position.

``direction="noise"`` (default, as in the paper) patches corrupted values into the clean run;
``"denoise"`` patches clean values into the corrupted run. The effect is normalised like
:func:`causalpatch.activation_patching`: ``(patched - base) / (source - base)``.

How it is computed (exactly, up to float rounding). ``freeze="heads"``: the rows (one per
sender) climb the decoder layers from the sender's layer with every other head's output held
at its base value and the MLPs recomputed; with every head frozen no information moves
between positions, so to the logits only the last position is computed. ``freeze="all"``:
with everything but the sender frozen, each decoder layer after the sender adds exactly its
base-run branch outputs to the residual stream, so the stream entering any later layer is the
base stream plus the sender's change ``delta`` (the output of the sender's layer with and
without the sender patched); pass 1 runs only the sender's layer (all senders of a layer as
rows of one batch) and each receiver layer up to its q/k/v projections. Pass 2 runs only the
layers from the first receiver on. Positions before the first token where the two prompts
differ are identical in every run, so their keys and values come from the base run and only
the remaining positions are computed: the base and
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

from ..assemble import GroupValues, Scale, answer_columns, build_result
from ..engine import (PairRun, Staircase, Step, climb, prepare_staircase, rows_per_chunk,
                      run_layer, run_pair, unembed)
from ..enums import Direction, Freeze, ReceiverInput, parse
from ..errors import (InvalidArgumentError, InvalidTypeError, UnknownComponentError,
                      UnsupportedArchitectureError)
from ..hooks import Hook, StopForward
from ..metrics import Metric
from ..names import Site
from ..options import DEFAULT_MEMORY_MB, Progress, RunOptions, prepare_pairs
from ..plan import Pair, check_index, metric_inputs

if TYPE_CHECKING:
    from ..model import HookedModel
    from ..result import PatchingResult

SenderSpec = str | Sequence[tuple[int, int | None]]
ReceiverSpec = str | Sequence[tuple[int, int]]

_INPUT_KINDS = tuple(k.value for k in ReceiverInput if k is not ReceiverInput.RESID)


# -- arguments -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Sender:
    layer: int
    head: int | None  # None: the layer's MLP

    @property
    def label(self) -> str:
        return f"L{self.layer} MLP" if self.head is None else f"L{self.layer}H{self.head}"


def _receivers(model: HookedModel, receivers: ReceiverSpec,
               receiver_input: str | ReceiverInput | Sequence[str | ReceiverInput] | None
               ) -> tuple[list[tuple[int, int]] | None, tuple[str, ...]]:
    """``(receiver heads or None for the final residual, input kinds)``."""
    if receiver_input is not None:
        listed = ([receiver_input] if isinstance(receiver_input, str)
                  else list(receiver_input))
        receiver_input = [parse(ReceiverInput, k, "receiver_input").value for k in listed]
        if len(receiver_input) == 1:
            receiver_input = receiver_input[0]
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
        layer = check_index(item[0], model.n_layers, "receiver layer", "layers")
        head = check_index(item[1], model.n_heads, "receiver head", "heads")
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
        layer = check_index(item[0], model.n_layers, "sender layer", "layers")
        head = (None if item[1] is None
                else check_index(item[1], model.n_heads, "sender head", "heads"))
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
    """The site of a per-layer ``kind`` (``"attn.z"``, ``"mlp"``, ``"attn.q"``...)."""
    return model.layer_site(kind, layer)


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
                receivers: Sequence[tuple[int, str]]) -> list[Site]:
    """Sites both runs of a pair record: the head and MLP outputs of the sender layers (frozen
    at their base values, the sender taken from the source) and the receivers' inputs
    (``(layer, kind)``)."""
    sites = [_site(model, k, layer) for layer in sorted(set(sender_layers))
             for k in ("attn.z", "mlp")]
    sites += [_site(model, f"attn.{kind}", layer) for layer, kind in receivers]
    return list({site.name: site for site in sites}.values())


def _act(run_acts: Any, model: HookedModel, kind: str, layer: int, start: int) -> torch.Tensor:
    """A recorded activation of one run on the window's positions: ``[1, T - start, ...]``."""
    return run_acts.acts[_site(model, kind, layer).name][:, start:]


def _base_hidden(model: HookedModel, stairs: Staircase) -> Callable[[int], torch.Tensor]:
    """The base residual stream entering each layer (``n_layers``: the final norm's input)."""
    return lambda layer: (stairs.calls[layer].hidden if layer < model.n_layers
                          else stairs.final_input)


def _unit_index(model: HookedModel, kind: str, heads: Sequence[int]) -> list[int]:
    """Query heads -> the units of site ``attn.{kind}`` they read (kv heads for k/v)."""
    if kind == "q":
        return sorted(set(heads))
    group = model.n_heads // model.n_kv_heads
    return sorted({h // group for h in heads})


Recorded = dict[tuple[int, str], tuple[list[int], torch.Tensor]]
"""The receivers' inputs per ``(layer, kind)``: ``(units, values [rows, T - start, n_units,
d_head])``."""


def _base_inputs(model: HookedModel, run: PairRun, start: int, n_rows: int,
                 receivers: list[tuple[int, int]], kinds: tuple[str, ...]) -> Recorded:
    """Every row's receiver inputs as in the base run (the rows overwrite theirs)."""
    heads_by_layer: dict[int, list[int]] = defaultdict(list)
    for layer, head in receivers:
        heads_by_layer[layer].append(head)
    out: Recorded = {}
    for layer, heads in sorted(heads_by_layer.items()):
        for kind in kinds:
            units = _unit_index(model, kind, heads)
            base = _act(run.base, model, f"attn.{kind}", layer, start)[:, :, units]
            out[(layer, kind)] = (units, base.expand(n_rows, -1, -1, -1).clone())
    return out


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


def _rows_set(values: torch.Tensor, rows: torch.Tensor, others: torch.Tensor | None = None
              ) -> Callable[[torch.Tensor], torch.Tensor]:
    """A hook setting rows ``rows`` of an activation to ``values`` (``[1, ...]``, broadcast)
    and, with ``others`` (``[1, ...]``), every other row to it (frozen at a base value)."""

    def write(act: torch.Tensor) -> torch.Tensor:
        out = (act if others is None else others.to(act.dtype).expand_as(act)).clone()
        if len(rows):
            out[rows] = values.to(act.dtype)
        return out

    return write


def _tensor(values: Sequence[int], model: HookedModel) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.long, device=model.device)


def _sender_deltas(model: HookedModel, run: PairRun, chunk: list[_Sender]) -> torch.Tensor:
    """Pass 1 with ``freeze="all"``, sender side: the change of the residual stream after
    each sender's layer, ``[rows, T - start, d_model]``, with everything but the sender
    frozen (one call of the sender's layer; a last row patching nothing is the reference)."""
    stairs = run.prepared
    assert stairs is not None
    s = stairs.start
    q = run.base_ids.shape[1] - s
    delta = torch.zeros(len(chunk), q, model.d_model, dtype=model.dtype, device=model.device)
    by_layer: dict[int, list[int]] = defaultdict(list)
    for r, sender in enumerate(chunk):
        by_layer[sender.layer].append(r)
    for layer, rows in sorted(by_layer.items()):
        head_rows = [i for i, r in enumerate(rows) if chunk[r].head is not None]
        heads = [h for r in rows if (h := chunk[r].head) is not None]  # those rows' heads
        mlp_rows = [i for i, r in enumerate(rows) if chunk[r].head is None]
        freeze_z = _frozen_heads(_act(run.base, model, "attn.z", layer, s),
                                 _act(run.source, model, "attn.z", layer, s),
                                 _tensor(head_rows, model), _tensor(heads, model))
        freeze_mlp = _rows_set(_act(run.source, model, "mlp", layer, s),
                               _tensor(mlp_rows, model), _act(run.base, model, "mlp", layer, s))
        hooks = [Hook(_site(model, "attn.z", layer), freeze_z),
                 Hook(_site(model, "mlp", layer), freeze_mlp)]
        hidden = stairs.calls[layer].hidden.expand(len(rows) + 1, -1, -1)
        out = run_layer(model, stairs, layer, hidden, hooks)
        assert out is not None
        delta[rows] = out[:-1] - out[-1:]
    return delta


def _heads_frozen_pass(model: HookedModel, run: PairRun, chunk: list[_Sender],
                       receivers: list[tuple[int, int]] | None, kinds: tuple[str, ...],
                       stairs: Staircase) -> tuple[Recorded, torch.Tensor | None]:
    """Pass 1 with ``freeze="heads"`` (the IOI paper's): every attention head output held at
    its base value except the sender's, every MLP recomputed, so the sender's change reaches
    the receivers through the residual stream and the MLPs but through no other head.

    Rows (one per sender, sorted by layer) climb the staircase from their sender's layer.
    Returns the receivers' recorded inputs and, with ``receivers=None``, the final residual
    stream at the last position ``[rows, d_model]``.

    With every head frozen, no information moves between positions after the sender's layer,
    so the last position's final residual depends only on that position: with
    ``receivers=None`` the caller passes the base run's staircase started at the last position.
    """
    s = stairs.start
    entry = [sender.layer for sender in chunk]
    recorded = _base_inputs(model, run, s, len(chunk), receivers or [], kinds)
    stop = model.n_layers if receivers is None else max(layer for layer, _ in receivers) + 1

    def step(layer: int, hidden: torch.Tensor) -> Step:
        n_now = hidden.shape[0]
        head_rows = [r for r in range(n_now) if entry[r] == layer and chunk[r].head is not None]
        heads = [h for r in head_rows if (h := chunk[r].head) is not None]  # those rows' heads
        mlp_rows = [r for r in range(n_now) if entry[r] == layer and chunk[r].head is None]
        hooks = [Hook(_site(model, "attn.z", layer), _frozen_heads(
            _act(run.base, model, "attn.z", layer, s), _act(run.source, model, "attn.z", layer, s),
            _tensor(head_rows, model), _tensor(heads, model)))]
        if mlp_rows:
            hooks.append(Hook(_site(model, "mlp", layer), _rows_set(
                _act(run.source, model, "mlp", layer, s), _tensor(mlp_rows, model))))
        early = [r for r in range(n_now) if entry[r] < layer]  # rows that see the change
        for (rec_layer, kind), (units, values) in recorded.items():
            if rec_layer == layer and early:
                def read(act: torch.Tensor, units: list[int] = units,
                         values: torch.Tensor = values) -> None:
                    values[early] = act[early][:, :, units].detach()

                hooks.append(Hook(_site(model, f"attn.{kind}", layer), read))
        return Step(hooks)

    hidden = climb(model, stairs.calls, _base_hidden(model, stairs), entry, stop, step,
                   prefix=stairs.prefix_cache)
    return recorded, (hidden[:, -1] if receivers is None else None)


def _record_inputs(model: HookedModel, run: PairRun, chunk: list[_Sender],
                   delta: torch.Tensor, receivers: list[tuple[int, int]], kinds: tuple[str, ...]
                   ) -> Recorded:
    """Pass 1 with ``freeze="all"``, receiver side: the receivers' inputs with the sender's
    change added to the residual stream (each receiver layer called up to its q/k/v)."""
    stairs = run.prepared
    assert stairs is not None
    recorded = _base_inputs(model, run, stairs.start, len(chunk), receivers, kinds)
    for layer in sorted({layer for layer, _ in recorded}):
        # rows whose sender is in an earlier layer: others see the base input exactly
        rows = [r for r, sender in enumerate(chunk) if sender.layer < layer]
        if not rows:
            continue
        store: dict[str, torch.Tensor] = {}
        wanted = {kind for rec_layer, kind in recorded if rec_layer == layer}

        def reader(kind: str, units: list[int], store: dict[str, torch.Tensor],
                   wanted: set[str]) -> Callable[[torch.Tensor], None]:
            def read(act: torch.Tensor) -> None:
                store[kind] = act[:, :, units].detach().clone()
                if wanted <= set(store):
                    raise StopForward  # q/k/v read: the rest of the layer is not needed
            return read

        hooks = [Hook(_site(model, f"attn.{kind}", layer), reader(kind, units, store, wanted))
                 for (rec_layer, kind), (units, _) in recorded.items() if rec_layer == layer]
        run_layer(model, stairs, layer, stairs.calls[layer].hidden + delta[rows], hooks,
                  stop_ok=True)
        for kind in wanted:
            recorded[(layer, kind)][1][rows] = store[kind]
    return recorded


def _receiver_logits(model: HookedModel, run: PairRun, chunk: list[_Sender],
                     recorded: Recorded, columns: Sequence[int] | None) -> torch.Tensor:
    """Pass 2: the base run with the receivers' recorded inputs; ``[rows, vocab]`` logits.

    Rows must be sorted by sender layer. A row climbs the staircase from the first receiver
    layer after its sender (before it, it is the base run).
    """
    stairs = run.prepared
    assert stairs is not None
    receiver_layers = sorted({layer for layer, _ in recorded})
    entry = [min(layer for layer in receiver_layers if layer > sender.layer) for sender in chunk]

    def step(layer: int, hidden: torch.Tensor) -> Step:
        n_now = hidden.shape[0]
        hooks = []
        for (rec_layer, kind), (units, values) in recorded.items():
            if rec_layer == layer:
                units_t = _tensor(units, model)

                def write(act: torch.Tensor, units_t: torch.Tensor = units_t,
                          values: torch.Tensor = values[:n_now]) -> torch.Tensor:
                    out = act.clone()
                    out[:, :, units_t] = values.to(act.dtype)
                    return out

                hooks.append(Hook(_site(model, f"attn.{kind}", layer), write))
        return Step(hooks)

    hidden = climb(model, stairs.calls, _base_hidden(model, stairs), entry, model.n_layers,
                   step, prefix=stairs.prefix_cache)
    return _readout(model, hidden[:, -1], columns)


def _readout(model: HookedModel, hidden: torch.Tensor, columns: Sequence[int] | None
             ) -> torch.Tensor:
    """``[rows, d_model]`` -> ``[rows, vocab]`` float32 logits (``[rows, len(set(columns))]``,
    those entries ascending, with ``columns``)."""
    with torch.no_grad():
        return unembed(model, hidden, columns).float()


def _pair_values(model: HookedModel, run: PairRun, senders: list[_Sender],
                 receivers: list[tuple[int, int]] | None, kinds: tuple[str, ...],
                 batch_size: int | None, memory_mb: float,
                 columns: Sequence[int] | None = None, freeze: Freeze = Freeze.HEADS
                 ) -> torch.Tensor:
    """Last-position logits ``[n_senders, vocab]`` of the path-patched runs of one pair.

    ``batch_size``: senders per pass (default: as many as ``memory_mb`` holds).
    ``columns``: compute only these logits, ``[n_senders, len(set(columns))]`` (see
    :func:`causalpatch.engine.unembed`).
    """
    assert run.prepared is not None
    out = torch.empty(len(senders), model.vocab_size if columns is None else len(set(columns)))
    order = sorted(range(len(senders)), key=lambda i: senders[i].layer)
    T = run.base_ids.shape[1]
    chunk_size = batch_size or rows_per_chunk(model, T - run.prepared.start, T, memory_mb,
                                              None if columns is None else len(set(columns)))
    stairs = run.prepared
    if freeze is Freeze.HEADS and receivers is None:
        stairs = prepare_staircase(model, run.base_ids, T - 1)
    final = run.prepared.final_input[:, -1]  # the final residual stream, last position
    for lo in range(0, len(order), chunk_size):
        rows = order[lo : lo + chunk_size]
        chunk = [senders[i] for i in rows]
        if freeze is Freeze.HEADS:
            recorded, final_rows = _heads_frozen_pass(model, run, chunk, receivers, kinds,
                                                      stairs)
            logits = (_readout(model, final_rows, columns) if final_rows is not None
                      else _receiver_logits(model, run, chunk, recorded, columns))
        else:
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
    receiver_input: str | ReceiverInput | Sequence[str | ReceiverInput] | None = None,
    metric: str | Metric | Callable[..., Any] | None = None,
    metric_kwargs: Mapping[str, Any] | None = None,
    *,
    correct: Any = None,
    incorrect: Any = None,
    direction: str | Direction = "noise",
    freeze: str | Freeze = "heads",
    batch_size: int | None = None,
    memory_mb: float = DEFAULT_MEMORY_MB,
    checkpoint: str | None = None,
    progress: Progress = None,
    executor: Any = None,
    threads: int | None = None,
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
        receiver_input: which input of the receiver heads carries the path (a
            :class:`~causalpatch.enums.ReceiverInput` or its value): ``"q"`` (default for
            heads), ``"k"``, ``"v"``, or several (``("k", "v")``); ``"resid"`` with
            ``receivers="logits"``. Keys/values under grouped-query attention belong to a
            key/value head shared by ``n_heads / n_kv_heads`` query heads: patching the
            receiver's k/v patches them for the whole group.
        metric: ``logit_diff`` etc. (see :mod:`causalpatch.metrics`); default: the dataset's
            metric, else ``logit_diff`` when answers are given, else ``l2``.
        metric_kwargs / correct / incorrect: answer tokens (single-token strings or ids).
        direction: ``"noise"`` (default, as in Wang et al.: corrupted sender values into the
            clean run; 1.0 = this path alone breaks the behaviour as much as corrupting the
            whole prompt) or ``"denoise"`` (clean sender values into the corrupted run).
        freeze: a :class:`~causalpatch.enums.Freeze`: what else is held at its base value
            while the sender's change travels to the receivers: ``"heads"`` (default, as in
            Wang et al.: every other attention head; MLPs are recomputed, so paths through
            MLPs count) or ``"all"`` (every other head and every MLP: only the direct path
            through the residual stream).
        batch_size: senders per pass (rows of one staircase); default: as many as
            ``memory_mb`` holds.
        memory_mb, checkpoint, progress, executor, threads: the run options every method shares
            (:mod:`causalpatch.options`).

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
    freeze_ = parse(Freeze, freeze, "freeze")
    _check_separable_heads(model)
    options = RunOptions.make(model, progress=progress, executor=executor, batch_size=batch_size,
                              memory_mb=memory_mb, checkpoint=checkpoint, threads=threads)
    prep = prepare_pairs(model, clean, corrupted, metric, metric_kwargs, correct, incorrect,
                         direction)
    pairs, m, denoise = prep.pairs, prep.metric, prep.denoise  # the factory captures no dataset
    recv, kinds = _receivers(model, receivers, receiver_input)
    sender_list, component = _senders(model, senders)
    _check_order(sender_list, recv, explicit=component == "senders")
    last = model.n_layers if recv is None else max(layer for layer, _ in recv)
    live = {j for j, s in enumerate(sender_list) if s.layer < last}
    # logit_diff / logit read two / one logits: skip the rest of the unembedding
    columns = answer_columns(m, pairs)
    receiver_inputs = sorted({(layer, k) for layer, _ in recv or [] for k in kinds})
    first_sender = min((sender_list[j].layer for j in live), default=0)
    frozen_layers = (range(first_sender, min(last + 1, model.n_layers))
                     if freeze_ is Freeze.HEADS else sorted({sender_list[j].layer for j in live}))
    sites = _pair_sites(model, frozen_layers, receiver_inputs)
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
                                  options.batch_size, options.memory_mb, columns, freeze_)
            narrowed = inputs if columns is None else inputs.on_columns(columns)
            values[todo] = m(logits, narrowed.expand(len(todo)))
        if tick is not None:
            tick(len(cells))
        return GroupValues(ends[:1], ends[1:], values.unsqueeze(0))

    values = options.run(
        model, pairs, len(sender_list), build, label="path patching",
        checkpoint_args=dict(method="path_patching", metric=m.name,
                             senders=[[s.layer, s.head] for s in sender_list],
                             receivers=recv, kinds=kinds, freeze=freeze_.value,
                             direction=prep.direction.value))
    return build_result(
        model, values=values, scale=Scale.NORMALIZED, axes=axes, labels=labels, shape=shape,
        component=component, method="path_patching", timings={"setup_s": t_setup},
        extra={"senders": [[s.layer, s.head] for s in sender_list],
               "receivers": "logits" if recv is None else [list(r) for r in recv],
               "receiver_input": list(kinds),
               "freeze": freeze_.value,
               "frozen": ("every other attn.z (MLPs recomputed)" if freeze_ is Freeze.HEADS
                          else "every other attn.z and every mlp output"),
               "n_computed": len(live)}, t_start=t0, **prep.result_fields())


__all__ = ["path_patching"]

"""Circuit evaluation: how much of a behaviour the edges of a circuit carry on their own.

A circuit (:class:`~causalpatch.graph.Circuit`) is a set of edges of the model's graph
(:mod:`causalpatch.graph`). It is evaluated on the **clean** prompt with every edge *outside*
it patched to the **corrupted** run (EAP-IG's and MIB's convention): each receiver ``v`` reads

    x_v - sum over senders u not in the circuit of (z_u(circuit run) - z_u(corrupted))

where ``x_v`` is the residual stream of the circuit run itself, so a receiver's input holds
its circuit senders' values as the circuit computes them and every other sender's corrupted
value. In :func:`~causalpatch.edge_attribution`'s terms this is ``direction="noise"`` (base =
clean, source = corrupted) applied to the circuit's complement: the full graph is the clean
run, the empty circuit the corrupted run, the circuit of every edge but ``u -> v`` is
exactly ``edge_attribution(method="exact")``'s noising patch of ``u -> v``, and the circuit of
the one edge ``input -> v`` is its denoising patch of that edge. Then

    faithfulness = (M(circuit) - M(corrupted)) / (M(clean) - M(corrupted))

with the means over pairs taken first (the one aggregation rule): 1 = the circuit alone
gives the clean behaviour, 0 = none of it.

The run is the engine's staircase (:func:`causalpatch.engine.climb`) on the positions from
the first one where the prompts differ (earlier positions are the clean run's, from its
cache), one row per circuit, every circuit of a pair in one batch. In each layer, before the
layer's call, the query/key/value receivers' inputs are computed for every head at once and
read off one call of the layer on them (stopped once q/k/v are read), as exact edge patching
does (receivers of a circuit that patch the same senders read the same input, computed once);
grouped-query key/value heads keep their grouping: the attention runs once per member
of a group (as batch rows), member ``j`` of every group reading the key/value its query head
receives, and each head's output is taken from its own member's row. The MLP's input is the
attention block's output minus the MLP's patched senders (taken back out of the residual
stream before the next layer; parallel-residual models: one call of the layer on the MLP's
input), and the logits read the final residual stream minus theirs.

:func:`faithfulness_curve` evaluates circuits of increasing size chosen from edge scores, and
random circuits of the same sizes, as rows of the same batches, and reports the areas MIB
reports: CPR (the area under the faithfulness curve, higher is better) and CMD (the area
between the curve and 1, lower is better), over the normalised size axis ``x = edges /
n_edges``.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..assemble import GroupValues, Scale, aggregate, answer_columns
from ..engine import PairRun, Step, climb, row_bytes, run_layer, run_pair, unembed
from ..errors import InvalidArgumentError, InvalidTypeError
from ..graph import (Circuit, EdgeGraph, EdgeResult, check_separable, edge_sites, head_writes,
                     read_json_object, select_edges)
from ..hooks import Hook, StopForward
from ..metrics import Metric
from ..options import DEFAULT_MEMORY_MB, Progress, RunOptions, prepare_pairs
from ..plan import Pair, metric_inputs

if TYPE_CHECKING:
    from ..model import HookedModel
    from ..names import Site

#: The ``format`` field of a saved :class:`CircuitEvaluation`.
EVALUATION_FORMAT = "causalpatch.circuit_evaluation"

#: The circuit sizes of MIB's faithfulness curves, as fractions of the graph's edges.
MIB_FRACTIONS = (0.0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


class DisconnectedCircuitWarning(UserWarning):
    """The evaluated circuit has no path from ``input`` to ``logits``: the clean prompt cannot
    reach the output through it, so it evaluates as the corrupted run (faithfulness 0, up to
    float rounding)."""


@dataclass
class CircuitEvaluation:
    """The faithfulness of one circuit.

    Attributes:
        faithfulness: ``(mean M(circuit) - mean M(corrupted)) / (mean M(clean) - mean
            M(corrupted))``.
        per_pair: ``[n_pairs]`` each pair's ``(M(circuit) - M(corrupted))`` over the same
            mean gap (their mean is ``faithfulness``).
        circuit_value, clean_value, corrupted_value: the metric's means over pairs.
        n_edges: edges in the circuit (of ``n_graph_edges``).
        connected: the circuit has a path from ``input`` to ``logits``.
        metric, n_pairs: how it was measured.
    """

    faithfulness: float
    per_pair: torch.Tensor
    circuit_value: float
    clean_value: float
    corrupted_value: float
    n_edges: int
    n_graph_edges: int
    connected: bool
    metric: str
    n_pairs: int

    def to_dict(self) -> dict[str, Any]:
        """JSON values (``format`` first, as the other result files write it)."""
        return {"format": EVALUATION_FORMAT,
                "faithfulness": self.faithfulness, "per_pair": self.per_pair.tolist(),
                "circuit_value": self.circuit_value, "clean_value": self.clean_value,
                "corrupted_value": self.corrupted_value, "n_edges": self.n_edges,
                "n_graph_edges": self.n_graph_edges, "connected": self.connected,
                "metric": self.metric, "n_pairs": self.n_pairs}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CircuitEvaluation:
        """Rebuild from :meth:`to_dict`."""
        if d.get("format") != EVALUATION_FORMAT:
            raise InvalidArgumentError(
                f"not a circuit evaluation: format {d.get('format')!r}, expected "
                f"{EVALUATION_FORMAT!r} (the faithfulness.json `causalpatch circuit` writes)")
        try:
            return cls(faithfulness=float(d["faithfulness"]),
                       per_pair=torch.tensor(d["per_pair"], dtype=torch.float32),
                       circuit_value=float(d["circuit_value"]),
                       clean_value=float(d["clean_value"]),
                       corrupted_value=float(d["corrupted_value"]), n_edges=int(d["n_edges"]),
                       n_graph_edges=int(d["n_graph_edges"]), connected=bool(d["connected"]),
                       metric=str(d["metric"]), n_pairs=int(d["n_pairs"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidArgumentError(
                f"circuit evaluation JSON is incomplete or malformed ({exc!r}); write it with "
                "CircuitEvaluation.to_dict()") from exc

    @classmethod
    def from_json(cls, text_or_path: str | bytes | os.PathLike[str]) -> CircuitEvaluation:
        """Load :meth:`to_dict`'s output (JSON text, or a file such as the
        ``faithfulness.json`` `causalpatch circuit` writes)."""
        return cls.from_dict(read_json_object(text_or_path, EVALUATION_FORMAT))


@dataclass
class FaithfulnessCurve:
    """Faithfulness of circuits of increasing size (:func:`faithfulness_curve`).

    Attributes:
        sizes: ``[n_sizes]`` the edges requested per circuit (ascending).
        fractions: ``sizes / n_graph_edges``: the normalised size axis of the areas.
        n_edges: ``[n_sizes]`` edges left in each circuit after pruning.
        faithfulness: ``[n_sizes]`` each circuit's faithfulness.
        cpr, cmd: the area under the curve and the area between the curve and 1 over
            ``fractions`` (trapezoid rule, divided by the axis' span ``fractions[-1] -
            fractions[0]``; with sizes from 0 to every edge that is the plain area).
        random_faithfulness, random_n_edges, random_cpr, random_cmd: the same for circuits
            of the same sizes chosen uniformly at random (``None`` without a baseline).
        clean_value, corrupted_value, metric, n_pairs, n_graph_edges: as
            :class:`CircuitEvaluation`.
        selection: how circuits were chosen (``greedy``, ``absolute``, ``prune``, the
            baseline's ``seed``).
        circuits, random_circuits: the evaluated :class:`~causalpatch.graph.Circuit` of each
            size (not in :meth:`to_dict`).
    """

    sizes: list[int]
    fractions: list[float]
    n_edges: list[int]
    faithfulness: torch.Tensor
    cpr: float
    cmd: float
    clean_value: float
    corrupted_value: float
    metric: str
    n_pairs: int
    n_graph_edges: int
    selection: dict[str, Any] = field(default_factory=dict)
    random_faithfulness: torch.Tensor | None = None
    random_n_edges: list[int] | None = None
    random_cpr: float | None = None
    random_cmd: float | None = None
    circuits: list[Circuit] = field(default_factory=list, repr=False)
    random_circuits: list[Circuit] | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "sizes": self.sizes, "fractions": self.fractions, "n_edges": self.n_edges,
            "faithfulness": self.faithfulness.tolist(), "cpr": self.cpr, "cmd": self.cmd,
            "clean_value": self.clean_value, "corrupted_value": self.corrupted_value,
            "metric": self.metric, "n_pairs": self.n_pairs,
            "n_graph_edges": self.n_graph_edges, "selection": self.selection}
        if self.random_faithfulness is not None:
            out.update(random_faithfulness=self.random_faithfulness.tolist(),
                       random_n_edges=self.random_n_edges, random_cpr=self.random_cpr,
                       random_cmd=self.random_cmd)
        return out

    def to_pandas(self) -> Any:
        """One row per size: ``size``, ``fraction``, ``n_edges``, ``faithfulness`` (and the
        random baseline's ``random_n_edges``, ``random_faithfulness``)."""
        import pandas as pd

        table: dict[str, Any] = {"size": self.sizes, "fraction": self.fractions,
                                 "n_edges": self.n_edges,
                                 "faithfulness": self.faithfulness.double().numpy()}
        if self.random_faithfulness is not None:
            table["random_n_edges"] = self.random_n_edges
            table["random_faithfulness"] = self.random_faithfulness.double().numpy()
        return pd.DataFrame(table)

    def to_html(self, path: str | os.PathLike[str] | None = None, title: str | None = None,
                plotly: str = "inline") -> str:
        """An interactive HTML report of the curve: faithfulness against the fraction of
        edges, with the random baseline, CPR and CMD
        (:func:`causalpatch.render.html.report`; ``path``, when given, is written
        atomically). Returns the HTML text."""
        from ..render.circuit import section_title
        from ..render.html import report

        return report([self], path, title=title or f"causalpatch: {section_title(self)}",
                      plotly=plotly)


def areas(fractions: Sequence[float], faithfulness: Sequence[float]) -> tuple[float, float]:
    """``(CPR, CMD)``: the trapezoid areas of ``f`` and of ``|1 - f|`` over ``fractions``,
    divided by the span of ``fractions``."""
    x = torch.tensor(list(fractions), dtype=torch.float64)
    f = torch.tensor(list(faithfulness), dtype=torch.float64)
    span = float(x[-1] - x[0])
    return (float(torch.trapezoid(f, x)) / span,
            float(torch.trapezoid((1 - f).abs(), x)) / span)


# -- the circuit run ---------------------------------------------------------------------------
def _window(acts: Mapping[str, torch.Tensor], name: str, start: int) -> torch.Tensor:
    return acts[name][:, start:]


def _circuit_logits(model: HookedModel, run: PairRun, graph: EdgeGraph,
                    sites: dict[str, list[Site]], outside: torch.Tensor,
                    columns: list[int] | None) -> torch.Tensor:
    """``[R, n_columns]`` last-position logits of the clean run (``run``'s base) with the
    edges ``outside`` ``[R, n_edges]`` (bool, one row per circuit: the edges *not* in it)
    patched to the corrupted run (``run``'s source); module docstring."""
    stairs = run.prepared
    assert stairs is not None
    s = stairs.start
    n_layers, n_heads = model.n_layers, model.n_heads
    group = n_heads // model.n_kv_heads
    R = outside.shape[0]
    offsets = graph.offsets.tolist()
    per_layer = 3 * n_heads + 1
    out_f = outside.float().to(stairs.calls[0].hidden.device)
    q = stairs.calls[0].hidden.shape[1]
    d = model.d_model
    src_acts, base_acts = run.source.acts, run.base.acts
    # the corrupted run's writes of the heads and MLPs, and the input's clean - corrupted
    corr_heads = [head_writes(model, layer, _window(src_acts, sites["attn.z"][layer].name, s))
                  for layer in range(n_layers)]  # [1, q, H, d]
    corr_mlp = [_window(src_acts, sites["mlp"][layer].name, s).float()
                for layer in range(n_layers)]  # [1, q, d]
    emb = sites["resid_pre"][0].name
    deltas = torch.zeros(R, q, len(graph.nodes), d, device=out_f.device)
    deltas[:, :, 0] = (_window(base_acts, emb, s) - _window(src_acts, emb, s)).float()[0]
    pending: dict[int, torch.Tensor] = {}  # layer -> what the MLP's patch took out

    def patched(r_first: int, n_recv: int, n_src: int) -> torch.Tensor:
        """``[R, n_recv, q, d]`` what the patched senders of ``n_recv`` consecutive receivers
        (each reading ``n_src`` senders) take out of their input."""
        lo = offsets[r_first]
        mask = out_f[:, lo : lo + n_recv * n_src].reshape(R, n_recv, n_src)
        return torch.einsum("rvs,rtsd->rvtd", mask, deltas[:, :, :n_src])

    def distinct_inputs(r_first: int, n_recv: int, n_src: int, hidden: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """The distinct inputs ``[U, q, d]`` of ``n_recv`` consecutive receivers over every
        circuit (receivers of one circuit whose patched senders are the same read the same
        input: in a small circuit most patch every sender, in a large one none), and for each
        ``(circuit, receiver)``, ``[R * n_recv]``, which of them it reads."""
        lo = offsets[r_first]
        masks = outside[:, lo : lo + n_recv * n_src].reshape(R, n_recv, n_src)
        parts, where, count = [], [], 0
        for r in range(R):
            kinds, which = torch.unique(masks[r].to(torch.uint8), dim=0, return_inverse=True)
            cut = torch.einsum("us,tsd->utd", kinds.to(deltas.dtype).to(deltas.device),
                               deltas[r, :, :n_src])
            parts.append(hidden[r] - cut.to(hidden.dtype))
            where.append(which + count)
            count += len(kinds)
        return torch.cat(parts), torch.cat(where).to(hidden.device)

    def inject(layer: int, hidden: torch.Tensor) -> torch.Tensor:
        back = pending.pop(layer - 1, None)
        return hidden if back is None else hidden + back.to(hidden.dtype)

    def reads(kinds: Sequence[str], layer: int, got: dict[str, torch.Tensor]) -> list[Hook]:
        def reader(kind: str) -> Callable[[torch.Tensor], None]:
            def read(act: torch.Tensor) -> None:
                got[kind] = act.detach().clone()
                if all(k in got for k in kinds):
                    raise StopForward
            return read
        return [Hook(sites[k][layer], reader(k)) for k in kinds]

    def writer(value: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda act: value.to(act.dtype)

    def step(layer: int, hidden: torch.Tensor) -> Step:
        n_src = graph.sender_index(layer, 0)
        first = layer * per_layer
        heads = torch.arange(n_heads, device=hidden.device)
        # every q/k/v receiver's own input, through one (stopped) call of the layer; receivers
        # of a circuit that patch the same senders read the same input, computed once
        inputs, where = distinct_inputs(first, 3 * n_heads, n_src, hidden)
        got: dict[str, torch.Tensor] = {}
        run_layer(model, stairs, layer, inputs,
                  reads(("attn.q", "attn.k", "attn.v"), layer, got), stop_ok=True)
        per = {k: got[f"attn.{k}"][where].unflatten(0, (R, 3 * n_heads)) for k in "qkv"}
        # receiver (kind, h) reads its own unit: query head h, or key/value head h // group
        qs = per["q"][:, heads, :, heads].permute(1, 2, 0, 3)  # [R, q, H, d_head]
        ks = per["k"][:, n_heads + heads, :, heads // group].permute(1, 2, 0, 3)
        vs = per["v"][:, 2 * n_heads + heads, :, heads // group].permute(1, 2, 0, 3)
        # member j of every key/value group: rows j*R.. read the key/value of query heads j::group
        k_rows = torch.cat([ks[:, :, j::group] for j in range(group)])  # [group R, q, kv, dh]
        v_rows = torch.cat([vs[:, :, j::group] for j in range(group)])
        z_got: dict[str, torch.Tensor] = {}
        run_layer(model, stairs, layer, hidden.repeat(group, 1, 1),
                  [Hook(sites["attn.q"][layer], writer(qs.repeat(group, 1, 1, 1))),
                   Hook(sites["attn.k"][layer], writer(k_rows)),
                   Hook(sites["attn.v"][layer], writer(v_rows)),
                   *reads(("attn.z",), layer, z_got)], stop_ok=True)
        z_all = z_got["attn.z"].unflatten(0, (group, R))  # [group, R, q, H, d_head]
        z = z_all[heads % group, :, :, heads].permute(1, 2, 0, 3)  # head h from member h % g
        h0 = graph.sender_index(layer, 0)
        deltas[:, :, h0 : h0 + n_heads] = head_writes(model, layer, z) - corr_heads[layer]
        m = graph.sender_index(layer, None)
        hooks = [Hook(sites["attn.z"][layer], writer(z))]
        if graph.parallel:  # the MLP reads the layer's input: one call of the layer on its own
            mlp_in = hidden - patched(first + 3 * n_heads, 1, n_src)[:, 0].to(hidden.dtype)
            mlp_got: dict[str, torch.Tensor] = {}
            run_layer(model, stairs, layer, mlp_in, reads(("mlp",), layer, mlp_got),
                      stop_ok=True)
            deltas[:, :, m] = mlp_got["mlp"].float() - corr_mlp[layer]
            hooks.append(Hook(sites["mlp"][layer], writer(mlp_got["mlp"])))
        else:  # the MLP reads resid_mid minus its patched senders (this layer's heads too)
            cut = patched(first + 3 * n_heads, 1, n_src + n_heads)[:, 0]
            pending[layer] = cut  # back into the residual stream before the next layer

            def take_out(act: torch.Tensor) -> torch.Tensor:
                return act - cut.to(act.dtype)

            def read_mlp(act: torch.Tensor) -> None:
                deltas[:, :, m] = act.float() - corr_mlp[layer]
            hooks += [Hook(sites["attn"][layer], take_out), Hook(sites["mlp"][layer], read_mlp)]
        return Step(hooks)

    final = climb(model, stairs.calls,
                  lambda layer: (stairs.calls[layer].hidden if layer < n_layers
                                 else stairs.final_input),
                  [0] * R, n_layers, step, prefix=stairs.prefix_cache, inject=inject)
    lo = offsets[len(graph.receivers) - 1]
    cut = torch.einsum("rs,rsd->rd", out_f[:, lo:], deltas[:, -1])
    with torch.no_grad():
        return unembed(model, final[:, -1] - cut.to(final.dtype), columns).float().cpu()


def _rows_per_pass(model: HookedModel, graph: EdgeGraph, q: int, T: int, memory_mb: float
                   ) -> int:
    """Circuits per staircase pass within ``memory_mb``: each holds every sender's
    difference ``[q, n_nodes, d_model]`` and ``3 H`` receiver rows of a layer call."""
    per_row = (4 * q * len(graph.nodes) * model.d_model
               + (3 * model.n_heads + model.n_heads // model.n_kv_heads)
               * row_bytes(model, q, T))
    return max(1, int(memory_mb * 2**20 // per_row))


def _factory(graph: EdgeGraph, pairs: list[Pair], m: Metric, outside: torch.Tensor,
             batch_size: int | None, memory_mb: float
             ) -> Callable[[HookedModel, dict[str, Any]], Callable[..., GroupValues]]:
    """The evaluator factory: one pair per group, its circuits (rows of ``outside``) as
    staircase rows. Values: base = M(corrupted), source = M(clean), cells = M(circuit), so
    that the one aggregation rule gives the faithfulness."""
    columns = answer_columns(m, pairs)

    def build(model_: HookedModel, stats: dict[str, Any]) -> Callable[..., GroupValues]:
        sites = edge_sites(model_, graph.parallel)
        sites["attn"] = [model_.layer_site("attn", layer) for layer in range(model_.n_layers)]
        record = [*sites["resid_pre"][:1], *sites["attn.z"], *sites["mlp"]]

        def evaluate(group: list[int], cells: list[int], tick: Callable[[int], None] | None
                     ) -> GroupValues:
            (i,) = group
            pair = pairs[i]
            run = run_pair(model_, pair.clean, pair.corrupted, record)
            assert run.prepared is not None
            inputs = metric_inputs(m, [pair.correct], [pair.incorrect],
                                   run.source_last.float().cpu().unsqueeze(0))
            ends = m(torch.stack([run.base_last, run.source_last]).float().cpu(),
                     inputs.expand(2))
            T = run.base_ids.shape[1]
            size = batch_size or _rows_per_pass(model_, graph, T - run.prepared.start, T,
                                                memory_mb)
            narrowed = inputs if columns is None else inputs.on_columns(columns)
            values = []
            for lo in range(0, len(cells), size):
                part = cells[lo : lo + size]
                logits = _circuit_logits(model_, run, graph, sites, outside[part], columns)
                values.append(m(logits, narrowed.expand(len(part))))
                stats["passes"] = stats.get("passes", 0) + 1
                if tick is not None:
                    tick(len(part))
            # base: the corrupted run, source: the clean run (faithfulness, module docstring)
            return GroupValues(ends[1:], ends[:1], torch.cat(values).unsqueeze(0))

        return evaluate

    return build


def _run(model: HookedModel, data: Any, corrupted: Any, masks: torch.Tensor, graph: EdgeGraph,
         metric: Any, metric_kwargs: Mapping[str, Any] | None, correct: Any, incorrect: Any,
         options: RunOptions, label: str
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, float, Metric, int]:
    """Faithfulness ``[C]``, per pair ``[n_pairs, C]`` and mean M(circuit) ``[C]`` of
    circuits ``masks`` ``[C, n_edges]``, and mean M(clean), M(corrupted), the metric and the
    pair count."""
    prep = prepare_pairs(model, data, corrupted, metric, metric_kwargs, correct, incorrect,
                         "noise")
    pairs, m = prep.pairs, prep.metric
    build = _factory(graph, pairs, m, ~masks, options.batch_size, options.memory_mb)
    values = options.run(model, pairs, masks.shape[0], build,
                         groups=[[i] for i in range(len(pairs))], label=label,
                         checkpoint_args=dict(method="circuit", metric=m.name,
                                              circuits=hashlib.sha256(
                                                  masks.numpy().tobytes()).hexdigest()))
    agg = aggregate(values, Scale.NORMALIZED, m)
    assert values.source is not None
    return (agg.effect.float(), agg.per_pair.float(), values.raw.mean(0).float(),
            float(values.source.mean()), float(values.base.mean()), m, len(pairs))


def _check_model(model: HookedModel, graph: EdgeGraph) -> None:
    check_separable(model)
    own = EdgeGraph.of(model)
    if own != graph:
        raise InvalidArgumentError(
            f"the circuit's graph ({graph.n_layers} layers x {graph.n_heads} heads, "
            f"{graph.n_edges} edges) is not this model's ({own.n_layers} x {own.n_heads}, "
            f"{own.n_edges} edges): build the circuit from EdgeGraph.of(model) or from an "
            f"edge_attribution result of this model")


def evaluate_circuit(
    model: HookedModel,
    data: Any,
    circuit: Circuit,
    *,
    corrupted: Any = None,
    metric: str | Metric | Callable[..., Any] | None = None,
    metric_kwargs: Mapping[str, Any] | None = None,
    correct: Any = None,
    incorrect: Any = None,
    batch_size: int | None = None,
    memory_mb: float = DEFAULT_MEMORY_MB,
    checkpoint: str | None = None,
    progress: Progress = None,
    executor: Any = None,
    threads: int | None = None,
) -> CircuitEvaluation:
    """The faithfulness of ``circuit``: the clean run with every edge outside it patched to
    the corrupted run (module docstring), one staircase run per prompt pair.

    Args:
        model: a model whose heads are separable (not Gemma 2/3).
        data: a dataset of clean/corrupted pairs, or the clean prompt(s) with
            ``corrupted=``.
        circuit: a :class:`~causalpatch.graph.Circuit` of this model's graph
            (``EdgeResult.circuit(n)``, ``Circuit.from_edges(EdgeGraph.of(model), ...)``).
            It is evaluated as given: pruning does not change the value (edges off every
            input-to-logits path carry nothing to the logits).
        corrupted, metric, metric_kwargs, correct, incorrect: as every pair method.
        batch_size, memory_mb, checkpoint, progress, executor, threads: the shared run options
            (``batch_size``: circuits per staircase pass).

    Returns:
        :class:`CircuitEvaluation` (``faithfulness``, ``per_pair``, the metric's means).

    Raises:
        InvalidTypeError: ``circuit`` is not a Circuit.
        InvalidArgumentError: a circuit of another graph, an empty dataset, prompts of
            different lengths, missing answers (all before any forward pass).
        UnsupportedArchitectureError: heads that cannot be separated.

    Warns:
        DisconnectedCircuitWarning: the circuit has no path from ``input`` to ``logits``
            (it is evaluated all the same).
    """
    if not isinstance(circuit, Circuit):
        raise InvalidTypeError(
            f"circuit must be a causalpatch Circuit (result.circuit(n), Circuit.from_edges("
            f"EdgeGraph.of(model), edges)), got {type(circuit).__name__}")
    _check_model(model, circuit.graph)
    options = RunOptions.make(model, progress=progress, executor=executor,
                              batch_size=batch_size, memory_mb=memory_mb,
                              checkpoint=checkpoint, threads=threads)
    connected = circuit.connected
    if not connected:
        warnings.warn(
            f"the circuit ({circuit.n_edges} edges) has no path from 'input' to 'logits': "
            "the clean prompt reaches the output only through patched edges, so it evaluates "
            "as the corrupted run (faithfulness ~0)", DisconnectedCircuitWarning, stacklevel=2)
    effect, per_pair, raw, clean, corr, m, n_pairs = _run(
        model, data, corrupted, circuit.mask[None], circuit.graph, metric, metric_kwargs,
        correct, incorrect, options, "circuit")
    return CircuitEvaluation(float(effect[0]), per_pair[:, 0], float(raw[0]), clean, corr,
                             circuit.n_edges, circuit.graph.n_edges, connected, m.name, n_pairs)


def _sizes(sizes: Any, n_edges: int) -> list[int]:
    """``sizes=`` as ascending edge counts (before any forward)."""
    if sizes is None:
        return sorted({round(f * n_edges) for f in MIB_FRACTIONS})
    if isinstance(sizes, (str, bytes)) or not hasattr(sizes, "__iter__"):
        raise InvalidTypeError(
            f"sizes must be a list of edge counts (ints) or of fractions of the edges "
            f"(floats in [0, 1]), got {sizes!r}")
    items = list(sizes)
    if len(items) < 2:
        raise InvalidArgumentError(
            f"sizes needs at least 2 circuit sizes for a curve (and its areas), got {items!r}")
    if all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        out = [int(v) for v in items]
        if any(not 0 <= v <= n_edges for v in out):
            raise InvalidArgumentError(
                f"sizes must be edge counts in [0, {n_edges}] (this graph's edges), got "
                f"{items!r}")
    elif all(isinstance(v, float) for v in items):
        if any(not 0.0 <= v <= 1.0 for v in items):
            raise InvalidArgumentError(
                f"sizes given as floats are fractions of the {n_edges} edges and must lie in "
                f"[0, 1], got {items!r}")
        out = [round(v * n_edges) for v in items]
    else:
        raise InvalidTypeError(
            f"sizes must be all ints (edge counts) or all floats (fractions), got {items!r}")
    if any(b <= a for a, b in itertools.pairwise(out)):
        raise InvalidArgumentError(
            f"sizes must be strictly increasing edge counts, got {out!r} (from {items!r})")
    return out


def faithfulness_curve(
    model: HookedModel,
    data: Any,
    scores: EdgeResult | torch.Tensor,
    *,
    sizes: Sequence[int] | Sequence[float] | None = None,
    corrupted: Any = None,
    greedy: bool = False,
    absolute: bool = True,
    prune: bool = True,
    random_baseline: bool = True,
    seed: int = 0,
    metric: str | Metric | Callable[..., Any] | None = None,
    metric_kwargs: Mapping[str, Any] | None = None,
    correct: Any = None,
    incorrect: Any = None,
    batch_size: int | None = None,
    memory_mb: float = DEFAULT_MEMORY_MB,
    checkpoint: str | None = None,
    progress: Progress = None,
    executor: Any = None,
    threads: int | None = None,
) -> FaithfulnessCurve:
    """Faithfulness of the best circuits of each size in ``sizes``, chosen from ``scores``,
    and of random circuits of the same sizes: every circuit a row of the same batches (one
    staircase run per prompt pair for the whole curve).

    Args:
        data, corrupted, metric, metric_kwargs, correct, incorrect: as
            :func:`evaluate_circuit`.
        scores: an :class:`~causalpatch.graph.EdgeResult` of this model, or ``[n_edges]``
            scores (NaN: never chosen).
        sizes: edge counts (ints in ``[0, n_edges]``) or fractions of the edges (floats in
            ``[0, 1]``), strictly increasing; default MIB's fractions ``0, 0.001, ... 0.5,
            1``.
        greedy, absolute, prune: how each circuit is chosen
            (:func:`~causalpatch.graph.select_edges`: the top ``n`` by ``|score|``, or
            EAP-IG's greedy growth from the logits; then pruned).
        random_baseline: also evaluate, per size, that many edges drawn uniformly at random
            (``torch.Generator`` seeded with ``seed``), pruned the same way.
        batch_size, memory_mb, checkpoint, progress, executor, threads: the shared run options
            (``batch_size``: circuits per staircase pass).

    Returns:
        :class:`FaithfulnessCurve`: per size the faithfulness, CPR and CMD (and the random
        baseline's).

    Raises:
        InvalidArgumentError / InvalidTypeError: sizes out of range or not increasing, scores
            of another graph or shape, an empty dataset, ... (all before any forward pass).
    """
    check_separable(model)
    graph = EdgeGraph.of(model)
    if isinstance(scores, EdgeResult):
        _check_model(model, scores.graph)
        values = scores.scores
    elif isinstance(scores, torch.Tensor):
        values = scores
    else:
        raise InvalidTypeError(
            f"scores must be an EdgeResult (edge_attribution(...)) or a [{graph.n_edges}] "
            f"tensor of edge scores, got {type(scores).__name__}")
    if values.shape != (graph.n_edges,):
        raise InvalidArgumentError(
            f"scores must have one value per edge of this model's graph ({graph.n_edges}), "
            f"got shape {tuple(values.shape)}")
    n_scored = int((~torch.isnan(values)).sum())
    wanted = _sizes(sizes, graph.n_edges)
    if wanted[-1] > n_scored:
        raise InvalidArgumentError(
            f"sizes go up to {wanted[-1]} edges but only {n_scored} edges are scored (the "
            f"rest are NaN): keep sizes <= {n_scored}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InvalidTypeError(f"seed must be an int, got {seed!r}")
    options = RunOptions.make(model, progress=progress, executor=executor,
                              batch_size=batch_size, memory_mb=memory_mb,
                              checkpoint=checkpoint, threads=threads)
    chosen = [select_edges(graph, values, k, greedy=greedy, absolute=absolute, prune=prune)
              for k in wanted]
    masks = [c.mask for c in chosen]
    randoms: list[Circuit] = []
    if random_baseline:
        gen = torch.Generator().manual_seed(seed)
        for k in wanted:
            mask = torch.zeros(graph.n_edges, dtype=torch.bool)
            mask[torch.randperm(graph.n_edges, generator=gen)[:k]] = True
            c = Circuit(graph, mask)
            randoms.append(c.pruned() if prune else c)
        masks += [c.mask for c in randoms]
    effect, _, _, clean, corr, m, n_pairs = _run(
        model, data, corrupted, torch.stack(masks), graph, metric, metric_kwargs, correct,
        incorrect, options, "faithfulness curve")
    fractions = [k / graph.n_edges for k in wanted]
    n = len(wanted)
    faith = effect[:n]
    cpr, cmd = areas(fractions, faith.tolist())
    out = FaithfulnessCurve(
        wanted, fractions, [c.n_edges for c in chosen], faith, cpr, cmd, clean, corr, m.name,
        n_pairs, graph.n_edges,
        {"greedy": greedy, "absolute": absolute, "prune": prune, "seed": seed},
        circuits=chosen)
    if random_baseline:
        out.random_circuits = randoms
        out.random_faithfulness = effect[n:]
        out.random_n_edges = [c.n_edges for c in randoms]
        out.random_cpr, out.random_cmd = areas(fractions, effect[n:].tolist())
    return out

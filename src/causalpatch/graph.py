"""The computational graph of edge-level circuit discovery, and the result of scoring its edges.

A transformer's residual stream is a sum of writes, and every component reads that sum. Edge
attribution (EAP, EAP-IG) and edge patching split the sum into its terms: an **edge** ``u -> v``
is the contribution of writer ``u`` to what reader ``v`` reads. Names follow EAP-IG's graph:

* **nodes** (writers): ``input`` (the embedding, with position embeddings where the model has
  them), ``a{L}.h{H}`` (attention head ``H`` of layer ``L``: its slice of the output
  projection's input written through the output projection, bias excluded) and ``m{L}`` (the
  MLP of layer ``L``);
* **receivers** (readers): ``a{L}.h{H}.q``, ``a{L}.h{H}.k``, ``a{L}.h{H}.v`` (the residual
  stream as query head ``H`` reads it for its query, key or value, through the layer's own
  input norm), ``m{L}`` (the MLP's input, through its norm) and ``logits`` (the final
  residual stream, through the final norm).

An edge exists when ``u`` writes before ``v`` reads: ``input`` feeds every receiver; a layer's
heads and MLP feed every receiver of later layers and ``logits``; a layer's heads also feed its
own MLP in sequential-residual models, but not in parallel-residual ones (GPT-NeoX with
``use_parallel_residual``: attention and MLP read the same ``resid_pre``).

**Grouped-query attention** keeps its grouping. The key/value receiver of query head ``H`` is
the key/value input of the key/value head ``H // (n_heads / n_kv_heads)`` *as query head H reads
it*: the part of the metric's dependence on that key/value head that flows through head ``H``'s
own attention. Several query heads reading one key/value head therefore have separate
receivers (EAP-IG's convention, and its edge count), computed without ungrouping any weight.

Senders are numbered in forward order (``input``, then per layer its heads and its MLP), and
every receiver reads a *prefix* of that order, so an edge is ``(receiver, sender < n_src)``
and the edges are stored receiver-major. SmolLM2-135M (30 layers, 9 query heads) has
:meth:`EdgeGraph.count` ``= 123,211`` edges.
"""

from __future__ import annotations

import difflib
import heapq
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ._io import atomic_write_text
from .metrics import bootstrap_interval
from .errors import (CorruptResultError, InvalidArgumentError, InvalidTypeError,
                     UnknownComponentError, UnsupportedArchitectureError)

if TYPE_CHECKING:
    from .model import HookedModel
    from .names import Site

#: ``"format"`` of :meth:`EdgeResult.to_json` files.
EDGES_FORMAT = "causalpatch.edges"
FORMAT_VERSION = 1
#: ``"format"`` of :meth:`Circuit.to_json` files.
CIRCUIT_FORMAT = "causalpatch.circuit"


def read_json_object(text_or_path: str | bytes | os.PathLike[str], what: str) -> dict:
    """A JSON object from JSON text (``str``/``bytes`` starting with ``{``) or a file path.

    Raises:
        CorruptResultError: not JSON, or JSON that is not an object (``what`` names the format).
        FileNotFoundError: the path does not exist.
    """
    text: str | bytes
    if isinstance(text_or_path, (bytes, str)) and str(text_or_path).lstrip()[:1] == "{":
        text = text_or_path
    else:
        text = Path(text_or_path).read_text()  # type: ignore[arg-type]  # a path here
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CorruptResultError(f"invalid {what} JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CorruptResultError(f"invalid {what} JSON: not an object")
    return data


@dataclass(frozen=True)
class EdgeGraph:
    """The nodes, receivers and edges of one model (module docstring).

    Attributes:
        n_layers, n_heads, n_kv_heads: the model's sizes.
        parallel: attention and MLP read the same residual stream (no head -> own-MLP edges).
    """

    n_layers: int
    n_heads: int
    n_kv_heads: int
    parallel: bool = False

    @classmethod
    def of(cls, model: HookedModel) -> EdgeGraph:
        """The graph of ``model``: a parallel residual is read off its adapter (a family
        without a ``resid_mid`` between attention and MLP)."""
        try:
            model.layer_site("resid_mid", 0)
            parallel = False
        except UnknownComponentError:
            parallel = True
        return cls(model.n_layers, model.n_heads, model.n_kv_heads, parallel)

    # -- names -------------------------------------------------------------------------------
    @cached_property
    def nodes(self) -> list[str]:
        """Every sender, in forward order: ``input``, then per layer ``a{L}.h0..`` and
        ``m{L}``."""
        out = ["input"]
        for layer in range(self.n_layers):
            out += [f"a{layer}.h{h}" for h in range(self.n_heads)] + [f"m{layer}"]
        return out

    @cached_property
    def receivers(self) -> list[str]:
        """Every receiver in storage order: per layer the query inputs of its heads, then
        their keys, then their values, then ``m{L}``; ``logits`` last."""
        out = []
        for layer in range(self.n_layers):
            for kind in ("q", "k", "v"):
                out += [f"a{layer}.h{h}.{kind}" for h in range(self.n_heads)]
            out.append(f"m{layer}")
        return [*out, "logits"]

    def sender_index(self, layer: int, head: int | None) -> int:
        """Index of head ``head`` (``None``: the MLP) of ``layer`` in :attr:`nodes`."""
        return 1 + layer * (self.n_heads + 1) + (self.n_heads if head is None else head)

    @cached_property
    def n_src(self) -> torch.Tensor:
        """``[n_receivers]`` how many senders (a prefix of :attr:`nodes`) each receiver
        reads."""
        counts = []
        for layer in range(self.n_layers):
            counts += [self.sender_index(layer, 0)] * (3 * self.n_heads)
            counts.append(self.sender_index(layer, 0) + (0 if self.parallel else self.n_heads))
        counts.append(len(self.nodes))
        return torch.tensor(counts, dtype=torch.long)

    @cached_property
    def offsets(self) -> torch.Tensor:
        """``[n_receivers + 1]`` where each receiver's edges start (the last: the count)."""
        return torch.cat([torch.zeros(1, dtype=torch.long), self.n_src.cumsum(0)])

    @property
    def n_edges(self) -> int:
        return int(self.offsets[-1])

    @staticmethod
    def count(n_layers: int, n_heads: int, parallel: bool = False) -> int:
        """The number of edges in closed form: ``3 H sum_L (1 + L (H + 1))`` into the heads,
        ``sum_L (1 + L (H + 1) + H)`` into the MLPs (without the ``+ H`` when parallel) and
        ``1 + n_layers (H + 1)`` into the logits."""
        n, h = n_layers, n_heads
        before = n + (h + 1) * n * (n - 1) // 2  # sum over layers of 1 + L (H + 1)
        return 3 * h * before + before + (0 if parallel else h * n) + 1 + n * (h + 1)

    @cached_property
    def _receiver_of(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.receivers)}

    @cached_property
    def _node_of(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.nodes)}

    @cached_property
    def edge_src(self) -> torch.Tensor:
        """``[n_edges]`` the sender index of every edge."""
        return torch.cat([torch.arange(int(k)) for k in self.n_src])

    @cached_property
    def edge_dst(self) -> torch.Tensor:
        """``[n_edges]`` the receiver index of every edge."""
        return torch.repeat_interleave(torch.arange(len(self.receivers)), self.n_src)

    def edge_names(self, index: int) -> tuple[str, str]:
        """``(src, dst)`` of edge ``index``."""
        return self.nodes[int(self.edge_src[index])], self.receivers[int(self.edge_dst[index])]

    def edge_index(self, src: str, dst: str) -> int:
        """The storage index of edge ``src -> dst``.

        Raises:
            UnknownComponentError: a name that is no node / receiver (with close matches).
            InvalidArgumentError: both exist but ``src`` writes after ``dst`` reads.
        """
        s = self._lookup(src, self._node_of, "src", "a node (input, a{L}.h{H}, m{L})")
        r = self._lookup(dst, self._receiver_of, "dst",
                         "a receiver (a{L}.h{H}.q/.k/.v, m{L}, logits)")
        if s >= int(self.n_src[r]):
            why = ("in a parallel-residual model a layer's MLP reads the layer's input, not its "
                   "heads' output" if self.parallel and dst.startswith("m")
                   and src.startswith(f"a{dst[1:]}.") else
                   f"{dst!r} reads the residual stream before {src!r} writes to it")
            raise InvalidArgumentError(
                f"there is no edge {src!r} -> {dst!r}: {why}; an edge needs its sender in an "
                f"earlier layer (or a head feeding its own layer's MLP)")
        return int(self.offsets[r]) + s

    def _lookup(self, name: Any, table: Mapping[str, int], arg: str, what: str) -> int:
        if isinstance(name, str) and name in table:
            return table[name]
        other = self._node_of if table is self._receiver_of else self._receiver_of
        hint = ""
        if isinstance(name, str) and name in other:
            hint = (f" ({name!r} is a {'node' if other is self._node_of else 'receiver'}: "
                    f"edges go from a node to a receiver)")
        close = difflib.get_close_matches(str(name), list(table), n=3, cutoff=0.6)
        if close:
            hint += f"; did you mean {', '.join(repr(c) for c in close)}?"
        raise UnknownComponentError(
            f"{arg}={name!r} is not {what} of this {self.n_layers}-layer, "
            f"{self.n_heads}-head graph{hint}")

    def receiver_parts(self, r: int) -> tuple[int, str, int]:
        """Receiver index -> ``(layer, kind, head)``: kind ``"q"/"k"/"v"`` (head: the query
        head), ``"mlp"`` or ``"logits"`` (layer ``n_layers``); head ``-1`` when none."""
        per_layer = 3 * self.n_heads + 1
        if r == len(self.receivers) - 1:
            return self.n_layers, "logits", -1
        layer, within = divmod(r, per_layer)
        if within == 3 * self.n_heads:
            return layer, "mlp", -1
        return layer, "qkv"[within // self.n_heads], within % self.n_heads

    @cached_property
    def receiver_node(self) -> torch.Tensor:
        """``[n_receivers]`` the node each receiver belongs to (``a{L}.h{H}.q/k/v`` ->
        ``a{L}.h{H}``, ``m{L}`` -> ``m{L}``); ``logits`` -> ``len(nodes)`` (a slot of its
        own)."""
        out = []
        for r in range(len(self.receivers)):
            layer, kind, head = self.receiver_parts(r)
            out.append(len(self.nodes) if kind == "logits" else
                       self.sender_index(layer, None if kind == "mlp" else head))
        return torch.tensor(out, dtype=torch.long)

    def to_dict(self) -> dict[str, Any]:
        return {"n_layers": self.n_layers, "n_heads": self.n_heads,
                "n_kv_heads": self.n_kv_heads, "parallel": self.parallel}


@dataclass
class EdgeResult:
    """Scores of every edge of an :class:`EdgeGraph`.

    Attributes:
        graph: the graph (edge ``i`` is :meth:`EdgeGraph.edge_names` ``(i)``).
        scores: ``[n_edges]`` normalised effects, ``(mean patched - mean base) / (mean source -
            mean base)`` with the patched metric estimated (``eap``, ``eap_ig``) or measured
            (``exact``): 1.0 = this edge alone moves the metric all the way to the source run.
        change: ``[n_edges]`` the same in the metric's own unit: mean over pairs of
            ``patched - base``.
        base_value, source_value: the mean metric of the base and source runs.
        method, direction, metric: how the scores were made.
        n_pairs: pairs averaged over.
        model_name: the model's name.
        extra: method details (``ig_steps``, timings, ...), JSON values; with ``per_pair``
            also ``pair_metrics``: ``{"base": [n_pairs], "source": [n_pairs]}``, each pair's
            metric on its base and source run.
        per_pair: ``[n_pairs, n_edges]`` each pair's ``patched - base`` (metric units; NaN
            for edges not scored), kept with ``edge_attribution(..., keep_per_pair=True)``;
            None otherwise. :meth:`ci` needs it.
    """

    graph: EdgeGraph
    scores: torch.Tensor
    change: torch.Tensor
    base_value: float
    source_value: float
    method: str
    direction: str
    metric: str
    n_pairs: int
    model_name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    per_pair: torch.Tensor | None = None

    @property
    def scored(self) -> torch.Tensor:
        """``[n_edges]`` bool: the edges that were scored (all but those left out by
        ``edges=``, which hold NaN)."""
        return ~torch.isnan(self.scores)

    def score(self, src: str, dst: str) -> float:
        """The normalised score of edge ``src -> dst`` (e.g. ``("a3.h2", "a5.h1.k")``)."""
        index = self.graph.edge_index(src, dst)
        value = float(self.scores[index])
        if value != value:
            raise InvalidArgumentError(
                f"edge {src!r} -> {dst!r} was not scored (the run's edges= left it out); "
                f"rerun with it in edges=")
        return value

    def ci(self, level: float = 0.95, n_boot: int = 1000, seed: int = 0, *,
           unit: str = "score") -> tuple[torch.Tensor, torch.Tensor]:
        """Bootstrap confidence interval of every edge's score over the pairs.

        The pairs are resampled with replacement ``n_boot`` times and each edge's value
        recomputed on every resample by the rule that made it
        (:func:`causalpatch.metrics.bootstrap_interval`): ``unit="score"`` (default) the
        normalised score ``(mean patched - mean base) / (mean source - mean base)`` with the
        resample's own gap, ``unit="change"`` the mean ``patched - base`` (``change``).

        Returns:
            ``(lower, upper)``, ``[n_edges]`` float32 (NaN for edges not scored).

        Raises:
            InvalidArgumentError: the result holds no per-pair values (run
                ``edge_attribution(..., keep_per_pair=True)`` on several pairs), or an unknown
                ``unit``.
            NormalizationError: ``unit="score"`` and a resample's gap is ~0.
        """
        if unit not in ("score", "change"):
            raise InvalidArgumentError(f"unit must be 'score' or 'change', got {unit!r}")
        metrics = self.extra.get("pair_metrics") or {}
        if self.per_pair is None or "base" not in metrics or "source" not in metrics:
            raise InvalidArgumentError(
                "ci() needs each pair's edge values, which this result does not hold: run "
                "edge_attribution(..., keep_per_pair=True) on a dataset of several pairs")
        keep = self.scored
        values = self.per_pair[:, keep].double()
        base = source = None
        if unit == "score":
            base = torch.tensor(metrics["base"], dtype=torch.float64)
            source = torch.tensor(metrics["source"], dtype=torch.float64)
            values = values / (source.mean() - base.mean())
        lo, up = bootstrap_interval(values, base=base, source=source, level=level,
                                    n_boot=n_boot, seed=seed)
        lower = torch.full_like(self.scores, float("nan"))
        upper = torch.full_like(self.scores, float("nan"))
        lower[keep], upper[keep] = lo, up
        return lower, upper

    def top(self, n: int = 10) -> list[tuple[str, str, float]]:
        """The ``n`` scored edges with the largest ``|score|``: ``(src, dst, score)``, largest
        first."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InvalidArgumentError(f"n must be a positive int, got {n!r}")
        key = torch.where(self.scored, self.scores.abs(), torch.full_like(self.scores, -1.0))
        order = torch.argsort(key, descending=True, stable=True)[:min(n, int(self.scored.sum()))]
        return [(*self.graph.edge_names(int(i)), float(self.scores[i])) for i in order]

    def circuit(self, n: int | None = None, *, threshold: float | None = None,
                greedy: bool = False, absolute: bool = True, prune: bool = True) -> Circuit:
        """The circuit of the ``n`` best edges (``greedy=True``: EAP-IG's greedy growth from
        the logits) or of every edge with ``|score| >= threshold``, pruned to the edges on a
        path from ``input`` to ``logits`` (:func:`select_edges`)."""
        return select_edges(self.graph, self.scores, n, threshold=threshold, greedy=greedy,
                            absolute=absolute, prune=prune)

    def to_pandas(self) -> Any:
        """One row per scored edge: ``src``, ``dst``, ``score`` (normalised), ``change``
        (metric units), in storage order (a ``pandas.DataFrame``)."""
        import pandas as pd

        g = self.graph
        nodes, receivers = g.nodes, g.receivers
        keep = self.scored
        return pd.DataFrame({
            "src": [nodes[i] for i in g.edge_src[keep].tolist()],
            "dst": [receivers[i] for i in g.edge_dst[keep].tolist()],
            "score": self.scores[keep].double().numpy(),
            "change": self.change[keep].double().numpy()})

    to_dataframe = to_pandas

    def to_dict(self) -> dict[str, Any]:
        """Everything as JSON values (edges in storage order; the graph by its sizes)."""
        return {"format": EDGES_FORMAT, "version": FORMAT_VERSION,
                "graph": self.graph.to_dict(), "method": self.method,
                "direction": self.direction, "metric": self.metric, "n_pairs": self.n_pairs,
                "model_name": self.model_name, "base_value": self.base_value,
                "source_value": self.source_value, "scores": _json_floats(self.scores),
                "change": _json_floats(self.change), "extra": self.extra,
                **({} if self.per_pair is None else
                   {"per_pair": [_json_floats(row) for row in self.per_pair]})}

    def to_json(self, path: str | os.PathLike[str] | None = None) -> str:
        """:meth:`to_dict` as JSON text, written atomically to ``path`` when given."""
        text = json.dumps(self.to_dict(), allow_nan=False)
        if path is not None:
            atomic_write_text(Path(path), text)
        return text

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EdgeResult:
        """Rebuild from :meth:`to_dict`."""
        try:
            if d.get("format") != EDGES_FORMAT:
                raise ValueError(f"format is {d.get('format')!r}, not {EDGES_FORMAT!r}")
            graph = EdgeGraph(**{k: d["graph"][k] for k in
                                 ("n_layers", "n_heads", "n_kv_heads", "parallel")})
            out = cls(graph, _floats(d["scores"]), _floats(d["change"]), float(d["base_value"]),
                      float(d["source_value"]), str(d["method"]), str(d["direction"]),
                      str(d["metric"]), int(d["n_pairs"]), str(d.get("model_name", "")),
                      dict(d.get("extra") or {}))
            if d.get("per_pair") is not None:
                out.per_pair = torch.stack([_floats(row) for row in d["per_pair"]])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CorruptResultError(f"invalid {EDGES_FORMAT} data: {exc!r}") from None
        if out.scores.shape != (graph.n_edges,) or out.change.shape != (graph.n_edges,):
            raise CorruptResultError(
                f"invalid {EDGES_FORMAT} data: {graph.n_edges} edges expected, got "
                f"{tuple(out.scores.shape)} scores")
        if out.per_pair is not None and out.per_pair.shape != (out.n_pairs, graph.n_edges):
            raise CorruptResultError(
                f"invalid {EDGES_FORMAT} data: per_pair is {tuple(out.per_pair.shape)}, expected "
                f"({out.n_pairs}, {graph.n_edges})")
        return out

    @classmethod
    def from_json(cls, text_or_path: str | bytes | os.PathLike[str]) -> EdgeResult:
        """Load :meth:`to_json`'s output (JSON text or a file path)."""
        return cls.from_dict(read_json_object(text_or_path, EDGES_FORMAT))

    def to_html(self, path: str | os.PathLike[str] | None = None, title: str | None = None,
                plotly: str = "inline", top_edges: int | None = None) -> str:
        """An interactive HTML report of these scores: the circuit of the ``top_edges`` best
        edges drawn by layer (default :data:`~causalpatch.render.circuit.DEFAULT_EDGES`; a
        control in the page changes how many), with a sortable table of them
        (:func:`causalpatch.render.html.report`; ``path``, when given, is written
        atomically). Returns the HTML text."""
        from .render.circuit import DEFAULT_EDGES, section_title
        from .render.html import report

        return report([self], path, title=title or f"causalpatch: {section_title(self)}",
                      plotly=plotly,
                      top_edges=DEFAULT_EDGES if top_edges is None else top_edges)

    def __repr__(self) -> str:
        return (f"EdgeResult(method={self.method!r}, direction={self.direction!r}, "
                f"metric={self.metric!r}, n_edges={self.graph.n_edges}, "
                f"n_pairs={self.n_pairs})")


# -- the model's side of the graph (shared by edge attribution and circuit evaluation) ----------
def check_separable(model: HookedModel) -> None:
    """Edges need each head's residual write on its own: a per-head ``attn.z`` whose output
    projection is added to the residual stream as it is (no post-attention norm).

    Raises:
        UnsupportedArchitectureError: heads that cannot be separated (Gemma 2/3).
    """
    reason = ""
    try:
        if not model.layer_site("attn.z", 0).per_head:
            reason = "its attn.z site is not per head"
    except UnknownComponentError as err:
        reason = str(err)
    if not reason and (model.runtime.post_norm_input("attn") is not None
                       or model.runtime.post_norm_input("mlp") is not None):
        reason = ("a norm after the attention block (Gemma 2/3's post-attention norm) mixes "
                  "the heads before the residual add, so no head has a residual write of its "
                  "own")
    if reason:
        raise UnsupportedArchitectureError(
            f"edge attribution needs each attention head's residual write separately, which "
            f"this {model.adapter.name} model does not have: {reason}; use "
            "attribution_patching(component='attn_head') for head scores instead")


def edge_sites(model: HookedModel, parallel: bool) -> dict[str, list[Site]]:
    """Per kind (``resid_pre``, ``attn.q/k/v/z``, ``mlp``, and ``resid_mid`` unless
    ``parallel``), every layer's site; ``post``: only the last layer's output."""
    kinds = ["resid_pre", "attn.q", "attn.k", "attn.v", "attn.z", "mlp"]
    if not parallel:
        kinds.append("resid_mid")
    out = {k: [model.layer_site(k, layer) for layer in range(model.n_layers)] for k in kinds}
    out["post"] = [model.layer_site("resid_post", model.n_layers - 1)]
    return out


def head_writes(model: HookedModel, layer: int, z: torch.Tensor) -> torch.Tensor:
    """``[..., H, d_head] -> [..., H, d_model]`` (float32): each head's ``z`` through its rows
    of layer ``layer``'s output projection (the bias, common to every head, left out)."""
    w, _ = model.runtime.output_projection(layer, "attn")  # [H * d_head, d_model]
    return torch.einsum("...he,hed->...hd", z.float(),
                        w.float().reshape(model.n_heads, model.d_head, -1))


def sender_sites(sites: dict[str, list[Site]]) -> list[Site]:
    """The sites :func:`sender_deltas` reads: the embedding (``resid_pre`` of layer 0), every
    layer's ``attn.z`` and every MLP's output."""
    return [sites["resid_pre"][0], *sites["attn.z"], *sites["mlp"]]


def sender_deltas(model: HookedModel, sites: dict[str, list[Site]],
                  base: Mapping[str, torch.Tensor], source: Mapping[str, torch.Tensor]
                  ) -> torch.Tensor:
    """``[b, T, n_nodes, d_model]`` every node's residual write, source minus base: the
    embedding (``resid_pre`` of layer 0), each head's ``z`` through its rows of the output
    projection (the bias is common to both runs), each MLP's output."""
    name = sites["resid_pre"][0].name
    first = source[name].float() - base[name].float()  # [b, T, d_model]
    n_heads = model.n_heads
    out = first.new_empty(first.shape[0], first.shape[1], 1 + model.n_layers * (n_heads + 1),
                          first.shape[2])
    out[:, :, 0] = first  # filled in place: no second copy of the whole tensor
    at = 1
    for layer in range(model.n_layers):
        z = sites["attn.z"][layer].name
        out[:, :, at : at + n_heads] = head_writes(model, layer,
                                                   source[z].float() - base[z].float())
        m = sites["mlp"][layer].name
        out[:, :, at + n_heads] = source[m].float() - base[m].float()
        at += n_heads + 1
    return out


# -- circuits ----------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Circuit:
    """A set of edges of an :class:`EdgeGraph`.

    Build one from names (:meth:`from_edges`), :meth:`full` / :meth:`empty`, or from scores
    (:meth:`EdgeResult.circuit`, :func:`select_edges`). :meth:`pruned` drops every edge that
    lies on no path from ``input`` to ``logits`` inside the circuit (an edge out of a node no
    circuit edge reaches, or into a node whose output no circuit edge carries on to the
    logits); such edges cannot change what the circuit computes.

    Attributes:
        graph: the graph.
        mask: ``[n_edges]`` bool, edge ``i`` (:meth:`EdgeGraph.edge_names`) in the circuit.
    """

    graph: EdgeGraph
    mask: torch.Tensor

    def __post_init__(self) -> None:
        if (not isinstance(self.mask, torch.Tensor) or self.mask.dtype != torch.bool
                or self.mask.shape != (self.graph.n_edges,)):
            raise InvalidArgumentError(
                f"a Circuit's mask must be a bool tensor of shape [{self.graph.n_edges}] (one "
                f"entry per edge of the graph), got "
                f"{getattr(self.mask, 'dtype', type(self.mask).__name__)} "
                f"{tuple(getattr(self.mask, 'shape', ()))}")

    @classmethod
    def from_edges(cls, graph: EdgeGraph, edges: Iterable[Any]) -> Circuit:
        """The circuit of ``edges``, ``(src, dst)`` name pairs such as ``("a0.h1",
        "a2.h3.k")``.

        Raises:
            InvalidTypeError: not an iterable of name pairs.
            UnknownComponentError / InvalidArgumentError: a name that is no node / receiver
                (with close matches), or an edge the graph does not have (reader before
                writer).
        """
        if isinstance(edges, (str, bytes)) or not hasattr(edges, "__iter__"):
            raise InvalidTypeError(
                f"edges must be a list of (src, dst) name pairs such as [('a0.h1', "
                f"'a2.h3.k')], got {edges!r}")
        mask = torch.zeros(graph.n_edges, dtype=torch.bool)
        for item in edges:
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise InvalidTypeError(f"each edge must be a (src, dst) name pair, got {item!r}")
            mask[graph.edge_index(item[0], item[1])] = True
        return cls(graph, mask)

    @classmethod
    def full(cls, graph: EdgeGraph) -> Circuit:
        """Every edge: evaluates to the clean run (faithfulness 1)."""
        return cls(graph, torch.ones(graph.n_edges, dtype=torch.bool))

    @classmethod
    def empty(cls, graph: EdgeGraph) -> Circuit:
        """No edge: evaluates to the corrupted run (faithfulness 0)."""
        return cls(graph, torch.zeros(graph.n_edges, dtype=torch.bool))

    @property
    def n_edges(self) -> int:
        return int(self.mask.sum())

    def __len__(self) -> int:
        return self.n_edges

    def __contains__(self, edge: object) -> bool:
        if not isinstance(edge, (tuple, list)) or len(edge) != 2:
            return False
        return bool(self.mask[self.graph.edge_index(edge[0], edge[1])])

    @property
    def edges(self) -> list[tuple[str, str]]:
        """``(src, dst)`` of every edge, in storage order."""
        return [self.graph.edge_names(int(i)) for i in self.mask.nonzero()[:, 0]]

    @property
    def nodes(self) -> list[str]:
        """The nodes an edge touches (as sender, or as the node its receiver belongs to), in
        forward order, ``logits`` last when an edge reaches it."""
        g = self.graph
        touched = torch.zeros(len(g.nodes) + 1, dtype=torch.bool)
        touched[g.edge_src[self.mask]] = True
        touched[g.receiver_node[g.edge_dst[self.mask]]] = True
        names = [*g.nodes, "logits"]
        return [names[int(i)] for i in touched.nonzero()[:, 0]]

    def _reach(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``([n_nodes + 1], [n_nodes + 1])`` bool: reached from ``input`` along circuit
        edges, and reaching ``logits`` (the last slot) along circuit edges."""
        g = self.graph
        src, dst = g.edge_src[self.mask], g.receiver_node[g.edge_dst[self.mask]]
        n = len(g.nodes) + 1
        forward = torch.zeros(n, dtype=torch.bool)
        forward[0] = True
        backward = torch.zeros(n, dtype=torch.bool)
        backward[-1] = True
        for reach, frm, to in ((forward, src, dst), (backward, dst, src)):
            while True:  # one step per layer of depth at most: senders precede receivers
                new = reach.clone()
                new[to[reach[frm]]] = True
                if torch.equal(new, reach):
                    break
                reach.copy_(new)
        return forward, backward

    @property
    def connected(self) -> bool:
        """Some path of circuit edges leads from ``input`` to ``logits``."""
        return bool(self._reach()[0][-1])

    def pruned(self) -> Circuit:
        """The edges on some path of circuit edges from ``input`` to ``logits`` (module
        docstring of :class:`Circuit`); the empty circuit when there is none."""
        g = self.graph
        forward, backward = self._reach()
        keep = self.mask & forward[g.edge_src] & backward[g.receiver_node[g.edge_dst]]
        return Circuit(g, keep)

    def to_dict(self) -> dict[str, Any]:
        """JSON values: the graph by its sizes, the edges as ``[src, dst]`` names."""
        return {"format": CIRCUIT_FORMAT, "version": FORMAT_VERSION,
                "graph": self.graph.to_dict(), "edges": [list(e) for e in self.edges]}

    def to_json(self, path: str | os.PathLike[str] | None = None) -> str:
        """:meth:`to_dict` as JSON text, written atomically to ``path`` when given."""
        text = json.dumps(self.to_dict())
        if path is not None:
            atomic_write_text(Path(path), text)
        return text

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Circuit:
        """Rebuild from :meth:`to_dict`."""
        try:
            if d.get("format") != CIRCUIT_FORMAT:
                raise ValueError(f"format is {d.get('format')!r}, not {CIRCUIT_FORMAT!r}")
            graph = EdgeGraph(**{k: d["graph"][k] for k in
                                 ("n_layers", "n_heads", "n_kv_heads", "parallel")})
            return cls.from_edges(graph, [tuple(e) for e in d["edges"]])
        except (KeyError, TypeError, ValueError, UnknownComponentError) as exc:
            raise CorruptResultError(f"invalid {CIRCUIT_FORMAT} data: {exc!r}") from None

    @classmethod
    def from_json(cls, text_or_path: str | bytes | os.PathLike[str]) -> Circuit:
        """Load :meth:`to_json`'s output (JSON text or a file path)."""
        return cls.from_dict(read_json_object(text_or_path, CIRCUIT_FORMAT))

    def __repr__(self) -> str:
        return (f"Circuit({self.n_edges} of {self.graph.n_edges} edges, "
                f"{len(self.nodes)} nodes)")


def _ranking(scores: torch.Tensor, absolute: bool) -> torch.Tensor:
    """``[n_edges]`` float64 ranking key: ``|score|`` (or the score), ``-inf`` for NaN."""
    key = scores.double().abs() if absolute else scores.double()
    return torch.where(torch.isnan(key), torch.full_like(key, float("-inf")), key)


def select_edges(graph: EdgeGraph, scores: torch.Tensor, n: int | None = None, *,
                 threshold: float | None = None, greedy: bool = False, absolute: bool = True,
                 prune: bool = True) -> Circuit:
    """A circuit chosen from edge scores ``[n_edges]`` (NaN: never chosen).

    * ``n=``: the ``n`` edges with the largest ``|score|`` (``absolute=False``: the largest
      signed score); ties broken by storage order.
    * ``threshold=``: every edge with ``|score| >= threshold``.
    * ``n=`` with ``greedy=True`` (EAP-IG's greedy search): grown backwards from the logits.
      The candidates start as the edges into ``logits``; the best candidate joins the circuit,
      and when its sender is a node new to the circuit, the edges into that node's receivers
      (a head's ``.q``, ``.k`` and ``.v``, an MLP's input) become candidates; until ``n``
      edges (or no candidate is left). Every chosen edge then leads to the logits.

    ``prune`` (default): :meth:`Circuit.pruned` of the choice, so the circuit may hold fewer
    than ``n`` edges.

    Raises:
        InvalidArgumentError: neither or both of ``n`` and ``threshold``, ``greedy`` with a
            threshold, ``n`` outside ``[0, number of scored edges]``, scores of the wrong shape.
    """
    if not isinstance(scores, torch.Tensor) or scores.shape != (graph.n_edges,):
        raise InvalidArgumentError(
            f"scores must be a [{graph.n_edges}] tensor (one per edge of this graph), got "
            f"{tuple(getattr(scores, 'shape', ())) or type(scores).__name__}")
    if (n is None) == (threshold is None):
        raise InvalidArgumentError(
            "give exactly one of n= (the number of edges) and threshold= (the smallest "
            f"|score| kept), got n={n!r}, threshold={threshold!r}")
    key = _ranking(scores, absolute)
    n_scored = int(torch.isfinite(key).sum())
    if threshold is not None:
        if greedy:
            raise InvalidArgumentError("greedy=True grows a circuit to n edges: give n=, not "
                                       "threshold=")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) \
                or threshold != threshold:
            raise InvalidTypeError(f"threshold must be a number, got {threshold!r}")
        mask = key >= float(threshold)
    else:
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= n_scored:
            raise InvalidArgumentError(
                f"n must be an int in [0, {n_scored}] (the number of scored edges), got {n!r}")
        mask = _greedy(graph, key, n) if greedy else _top(key, n)
    circuit = Circuit(graph, mask)
    return circuit.pruned() if prune else circuit


def _top(key: torch.Tensor, n: int) -> torch.Tensor:
    mask = torch.zeros(len(key), dtype=torch.bool)
    mask[torch.argsort(key, descending=True, stable=True)[:n]] = True
    return mask


def _greedy(graph: EdgeGraph, key: torch.Tensor, n: int) -> torch.Tensor:
    """EAP-IG's greedy growth from the logits (:func:`select_edges`), with a heap of
    candidate edges ``(-key, index)``."""
    mask = torch.zeros(len(key), dtype=torch.bool)
    values = key.tolist()
    offsets = graph.offsets.tolist()
    per_layer = 3 * graph.n_heads + 1

    def receivers_of(node: int) -> list[int]:
        layer, within = divmod(node - 1, graph.n_heads + 1)
        if within == graph.n_heads:  # the MLP
            return [layer * per_layer + 3 * graph.n_heads]
        return [layer * per_layer + kind * graph.n_heads + within for kind in range(3)]

    heap: list[tuple[float, int]] = []

    def push(receiver: int) -> None:
        for e in range(offsets[receiver], offsets[receiver + 1]):
            if values[e] != float("-inf"):
                heapq.heappush(heap, (-values[e], e))

    push(len(graph.receivers) - 1)
    src = graph.edge_src.tolist()
    added = {0}  # input has no receivers
    count = 0
    while count < n and heap:
        _, e = heapq.heappop(heap)
        mask[e] = True
        count += 1
        if src[e] not in added:
            added.add(src[e])
            for r in receivers_of(src[e]):
                push(r)
    return mask


def _json_floats(t: torch.Tensor) -> list[float | None]:
    """Floats for JSON, NaN (not scored) as ``null``."""
    return [None if v != v else v for v in t.double().tolist()]


def _floats(values: Any) -> torch.Tensor:
    """:func:`_json_floats` back: ``null`` as NaN."""
    return torch.tensor([float("nan") if v is None else float(v) for v in values],
                        dtype=torch.float32)

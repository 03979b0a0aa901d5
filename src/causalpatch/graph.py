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
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ._io import atomic_write_text
from .errors import CorruptResultError, InvalidArgumentError, UnknownComponentError

if TYPE_CHECKING:
    from .model import HookedModel

#: ``"format"`` of :meth:`EdgeResult.to_json` files.
EDGES_FORMAT = "causalpatch.edges"
FORMAT_VERSION = 1


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
        extra: method details (``ig_steps``, timings, ...), JSON values.
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

    def top(self, n: int = 10) -> list[tuple[str, str, float]]:
        """The ``n`` scored edges with the largest ``|score|``: ``(src, dst, score)``, largest
        first."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InvalidArgumentError(f"n must be a positive int, got {n!r}")
        key = torch.where(self.scored, self.scores.abs(), torch.full_like(self.scores, -1.0))
        order = torch.argsort(key, descending=True, stable=True)[:min(n, int(self.scored.sum()))]
        return [(*self.graph.edge_names(int(i)), float(self.scores[i])) for i in order]

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
                "change": _json_floats(self.change), "extra": self.extra}

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
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptResultError(f"invalid {EDGES_FORMAT} data: {exc!r}") from None
        if out.scores.shape != (graph.n_edges,) or out.change.shape != (graph.n_edges,):
            raise CorruptResultError(
                f"invalid {EDGES_FORMAT} data: {graph.n_edges} edges expected, got "
                f"{tuple(out.scores.shape)} scores")
        return out

    @classmethod
    def from_json(cls, text_or_path: str | bytes | os.PathLike[str]) -> EdgeResult:
        """Load :meth:`to_json`'s output (JSON text or a file path)."""
        text: str | bytes
        if isinstance(text_or_path, (bytes, str)) and str(text_or_path).lstrip()[:1] == "{":
            text = text_or_path
        else:
            text = Path(text_or_path).read_text()  # type: ignore[arg-type]  # a path here
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CorruptResultError(f"invalid {EDGES_FORMAT} JSON: {exc}") from None
        if not isinstance(data, dict):
            raise CorruptResultError(f"invalid {EDGES_FORMAT} JSON: not an object")
        return cls.from_dict(data)

    def __repr__(self) -> str:
        return (f"EdgeResult(method={self.method!r}, direction={self.direction!r}, "
                f"metric={self.metric!r}, n_edges={self.graph.n_edges}, "
                f"n_pairs={self.n_pairs})")



def _json_floats(t: torch.Tensor) -> list[float | None]:
    """Floats for JSON, NaN (not scored) as ``null``."""
    return [None if v != v else v for v in t.double().tolist()]


def _floats(values: Any) -> torch.Tensor:
    """:func:`_json_floats` back: ``null`` as NaN."""
    return torch.tensor([float("nan") if v is None else float(v) for v in values],
                        dtype=torch.float32)

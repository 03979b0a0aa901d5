"""Edge attribution: which edges of the computational graph carry a behaviour.

The graph (:mod:`causalpatch.graph`) has one edge per (writer, reader) pair of the residual
stream: ``input``, every head ``a{L}.h{H}`` and every MLP ``m{L}`` write; every head's query,
key and value input (``a{L}.h{H}.q/.k/.v``), every MLP ``m{L}`` and the ``logits`` read. The
score of an edge ``u -> v`` is the change of the metric when only ``v``'s input receives
``u``'s difference ``z_u(source) - z_u(base)`` (every other reader keeps the base run's input).
Three methods:

``"eap"`` (edge attribution patching, Syed et al. 2023)
    The first-order estimate ``sum_t (z_u(source) - z_u(base))_t . dM / d(input of v)_t``,
    the gradient at the base run. ``dM / d(input of v)`` is the gradient with respect to
    ``v``'s *own copy* of the residual stream: for a head's query it flows only through that
    head's query (its slice of the query projection, back through the layer's input norm); for
    a key/value only through what that query head reads of its key/value head; for an MLP only
    through the MLP. All of them come from one backward pass: the gradients at each layer's
    q/k/v and attention output are mapped back to the residual stream by vector-Jacobian
    products on the same graph (:func:`causalpatch.engine.gradient_pass`'s ``after``), all
    q/k/v receivers of a layer in one batched product (``is_grads_batched``); a query head's
    share of a grouped key/value head's gradient is the product of the attention with that
    head's output gradient alone (one product per member of a group, all groups at once, the
    last member by difference). An MLP receiver's gradient is ``resid_mid``'s minus the layer
    output's (the skip connection's share), with no further backward (parallel-residual
    models: one product through the MLP). The scores of every edge are then one contraction
    per receiver layer, from the first position where a prompt differs: no loop over edges.

``"eap_ig"`` (EAP with integrated gradients, Hanna et al. 2024)
    The same with the gradient averaged over ``ig_steps`` runs whose input embeddings are
    ``e_source + (k / ig_steps) (e_base - e_source)``, ``k = 0 .. ig_steps - 1``: the source
    endpoint is included and the base endpoint is not (a Riemann sum from the source side). With
    ``direction="noise"`` these are exactly EAP-IG's points ``corrupted + (k/m)(clean -
    corrupted)``, ``k = 0..m-1``. The steps are rows of one batch.

``"exact"`` (edge patching: path patching with one sender and one receiver)
    The metric of the base run in which only ``v`` reads ``x + (z_u(source) - z_u(base))``:
    the receiver's input is computed by one call of its layer on the shifted residual stream
    (q/k/v, or the MLP's output with the attention output held at the base run's), written
    into the base run at its site, and the rest of the model recomputed from there on the
    staircase (:func:`causalpatch.engine.climb`), one row per edge, batched. A query head's
    key/value receiver writes its key/value head and holds every other head's output at the
    base run's: heads do not mix inside the attention, so only that query head reads the new
    key/value, exactly, without ungrouping any weight. ``edges=`` chooses which edges to run.

Sign and direction (as everywhere in causalpatch, docs/noising_vs_denoising.md): the base run
is patched with the source run's values; ``direction="noise"`` (the default here, as in EAP and
EAP-IG) has base = clean, source = corrupted, ``"denoise"`` the reverse. Scores are normalised
like every other method: ``(mean patched - mean base) / (mean source - mean base)`` over pairs,
so 1.0 = "this edge alone moves the metric all the way to the source run" (full damage when
noising); :attr:`~causalpatch.graph.EdgeResult.change` keeps the metric's own unit. EAP-IG's and
AutoCircuit's scores are the un-normalised ``change`` summed (EAP-IG: averaged) over the batch,
usually of a loss such as ``-logit_diff``, so their sign is flipped relative to
``change`` with ``metric="logit_diff"``.

Example::

    from causalpatch import InterpretableModel, edge_attribution
    model = InterpretableModel("smollm2")
    result = edge_attribution(
        model, "When Mary and John went to the store, John gave a drink to",
        "When Mary and John went to the store, Mary gave a drink to",
        correct=" Mary", incorrect=" John")
    result.top(5)                     # [(src, dst, score), ...]
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from ..assemble import GroupValues, Scale, aggregate, answer_columns
from ..engine import (PairRun, Step, cachers, climb, embed, gradient_pass, last_logits,
                      fit_budget, row_bytes, rows_per_chunk, run_layer, run_pair,
                      unembed)
from ..enums import Direction
from ..errors import InvalidArgumentError, InvalidTypeError
from ..graph import (EdgeGraph, EdgeResult, check_separable, edge_sites, sender_deltas,
                     sender_sites)
from ..hooks import Hook, StopForward
from ..metrics import Metric
from ..options import DEFAULT_MEMORY_MB, Progress, RunOptions, prepare_pairs
from ..plan import Pair, check_int, metric_inputs

if TYPE_CHECKING:
    from ..model import HookedModel
    from ..names import Site

#: ``method=``: the first-order estimate, its integrated-gradients variant, exact patching.
METHODS = ("eap", "eap_ig", "exact")

#: How much more a gradient-pass row holds than one forward's activations as
#: :func:`~causalpatch.engine.row_bytes` counts them (the retained graph, every site's gradient,
#: the senders' cache, the vector-Jacobian products' temporaries). Measured on SmolLM2 IOI
#: pairs of 15 tokens (``benchmarks/edges_cost.py``'s memory probes, peak RSS added, with the
#: per-pair term below): ``eap`` 14 pairs 873 MiB (0.63x the row estimate), ``eap_ig`` 2 pairs
#: x 5 steps 508 MiB (1.12x); 1.5 leaves room for another allocator and longer prompts.
GRADIENT_ROW_FACTOR = 1.5


def pairs_per_pass(model: HookedModel, n_tokens: int, steps: int, memory_mb: float) -> int:
    """Pairs of ``n_tokens`` tokens per ``eap``/``eap_ig`` gradient pass that fit ``memory_mb``
    MiB: per pair, ``steps`` rows of ``GRADIENT_ROW_FACTOR`` times one forward's activations
    (``row_bytes`` per layer plus the logits at every position) and every receiver's input
    gradient and sender difference (``4 (n_receivers + n_nodes) n_tokens d_model`` bytes).

    Raises:
        InvalidArgumentError: the budget holds no pair (the message names the minimum).
    """
    graph = EdgeGraph.of(model)
    d = model.dims
    row = (d.n_layers * row_bytes(model, n_tokens, n_tokens)
           + 4 * n_tokens * d.vocab_size)
    held = 4 * (len(graph.receivers) + len(graph.nodes)) * n_tokens * d.d_model
    return fit_budget(memory_mb, GRADIENT_ROW_FACTOR * steps * row + held,
                      f"one pair's gradient pass ({n_tokens} tokens, {steps} row(s) per pair)",
                      "(or batch_size=1 to run one pair at a time)")


class _Receivers:
    """The leaf of :func:`~causalpatch.engine.gradient_pass` that keeps each site's tensors,
    and the vector-Jacobian products that turn the pass's gradients into every receiver's
    input gradient ``dM / d(input of v)`` (module docstring), averaged over ``steps`` rows per
    pair (``eap_ig``), kept from position ``start`` on: before the first token where a pair of
    the batch differs, the base and source runs are the same computation, so no sender has a
    difference there and those gradients would only be multiplied by exact zeros."""

    def __init__(self, model: HookedModel, graph: EdgeGraph, sites: dict[str, list[Site]],
                 steps: int, start: int = 0,
                 base_senders: Mapping[str, torch.Tensor] | None = None) -> None:
        self.model, self.graph, self.sites, self.steps = model, graph, sites, steps
        self.parallel = graph.parallel
        self.start = start
        #: the base run's sender activations when the pass's own base rows are not the base
        #: run (``eap_ig``'s interpolations); ``None``: the pass's base rows
        self.base_senders = base_senders
        self.kept: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.scores: torch.Tensor | None = None  # [b, n_edges] once the pass is done

    def leaf(self, site: Site, act: torch.Tensor
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``act + delta`` with ``delta`` a zero of ``act``'s shape that costs no memory: a
        broadcast view of one differentiable zero, itself a node of the graph, so the pass's
        gradient with respect to it is ``d metric / d act`` element by element (as a full
        zero tensor would give, without holding one per site)."""
        zero = torch.zeros((), dtype=act.dtype, device=act.device, requires_grad=True)
        delta = zero.expand_as(act)
        self.kept[site.name] = (act, delta)
        return act + delta, {"act": delta}

    def _mean(self, g: torch.Tensor, batch_dim: int) -> torch.Tensor:
        """Average the ``steps`` rows of each pair (rows pair-major) in float32, from position
        ``start`` on (the position axis follows the batch axis; a copy, so that the full
        gradient is freed)."""
        g = g.float().narrow(batch_dim + 1, self.start, g.shape[batch_dim + 1] - self.start)
        if self.steps == 1:
            return g.detach().clone()
        shape = g.shape
        g = g.reshape(*shape[:batch_dim], -1, self.steps, *shape[batch_dim + 1:])
        return g.mean(batch_dim + 1).detach()

    def after(self, grads: dict[str, dict[str, torch.Tensor]],
              base: Mapping[str, torch.Tensor], source: Mapping[str, torch.Tensor]) -> None:
        """Every edge's estimate ``sum_t delta_u . grad_v`` (``self.scores``), one layer's
        receivers at a time: each layer's input gradients are contracted with the senders'
        differences as soon as they are computed, so no layer's are held past its own turn."""
        model, sites, graph = self.model, self.sites, self.graph
        senders = [s.name for s in sender_sites(sites)]
        base_of = self.base_senders if self.base_senders is not None else base
        t0 = self.start
        deltas = sender_deltas(model, sites, {k: base_of[k][:, t0:] for k in senders},
                               {k: source[k][:, t0:] for k in senders})
        # positions before the first one where a sender differs have no difference at all
        # (exact zeros): they add nothing, so they are skipped
        moved = deltas.flatten(2).ne(0).any(2).any(0).nonzero()
        w = int(moved[0]) if len(moved) else deltas.shape[1]
        deltas = deltas[:, w:]
        out: list[torch.Tensor] = []
        n_heads, n_kv = model.n_heads, model.n_kv_heads
        group = n_heads // n_kv
        heads = torch.arange(n_heads)
        kv_of = heads // group  # the key/value head each query head reads
        for layer in range(model.n_layers):
            z_act, _ = self.kept[sites["attn.z"][layer].name]
            dz = grads[sites["attn.z"][layer].name]["act"]  # [B, T, H, d_head]
            dq = grads[sites["attn.q"][layer].name]["act"]
            k_name, v_name = sites["attn.k"][layer].name, sites["attn.v"][layer].name
            if group == 1:  # every key/value head is read by one query head
                dk, dv = grads[k_name]["act"], grads[v_name]["act"]
            else:  # member j of every group at once: heads j, j + group, ... read kv heads 0..
                dk, dv = torch.zeros_like(dz), torch.zeros_like(dz)
                rest_k, rest_v = grads[k_name]["act"].clone(), grads[v_name]["act"].clone()
                for j in range(group - 1):
                    mask = (heads % group == j).to(dz.dtype).to(dz.device)[:, None]
                    gk, gv = _vjp(z_act, [self.kept[k_name][1], self.kept[v_name][1]],
                                  dz * mask)
                    dk[:, :, j::group], dv[:, :, j::group] = gk, gv
                    rest_k -= gk
                    rest_v -= gv
                # the last member's share is what the others leave of the total gradient
                dk[:, :, group - 1::group], dv[:, :, group - 1::group] = rest_k, rest_v
            x = self.kept[sites["resid_pre"][layer].name][1]
            parts = []
            kinds = ((sites["attn.q"][layer].name, dq, heads), (k_name, dk, kv_of),
                     (v_name, dv, kv_of))
            for name, per_head, units in kinds:
                act = self.kept[name][0]  # [B, T, n_units, d_head]
                cot = per_head.new_zeros(n_heads, *act.shape)
                # receiver h's cotangent: its own gradient in the unit it reads, zero elsewhere
                cot[heads, :, :, units] = per_head.permute(2, 0, 1, 3)
                # one batched product per kind, through its own projection and the norm only
                # (a product over q, k and v at once would push each receiver's zero
                # cotangents through the other two projections: 3x the work, same result)
                (g,) = _vjp(act, [x], cot, batched=True)
                parts.append(g)
            attn = self._mean(torch.cat(parts), 1)[:, :, w:]  # [3 H, b, T', d_model]
            n = graph.sender_index(layer, 0)
            out.append(torch.einsum("btsd,rbtd->brs", deltas[:, :, :n], attn).flatten(1))
            del attn, parts
            mlp_name = sites["mlp"][layer].name
            if self.parallel:  # the MLP reads resid_pre, as the attention does
                (g,) = _vjp(self.kept[mlp_name][0], [self.kept[sites["resid_pre"][layer].name][1]],
                            grads[mlp_name]["act"])
            else:  # resid_mid's gradient is the layer output's (the skip) plus the MLP path's
                after_layer = (sites["resid_pre"][layer + 1] if layer + 1 < model.n_layers
                               else sites["post"][0])
                g = grads[sites["resid_mid"][layer].name]["act"] - grads[after_layer.name]["act"]
            n_mlp = n + (0 if graph.parallel else graph.n_heads)
            out.append(torch.einsum("btsd,btd->bs", deltas[:, :, :n_mlp],
                                    self._mean(g, 0)[:, w:]))
        logits = self._mean(grads[sites["post"][0].name]["act"], 0)[:, w:]
        out.append(torch.einsum("btsd,btd->bs", deltas, logits))
        self.scores = torch.cat(out, dim=1).detach()
        self.kept.clear()


def _vjp(outputs: torch.Tensor | list[torch.Tensor], inputs: list[torch.Tensor],
         cotangents: torch.Tensor | list[torch.Tensor], batched: bool = False
         ) -> list[torch.Tensor]:
    """``cotangents . d outputs / d inputs`` on the retained graph (zeros where unused);
    ``batched``: the cotangents have a leading axis of independent cotangents."""
    found = torch.autograd.grad(outputs, inputs, cotangents, retain_graph=True,
                                allow_unused=True, is_grads_batched=batched)
    lead = (cotangents[0] if isinstance(cotangents, list) else cotangents).shape[:1]
    return [torch.zeros((*lead, *t.shape) if batched else t.shape, dtype=t.dtype,
                        device=t.device) if g is None else g for g, t in zip(found, inputs)]


# -- exact edge patching -----------------------------------------------------------------------
def _window(run: PairRun, name: str) -> torch.Tensor:
    """A recorded base-run activation on the staircase window ``[1, T - start, ...]``."""
    assert run.prepared is not None
    return run.base.acts[name][:, run.prepared.start:]


def _receiver_values(model: HookedModel, run: PairRun, sites: dict[str, list[Site]],
                     layer: int, mlp: bool, hidden: torch.Tensor
                     ) -> dict[str, torch.Tensor]:
    """Pass 1: layer ``layer`` called on ``hidden`` ``[R, q, d_model]`` (the base input plus
    each row's sender difference); its q/k/v (``mlp=False``) or, with the attention output
    held at the base run's so that the MLP reads ``resid_mid + difference``, its MLP output."""
    assert run.prepared is not None
    got: dict[str, torch.Tensor] = {}
    wanted = ("mlp",) if mlp else ("attn.q", "attn.k", "attn.v")

    def reader(kind: str) -> Callable[[torch.Tensor], None]:
        def read(act: torch.Tensor) -> None:
            got[kind] = act.detach().clone()
            if all(k in got for k in wanted):
                raise StopForward  # what this pass needs is read
        return read

    hooks = [Hook(sites[k][layer], reader(k)) for k in wanted]
    if mlp:
        base_attn = _window(run, sites["attn"][layer].name)
        hooks.insert(0, Hook(sites["attn"][layer],
                             lambda act: base_attn.to(act.dtype).expand_as(act)))
    run_layer(model, run.prepared, layer, hidden, hooks, stop_ok=True)
    return got


def _exact_logits(model: HookedModel, run: PairRun, graph: EdgeGraph,
                  sites: dict[str, list[Site]], edges: list[int], deltas: torch.Tensor,
                  chunk_size: int | None, memory_mb: float, columns: list[int] | None
                  ) -> torch.Tensor:
    """``[len(edges), n_columns]`` last-position logits of the base run with only each edge's
    receiver reading its sender's difference ``deltas`` ``[1, q, n_nodes, d_model]`` (on the
    staircase window): pass 1 computes the receiver's input from ``base + difference`` (one
    call of its layer), pass 2 writes it and climbs from the receiver's layer. A query head's
    key/value receiver writes its key/value head and keeps every other head's output at the
    base run's: heads do not mix inside the attention, so only that query head reads it."""
    stairs = run.prepared
    assert stairs is not None
    n_heads, group = model.n_heads, model.n_heads // model.n_kv_heads
    src = graph.edge_src[edges].tolist()
    dst = graph.edge_dst[edges].tolist()
    parts = [graph.receiver_parts(r) for r in dst]
    n_cols = model.vocab_size if columns is None else len(set(columns))
    out = torch.empty(len(edges), n_cols)

    def base_hidden(layer: int) -> torch.Tensor:
        return stairs.calls[layer].hidden if layer < model.n_layers else stairs.final_input

    by_group: dict[tuple[int, bool], list[int]] = {}
    for i, (layer, kind, _) in enumerate(parts):
        by_group.setdefault((layer, kind == "mlp"), []).append(i)
    q = deltas.shape[1]
    T = run.base_ids.shape[1]
    size = chunk_size or rows_per_chunk(model, q, T, memory_mb, n_cols)
    for (layer, mlp), members in sorted(by_group.items()):
        for lo in range(0, len(members), size):
            rows = members[lo : lo + size]
            diff = deltas[0][:, [src[i] for i in rows]].transpose(0, 1).contiguous()  # [R, q, d]
            if layer == model.n_layers:  # logits: the final residual stream plus the difference
                with torch.no_grad():
                    final = stairs.final_input[:, -1] + diff[:, -1].to(stairs.final_input.dtype)
                    out[rows] = unembed(model, final, columns).float().cpu()
                continue
            hidden = stairs.calls[layer].hidden + diff.to(stairs.calls[layer].hidden.dtype)
            values = _receiver_values(model, run, sites, layer, mlp, hidden)
            r_t = torch.arange(len(rows), device=hidden.device)
            if mlp:
                def writes(act: torch.Tensor, v: torch.Tensor = values["mlp"]) -> torch.Tensor:
                    return v.to(act.dtype)
                hooks = [Hook(sites["mlp"][layer], writes)]
            else:
                kinds = [parts[i][1] for i in rows]
                heads = torch.tensor([parts[i][2] for i in rows], device=hidden.device)
                units = {"q": heads, "k": heads // group, "v": heads // group}
                hooks = []
                for kind in "qkv":
                    mine = torch.tensor([k == kind for k in kinds], device=hidden.device)
                    if not bool(mine.any()):
                        continue
                    r_k, u_k = r_t[mine], units[kind][mine]
                    value = values[f"attn.{kind}"][r_k, :, u_k]  # [R_k, q, d_head]

                    def write(act: torch.Tensor, r_k: torch.Tensor = r_k,
                              u_k: torch.Tensor = u_k, value: torch.Tensor = value
                              ) -> torch.Tensor:
                        new = act.clone()
                        new[r_k, :, u_k] = value.to(act.dtype)
                        return new
                    hooks.append(Hook(sites[f"attn.{kind}"][layer], write))
                keep = torch.zeros(len(rows), 1, n_heads, 1, dtype=torch.bool,
                                   device=hidden.device)
                keep[r_t, 0, heads] = True
                z_base = _window(run, sites["attn.z"][layer].name)

                def only_receiver(act: torch.Tensor, keep: torch.Tensor = keep,
                                  z_base: torch.Tensor = z_base) -> torch.Tensor:
                    return torch.where(keep, act, z_base.to(act.dtype))
                hooks.append(Hook(sites["attn.z"][layer], only_receiver))

            def step(at: int, h: torch.Tensor, layer: int = layer,
                     hooks: list[Hook] = hooks) -> Step:
                return Step(hooks if at == layer else ())

            final = climb(model, stairs.calls, base_hidden, [layer] * len(rows),
                          model.n_layers, step, prefix=stairs.prefix_cache)
            with torch.no_grad():
                out[rows] = unembed(model, final[:, -1], columns).float().cpu()
    return out


def _select(graph: EdgeGraph, edges: Any) -> list[int]:
    """Storage indices of ``edges`` (``None``: every edge), checked before any forward."""
    if edges is None:
        return list(range(graph.n_edges))
    if isinstance(edges, (str, bytes)) or not hasattr(edges, "__iter__"):
        raise InvalidTypeError(
            f"edges must be None (every edge) or a list of (src, dst) name pairs such as "
            f"[('a0.h1', 'a2.h3.k')], got {edges!r}")
    out = []
    for item in edges:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise InvalidTypeError(f"each edge must be a (src, dst) name pair, got {item!r}")
        out.append(graph.edge_index(item[0], item[1]))
    if not out:
        raise InvalidArgumentError("edges is empty: give at least one (src, dst) pair, or None")
    if len(set(out)) != len(out):
        raise InvalidArgumentError("edges has repeated entries")
    return sorted(out)


def edge_attribution(
    model: HookedModel,
    clean: Any,
    corrupted: Any = None,
    method: str = "eap",
    metric: str | Metric | Callable[..., Any] | None = None,
    metric_kwargs: Mapping[str, Any] | None = None,
    *,
    correct: Any = None,
    incorrect: Any = None,
    direction: str | Direction = "noise",
    ig_steps: int = 5,
    edges: Any = None,
    batch_size: int | None = None,
    memory_mb: float = DEFAULT_MEMORY_MB,
    checkpoint: str | None = None,
    progress: Progress = None,
    executor: Any = None,
    threads: int | None = None,
    keep_per_pair: bool = False,
) -> EdgeResult:
    """Score every edge of the model's graph (:mod:`causalpatch.graph`).

    Args:
        model: the :class:`~causalpatch.HookedModel` (heads must be separable: not Gemma 2/3,
            whose post-attention norm mixes them).
        clean, corrupted: as in :func:`causalpatch.activation_patching`: prompts of equal
            token length pairwise, or a dataset as ``clean`` (then ``corrupted=None``).
        method: ``"eap"`` (first-order, gradient at the base run), ``"eap_ig"`` (the
            gradient averaged over ``ig_steps`` interpolated inputs) or ``"exact"`` (each
            edge patched on its own: the base run with only the receiver's input plus the
            sender's difference; one staircase row per edge); module docstring.
        metric, metric_kwargs, correct, incorrect: as every pair method; ``eap``/``eap_ig``
            need a metric differentiable in the logits.
        direction: ``"noise"`` (default, EAP's: corrupted differences, gradient on the clean
            run) or ``"denoise"`` (clean differences, gradient on the corrupted run).
        ig_steps: ``eap_ig``'s number of interpolation points (``>= 1``; the source endpoint
            included, the base excluded).
        edges: ``None`` (every edge) or a list of ``(src, dst)`` names to score; the others
            hold NaN. ``exact`` costs one row per edge (all edges of SmolLM2 are ~123k
            rows), so pass the edges to check; ``eap``/``eap_ig`` score every edge in the same
            pass whatever this says.
        batch_size: ``eap``/``eap_ig``: pairs per forward/backward batch (pairs are grouped by
            token length; default: as many as ``memory_mb`` holds, :func:`pairs_per_pass`,
            stated in ``extra["pairs_per_pass"]``; ``eap_ig`` runs ``batch_size * ig_steps``
            rows); ``exact``: edges per staircase pass (default from ``memory_mb``).
        memory_mb, checkpoint, progress, executor, threads: the run options every method shares
            (:mod:`causalpatch.options`).
        keep_per_pair: also keep each pair's value of every edge (``per_pair``
            ``[n_pairs, n_edges]``, in the JSON too) for
            :meth:`~causalpatch.graph.EdgeResult.ci`.

    Returns:
        :class:`~causalpatch.graph.EdgeResult`: ``scores`` ``[n_edges]`` normalised,
        ``change`` in the metric's unit, ``score(src, dst)``, ``top(n)``, ``to_pandas()``,
        JSON.

    Raises:
        InvalidArgumentError: an unknown method, ``ig_steps < 1``, an edge that does not
            exist, an empty dataset, prompts of different lengths, missing answers (all
            before any forward pass).
        UnknownComponentError: an unknown node or receiver name in ``edges`` (with close
            matches).
        UnsupportedArchitectureError: heads that cannot be separated.
    """
    t_start = time.perf_counter()
    # -- validate everything first ----------------------------------------------------------
    if not isinstance(method, str) or method not in METHODS:
        raise InvalidArgumentError(
            f"method must be one of {', '.join(repr(m) for m in METHODS)} (edge attribution "
            f"patching, with integrated gradients, or exact edge patching), got {method!r}")
    check_int(ig_steps, "ig_steps", 1)
    if not isinstance(keep_per_pair, bool):
        raise InvalidTypeError(f"keep_per_pair must be True or False, got {keep_per_pair!r}")
    check_separable(model)
    graph = EdgeGraph.of(model)
    selected = _select(graph, edges)
    options = RunOptions.make(model, progress=progress, executor=executor, batch_size=batch_size,
                              memory_mb=memory_mb, checkpoint=checkpoint, threads=threads)
    prep = prepare_pairs(model, clean, corrupted, metric, metric_kwargs, correct, incorrect,
                         direction)
    pairs, m, denoise = prep.pairs, prep.metric, prep.denoise
    steps = ig_steps if method == "eap_ig" else 1
    if method == "exact":
        batches = [[i] for i in range(len(pairs))]
        build = _exact_factory(graph, pairs, m, denoise, selected, options.batch_size,
                               options.memory_mb)
    else:
        groups: dict[int, list[int]] = {}
        for i, pair in enumerate(pairs):
            groups.setdefault(len(pair.clean), []).append(i)
        # pairs per gradient pass: batch_size, or as many as the memory budget holds
        per_length = {n: batch_size or pairs_per_pass(model, n, steps, options.memory_mb)
                      for n in groups}
        batches = [idx[lo : lo + per_length[n]] for n, idx in groups.items()
                   for lo in range(0, len(idx), per_length[n])]
        build = _gradient_factory(graph, pairs, m, denoise, selected, steps)
    values = options.run(
        model, pairs, len(selected), build, groups=batches, label="edge attribution",
        checkpoint_args=dict(method="edge_attribution", edge_method=method, metric=m.name,
                             direction=prep.direction.value, ig_steps=steps,
                             edges=None if edges is None else selected,
                             batch=None if method == "exact" else batches))
    agg = aggregate(values, Scale.NORMALIZED, m)
    change = aggregate(values, Scale.CHANGE, m).effect
    assert values.source is not None
    scores = torch.full((graph.n_edges,), float("nan"))
    changes = torch.full((graph.n_edges,), float("nan"))
    scores[selected] = agg.effect.float()
    changes[selected] = change.float()
    extra: dict[str, Any] = {"edge_method": method, "seconds": time.perf_counter() - t_start,
                             "n_scored": len(selected)}
    if method == "eap_ig":
        extra["ig_steps"] = steps
    if method != "exact":  # the batch size used, per token length (stated, not only chosen)
        extra["pairs_per_pass"] = {str(n): k for n, k in per_length.items()}
    per_pair = None
    if keep_per_pair:
        per_pair = torch.full((len(pairs), graph.n_edges), float("nan"))
        per_pair[:, selected] = (values.raw - values.base[:, None]).float()
        extra["pair_metrics"] = {"base": values.base.tolist(), "source": values.source.tolist()}
    return EdgeResult(graph, scores, changes, float(values.base.mean()),
                      float(values.source.mean()), method, prep.direction.value, m.name,
                      len(pairs), model.name, extra, per_pair)


def _gradient_factory(graph: EdgeGraph, pairs: list[Pair], m: Metric, denoise: bool,
                      selected: list[int], steps: int
                      ) -> Callable[[HookedModel, dict[str, Any]], Callable[..., GroupValues]]:
    """The evaluator factory of ``eap`` (``steps == 1``) and ``eap_ig``: one gradient pass per
    batch of pairs of one token length."""
    def build(model_: HookedModel, stats: dict[str, Any]) -> Callable[..., GroupValues]:
        sites = edge_sites(model_, graph.parallel)
        flat = [s for kind in sites.values() for s in kind]

        # the senders: the only sites whose base and source activations the scores need
        senders = sender_sites(sites)
        keep = {s.name for s in senders}

        def evaluate(group: list[int], cells: list[int], tick: Callable[[int], None] | None
                     ) -> GroupValues:
            chunk = [pairs[i] for i in group]
            runs = [p.runs(denoise) for p in chunk]
            base_ids = torch.tensor([b for b, _ in runs], device=model_.device)
            src_ids = torch.tensor([s for _, s in runs], device=model_.device)
            correct_ = [p.correct for p in chunk]
            incorrect_ = [p.incorrect for p in chunk]

            seen: list[torch.Tensor] = []

            def objective(logits: torch.Tensor, source_logits: torch.Tensor) -> torch.Tensor:
                seen[:] = [source_logits.detach()]
                rep = logits.shape[0] // source_logits.shape[0]  # eap_ig: steps per pair
                return m(logits, metric_inputs(
                    m, [c for c in correct_ for _ in range(rep)],
                    [c for c in incorrect_ for _ in range(rep)],
                    source_logits.repeat_interleave(rep, 0)))

            # the first position where a pair of the batch differs: gradients and differences
            # are kept from there on (before it both runs compute the same)
            differs = (base_ids != src_ids).any(0).nonzero()
            start = int(differs[0]) if len(differs) else base_ids.shape[1]
            if steps == 1:
                receivers = _Receivers(model_, graph, sites, steps, start)
                grads = gradient_pass(model_, base_ids, src_ids, flat, objective,
                                      receivers.leaf, stats, "edge attribution",
                                      after=receivers.after, keep=keep)
                base_values = grads.base_values
            else:
                # the base run itself first (the pass runs the interpolations): a plain
                # forward for the senders' base activations and the base logits
                base_acts: dict[str, torch.Tensor] = {}
                with torch.no_grad():
                    base_last = last_logits(model_, base_ids, cachers(base_acts, senders))
                receivers = _Receivers(model_, graph, sites, steps, start, base_acts)
                e_base, e_src = embed(model_, base_ids), embed(model_, src_ids)
                alpha = (torch.arange(steps, dtype=e_base.dtype, device=e_base.device)
                         / steps)[None, :, None, None]
                points = (e_src[:, None] + alpha * (e_base - e_src)[:, None]).flatten(0, 1)
                grads = gradient_pass(model_, base_ids.repeat_interleave(steps, 0), src_ids,
                                      flat, objective, receivers.leaf, stats,
                                      "edge attribution", base_embeds=points,
                                      after=receivers.after, keep=keep)
                with torch.no_grad():
                    base_values = objective(base_last.float(), seen[0])
            assert receivers.scores is not None
            est = receivers.scores.cpu()
            patched = base_values.float().cpu()[:, None] + est
            if tick is not None:
                tick(len(group) * len(cells))
            return GroupValues(base_values.float().cpu(), grads.source_values.float().cpu(),
                               patched[:, selected][:, cells])

        return evaluate

    return build


def _exact_factory(graph: EdgeGraph, pairs: list[Pair], m: Metric, denoise: bool,
                   selected: list[int], batch_size: int | None, memory_mb: float
                   ) -> Callable[[HookedModel, dict[str, Any]], Callable[..., GroupValues]]:
    """The evaluator factory of ``exact``: one pair per group, its edges as staircase rows
    (``batch_size`` per pass, default from ``memory_mb``)."""
    columns = answer_columns(m, pairs)

    def build(model_: HookedModel, stats: dict[str, Any]) -> Callable[..., GroupValues]:
        sites = edge_sites(model_, graph.parallel)
        sites["attn"] = [model_.layer_site("attn", layer) for layer in range(model_.n_layers)]
        record = [*sites["resid_pre"][:1], *sites["attn.z"], *sites["mlp"], *sites["attn"]]

        def evaluate(group: list[int], cells: list[int], tick: Callable[[int], None] | None
                     ) -> GroupValues:
            (i,) = group
            pair = pairs[i]
            base_ids, source_ids = pair.runs(denoise)
            run = run_pair(model_, base_ids, source_ids, record)
            assert run.prepared is not None
            inputs = metric_inputs(m, [pair.correct], [pair.incorrect],
                                   run.source_last.float().cpu().unsqueeze(0))
            ends = m(torch.stack([run.base_last, run.source_last]).float().cpu(),
                     inputs.expand(2))
            deltas = sender_deltas(model_, sites, run.base.acts, run.source.acts)
            logits = _exact_logits(model_, run, graph, sites, [selected[c] for c in cells],
                                   deltas[:, run.prepared.start:], batch_size, memory_mb,
                                   columns)
            narrowed = inputs if columns is None else inputs.on_columns(columns)
            values = m(logits, narrowed.expand(len(cells)))
            if tick is not None:
                tick(len(cells))
            return GroupValues(ends[:1], ends[1:], values.unsqueeze(0))

        return evaluate

    return build

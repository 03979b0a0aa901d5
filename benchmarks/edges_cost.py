"""What edge attribution and circuit evaluation cost on SmolLM2-135M, in forward passes, in
one process: EAP, EAP-IG, exact edge patching into one receiver, ``faithfulness_curve``, and
the peak memory of the gradient passes.

The unit (as ``benchmarks/atp_cost.py`` defines it): a **forward-equivalent** is one plain
batch-1 forward of one prompt of a pair (``hf_model(input_ids)``, no hooks, no gradient), so
``forward-equivalents per pair = method time / sum over the pairs of one such forward``.
Every timing is the minimum over ``--repeats`` rounds, the timed calls interleaved inside each
round (load from other work on the machine hits every side alike), on ``--threads`` threads.

What is timed, per round:

* ``eap`` / ``eap_ig``: :func:`causalpatch.edge_attribution` on ``--pairs`` IOI pairs
  (``ig_steps=--ig-steps``), pairs per gradient pass chosen from the ``--memory-mb`` budget by
  :func:`pairs_per_batch` (stated in the JSON);
* ``eap_ig_reference``: hannamw/EAP-IG's loop re-implemented on causalpatch's hooks
  (:func:`eap_ig_reference`): per batch one corrupted and one clean forward caching the
  senders' outputs, then per step ``k = 0..m-1`` one forward whose embedding output is
  ``corrupted + (k/m)(clean - corrupted)`` and one backward to every receiver's input; scores =
  sum of difference x averaged gradient. Its scores are compared with ``eap_ig``'s;
* ``exact`` into one receiver (several receivers: early/middle/late query heads, an MLP, the
  logits) on one pair, against :func:`exact_loop`, one plain forward per edge through
  ``model.trace`` interventions (timed on ``--loop-edges`` edges spread over the receiver's
  senders and scaled to all of them: every edge's forward has the same shape);
* ``faithfulness_curve`` with 20 sizes (0 and 19 sizes log-spaced from 0.1% to 100% of the
  edges, no random baseline; and with it: 40 circuits) against one ``evaluate_circuit`` of
  the top-500 circuit, on ``--curve-pairs`` pairs; with the rows each runs per layer (the
  compute it cannot skip, :func:`curve_rows`).

Memory (``--memory``): each gradient pass runs once more in a fresh subprocess (as
``benchmarks/bench_patching.py``'s probes: load, ``malloc_trim``, reset ``VmHWM``, run, read
``VmHWM``), beside a plain forward of the same rows with autograd on, its output (and so every
activation the backward needs) kept alive: the activations of one forward.

Run (once, on a machine as quiet as you have)::

    python benchmarks/edges_cost.py --pairs 32 --repeats 3 --threads 1 \
        --json benchmarks/results/edges_cost.json
    python benchmarks/edges_cost.py --render benchmarks/results/edges_cost.json

Smoke run: ``--pairs 2 --repeats 1 --curve-pairs 1 --loop-edges 3 --memory none``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from bench_patching import reset_peak, rss_status  # the memory probes' two helpers

REPO_ROOT = Path(__file__).resolve().parents[1]
#: The receivers of the exact comparison (layer fractions of SmolLM2's 30 layers): an early,
#: a middle and a late query head, a middle MLP, the logits.
RECEIVERS = ("a1.h4.q", "a15.h4.q", "a29.h4.q", "m15", "logits")
#: The circuit one evaluation is timed on (the docs' circuits use 500 edges).
EVAL_EDGES = 500
#: The curve's sizes: 0 and 19 log-spaced fractions from 0.1% to 100% of the edges.
CURVE_FRACTIONS = [0.0] + [10 ** (-3 + 3 * i / 18) for i in range(19)]
#: Targets (forward-equivalents per pair; ratios).
TARGETS = {"eap_fe": 4.0, "eap_ig_fe": 15.0, "memory_x_forward": 3.0, "curve_x_eval": 3.0,
           "exact_speedup": 10.0}


# -- the unit -----------------------------------------------------------------------------------
def forward_seconds(model: Any, data: Any) -> float:
    """One plain batch-1 forward of every pair's clean prompt, summed (no hooks, no grad)."""
    ids = [model.to_tokens(p).to(model.device) for p in data.clean]
    t0 = time.perf_counter()
    with torch.no_grad():
        for x in ids:
            model.hf_model(input_ids=x)
    return time.perf_counter() - t0


def pairs_per_batch(model: Any, n_tokens: int, steps: int, memory_mb: float) -> int:
    """Pairs per gradient pass that fit ``memory_mb``: the library's own choice
    (:func:`causalpatch.methods.edges.pairs_per_pass`, what ``edge_attribution`` uses when
    ``batch_size`` is not given), at the longest pair so every pass fits."""
    from causalpatch.methods.edges import pairs_per_pass

    return pairs_per_pass(model, n_tokens, steps, memory_mb)


def longest(model: Any, data: Any) -> int:
    return max(len(model.to_tokens(p)[0]) for p in data.clean)


# -- EAP-IG's loop on causalpatch's hooks -------------------------------------------------------
def sender_writes(model: Any, acts: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[b, T, n_nodes, d_model]`` (float32) every node's residual write in graph order: the
    embedding, each head's ``z`` through its rows of the output projection, each MLP."""
    parts = [acts["blocks.0.resid_pre"].float()[:, :, None]]
    for layer in range(model.n_layers):
        w, _ = model.runtime.output_projection(layer, "attn")  # [H * d_head, d_model]
        z = acts[f"blocks.{layer}.attn.z"].float()  # [b, T, H, d_head]
        heads = w.float().reshape(model.n_heads, model.d_head, -1)
        parts.append(torch.stack([z[:, :, h] @ heads[h] for h in range(model.n_heads)], 2))
        parts.append(acts[f"blocks.{layer}.mlp"].float()[:, :, None])
    return torch.cat(parts, 2)


def _senders(model: Any) -> list[str]:
    return ["blocks.0.resid_pre"] + [f"blocks.{layer}.{k}" for layer in range(model.n_layers)
                                     for k in ("attn.z", "mlp")]


def _cached_writes(model: Any, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One no-grad forward of ``ids`` caching the senders: ``(writes, embedding output)``."""
    _, cache = model.run_with_cache(ids, _senders(model))
    acts = {n: cache[n] for n in _senders(model)}
    return sender_writes(model, acts), acts["blocks.0.resid_pre"]


def eap_ig_reference(model: Any, data: Any, steps: int, batch: int) -> torch.Tensor:
    """``[n_edges]`` EAP-IG's scores (metric ``logit_diff`` at the last position, mean over
    pairs, metric units) by EAP-IG's own loop, on ``model.forward`` with
    :class:`causalpatch.hooks.Hook` s (no module paths).

    Per batch of ``batch`` pairs of one token length: a corrupted and a clean forward cache
    every sender's output; then per step ``k = 0..steps-1`` one forward of the clean tokens
    whose embedding output is ``e_corrupted + (k/steps)(e_clean - e_corrupted)``, with a zero
    leaf added at every layer's input, query/key/value, ``z``, MLP input and output and the
    final residual stream, and one backward of the summed metric to the leaves. Each receiver's
    input gradient (EAP-IG's per-head input copies) is then read off that graph: a query head's
    query, key and value gradient through the layer's input norm and projections (one batched
    vector-Jacobian product per layer); under grouped-query attention a query head's key/value
    gradient is the attention's product with that head's own output gradient (one batched
    product over the heads); an MLP's from its output gradient back to its input. Scores:
    ``sum over batch and positions of (corrupted - clean write) . mean gradient``.
    """
    from causalpatch.graph import EdgeGraph
    from causalpatch.hooks import Hook
    from causalpatch.tokens import Batch

    graph = EdgeGraph.of(model)
    n_layers, n_heads, group = model.n_layers, model.n_heads, model.n_heads // model.n_kv_heads
    total = torch.zeros(graph.n_edges, dtype=torch.float64)
    lengths: dict[int, list[int]] = {}
    for i, p in enumerate(data.clean):
        lengths.setdefault(len(model.to_tokens(p)[0]), []).append(i)
    batches = [idx[lo : lo + batch] for idx in lengths.values()
               for lo in range(0, len(idx), batch)]
    offsets = graph.offsets.tolist()
    per_layer = 3 * n_heads + 1
    for idx in batches:
        clean = model.to_tokens([data.clean[i] for i in idx]).to(model.device)
        corrupted = model.to_tokens([data.corrupted[i] for i in idx]).to(model.device)
        correct = torch.tensor([data.correct[i] for i in idx])
        incorrect = torch.tensor([data.incorrect[i] for i in idx])
        b, T = clean.shape
        with torch.no_grad():
            w_corr, e_corr = _cached_writes(model, corrupted)
            w_clean, e_clean = _cached_writes(model, clean)
        diff = w_corr - w_clean  # [b, T, n_nodes, d]
        g_attn = [torch.zeros(3 * n_heads, b, T, model.d_model) for _ in range(n_layers)]
        g_mlp = [torch.zeros(b, T, model.d_model) for _ in range(n_layers)]
        g_logits = torch.zeros(b, T, model.d_model)
        batch_ = Batch(clean, torch.ones_like(clean), torch.full((b,), T))
        for k in range(steps):
            point = (e_corr + (k / steps) * (e_clean - e_corr)).detach()
            pre: dict[str, torch.Tensor] = {}
            leaf: dict[str, torch.Tensor] = {}

            def add_leaf(name: str, replace: torch.Tensor | None = None,
                         pre: dict[str, torch.Tensor] = pre,
                         leaf: dict[str, torch.Tensor] = leaf
                         ) -> Callable[[torch.Tensor], torch.Tensor]:
                def fn(act: torch.Tensor) -> torch.Tensor:
                    act = act if replace is None else replace.to(act.dtype)
                    pre[name] = act
                    leaf[name] = torch.zeros_like(act, requires_grad=True)
                    return act + leaf[name]
                return fn

            hooks = [Hook(model.site("blocks.0.resid_pre"), add_leaf("blocks.0.resid_pre",
                                                                     point))]
            for layer in range(n_layers):
                for kind in ("resid_pre", "attn.q", "attn.k", "attn.v", "attn.z",
                             "resid_mid", "mlp"):
                    name = f"blocks.{layer}.{kind}"
                    if name != "blocks.0.resid_pre":
                        hooks.append(Hook(model.site(name), add_leaf(name)))
            post = f"blocks.{n_layers - 1}.resid_post"
            hooks.append(Hook(model.site(post), add_leaf(post)))
            with torch.enable_grad():
                logits = model.forward(batch_, hooks)[:, -1]
                value = (logits.gather(1, correct[:, None]) - logits.gather(
                    1, incorrect[:, None])).sum()
                names = list(leaf)
                grads = dict(zip(names, torch.autograd.grad(value, [leaf[n] for n in names],
                                                            retain_graph=True)))
                for layer in range(n_layers):
                    p = f"blocks.{layer}."
                    dz = grads[p + "attn.z"]  # [b, T, H, d_head]
                    if group == 1:
                        dk, dv = grads[p + "attn.k"], grads[p + "attn.v"]
                    else:  # query head h's share: the attention's product with dz_h alone
                        cot = torch.zeros(n_heads, *dz.shape)
                        cot[torch.arange(n_heads), :, :, torch.arange(n_heads)] = \
                            dz.permute(2, 0, 1, 3)
                        gk, gv = torch.autograd.grad(pre[p + "attn.z"],
                                                     [leaf[p + "attn.k"], leaf[p + "attn.v"]],
                                                     cot, retain_graph=True,
                                                     is_grads_batched=True)
                        kv = torch.arange(n_heads) // group
                        dk = gk[torch.arange(n_heads), :, :, kv].permute(1, 2, 0, 3)
                        dv = gv[torch.arange(n_heads), :, :, kv].permute(1, 2, 0, 3)
                    cots = []
                    for i, (kind, g) in enumerate((("q", grads[p + "attn.q"]), ("k", dk),
                                                   ("v", dv))):
                        act = pre[p + f"attn.{kind}"]  # [b, T, units, d_head]
                        c = torch.zeros(3 * n_heads, *act.shape)
                        for h in range(n_heads):
                            unit = h if kind == "q" else h // group
                            c[i * n_heads + h, :, :, unit] = g[:, :, h]
                        cots.append(c)
                    (gx,) = torch.autograd.grad(
                        [pre[p + "attn.q"], pre[p + "attn.k"], pre[p + "attn.v"]],
                        [leaf[p + "resid_pre"]], cots, retain_graph=True,
                        is_grads_batched=True)
                    g_attn[layer] += gx.float()
                    (gm,) = torch.autograd.grad(pre[p + "mlp"], [leaf[p + "resid_mid"]],
                                                grads[p + "mlp"], retain_graph=True)
                    g_mlp[layer] += gm.float()
                g_logits += grads[post].float()
            del pre, leaf, grads, logits, value
        with torch.no_grad():
            for layer in range(n_layers):
                n = graph.sender_index(layer, 0)
                s = torch.einsum("btsd,rbtd->rs", diff[:, :, :n], g_attn[layer] / steps)
                lo = offsets[layer * per_layer]
                total[lo : lo + 3 * n_heads * n] += s.flatten().double()
                n_mlp = n + n_heads
                lo = offsets[layer * per_layer + 3 * n_heads]
                total[lo : lo + n_mlp] += torch.einsum(
                    "btsd,btd->s", diff[:, :, :n_mlp], g_mlp[layer] / steps).double()
            total[offsets[-2]:] += torch.einsum("btsd,btd->s", diff,
                                                g_logits / steps).double()
    return total / len(data.clean)


# -- exact edges into one receiver: one plain forward per edge ---------------------------------
def exact_loop(model: Any, clean: str, corrupted: str, correct: int, incorrect: int,
               receiver: str, senders: Sequence[int]) -> list[float]:
    """``M(clean with only receiver reading x + delta_u) - M(clean)`` for each sender index
    ``u`` in ``senders`` (noising, ``logit_diff``), one ``model.trace`` forward per edge with
    plain callable interventions: two rows of the clean prompt; row 0 gets ``x + delta_u`` at
    the receiver's layer input (its MLP's input, for an MLP), row 1 takes row 0's value of the
    receiver's unit only (the query head, its key/value head, or the MLP's output) and, for a
    key/value under grouped-query attention, keeps every other head's ``z`` at the clean
    run's; the metric is row 1's. ``logits``: one row whose final residual stream gets
    ``delta_u``. The two caching runs (clean, corrupted) are part of the loop's cost."""
    from causalpatch.graph import EdgeGraph

    graph = EdgeGraph.of(model)
    group = model.n_heads // model.n_kv_heads
    ids = model.to_tokens(clean).to(model.device)
    with torch.no_grad():
        w_corr, _ = _cached_writes(model, model.to_tokens(corrupted).to(model.device))
        w_clean, _ = _cached_writes(model, ids)
        _, cache = model.run_with_cache(ids, [f"blocks.{layer}.attn.z"
                                              for layer in range(model.n_layers)])
    diff = (w_corr - w_clean)[0]  # [T, n_nodes, d]

    def metric(logits: torch.Tensor) -> float:
        return float(logits[-1, -1, correct] - logits[-1, -1, incorrect])

    base = metric(model.trace(ids).run().logits)
    layer, kind, head = graph.receiver_parts(graph.receivers.index(receiver))
    out = []
    for u in senders:
        delta = diff[:, u]
        if kind == "logits":
            def add(act: torch.Tensor, delta: torch.Tensor = delta) -> torch.Tensor:
                return act + delta.to(act.dtype)
            iv: dict[str, Any] = {f"blocks.{model.n_layers - 1}.resid_post": add}
            rows = ids
        else:
            def shift(act: torch.Tensor, delta: torch.Tensor = delta) -> torch.Tensor:
                new = act.clone()
                new[0] = new[0] + delta.to(act.dtype)
                return new

            def take(unit: int | None) -> Callable[[torch.Tensor], torch.Tensor]:
                def fn(act: torch.Tensor) -> torch.Tensor:
                    new = act.clone()
                    if unit is None:
                        new[1] = act[0]
                    else:
                        new[1, :, unit] = act[0, :, unit]
                    return new
                return fn
            rows = ids.expand(2, -1)
            if kind == "mlp":
                iv = {f"blocks.{layer}.resid_mid": shift, f"blocks.{layer}.mlp": take(None)}
            else:
                unit = head if kind == "q" else head // group
                iv = {f"blocks.{layer}.resid_pre": shift,
                      f"blocks.{layer}.attn.{kind}": take(unit)}
                if kind != "q" and group > 1:
                    z_clean = cache[f"blocks.{layer}.attn.z"][0]

                    def only(act: torch.Tensor, h: int = head,
                             z_clean: torch.Tensor = z_clean) -> torch.Tensor:
                        new = act.clone()
                        keep = new[1, :, h].clone()
                        new[1] = z_clean.to(act.dtype)
                        new[1, :, h] = keep
                        return new
                    iv[f"blocks.{layer}.attn.z"] = only
        out.append(metric(model.trace(rows, interventions=iv).run().logits) - base)
    return out


def spread(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(n)`` (all of them when ``k >= n``)."""
    if k >= n:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)}) if k > 1 else [0]


# -- faithfulness curve: the rows it cannot avoid ----------------------------------------------
def curve_rows(model: Any, graph: Any, masks: torch.Tensor) -> int:
    """Rows of layer calls the circuit run makes per pair for circuits ``masks`` ``[R,
    n_edges]`` (True = in the circuit), counted as :mod:`causalpatch.methods.circuits` runs
    them: per layer one stopped call on every *distinct* query/key/value input of each
    circuit, one attention call per key/value group member, and the layer itself."""
    outside = ~masks
    group = model.n_heads // model.n_kv_heads
    offsets = graph.offsets.tolist()
    rows = 0
    for layer in range(model.n_layers):
        n_src = graph.sender_index(layer, 0)
        lo = offsets[layer * (3 * model.n_heads + 1)]
        block = outside[:, lo : lo + 3 * model.n_heads * n_src].reshape(
            len(masks), 3 * model.n_heads, n_src)
        rows += sum(len(torch.unique(m, dim=0)) for m in block) + (group + 1) * len(masks)
    return rows


# -- the measurement ----------------------------------------------------------------------------
def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def curve_sizes(n_edges: int) -> list[int]:
    return sorted({round(f * n_edges) for f in CURVE_FRACTIONS})


def measure(model: Any, data: Any, *, repeats: int = 3, ig_steps: int = 5,
            memory_mb: float = 1024, curve_pairs: int = 4, loop_edges: int = 24,
            ref_pairs: int = 4,
            receivers: Sequence[str] = RECEIVERS, eval_edges: int = EVAL_EDGES
            ) -> dict[str, Any]:
    """Every timing (min over ``repeats``, interleaved), ratio and check of the module
    docstring on ``model`` and ``data`` (a dataset with ``clean``, ``corrupted``, ``correct``,
    ``incorrect`` token ids and ``subset``)."""
    from causalpatch import edge_attribution, evaluate_circuit, faithfulness_curve
    from causalpatch.graph import EdgeGraph

    graph = EdgeGraph.of(model)
    n_pairs = len(data.clean)
    T = longest(model, data)
    batch_eap = pairs_per_batch(model, T, 1, memory_mb)
    batch_ig = pairs_per_batch(model, T, ig_steps, memory_mb)
    curve_data = data.subset(range(min(curve_pairs, n_pairs)))
    ref_data = data.subset(range(min(ref_pairs, n_pairs)))
    pair0 = (data.clean[0], data.corrupted[0], data.correct[0], data.incorrect[0])
    one = data.subset([0])
    kw: dict[str, Any] = dict(progress=False)
    sizes = curve_sizes(graph.n_edges)

    def exact_edges(receiver: str) -> list[tuple[str, str]]:
        r = graph.receivers.index(receiver)
        return [(graph.nodes[s], receiver) for s in range(int(graph.n_src[r]))]

    calls: dict[str, Callable[[], Any]] = {
        "eap": lambda: edge_attribution(model, data, method="eap", batch_size=batch_eap, **kw),
        "eap_ig": lambda: edge_attribution(model, data, method="eap_ig", ig_steps=ig_steps,
                                           batch_size=batch_ig, **kw),
        "eap_ig_ref_pairs": lambda: edge_attribution(model, ref_data, method="eap_ig",
                                                     ig_steps=ig_steps, batch_size=batch_ig,
                                                     **kw),
        "eap_ig_reference": lambda: eap_ig_reference(model, ref_data, ig_steps, batch_ig),
    }
    for receiver in receivers:
        edges = exact_edges(receiver)
        sample = [graph.nodes.index(s) for s, _ in edges]
        sample = [sample[i] for i in spread(len(sample), loop_edges)]
        calls[f"exact:{receiver}"] = (lambda edges=edges: edge_attribution(
            model, one, method="exact", edges=edges, **kw))
        calls[f"loop:{receiver}"] = (lambda receiver=receiver, sample=sample: exact_loop(
            model, *pair0, receiver, sample))

    forward_seconds(model, data)  # warm-up, untimed: first calls pay one-off costs
    first = calls["eap_ig_ref_pairs"]()  # also the scores the circuits are chosen from
    circuit = first.circuit(min(eval_edges, graph.n_edges))
    calls["evaluate_circuit"] = lambda: evaluate_circuit(model, curve_data, circuit, **kw)
    calls["curve_20"] = lambda: faithfulness_curve(model, curve_data, first, sizes=sizes,
                                                   random_baseline=False, **kw)
    calls["curve_20_with_random"] = lambda: faithfulness_curve(model, curve_data, first,
                                                               sizes=sizes, **kw)
    best: dict[str, float] = {}
    last: dict[str, Any] = {}
    units = {"pairs": (data, "forward"), "curve": (curve_data, "forward_curve"),
             "one": (one, "forward_one"), "ref": (ref_data, "forward_ref")}
    for _ in range(repeats):
        for d, key in units.values():
            best[key] = min(best.get(key, math.inf), forward_seconds(model, d))
        for name, fn in calls.items():
            dt, last[name] = timed(fn)
            best[name] = min(best.get(name, math.inf), dt)
    unit = best["forward"] / n_pairs  # one forward of one prompt, mean over the pairs

    eap_ig, ref = last["eap_ig_ref_pairs"], last["eap_ig_reference"]
    change = eap_ig.change.double()
    top = torch.argsort(change.abs(), descending=True)[:5].tolist()
    ig_check = {
        "pairs": len(ref_data.clean),
        "reference_over_eap_ig": best["eap_ig_reference"] / best["eap_ig_ref_pairs"],
        "forward_equivalents_per_pair": {
            m: best[m] / best["forward_ref"] for m in ("eap_ig_ref_pairs", "eap_ig_reference")},
        "max_abs_diff": float((change - ref).abs().max()),
        "max_abs_score": float(change.abs().max()),
        "top_edges": [{"edge": "{} -> {}".format(*graph.edge_names(i)),
                       "eap_ig": float(change[i]), "reference": float(ref[i])} for i in top],
    }
    exact_rows = []
    for receiver in receivers:
        edges = exact_edges(receiver)
        sample = [graph.nodes.index(s) for s, _ in edges]
        picked = spread(len(sample), loop_edges)
        loop_values = torch.tensor(last[f"loop:{receiver}"], dtype=torch.float64)
        res = last[f"exact:{receiver}"]
        engine_values = torch.tensor([float(res.change[graph.edge_index(*edges[i])])
                                      for i in picked], dtype=torch.float64)
        per_edge = best[f"loop:{receiver}"] / len(picked)
        loop_all = per_edge * len(edges)
        exact_rows.append({
            "receiver": receiver, "edges": len(edges), "loop_timed_edges": len(picked),
            "engine_s": best[f"exact:{receiver}"], "loop_s_scaled": loop_all,
            "speedup": loop_all / best[f"exact:{receiver}"],
            "engine_forward_equivalents": best[f"exact:{receiver}"] / best["forward_one"],
            "max_abs_diff_vs_loop": float((engine_values - loop_values).abs().max()),
            "max_abs_change": float(loop_values.abs().max())})

    curve = last["curve_20"]
    masks = torch.stack([c.mask for c in curve.circuits])
    rows_curve = curve_rows(model, graph, masks)
    rows_eval = curve_rows(model, graph, circuit.mask[None])
    out: dict[str, Any] = {
        "pairs": n_pairs, "ig_steps": ig_steps, "memory_mb": memory_mb,
        "max_tokens": T, "pairs_per_batch": {"eap": batch_eap, "eap_ig": batch_ig},
        "n_edges": graph.n_edges, "n_layers": model.n_layers,
        "seconds": best,
        "forward_one_prompt_s": unit,
        "forward_equivalents_per_pair": {
            m: best[m] / best["forward"] for m in ("eap", "eap_ig")},
        "eap_ig_vs_reference": ig_check,
        "exact": exact_rows,
        "curve": {
            "pairs": len(curve_data.clean), "sizes": sizes, "eval_circuit_edges":
                circuit.n_edges,
            "eval_forward_equivalents_per_pair": best["evaluate_circuit"] / best["forward_curve"],
            "curve_over_eval": best["curve_20"] / best["evaluate_circuit"],
            "curve_with_random_over_eval": best["curve_20_with_random"]
            / best["evaluate_circuit"],
            "layer_rows_curve": rows_curve, "layer_rows_eval": rows_eval,
            "cpr": curve.cpr, "cmd": curve.cmd},
    }
    fe = out["forward_equivalents_per_pair"]
    out["targets"] = {
        "eap_within_4_fe": fe["eap"] <= TARGETS["eap_fe"],
        "eap_ig_within_15_fe": fe["eap_ig"] <= TARGETS["eap_ig_fe"],
        "curve_within_3x_eval": out["curve"]["curve_over_eval"] <= TARGETS["curve_x_eval"],
        "exact_10x_loop": all(r["speedup"] >= TARGETS["exact_speedup"] for r in exact_rows),
    }
    return out


# -- memory probes (fresh subprocesses) --------------------------------------------------------
def memory_probe(spec: str, args: argparse.Namespace) -> dict[str, Any]:
    """Subprocess entry: ``eap:B``, ``eap_ig:B`` (one gradient pass of ``B`` pairs of the
    most common length) or ``forward:ROWS`` (a plain forward with autograd, output kept)."""
    torch.set_num_threads(args.threads)
    from causalpatch import InterpretableModel, edge_attribution
    from causalpatch.datasets import IOIDataset

    what, n = spec.split(":")
    model = InterpretableModel("smollm2")
    data = IOIDataset(model, n=args.pairs, seed=args.seed)
    _, same = max(data.by_length(model).items(), key=lambda kv: len(kv[1]))
    ids = model.to_tokens(same.clean[0]).to(model.device)
    with torch.no_grad():
        model.hf_model(input_ids=ids)  # warm-up (kernels, allocator)
    ok = reset_peak()
    base = rss_status()["VmRSS"]
    rows = int(n)
    if what == "forward":
        with torch.enable_grad():
            emb = model.hf_model.get_input_embeddings()(ids.expand(rows, -1)).detach()
            emb.requires_grad_(True)
            kept = model.hf_model(inputs_embeds=emb).logits
        del kept
    else:
        sub = same.subset(range(min(rows, len(same))))
        rows = len(sub.clean)
        edge_attribution(model, sub, method=what, ig_steps=args.ig_steps, batch_size=rows,
                         progress=False)
    status = rss_status()
    params = sum(p.numel() * p.element_size() for p in model.hf_model.parameters())
    return {"spec": spec, "pairs" if what != "forward" else "rows": rows, "reset": ok,
            "base_mib": base, "peak_mib": status["VmHWM"],
            "added_mib": status["VmHWM"] - base, "tokens": int(ids.shape[1]),
            "model_mib": params / 2**20}


def run_probe(spec: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-probe", spec,
           "--threads", str(args.threads), "--pairs", str(args.pairs), "--seed", str(args.seed),
           "--ig-steps", str(args.ig_steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"spec": spec, "error": f"exit {proc.returncode}: {' | '.join(tail)}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def memory(batches: dict[str, int], ig_steps: int, args: argparse.Namespace
           ) -> dict[str, Any]:
    """Peak added RSS of each gradient pass against a plain forward of its rows."""
    out: dict[str, Any] = {}
    for method, b in batches.items():
        run = run_probe(f"{method}:{b}", args)
        b = run.get("pairs", b)  # the pairs of one length the pass ran
        rows = b * (ig_steps if method == "eap_ig" else 1)
        fwd = run_probe(f"forward:{rows}", args)
        ratio = (run["added_mib"] / fwd["added_mib"]
                 if "added_mib" in run and "added_mib" in fwd else None)
        out[method] = {"pairs": b, "rows": rows, "pass": run, "forward": fwd,
                       "pass_over_forward": ratio,
                       "within_3x": None if ratio is None else ratio <= TARGETS[
                           "memory_x_forward"]}
    return out


# -- rendering ------------------------------------------------------------------------------------
def _mark(ok: bool | None) -> str:
    return "–" if ok is None else ("yes" if ok else "no")


def render(report: dict[str, Any]) -> str:
    """The docs' table (markdown) from the JSON this script writes."""
    r = report["results"]
    fe = r["forward_equivalents_per_pair"]
    s = r["seconds"]
    c = r["curve"]
    b = r["pairs_per_batch"]
    lines = ["| measured | target | result | met |", "|---|---:|---:|---|"]
    lines.append(f"| EAP, forward-equivalents per pair ({r['pairs']} pairs, {b['eap']} per "
                 f"pass) | ≤ {TARGETS['eap_fe']:g} | {fe['eap']:.2f} | "
                 f"{_mark(fe['eap'] <= TARGETS['eap_fe'])} |")
    lines.append(f"| EAP-IG ({r['ig_steps']} steps), forward-equivalents per pair ({b['eap_ig']}"
                 f" pairs per pass) | ≤ {TARGETS['eap_ig_fe']:g} | {fe['eap_ig']:.2f} | "
                 f"{_mark(fe['eap_ig'] <= TARGETS['eap_ig_fe'])} |")
    ig = r["eap_ig_vs_reference"]
    ref_fe = ig["forward_equivalents_per_pair"]
    lines.append(f"| EAP-IG's loop on causalpatch hooks ({ig['pairs']} pairs): "
                 f"forward-equivalents per pair, causalpatch / the loop | – | "
                 f"{ref_fe['eap_ig_ref_pairs']:.2f} / {ref_fe['eap_ig_reference']:.2f} | – |")
    lines.append(f"| the same in wall time (s) | – | "
                 f"{s['eap_ig_ref_pairs']:.1f} / {s['eap_ig_reference']:.1f} "
                 f"({ig['reference_over_eap_ig']:.1f}× faster) | – |")
    mem = report.get("memory") or {}
    for method, m in mem.items():
        if m.get("pass_over_forward") is None:
            continue
        lines.append(
            f"| {method} peak added memory / one forward's activations ({m['rows']} rows) | "
            f"≤ {TARGETS['memory_x_forward']:g}× | {m['pass']['added_mib']:.0f} / "
            f"{m['forward']['added_mib']:.0f} MiB = {m['pass_over_forward']:.2f}× | "
            f"{_mark(m['within_3x'])} |")
    lines.append(f"| `faithfulness_curve`, {len(c['sizes'])} sizes / one `evaluate_circuit` "
                 f"({c['pairs']} pairs) | ≤ {TARGETS['curve_x_eval']:g}× | "
                 f"{c['curve_over_eval']:.2f}× | "
                 f"{_mark(c['curve_over_eval'] <= TARGETS['curve_x_eval'])} |")
    lines.append(f"| the same with the random baseline ({2 * len(c['sizes'])} circuits) | – | "
                 f"{c['curve_with_random_over_eval']:.2f}× | – |")
    lines.append(f"| layer-call rows per pair: curve / one evaluation | – | "
                 f"{c['layer_rows_curve']:,} / {c['layer_rows_eval']:,} = "
                 f"{c['layer_rows_curve'] / c['layer_rows_eval']:.1f}× | – |")
    for e in r["exact"]:
        lines.append(f"| exact into `{e['receiver']}` ({e['edges']} edges): loop / engine "
                     f"| ≥ {TARGETS['exact_speedup']:g}× | {e['speedup']:.1f}× | "
                     f"{_mark(e['speedup'] >= TARGETS['exact_speedup'])} |")
    return "\n".join(lines)


# -- main ----------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ig-steps", type=int, default=5)
    parser.add_argument("--memory-mb", type=float, default=1024)
    parser.add_argument("--curve-pairs", type=int, default=4)
    parser.add_argument("--ref-pairs", type=int, default=4,
                        help="pairs EAP-IG's loop and eap_ig are compared on")
    parser.add_argument("--loop-edges", type=int, default=24)
    parser.add_argument("--memory", choices=("probe", "none"), default="probe")
    parser.add_argument("--json", default=None, help="write the numbers to this file")
    parser.add_argument("--render", default=None, metavar="JSON",
                        help="print the docs' markdown table from this JSON and exit")
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.render:
        print(render(json.loads(Path(args.render).read_text())))
        return
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe, args)), flush=True)
        return
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    import provenance

    from causalpatch import InterpretableModel
    from causalpatch.datasets import IOIDataset

    started = time.time()
    model = InterpretableModel("smollm2")
    data = IOIDataset(model, n=args.pairs, seed=args.seed)
    out: dict[str, Any] = {
        "command": provenance.command(), "commit": provenance.commit(),
        "model": model.name, "dataset": f"IOIDataset(n={args.pairs}, seed={args.seed})",
        "threads": args.threads, "repeats": args.repeats,
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(),
                 "python": platform.python_version(), "torch": torch.__version__},
        "load_average_before": os.getloadavg()}
    res = measure(model, data, repeats=args.repeats, ig_steps=args.ig_steps,
                  memory_mb=args.memory_mb, curve_pairs=args.curve_pairs,
                  loop_edges=args.loop_edges, ref_pairs=args.ref_pairs)
    out["results"] = res
    out["load_average_after"] = os.getloadavg()
    if args.memory == "probe":
        out["memory"] = memory(res["pairs_per_batch"], args.ig_steps, args)
    out["wall_seconds"] = round(time.time() - started, 1)
    text = json.dumps(out, indent=1)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(render(out))


if __name__ == "__main__":
    main()

"""Edge attribution (``causalpatch.edge_attribution``) and its graph (``causalpatch.graph``).

Checked against:

* the closed-form edge count and EAP-IG's count for SmolLM2 (123,211 edges);
* an independent reference written with plain PyTorch hooks on the module paths of
  ``conftest.REFERENCE`` (no causalpatch code): each receiver is given its *own copy* of the
  residual stream ``x + eps`` by recomputing its input norm and projection on ``x + eps`` for
  that head's slice only (and, for a query head's key/value under grouped-query attention,
  resetting every other head's output to its base value, so only that head reads the copy);
  ``dM/d eps`` is the receiver's input gradient, and EAP's score is ``sum_t delta_u . dM/d eps``
  with ``delta_u`` captured by plain hooks (heads through their rows of the output projection).
  EAP-IG's reference averages the same gradient over runs whose embedding output is replaced
  by the interpolations;
* bad input raising before any forward pass, with no hook left behind.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (FAMILIES, IOI_PAIRS, REFERENCE, ForwardCounter, assert_matches_reference,
                      first_tensor, tiny_model)

from causalpatch import edge_attribution
from causalpatch.errors import (InvalidArgumentError, InvalidTypeError, UnknownComponentError,
                                UnsupportedArchitectureError)
from causalpatch.graph import EdgeGraph, EdgeResult

#: Families whose heads have separate residual writes (Gemma 2/3 normalise the attention block's
#: output before the residual add, which mixes the heads).
SEPARABLE = [f for f in FAMILIES if f not in ("gemma2", "gemma3_text")]

#: EAP against the plain-hook reference, relative to the largest reference score: observed
#: at most 1.2e-6 (gemma; EAP-IG 8.9e-7, qwen3) over every separable family (float32 summation
#: order: the reference
#: sums over positions per edge, the method contracts all senders of a receiver at once).
EAP_RTOL = 1e-5

CLEAN, CORRUPTED, CORRECT, INCORRECT = IOI_PAIRS[0]


# -- graph -----------------------------------------------------------------------------------------
def test_smollm2_edge_count_is_eap_igs():
    """SmolLM2-135M: 30 layers, 9 query heads (3 key/value heads): 123,211 edges, EAP-IG's
    per-query-head count (118,260 into q/k/v, 4,650 into MLPs, 301 into the logits)."""
    graph = EdgeGraph(30, 9, 3)
    heads = 27 * sum(1 + 10 * layer for layer in range(30))
    mlps = sum(1 + 10 * layer + 9 for layer in range(30))
    assert (heads, mlps) == (118_260, 4_650)
    assert graph.n_edges == EdgeGraph.count(30, 9) == heads + mlps + 301 == 123_211


@pytest.mark.parametrize("n_layers,n_heads,parallel", [
    (1, 1, False), (3, 4, False), (3, 4, True), (5, 2, True), (12, 12, False)])
def test_edge_count_formula_equals_enumeration(n_layers, n_heads, parallel):
    """The closed form equals counting every (node, receiver) pair whose node writes first,
    enumerated from layer numbers alone."""
    graph = EdgeGraph(n_layers, n_heads, n_heads, parallel)

    def layer_of(name: str) -> tuple[float, int]:
        """(when it writes or reads, 0 attention / 1 MLP) in forward order."""
        if name == "input":
            return -1, 0
        if name == "logits":
            return n_layers, 0
        return int(name[1:].split(".")[0]), 0 if name.startswith("a") else 1

    def writes_before(src: str, dst: str) -> bool:
        (ls, ks), (ld, kd) = layer_of(src), layer_of(dst)
        if ls < ld:
            return True
        return ls == ld and ks == 0 and kd == 1 and not parallel  # a head feeds its own MLP

    expected = [(s, d) for d in graph.receivers for s in graph.nodes if writes_before(s, d)]
    assert graph.n_edges == EdgeGraph.count(n_layers, n_heads, parallel) == len(expected)
    assert [graph.edge_names(i) for i in range(graph.n_edges)] == expected
    assert all(graph.edge_index(s, d) == i for i, (s, d) in enumerate(expected))


def test_graph_of_every_family(tiny_lm, tiny_family):
    graph = EdgeGraph.of(tiny_lm)
    parallel = tiny_family == "gpt_neox_parallel"
    assert graph.parallel is parallel
    assert graph.n_edges == EdgeGraph.count(tiny_lm.n_layers, tiny_lm.n_heads, parallel)
    if parallel:
        with pytest.raises(InvalidArgumentError, match="parallel-residual"):
            graph.edge_index("a1.h0", "m1")
    else:
        assert graph.edge_index("a1.h0", "m1") >= 0


def test_graph_names_errors():
    graph = EdgeGraph(3, 4, 2)
    with pytest.raises(UnknownComponentError, match=r"did you mean 'a1\.h2'"):
        graph.edge_index("a1.h2x", "logits")
    with pytest.raises(UnknownComponentError, match=r"did you mean 'a2\.h1\.k'"):
        graph.edge_index("input", "a2.h1.kk")
    with pytest.raises(UnknownComponentError, match="is a receiver"):
        graph.edge_index("a0.h0.q", "logits")
    with pytest.raises(InvalidArgumentError, match="reads the residual stream before"):
        graph.edge_index("a2.h0", "a1.h0.q")
    with pytest.raises(InvalidArgumentError, match="reads the residual stream before"):
        graph.edge_index("m1", "a1.h3.v")


# -- the independent reference -----------------------------------------------------------------
def _slot(family: str, kind: str, unit: int, n_heads: int, d_head: int) -> slice:
    """Where unit ``unit`` of q/k/v sits in the (possibly fused) projection's output."""
    which = "qkv".index(kind)
    layout = REFERENCE[family].qkv_layout
    if layout == "separate":
        return slice(unit * d_head, (unit + 1) * d_head)
    if layout == "gpt2":  # [q | k | v], each n_heads * d_head
        start = which * n_heads * d_head + unit * d_head
    else:  # neox: per head [q_h | k_h | v_h]
        start = unit * 3 * d_head + which * d_head
    return slice(start, start + d_head)


class PlainRef:
    """EAP by plain hooks on one model and one prompt pair (noising: base = clean)."""

    def __init__(self, family: str, model) -> None:
        self.family, self.model = family, model
        self.hf = model.hf_model
        self.ref = REFERENCE[family]
        cfg = self.hf.config
        self.n_layers, self.n_heads = model.n_layers, model.n_heads
        self.n_kv, self.d_head = model.n_kv_heads, model.d_head
        tok = model.tokenizer
        self.clean = torch.tensor([tok(CLEAN)["input_ids"]])
        self.corrupted = torch.tensor([tok(CORRUPTED)["input_ids"]])
        self.answers = (tok(CORRECT)["input_ids"][0], tok(INCORRECT)["input_ids"][0])
        del cfg

    def path(self, kind: str, layer: int) -> str:
        return self.ref.sites[kind][0].format(L=layer)

    def metric(self, logits: torch.Tensor) -> torch.Tensor:
        return logits[0, -1, self.answers[0]] - logits[0, -1, self.answers[1]]

    def run(self, ids: torch.Tensor, hooks: list[tuple[str, str, object]]) -> torch.Tensor:
        handles = []
        try:
            for path, io, fn in hooks:
                module = self.hf.get_submodule(path)
                handles.append(module.register_forward_pre_hook(fn, with_kwargs=True)
                               if io == "pre" else module.register_forward_hook(fn))
            return self.hf(input_ids=ids, use_cache=False).logits
        finally:
            for h in handles:
                h.remove()

    def capture(self, ids: torch.Tensor, embeds: torch.Tensor | None = None) -> dict:
        """Layer inputs, per-head z, MLP outputs, the embedding output."""
        got: dict = {}

        def save(key, pre):
            def hook(module, args, *rest):
                value = (args[0] if args else rest[0]["hidden_states"]) if pre else \
                    first_tensor(rest[-1])
                got[key] = value.detach().clone()
            return hook

        hooks: list = []
        if embeds is not None:
            hooks.append((self.path("embed", 0), "post", lambda m, a, o: embeds))
        else:
            hooks.append((self.path("embed", 0), "post", save("embed", False)))
        for layer in range(self.n_layers):
            hooks.append((self.path("resid_pre", layer), "pre", save(("x", layer), True)))
            hooks.append((self.ref.o_proj.format(L=layer), "pre", save(("z", layer), True)))
            hooks.append((self.path("mlp", layer), "post", save(("m", layer), False)))
        with torch.no_grad():
            got["logits"] = self.run(ids, hooks)
        return got

    def head_write(self, layer: int, z: torch.Tensor) -> torch.Tensor:
        """``[1, T, H, d_model]`` each head's z through its rows of the output projection."""
        proj = self.hf.get_submodule(self.ref.o_proj.format(L=layer))
        w = proj.weight.detach()
        per = z.view(*z.shape[:2], self.n_heads, self.d_head)
        if isinstance(proj, torch.nn.Linear):  # weight [d_model, H * d_head]
            w = w.T
        return torch.einsum("bthe,hed->bthd", per, w.reshape(self.n_heads, self.d_head, -1))

    def deltas(self) -> tuple[list[str], torch.Tensor, float, float]:
        """Node names, ``[T, n_nodes, d_model]`` corrupted minus clean, M(clean), M(corr)."""
        c, k = self.capture(self.clean), self.capture(self.corrupted)
        names, parts = ["input"], [(k[("x", 0)] - c[("x", 0)])[0, :, None]]
        for layer in range(self.n_layers):
            names += [f"a{layer}.h{h}" for h in range(self.n_heads)] + [f"m{layer}"]
            parts.append((self.head_write(layer, k[("z", layer)])
                          - self.head_write(layer, c[("z", layer)]))[0])
            parts.append((k[("m", layer)] - c[("m", layer)])[0, :, None])
        return (names, torch.cat(parts, 1), float(self.metric(c["logits"])),
                float(self.metric(k["logits"])))

    def receiver_grad(self, receiver: str, embeds: torch.Tensor | None = None) -> torch.Tensor:
        """``[T, d_model]`` dM / d(the receiver's own copy of its input) on the clean run
        (its embedding output replaced by ``embeds`` when given)."""
        T = self.clean.shape[1]
        eps = torch.zeros(1, T, self.hf.config.hidden_size, requires_grad=True)
        (grad,) = torch.autograd.grad(self.receiver_metric(receiver, eps, embeds), eps)
        return grad[0]

    def receiver_metric(self, receiver: str, eps: torch.Tensor,
                        embeds: torch.Tensor | None = None) -> torch.Tensor:
        """M of the clean run in which only ``receiver`` reads ``x + eps`` (``[1, T, d]``)."""
        hooks: list = []
        if embeds is not None:
            hooks.append((self.path("embed", 0), "post", lambda m, a, o: embeds))
        if receiver == "logits":
            hooks.append((self.path("ln_final", 0), "pre",
                          lambda m, a, kw: ((a[0] + eps, *a[1:]), kw)))
        elif receiver.startswith("m"):
            layer = int(receiver[1:])
            hooks.append((self.path("mlp.in", layer), "pre",
                          lambda m, a, kw: ((a[0] + eps, *a[1:]), kw)))
        else:
            head_s, kind = receiver.split(".")[1:]
            layer, head = int(receiver.split(".")[0][1:]), int(head_s[1:])
            unit = head if kind == "q" else head // (self.n_heads // self.n_kv)
            proj_path = self.ref.qkv["qkv".index(kind)].format(L=layer)
            norm = self.hf.get_submodule(self.path("attn.in", layer))
            proj = self.hf.get_submodule(proj_path)
            seen: dict = {}
            slot = _slot(self.family, kind, unit, self.n_heads, self.d_head)

            def remember(m, a, kw):
                seen["x"] = a[0] if a else kw["hidden_states"]

            def own_copy(m, a, out):
                mine = proj.forward(norm(seen["x"] + eps))  # .forward: not this hook again
                new = out.clone()
                new[..., slot] = mine[..., slot]
                return new

            base_z = self.capture(self.clean, embeds)[("z", layer)]

            def only_this_head(m, a, kw):
                z = a[0].view(*a[0].shape[:2], self.n_heads, self.d_head)
                keep = torch.zeros(self.n_heads, 1, dtype=torch.bool)
                keep[head] = True
                base = base_z.view_as(z)
                return (torch.where(keep, z, base).flatten(2), *a[1:]), kw

            hooks += [(self.path("resid_pre", layer), "pre", remember),
                      (proj_path, "post", own_copy),
                      (self.ref.o_proj.format(L=layer), "pre", only_this_head)]
        return self.metric(self.run(self.clean, hooks))


def _sample_receivers(model) -> list[str]:
    """A query, key and value receiver in every layer (a query head that is not the first of
    its key/value group where there are groups), every MLP, and the logits."""
    head = min(model.n_heads - 1, model.n_heads // model.n_kv_heads + 1)
    out = []
    for layer in range(model.n_layers):
        out += [f"a{layer}.h{head}.q", f"a{layer}.h{head}.k", f"a{layer}.h{head}.v",
                f"a{layer}.h0.k", f"m{layer}"]
    return [*out, "logits"]


def _reference_scores(ref: PlainRef, graph: EdgeGraph, receivers: list[str],
                      embeds: list[torch.Tensor] | None = None):
    """``(edges, change per edge, M(clean), M(corrupted))``: EAP (or with ``embeds``, the
    gradient averaged over those runs) for every edge into ``receivers``."""
    names, deltas, m_clean, m_corr = ref.deltas()
    edges, scores = [], []
    for receiver in receivers:
        if embeds is None:
            grad = ref.receiver_grad(receiver)
        else:
            grad = torch.stack([ref.receiver_grad(receiver, e) for e in embeds]).mean(0)
        for j, src in enumerate(names):
            try:
                graph.edge_index(src, receiver)
            except InvalidArgumentError:
                continue
            edges.append((src, receiver))
            scores.append(float((deltas[:, j] * grad).sum()))
    return edges, torch.tensor(scores, dtype=torch.float64), m_clean, m_corr


@pytest.mark.parametrize("family", SEPARABLE)
def test_eap_equals_plain_hook_reference(family, one_thread):
    """EAP's score of every edge into sampled receivers equals gradient-times-difference with
    the receiver's own input copy, written with plain hooks; normalised by the same gap."""
    model = tiny_model(family)
    before = model.hook_snapshot()
    result = edge_attribution(model, CLEAN, CORRUPTED, correct=CORRECT, incorrect=INCORRECT)
    assert model.hook_snapshot() == before
    ref = PlainRef(family, model)
    edges, expected, m_clean, m_corr = _reference_scores(ref, result.graph,
                                                         _sample_receivers(model))
    got = torch.tensor([float(result.change[result.graph.edge_index(s, d)]) for s, d in edges],
                       dtype=torch.float64)
    # observed at most 5.1e-6 relative (gpt_neox_sequential: float32 metrics, other batches)
    assert result.base_value == pytest.approx(m_clean, rel=1e-5)
    assert result.source_value == pytest.approx(m_corr, rel=1e-5)
    assert_matches_reference(got, expected, 0.0, rtol=EAP_RTOL, min_cells=10,
                             what=f"{family} eap change")
    # normalised by the result's own gap (the one aggregation rule)
    normalised = torch.tensor([result.score(s, d) for s, d in edges], dtype=torch.float64)
    gap = result.source_value - result.base_value
    # observed at most 5.8e-8 relative (float32 division): one rounding, not a comparison
    assert torch.allclose(normalised, got / gap, rtol=5e-7, atol=0.0)


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen3", "gpt_neox_parallel"])
def test_eap_ig_equals_plain_hook_reference(family, one_thread):
    """EAP-IG's gradient is the mean over runs whose embedding output is
    ``e_corrupted + (k/m)(e_clean - e_corrupted)``, ``k = 0..m-1`` (noising: the source is the
    corrupted run), each computed with plain hooks as in the EAP reference."""
    steps = 3
    model = tiny_model(family)
    result = edge_attribution(model, CLEAN, CORRUPTED, method="eap_ig", ig_steps=steps,
                              correct=CORRECT, incorrect=INCORRECT)
    ref = PlainRef(family, model)
    e_clean, e_corr = ref.capture(ref.clean)["embed"], ref.capture(ref.corrupted)["embed"]
    points = [e_corr + (k / steps) * (e_clean - e_corr) for k in range(steps)]
    receivers = [r for r in _sample_receivers(model) if r.startswith(("a1", "a2.h0", "m2"))]
    edges, expected, m_clean, _ = _reference_scores(ref, result.graph,
                                                    [*receivers, "logits"], points)
    got = torch.tensor([float(result.change[result.graph.edge_index(s, d)]) for s, d in edges],
                       dtype=torch.float64)
    assert result.base_value == pytest.approx(m_clean, rel=1e-5)
    assert result.extra["ig_steps"] == steps
    assert_matches_reference(got, expected, 0.0, rtol=EAP_RTOL, min_cells=10,
                             what=f"{family} eap_ig change")
    eap = edge_attribution(model, CLEAN, CORRUPTED, correct=CORRECT, incorrect=INCORRECT)
    assert not torch.allclose(eap.change, result.change, rtol=1e-2)  # a different estimate


#: Exact edge patching against one plain-hook forward per edge, relative to the largest
#: effect: observed at most 1.1e-5 (qwen3; 9e-7 absolute on logit differences of ~5) over
#: every separable family (float32: the engine runs the receiver's layer on a window of
#: positions in a batch of edges, the reference the whole prompt once per edge).
EXACT_RTOL = 1e-4


def _exact_reference(ref: PlainRef, graph: EdgeGraph, receivers: list[str]):
    """``(edges, M(patched) - M(clean) per edge)``: one forward per edge in which only the
    receiver reads ``x + delta_u`` (noising)."""
    names, deltas, m_clean, _ = ref.deltas()
    edges, changes = [], []
    with torch.no_grad():
        for receiver in receivers:
            for j, src in enumerate(names):
                try:
                    graph.edge_index(src, receiver)
                except InvalidArgumentError:
                    continue
                edges.append((src, receiver))
                value = ref.receiver_metric(receiver, deltas[None, :, j])
                changes.append(float(value) - m_clean)
    return edges, torch.tensor(changes, dtype=torch.float64)


@pytest.mark.parametrize("family", SEPARABLE)
def test_exact_equals_one_forward_per_edge(family, one_thread):
    """Exact edge patching on the engine equals a brute-force loop with plain hooks (one
    forward per edge) for every edge into sampled receivers; ``edges=`` scores only those,
    the rest hold NaN."""
    model = tiny_model(family)
    before = model.hook_snapshot()
    graph = EdgeGraph.of(model)
    ref = PlainRef(family, model)
    receivers = _sample_receivers(model)
    edges, expected = _exact_reference(ref, graph, receivers)
    result = edge_attribution(model, CLEAN, CORRUPTED, method="exact", edges=edges,
                              correct=CORRECT, incorrect=INCORRECT)
    assert model.hook_snapshot() == before
    got = torch.tensor([float(result.change[graph.edge_index(s, d)]) for s, d in edges],
                       dtype=torch.float64)
    assert_matches_reference(got, expected, 0.0, rtol=EXACT_RTOL, min_cells=10,
                             what=f"{family} exact")
    assert int(result.scored.sum()) == len(edges) < graph.n_edges
    assert len(result.to_pandas()) == len(edges)
    left_out = next(graph.edge_names(i) for i in range(graph.n_edges)
                    if not bool(result.scored[i]))
    with pytest.raises(InvalidArgumentError, match="not scored"):
        result.score(*left_out)


def test_eap_equals_exact_on_a_linear_model(one_thread):
    """With every norm and the MLP's activation replaced by the identity, what follows a
    last-layer value input, a last-layer MLP input or the final residual stream is linear in
    it (the attention pattern reads only queries and keys), so the first-order estimate is
    exact there; a query input goes through the softmax and is not."""
    from conftest import tiny_hf_model, tiny_tokenizer

    from causalpatch import InterpretableModel

    class Same(torch.nn.Module):
        """The identity, returning a contiguous tensor as a norm does (GPT-2's projections
        ``view`` their input; the staircase hands a layer broadcast rows)."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.contiguous()

    hf = tiny_hf_model("gpt2")
    for block in hf.transformer.h:
        block.ln_1, block.ln_2, block.mlp.act = Same(), Same(), Same()
    hf.transformer.ln_f = Same()
    model = InterpretableModel(hf, tokenizer=tiny_tokenizer())
    graph = EdgeGraph.of(model)
    last = model.n_layers - 1
    linear = {f"a{last}.h{h}.v" for h in range(model.n_heads)} | {f"m{last}", "logits"}
    edges = [graph.edge_names(i) for i in range(graph.n_edges)
             if graph.edge_names(i)[1] in linear]
    kw = dict(correct=CORRECT, incorrect=INCORRECT, edges=edges)
    eap = edge_attribution(model, CLEAN, CORRUPTED, **kw)
    exact = edge_attribution(model, CLEAN, CORRUPTED, method="exact", **kw)
    keep = exact.scored
    # observed 2.2e-5 of the largest change (6.7e-8 absolute: the exact change is a float32
    # difference of two logit differences, the estimate a dot product; effects are small here)
    assert_matches_reference(eap.change[keep], exact.change[keep], 0.0, rtol=1e-4,
                             min_cells=10, what="linear model")
    queries = [(s, d) for s, d in (graph.edge_names(i) for i in range(graph.n_edges))
               if d == f"a{last}.h0.q"]
    kw["edges"] = queries
    eap_q = edge_attribution(model, CLEAN, CORRUPTED, **kw).change
    exact_q = edge_attribution(model, CLEAN, CORRUPTED, method="exact", **kw).change
    sel = ~torch.isnan(exact_q)
    assert (eap_q[sel] - exact_q[sel]).abs().max() > 1e-3 * exact_q[sel].abs().max()


# -- datasets, direction, the result object --------------------------------------------------------
def test_dataset_is_the_mean_over_pairs_and_batches_do_not_matter(one_thread):
    """A dataset's ``change`` is the mean of its pairs' own changes (pairs of one length run as
    one batch or one at a time alike), and its scores are normalised by the mean gap."""
    from conftest import TextPairs

    model = tiny_model("llama")
    rows = IOI_PAIRS[:3]
    data = TextPairs.of(rows)
    whole = edge_attribution(model, data, batch_size=3)
    one_by_one = edge_attribution(model, data, batch_size=1)
    singles = [edge_attribution(model, c, k, correct=a, incorrect=b) for c, k, a, b in rows]
    mean_change = torch.stack([s.change for s in singles]).mean(0)
    # observed 6.0e-8 of the largest change (float32 batching order)
    assert_matches_reference(whole.change, mean_change, 0.0, rtol=1e-6, min_cells=50,
                             what="dataset mean")
    assert_matches_reference(one_by_one.change, whole.change, 0.0, rtol=1e-6, min_cells=50,
                             what="batch size")
    gap = (sum(s.source_value for s in singles) - sum(s.base_value for s in singles)) / 3
    # observed 2.4e-7 absolute on scores up to 1.6 (float32 division)
    assert (whole.scores - whole.change / gap).abs().max() <= 1e-6 * whole.scores.abs().max()
    assert whole.n_pairs == 3


def test_denoise_is_noise_with_the_runs_swapped(one_thread):
    """``direction="denoise"`` is the gradient on the corrupted run with clean differences:
    exactly noising with the prompts swapped (and the answers kept)."""
    model = tiny_model("qwen2")
    kw = dict(correct=CORRECT, incorrect=INCORRECT)
    denoise = edge_attribution(model, CLEAN, CORRUPTED, direction="denoise", **kw)
    swapped = edge_attribution(model, CORRUPTED, CLEAN, direction="noise", **kw)
    assert denoise.direction == "denoise"
    assert torch.equal(denoise.change, swapped.change)
    assert denoise.base_value == swapped.base_value


def test_result_views_and_json_round_trip(tmp_path, one_thread):
    model = tiny_model("gpt2")
    result = edge_attribution(model, CLEAN, CORRUPTED, method="eap_ig", ig_steps=2,
                              correct=CORRECT, incorrect=INCORRECT)
    top = result.top(5)
    assert len(top) == 5
    assert [abs(s) for *_, s in top] == sorted((abs(s) for *_, s in top), reverse=True)
    assert abs(top[0][2]) == float(result.scores.abs().max())
    assert all(result.score(src, dst) == s for src, dst, s in top)
    table = result.to_pandas()
    assert len(table) == result.graph.n_edges == EdgeGraph.count(3, 4)
    row = table.iloc[result.graph.edge_index(top[0][0], top[0][1])]
    assert (row.src, row.dst, row.score) == (top[0][0], top[0][1], top[0][2])
    path = tmp_path / "edges.json"
    result.to_json(path)
    back = EdgeResult.from_json(path)
    assert torch.equal(back.scores, result.scores) and torch.equal(back.change, result.change)
    assert (back.method, back.direction, back.metric, back.extra["ig_steps"]) == (
        "eap_ig", "noise", "logit_diff", 2)
    assert back.top(5) == top
    with pytest.raises(Exception, match="edges"):
        EdgeResult.from_json('{"format": "causalpatch.edges", "version": 1}')
    with pytest.raises(InvalidArgumentError, match="n must be a positive int"):
        result.top(0)


# -- bad input -------------------------------------------------------------------------------------
BAD = [
    ("method", dict(method="acdc"), InvalidArgumentError, "method must be one of"),
    ("ig_steps-0", dict(method="eap_ig", ig_steps=0), InvalidArgumentError, "ig_steps"),
    ("ig_steps-float", dict(method="eap_ig", ig_steps=2.5), InvalidTypeError, "ig_steps"),
    ("direction", dict(direction="sideways"), InvalidArgumentError, "direction"),
    ("answers", dict(correct=None, incorrect=None, metric="logit_diff"), Exception, "answer"),
    ("batch_size", dict(batch_size=0), InvalidArgumentError, "batch_size"),
    ("edge-name", dict(edges=[("a1.h3x", "logits")]), UnknownComponentError,
     r"did you mean 'a1\.h3'"),
    ("edge-receiver", dict(method="exact", edges=[("input", "a1.h0.w")]),
     UnknownComponentError, "did you mean"),
    ("edge-order", dict(method="exact", edges=[("a2.h0", "a1.h0.q")]), InvalidArgumentError,
     "reads the residual stream before"),
    ("edges-empty", dict(edges=[]), InvalidArgumentError, "edges is empty"),
    ("edges-type", dict(edges="a0.h0"), InvalidTypeError, "edges must be"),
    ("edges-repeated", dict(edges=[("input", "logits")] * 2), InvalidArgumentError, "repeated"),
]


@pytest.mark.parametrize("name,kwargs,error,fragment", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_refused_before_any_forward(name, kwargs, error, fragment):
    model = tiny_model("llama")
    counter = ForwardCounter(model)
    before = model.hook_snapshot()
    args = dict(correct=CORRECT, incorrect=INCORRECT)
    args.update(kwargs)
    try:
        with pytest.raises(error, match=fragment):
            edge_attribution(model, CLEAN, CORRUPTED, **args)
        assert counter.n == 0
        assert model.hook_snapshot() == before
    finally:
        counter.handle.remove()


def test_pairs_per_pass_follows_the_memory_budget(one_thread):
    """Without ``batch_size``, ``eap``/``eap_ig`` put as many pairs in a gradient pass as
    ``memory_mb`` holds (:func:`pairs_per_pass`: more steps or a smaller budget, fewer pairs),
    say so in ``extra["pairs_per_pass"]``, and give the scores of an explicit batch size; a
    budget that holds no pair is refused before any forward pass."""
    from conftest import TextPairs

    from causalpatch.methods.edges import pairs_per_pass

    model = tiny_model("llama")
    rows = IOI_PAIRS[:3]
    data = TextPairs.of(rows)
    n_tokens = len(model.tokenizer(CLEAN)["input_ids"])
    one_pair = 1024.0 / pairs_per_pass(model, n_tokens, 1, 1024.0)  # >= one pair's MiB
    assert pairs_per_pass(model, n_tokens, 4, 1024.0) < pairs_per_pass(model, n_tokens, 1, 1024.0)
    small = 2.5 * one_pair  # a budget of about two pairs (floor division of the estimate)
    assert pairs_per_pass(model, n_tokens, 1, small) in (2, 3)
    chosen = edge_attribution(model, data, memory_mb=small)
    assert set(chosen.extra["pairs_per_pass"].values()) == {
        pairs_per_pass(model, n_tokens, 1, small)}
    explicit = edge_attribution(model, data, batch_size=1)
    # observed 6.0e-8 of the largest change between batch sizes (float32 batching order)
    assert_matches_reference(chosen.change, explicit.change, 0.0, rtol=1e-6, min_cells=50,
                             what="budget-chosen batch")
    counter = ForwardCounter(model)
    try:
        with pytest.raises(InvalidArgumentError, match="memory_mb=0.001 cannot hold one pair"):
            edge_attribution(model, data, memory_mb=0.001)
        assert counter.n == 0
    finally:
        counter.handle.remove()


def test_empty_dataset_and_inseparable_heads_are_refused():
    from conftest import TextPairs

    model = tiny_model("llama")
    counter = ForwardCounter(model)
    try:
        with pytest.raises(InvalidArgumentError, match="no pairs"):
            edge_attribution(model, TextPairs([], [], [], []))
        with pytest.raises(InvalidArgumentError, match=r"same number of tokens|length"):
            edge_attribution(model, CLEAN, "When Mary went", correct=CORRECT,
                             incorrect=INCORRECT)
        assert counter.n == 0
    finally:
        counter.handle.remove()
    for family in ("gemma2", "gemma3_text"):
        gemma = tiny_model(family)
        with pytest.raises(UnsupportedArchitectureError, match="post-attention norm"):
            edge_attribution(gemma, CLEAN, CORRUPTED, correct=CORRECT, incorrect=INCORRECT)


# -- SmolLM2 ---------------------------------------------------------------------------------------
@pytest.mark.real
def test_smollm2_graph_and_eap_against_exact(smollm2):
    """The real model: EAP-IG's 123,211 edges, and on an IOI pair the largest EAP edges into
    the logits (a nearly linear readout) agree with their exact effect: observed within 0.003
    of normalised scores up to 0.53 (2026-12-07)."""
    graph = EdgeGraph.of(smollm2)
    assert (graph.n_layers, graph.n_heads, graph.n_kv_heads, graph.parallel) == (30, 9, 3, False)
    assert graph.n_edges == 123_211
    clean = "When Mary and John went to the store, John gave a drink to"
    corrupted = "When Mary and John went to the store, Mary gave a drink to"
    kw = dict(correct=" Mary", incorrect=" John", progress=False)
    before = smollm2.hook_snapshot()
    eap = edge_attribution(smollm2, clean, corrupted, **kw)
    into_logits = [(s, d) for s, d, _ in eap.top(200) if d == "logits"][:3]
    exact = edge_attribution(smollm2, clean, corrupted, method="exact", edges=into_logits, **kw)
    assert smollm2.hook_snapshot() == before
    assert len(into_logits) == 3
    for src, dst in into_logits:
        assert abs(exact.score(src, dst)) > 0.1
        assert eap.score(src, dst) == pytest.approx(exact.score(src, dst), abs=0.03)


def test_run_options_checkpoint_and_progress(tmp_path, one_thread):
    """The shared run options: a checkpointed run, rerun from its file, gives the same scores
    without evaluating again; a progress callback sees every edge of every pair."""
    from conftest import TextPairs

    model = tiny_model("llama")
    data = TextPairs.of(IOI_PAIRS[:2])
    path = tmp_path / "edges.ckpt"
    seen: list[tuple[int, int]] = []
    first = edge_attribution(model, data, method="exact", checkpoint=str(path), batch_size=7,
                             progress=lambda done, total: seen.append((done, total)))
    n = first.graph.n_edges
    assert seen[-1] == (2 * n, 2 * n)
    calls = ForwardCounter(model)
    try:
        again = edge_attribution(model, data, method="exact", checkpoint=str(path),
                                 batch_size=7)
        assert calls.n == 0  # every pair restored from the file
    finally:
        calls.handle.remove()
    assert torch.equal(again.scores, first.scores)


def test_exact_batches_the_edges_into_a_receiver(one_thread):
    """Exact edge patching runs the edges into one receiver as rows of one batch: the
    receiver's layer is called a fixed number of times (the pair's runs, pass 1, pass 2),
    not once per edge, and no earlier layer runs after the pair's runs."""
    model = tiny_model("llama")
    graph = EdgeGraph.of(model)
    receiver = "a2.h1.v"
    edges = [graph.edge_names(i) for i in range(graph.n_edges)
             if graph.edge_names(i)[1] == receiver]
    calls = {0: 0, 2: 0}
    layers = model.hf_model.model.layers
    handles = [layers[i].register_forward_pre_hook(
        lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1)) for i in calls]
    try:
        edge_attribution(model, CLEAN, CORRUPTED, method="exact", edges=edges,
                         correct=CORRECT, incorrect=INCORRECT)
    finally:
        for h in handles:
            h.remove()
    assert len(edges) == 11
    # the pair's prefix and suffix runs (2 each), then pass 1 and pass 2 in layer 2 only
    assert calls == {0: 2, 2: 4}

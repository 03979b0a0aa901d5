"""Circuits (``causalpatch.graph.Circuit``, selection, pruning) and their evaluation
(``causalpatch.evaluate_circuit``, ``causalpatch.faithfulness_curve``).

Checked against:

* an independent reference written with plain PyTorch hooks on the module paths of
  ``conftest.REFERENCE`` (no causalpatch code): one forward of the clean prompt in which every
  receiver's input is recomputed as ``x - sum over senders outside the circuit of (z_u(this
  run) - z_u(corrupted))``: each head's query/key/value slice by calling its input norm and
  projection on its own input, the MLP's norm input and the final norm's input shifted. For
  grouped-query LLaMA the reference runs on the *ungrouped* copy of the model (every key/value
  head repeated per query head, EAP-IG's conversion), which computes the same function;
* the identities of the definition: the full graph is the clean run and the empty circuit the
  corrupted run; the circuit of every edge but ``u -> v`` is exact edge patching (noising) of
  ``u -> v``, and the circuit of the one edge ``input -> logits`` is its denoising patch
  (``edge_attribution(method="exact")``); pruning leaves the value unchanged;
* ``faithfulness_curve``'s rows against ``evaluate_circuit`` of each of its circuits, and its
  areas against the trapezoid rule written out;
* selection and pruning on hand-made graphs; bad input refused before any forward pass, no
  hook left behind.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import (IOI_PAIRS, REFERENCE, ForwardCounter, TextPairs, assert_matches_reference,
                      first_tensor, reference_qkv, tiny_hf_model, tiny_model, tiny_tokenizer)

from causalpatch import (Circuit, InterpretableModel, edge_attribution, evaluate_circuit,
                         faithfulness_curve)
from causalpatch.errors import (CheckpointMismatchError, CorruptResultError, InvalidArgumentError,
                                InvalidTypeError, UnknownComponentError,
                                UnsupportedArchitectureError)
from causalpatch.graph import EdgeGraph, select_edges
from causalpatch.methods.circuits import DisconnectedCircuitWarning

CLEAN, CORRUPTED, CORRECT, INCORRECT = IOI_PAIRS[0]
KW = dict(corrupted=CORRUPTED, correct=CORRECT, incorrect=INCORRECT)

#: Families with separate head writes, covering each code path: grouped-query LLaMA (2 query
#: heads per key/value head), GPT-2 (fused q/k/v, learned positions), Qwen3 (q/k norms), and
#: GPT-NeoX with a parallel (the MLP reads the layer input) and a sequential residual.
FAMILIES = ["llama", "gpt2", "qwen3", "gpt_neox_parallel", "gpt_neox_sequential"]

#: The circuit run against plain hooks, on the metric (logit difference), relative to the
#: largest change from the clean run: observed at most 1.25e-5 (GPT-2: 8.3e-7 absolute on
#: changes up to 0.067; the other families 0.7-6e-6) over these families (float32:
#: the engine computes each layer on the window of positions after the first difference and
#: sums the patched senders' differences per receiver in one contraction; the reference
#: recomputes every position and sums sender by sender).
REF_RTOL = 1e-4

#: The full graph against the clean run and the empty circuit against the corrupted run, on
#: the metric, relative to max(1, |M(clean)|, |M(corrupted)|): observed at most 1.5e-7 over
#: these families (0 or one float32 ulp for most; subtracting every sender's difference and
#: adding the corrupted ones back is the other run's residual stream up to rounding, not
#: bitwise). On faithfulness this is that bound divided by the gap M(clean) - M(corrupted).
ENDS_RTOL = 1.5e-6


def _metric_tol(*values: float) -> float:
    return ENDS_RTOL * max(1.0, *(abs(v) for v in values))


# -- graph-level: selection and pruning ------------------------------------------------------------
def test_pruning_keeps_exactly_the_edges_on_input_to_logits_paths():
    g = EdgeGraph(2, 2, 2)
    path = [("input", "a0.h0.q"), ("a0.h0", "m0"), ("m0", "a1.h1.v"), ("a1.h1", "logits")]
    dangling_out = ("a0.h1", "a1.h0.k")  # a0.h1 is reached by no circuit edge
    dead_end = ("input", "a1.h0.q")  # a1.h0 writes into nothing of the circuit
    circuit = Circuit.from_edges(g, [*path, dangling_out, dead_end])
    assert len(circuit) == 6 and circuit.connected
    pruned = circuit.pruned()
    assert set(pruned.edges) == set(path)
    assert pruned.pruned().edges == pruned.edges  # idempotent
    assert pruned.nodes == ["input", "a0.h0", "m0", "a1.h1", "logits"]
    # cut the path: nothing leads to the logits any more, so nothing is left
    broken = Circuit.from_edges(g, [e for e in path if e != ("m0", "a1.h1.v")])
    assert not broken.connected and len(broken.pruned()) == 0
    assert Circuit.full(g).pruned().n_edges == g.n_edges
    assert not Circuit.empty(g).connected
    # a head's key input counts as reaching the head as much as its query does
    via_key = Circuit.from_edges(g, [("input", "a0.h1.k"), ("a0.h1", "logits")])
    assert via_key.connected and len(via_key.pruned()) == 2
    assert ("a0.h1", "logits") in via_key and ("a0.h0", "logits") not in via_key


def test_circuit_json_round_trip_and_bad_edges(tmp_path):
    g = EdgeGraph(3, 4, 2, parallel=True)
    circuit = Circuit.from_edges(g, [("input", "a0.h1.k"), ("a0.h1", "a2.h3.v"),
                                     ("a2.h3", "logits")])
    back = Circuit.from_dict(circuit.to_dict())
    assert back.graph == g and torch.equal(back.mask, circuit.mask)
    path = tmp_path / "circuit.json"
    circuit.to_json(path)
    assert Circuit.from_json(path).edges == circuit.edges == Circuit.from_json(
        circuit.to_json()).edges
    with pytest.raises(CorruptResultError, match=r"causalpatch\.circuit"):
        Circuit.from_json('{"format": "causalpatch.edges"}')
    with pytest.raises(UnknownComponentError, match=r"did you mean 'a1\.h2'"):
        Circuit.from_edges(g, [("a1.h2x", "logits")])
    with pytest.raises(InvalidArgumentError, match="reads the residual stream before"):
        Circuit.from_edges(g, [("a2.h0", "a1.h0.q")])
    with pytest.raises(InvalidArgumentError, match="parallel-residual"):
        Circuit.from_edges(g, [("a1.h0", "m1")])
    with pytest.raises(InvalidTypeError, match="name pair"):
        Circuit.from_edges(g, ["a0.h0"])
    with pytest.raises(InvalidArgumentError, match="bool tensor"):
        Circuit(g, torch.ones(3, dtype=torch.bool))


def test_top_and_threshold_selection():
    g = EdgeGraph(2, 2, 1)
    scores = torch.linspace(-1, 1, g.n_edges)
    scores[3] = float("nan")
    order = torch.argsort(torch.nan_to_num(scores.abs(), nan=-1.0), descending=True, stable=True)
    top = select_edges(g, scores, 5, prune=False)
    assert set(top.mask.nonzero()[:, 0].tolist()) == set(order[:5].tolist())
    signed = select_edges(g, scores, 5, absolute=False, prune=False)
    assert set(signed.mask.nonzero()[:, 0].tolist()) == set(range(g.n_edges - 5, g.n_edges))
    kept = select_edges(g, scores, threshold=0.5, prune=False)
    assert torch.equal(kept.mask, torch.nan_to_num(scores.abs(), nan=0.0) >= 0.5)
    assert not bool(select_edges(g, scores, g.n_edges - 1, prune=False).mask[3])  # NaN: never
    pruned = select_edges(g, scores, 20)
    assert torch.equal(pruned.mask, select_edges(g, scores, 20, prune=False).pruned().mask)
    for kwargs, fragment in [(dict(), "exactly one of n"),
                             (dict(n=3, threshold=0.1), "exactly one of n"),
                             (dict(n=g.n_edges), rf"in \[0, {g.n_edges - 1}\]"),
                             (dict(n=-1), "must be an int in"),
                             (dict(threshold=0.1, greedy=True), "greedy")]:
        with pytest.raises(InvalidArgumentError, match=fragment):
            select_edges(g, scores, **kwargs)


def _greedy_reference(g: EdgeGraph, scores: torch.Tensor, n: int) -> set[int]:
    """EAP-IG's greedy growth written as a plain loop over candidate sets (no heap)."""
    chosen: set[int] = set()
    candidates = {i for i in range(g.n_edges) if g.edge_names(i)[1] == "logits"}
    in_circuit = {"input"}
    while len(chosen) < n and candidates:
        best = max(candidates, key=lambda i: (abs(float(scores[i])), -i))
        candidates.discard(best)
        chosen.add(best)
        src = g.edge_names(best)[0]
        if src not in in_circuit:
            in_circuit.add(src)
            candidates |= {i for i in range(g.n_edges)
                           if g.edge_names(i)[1].rsplit(".", 1)[0] == src
                           or g.edge_names(i)[1] == src}
    return chosen


@pytest.mark.parametrize("n", [1, 7, 30])
def test_greedy_selection_grows_from_the_logits(n):
    g = EdgeGraph(3, 2, 1)
    scores = torch.randn(g.n_edges, generator=torch.Generator().manual_seed(n))
    greedy = select_edges(g, scores, n, greedy=True, prune=False)
    assert set(greedy.mask.nonzero()[:, 0].tolist()) == _greedy_reference(g, scores, n)
    # every chosen edge feeds a node the circuit carries to the logits
    senders = {s for s, _ in greedy.edges}
    for _, dst in greedy.edges:
        assert dst == "logits" or dst.rsplit(".", 1)[0] in senders or dst in senders
    assert greedy.pruned().n_edges <= n


# -- the circuit run against plain hooks -----------------------------------------------------------
def _ungrouped(family: str):
    """The family's HF model with every key/value head repeated for each query head it
    serves (the same function, one key/value head per query head)."""
    hf = tiny_hf_model(family)
    cfg = hf.config
    group = cfg.num_attention_heads // getattr(cfg, "num_key_value_heads",
                                               cfg.num_attention_heads)
    if group == 1:
        return hf
    flat = tiny_hf_model(family, num_key_value_heads=cfg.num_attention_heads)
    state = hf.state_dict()
    d_head = cfg.head_dim
    for key, value in list(state.items()):
        if key.endswith(("k_proj.weight", "v_proj.weight", "k_proj.bias", "v_proj.bias")):
            per = value.reshape(cfg.num_key_value_heads, d_head, *value.shape[1:])
            state[key] = per.repeat_interleave(group, 0).reshape(-1, *value.shape[1:])
    flat.load_state_dict(state)
    return flat.eval()


class PlainCircuit:
    """M(clean run with every edge outside a circuit patched to the corrupted run), by plain
    hooks on one Hugging Face model whose every query head has its own key/value head."""

    def __init__(self, family: str, hf) -> None:
        self.family, self.hf, self.ref = family, hf, REFERENCE[family]
        cfg = hf.config
        self.n_layers = cfg.num_hidden_layers
        self.n_heads = cfg.num_attention_heads
        d_model = cfg.hidden_size
        self.d_head = d_model // self.n_heads
        tok = tiny_tokenizer()
        self.clean = torch.tensor([tok(CLEAN)["input_ids"]])
        self.corrupted = torch.tensor([tok(CORRUPTED)["input_ids"]])
        self.answers = (tok(CORRECT)["input_ids"][0], tok(INCORRECT)["input_ids"][0])
        self.parallel = self.ref.parallel

    def path(self, kind: str, layer: int = 0) -> str:
        return self.ref.sites[kind][0].format(L=layer)

    def writers_before(self, receiver: str) -> list[str]:
        """Every node writing before ``receiver`` reads, from layer numbers alone."""
        out = ["input"]
        if receiver == "logits":
            layer, own_heads = self.n_layers, False
        elif receiver.startswith("m"):
            layer, own_heads = int(receiver[1:]), not self.parallel
        else:
            layer, own_heads = int(receiver.split(".")[0][1:]), False
        for lay in range(layer):
            out += [f"a{lay}.h{h}" for h in range(self.n_heads)] + [f"m{lay}"]
        if own_heads:
            out += [f"a{layer}.h{h}" for h in range(self.n_heads)]
        return out

    def head_write(self, layer: int, z: torch.Tensor) -> torch.Tensor:
        """``[T, H, d_model]`` each head's ``z`` (``[1, T, H * d_head]``) through its rows of
        the output projection."""
        proj = self.hf.get_submodule(self.ref.o_proj.format(L=layer))
        w = proj.weight.detach()
        if isinstance(proj, torch.nn.Linear):  # weight [d_model, H * d_head]
            w = w.T
        per = z[0].view(z.shape[1], self.n_heads, self.d_head)
        return torch.einsum("the,hed->thd", per, w.reshape(self.n_heads, self.d_head, -1))

    def capture_corrupted(self) -> dict:
        got: dict = {}
        hooks = []

        def save(key, pre):
            def hook(module, args, *rest):
                value = (args[0] if args else rest[0]["hidden_states"]) if pre else \
                    first_tensor(rest[-1])
                got[key] = value.detach().clone()
            return hook

        m = self.hf
        try:
            hooks.append(m.get_submodule(self.path("embed")).register_forward_hook(
                save("embed", False)))
            for layer in range(self.n_layers):
                hooks.append(m.get_submodule(self.ref.o_proj.format(L=layer))
                             .register_forward_pre_hook(save(("z", layer), True),
                                                        with_kwargs=True))
                hooks.append(m.get_submodule(self.path("mlp", layer)).register_forward_hook(
                    save(("m", layer), False)))
            with torch.no_grad():
                m(input_ids=self.corrupted, use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        return got

    def metric(self, edges: set[tuple[str, str]]) -> float:
        corr = self.capture_corrupted()
        diff: dict[str, torch.Tensor] = {}  # node -> [T, d_model] this run minus corrupted

        def cut(receiver: str) -> torch.Tensor:
            outside = [u for u in self.writers_before(receiver) if (u, receiver) not in edges]
            return sum((diff[u] for u in outside), torch.zeros_like(diff["input"]))

        hooks = []
        m = self.hf

        def on_embed(module, args, out):
            diff["input"] = (out - corr["embed"])[0].detach()

        hooks.append((self.path("embed"), "post", on_embed))
        seen: dict = {}
        for layer in range(self.n_layers):
            def remember(module, args, kwargs, layer=layer):
                seen[layer] = (args[0] if args else kwargs["hidden_states"])

            def rewrite(module, args, out, layer=layer, kinds=(0, 1, 2)):
                """Each head's q/k/v slice recomputed from its own input."""
                norm = m.get_submodule(self.path("attn.in", layer))
                new = out.clone()
                for which in kinds:
                    slots = reference_qkv(self.family, which, new, self.n_heads,
                                          self.n_heads, self.d_head)  # a view into new
                    for h in range(self.n_heads):
                        own = norm(seen[layer] - cut(f"a{layer}.h{h}.{'qkv'[which]}"))
                        mine = reference_qkv(self.family, which, module.forward(own),
                                             self.n_heads, self.n_heads, self.d_head)
                        slots[:, :, h] = mine[:, :, h]
                return new

            def on_z(module, args, kwargs, layer=layer):
                z = args[0] if args else kwargs["hidden_states"]
                mine = self.head_write(layer, z) - self.head_write(layer, corr[("z", layer)])
                for h in range(self.n_heads):
                    diff[f"a{layer}.h{h}"] = mine[:, h]

            def on_mlp_in(module, args, kwargs, layer=layer):
                x = args[0] if args else kwargs["hidden_states"]
                return (x - cut(f"m{layer}"), *args[1:]), kwargs

            def on_mlp(module, args, out, layer=layer):
                diff[f"m{layer}"] = (first_tensor(out) - corr[("m", layer)])[0]

            hooks.append((self.path("resid_pre", layer), "pre", remember))
            paths = self.ref.qkv
            if paths[0] == paths[1]:  # fused q/k/v
                hooks.append((paths[0].format(L=layer), "post",
                              lambda mod, a, o, layer=layer: rewrite(mod, a, o, layer, (0, 1, 2))))
            else:
                for which in range(3):
                    hooks.append((paths[which].format(L=layer), "post",
                                  lambda mod, a, o, layer=layer, w=which:
                                  rewrite(mod, a, o, layer, (w,))))
            hooks.append((self.ref.o_proj.format(L=layer), "pre", on_z))
            norm_path = self.ref.sites["mlp.in"][0].format(L=layer)
            hooks.append((norm_path, "pre", on_mlp_in))
            hooks.append((self.path("mlp", layer), "post", on_mlp))

        def on_final(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            return (x - cut("logits"), *args[1:]), kwargs

        hooks.append((self.path("ln_final"), "pre", on_final))
        handles = []
        try:
            for path, io, fn in hooks:
                module = m.get_submodule(path)
                handles.append(module.register_forward_pre_hook(fn, with_kwargs=True)
                               if io == "pre" else module.register_forward_hook(fn))
            with torch.no_grad():
                logits = m(input_ids=self.clean, use_cache=False).logits
        finally:
            for h in handles:
                h.remove()
        return float(logits[0, -1, self.answers[0]] - logits[0, -1, self.answers[1]])


def _random_circuits(g: EdgeGraph, seed: int) -> list[Circuit]:
    """Unpruned random circuits of densities 0.3..0.95 (dangling edges included)."""
    gen = torch.Generator().manual_seed(seed)
    return [Circuit(g, torch.rand(g.n_edges, generator=gen) < p)
            for p in (0.3, 0.6, 0.8, 0.9, 0.95)]


@pytest.mark.parametrize("family", FAMILIES)
def test_circuit_equals_plain_hook_reference(family, one_thread):
    """Random circuits: the metric of the circuit run equals one plain-hook forward that
    rewrites every receiver's input by hand (GQA: on the ungrouped model); the pruned
    circuit evaluates to the same value."""
    model = tiny_model(family)
    before = model.hook_snapshot()
    g = EdgeGraph.of(model)
    ref = PlainCircuit(family, _ungrouped(family))
    got, expected, pruned_got = [], [], []
    for circuit in _random_circuits(g, seed=len(family)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DisconnectedCircuitWarning)
            result = evaluate_circuit(model, CLEAN, circuit, **KW)
            pruned = evaluate_circuit(model, CLEAN, circuit.pruned(), **KW)
        got.append(result.circuit_value)
        pruned_got.append(pruned.circuit_value)
        expected.append(ref.metric(set(circuit.edges)))
    assert model.hook_snapshot() == before
    clean = result.clean_value
    assert_matches_reference(torch.tensor(got), torch.tensor(expected), clean, rtol=REF_RTOL,
                             min_cells=3, what=f"{family} circuit vs plain hooks")
    assert_matches_reference(torch.tensor(pruned_got), torch.tensor(expected), clean,
                             rtol=REF_RTOL, min_cells=3, what=f"{family} pruned circuit")


@pytest.mark.parametrize("family", FAMILIES)
def test_full_graph_is_faithful_and_empty_circuit_is_not(family, one_thread):
    """The full graph reproduces the clean run (faithfulness 1) and the empty circuit the
    corrupted run (faithfulness 0), and the empty circuit is reported as disconnected."""
    model = tiny_model(family)
    g = EdgeGraph.of(model)
    data = TextPairs.of(IOI_PAIRS[:2])
    full = evaluate_circuit(model, data, Circuit.full(g))
    with pytest.warns(DisconnectedCircuitWarning, match="no path from 'input' to 'logits'"):
        empty = evaluate_circuit(model, data, Circuit.empty(g))
    tol = _metric_tol(full.clean_value, full.corrupted_value)
    assert abs(full.circuit_value - full.clean_value) <= tol
    assert abs(empty.circuit_value - empty.corrupted_value) <= tol
    gap = abs(full.clean_value - full.corrupted_value)
    assert gap > 100 * tol  # the two ends are far apart: 1 and 0 mean something
    assert full.faithfulness == pytest.approx(1.0, abs=tol / gap)
    assert empty.faithfulness == pytest.approx(0.0, abs=tol / gap)
    assert full.connected and not empty.connected
    assert (full.n_edges, empty.n_edges, full.n_pairs) == (g.n_edges, 0, 2)
    assert full.per_pair.mean() == pytest.approx(full.faithfulness, abs=1e-6)


#: Circuits against exact edge patching, on normalised scores (both divide by the same gap):
#: observed at most 1.9e-5 relative to the largest score (LLaMA; GPT-2 6.3e-6, NeoX 5.7e-7;
#: ``input -> logits`` alone 1.1e-5 relative, GPT-2)
#: (float32: the circuit run subtracts every other edge's near-zero difference in every
#: receiver, exact patching adds one difference to one receiver).
EXACT_RTOL = 1e-4


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox_parallel"])
def test_one_edge_circuits_equal_exact_edge_patching(family, one_thread):
    """Every edge but ``u -> v`` = exact noising of ``u -> v``: faithfulness = 1 - its
    score with ``direction="noise"``; the one edge ``input -> logits`` = its exact denoising
    score."""
    model = tiny_model(family)
    g = EdgeGraph.of(model)
    gen = torch.Generator().manual_seed(1)
    picks = torch.randperm(g.n_edges, generator=gen)[:8].tolist()
    edges = list(dict.fromkeys([g.edge_names(i) for i in picks]
                               + [("a2.h1", "logits"), ("input", "a0.h0.v")]))
    exact = edge_attribution(model, CLEAN, CORRUPTED, method="exact", edges=edges,
                             correct=CORRECT, incorrect=INCORRECT)
    got, expected = [], []
    for src, dst in edges:
        mask = torch.ones(g.n_edges, dtype=torch.bool)
        mask[g.edge_index(src, dst)] = False
        got.append(1 - evaluate_circuit(model, CLEAN, Circuit(g, mask), **KW).faithfulness)
        expected.append(exact.score(src, dst))
    assert_matches_reference(torch.tensor(got), torch.tensor(expected), 0.0, rtol=EXACT_RTOL,
                             min_cells=3, what=f"{family} all-but-one vs exact")
    # input -> logits reads only the last position: a pair whose last tokens differ
    edge, last = ("input", "logits"), CLEAN[: -len(" to")] + " of"
    denoise = edge_attribution(model, CLEAN, last, method="exact", edges=[edge],
                               direction="denoise", correct=CORRECT, incorrect=INCORRECT)
    alone = evaluate_circuit(model, CLEAN, Circuit.from_edges(g, [edge]), corrupted=last,
                             correct=CORRECT, incorrect=INCORRECT)
    assert alone.connected
    assert abs(denoise.score(*edge)) > 0.02  # far from the corrupted run's 0
    assert abs(alone.faithfulness - denoise.score(*edge)) <= EXACT_RTOL * abs(
        denoise.score(*edge))


def test_receivers_patching_the_same_senders_share_one_row(one_thread):
    """The q/k/v pass computes each distinct receiver input once: with the full graph (no
    sender patched) or the empty circuit (every sender patched) the 3 x 4 receivers of a layer
    are one row; a circuit holding one edge into layer 1's heads adds exactly one."""
    model = tiny_model("llama")
    g = EdgeGraph.of(model)
    rows: list[int] = []
    layer = model.hf_model.model.layers[1]
    handle = layer.register_forward_pre_hook(
        lambda m, a, kw: rows.append((a[0] if a else kw["hidden_states"]).shape[0]),
        with_kwargs=True)
    one = torch.ones(g.n_edges, dtype=torch.bool)
    one[g.edge_index("a0.h2", "a1.h3.k")] = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DisconnectedCircuitWarning)
            for mask in (one, torch.ones_like(one), torch.zeros_like(one)):
                evaluate_circuit(model, CLEAN, Circuit(g, mask), **KW)
    finally:
        handle.remove()
    # per circuit: the pair's prefix and suffix runs (1 and 2 rows), the q/k/v pass, the
    # attention pass (2 rows: one per member of a key/value group) and the staircase's call
    assert rows == [1, 2, 2, 2, 1] + [1, 2, 1, 2, 1] * 2


# -- faithfulness curves ---------------------------------------------------------------------------
#: Curve rows (12 circuits in one batch) against one evaluate_circuit each, on faithfulness,
#: relative to the largest: observed 4.1e-6 (float32: the rows' batch shapes differ).
CURVE_RTOL = 4e-5

def test_faithfulness_curve_rows_equal_evaluate_circuit(one_thread):
    """Each row of the curve (chosen and random circuits) equals evaluate_circuit of that
    circuit; the chosen circuits are the result's own selections; the areas are the
    trapezoid rule over the normalised sizes. The whole curve is one staircase pass per pair
    (the circuits are rows of one batch)."""
    model = tiny_model("llama")
    data = TextPairs.of(IOI_PAIRS[:2])
    scores = edge_attribution(model, data)
    g = scores.graph
    sizes = [0, 5, 20, 60, 150, g.n_edges]
    before = model.hook_snapshot()
    calls = [0]
    first_layer = model.hf_model.model.layers[0]
    handle = first_layer.register_forward_pre_hook(lambda m, a: calls.__setitem__(0, calls[0] + 1))
    try:
        curve = faithfulness_curve(model, data, scores, sizes=sizes, seed=3)
        curve_calls, calls[0] = calls[0], 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DisconnectedCircuitWarning)
            evaluate_circuit(model, data, curve.circuits[1])
    finally:
        handle.remove()
    assert model.hook_snapshot() == before
    # 12 circuits cost layer 0 no more calls than one: per pair its prefix and suffix runs,
    # the q/k/v pass, the attention pass and the staircase's call
    assert curve_calls == calls[0] == 2 * 5
    assert curve.sizes == sizes and curve.fractions == [k / g.n_edges for k in sizes]
    assert curve.random_circuits is not None and curve.random_faithfulness is not None
    alone = []
    for k, circuit, random in zip(sizes, curve.circuits, curve.random_circuits):
        assert torch.equal(circuit.mask, scores.circuit(k).mask)
        assert random.n_edges <= k
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DisconnectedCircuitWarning)
            alone += [evaluate_circuit(model, data, c).faithfulness for c in (circuit, random)]
    rows = torch.stack([curve.faithfulness, curve.random_faithfulness], 1).flatten()
    assert_matches_reference(rows, torch.tensor(alone), 0.0, rtol=CURVE_RTOL, min_cells=4,
                             what="curve rows vs evaluate_circuit")
    f = curve.faithfulness.double().tolist()
    x = curve.fractions
    cpr = sum((x[i + 1] - x[i]) * (f[i] + f[i + 1]) / 2 for i in range(len(x) - 1))
    cmd = sum((x[i + 1] - x[i]) * (abs(1 - f[i]) + abs(1 - f[i + 1])) / 2
              for i in range(len(x) - 1))
    assert curve.cpr == pytest.approx(cpr, abs=1e-6) and curve.cmd == pytest.approx(cmd, abs=1e-6)
    assert f[0] == pytest.approx(0.0, abs=1e-3) and f[-1] == pytest.approx(1.0, abs=1e-3)
    # seeded: the same baseline again, another seed another baseline
    again = faithfulness_curve(model, data, scores, sizes=sizes, seed=3)
    assert all(torch.equal(a.mask, b.mask)
               for a, b in zip(again.random_circuits, curve.random_circuits))
    table = curve.to_pandas()
    assert list(table["size"]) == sizes and len(curve.to_dict()["faithfulness"]) == len(sizes)


def test_faithfulness_curve_greedy_and_default_sizes(one_thread):
    """``greedy=True`` evaluates the result's greedy circuits; the default sizes are MIB's
    fractions of the edges; fractions given as floats become edge counts."""
    model = tiny_model("gpt2")
    scores = edge_attribution(model, CLEAN, CORRUPTED, correct=CORRECT, incorrect=INCORRECT)
    n = scores.graph.n_edges
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DisconnectedCircuitWarning)
        greedy = faithfulness_curve(model, CLEAN, scores, sizes=[0, 10, 40], greedy=True,
                                    random_baseline=False, **KW)
        default = faithfulness_curve(model, CLEAN, scores, random_baseline=False, **KW)
        fractions = faithfulness_curve(model, CLEAN, scores.scores, sizes=[0.0, 0.25, 1.0],
                                       random_baseline=False, **KW)
    assert all(torch.equal(c.mask, scores.circuit(k, greedy=True).mask)
               for k, c in zip([0, 10, 40], greedy.circuits))
    assert greedy.random_faithfulness is None and greedy.random_cpr is None
    assert "random_cpr" not in greedy.to_dict()
    mib = (0.0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
    assert default.sizes == sorted({round(f * n) for f in mib})
    assert fractions.sizes == [0, round(0.25 * n), n]
    assert fractions.faithfulness[-1] == pytest.approx(1.0, abs=1e-3)


def test_curve_checkpoint_and_progress(tmp_path, one_thread):
    """The shared run options: a checkpointed curve, rerun from its file, gives the same rows
    without a forward pass; another circuit set is not read from that file; a progress
    callback sees every circuit of every pair."""
    model = tiny_model("llama")
    data = TextPairs.of(IOI_PAIRS[:2])
    scores = torch.linspace(0, 1, EdgeGraph.of(model).n_edges)
    path = tmp_path / "curve.ckpt"
    seen: list[tuple[int, int]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DisconnectedCircuitWarning)
        first = faithfulness_curve(model, data, scores, sizes=[0, 50, 200], checkpoint=str(path),
                                   progress=lambda done, total: seen.append((done, total)))
        assert seen[-1] == (2 * 6, 2 * 6)
        counter = ForwardCounter(model)
        try:
            again = faithfulness_curve(model, data, scores, sizes=[0, 50, 200],
                                       checkpoint=str(path))
            assert counter.n == 0
        finally:
            counter.handle.remove()
        assert torch.equal(again.faithfulness, first.faithfulness)
        with pytest.raises(CheckpointMismatchError, match="different sweep"):
            faithfulness_curve(model, data, scores, sizes=[0, 60, 200], checkpoint=str(path))


# -- bad input -------------------------------------------------------------------------------------
def _bad_calls(model, g: EdgeGraph):
    other = Circuit.full(EdgeGraph(2, 4, 2))
    scores = torch.ones(g.n_edges)
    return [
        ("circuit-type", lambda: evaluate_circuit(model, CLEAN, [("input", "logits")], **KW),
         InvalidTypeError, "must be a causalpatch Circuit"),
        ("circuit-graph", lambda: evaluate_circuit(model, CLEAN, other, **KW),
         InvalidArgumentError, "is not this model's"),
        ("empty-data", lambda: evaluate_circuit(model, TextPairs([], [], [], []),
                                                Circuit.full(g)), InvalidArgumentError,
         "no pairs"),
        ("lengths", lambda: evaluate_circuit(model, CLEAN, Circuit.full(g), corrupted="When",
                                             correct=CORRECT, incorrect=INCORRECT),
         InvalidArgumentError, r"same number of tokens|length"),
        ("batch_size", lambda: evaluate_circuit(model, CLEAN, Circuit.full(g), batch_size=0,
                                                **KW), InvalidArgumentError, "batch_size"),
        ("sizes-range", lambda: faithfulness_curve(model, CLEAN, scores,
                                                   sizes=[0, g.n_edges + 1], **KW),
         InvalidArgumentError, rf"edge counts in \[0, {g.n_edges}\]"),
        ("sizes-fraction", lambda: faithfulness_curve(model, CLEAN, scores, sizes=[0.0, 1.5],
                                                      **KW), InvalidArgumentError, r"\[0, 1\]"),
        ("sizes-order", lambda: faithfulness_curve(model, CLEAN, scores, sizes=[10, 5], **KW),
         InvalidArgumentError, "strictly increasing"),
        ("sizes-one", lambda: faithfulness_curve(model, CLEAN, scores, sizes=[10], **KW),
         InvalidArgumentError, "at least 2"),
        ("sizes-mixed", lambda: faithfulness_curve(model, CLEAN, scores, sizes=[0, 0.5], **KW),
         InvalidTypeError, "all ints"),
        ("scores-shape", lambda: faithfulness_curve(model, CLEAN, torch.ones(7), **KW),
         InvalidArgumentError, "one value per edge"),
        ("scores-type", lambda: faithfulness_curve(model, CLEAN, [1.0, 2.0], **KW),
         InvalidTypeError, "EdgeResult"),
        ("scores-nan", lambda: faithfulness_curve(
            model, CLEAN, torch.where(torch.arange(g.n_edges) < 10, 1.0, float("nan")),
            sizes=[0, 20], **KW), InvalidArgumentError, "only 10 edges are scored"),
        ("curve-empty-data", lambda: faithfulness_curve(model, TextPairs([], [], [], []),
                                                        scores), InvalidArgumentError,
         "no pairs"),
    ]


def test_bad_input_is_refused_before_any_forward():
    model = tiny_model("llama")
    g = EdgeGraph.of(model)
    counter = ForwardCounter(model)
    before = model.hook_snapshot()
    try:
        for name, call, error, fragment in _bad_calls(model, g):
            with pytest.raises(error, match=fragment):
                call()
            assert counter.n == 0, name
            assert model.hook_snapshot() == before, name
    finally:
        counter.handle.remove()
    gemma = tiny_model("gemma2")
    graph = EdgeGraph(3, 4, 2)
    with pytest.raises(UnsupportedArchitectureError, match="post-attention norm"):
        evaluate_circuit(gemma, CLEAN, Circuit.full(graph), **KW)
    with pytest.raises(UnsupportedArchitectureError, match="post-attention norm"):
        faithfulness_curve(gemma, CLEAN, torch.ones(graph.n_edges), **KW)


# -- SmolLM2 ---------------------------------------------------------------------------------------
@pytest.mark.real
def test_smollm2_ioi_circuit(smollm2):
    """The real model on 2 IOI pairs: the full graph is faithful, the top EAP-IG edges give a
    circuit far more faithful than random circuits of the same size."""
    assert isinstance(smollm2, InterpretableModel)
    from causalpatch.datasets import IOIDataset

    data = IOIDataset(smollm2, n=2, seed=0)
    before = smollm2.hook_snapshot()
    scores = edge_attribution(smollm2, data, method="eap_ig", ig_steps=3, progress=False)
    g = scores.graph
    curve = faithfulness_curve(smollm2, data, scores, sizes=[0, 200, 1000, g.n_edges],
                               progress=False)
    assert smollm2.hook_snapshot() == before
    assert curve.faithfulness[-1] == pytest.approx(1.0, abs=1e-3)
    assert curve.faithfulness[0] == pytest.approx(0.0, abs=1e-3)
    assert curve.random_faithfulness is not None
    assert float(curve.faithfulness[2]) > float(curve.random_faithfulness[2]) + 0.2

"""The seeds' documented API (issue 12): their own snippets, adapted only in the import lines.

The snippets are vendored in ``tests/data/snippets`` (one file each; the mlxterp
activation-patching and causal-patching guides, and the TransformerLens framework's
``PatchingDataset`` pattern); ``tests/package/test_seed_snippets.py`` checks that each occurs in
its source document (whitespace ignored: one document lost its indentation) when the documents
are present, and the recorded SHA-256 of each vendored file otherwise. :func:`adapt` rewrites
only the import lines (:data:`IMPORTS`): ``mlxterp`` -> ``causalpatch``; ``mlx.core`` -> a few
torch functions under the same names; ``mlx_lm.load`` and
``InterpretableModel("mlx-community/...")`` -> the test model.

The test model is a seeded 12-layer tiny LLaMA with a word-level tokenizer in which the seeds'
prompt pairs have equal token lengths, as they have on SmolLM2 (" Eiffel" is two tokens and
" Colosseum" three). One ``real`` test runs the main snippets on SmolLM2 itself.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import transformers
from tokenizers import Regex, Tokenizer, models, pre_tokenizers

import causalpatch
import causalpatch.interventions as iv
from causalpatch import InterpretableModel, activation_patching
from causalpatch.datasets import PatchingDataset, as_patching_dataset
from causalpatch.errors import InvalidArgumentError
from conftest import (VOCAB_SIZE, _common, assert_matches_reference, assert_within, load_snippet,
                      tiny_model)

pytestmark = pytest.mark.usefixtures("one_thread")

# -- the documents' snippets, vendored in tests/data/snippets (checked against their sources
# and hashes by tests/package/test_seed_snippets.py) -------------------------------------
ACT_HELPER = load_snippet("act_helper")
ACT_QUICK = load_snippet("act_quick")
ACT_LOOP = load_snippet("act_loop")
ACT_ANALYSE = load_snippet("act_analyse")
ACT_CLOSURE = load_snippet("act_closure")
ACT_COSINE = load_snippet("act_cosine")
ACT_MSE = load_snippet("act_mse")
ACT_SELECTIVE = load_snippet("act_selective")
CAUSAL_QUICK = load_snippet("causal_quick")
CAUSAL_COMPLETE = load_snippet("causal_complete")
CAUSAL_POSITIONS = load_snippet("causal_positions")
CAUSAL_TRACE = load_snippet("causal_trace")
CAUSAL_LOGIT_DIFF = load_snippet("causal_logit_diff")
CAUSAL_RESULTS = load_snippet("causal_results")
DATASET = load_snippet("dataset")

#: The only rewrites: import lines.
IMPORTS = {
    "import mlx.core as mx": "mx = SHIM_MX",
    "from mlx_lm import load": "load = SHIM_LOAD",
    "from mlxterp import InterpretableModel": "InterpretableModel = SHIM_MODEL",
    "from mlxterp import InterpretableModel, interventions as iv":
        "InterpretableModel = SHIM_MODEL; from causalpatch import interventions as iv",
    "from mlxterp.causal import activation_patching": "from causalpatch import activation_patching",
    "from mlxterp.metrics import logit_diff": "from causalpatch.metrics import logit_diff",
    "from activation_patching import PatchingDataset":
        "from causalpatch.datasets import PatchingDataset",
}

SHIM_MX = SimpleNamespace(eval=lambda *arrays: None, sqrt=torch.sqrt, sum=torch.sum,
                          mean=torch.mean)


def adapt(snippet: str) -> str:
    lines = snippet.strip("\n").split("\n")
    return "\n".join(IMPORTS.get(line.strip(), line) for line in lines) + "\n"


def run(snippet: str, model: InterpretableModel, namespace: dict[str, Any] | None = None
        ) -> dict[str, Any]:
    """Execute an adapted snippet with the shims bound to ``model``; returns its namespace."""
    def seed_model(name_or_model: Any, tokenizer: Any = None) -> InterpretableModel:
        if isinstance(name_or_model, str):
            return model
        return causalpatch.InterpretableModel(name_or_model, tokenizer=tokenizer)

    ns = namespace if namespace is not None else {}
    ns.update(SHIM_MX=SHIM_MX, SHIM_LOAD=lambda name: (model.hf_model, model.tokenizer),
              SHIM_MODEL=seed_model)
    ns.setdefault("model", model)
    exec(compile(adapt(snippet), "<seed snippet>", "exec"), ns)
    return ns


# -- tolerances (relative to the largest effect; conftest.assert_matches_reference) -------
#: helper vs the snippet's own loop: observed 1.2e-6 (the same patched runs; l2 distances of
#: [1, 6, vocab] logits summed in a different order)
RTOL_HELPER_LOOP = 1e-5
#: the task's metric (reads all logits) vs logit_diff (unembeds only the answer columns), and
#: causal_trace vs the sweep: observed 5.4e-7 and 3.8e-7 (float32 matmul shapes)
RTOL_TASK_METRIC = 5e-6
#: causal_trace noising vs the sweep: observed 6.8e-5 (2.6e-6 absolute on an effect of 0.038:
#: the normalisation divides a float32 difference by a small gap)
RTOL_NOISE_TRACE = 5e-4
#: SmolLM2, helper vs the snippet at layer 10: observed 8.7e-7 (2.3e-5 of a 26% recovery)
RTOL_SMOLLM2_HELPER = 5e-6


# -- the test model ----------------------------------------------------------------------------
def word_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """One token per word of the snippets' prompts (" Eiffel" as E + iffel, " Colosseum" as
    Col + osse + um, as on SmolLM2); any other word is ``<unk>``."""
    pattern = r"Col|osse|um|E|iffel|\w+|[^\w\s]+"
    split = pre_tokenizers.Split(Regex(pattern), behavior="removed", invert=True)
    prompts = ("Paris is the capital of France", "London", "The Eiffel Tower is in Paris",
               "The Colosseum is in Rome", "The cat sat on the mat", "The dog", "...")
    words = sorted({w for s in prompts for w, _ in split.pre_tokenize_str(s)})
    specials = ["<pad>", "<unk>", "<bos>", "<eos>"]
    vocab = {w: i for i, w in enumerate(specials + words)}
    assert len(vocab) <= VOCAB_SIZE
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = split
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
        eos_token="<eos>")


@pytest.fixture(scope="module")
def model12() -> Iterator[InterpretableModel]:
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**_common(num_hidden_layers=12)))
    lm = InterpretableModel(hf.eval(), tokenizer=word_tokenizer())
    yield lm
    assert lm.hook_snapshot() == {}


@pytest.fixture
def lm() -> InterpretableModel:
    """The conftest tiny LLaMA (3 layers, the shared character tokenizer)."""
    return tiny_model("llama")


CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"


# -- mlxterp activation patching guide -------------------------------------------------------
def test_trace_quick_example_and_layer_loop(model12):
    ns = run(ACT_QUICK, model12)
    clean_mlp = ns["clean_mlp"]
    _, cache = model12.run_with_cache("Paris is the capital of France", names=["blocks.10.mlp"])
    assert torch.equal(clean_mlp, cache["blocks.10.mlp"])
    assert type(ns["clean_output"]) is torch.Tensor and ns["clean_output"].shape[:2] == (1, 6)
    assert 0 < ns["baseline"] and torch.isfinite(torch.tensor(ns["recovery"]))
    layer10 = ns["recovery"]
    run(ACT_LOOP, model12, ns)
    run(ACT_ANALYSE, model12, ns)
    assert sorted(ns["results"]) == list(range(12))
    # the helper computes exactly the seeds' recovery
    helper = model12.activation_patching("Paris is the capital of France",
                                         "London is the capital of France", component="mlp")
    # percent recovery; 0 is the unpatched run
    assert_matches_reference([helper[k] for k in range(12)],
                             [ns["results"][k] for k in range(12)], 0.0, rtol=RTOL_HELPER_LOOP,
                             min_cells=6, what="helper vs the snippet's loop (l2 recovery)")
    # observed bitwise 0: the loop's layer 10 is the quick example's computation on the same
    # inputs, so nothing can round differently
    assert_within(ns["results"][10], layer10, 0.0, "layer 10: loop vs quick example")


def test_closure_pitfall_snippet_runs(model12):
    ns = run(ACT_CLOSURE, model12, {"num_layers": 3, "clean_text": "Paris is the capital of France",
                                    "corrupted_text": "London is the capital of France"})
    with model12.trace("Paris is the capital of France", cache=["blocks.2.resid_post"]) as tr:
        pass
    assert torch.equal(ns["clean_act"], tr.cache["blocks.2.resid_post"])


def test_helper_quick_start_keeps_the_figure(model12):
    from matplotlib.figure import Figure

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "non-interactive backend" warning in a script
        ns = run(ACT_HELPER, model12)
    results = ns["results"]
    assert isinstance(results, dict) and sorted(results) == list(range(12))
    assert isinstance(results.figure, Figure)
    assert results.result.metric == "l2" and results.result.component == "mlp"


@pytest.mark.parametrize("snippet,metric", [(ACT_COSINE, "cosine"), (ACT_MSE, "mse")])
def test_helper_metrics(model12, snippet, metric):
    results = run(snippet, model12)["results"]
    assert results.result.metric == metric and len(results) == 12
    assert results.figure is None


def test_selective_patch_snippet_needs_clone_for_copy(model12):
    """mlx arrays have ``.copy()``, torch tensors ``.clone()``: the snippet stops there (listed
    in docs/porting.md); with that one word changed it patches the last position."""
    names = {"clean_text": "Paris is the capital of France",
             "corrupted_text": "London is the capital of France"}
    with pytest.raises(AttributeError, match="copy"):
        run(ACT_SELECTIVE, model12, dict(names))
    ns = run(ACT_SELECTIVE.replace(".copy()", ".clone()"), model12, dict(names))
    last = ns["clean_mlp"][:, -1:]
    with model12.trace(names["corrupted_text"], interventions={
            "blocks.10.mlp": lambda act: torch.cat([act[:, :-1], last], dim=1)}) as ref:
        pass
    torch.testing.assert_close(ns["patched_output"], ref.logits, rtol=0, atol=0)


# -- mlxterp causal patching guide -----------------------------------------------------------
def test_causal_guide_snippets(model12):
    ns = run(CAUSAL_QUICK, model12)
    assert ns["result"].effect_matrix.shape == (12,)
    ns = run(CAUSAL_COMPLETE, model12)
    assert ns["head_result"].effect_matrix.shape == (3, model12.n_heads)
    run(CAUSAL_POSITIONS, model12, ns)
    assert ns["result"].metric == "l2"  # no answers: the default without answers
    run(CAUSAL_TRACE, model12, ns)
    with model12.causal_trace(ns["clean"], ns["corrupted"]) as ct:
        for name in ("blocks.5.mlp", "blocks.6.mlp", "blocks.7.mlp", "blocks.9.attn"):
            ct.patch(name)
        # the default is l2 here too; observed bitwise 0 (the snippet made the same patches
        # with the same API on the same prompts)
        assert_within(ct.metric(), ns["effect"], 0.0, "causal_trace metric vs the snippet's")
    run(CAUSAL_LOGIT_DIFF, model12, ns)
    assert ns["result"].metric == "logit_diff"
    run(CAUSAL_RESULTS, model12, ns)
    assert isinstance(ns["json_data"], str)


# -- the TransformerLens framework's PatchingDataset subclass ---------------------------------
def test_patching_dataset_subclass_pattern(model12):
    MyTask = run(DATASET, model12)["MyTask"]
    task = MyTask(model12)
    assert len(task) == 1 and task.name == "My Custom Task"
    cat, dog = model12.to_single_token(" cat"), model12.to_single_token(" dog")
    assert (task.correct, task.incorrect) == ([cat], [dog])
    expected = activation_patching(model12, "The cat sat on the mat", "The dog sat on the mat",
                                   component="mlp", correct=" cat", incorrect=" dog")
    got = activation_patching(model12, task, component="mlp")
    assert got.metric == "MyTask.compute_metric"
    # float32: logit_diff unembeds only the answer columns, the task's metric reads all logits
    assert_matches_reference(got.effect_matrix, expected.effect_matrix, 0.0,
                             rtol=RTOL_TASK_METRIC, min_cells=6, what="task metric vs logit_diff")
    helper = model12.activation_patching(task, component="mlp")
    assert_matches_reference([helper[k] / 100 for k in range(12)], expected.effect_matrix, 0.0,
                             rtol=RTOL_TASK_METRIC, min_cells=6, what="helper (percent) vs sweep")
    with model12.causal_trace(task) as ct:
        ct.patch("layers.3.mlp")
        effect = ct.metric()
    assert_matches_reference([effect], expected.effect_matrix[3:4], 0.0, rtol=RTOL_TASK_METRIC,
                             min_cells=1, what="causal_trace vs sweep, layer 3")


def test_seed_protocol_objects_of_other_classes_are_converted(model12):
    class Elsewhere:  # e.g. a subclass of another library's PatchingDataset
        def get_clean_corrupt_pairs(self):
            return [("The cat sat on the mat", "The dog sat on the mat")]

        def get_target_tokens(self, pair_idx):
            return (" cat", " dog")

    data = as_patching_dataset(Elsewhere(), model12)
    assert isinstance(data, PatchingDataset) and data.metric == "logit_diff"
    assert data.correct == [model12.to_single_token(" cat")]
    assert model12.causal_trace(Elsewhere()).pairs[0].correct == data.correct[0]
    assert as_patching_dataset("a prompt") == "a prompt"


def test_seed_subclass_without_pairs_says_so(model12):
    class Empty(PatchingDataset):
        def __init__(self):
            pass

        def get_clean_corrupt_pairs(self):
            return []

    with pytest.raises(InvalidArgumentError, match="get_clean_corrupt_pairs"):
        activation_patching(model12, Empty(), component="mlp")


def test_every_dataset_has_the_seed_methods(lm):
    data = PatchingDataset.from_pairs(lm, [(CLEAN, CORRUPTED, " Mary", " John")])
    assert data.get_clean_corrupt_pairs() == [(CLEAN, CORRUPTED)]
    assert data.get_target_tokens(0) == (lm.to_single_token(" Mary"), lm.to_single_token(" John"))
    logits = lm.trace(CLEAN).run().logits
    mary, john = data.get_target_tokens(0)
    # observed bitwise 0: the same float32 subtraction
    assert_within(data.compute_metric(logits, 0),
                  float(logits[0, -1, mary] - logits[0, -1, john]), 0.0, "compute_metric")


# -- names: requested spellings come back; canonical ones work too ---------------------------
def test_cache_is_keyed_by_the_requested_names(lm):
    with lm.trace(CLEAN, cache=["layers.1.mlp", "blocks.2.hook_attn_out"]) as tr:
        assert list(tr.activations) == ["layers.1.mlp", "blocks.2.hook_attn_out"]
        for spelling in ("blocks.1.mlp", "model.model.layers.1.mlp", "blocks.1.hook_mlp_out"):
            assert spelling in tr.activations
            assert tr.activations[spelling] is tr.activations["layers.1.mlp"]
        assert tr.activations.get("blocks.2.attn") is tr.cache["blocks.2.hook_attn_out"]
        assert "blocks.0.mlp" not in tr.activations and tr.cache.get("blocks.0.mlp") is None
    _, cache = lm.run_with_cache(CLEAN, names=["blocks.1.hook_attn_out", "blocks.1.attn"])
    assert list(cache) == ["blocks.1.hook_attn_out", "blocks.1.attn"]
    assert cache["blocks.1.attn"] is cache["blocks.1.hook_attn_out"]  # one hook, one tensor


def test_uncached_values_are_computed_by_one_more_forward(lm):
    calls = []
    handle = lm.hf_model.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        noisy = lambda x: x + torch.randn_like(x)  # noqa: E731  random: replayed exactly
        torch.manual_seed(1)
        with lm.trace(CLEAN, interventions={"blocks.0.mlp": noisy},
                      cache=["blocks.2.resid_post"]) as ref:
            pass
        calls.clear()
        torch.manual_seed(1)
        with lm.trace(CLEAN, interventions={"blocks.0.mlp": noisy}) as tr:
            assert len(calls) == 1
            got = tr.activations["model.model.layers.2"]
            assert torch.equal(got, ref.cache["blocks.2.resid_post"])
            tr.activations["blocks.1.attn.z"], lm.layers[0].mlp.output  # no more forwards
            assert len(calls) == 2
        assert list(tr.activations) == ["model.model.layers.2", "blocks.1.attn.z",
                                        "layers.0.mlp"]
        assert torch.equal(tr.logits, ref.logits)
    finally:
        handle.remove()
    with pytest.raises(KeyError, match="nonsense"):
        tr.activations["nonsense"]


def test_model_output_and_layers_inside_a_trace(lm):
    assert len(lm.layers) == lm.n_layers == 3
    names = ["blocks.1.resid_post", "blocks.1.resid_pre", "blocks.1.mlp", "blocks.1.attn",
             "blocks.1.mlp.post", "blocks.1.attn.z"]
    _, cache = lm.run_with_cache(CLEAN, names=names)
    with lm.trace(CLEAN) as tr:
        out = lm.output.save()
        assert type(out) is torch.Tensor and torch.equal(out, tr.logits)
        assert torch.equal(tr.output.save(), tr.logits)
        layer = lm.layers[1]
        assert torch.equal(layer.output.save(), cache["blocks.1.resid_post"])
        assert torch.equal(lm.layers[-2].input.save(), cache["blocks.1.resid_pre"])
        assert torch.equal(layer.mlp.output.save(), cache["blocks.1.mlp"])
        assert torch.equal(layer.self_attn.output.save(), cache["blocks.1.attn"])
        assert torch.equal(layer.attn.z.output.save(), cache["blocks.1.attn.z"])
        # raw module paths are module outputs; canonical mlp.post / attn.z are their inputs
        assert torch.equal(layer.mlp.down_proj.output.save(), cache["blocks.1.mlp"])
        assert torch.equal(layer.mlp.down_proj.input.save(), cache["blocks.1.mlp.post"])
        assert torch.equal(layer.self_attn.o_proj.input.save(),
                           cache["blocks.1.attn.z"].flatten(-2))
        assert torch.equal(layer.self_attn.o_proj.output.save(), cache["blocks.1.attn"])
    with pytest.raises(InvalidArgumentError, match="inside `with model.trace"):
        lm.output
    with pytest.raises(InvalidArgumentError, match="inside `with model.trace"):
        lm.layers[0].output
    with pytest.raises(IndexError):
        lm.layers[3]
    with pytest.raises(AttributeError, match="names no component"):
        lm.layers[0].nonsense


def test_input_names_resolve_to_canonical_sites(lm):
    assert lm.site("layers.1.input").name == "blocks.1.resid_pre"
    assert lm.site("layers.1.mlp.down_proj.input").name == "blocks.1.mlp.post"
    assert lm.site("layers.1.mlp.down_proj").hook == "output"
    o_proj_in = lm.site("layers.1.self_attn.o_proj.input")
    assert o_proj_in.hook == "input" and not o_proj_in.per_head


# -- one default metric rule; noising; figures -------------------------------------------------
def test_one_default_metric_everywhere(lm):
    for answers, expected in (({}, "l2"), ({"correct": " Mary", "incorrect": " John"},
                                           "logit_diff")):
        assert activation_patching(lm, CLEAN, CORRUPTED, component="mlp",
                                   **answers).metric == expected
        assert lm.activation_patching(CLEAN, CORRUPTED, **answers).result.metric == expected
        with lm.causal_trace(CLEAN, CORRUPTED) as ct:
            ct.patch("blocks.1.mlp")
            assert ct.result(**answers).metric == expected
    data = PatchingDataset.from_pairs(lm, [(CLEAN, CORRUPTED, " Mary", " John")], metric="prob")
    assert activation_patching(lm, data, component="mlp").metric == "prob"
    assert lm.activation_patching(data).result.metric == "prob"
    with lm.causal_trace(data) as ct:
        ct.patch("blocks.1.mlp")
        assert ct.result().metric == "prob"


def test_causal_trace_noising_equals_the_sweep(lm):
    sweep = activation_patching(lm, CLEAN, CORRUPTED, component="mlp", direction="noise",
                                correct=" Mary", incorrect=" John")
    with lm.causal_trace(CLEAN, CORRUPTED, direction="noise") as ct:
        ct.patch("layers.1.mlp")
        effect = ct.metric(correct_token=" Mary", incorrect_token=" John")
    assert_matches_reference([effect], sweep.effect_matrix[1:2], 0.0, rtol=RTOL_NOISE_TRACE,
                             min_cells=1, what="causal_trace noising vs the sweep")


def test_plot_is_displayed_in_a_notebook(lm, monkeypatch):
    import sys
    import types

    shown: list[Any] = []
    fake = types.ModuleType("IPython")
    fake.get_ipython = lambda: SimpleNamespace(kernel=object())  # a Jupyter kernel's shell
    display = types.ModuleType("IPython.display")
    display.display = shown.append
    fake.display = display
    monkeypatch.setitem(sys.modules, "IPython", fake)
    monkeypatch.setitem(sys.modules, "IPython.display", display)
    results = lm.activation_patching(CLEAN, CORRUPTED, plot=True)
    assert shown == [results.figure]


# -- the real model ------------------------------------------------------------------------------
@pytest.mark.real
def test_seed_snippets_on_smollm2(smollm2):
    ns = run(ACT_QUICK, smollm2)
    assert ns["clean_output"].shape == (1, 6, smollm2.vocab_size)
    helper = smollm2.activation_patching("Paris is the capital of France",
                                         "London is the capital of France", component="mlp",
                                         layers=[10])
    assert_matches_reference([helper[10]], [ns["recovery"]], 0.0, rtol=RTOL_SMOLLM2_HELPER,
                             min_cells=1, what="SmolLM2 helper vs the snippet, layer 10")
    ns = run(CAUSAL_COMPLETE, smollm2)
    run(CAUSAL_TRACE, smollm2, ns)
    run(CAUSAL_LOGIT_DIFF, smollm2, ns)
    assert ns["result"].metric == "logit_diff"
    task = run(DATASET, smollm2)["MyTask"](smollm2)
    assert activation_patching(smollm2, task, component="mlp",
                               layers=[0]).effect_matrix.shape == (1,)

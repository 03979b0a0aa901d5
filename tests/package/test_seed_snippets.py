"""The code of the book chapter, the nnsight recipe and the TransformerLens framework (issue 26),
run with only the model name and the imports swapped, each checked against causalpatch.

The snippets are vendored in ``tests/data/snippets`` (one file each) with a manifest of SHA-256
hashes (issue 27): :func:`test_vendored_snippets_are_the_documents_own` checks that each occurs
in its source document (whitespace ignored) when the documents are present beside the
repository, and the recorded hash of every vendored file always, so the suite runs on a clean
clone. :func:`adapt` rewrites only import lines (:data:`IMPORTS`) and the model loading:
``LanguageModel("openai-community/gpt2", ...)`` becomes a seeded 3-layer GPT-2 (the recipe
reads its sizes from the model), ``HookedTransformer.from_pretrained("gpt2-small")`` one of
GPT-2 small's shape (12 layers x 12 heads, which the framework's snippets write out; both
``n_embd`` 48), each with a word-level tokenizer covering the IOI templates, so
``model.transformer.h`` exists and every name is one token. The framework's ``IOIDataset``
import becomes causalpatch's with ``n=8`` pairs (the framework's has 5; ours defaults to 32),
to keep the suite fast.

Each snippet's numbers are compared with the equivalent causalpatch call through
``conftest.assert_matches_reference`` (pinned tolerances below), or for the framework's
results, with an independent reference written with ``run_with_hooks`` (one forward per hook
point over the batch of pairs, the metric computed here by hand). Snippets that cannot run are
in :data:`NOT_RUN`, each with the reason ``docs/porting.md`` gives.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import transformers
from tokenizers import Regex, Tokenizer, models, pre_tokenizers

import causalpatch
from causalpatch import InterpretableModel, PatchingResult, activation_patching
from causalpatch.datasets import IOI_NAMES, IOI_OBJECTS, IOI_PLACES, IOI_TEMPLATES
from causalpatch.errors import InvalidArgumentError, UnknownComponentError
from conftest import (
    REPO_ROOT,
    SNIPPETS_DIR,
    SOURCE_DOCS,
    assert_matches_reference,
    load_snippet,
)

pytestmark = pytest.mark.usefixtures("one_thread")

#: Snippets that cannot run, and the words of docs/porting.md that say why.
NOT_RUN = {
    "nnsight_visualization": "seaborn",
    "book_patch_and_measure": "pseudocode",
    "act_selective": ".copy()",
}

#: The only rewrites: import lines.
IMPORTS = {
    "from nnsight import LanguageModel": "LanguageModel = SHIM_MODEL",
    "from transformer_lens import HookedTransformer": "HookedTransformer = SHIM_TL",
    "from activation_patching import ActivationPatcher, IOIDataset":
        "from causalpatch import ActivationPatcher; IOIDataset = SHIM_IOI",
    "from activation_patching import summarize_results":
        "from causalpatch import summarize_results",
    "from head_patching import HeadPatcher, print_head_results":
        "from causalpatch import HeadPatcher, print_head_results",
    "from visualize import create_head_heatmap, create_full_report":
        "from causalpatch import create_head_heatmap, create_full_report",
}

# -- tolerances (relative to the largest effect; conftest.assert_matches_reference) ------------
#: the nnsight recipe's loops vs the fast engine (one patched forward each vs the staircase):
#: observed 5.1e-6 (layers), 1.3e-5 (layer x position), 5.0e-6 (layer x head), 0 (noising),
#: 3.5e-6 (the baselines' logit differences);
#: float32 summation order of differently shaped batches
RTOL_RECIPE = 3e-5
#: the framework's results vs the run_with_hooks reference, which runs the IOI pairs as one
#: right-padded batch: observed 1.3e-5 (layers) and 5.3e-6 (sampled heads); padded attention
#: and batch shapes round differently in float32
RTOL_FRAMEWORK = 1e-4
#: hook points of mixed kinds (one CausalTrace cell each) vs per-kind sweeps on 4 pairs:
#: observed 7.7e-5 (5.7e-4 absolute on normalised effects up to 7.4: the 4 pairs' mean
#: clean-corrupted gap is small, so float32 differences of the raw metric are amplified)
RTOL_MIXED = 5e-4


#: Pairs of the framework's IOI dataset.
N_PAIRS = 8


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


def adapt(snippet: str) -> str:
    return "\n".join(IMPORTS.get(line.strip(), line) for line in snippet.split("\n")) + "\n"


def run(name: str, model: InterpretableModel, ns: dict[str, Any] | None = None
        ) -> dict[str, Any]:
    """Execute vendored snippet ``name`` (imports adapted) in ``ns``; returns the namespace."""
    ns = {} if ns is None else ns
    ns.update(SHIM_MODEL=lambda *args, **kwargs: model,
              SHIM_TL=SimpleNamespace(from_pretrained=lambda *args, **kwargs: model),
              SHIM_IOI=lambda m: causalpatch.datasets.IOIDataset(m, n=N_PAIRS))
    exec(compile(adapt(load_snippet(name)), f"<snippet {name}>", "exec"), ns)
    return ns


# -- the vendored texts ------------------------------------------------------------------------
def test_vendored_snippets_are_the_documents_own():
    manifest = json.loads((SNIPPETS_DIR / "manifest.json").read_text())
    files = sorted(p.name for p in SNIPPETS_DIR.glob("*.txt"))
    assert files == sorted(manifest["snippets"]), "every vendored file is in the manifest"
    for name, entry in manifest["snippets"].items():
        got = hashlib.sha256((SNIPPETS_DIR / name).read_bytes()).hexdigest()
        assert got == entry["sha256"], f"{name} changed since it was vendored"
        assert entry["document"] in manifest["documents"]
    if SOURCE_DOCS.is_dir():  # beside the repository: the texts are the documents' own
        for doc, digest in manifest["documents"].items():
            assert hashlib.sha256((SOURCE_DOCS / doc).read_bytes()).hexdigest() == digest, doc
        for name, entry in manifest["snippets"].items():
            text = (SOURCE_DOCS / entry["document"]).read_text(errors="replace")
            assert _squash((SNIPPETS_DIR / name).read_text()) in _squash(text), \
                f"{name} is not verbatim from {entry['document']}"


def test_every_snippet_runs_or_is_listed_in_the_porting_guide():
    here = (REPO_ROOT / "tests" / "package" / "test_seed_snippets.py").read_text()
    api = (REPO_ROOT / "tests" / "package" / "test_seed_api.py").read_text()
    porting = (REPO_ROOT / "docs" / "porting.md").read_text()
    for path in SNIPPETS_DIR.glob("*.txt"):
        name = path.stem
        assert f'"{name}"' in here + api, f"{name} is run by no test"
        if name in NOT_RUN:
            assert NOT_RUN[name] in porting, f"docs/porting.md does not say why {name} fails"


# -- the test model ----------------------------------------------------------------------------
def _words() -> list[str]:
    split = pre_tokenizers.Split(Regex(r"\w+|[^\w\s]+"), behavior="removed", invert=True)
    texts = [*IOI_TEMPLATES, *IOI_NAMES, *IOI_PLACES, *IOI_OBJECTS,
             "After John and Mary went to the store, Mary gave a bottle of milk to"]
    return sorted({w for t in texts for w, _ in split.pre_tokenize_str(t)})


def word_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """One token per word or punctuation mark of the IOI templates, names, places and objects
    and of the recipe's prompts (``" John"`` -> ``John``)."""
    specials = ["<pad>", "<unk>", "<bos>", "<eos>"]
    vocab = {w: i for i, w in enumerate(specials + _words())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|[^\w\s]+"), behavior="removed",
                                             invert=True)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
        eos_token="<eos>")


def word_gpt2(n_layers: int, n_heads: int) -> InterpretableModel:
    """A seeded GPT-2 (``n_embd`` 48) with :func:`word_tokenizer`."""
    tok = word_tokenizer()
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=len(tok), n_embd=48, n_layer=n_layers, n_head=n_heads, n_positions=64,
        initializer_range=0.1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        pad_token_id=0, bos_token_id=2, eos_token_id=3)
    return InterpretableModel(transformers.GPT2LMHeadModel(config).eval(), tokenizer=tok)


@pytest.fixture(scope="module")
def gpt12() -> Iterator[InterpretableModel]:
    """GPT-2 small's shape (12 layers x 12 heads), for the framework's snippets."""
    model = word_gpt2(12, 12)
    yield model
    assert model.hook_snapshot() == {}


@pytest.fixture(scope="module")
def gpt3() -> Iterator[InterpretableModel]:
    """3 layers x 4 heads, for the nnsight recipe (it loops over layers x positions)."""
    model = word_gpt2(3, 4)
    yield model
    assert model.hook_snapshot() == {}


# -- the nnsight recipe -----------------------------------------------------------------------
N_LAYERS = 3


@pytest.fixture(scope="module")
def recipe(gpt3) -> dict[str, Any]:
    """The recipe's setup and metric, then its three-run patching loop."""
    ns = run("nnsight_setup", gpt3)
    run("nnsight_logit_diff", gpt3, ns)
    run("nnsight_three_run", gpt3, ns)
    return ns


def _sweep(model: InterpretableModel, ns: dict[str, Any], **kwargs: Any) -> PatchingResult:
    return activation_patching(model, ns["clean_prompt"], ns["corrupted_prompt"],
                               correct=" John", incorrect=" Mary", **kwargs)


def test_recipe_setup_reads_the_model(recipe, gpt3):
    assert recipe["correct_token"] == gpt3.to_single_token(" John")
    assert recipe["incorrect_token"] == gpt3.to_single_token(" Mary")
    assert recipe["n_layers"] == len(gpt3.transformer.h) == N_LAYERS
    _, cache = gpt3.run_with_cache(recipe["clean_prompt"], names=["blocks.1.resid_post"])
    assert torch.equal(recipe["clean_hiddens"][1], cache["blocks.1.resid_post"])
    logits, _ = gpt3.run_with_cache(recipe["clean_prompt"], names=[])
    assert torch.equal(recipe["clean_logits"].value, logits)


def test_recipe_layer_patching_equals_the_sweep(recipe, gpt3):
    sweep = _sweep(gpt3, recipe, component="resid_post")
    normalized = recipe["normalized"]
    assert normalized.shape == (N_LAYERS,) and torch.isfinite(normalized).all()
    # the baselines: the recipe's logit differences against the sweep's (0 is no difference)
    assert_matches_reference([recipe["clean_diff"], recipe["corrupted_diff"]],
                             [sweep.clean_metric, sweep.corrupted_metric], 0.0,
                             rtol=RTOL_RECIPE, min_cells=1, what="recipe: baselines")
    assert_matches_reference(sweep.effect_matrix, normalized, 0.0, rtol=RTOL_RECIPE,
                             min_cells=2, what="recipe: layers (normalised)")


def test_recipe_position_patching_equals_the_sweep(recipe, gpt3):
    ns = run("nnsight_positions", gpt3, dict(recipe))
    results = ns["results"]
    assert results.shape == (N_LAYERS, ns["seq_len"]) and torch.isfinite(results).all()
    sweep = _sweep(gpt3, ns, component="resid_post", by_position=True, normalize=False)
    assert_matches_reference(sweep.effect_matrix, results, recipe["corrupted_diff"],
                             rtol=RTOL_RECIPE, min_cells=6, what="recipe: layer x position")


def test_recipe_head_patching_equals_the_sweep(recipe, gpt3):
    ns = run("nnsight_heads", gpt3, dict(recipe))
    results = ns["results"]
    assert results.shape == (N_LAYERS, 4) and torch.isfinite(results).all()
    sweep = _sweep(gpt3, ns, component="attn_head", normalize=False)
    assert_matches_reference(sweep.effect_matrix, results, recipe["corrupted_diff"],
                             rtol=RTOL_RECIPE, min_cells=6, what="recipe: layer x head")


def test_recipe_noising_equals_the_sweep(recipe, gpt3):
    ns = run("nnsight_noising", gpt3, dict(recipe))
    noised = ns["noising_results"]
    assert noised.shape == (N_LAYERS,) and torch.isfinite(noised).all()
    sweep = _sweep(gpt3, ns, component="resid_post", direction="noise", normalize=False)
    assert_matches_reference(sweep.effect_matrix, noised, recipe["clean_diff"],
                             rtol=RTOL_RECIPE, min_cells=2, what="recipe: noising")


def test_recipe_visualization_needs_seaborn(recipe, gpt3):
    """Listed in docs/porting.md: seaborn is not a dependency. Without it the snippet stops at
    its import; causalpatch's own figure of the same result is ``result.plot()``."""
    try:
        import seaborn  # noqa: F401
    except ModuleNotFoundError:
        with pytest.raises(ModuleNotFoundError, match="seaborn"):
            run("nnsight_visualization", gpt3, dict(recipe))
    else:  # installed: the snippet runs (on the three-run results, a 1-D heat map)
        ns = dict(recipe, seq_len=1, results=recipe["normalized"][:, None])
        run("nnsight_visualization", gpt3, ns)


# -- the TransformerLens framework ------------------------------------------------------------
def _reference_effects(model: InterpretableModel, dataset: Any,
                       hooks: list[list[tuple[str, Any]]]) -> torch.Tensor:
    """One ``run_with_hooks`` forward per entry of ``hooks`` on all corrupted prompts at once;
    the logit difference at each row's last token, by hand; mean over pairs, then normalised
    by the mean clean-corrupted gap (the one aggregation rule)."""
    lengths = torch.tensor([len(model.to_tokens(p)[0]) for p in dataset.clean])
    rows = torch.arange(len(lengths))
    correct, incorrect = torch.tensor(dataset.correct), torch.tensor(dataset.incorrect)

    def metric(logits: torch.Tensor) -> float:
        last = logits[rows, lengths - 1]
        return float((last[rows, correct] - last[rows, incorrect]).mean())

    clean = metric(model.run_with_hooks(list(dataset.clean)))
    base = metric(model.run_with_hooks(list(dataset.corrupted)))
    patched = [metric(model.run_with_hooks(list(dataset.corrupted), fwd_hooks=h)) for h in hooks]
    return (torch.tensor(patched) - base) / (clean - base)


@pytest.fixture(scope="module")
def framework(gpt12) -> dict[str, Any]:
    """The framework's layer experiment, as written."""
    ns = run("framework_layers", gpt12)
    return ns


def test_framework_layer_experiment(framework, gpt12, capsys):
    results, dataset = framework["results"], framework["dataset"]
    assert isinstance(results, PatchingResult) and results.axes == ("layer",)
    assert results.effect_matrix.shape == (12,) and torch.isfinite(results.effect_matrix).all()
    assert results.n_pairs == len(dataset.clean) == N_PAIRS
    _, cache = gpt12.run_with_cache(list(dataset.clean),
                                    names=[f"blocks.{l}.attn" for l in range(12)])
    hooks = [[(f"blocks.{l}.hook_attn_out", lambda act, hook, l=l: cache[f"blocks.{l}.attn"])]
             for l in range(12)]
    reference = _reference_effects(gpt12, dataset, hooks)
    assert_matches_reference(results.effect_matrix, reference, 0.0, rtol=RTOL_FRAMEWORK,
                             min_cells=6, what="framework: hook_attn_out per layer")
    capsys.readouterr()
    causalpatch.summarize_results(results, top_k=3)
    printed = capsys.readouterr().out
    (top_layer, top_effect), = results.top_components(1)
    assert f"blocks.{top_layer}.attn" in printed and f"{top_effect:+.3f}" in printed


def test_framework_head_experiment_and_report(framework, gpt12, capsys, tmp_path, monkeypatch):
    layer_results = framework["results"]
    ns = run("framework_heads", gpt12, dict(framework))
    results, important = ns["results"], ns["important"]
    assert results.axes == ("layer", "head") and results.effect_matrix.shape == (12, 12)
    assert torch.isfinite(results.effect_matrix).all()
    effects = results.effect_matrix
    assert len(important) == int((effects.abs() >= 0.1).sum()) > 0
    assert [abs(c.patching_effect) for c in important] == sorted(
        (abs(c.patching_effect) for c in important), reverse=True)
    first = important[0]
    assert first.patching_effect == pytest.approx(float(effects[first.layer, first.head]))
    assert f"L{first.layer}H{first.head}" in capsys.readouterr().out
    # the four largest heads and four seeded others, each patched alone by a plain hook on z
    order = effects.abs().flatten().argsort(descending=True).tolist()
    cells = order[:4] + [order[i] for i in torch.randperm(
        140, generator=torch.Generator().manual_seed(0))[:4].add(4).tolist()]
    _, cache = gpt12.run_with_cache(list(ns["dataset"].clean),
                                    names=[f"blocks.{l}.attn.z" for l in range(12)])

    def head_hook(layer: int, head: int) -> Any:
        def fn(z: torch.Tensor, hook: Any) -> torch.Tensor:
            out = z.clone()
            out[:, :, head] = cache[f"blocks.{layer}.attn.z"][:, :, head]
            return out
        return fn

    hooks = [[(f"blocks.{c // 12}.attn.hook_z", head_hook(c // 12, c % 12))] for c in cells]
    reference = _reference_effects(gpt12, ns["dataset"], hooks)
    assert_matches_reference(effects.flatten()[cells], reference, 0.0, rtol=RTOL_FRAMEWORK,
                             min_cells=4, what="framework: sampled heads")
    # the visualisation snippet; it names the layer experiment's result `layer_results`
    monkeypatch.chdir(tmp_path)
    ns["layer_results"] = layer_results
    run("framework_visualize", gpt12, ns)
    from matplotlib.figure import Figure

    assert isinstance(ns["fig"], Figure) and ns["fig"].axes
    folder = tmp_path / "figures"
    for name in ("head_heatmap.png", "layer_effects.png", "report.html"):
        assert (folder / name).stat().st_size > 1000, name
    assert PatchingResult.from_json(folder / "head_results.json") == results
    assert PatchingResult.from_json(folder / "layer_results.json") == layer_results


def test_framework_hook_points_of_mixed_kinds_are_one_cell_each(framework, gpt12):
    dataset = framework["dataset"]
    names = ["blocks.3.hook_attn_out", "blocks.5.mlp", "blocks.7.attn.hook_z",
             "blocks.9.hook_resid_post"]
    got = causalpatch.ActivationPatcher(gpt12).run_patching_experiment(
        dataset=dataset, hook_points=names, pair_indices=[0, 1, 2, 3])
    assert got.axes == ("site",) and got.labels["site"] == names
    sub = causalpatch.datasets.PatchingDataset.from_pairs(
        gpt12, [(dataset.clean[i], dataset.corrupted[i], dataset.correct[i],
                 dataset.incorrect[i]) for i in range(4)])
    expected = [activation_patching(gpt12, sub, component=c, layers=[layer]).effect_matrix[0]
                for c, layer in (("attn", 3), ("mlp", 5), ("attn", 7), ("resid_post", 9))]
    # hook_z patches every head at once: exactly the attention output of that layer
    assert_matches_reference(got.effect_matrix, torch.stack(expected), 0.0, rtol=RTOL_MIXED,
                             min_cells=2, what="framework: mixed hook points")


def test_framework_bad_input_is_refused_before_any_forward(framework, gpt12):
    patcher = causalpatch.ActivationPatcher(gpt12)
    dataset = framework["dataset"]
    calls: list[int] = []
    handle = gpt12.hf_model.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        with pytest.raises(UnknownComponentError):
            patcher.run_patching_experiment(dataset=dataset, hook_points=["blocks.3.nonsense"])
        with pytest.raises(InvalidArgumentError, match="empty"):
            patcher.run_patching_experiment(dataset=dataset, hook_points=[])
        with pytest.raises(InvalidArgumentError, match="pair_indices"):
            patcher.run_patching_experiment(dataset=dataset, hook_points=["blocks.1.mlp"],
                                            pair_indices=[99])
        with pytest.raises(InvalidArgumentError, match="patch_type.*query"):
            causalpatch.HeadPatcher(gpt12).run_all_heads_experiment(dataset, patch_type="pattern")
        with pytest.raises(InvalidArgumentError, match="axes.*'head'"):
            causalpatch.create_head_heatmap(framework["results"], n_layers=12)
        heads = PatchingResult(torch.zeros(12, 12), ("layer", "head"), {}, "attn_head",
                               "logit_diff")
        with pytest.raises(InvalidArgumentError, match="n_heads=4 but the result has 12"):
            causalpatch.create_head_heatmap(heads, n_layers=12, n_heads=4)
    finally:
        handle.remove()
    assert calls == [] and gpt12.hook_snapshot() == {}


# -- the book chapter's pseudocode and run_with_hooks -----------------------------------------
def test_book_pseudocode_is_not_runnable_but_its_hook_spelling_is(gpt12):
    """The chapter's ``patch_and_measure`` is pseudocode (docs/porting.md): it indexes the
    ``(logits, cache)`` pair ``run_with_cache`` returns by a name. Its hook, called at every
    component and choosing by ``hook.name``, works through ``run_with_hooks(hooks=[...])``."""
    clean, corrupted = "When Mary and John went to the store , John gave a drink to", \
        "When Mary and John went to the store , Mary gave a drink to"
    ns = run("book_patch_and_measure", gpt12)
    with pytest.raises(TypeError, match="tuple indices"):
        ns["patch_and_measure"](gpt12, clean, corrupted, "blocks.6.hook_resid_post")
    _, clean_cache = gpt12.run_with_cache(clean)
    seen: list[str] = []

    def patch_hook(activation, hook):
        seen.append(hook.name)
        if hook.name == "blocks.6.hook_resid_post":
            return clean_cache["blocks.6.hook_resid_post"]
        return activation

    got = gpt12.run_with_hooks(corrupted, hooks=[patch_hook])
    with gpt12.trace(corrupted, interventions={
            "blocks.6.resid_post": causalpatch.interventions.replace_with(
                clean_cache["blocks.6.resid_post"])}) as ref:
        pass
    base, _ = gpt12.run_with_cache(corrupted, names=[])
    assert not torch.equal(ref.logits, base)
    torch.testing.assert_close(got, ref.logits, rtol=0, atol=0)
    assert "blocks.6.hook_resid_post" in seen and "blocks.6.attn.hook_z" in seen
    assert gpt12.hook_snapshot() == {}


def test_run_with_hooks_names_filters_and_cleanup(gpt12):
    prompt = "When Mary and John went to the store , John gave a drink to"
    zero = causalpatch.interventions.zero(heads=[3])
    with gpt12.trace(prompt, interventions={"blocks.2.attn.z": zero}) as ref:
        pass

    def zero_head(z, hook):
        assert hook.name == "blocks.2.attn.hook_z" and hook.layer() == 2
        z[:, :, 3] = 0.0  # in place, returning None, as TransformerLens hooks often do
    got = gpt12.run_with_hooks(prompt, fwd_hooks=[("blocks.2.attn.hook_z", zero_head)])
    torch.testing.assert_close(got, ref.logits, rtol=0, atol=0)
    names: list[str] = []
    gpt12.run_with_hooks(prompt, fwd_hooks=[(lambda n: n.endswith("hook_z"),
                                             lambda z, hook: names.append(hook.name))])
    assert names == [f"blocks.{l}.attn.hook_z" for l in range(12)]

    def boom(act, hook):
        raise RuntimeError("inside a hook")
    with pytest.raises(RuntimeError, match="inside a hook"):
        gpt12.run_with_hooks(prompt, fwd_hooks=[("blocks.1.hook_mlp_out", boom)])
    assert gpt12.hook_snapshot() == {}
    with pytest.raises(UnknownComponentError):
        gpt12.run_with_hooks(prompt, fwd_hooks=[("blocks.1.hook_nonsense", boom)])
    with pytest.raises(InvalidArgumentError, match="bwd_hooks"):
        gpt12.run_with_hooks(prompt, bwd_hooks=[("blocks.1.hook_mlp_out", boom)])

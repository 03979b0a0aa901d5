"""ROME's controls in causal tracing, each against an independent reference.

* ``noise_std``: the noise's std from the subject tokens' embeddings (recomputed here from the
  embedding matrix), a given number, or the vocabulary's (unchanged default);
* ``window="scaled"`` (ROME's 10 of 48 layers) and ``exclude_layers``: windows against plain
  traces restoring exactly the layers left;
* ``sever``: severed hidden-state traces against a naive loop of plain interventions (one
  corrupted trace to read the MLP/attention outputs, one restored trace per cell with those
  outputs written back);
* ``prepend_bos``: equal to tracing the BOS-prefixed token ids, with the subject start
  positions in the result; ``known_fraction`` counts against a fact file built to a known
  answer;
* every bad option refused before any forward pass, no hook left behind.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_matches_reference

import causalpatch.interventions as iv
from causalpatch import InterpretableModel
from causalpatch.datasets import known_facts, known_fraction
from causalpatch.errors import InvalidArgumentError
from causalpatch.methods.causal_tracing import (SEVERED, causal_tracing, causal_tracing_dataset,
                                                embedding_std, scaled_window, subject_std)

PROMPT = "t5 t6 t7 t8 t9 t10 t11"
SUBJECT = "t6 t7"  # tokens 1..2
IDS = [5, 6, 7, 8, 9, 10, 11]
SPAN = (1, 3)

#: Relative tolerance of the batched staircase against the plain-trace references
#: (:func:`conftest.assert_matches_reference`; probabilities averaged over noise draws). Not
#: zero: other batch shapes, so other float32 summation orders. Largest ratio observed 4.7e-6
#: (the severed MLP trace on tiny Gemma; small_llama 2.2e-6, windows 8.5e-7); 1e-5 as in
#: test_causal_tracing.py.
RTOL = 1e-5


def noised(model: InterpretableModel, ids: list[int], span: tuple[int, int],
           noise: torch.Tensor) -> dict:
    """The corruption as a plain intervention: the draws added to the embedding output."""
    full = torch.zeros(noise.shape[0], len(ids), model.d_model)
    full[:, span[0] : span[1]] = noise
    return {"embed": iv.add(full)}


def naive_p(model: InterpretableModel, ids: list[int], span: tuple[int, int],
            noise: torch.Tensor, answer: int, restore: dict[str, int] | None = None,
            frozen: dict[str, int] | None = None) -> float:
    """The answer's probability averaged over the noise draws, from plain traces.

    ``restore``: ``{site: position}`` set to the clean run's value; ``frozen``: ``{site:
    position}`` set to the corrupted run's value of the same draw (read by a first trace).
    """
    n = noise.shape[0]
    interventions = noised(model, ids, span, noise)
    if frozen:
        corrupted = model.trace([ids] * n, interventions=dict(interventions),
                                cache=list(frozen)).run().cache
    if restore:
        clean = model.trace([ids], cache=list(restore)).run().cache
        for name, p in restore.items():
            interventions[name] = iv.replace_with(clean[name][:, p : p + 1], positions=[p])
    for name, p in (frozen or {}).items():
        interventions[name] = iv.replace_with(corrupted[name][:, p : p + 1], positions=[p])
    logits = model.trace([ids] * n, interventions=interventions).run().last_logits
    return float(torch.softmax(logits.float(), -1)[:, answer].mean())


@pytest.fixture
def layer_calls(small_llama):
    """Counts calls of the first decoder layer (a plain PyTorch hook, removed after)."""
    calls: list[int] = []
    handle = small_llama.hf_model.get_submodule("model.layers.0").register_forward_hook(
        lambda *_: calls.append(1))
    yield calls
    handle.remove()


# -- noise_std ----------------------------------------------------------------------------------
def test_noise_std_subject_is_the_std_of_the_subject_embeddings(small_llama):
    weight = small_llama.hf_model.get_input_embeddings().weight.detach().double()
    prompts = [PROMPT, "t9 t5 t6 t20 t3"]
    subjects = [SUBJECT, "t20"]
    expected = torch.cat([weight[[6, 7]].flatten(), weight[[20]].flatten()]).std().item()
    # standard deviations in float64: observed bitwise equal (0); a few float64 ulps allowed
    assert subject_std(small_llama, [IDS, [9, 5, 6, 20, 3]], [(1, 3), (3, 4)]) == \
        pytest.approx(expected, rel=1e-14)
    result = causal_tracing(small_llama, prompts, subjects, noise=3.0, samples=2,
                            components=("resid_post",), noise_std="subject")
    assert result.sigma == pytest.approx(3.0 * expected, rel=1e-14)
    assert result["resid_post"].extra["noise_std"] == "subject"
    # the std differs from the vocabulary's, which stays the default
    vocab = causal_tracing(small_llama, PROMPT, SUBJECT, samples=2, components=("resid_post",))
    assert vocab.sigma == pytest.approx(3.0 * embedding_std(small_llama), rel=1e-14)
    assert abs(result.sigma - vocab.sigma) > 1e-3 * vocab.sigma
    given = causal_tracing(small_llama, PROMPT, SUBJECT, samples=2, components=("resid_post",),
                           noise=2.0, noise_std=0.25)
    assert given.sigma == pytest.approx(0.5)
    assert given.noise[0].std().item() == pytest.approx(0.5, rel=0.2)  # 2 x 2 x 32 draws


def test_subject_noise_is_the_noise_of_a_plain_trace(small_llama):
    result = causal_tracing(small_llama, PROMPT, SUBJECT, samples=3, components=("mlp",),
                            window=1, noise_std="subject", position_groups=False)
    answer = result.answers[0]
    expected = naive_p(small_llama, IDS, SPAN, result.noise[0], answer)
    # float32 probability against the plain trace's: observed 4.7e-8
    assert float(result.p_corrupted[0]) == pytest.approx(expected, abs=4e-7)
    got = result["mlp"].effect_matrix[:, 2:]
    ref = torch.tensor([[naive_p(small_llama, IDS, SPAN, result.noise[0], answer,
                                 {f"blocks.{layer}.mlp": p}) - expected for p in range(2, 7)]
                        for layer in range(3)])
    assert_matches_reference(got, ref, 0.0, rtol=RTOL, min_cells=8, what="subject-noise mlp")


# -- windows ------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_layers,expected", [(48, 10), (30, 6), (12, 3), (24, 5), (3, 1),
                                               (1, 1)])
def test_scaled_window_is_romes_fraction_of_the_depth(n_layers, expected):
    assert scaled_window(n_layers) == expected


def test_window_scaled_and_window_one(small_llama):
    scaled = causal_tracing(small_llama, PROMPT, SUBJECT, samples=2, components=("mlp",),
                            window="scaled", position_groups=False)
    one = causal_tracing(small_llama, PROMPT, SUBJECT, samples=2, components=("mlp",),
                         window=1, position_groups=False)
    assert scaled["mlp"].extra["window"] == 1 == scaled.settings["window"]  # 3 layers: 1
    assert torch.equal(scaled["mlp"].effect_matrix, one["mlp"].effect_matrix)


def test_exclude_layers_leaves_them_out_of_every_window(small_llama):
    result = causal_tracing(small_llama, PROMPT, SUBJECT, samples=3, components=("mlp", "attn"),
                            window=2, exclude_layers=(0,), position_groups=False)
    answer, p_corr = result.answers[0], float(result.p_corrupted[0])
    for kind in ("mlp", "attn"):
        effect = result[kind].effect_matrix
        assert result[kind].extra["exclude_layers"] == [0]
        assert (effect[0] == 0).all()  # the window centred at 0 is {0}: nothing left
        got, ref = [], []
        for layer, layers in ((1, [1]), (2, [1, 2])):  # window 2 at L, without layer 0
            for p in range(1, 7):
                restore = {f"blocks.{lr}.{kind}": p for lr in layers}
                ref.append(naive_p(small_llama, IDS, SPAN, result.noise[0], answer, restore)
                           - p_corr)
                got.append(float(effect[layer, p]))
        assert_matches_reference(got, ref, 0.0, rtol=RTOL, min_cells=6, what=f"exclude {kind}")
    # hidden-state restorations are not windows: exclude_layers leaves them alone
    both = causal_tracing(small_llama, PROMPT, SUBJECT, samples=3, components=("resid_post",),
                          exclude_layers=(0,), position_groups=False)
    plain = causal_tracing(small_llama, PROMPT, SUBJECT, samples=3, components=("resid_post",),
                           position_groups=False)
    assert torch.equal(both["resid_post"].effect_matrix, plain["resid_post"].effect_matrix)


# -- severed traces -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def severed(small_llama):
    return causal_tracing(small_llama, PROMPT, SUBJECT, samples=4, seed=3,
                          components=("resid_post",), sever=("mlp", "attn"),
                          position_groups=False)


@pytest.mark.parametrize("frozen", ["mlp", "attn"])
def test_severed_trace_matches_a_naive_loop(small_llama, severed, frozen):
    """Each cell: the hidden state after layer L restored at position p while the ``frozen``
    outputs of layers L+1.. at p keep their corrupted values (same draw), by plain traces."""
    kind = SEVERED[frozen]
    result = severed[kind]
    assert result.extra["sever"] == frozen and result.component == kind
    answer, p_corr = severed.answers[0], float(severed.p_corrupted[0])
    ref = torch.tensor([[naive_p(small_llama, IDS, SPAN, severed.noise[0], answer,
                                 {f"blocks.{layer}.resid_post": p},
                                 {f"blocks.{later}.{frozen}": p for later in range(layer + 1, 3)})
                         - p_corr for p in range(7)] for layer in range(3)])
    assert_matches_reference(result.effect_matrix, ref, 0.0, rtol=RTOL, min_cells=6,
                             what=f"sever {frozen}")
    # severing changes the trace where a later output is frozen (layers 0 and 1), and nothing
    # at the last layer (no later layer to freeze)
    plain = severed["resid_post"].effect_matrix
    gap = (result.effect_matrix - plain).abs()
    assert gap[:2].max() > 100 * RTOL * float(plain.abs().max())
    assert torch.equal(result.effect_matrix[2], plain[2])


def test_severed_traces_on_every_family(family_model):
    """Tiny random models of every architecture (Gemma's MLP output is after its post-norm,
    GPT-2's attention output after its own projection): severed cells against plain traces."""
    family, tiny = family_model
    prompt, subject = "The Eiffel Tower is in the city of", "Eiffel Tower"
    before = tiny.hook_snapshot()
    result = causal_tracing(tiny, prompt, subject, samples=2, position_groups=False,
                            components=("resid_post",), sever=("mlp", "attn"))
    assert tiny.hook_snapshot() == before
    ids = tiny.tokenizer(prompt)["input_ids"]
    span, n = result.spans[0], tiny.n_layers
    answer, p_corr = result.answers[0], float(result.p_corrupted[0])
    for frozen in ("mlp", "attn"):
        got, ref = [], []
        for layer in range(n - 1):
            for p in range(span[0], len(ids)):
                got.append(float(result[SEVERED[frozen]].effect_matrix[layer, p]))
                ref.append(naive_p(tiny, ids, span, result.noise[0], answer,
                                   {f"blocks.{layer}.resid_post": p},
                                   {f"blocks.{lr}.{frozen}": p for lr in range(layer + 1, n)})
                           - p_corr)
        assert_matches_reference(got, ref, 0.0, rtol=RTOL, min_cells=4,
                                 what=f"{family} sever {frozen}")


def test_frozen_site_patches_fast_equals_naive_engine(small_llama):
    """The engine's frozen site patches on a plain pair: the staircase equals the one forward
    per patch loop, and a patch of frozen entries alone is the base run."""
    from causalpatch.engine import base_and_source_runs, patched_logits_many
    from causalpatch.enums import Engine
    from causalpatch.plan import SitePatch

    base_ids, source_ids = [5, 6, 7, 8, 9, 10, 11], [5, 20, 21, 8, 9, 10, 11]
    site = small_llama.site
    patches = [(SitePatch(site(f"blocks.{layer}.resid_post"), (p,)),
                *(SitePatch(site(f"blocks.{later}.{kind}"), (p,), frozen=True)
                  for later in range(layer + 1, 3)))
               for layer in (0, 1) for p in (1, 2, 4, 6) for kind in ("mlp", "attn")]
    patches.append((SitePatch(site("blocks.1.mlp"), (2, 3), frozen=True),))
    logits, base_last = {}, {}
    for engine in (Engine.FAST, Engine.NAIVE):
        runs = base_and_source_runs(small_llama, [(base_ids, source_ids)],
                                    sorted({sp.site for patch in patches for sp in patch},
                                           key=lambda s: s.name), patches, engine)
        logits[engine] = patched_logits_many(small_llama, runs, [(0, p) for p in patches],
                                             engine)
        base_last[engine] = runs[0].base_last
    # observed max |fast - naive| 3.4e-6 on a largest logit change of 3.8 (ratio 8.9e-7);
    # 503 of the 544 logits move by >= 100x the tolerance
    assert_matches_reference(logits[Engine.FAST], logits[Engine.NAIVE], base_last[Engine.NAIVE],
                             rtol=RTOL, min_cells=400, what="frozen patches")
    for engine in (Engine.FAST, Engine.NAIVE):  # frozen entries alone: the base run
        assert torch.equal(logits[engine][-1], base_last[engine].float()), engine


def test_sever_over_a_dataset_in_groups(small_llama):
    facts = [(PROMPT, SUBJECT), ("t9 t5 t6 t20 t3", "t20")]
    result = causal_tracing_dataset(small_llama, facts, samples=2, components=("resid_post",),
                                    sever="mlp")
    assert set(result) == {"resid_post", "resid_post_sever_mlp"}
    assert result["resid_post_sever_mlp"].effect_matrix.shape == (3, 6)
    assert result["resid_post_sever_mlp"].extra["subject_starts"] == [1, 3]


# -- BOS and subject starts ---------------------------------------------------------------------
def test_prepend_bos_equals_tracing_the_prefixed_ids(small_llama):
    kw = dict(samples=2, seed=5, components=("resid_post", "mlp"), window=2,
              position_groups=False)
    with_bos = causal_tracing(small_llama, PROMPT, SUBJECT, prepend_bos=0, **kw)
    explicit = causal_tracing(small_llama, [0, *IDS], (2, 4), seed=5,
                              **{k: v for k, v in kw.items() if k != "seed"})
    assert with_bos.spans == [(2, 4)] and with_bos["mlp"].extra["subject_starts"] == [2]
    assert with_bos["mlp"].extra["prepend_bos"] == 0
    assert with_bos.tokens[0][0] == "t0"
    for kind in ("resid_post", "mlp"):
        assert torch.equal(with_bos[kind].effect_matrix, explicit[kind].effect_matrix)
    # a prompt that already starts with the token gets no second one
    again = causal_tracing(small_llama, [0, *IDS], (1, 3), prepend_bos=0, **kw)
    assert again.spans == [(1, 3)] and len(again.tokens[0]) == 8
    plain = causal_tracing(small_llama, PROMPT, SUBJECT, **kw)
    assert plain["mlp"].extra["subject_starts"] == [1]
    assert plain["mlp"].extra["prepend_bos"] is None


def test_known_fraction_counts_the_facts_answered(small_llama, tmp_path):
    """Facts whose attribute is the model's top-1 next token count as known, the others not."""
    prompts = ["t5 t6 t7", "t9 t5", "t3 t4 t8", "t12 t13"]
    top = [int(small_llama.trace([small_llama.tokenizer.encode(p)]).run().last_logits[0]
               .argmax()) for p in prompts]
    wrong = [(t + 1) % 32 for t in top]
    attributes = [top[0], wrong[1], top[2], wrong[3]]
    facts = [{"subject": p.split()[0], "attribute": f"t{a}", "prompt": p, "relation_id": "P1"}
             for p, a in zip(prompts, attributes)]
    path = tmp_path / "facts.json"
    path.write_text(json.dumps(facts))
    counts = known_fraction(small_llama, path=path, batch_size=3)
    assert (counts.known, counts.total, counts.fraction) == (2, 4, 0.5)
    assert sorted(f.prompt for f in known_facts(small_llama, None, path=path)) == \
        sorted([prompts[0], prompts[2]])


# -- bad input ----------------------------------------------------------------------------------
BAD = [
    (dict(noise_std="tokens"), "noise_std must be 'vocab'"),
    (dict(noise_std=-1.0), "noise_std must be 'vocab'"),
    (dict(noise_std=float("nan")), "noise_std must be 'vocab'"),
    (dict(window="wide"), "window must be a positive int or 'scaled'"),
    (dict(window=0), "window must be >= 1"),
    (dict(exclude_layers=(5,)), "exclude_layers must hold layer indices in [0, 2]"),
    (dict(exclude_layers=(True,)), "exclude_layers must hold layer indices"),
    (dict(exclude_layers=(0, 1, 2)), "excludes all 3 layers"),
    (dict(sever="resid"), "sever must be 'mlp', 'attn' or both"),
    (dict(sever=()), "sever must be 'mlp', 'attn' or both"),
    (dict(prepend_bos=True), "the tokenizer has no BOS token"),
    (dict(prepend_bos=99), "prepend_bos must be True/False or a token id in [0, 31]"),
]


@pytest.mark.parametrize("kwargs,fragment", BAD, ids=[str(k) for k, _ in BAD])
def test_bad_options_are_refused_before_any_forward(small_llama, layer_calls, kwargs, fragment):
    before = small_llama.hook_snapshot()
    with pytest.raises(InvalidArgumentError) as info:
        causal_tracing(small_llama, PROMPT, SUBJECT, samples=2, **kwargs)
    assert fragment in str(info.value), str(info.value)
    assert layer_calls == []  # no decoder layer ran
    assert small_llama.hook_snapshot() == before


def test_known_facts_refuses_a_bad_bos_before_any_forward(small_llama, layer_calls):
    with pytest.raises(InvalidArgumentError, match="no BOS token"):
        known_facts(small_llama, 2, prepend_bos=True)
    assert layer_calls == []


# -- SmolLM2 ------------------------------------------------------------------------------------
@pytest.mark.real
def test_smollm2_bos_subject_noise_and_known_fraction(smollm2):
    """SmolLM2's tokenizer adds no BOS: ``prepend_bos=True`` puts ``<|im_start|>`` first and
    moves the subject from position 0 to 1; the subject std differs from the vocabulary's; the
    known fraction of the 1,209 facts is counted over all of them."""
    prompt, subject = "The Eiffel Tower is located in the city of", "The Eiffel Tower"
    result = causal_tracing(smollm2, prompt, subject, samples=2, components=("resid_post",),
                            noise_std="subject", prepend_bos=True, position_groups=False)
    assert result.tokens[0][0] == "<|im_start|>"
    assert result["resid_post"].extra["subject_starts"] == [1]
    assert result.sigma != pytest.approx(3.0 * embedding_std(smollm2), rel=0.01)
    counts = known_fraction(smollm2)
    assert counts.total == 1209
    assert 0 < counts.known < counts.total
    print(f"\nknown {counts.known}/{counts.total} = {counts.fraction:.3f}; "
          f"subject sigma {result.sigma:.4f} vs vocab {3.0 * embedding_std(smollm2):.4f}")

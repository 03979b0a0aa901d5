"""Path patching: the batched implementation against a brute-force construction from traces."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_matches_reference, small_id_llama

import causalpatch.interventions as iv
from causalpatch import InterpretableModel, activation_patching
from causalpatch.errors import InvalidArgumentError, OutOfRangeError
from causalpatch.methods.path_patching import path_patching

CLEAN = [5, 6, 7, 8, 9, 10, 11, 12]
CORRUPTED = [5, 6, 7, 20, 9, 10, 21, 12]
CORRECT, INCORRECT = 3, 4

#: Relative tolerance of the batched path patching against :func:`brute_force`
#: (:func:`conftest.assert_matches_reference`: max |batched - brute force| over the largest
#: brute-force effect; normalised logit differences, so the unpatched value is 0). Not zero: the
#: batched passes run other matmul shapes (other float32 summation orders: |diff| 1.5e-7 to
#: 1e-6 observed), and one-cell comparisons have small effects (1.4e-3 for (1, 0) -> (2, 1)):
#: largest ratio observed 2.6e-4.
RTOL = 1e-3
#: The same for the sweeps over several senders (largest ratio observed 4.9e-6, every head ->
#: (2, 1) q; min_cells there is the fewest cells observed above 100x it, less one).
RTOL_SWEEP = 4e-5
#: path patching against activation patching where the two coincide (the last layer's senders
#: to the logits): other batches, other float32 summation orders. Largest ratio observed 1.9e-6
#: (last-layer heads, denoising: 8.6e-7 on an effect of 0.45).
RTOL_ACT = 1.5e-5
#: the same sweep with batch_size=1: observed 1.7e-7 (5.2e-8 on effects up to 0.31).
RTOL_BATCH = 1.5e-6
#: a dataset's effect against the mean of its per-pair effects: observed 0 (bitwise equal); the
#: bound is a few float32 ulps of values of order 0.3.
RTOL_MEAN = 1e-6
#: The same on the tiny families (IOI prompts; largest ratio observed 6.7e-4, gpt_neox
#: sequential (1, 2) -> (2, 0) v, |diff| 3.5e-6 on an effect of 5.3e-3).
RTOL_FAMILY = 1e-3


#: Heads of SmolLM2 whose direct effect is >= 100x its tolerance (observed: 93 of 270).
SMOLLM2_MIN_CELLS = 50


def check(got, expected, what: str = "", rtol: float = RTOL, min_cells: int = 1) -> None:
    """``got`` (the batched cells) equals ``expected`` (brute force) by the suite's one rule."""
    assert_matches_reference(torch.tensor(got, dtype=torch.float64),
                             torch.tensor(expected, dtype=torch.float64), 0.0, rtol=rtol,
                             min_cells=min_cells, what=what)


@pytest.fixture(scope="module")
def small_gqa() -> InterpretableModel:
    """``conftest.small_llama`` with grouped-query attention (2 key/value heads), seed 1."""
    return small_id_llama(n_kv_heads=2, seed=1)


def logit_diff(logits: torch.Tensor, correct: int = CORRECT, incorrect: int = INCORRECT) -> float:
    return float(logits[correct] - logits[incorrect])


def brute_force(model: InterpretableModel, base: list[int], source: list[int],
                sender: tuple[int, int | None], receiver: tuple[int, int] | None,
                kind: str = "q", correct: int = CORRECT, incorrect: int = INCORRECT,
                freeze: str = "heads") -> float:
    """Path patching written out with plain traces, one forward pass per step.

    Pass 1: the base prompt with every head output (and, with ``freeze="all"``, every MLP
    output) replaced by its base value, except the sender, taken from the source run; read the
    receiver's input. Pass 2: the base prompt with only that input replaced.
    ``receiver=None``: the final residual stream.
    """
    n = model.n_layers
    names = [f"blocks.{layer}.{k}" for layer in range(n) for k in ("attn.z", "mlp")]
    base_cache = model.trace([base], cache=names).run().cache
    source_cache = model.trace([source], cache=names).run().cache
    layer_s, head_s = sender
    frozen = {}
    for layer in range(n):
        z = base_cache[f"blocks.{layer}.attn.z"].clone()
        mlp = base_cache[f"blocks.{layer}.mlp"].clone()
        if layer == layer_s and head_s is not None:
            z[:, :, head_s] = source_cache[f"blocks.{layer}.attn.z"][:, :, head_s]
        if layer == layer_s and head_s is None:
            mlp = source_cache[f"blocks.{layer}.mlp"].clone()
        frozen[f"blocks.{layer}.attn.z"] = iv.replace_with(z)
        if freeze == "all" or (layer == layer_s and head_s is None):
            frozen[f"blocks.{layer}.mlp"] = iv.replace_with(mlp)
    base_ld = logit_diff(model.trace([base]).run().last_logits[0], correct, incorrect)
    source_ld = logit_diff(model.trace([source]).run().last_logits[0], correct, incorrect)
    if receiver is None:
        final = f"blocks.{n - 1}.resid_post"
        resid = model.trace([base], interventions=frozen, cache=[final]).run().cache[final]
        patch = {final: iv.replace_with(resid[:, -1:], positions=[len(base) - 1])}
    else:
        layer_r, head_r = receiver
        name = f"blocks.{layer_r}.attn.{kind}"
        value = model.trace([base], interventions=frozen, cache=[name]).run().cache[name]
        unit = head_r if kind == "q" else head_r // (model.n_heads // model.n_kv_heads)
        patch = {name: iv.replace_with(value[:, :, unit : unit + 1], heads=[unit])}
    patched_ld = logit_diff(model.trace([base], interventions=patch).run().last_logits[0],
                            correct, incorrect)
    return (patched_ld - base_ld) / (source_ld - base_ld)


def run(model: InterpretableModel, **kwargs) -> torch.Tensor:
    kwargs.setdefault("correct", CORRECT)
    kwargs.setdefault("incorrect", INCORRECT)
    return path_patching(model, [CLEAN], [CORRUPTED], **kwargs).effect_matrix


@pytest.mark.parametrize("freeze", ["heads", "all"])
@pytest.mark.parametrize("direction", ["noise", "denoise"])
@pytest.mark.parametrize("sender,receiver", [((0, 1), (2, 3)), ((0, 2), (1, 0)),
                                             ((1, 0), (2, 1)), ((0, None), (2, 2)),
                                             ((1, None), (2, 0))])
def test_matches_brute_force_q(small_llama, direction, sender, receiver, freeze):
    base, source = (CLEAN, CORRUPTED) if direction == "noise" else (CORRUPTED, CLEAN)
    expected = brute_force(small_llama, base, source, sender, receiver, freeze=freeze)
    got = run(small_llama, senders=[sender], receivers=[receiver], receiver_input="q",
              direction=direction, freeze=freeze)
    assert got.shape == (1,)
    # the path carries something: one cell, its effect >= 100x the tolerance
    check(float(got[0]), expected, f"{sender}->{receiver} q {direction} {freeze}")


def test_full_sweep_matches_brute_force(small_llama):
    """All heads as senders, one batch: every cell equals its brute-force value."""
    result = path_patching(small_llama, [CLEAN], [CORRUPTED], senders="attn_head",
                           receivers=[(2, 1)], receiver_input="q", correct=CORRECT,
                           incorrect=INCORRECT)
    assert result.method == "path_patching"
    assert result.effect_matrix.shape == (3, 4)
    assert result.axes == ("layer", "head")
    gots, expected = [], []
    for layer in range(3):
        for head in range(4):
            got = float(result.effect_matrix[layer, head])
            if layer >= 2:  # no path from a head in the receiver's layer or later
                assert got == 0.0
            else:
                gots.append(got)
                expected.append(brute_force(small_llama, CLEAN, CORRUPTED, (layer, head), (2, 1)))
    check(gots, expected, "every head -> (2, 1) q", rtol=RTOL_SWEEP, min_cells=4)


@pytest.mark.parametrize("kind", ["k", "v"])
def test_matches_brute_force_kv_gqa(small_gqa, kind):
    receiver = (2, 3)  # kv head 1 under 2 query heads per kv head
    expected = brute_force(small_gqa, CLEAN, CORRUPTED, (0, 2), receiver, kind)
    got = run(small_gqa, senders=[(0, 2)], receivers=[receiver], receiver_input=kind)
    check(float(got[0]), expected)


def test_several_receivers_and_inputs(small_llama):
    """Two receivers in two layers, q and k together: the brute force patches all of them."""
    sender, receivers = (0, 3), [(1, 2), (2, 0)]
    n = small_llama.n_layers
    names = [f"blocks.{layer}.{k}" for layer in range(n) for k in ("attn.z", "mlp")]
    base_cache = small_llama.trace([CLEAN], cache=names).run().cache
    source_cache = small_llama.trace([CORRUPTED], cache=names).run().cache
    frozen = {}
    for name in names:
        value = base_cache[name].clone()
        if name == "blocks.0.attn.z":
            value[:, :, 3] = source_cache[name][:, :, 3]
        frozen[name] = iv.replace_with(value)
    reads = [f"blocks.{layer}.attn.{k}" for layer, _ in receivers for k in ("q", "k")]
    rec = small_llama.trace([CLEAN], interventions=frozen, cache=reads).run().cache
    patch = {}
    for layer, head in receivers:
        for k in ("q", "k"):
            name = f"blocks.{layer}.attn.{k}"
            patch[name] = iv.replace_with(rec[name][:, :, head : head + 1], heads=[head])
    base_ld = logit_diff(small_llama.trace([CLEAN]).run().last_logits[0])
    source_ld = logit_diff(small_llama.trace([CORRUPTED]).run().last_logits[0])
    patched = logit_diff(small_llama.trace([CLEAN], interventions=patch).run().last_logits[0])
    expected = (patched - base_ld) / (source_ld - base_ld)
    got = run(small_llama, senders=[sender], receivers=receivers, receiver_input=("q", "k"),
              freeze="all")
    check(float(got[0]), expected)


@pytest.mark.parametrize("freeze", ["heads", "all"])
@pytest.mark.parametrize("direction", ["noise", "denoise"])
def test_resid_receivers_match_brute_force(small_llama, direction, freeze):
    base, source = (CLEAN, CORRUPTED) if direction == "noise" else (CORRUPTED, CLEAN)
    result = path_patching(small_llama, [CLEAN], [CORRUPTED], senders="mlp", receivers="logits",
                           direction=direction, correct=CORRECT, incorrect=INCORRECT,
                           freeze=freeze)
    assert result.effect_matrix.shape == (3,)
    assert result.extra["freeze"] == freeze
    expected = [brute_force(small_llama, base, source, (layer, None), None, freeze=freeze)
                for layer in range(3)]
    check(result.effect_matrix.tolist(), expected, f"mlp -> logits {direction} {freeze}",
          rtol=RTOL_SWEEP, min_cells=3)


@pytest.mark.parametrize("direction", ["noise", "denoise"])
def test_last_layer_mlp_to_logits_is_activation_patching(small_llama, direction):
    """The last MLP reaches the logits only directly: path patching = activation patching."""
    path = run(small_llama, senders=[(2, None)], receivers="logits", direction=direction)
    act = activation_patching(small_llama, [CLEAN], [CORRUPTED], component="mlp", layers=[2],
                              direction=direction, correct=CORRECT, incorrect=INCORRECT)
    check([float(path[0])], [float(act.effect_matrix[0])], f"last mlp {direction}",
          rtol=RTOL_ACT, min_cells=1)


@pytest.mark.parametrize("direction", ["noise", "denoise"])
def test_last_layer_head_to_logits(small_llama, direction):
    """A last-layer head reaches the logits directly and through its own layer's MLP; path
    patching freezes that MLP, so it equals activation patching of the head with the MLP held
    at its base value."""
    base, source = (CLEAN, CORRUPTED) if direction == "noise" else (CORRUPTED, CLEAN)
    z, mlp = "blocks.2.attn.z", "blocks.2.mlp"
    base_cache = small_llama.trace([base], cache=[z, mlp]).run().cache
    source_z = small_llama.trace([source], cache=[z]).run().cache[z]
    base_ld = logit_diff(small_llama.trace([base]).run().last_logits[0])
    source_ld = logit_diff(small_llama.trace([source]).run().last_logits[0])
    result = run(small_llama, senders="attn_head", receivers="logits", direction=direction,
                 freeze="all")
    expected = []
    for head in range(4):
        patched = logit_diff(small_llama.trace([base], interventions={
            z: iv.replace_with(source_z[:, :, head : head + 1], heads=[head]),
            mlp: iv.replace_with(base_cache[mlp])}).run().last_logits[0])
        expected.append((patched - base_ld) / (source_ld - base_ld))
    check(result[2].tolist(), expected, f"last-layer heads {direction}", rtol=RTOL_SWEEP,
          min_cells=2)


def test_receiver_before_sender_errors(small_llama):
    with pytest.raises(InvalidArgumentError,
                       match="receiver layer 1 must come after sender layer 1"):
        run(small_llama, senders=[(1, 0)], receivers=[(1, 2)])
    with pytest.raises(InvalidArgumentError,
                       match="receiver layer 0 must come after sender layer 2"):
        run(small_llama, senders=[(2, None)], receivers=[(0, 1)])
    with pytest.raises(InvalidArgumentError, match="receiver layer 0 must come after"):
        run(small_llama, senders="attn_head", receivers=[(0, 1)])


def test_bad_arguments(small_llama):
    with pytest.raises(InvalidArgumentError, match="receiver_input"):
        run(small_llama, senders=[(0, 1)], receivers=[(2, 1)], receiver_input="z")
    with pytest.raises(InvalidArgumentError, match="receivers='logits'"):
        run(small_llama, senders=[(0, 1)], receivers=[(2, 1)], receiver_input="resid")
    with pytest.raises(InvalidArgumentError, match="direction"):
        run(small_llama, direction="sideways")
    with pytest.raises(OutOfRangeError):
        run(small_llama, senders=[(0, 9)], receivers=[(2, 1)])
    with pytest.raises(OutOfRangeError):
        run(small_llama, senders=[(0, 1)], receivers=[(5, 1)])
    with pytest.raises(InvalidArgumentError, match="unknown senders"):
        run(small_llama, senders="neurons")


def test_empty_senders_and_inseparable_heads_are_refused(small_llama, make_tiny_lm):
    import dataclasses

    from causalpatch.errors import UnsupportedArchitectureError

    before = small_llama.hook_snapshot()
    with pytest.raises(InvalidArgumentError, match="senders is empty"):
        run(small_llama, senders=[], receivers="logits")
    assert small_llama.hook_snapshot() == before
    fused = make_tiny_lm("llama")  # an adapter whose heads cannot be told apart
    fused.adapter = dataclasses.replace(
        fused.adapter, unsupported=lambda config: {"attn.z": "its attention is one fused op"})
    untouched = fused.hook_snapshot()
    with pytest.raises(UnsupportedArchitectureError, match="one fused op"):
        path_patching(fused, "abcdefghijkl", "abcdeXghijkl", senders="attn_head",
                      receivers="logits", correct=5, incorrect=6)
    assert fused.hook_snapshot() == untouched


def test_hooks_removed_and_batching_invariant(small_llama):
    before = small_llama.hook_snapshot()
    one = run(small_llama, senders="attn_head", receivers=[(2, 0), (2, 3)], batch_size=1)
    many = run(small_llama, senders="attn_head", receivers=[(2, 0), (2, 3)])
    assert small_llama.hook_snapshot() == before
    check(one.tolist(), many.tolist(), "batch_size=1", rtol=RTOL_BATCH, min_cells=4)
    with pytest.raises(InvalidArgumentError):
        run(small_llama, senders=[(2, 0)], receivers=[(1, 0)])
    assert small_llama.hook_snapshot() == before


def test_dataset_of_pairs_averages(small_llama):
    clean = [CLEAN, [5, 6, 7, 8, 13, 10, 11, 12]]
    corrupted = [CORRUPTED, [5, 6, 7, 8, 14, 10, 11, 12]]
    result = path_patching(small_llama, clean, corrupted, senders="mlp", receivers="logits",
                           correct=CORRECT, incorrect=INCORRECT)
    assert result.per_pair is not None and result.per_pair.shape == (2, 3)
    check(result.per_pair.mean(0).tolist(), result.effect_matrix.tolist(), "pair mean",
          rtol=RTOL_MEAN, min_cells=2)
    assert result.extra["n_pairs"] == 2


@pytest.mark.parametrize("direction", ["noise", "denoise"])
def test_last_layer_head_to_logits_with_mlps_recomputed_is_activation_patching(small_llama,
                                                                               direction):
    """With freeze="heads" nothing but the head and its layer's (recomputed) MLP moves."""
    result = run(small_llama, senders="attn_head", receivers="logits", direction=direction)
    act = activation_patching(small_llama, [CLEAN], [CORRUPTED], component="attn_head", layers=[2],
                              direction=direction, correct=CORRECT, incorrect=INCORRECT)
    check(result[2].tolist(), act.effect_matrix[0].tolist(), f"last heads {direction}",
          rtol=RTOL_ACT, min_cells=2)


def test_freeze_heads_and_all_differ_where_an_mlp_carries_the_path(small_llama):
    heads = run(small_llama, senders=[(0, 1)], receivers="logits", freeze="heads")
    frozen = run(small_llama, senders=[(0, 1)], receivers="logits", freeze="all")
    assert abs(float(heads[0]) - float(frozen[0])) > 1e-4


@pytest.mark.parametrize("freeze", ["heads", "all"])
def test_every_head_to_the_logits_matches_brute_force(small_llama, freeze):
    """The last-position shortcut of freeze="heads" (no cross-position flow once every head is
    frozen) against the full three-run construction, for every head."""
    result = run(small_llama, senders="attn_head", receivers="logits", freeze=freeze)
    expected = [[brute_force(small_llama, CLEAN, CORRUPTED, (layer, head), None, freeze=freeze)
                 for head in range(4)] for layer in range(3)]
    check(result.tolist(), expected, f"every head -> logits {freeze}", rtol=RTOL_SWEEP,
          min_cells=8)


def test_unknown_freeze_is_refused(small_llama):
    with pytest.raises(InvalidArgumentError, match="freeze 'mlps'"):
        run(small_llama, senders=[(0, 1)], receivers="logits", freeze="mlps")


@pytest.mark.real
def test_smollm2_direct_effect_of_every_head_equals_the_hand_computation(smollm2):
    """freeze="all" to the logits: base final residual + the head's output difference,
    through the final norm and the unembedding — for every head of SmolLM2."""
    from causalpatch.datasets import IOIDataset

    pair = IOIDataset(smollm2, n=1, seed=0)
    clean, corrupted = pair.clean[0], pair.corrupted[0]
    good, bad = pair.correct[0], pair.incorrect[0]
    result = path_patching(smollm2, pair, senders="attn_head", receivers="logits",
                           freeze="all")  # noising: corrupted head outputs into the clean run
    n, H, dh = smollm2.n_layers, smollm2.n_heads, smollm2.d_head
    names = [f"blocks.{layer}.attn.z" for layer in range(n)] + [f"blocks.{n - 1}.resid_post"]
    base = smollm2.trace(clean, cache=names).run()
    source = smollm2.trace(corrupted, cache=names).run()
    hf = smollm2.hf_model
    final = base.cache[f"blocks.{n - 1}.resid_post"][0, -1]

    def ld(logits):
        return float(logits[good] - logits[bad])

    base_ld, source_ld = ld(base.last_logits[0]), ld(source.last_logits[0])
    expected = torch.zeros(n, H, dtype=torch.float64)
    with torch.no_grad():
        for layer in range(n):
            w_o = hf.model.layers[layer].self_attn.o_proj.weight  # [d_model, H * dh]
            dz = (source.cache[f"blocks.{layer}.attn.z"] - base.cache[f"blocks.{layer}.attn.z"])
            for head in range(H):
                delta = w_o[:, head * dh:(head + 1) * dh] @ dz[0, -1, head]
                logits = hf.lm_head(hf.model.norm(final + delta)).float()
                expected[layer, head] = (ld(logits) - base_ld) / (source_ld - base_ld)
    # float32 on both sides, other summation orders: observed 1.4e-6 of the largest effect
    # (|diff| 5.3e-7 on effects up to 0.38; the old check was 1e-3 absolute)
    check(result.effect_matrix.tolist(), expected.tolist(), "smollm2 every head -> logits",
          rtol=1e-5, min_cells=SMOLLM2_MIN_CELLS)


IOI_CLEAN = "When Mary and John went to the store, John gave a drink to"
IOI_CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"


def test_every_family_matches_brute_force(family_model):
    """Tiny random models of every supported architecture (``conftest.FAMILIES``): a head to a
    later head's queries, and an MLP to the logits, against the brute force."""
    tiny_family, tiny = family_model
    correct, incorrect = tiny.to_single_token(" Mary"), tiny.to_single_token(" John")
    clean = tiny.tokenizer(IOI_CLEAN)["input_ids"]
    corrupted = tiny.tokenizer(IOI_CORRUPTED)["input_ids"]
    before = tiny.hook_snapshot()
    # Gemma 3's layers 0 and 2 see 4 positions: a layer-0 head reaches layer 2's last query
    # only at the last 4 positions, equal in both prompts (effect exactly 0), so its first path
    # goes to the values of the global layer 1 instead
    first = (((0, 1), (1, 1), dict(receivers=[(1, 1)], receiver_input="v"))
             if tiny_family == "gemma3_text" else ((0, 1), (2, 1), dict(receivers=[(2, 1)])))
    for sender, receiver, kwargs in (first,
                                     ((1, 2), (2, 0), dict(receivers=[(2, 0)],
                                                           receiver_input="v")),
                                     ((1, None), None, dict(receivers="logits"))):
        got = path_patching(tiny, [clean], [corrupted], senders=[sender], correct=correct,
                            incorrect=incorrect, **kwargs).effect_matrix[0]
        kind = kwargs.get("receiver_input", "q")
        expected = brute_force(tiny, clean, corrupted, sender, receiver, kind, correct, incorrect)
        check(float(got), expected, f"{tiny_family} {sender}", rtol=RTOL_FAMILY)
    assert tiny.hook_snapshot() == before


@pytest.mark.real
def test_smollm2_ioi_direct_effects(smollm2):
    """Real model smoke test: finite effects, the expected shape, name-mover-like heads late."""
    from causalpatch.datasets import IOIDataset

    ioi = IOIDataset(smollm2, n=2, seed=0)
    before = smollm2.hook_snapshot()
    result = path_patching(smollm2, ioi, senders="attn_head", receivers="logits")
    assert smollm2.hook_snapshot() == before
    assert result.effect_matrix.shape == (30, 9)
    assert torch.isfinite(result.effect_matrix).all()
    (layer, _), _ = result.top_components(1)[0]
    assert layer >= 15

"""``model.trace``: padded batches, intervention semantics, validation before any forward,
clean-up after errors, and facts the real SmolLM2 knows.

Tiny random models (every family) carry most checks; SmolLM2 is used where only a real model
means something (facts, logit differences, float32 padding on a 30-layer model).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch

import causalpatch.interventions as iv
from causalpatch import InterpretableModel
from causalpatch.errors import (InvalidArgumentError, InvalidTypeError, OutOfRangeError,
                                ShapeMismatchError)
from conftest import assert_within, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["When Mary and John went to the store, John gave", "The city of Paris", "a",
           "The Eiffel Tower is in"]  # 11, 4, 1 and 6 tokens on the tiny tokenizer
PROMPT = PROMPTS[0]
IOI_CLEAN = "When Mary and John went to the store, John gave a drink to"
IOI_CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"


@pytest.fixture
def lm(tiny_lm: InterpretableModel) -> Iterator[InterpretableModel]:
    """The shared tiny model; fails the test if a causalpatch hook is left behind."""
    yield tiny_lm
    assert tiny_lm.hook_snapshot() == {}, "a hook leaked out of the test"


class ForwardCounter:
    """A user hook on the root module counting forward passes."""

    def __init__(self, model: InterpretableModel) -> None:
        self.calls = 0
        self.handle = model.hf_model.register_forward_pre_hook(self._count)

    def _count(self, module: torch.nn.Module, args: tuple) -> None:
        self.calls += 1

    def __enter__(self) -> ForwardCounter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


# -- padded batches ----------------------------------------------------------------------------
#: A padded row against the same prompt run alone, on the tiny models: observed 1.7e-6 on logits
#: and 5.3e-6 on cached sites (float32); nonzero because the CPU matmul blocks a batch of 4
#: prompts differently from one prompt (the padding itself is exact: see the float64 check
#: below). 1e-5 is 1.9x the largest.
PADDED_ROWS = 1e-5

def test_padded_batch_rows_equal_unbatched_runs_on_every_family(lm):
    tr = lm.trace(PROMPTS).run()
    assert tr.batch.padded
    for i, prompt in enumerate(PROMPTS):
        alone = lm.trace(prompt).run()
        n = alone.logits.shape[1]
        assert int(tr.batch.lengths[i]) == n
        assert_within(tr.last_logits[i], alone.last_logits[0], PADDED_ROWS, "last logits")
        assert_within(tr.logits[i, :n], alone.logits[0], PADDED_ROWS, "every real position")


def test_padded_batch_caches_equal_unbatched_caches(lm):
    names = ["blocks.1.attn.z", "blocks.2.resid_post", "blocks.0.mlp.post"]
    _, batched = lm.run_with_cache(PROMPTS, names=names)
    for i, prompt in enumerate(PROMPTS):
        _, alone = lm.run_with_cache(prompt, names=names)
        for name in names:
            n = alone[name].shape[1]
            assert_within(batched[name][i, :n], alone[name][0], PADDED_ROWS, name)


@pytest.mark.real
def test_smollm2_padded_rows_equal_unbatched_runs(smollm2):
    """Right padding is exact: in float64 every padded row equals its unbatched run (3e-13;
    measured 3.9e-14). In float32 rows differ by up to 7.4e-5 on logits of magnitude ~30, and
    that is not the padding: stacking copies of one prompt with no padding and no mask differs
    by the same amount, eager attention and SDPA agree, and an all-ones mask changes nothing.
    The CPU matmul picks a different kernel/blocking for a different number of rows, so a
    ``Linear`` on 2 rows alone and inside 14 rows differs in the last bits (~8e-7), and 30
    layers grow that to 7.4e-5 - the size of float32's own error against float64."""
    prompts = [IOI_CLEAN, "Hello there", "The Eiffel Tower is in"]
    rows = smollm2.trace(prompts).run().last_logits
    for i, prompt in enumerate(prompts):
        # observed 7.4e-5 (the float32 kernel difference above, which depends on the CPU's
        # kernels); 5e-4 is 6.8x that, room for another machine's reduction order
        assert_within(rows[i], smollm2.trace(prompt).run().last_logits[0], 5e-4, "float32 row")
    m64 = InterpretableModel(copy.deepcopy(smollm2.hf_model).double(),
                             tokenizer=smollm2.tokenizer)
    rows64 = m64.trace(prompts).run().last_logits
    for i, prompt in enumerate(prompts):
        # observed 3.9e-14: the same kernel difference, at float64's resolution; 3e-13 is 7.7x
        assert_within(rows64[i], m64.trace(prompt).run().last_logits[0], 3e-13, "float64 row")


# -- intervention semantics --------------------------------------------------------------------
def test_interventions_on_one_site_compose_in_list_order(lm):
    name = "blocks.1.mlp"
    vector = torch.linspace(-1, 1, lm.d_model)
    in_order = lm.trace(PROMPT, interventions={
        name: [iv.scale(2.0), iv.add(vector)]}).run().logits
    by_hand = lm.trace(PROMPT, interventions={
        name: iv.function(lambda x: x * 2.0 + vector)}).run().logits
    reversed_order = lm.trace(PROMPT, interventions={
        name: [iv.add(vector), iv.scale(2.0)]}).run().logits
    # observed bitwise 0: both multiply then add the same tensors in float32, so nothing differs
    assert_within(in_order, by_hand, 0.0, "list order vs by hand")
    assert (in_order - reversed_order).abs().max() > 1e-4


def test_later_interventions_see_earlier_ones_on_per_head_sites(lm):
    name = "blocks.1.attn.z"
    value = torch.full((lm.d_head,), 0.5)
    tr = lm.trace(PROMPT, interventions={
        name: [iv.zero(heads=[0]), iv.add(value, heads=[0], positions=[-1])]},
        cache=[name]).run()
    z = tr.cache[name]  # the cache records the activation after the site's interventions
    assert torch.equal(z[0, -1, 0], value)
    assert torch.equal(z[0, :-1, 0], torch.zeros_like(z[0, :-1, 0]))


def test_replace_with_binds_its_value_at_construction(lm):
    name = "blocks.1.resid_post"
    value = torch.randn(1, 11, lm.d_model, generator=torch.Generator().manual_seed(3))
    expected = lm.trace(PROMPT, interventions={name: iv.replace_with(value.clone())}).run()
    patch = iv.replace_with(value)
    value.mul_(0).add_(100.0)  # mutating the caller's tensor afterwards changes nothing
    got = lm.trace(PROMPT, interventions={name: patch}, cache=[name]).run()
    assert torch.equal(got.logits, expected.logits)
    assert not torch.equal(got.cache[name], value)


def test_a_plain_tensor_or_callable_is_accepted_as_an_intervention(lm):
    name = "blocks.1.mlp"
    _, cache = lm.run_with_cache(PROMPT, names=[name])
    zeros = torch.zeros_like(cache[name])
    a = lm.trace(PROMPT, interventions={name: zeros}).run().logits
    b = lm.trace(PROMPT, interventions={name: lambda x: x * 0}).run().logits
    c = lm.trace(PROMPT, interventions={name: iv.zero()}).run().logits
    assert torch.equal(a, c) and torch.equal(b, c)


# -- validation happens before any forward pass -------------------------------------------------
def test_wrong_shape_value_raises_with_both_shapes_before_any_forward(lm):
    with ForwardCounter(lm) as counter:
        with pytest.raises(ShapeMismatchError) as err:
            lm.trace(PROMPT, interventions={"blocks.1.attn.z": iv.replace_with(torch.zeros(3))})
        with pytest.raises(ShapeMismatchError, match=r"\(5,\)"):
            lm.trace(PROMPT, interventions={"blocks.1.mlp": iv.add(torch.ones(5))})
        with pytest.raises(ShapeMismatchError, match=r"\(1, 7, "):
            lm.trace(PROMPT, interventions={"blocks.0.resid_pre": torch.zeros(1, 7, lm.d_model)})
        assert counter.calls == 0
    message = str(err.value)
    assert "(3,)" in message and f"(1, 11, {lm.n_heads}, {lm.d_head})" in message
    assert isinstance(err.value, ValueError)


@pytest.mark.real
def test_wrong_shape_on_smollm2_names_both_shapes_before_any_forward(smollm2):
    with ForwardCounter(smollm2) as counter:
        with pytest.raises(ShapeMismatchError, match=r"\(3,\).*\(1, 14, 9, 64\)"):
            smollm2.trace(IOI_CLEAN, interventions={
                "blocks.1.attn.z": iv.replace_with(torch.zeros(3))})
        assert counter.calls == 0


def test_a_function_returning_the_wrong_shape_raises_shape_mismatch(lm):
    with pytest.raises(ShapeMismatchError, match="expected a tensor of shape"):
        lm.trace(PROMPT, interventions={"blocks.1.mlp": lambda x: x[:, :-1]}).run()


@pytest.mark.parametrize("bad", [42, "zero", None, [iv.zero(), 3.5]],
                         ids=["int", "str", "None", "list-with-float"])
def test_non_callable_intervention_raises_invalid_type_before_any_forward(lm, bad):
    with ForwardCounter(lm) as counter:
        with pytest.raises(InvalidTypeError, match="callable"):
            lm.trace(PROMPT, interventions={"blocks.1.mlp": bad})
        assert counter.calls == 0


def test_function_intervention_needs_a_callable():
    with pytest.raises(InvalidTypeError, match="callable"):
        iv.function(42)  # type: ignore[arg-type]


def test_interventions_must_be_a_mapping(lm):
    with pytest.raises(InvalidTypeError, match="dict"):
        lm.trace(PROMPT, interventions=[("blocks.1.mlp", iv.zero())])  # type: ignore[arg-type]


@pytest.mark.parametrize("make", [
    lambda m: ("blocks.1.mlp", iv.zero(positions=[11])),
    lambda m: ("blocks.1.mlp", iv.zero(positions=[-12])),
    lambda m: ("blocks.1.attn.z", iv.zero(heads=[m.n_heads])),
    lambda m: ("blocks.1.attn.z", iv.zero(heads=[-1])),
    lambda m: ("blocks.1.attn.k", iv.zero(heads=[m.n_kv_heads])),  # GQA: fewer k/v heads
    lambda m: ("blocks.1.attn.q", iv.scale(2.0, heads=[0], positions=[40])),
], ids=["position-past-end", "position-before-start", "head-past-end", "negative-head",
        "kv-head-past-end", "position-with-head"])
def test_position_or_head_out_of_range_raises_before_any_forward(lm, make):
    name, intervention = make(lm)
    with ForwardCounter(lm) as counter:
        with pytest.raises(OutOfRangeError, match="out of range"):
            lm.trace(PROMPT, interventions={name: intervention})
        assert counter.calls == 0


def test_heads_on_a_site_without_heads_is_refused(lm):
    with pytest.raises(InvalidArgumentError, match="no head axis"):
        lm.trace(PROMPT, interventions={"blocks.1.mlp": iv.zero(heads=[0])})


@pytest.mark.parametrize("prompts", ["", "   ", [], ["fine", ""], [[]]],
                         ids=["empty", "blank", "empty-list", "one-empty", "no-token-ids"])
def test_empty_prompt_raises_invalid_argument(lm, prompts):
    with ForwardCounter(lm) as counter:
        with pytest.raises(InvalidArgumentError, match="empty|no tokens"):
            lm.trace(prompts)
        assert counter.calls == 0


# -- clean-up after errors ---------------------------------------------------------------------
class UserBug(Exception):
    """An error in the user's own intervention function."""


@pytest.mark.parametrize("raised", [UserBug, KeyboardInterrupt])
def test_errors_inside_an_intervention_leave_hooks_exactly_as_they_were(tiny_family, raised):
    """Exceptions and Ctrl-C inside a user function remove every causalpatch hook (also the
    two-hook resid_mid site and cachers) and keep the user's own hook, which still fires."""
    lm = tiny_model(tiny_family)  # own copy: this test installs a hook of its own
    fired: list[int] = []
    user = lm.hf_model.get_submodule(lm.site("blocks.1.attn").module_path).register_forward_hook(
        lambda module, args, output: fired.append(1))
    before = lm.hook_snapshot()
    reference = lm.trace(PROMPT).run().logits
    n_fired = len(fired)

    def broken(act: torch.Tensor) -> torch.Tensor:
        raise raised("boom")

    sites = {"blocks.0.resid_pre": iv.scale(1.0), "blocks.1.attn.z": iv.zero(heads=[0]),
             "blocks.2.mlp": [iv.add(torch.ones(lm.d_model)), broken]}
    if "blocks.1.resid_mid" in lm.component_names():
        sites["blocks.1.resid_mid"] = iv.scale(1.0)
    with pytest.raises(raised, match="boom"):
        lm.trace(PROMPT, interventions=sites, cache=True).run()
    assert lm.hook_snapshot() == before
    assert len(fired) == n_fired + 1  # the user's hook ran during the failed pass
    assert torch.equal(lm.trace(PROMPT).run().logits, reference)
    assert len(fired) == n_fired + 2  # and still fires afterwards
    user.remove()
    assert lm.hook_snapshot() == {}


# -- facts the real model knows ----------------------------------------------------------------
@pytest.mark.real
def test_smollm2_completes_the_eiffel_tower_with_paris(smollm2):
    top = smollm2.generate_top_tokens("The Eiffel Tower is in the city of", k=1)
    assert top[0][0] == " Paris"


@pytest.mark.real
def test_smollm2_ioi_logit_differences(smollm2):
    mary, john = smollm2.to_single_token(" Mary"), smollm2.to_single_token(" John")
    last = smollm2.trace([IOI_CLEAN, IOI_CORRUPTED]).run().last_logits
    # observed 6.11959 and -5.48527; the values are pinned to 4 decimals, and 5e-4 allows float32
    # reduction-order differences (7.4e-5 on SmolLM2 logits between batchings, above) ~7x over
    assert_within(last[0, mary] - last[0, john], 6.1196, 5e-4, "clean logit difference")
    assert_within(last[1, mary] - last[1, john], -5.4853, 5e-4, "corrupted logit difference")


@pytest.mark.real
def test_smollm2_sizes_and_tokens(smollm2):
    assert (smollm2.n_layers, smollm2.n_heads, smollm2.n_kv_heads, smollm2.d_model,
            smollm2.d_head, smollm2.d_mlp, smollm2.vocab_size) == (30, 9, 3, 576, 64, 1536, 49152)
    assert smollm2.architecture == "llama"
    assert smollm2.to_str_tokens("Hello world") == ["Hello", " world"]

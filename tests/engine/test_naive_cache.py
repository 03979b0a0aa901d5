"""The suite's cache of naive forwards (``conftest.NaiveCache``, installed for the session by
``naive_cache_session``): a reused row is bitwise the row a fresh forward gives, and anything
that changes the forward (a weight edited in place, other source values, another model object,
a hook) runs it again.

Every call here goes through the real mechanism: :func:`causalpatch.engine.patched_logits` with
``Engine.NAIVE`` calls the module attribute the fixture replaced. The fresh reference is the
original function (``cache.original``), which never reads the cache. Equalities are bitwise
(``torch.equal``): a reused row is a copy of a computed one, with no arithmetic in between.
"""

from __future__ import annotations

import sys
from dataclasses import replace

import pytest
import torch

import causalpatch.engine as engine
from causalpatch.engine import (RunActivations, collect_sites, patched_logits,
                                run_base_and_source)
from causalpatch.enums import Engine
from causalpatch.plan import build_patches, make_pairs, plan_component, resolve_positions

LAYER = 1  # one layer's resid_post, one patch per position: 12 rows per call


@pytest.fixture
def setup(make_tiny_lm, one_thread):
    """A fresh tiny LLaMA (tests edit its weights), its pair's runs and 12 patches."""
    lm = make_tiny_lm("llama")
    pair = make_pairs(lm, "abcdefghijkl", "abcdeXghijkl", 5, 6)[0]
    plan = plan_component(lm, "resid_post", [LAYER])
    patches = build_patches(plan, resolve_positions(None, True, 12), True, 12)
    run = run_base_and_source(lm, pair.corrupted, pair.clean, collect_sites(patches), patches,
                              Engine.NAIVE)
    return lm, run, patches


def fresh(cache, lm, run, patches) -> torch.Tensor:
    """The naive loop without the cache."""
    return cache.original(lm, run.base_ids, patches, run.source, None, run.base)


def counts(cache) -> tuple[int, int, int]:
    return cache.hits, cache.misses, cache.uncached


def delta(before: tuple[int, int, int], cache) -> tuple[int, int, int]:
    return tuple(now - then for now, then in zip(counts(cache), before))  # type: ignore[return-value]


def test_the_engine_and_every_module_that_imported_it_call_the_cache(naive_cache):
    assert engine.naive_patched_logits.__wrapped__ is naive_cache.original
    for module in list(sys.modules.values()):
        found = getattr(module, "__dict__", {}).get("naive_patched_logits")
        assert found is None or found is engine.naive_patched_logits, module.__name__


def test_a_reused_row_equals_a_fresh_forward_bitwise(naive_cache, setup):
    lm, run, patches = setup
    before = counts(naive_cache)
    ticks: list[int] = []
    first = patched_logits(lm, run, patches, Engine.NAIVE, progress=ticks.append)
    assert delta(before, naive_cache) == (0, 12, 0)
    again = patched_logits(lm, run, patches, Engine.NAIVE, progress=ticks.append)
    assert delta(before, naive_cache) == (12, 12, 0)
    assert ticks == [1] * 24  # a reused row still reports its progress
    expected = fresh(naive_cache, lm, run, patches)
    assert torch.equal(first, expected) and torch.equal(again, expected)
    assert not torch.equal(expected[3], expected[7])  # rows of different patches differ


def test_a_weight_edited_in_place_misses(naive_cache, setup):
    lm, run, patches = setup
    cached = patched_logits(lm, run, patches, Engine.NAIVE)
    weight = lm.hf_model.model.norm.weight  # the final norm: every row's logits read it
    saved = weight.detach().clone()
    version = weight._version
    weight.data.add_(1)
    assert weight._version == version  # an edit through .data bumps no version counter...
    before = counts(naive_cache)
    edited = patched_logits(lm, run, patches, Engine.NAIVE)
    assert delta(before, naive_cache) == (0, 12, 0)  # ...the hash of the bytes sees it
    assert torch.equal(edited, fresh(naive_cache, lm, run, patches))
    assert not torch.equal(edited, cached)

    weight.data.copy_(saved)  # the same bytes again: the first rows are exact again
    before = counts(naive_cache)
    assert torch.equal(patched_logits(lm, run, patches, Engine.NAIVE), cached)
    assert delta(before, naive_cache) == (12, 0, 0)

    with torch.no_grad():
        weight.add_(0)  # same bytes, a new version: not reused (the key is conservative)
    before = counts(naive_cache)
    assert torch.equal(patched_logits(lm, run, patches, Engine.NAIVE), cached)
    assert delta(before, naive_cache) == (0, 12, 0)


def test_other_source_values_miss_only_where_they_are_written(naive_cache, setup):
    lm, run, patches = setup
    cached = patched_logits(lm, run, patches, Engine.NAIVE)
    name = patches[0][0].site.name
    acts = dict(run.source.acts)
    acts[name] = acts[name].clone()
    acts[name][0, 3] += 1.0  # position 3: the fourth row's patch writes it, no other row's
    other = replace(run, source=RunActivations(acts))
    before = counts(naive_cache)
    got = patched_logits(lm, other, patches, Engine.NAIVE)
    assert delta(before, naive_cache) == (11, 1, 0)
    assert torch.equal(got, fresh(naive_cache, lm, other, patches))
    assert not torch.equal(got[3], cached[3])
    assert torch.equal(got[:3], cached[:3]) and torch.equal(got[4:], cached[4:])


def test_the_returned_tensor_is_a_clone(naive_cache, setup):
    lm, run, patches = setup
    expected = fresh(naive_cache, lm, run, patches)
    first = patched_logits(lm, run, patches, Engine.NAIVE)
    first.add_(1000.0)  # a caller writing into its result
    before = counts(naive_cache)
    again = patched_logits(lm, run, patches, Engine.NAIVE)
    assert delta(before, naive_cache) == (12, 0, 0)
    assert torch.equal(again, expected)
    assert again.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()


def test_another_model_object_with_equal_weights_misses(naive_cache, setup, make_tiny_lm):
    lm, run, patches = setup
    cached = patched_logits(lm, run, patches, Engine.NAIVE)
    twin = make_tiny_lm("llama")  # seeded: the same weights, another object
    before = counts(naive_cache)
    assert torch.equal(patched_logits(twin, run, patches, Engine.NAIVE), cached)
    assert delta(before, naive_cache) == (0, 12, 0)


def test_a_model_with_a_hook_or_a_replaced_forward_runs_every_forward(naive_cache, setup,
                                                                      monkeypatch):
    lm, run, patches = setup
    cached = patched_logits(lm, run, patches, Engine.NAIVE)
    calls: list[int] = []
    handle = lm.hf_model.model.norm.register_forward_hook(lambda *a: calls.append(1))
    try:
        before = counts(naive_cache)
        assert torch.equal(patched_logits(lm, run, patches, Engine.NAIVE), cached)
        assert delta(before, naive_cache) == (0, 0, 12) and len(calls) == 12
    finally:
        handle.remove()

    real = lm.hf_model.forward
    monkeypatch.setattr(lm.hf_model, "forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    before = counts(naive_cache)
    assert torch.equal(patched_logits(lm, run, patches, Engine.NAIVE), cached)
    assert delta(before, naive_cache) == (0, 0, 12) and len(calls) == 24

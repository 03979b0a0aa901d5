"""Answer-only metrics on compact logits: the engines return only the answer tokens' columns
(``[rows, n_columns]``, never a ``[rows, vocab]`` tensor of zeros), the metric inputs are
re-indexed onto them, and the results equal those of the full vocabulary.

Tolerance 1e-5 on float32 logits (a product with a few rows of the unembedding against the
whole matrix), on every tiny architecture (Gemma 2/3 have a logit soft-cap).
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_matches_reference, assert_within

from causalpatch import activation_patching
from causalpatch.engine import (collect_sites, patched_logits, run_base_and_source,
                                unembed)
from causalpatch.enums import Engine
from causalpatch.errors import InvalidArgumentError
from causalpatch.metrics import METRICS, MetricInputs
from causalpatch.plan import build_patches, make_pairs, plan_component, resolve_positions


#: Relative tolerance (:func:`conftest.assert_matches_reference`) of answer columns against the
#: full vocabulary, float32 logits of the tiny models: a few rows of the unembedding against
#: the whole matrix (other matmul shapes, so other summation orders). Observed 3.2e-6 (|diff|
#: 6e-7 on effects of 0.19).
RTOL = 1e-5
#: The same on SmolLM2 (30 layers, normalised effects), fast engine against the naive loop:
#: observed 2.0e-6 (|diff| 5.3e-7 on effects up to 0.27, 9 of 18 heads >= 100x the tolerance);
#: the old check was 1e-3 absolute while the docstring claimed 1e-5.
RTOL_REAL = 2e-5


def test_unembed_columns_are_those_of_the_full_logits(tiny_lm):
    hidden = torch.randn(3, tiny_lm.d_model, generator=torch.Generator().manual_seed(0))
    cols = [9, 2, 9, 5]  # unsorted, with a repeat: ascending distinct entries come back
    with torch.no_grad():
        full = unembed(tiny_lm, hidden)
        part = unembed(tiny_lm, hidden, cols)
    assert part.shape == (3, 3)
    # the answer columns of the unembedding against all of it (another matmul shape): observed
    # 1.8e-7 absolute
    assert_within(part, full[:, [2, 5, 9]], 1.5e-6, "answer columns")


@pytest.mark.parametrize("engine", [Engine.FAST, Engine.NAIVE])
def test_patched_logits_with_columns_are_those_columns(tiny_lm, engine):
    pair = make_pairs(tiny_lm, "abcdefghijkl", "abcdeXghijkl", 5, 6)[0]
    plan = plan_component(tiny_lm, "resid_post", None, None, None)
    patches = build_patches(plan, resolve_positions(None, True, 12), True, 12)
    run = run_base_and_source(tiny_lm, pair.corrupted, pair.clean, collect_sites(patches),
                              patches, Engine.FAST)
    full = patched_logits(tiny_lm, run, patches, Engine.NAIVE)
    part = patched_logits(tiny_lm, run, patches, engine, columns=[6, 5])
    assert part.shape == (len(patches), 2)
    # the unpatched value of each row's answer columns is the base run's
    assert_matches_reference(part, full[:, [5, 6]], run.base_last[[5, 6]], rtol=RTOL,
                             min_cells=4, what=f"answer columns {engine}")


def test_on_columns_reindexes_answers_and_keeps_the_metric_exact():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 50, generator=g)
    inputs = MetricInputs(torch.randn(4, 50, generator=g), torch.tensor([7, 3, 7, 40]),
                          torch.tensor([3, 40, 12, 7]))
    cols = [40, 3, 12, 7, 3]
    narrowed = inputs.on_columns(cols)
    assert narrowed.correct.tolist() == [1, 0, 1, 3]  # indices into [3, 7, 12, 40]
    assert narrowed.target_logits.shape == (4, 4)
    for name in ("logit_diff", "logit"):
        metric = METRICS[name]
        assert metric.answers_only
        assert torch.equal(metric(logits[:, [3, 7, 12, 40]], narrowed), metric(logits, inputs))
    with pytest.raises(InvalidArgumentError, match=r"\[40\].*not among"):
        inputs.on_columns([3, 7, 12])


def test_logit_diff_sweep_equals_the_full_vocabulary_metric(smollm2):
    """The sweep's logit_diff (answer columns only) equals the same metric registered without
    ``answers_only`` (every logit computed), on the real model, both engines."""
    from causalpatch.metrics import Metric

    full = Metric("logit_diff_full", METRICS["logit_diff"].fn, "score", ("correct", "incorrect"))
    kw = dict(clean="When Mary and John went to the store, John gave a drink to",
              corrupted="When Mary and John went to the store, Mary gave a drink to",
              correct=" Mary", incorrect=" John", component="attn_head", layers=[20, 29])
    fast = activation_patching(smollm2, **kw)
    reference = activation_patching(smollm2, metric=full, engine="naive", **kw)
    # normalised effects (unpatched value 0); at least 4 heads far above the tolerance
    assert_matches_reference(fast.effect_matrix, reference.effect_matrix, 0.0, rtol=RTOL_REAL,
                             min_cells=4, what="smollm2 attn_head logit_diff")

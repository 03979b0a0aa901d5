"""Bootstrap confidence intervals of effects (``PatchingResult.ci``).

Checked against an independent reference (each resample's effect recomputed from the raw
per-pair metrics of a second, unnormalised run, by :func:`causalpatch.metrics.normalize`), for
coverage on synthetic data with a known mean, and for the errors a result that cannot have an
interval gives.
"""

from __future__ import annotations

import pytest
import torch

from causalpatch import PatchingResult, activation_patching
from causalpatch.errors import InvalidArgumentError, NormalizationError
from causalpatch.metrics import bootstrap_interval, normalize
from conftest import IOI_PAIRS, TextPairs, assert_matches_reference

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = TextPairs.of(IOI_PAIRS)


@pytest.fixture(scope="module")
def results(make_tiny_lm):
    model = make_tiny_lm("llama")
    normalised = activation_patching(model, DATA, component="attn_head", progress=False)
    raw = activation_patching(model, DATA, component="attn_head", normalize=False,
                              progress=False)
    return normalised, raw


#: the interval's bounds against the reference's, relative to the largest bound: observed 1.6e-5
#: (float32 quotients by a small gap, as the comment in the test says).
CI_RTOL = 1e-4


def test_interval_equals_resampled_normalisation_of_raw_metrics(results):
    """Resample b's effect is normalize(mean_b(patched), mean_b(base), mean_b(source)); the
    reference draws the same indices and computes it from the raw run's values."""
    normalised, raw = results
    n_boot, seed = 200, 3
    lower, upper = normalised.ci(n_boot=n_boot, seed=seed)
    metrics = normalised.extra["pair_metrics"]
    base = torch.tensor(metrics["base"], dtype=torch.float64)
    source = torch.tensor(metrics["source"], dtype=torch.float64)
    assert raw.per_pair is not None
    patched = raw.per_pair.double()
    n = patched.shape[0]
    idx = torch.randint(n, (n_boot, n), generator=torch.Generator().manual_seed(seed))
    draws = torch.stack([normalize(patched[i].mean(0), base[i].mean(), source[i].mean()).double()
                         for i in idx])
    ref_lower, ref_upper = torch.quantile(
        draws, torch.tensor([0.025, 0.975], dtype=torch.float64), dim=0)
    # observed: relative 1.6e-5 at most. The stored per-pair effects are float32 quotients by the
    # tiny model's small clean-corrupted gap (effects up to ~100), the reference divides the raw
    # float32 metrics in float64: float32 rounding of the quotient, not a difference of method.
    # Through conftest.assert_matches_reference (relative to the largest bound, 0 = no effect):
    # observed 1.6e-5 of it (1.7e-3 on bounds up to 111), see CI_RTOL.
    assert_matches_reference(lower, ref_lower, 0.0, rtol=CI_RTOL, min_cells=4, what="ci lower")
    assert_matches_reference(upper, ref_upper, 0.0, rtol=CI_RTOL, min_cells=4, what="ci upper")
    spread = (upper - lower).max()
    assert spread > 1e-2, "the pairs differ, so some interval must have width"
    assert bool((lower <= upper).all())


def test_interval_holds_the_mean_effect_and_narrows_with_level(results):
    normalised, _ = results
    lower, upper = normalised.ci()
    eff = normalised.effect_matrix
    inside = ((lower <= eff + 1e-6) & (eff - 1e-6 <= upper)).float().mean()
    assert inside > 0.95
    lo80, up80 = normalised.ci(level=0.8)
    assert bool(((up80 - lo80) <= (upper - lower) + 1e-6).all())


def test_same_seed_same_interval_and_json_round_trip(results):
    normalised, _ = results
    again = PatchingResult.from_json(normalised.to_json())
    a, b = normalised.ci(seed=7), again.ci(seed=7)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_summary_shows_intervals(results):
    text = results[0].summary(k=3)
    assert text.count("95% CI") == 3


def test_coverage_on_synthetic_data():
    """Means of 30 draws from N(0.5, 1) (per cell): the 95% interval covers 0.5 in about 95%
    of 300 independent cells (binomial: 285 +- 3.8 sd; below 270 would mean a broken method)."""
    gen = torch.Generator().manual_seed(0)
    per_pair = 0.5 + torch.randn(30, 300, generator=gen)
    lower, upper = bootstrap_interval(per_pair, n_boot=1000, seed=1)
    covered = int(((lower <= 0.5) & (0.5 <= upper)).sum())
    assert 270 <= covered <= 298, covered


def test_normalised_coverage_uses_the_resampled_gap():
    """Effects normalised by a gap that varies over pairs: intervals from the ratio of means
    cover the true ratio; ignoring the gap's variation (plain mean of per-pair effects) would
    be too narrow."""
    gen = torch.Generator().manual_seed(2)
    hits_ratio = 0
    trials = 200
    for _ in range(trials):
        base = torch.randn(20, generator=gen)
        source = base + 2.0 + 1.5 * torch.randn(20, generator=gen)  # gap 2 +- 1.5
        patched = base + 0.4 * (source - base) + 0.1 * torch.randn(20, generator=gen)
        gap = source.mean() - base.mean()
        per_pair = ((patched - base) / gap)[:, None]
        lo, up = bootstrap_interval(per_pair, base=base, source=source, n_boot=200,
                                    seed=int(torch.randint(10**6, (1,), generator=gen)))
        hits_ratio += int(lo[0] <= 0.4 <= up[0])
    assert hits_ratio >= 0.85 * trials, hits_ratio


def test_errors():
    one = PatchingResult(effect_matrix=torch.zeros(3), axes=("layer",), labels={},
                         component="resid_post", metric="logit_diff")
    with pytest.raises(InvalidArgumentError, match="per-pair effects"):
        one.ci()
    old = PatchingResult(effect_matrix=torch.zeros(3), axes=("layer",), labels={},
                         component="resid_post", metric="logit_diff",
                         per_pair=torch.randn(4, 3))
    with pytest.raises(InvalidArgumentError, match="pair_metrics"):
        old.ci()
    with pytest.raises(InvalidArgumentError, match="level"):
        bootstrap_interval(torch.randn(4, 3), level=95)
    with pytest.raises(InvalidArgumentError, match="n_boot"):
        bootstrap_interval(torch.randn(4, 3), n_boot=10)
    with pytest.raises(InvalidArgumentError, match="at least 2 pairs"):
        bootstrap_interval(torch.randn(1, 3))
    flat = torch.zeros(4)
    with pytest.raises(NormalizationError, match="gap is ~0"):
        bootstrap_interval(torch.randn(4, 3), base=flat, source=flat)

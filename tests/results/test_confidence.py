"""Bootstrap confidence intervals of effects (``PatchingResult.ci``).

Checked against an independent reference (each resample's effect recomputed from the raw
per-pair metrics of a second, unnormalised run, by :func:`causalpatch.metrics.normalize`), for
coverage on synthetic data with a known mean, and for the errors a result that cannot have an
interval gives.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from causalpatch import PatchingResult, activation_patching
from causalpatch.errors import InvalidArgumentError, InvalidTypeError, NormalizationError
from causalpatch.metrics import CI_N_BOOT, CI_SEED, bootstrap_interval, normalize
from causalpatch.render.html import report
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


# -- where the interval is shown: JSON and the HTML report --------------------------------------
def _figures(page: str) -> list[dict]:
    (body,) = re.findall(r"<script type='application/json' id='cp-figures'>(.*?)</script>",
                         page, flags=re.DOTALL)
    return json.loads(body)


def test_interval95_is_ci_with_the_stated_settings(results):
    normalised, raw = results
    for result in (normalised, raw):
        shown = result.interval95()
        assert shown is not None
        lower, upper = result.ci(n_boot=CI_N_BOOT, seed=CI_SEED)
        assert torch.equal(shown[0], lower) and torch.equal(shown[1], upper)


def test_json_holds_the_interval_and_round_trips(results):
    normalised, _ = results
    doc = json.loads(normalised.to_json())
    lower, upper = normalised.ci(n_boot=CI_N_BOOT, seed=CI_SEED)
    assert doc["ci95"]["n_boot"] == CI_N_BOOT and doc["ci95"]["seed"] == CI_SEED
    assert doc["ci95"]["level"] == 0.95
    assert torch.equal(torch.tensor(doc["ci95"]["lower"]), lower)
    assert torch.equal(torch.tensor(doc["ci95"]["upper"]), upper)
    again = PatchingResult.from_json(json.dumps(doc))
    shown = again.interval95()
    assert shown is not None and torch.equal(shown[0], lower) and torch.equal(shown[1], upper)
    # a file written before the field existed loads the same
    del doc["ci95"]
    old = PatchingResult.from_json(json.dumps(doc))
    assert torch.equal(old.effect_matrix, normalised.effect_matrix)


def test_report_hover_shows_each_cells_interval(results):
    normalised, _ = results
    lower, upper = normalised.ci(n_boot=CI_N_BOOT, seed=CI_SEED)
    page = report(normalised)
    (figure,) = _figures(page)
    trace = figure["data"][0]
    assert normalised.std is not None  # so the cell holds [std, lower, upper]
    assert "95% CI [%{customdata[1]:+.4f}, %{customdata[2]:+.4f}]" in trace["hovertemplate"]
    layer, head = 1, 0
    _, lo, up = trace["customdata"][layer][head]
    assert lo == pytest.approx(float(lower[layer, head]), rel=1e-4)  # 5 significant digits
    assert up == pytest.approx(float(upper[layer, head]), rel=1e-4)
    assert lo < up
    assert f"95% bootstrap interval over the pairs ({CI_N_BOOT} resamples, seed {CI_SEED})" \
        in page


def test_report_bars_and_std_keep_their_hover_with_the_interval():
    gen = torch.Generator().manual_seed(0)
    per_pair = torch.randn(6, 4, generator=gen)
    bars = PatchingResult(effect_matrix=per_pair.mean(0), axes=("layer",), labels={},
                          component="resid_post", metric="logit_diff", normalized=False,
                          per_pair=per_pair)
    trace = _figures(report(bars))[0]["data"][0]
    assert trace["type"] == "bar" and "95% CI" in trace["hovertemplate"]
    lower, upper = bars.ci(n_boot=CI_N_BOOT, seed=CI_SEED)
    # error bars reach the interval's ends
    top = [y + e for y, e in zip(trace["y"], trace["error_y"]["array"])]
    bottom = [y - e for y, e in zip(trace["y"], trace["error_y"]["arrayminus"])]
    assert top == pytest.approx(upper.tolist(), rel=1e-4)
    assert bottom == pytest.approx(lower.tolist(), rel=1e-4)
    with_std = PatchingResult(effect_matrix=per_pair.mean(0).reshape(2, 2),
                              axes=("layer", "head"), labels={}, component="attn_head",
                              metric="logit_diff", normalized=False,
                              per_pair=per_pair.reshape(6, 2, 2), std=per_pair.std(0).reshape(2, 2))
    trace = _figures(report(with_std))[0]["data"][0]
    assert "std %{customdata[0]:.4f}" in trace["hovertemplate"]
    assert "95% CI [%{customdata[1]:+.4f}, %{customdata[2]:+.4f}]" in trace["hovertemplate"]
    assert len(trace["customdata"][0][0]) == 3


def test_one_pair_results_show_no_interval_anywhere(make_tiny_lm):
    model = make_tiny_lm("llama")
    one = activation_patching(model, TextPairs.of(IOI_PAIRS[:1]), component="attn_head",
                              progress=False)
    assert one.interval95() is None
    assert "ci95" not in json.loads(one.to_json())
    page = report(one)
    assert "95% CI" not in page and "bootstrap interval" not in page
    assert "95% CI" not in one.summary()


# -- causal tracing: intervals over prompts -----------------------------------------------------
TRACE_PROMPTS = ["t5 t6 t7 t8 t9 t10 t11", "t9 t12 t13 t14 t15", "t20 t21 t22 t23 t24 t25"]
TRACE_SUBJECTS = ["t6 t7", "t12 t13 t14", "t20"]


def test_tracing_group_interval_equals_a_nan_skipping_reference(small_llama, tmp_path):
    """ROME's groups average over the prompts that have them; each resample does the same.
    Reference: the per-prompt group means by hand (positions of each group), a resample's cell
    the nanmean over the drawn prompts, percentiles by nanquantile."""
    from causalpatch.methods.causal_tracing import causal_tracing, position_groups

    traced = causal_tracing(small_llama, TRACE_PROMPTS, TRACE_SUBJECTS, samples=2,
                            components=("mlp",))
    mlp = traced["mlp"]
    assert mlp.per_pair is None and mlp.extra["group_counts"] == [3, 1, 3, 2, 2, 3]
    n_boot, seed = 300, 5
    lower, upper = traced.ci("mlp", n_boot=n_boot, seed=seed)
    assert lower.shape == upper.shape == mlp.effect_matrix.shape
    rows = []
    for positions, span in zip(traced.per_position, traced.spans):
        ie = positions["mlp"].double()
        rows.append(torch.stack([ie[:, cols].mean(1) if cols else
                                 torch.full((ie.shape[0],), float("nan"), dtype=torch.float64)
                                 for cols in position_groups(ie.shape[1], span)], dim=1))
    per_prompt = torch.stack(rows)  # [prompts, layers, groups]
    # the result's group means are the nanmean over all prompts (observed: 6e-9 at most on
    # effects up to 0.084, float32 rounding)
    torch.testing.assert_close(per_prompt.nanmean(0).float(), mlp.effect_matrix,
                               rtol=0, atol=6e-8)
    n = per_prompt.shape[0]
    idx = torch.randint(n, (n_boot, n), generator=torch.Generator().manual_seed(seed))
    draws = torch.stack([per_prompt[i].nanmean(0) for i in idx])
    ref = torch.nanquantile(draws, torch.tensor([0.025, 0.975], dtype=torch.float64), dim=0)
    # observed: 0 difference; allowed: about one float32 step at 0.1 (summation orders differ)
    torch.testing.assert_close(lower, ref[0].float(), rtol=0, atol=1e-8)
    torch.testing.assert_close(upper, ref[1].float(), rtol=0, atol=1e-8)
    assert float((upper - lower).max()) > 1e-4, "three prompts differ: some width"
    # the saved JSON holds the interval with its settings
    path = traced.save(tmp_path / "trace.json")
    saved = json.loads(path.read_text())["mlp"]["ci95"]
    shown = traced.ci("mlp", n_boot=CI_N_BOOT, seed=CI_SEED)
    assert saved["n_boot"] == CI_N_BOOT and saved["seed"] == CI_SEED
    assert torch.equal(torch.tensor(saved["lower"]), shown[0])
    assert torch.equal(torch.tensor(saved["upper"]), shown[1])
    # the middle group: one prompt has it, so every resample that draws it gives its value
    torch.testing.assert_close(lower[:, 1], mlp.effect_matrix[:, 1], rtol=0, atol=1e-8)
    torch.testing.assert_close(upper[:, 1], mlp.effect_matrix[:, 1], rtol=0, atol=1e-8)


def test_tracing_group_no_prompt_has_gets_nan_bounds(small_llama, tmp_path):
    from causalpatch.methods.causal_tracing import causal_tracing

    traced = causal_tracing(small_llama, TRACE_PROMPTS[1:], ["t12", "t20"], samples=2,
                            components=("mlp",))
    assert traced["mlp"].extra["group_counts"][1] == 0  # one-token subjects: no middle
    lower, upper = traced.ci("mlp", n_boot=200)
    assert bool(torch.isnan(lower[:, 1]).all() and torch.isnan(upper[:, 1]).all())
    others = [0, 2, 3, 4, 5]
    assert bool(torch.isfinite(lower[:, others]).all())
    assert bool((lower[:, others] <= upper[:, others]).all())
    saved = json.loads(traced.save(tmp_path / "t.json").read_text())["mlp"]["ci95"]
    assert all(row[1] is None for row in saved["lower"])  # the missing group: null


def test_tracing_position_interval_is_the_components_ci_and_errors(small_llama):
    from causalpatch.methods.causal_tracing import causal_tracing

    equal = ["t5 t6 t7 t8 t9", "t9 t12 t13 t14 t15"]
    traced = causal_tracing(small_llama, equal, ["t6 t7", "t12 t13"], samples=2,
                            components=("mlp",), position_groups=False)
    a, b = traced.ci("mlp", n_boot=200, seed=2), traced["mlp"].ci(n_boot=200, seed=2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # the report's trace heatmap (positions down, layers across) hovers p(restored) and the CI
    lower, upper = traced["mlp"].ci(n_boot=CI_N_BOOT, seed=CI_SEED)
    page = report(traced["mlp"])
    trace = _figures(page)[0]["data"][0]
    assert "95% CI [%{customdata[1]:+.4f}, %{customdata[2]:+.4f}]" in trace["hovertemplate"]
    layer, position = 1, 2  # a subject token: the prompts differ there
    p_restored, lo, up = trace["customdata"][position][layer]
    assert lo < up
    assert lo == pytest.approx(float(lower[layer, position]), rel=1e-4, abs=1e-9)
    assert up == pytest.approx(float(upper[layer, position]), rel=1e-4, abs=1e-9)
    assert p_restored == pytest.approx(
        float(traced["mlp"].effect_matrix[layer, position]) + traced["mlp"].corrupted_metric,
        rel=1e-4)
    assert "95% bootstrap interval over the prompts" in page
    with pytest.raises(InvalidArgumentError, match="component must be one of"):
        traced.ci("attn")
    one = causal_tracing(small_llama, TRACE_PROMPTS[0], TRACE_SUBJECTS[0], samples=2,
                         components=("mlp",))
    with pytest.raises(InvalidArgumentError, match="at least 2"):
        one.ci("mlp")


# -- edge attribution: intervals over pairs ------------------------------------------------------
def _resampled_normalisation(patched: torch.Tensor, base: torch.Tensor, source: torch.Tensor,
                             n_boot: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The hand-written reference of ``ci()``: ``n_boot`` resamples of the pairs (seeded as
    the results seed theirs), each pair set's ``(mean patched - mean base) / (mean source -
    mean base)``, and the 2.5% and 97.5% quantiles. ``patched`` ``[n_pairs, ...]``, ``base`` and
    ``source`` ``[n_pairs]`` (float64). Returns the resampled indices ``[n_boot, n_pairs]`` and
    the bounds ``[2, ...]``."""
    n = patched.shape[0]
    idx = torch.randint(n, (n_boot, n), generator=torch.Generator().manual_seed(seed))
    draws = torch.stack([(patched[i].mean(0) - base[i].mean()) / (source[i].mean() - base[i].mean())
                         for i in idx])
    return idx, torch.quantile(draws, torch.tensor([0.025, 0.975], dtype=torch.float64), dim=0)


def test_edge_interval_equals_resampled_scores_and_round_trips(make_tiny_lm):
    """Each resample's score is normalize(mean_b(patched), mean_b(base), mean_b(source)) of
    the kept per-pair values; the reference draws the same indices and computes it so."""
    from causalpatch import edge_attribution
    from causalpatch.graph import EdgeResult

    model = make_tiny_lm("llama")
    plain = edge_attribution(model, DATA, progress=False)
    kept = edge_attribution(model, DATA, progress=False, keep_per_pair=True)
    assert plain.per_pair is None
    with pytest.raises(InvalidArgumentError, match="keep_per_pair=True"):
        plain.ci()
    assert torch.equal(kept.scores, plain.scores)  # keeping them changes nothing else
    assert kept.per_pair is not None and kept.per_pair.shape == (len(IOI_PAIRS), kept.graph.n_edges)
    # observed: 0 difference on changes up to 0.14; allowed: about one float32 step
    torch.testing.assert_close(kept.per_pair.mean(0), kept.change, rtol=0, atol=2e-8)
    n_boot, seed = 200, 4
    lower, upper = kept.ci(n_boot=n_boot, seed=seed)
    metrics = kept.extra["pair_metrics"]
    base = torch.tensor(metrics["base"], dtype=torch.float64)
    source = torch.tensor(metrics["source"], dtype=torch.float64)
    idx, ref = _resampled_normalisation(kept.per_pair.double() + base[:, None], base, source,
                                        n_boot, seed)
    # observed: 0 difference after float32 rounding (relative 6e-8 before it) on scores up
    # to 63 (the tiny model's gap is small); allowed: 10x that relative difference
    torch.testing.assert_close(lower, ref[0].float(), rtol=6e-7, atol=1e-8)
    torch.testing.assert_close(upper, ref[1].float(), rtol=6e-7, atol=1e-8)
    assert float((upper - lower).max()) > 1e-3, "the pairs differ: some width"
    lo_c, up_c = kept.ci(unit="change", n_boot=n_boot, seed=seed)
    draws_c = torch.stack([kept.per_pair.double()[i].mean(0) for i in idx])
    ref_c = torch.quantile(draws_c, torch.tensor([0.025, 0.975], dtype=torch.float64), dim=0)
    torch.testing.assert_close(lo_c, ref_c[0].float(), rtol=6e-7, atol=1e-8)  # observed: 0
    torch.testing.assert_close(up_c, ref_c[1].float(), rtol=6e-7, atol=1e-8)
    again = EdgeResult.from_json(kept.to_json())
    assert again.per_pair is not None and torch.equal(again.per_pair, kept.per_pair)
    a = again.ci(n_boot=n_boot, seed=seed)
    assert torch.equal(a[0], lower) and torch.equal(a[1], upper)
    old = EdgeResult.from_json(plain.to_json())  # files without per_pair load as before
    assert old.per_pair is None and torch.equal(old.scores, plain.scores)
    with pytest.raises(InvalidArgumentError, match="unit"):
        kept.ci(unit="nats")


def test_edge_interval_of_unscored_edges_is_nan(make_tiny_lm):
    from causalpatch import edge_attribution

    model = make_tiny_lm("llama")
    graph_edges = edge_attribution(model, DATA, progress=False).top(3)
    chosen = [(s, d) for s, d, _ in graph_edges]
    exact = edge_attribution(model, DATA, method="exact", edges=chosen, progress=False,
                             keep_per_pair=True)
    lower, upper = exact.ci(n_boot=200)
    assert int(torch.isfinite(lower).sum()) == 3 and int(torch.isfinite(upper).sum()) == 3
    scored = exact.scored
    assert bool((lower[scored] <= upper[scored]).all())
    with pytest.raises(InvalidTypeError, match="keep_per_pair"):
        edge_attribution(model, DATA, progress=False, keep_per_pair="yes")


# -- path patching and SAE feature patching: PatchingResult.ci over their pairs ----------------
def _check_interval_by_hand(result: PatchingResult, n_boot: int = 200, seed: int = 6) -> None:
    """ci() against the resampled normalisation of the result's own per-pair values."""
    assert result.per_pair is not None and result.n_pairs == len(IOI_PAIRS)
    lower, upper = result.ci(n_boot=n_boot, seed=seed)
    assert lower.shape == upper.shape == result.effect_matrix.shape
    metrics = result.extra["pair_metrics"]
    base = torch.tensor(metrics["base"], dtype=torch.float64)
    source = torch.tensor(metrics["source"], dtype=torch.float64)
    gap = source.mean() - base.mean()
    patched = result.per_pair.double() * gap + base.reshape(-1, *[1] * result.effect_matrix.dim())
    _, ref = _resampled_normalisation(patched, base, source, n_boot, seed)
    # observed: relative 6e-8 at most (float32 per-pair effects scaled back by the gap in
    # float64; bounds up to ~40 on the tiny model's small gap); allowed: 10x
    torch.testing.assert_close(lower, ref[0].float(), rtol=6e-7, atol=1e-7)
    torch.testing.assert_close(upper, ref[1].float(), rtol=6e-7, atol=1e-7)
    assert float((upper - lower).max()) > 1e-3, "the pairs differ: some width"
    assert "95% CI" in result.summary(k=2)


def test_path_patching_result_has_intervals(make_tiny_lm):
    from causalpatch import path_patching

    model = make_tiny_lm("llama")
    _check_interval_by_hand(path_patching(model, DATA, senders="attn_head", receivers="logits",
                                          progress=False))


def test_sae_patching_result_has_intervals(make_tiny_lm):
    from causalpatch import sae_patching
    from causalpatch.sae import SparseAutoencoder

    model = make_tiny_lm("llama")
    sae = SparseAutoencoder(model.d_model, 32, "standard", hook_name="blocks.1.hook_resid_post",
                            seed=1)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(32, generator=gen) * 0.3)
    _check_interval_by_hand(sae_patching(model, sae, DATA, progress=False))

"""The staircase batched over several base runs, per-position windows and its memory budget.

Every fast path is compared with the naive loop (one forward per patch) on the same model,
by :func:`conftest.assert_matches_reference` (:data:`RTOL`, float32 logits), on every tiny
architecture; ``mlp_neuron`` sweeps run every neuron fast and a sample of them naively
(:func:`conftest.neuron_sample`: each layer's first and last neuron, seeded picks, and the rows
the fast sweep moves most).
"""

from __future__ import annotations

import pytest
import torch

from conftest import assert_matches_reference, assert_within, neuron_sample

from causalpatch.engine import (collect_sites, patched_logits, patched_logits_many,
                                rows_per_chunk, run_base_and_source)
from causalpatch.enums import Engine
from causalpatch.errors import InvalidArgumentError, UnknownComponentError
from causalpatch.plan import build_patches, make_pairs, plan_component, resolve_positions

PAIRS = [("abcdefghijkl", "abcdeXghijkl"), ("bcdefghijkla", "bcdefgYijkla"),
         ("cdefghijklab", "cdXefghijZab")]  # 12 tokens each, first differences at 5, 6, 2


#: Relative tolerance of every fast-vs-naive comparison here (:func:`conftest.
#: assert_matches_reference`): max |fast - naive| over the largest effect |naive - base|, float32
#: logits. Not zero because the staircase batches rows differently from the naive loop (other
#: matmul shapes, so other summation orders). Largest ratio observed 7.3e-6 (mlp_neuron in the
#: last layer, |diff| 1.7e-6 on effects of 0.23; elsewhere up to 1.8e-6 on effects of 0.1-2
#: logits); the old check was 1e-5 absolute.
RTOL = 5e-5
#: a prepared run's activations and last logits against a plain forward of the same prompt,
#: absolute: the pair's runs are batched (other float32 summation orders). Largest observed
#: 4.1e-6 (a source run's activations; 1.8e-6 on logits).
RUN_ATOL = 1e-5
#: a readout applied per batch against the same readout of the full logits: observed 0 (bitwise
#: equal); the bound is one float32 ulp of logits up to ~5.
READOUT_ATOL = 5e-7
#: Cells (row x vocabulary entry) whose effect must be >= 100 x the tolerance (fewest observed:
#: 255, a last-layer MLP patch moving 255 of 256 logits).
MIN_CELLS = 100


@pytest.fixture
def model(tiny_lm):
    return tiny_lm


def naive_rows(fast: torch.Tensor, base: torch.Tensor, n_runs: int, n_layers: int,
               component: str) -> list[int]:
    """Rows the naive loop checks, in run order: every row, except for ``mlp_neuron`` (one
    naive forward per neuron) a sample of each run's rows (:func:`conftest.neuron_sample`).
    ``fast`` / ``base``: ``[rows, vocab]``, the runs' rows one after another."""
    if component != "mlp_neuron":
        return list(range(len(fast)))
    per_run = len(fast) // n_runs
    moved = (fast - base).abs().amax(-1)
    return [r * per_run + i for r in range(n_runs)
            for i in neuron_sample(moved[r * per_run:(r + 1) * per_run], n_layers)]


@pytest.mark.parametrize("component,by_position", [
    ("resid_post", True), ("attn_head", False), ("mlp_neuron", False), ("attn", True)])
def test_rows_of_several_runs_share_batches_and_equal_naive(model, component, by_position):
    plan = plan_component(model, component, None, None, None)
    runs, jobs = [], []
    for clean, corrupted in PAIRS:
        pair = make_pairs(model, clean, corrupted, 5, 6)[0]
        patches = build_patches(plan, resolve_positions(None, by_position, 12), by_position, 12)
        run = run_base_and_source(model, pair.corrupted, pair.clean, collect_sites(patches),
                                  patches, Engine.FAST)
        jobs += [(len(runs), p) for p in patches]
        runs.append(run)
    stats: dict = {}
    fast = patched_logits_many(model, runs, jobs, Engine.FAST, batch_size=50, stats=stats)
    base = torch.stack([runs[r].base_last for r, _ in jobs])
    rows = naive_rows(fast, base, len(runs), len(plan.layers), component)
    naive = torch.cat([patched_logits(model, run, [jobs[i][1] for i in rows if jobs[i][0] == r],
                                      Engine.NAIVE) for r, run in enumerate(runs)])
    assert_matches_reference(fast[rows], naive, base[rows], rtol=RTOL, min_cells=MIN_CELLS,
                             what=f"{component} staircase")
    # fewer passes than one staircase per run, and no row computes positions before its change
    assert stats["rows"] > 0
    assert stats["layer_tokens"] <= stats["rows"] * model.n_layers * 12


def test_per_position_windows_compute_only_later_positions(model):
    pair = make_pairs(model, *PAIRS[2], 5, 6)[0]
    plan = plan_component(model, "resid_pre", None, None, None)
    patches = build_patches(plan, resolve_positions(None, True, 12), True, 12)
    run = run_base_and_source(model, pair.corrupted, pair.clean, collect_sites(patches), patches,
                              Engine.FAST)
    stats: dict = {}
    fast = patched_logits(model, run, patches, Engine.FAST, stats=stats)
    naive = patched_logits(model, run, patches, Engine.NAIVE)
    assert_matches_reference(fast, naive, run.base_last, rtol=RTOL, min_cells=MIN_CELLS,
                             what="resid_pre windows")
    # a row patching position p (>= 2, the first difference) runs T - p positions from its layer
    windowed = sum((model.n_layers - layer) * (12 - p)
                   for layer in range(model.n_layers) for p in range(2, 12))
    one_window = sum((model.n_layers - layer) * (12 - 2)
                     for layer in range(model.n_layers) for p in range(2, 12))
    assert stats["layer_tokens"] <= windowed < one_window


@pytest.mark.parametrize("component,by_position", [
    ("attn_head", False), ("attn", True), ("mlp", True), ("mlp", False), ("mlp_neuron", False),
    ("resid_mid", True)])
def test_last_layer_runs_its_mlp_on_the_last_position_only(model, component, by_position,
                                                           monkeypatch):
    """Rows that reach the last decoder layer run its MLP branch on the last position only
    (``hooks.last_position_only``); a patch inside that MLP keeps only its last-position
    entries (the others change positions nothing reads). Equal to the naive loop (1e-5, float32
    logits), and no hook is left behind."""
    import causalpatch.engine as engine
    from causalpatch.hooks import hook_counts

    layers = [model.n_layers - 1]
    if component == "resid_mid" and getattr(model.config, "use_parallel_residual", False):
        with pytest.raises(UnknownComponentError, match="parallel residual"):
            plan_component(model, component, layers)
        return
    cuts = []
    real = engine.last_position_only

    def spy(root, path):
        cuts.append(path)
        return real(root, path)

    monkeypatch.setattr(engine, "last_position_only", spy)
    pair = make_pairs(model, *PAIRS[0], 5, 6)[0]
    plan = plan_component(model, component, layers)
    patches = build_patches(plan, resolve_positions(None, by_position, 12), by_position, 12)
    run = run_base_and_source(model, pair.corrupted, pair.clean, collect_sites(patches), patches,
                              Engine.FAST)
    fast = patched_logits(model, run, patches, Engine.FAST, batch_size=7)
    rows = naive_rows(fast, run.base_last.expand_as(fast), 1, 1, component)
    naive = patched_logits(model, run, [patches[i] for i in rows], Engine.NAIVE)
    assert_matches_reference(fast[rows], naive, run.base_last, rtol=RTOL, min_cells=MIN_CELLS,
                             what=f"{component} last layer")
    assert cuts  # every chunk has rows of more than one position
    assert all(path.startswith(model.runtime.layer_paths[-1] + ".") for path in cuts)
    assert hook_counts(model.hf_model) == {}


def test_memory_budget_too_small_names_the_minimum(model):
    with pytest.raises(InvalidArgumentError, match="memory_mb >= "):
        rows_per_chunk(model, 12, 12, 1e-6)
    assert rows_per_chunk(model, 12, 12, 64.0) >= 1


# -- perturbed base runs (causal tracing's noised embeddings) and readouts ----------------------
def test_perturbed_base_runs_equal_a_naive_noised_forward(model):
    """:func:`run_perturbed` base runs (the ``embed`` output replaced, here noise at positions
    3..5) and staircase rows patched from the plain run equal one plain forward each with the
    embedding replacement and the patch as interventions (tolerance 1e-5 in float32 logits);
    patches before the first perturbed position are exact no-ops, never computed."""
    import causalpatch.interventions as iv
    from causalpatch.engine import run_perturbed, staircase_logits
    from causalpatch.plan import SitePatch

    ids = model.to_tokens("abcdefghijkl")[0].tolist()
    n, T = model.n_layers, len(ids)
    plain = model.trace([ids], cache=["embed"]).run()
    gen = torch.Generator().manual_seed(0)
    embeds = plain.cache["embed"].float().repeat(2, 1, 1)
    embeds[:, 3:6] += torch.randn(2, 3, model.d_model, generator=gen)
    embeds = embeds.to(model.dtype)
    names = [f"blocks.{layer}.{kind}" for layer in range(n)
             for kind in ("resid_pre", "resid_post", "mlp", "attn")]
    runs = run_perturbed(model, ids, embeds, [model.site(name) for name in names])
    clean = model.trace([ids], cache=names).run()
    jobs, expected = [], []
    for r in range(2):
        noised = model.trace([ids], interventions={"embed": iv.replace_with(embeds[r:r + 1])}
                             ).run()
        assert_within(runs[r].base_last, noised.last_logits[0].float(), RUN_ATOL, "noised run")
        assert torch.equal(runs[r].source_last, runs[0].source_last)
        for name in names:
            for p in (1, 4, T - 1):
                jobs.append((r, (SitePatch(model.site(name), (p,)),)))
                value = clean.cache[name][:, p:p + 1]
                out = model.trace([ids], interventions={
                    "embed": iv.replace_with(embeds[r:r + 1]),
                    name: iv.replace_with(value, positions=[p])}).run()
                expected.append(out.last_logits[0].float())
    stats: dict = {}
    fast = staircase_logits(model, runs, jobs, stats=stats)
    expected_t = torch.stack(expected)
    # not vacuous: restorations change the noised runs' logits
    assert_matches_reference(fast, expected_t, torch.stack([runs[r].base_last for r, _ in jobs]),
                             rtol=RTOL, min_cells=MIN_CELLS, what="perturbed runs")
    # position 1 is before the noise (and the layer-0 input at T - 1 is a plain embedding):
    # those patches are skipped, never computed (a sliding-window layer may add exact no-ops)
    assert stats["skipped"] >= 2 * (len(names) + 1)
    assert stats["rows"] + stats["skipped"] == len(jobs)
    # the readout is applied per batch, no-op rows get the base run's readout
    top = staircase_logits(model, runs, jobs, readout=lambda x: x.max(-1, keepdim=True).values)
    assert_within(top[:, 0], fast.max(-1).values, READOUT_ATOL, "readout")


def test_perturbed_base_runs_check_their_shape(model):
    from causalpatch.engine import run_perturbed

    before = model.hook_snapshot()
    with pytest.raises(InvalidArgumentError, match=r"base_embeds must be \[n_runs, 4, "):
        run_perturbed(model, [5, 6, 7, 8], torch.zeros(2, 3, model.d_model), [])
    assert model.hook_snapshot() == before



def _check_pair_run(model, run, base_ids, source_ids, names, start):
    """``run``'s activations and last logits equal a plain forward of each prompt (1e-5), its
    prefix positions are bitwise equal in base and source, and its staircase is the base
    row's alone (one row per layer call and in the caches)."""
    base = model.trace([list(base_ids)], cache=names).run()
    source = model.trace([list(source_ids)], cache=names).run()
    for name in names:
        assert_within(run.base.acts[name], base.cache[name], RUN_ATOL, f"base {name}")
        assert_within(run.source.acts[name], source.cache[name], RUN_ATOL, f"source {name}")
        assert torch.equal(run.base.acts[name][:, :start], run.source.acts[name][:, :start])
    assert_within(run.base_last, base.last_logits[0].float(), RUN_ATOL, "base logits")
    assert_within(run.source_last, source.last_logits[0].float(), RUN_ATOL, "source logits")
    st = run.prepared
    assert st is not None and st.start == start
    for layer, call in enumerate(st.calls):
        assert call.hidden.shape[0] == 1
        assert_within(call.hidden, base.cache[f"blocks.{layer}.resid_pre"][:, start:],
                      RUN_ATOL, f"staircase input {layer}")
    for cache in (st.prefix_cache, st.full_cache):
        if cache is not None:
            assert all(entry.keys.shape[0] == 1 for entry in cache.layers
                       if getattr(entry, "keys", None) is not None and entry.keys.numel() > 0)


def test_pair_runs_batch_pairs_of_one_shape(model):
    """:func:`pair_runs` runs pairs of one token length and first difference together (their
    prefixes as one batch, then every base and source suffix as one batch), identical prompts
    of one length together from position 0: every run equals plain forwards of its prompts,
    and the staircase rows of the batched runs equal the naive loop (1e-5)."""
    from causalpatch.engine import pair_runs

    texts = [*PAIRS, ("bcdefghijkla", "bcdefYhijkla"),  # first difference at 5, like PAIRS[0]
             ("cdefghijklab", "cdefghijklab"), ("abcdefghijkl", "abcdefghijkl")]  # identical
    names = [f"blocks.{layer}.{kind}" for layer in range(model.n_layers)
             for kind in ("resid_pre", "resid_post")]
    ids = [(model.to_tokens(corrupted)[0].tolist(), model.to_tokens(clean)[0].tolist())
           for clean, corrupted in texts]
    runs = pair_runs(model, ids, [model.site(name) for name in names])
    starts = [5, 6, 2, 5, 0, 0]
    for run, (base_ids, source_ids), start in zip(runs, ids, starts):
        _check_pair_run(model, run, base_ids, source_ids, names, start)
    assert runs[4].source is runs[4].base  # identical prompts: one run
    plan = plan_component(model, "resid_post", None, None, None)
    patches = build_patches(plan, resolve_positions(None, True, 12), True, 12)
    jobs = [(r, p) for r in range(len(runs)) for p in patches]
    fast = patched_logits_many(model, runs, jobs, Engine.FAST)
    naive = torch.cat([patched_logits(model, run, patches, Engine.NAIVE) for run in runs])
    assert_matches_reference(fast, naive, torch.stack([runs[r].base_last for r, _ in jobs]),
                             rtol=RTOL, min_cells=MIN_CELLS, what="pair runs")


def test_pair_run_batches_base_and_source_suffixes(model):
    """:func:`run_pair` runs the base and source suffixes as one batch of two rows on their
    shared prefix (checked as in :func:`_check_pair_run`)."""
    from causalpatch.engine import run_pair

    pair = make_pairs(model, *PAIRS[0], 5, 6)[0]  # first difference at position 5
    names = [f"blocks.{layer}.{kind}" for layer in range(model.n_layers)
             for kind in ("resid_pre", "resid_post")]
    run = run_pair(model, pair.corrupted, pair.clean, [model.site(name) for name in names])
    _check_pair_run(model, run, pair.corrupted, pair.clean, names, 5)

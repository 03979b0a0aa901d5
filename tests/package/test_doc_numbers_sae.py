"""docs/sae_patching.md quotes examples/sae_ioi.py's JSON, and every SAE figure has its own.

The page's IOI findings come from one command, ``python examples/sae_ioi.py``, which writes the
run's summary ``docs/img/sae_ioi.json`` and, beside each figure ``docs/img/sae_ioi_*.png``, a JSON
of the same stem (command, commit, settings, the plotted numbers; ``scripts/provenance.py``).
These tests check that every number the page quotes equals that JSON at the page's rounding
(prose through :data:`QUOTES`, the tables row by row), that the figure JSONs hold the numbers
of the summary they were drawn from, and the few facts about the run the prose relies on (the
error term patched two ways agrees, the headline feature is ranked first on held-out pairs,
...). The helpers are those of ``test_doc_numbers.py``.
"""

from __future__ import annotations

import json
import math

import pytest
from conftest import REPO_ROOT
from test_doc_numbers import assert_quoted, load, page, quoted, render, squash

SAE_IOI = "docs/img/sae_ioi.json"
SAE_CFG = "tests/data/saes/smollm2-blocks.20.resid_post-topk-2048/cfg.json"
REPORT = "metadata/training_report/"
S2, END = "positions_detail/S2/", "positions_detail/END/"
ATTR = "attribution_vs_exact/"
COST = "splice_cost/"
SUFF = "sufficiency/"
HELD = SUFF + "heldout_templates/"
HELD_NAMES = SUFF + "heldout_templates_and_names/"
FIGURES = ("sae_ioi_features", "sae_ioi_recovery", "sae_ioi_attribution", "sae_ioi_sufficiency")
ROLES = ("clean ABBA", "clean BABA", "corrupted ABBA", "corrupted BABA")
DOC = "sae_patching.md"


def ci(path: str) -> tuple[str, str, str]:
    """The key paths of a value quoted as ``v [lo, hi]``: ``path`` and ``path_ci/0``, ``/1``."""
    return path, path + "_ci/0", path + "_ci/1"


#: (quoted text with ``{}`` per number, key paths into sae_ioi.json (or the SAE's cfg.json when
#: the first path starts with ``metadata/``), roundings).
QUOTES: list[tuple[str, tuple[str, ...], str | tuple[str, ...]]] = [
    # the shipped SAE's training report (its cfg.json)
    ('print(sae.metadata["training_report"]["explained_variance"])   # {}',
     (REPORT + "explained_variance",), ".3f"),
    ("| {} features, k = {} (shipped in `tests/data/saes`) | {} | {} | {} | {} / {} / {} | "
     "{} |", (REPORT + "d_sae", REPORT + "k", REPORT + "explained_variance", REPORT + "l0",
              REPORT + "dead_fraction", REPORT + "ce_clean", REPORT + "ce_spliced",
              REPORT + "ce_zero", REPORT + "ce_recovered"),
     ("d", "d", ".3f", ".0f", ".0%", ".3f", ".3f", ".3f", ".1%")),
    ("Left in, those {} tokens of", (REPORT + "sink_tokens",), "d"),
    # the IOI findings: the run
    ("`python examples/sae_ioi.py` (about {} minutes on one thread of a shared machine)",
     ("seconds/total",), "min"),
    ("the discovery set: {} IOI pairs", ("n_pairs",), "d"),
    ("split between the second subject (S2, position {}) and the last position (END, {})",
     ("positions/S2", "positions/END"), "d"),
    ("patching the residual stream at S2 restores {} [{}, {}] of the logit difference, at END "
     "{} [{}, {}].", (*ci("positions_detail/S2/site"), *ci("positions_detail/END/site")),
     ".3f"),
    # the splice
    ("the SAE's {} held-out sequences ({} tokens after the first of each)",
     (COST + "text/sequences", COST + "text/tokens_per_sequence"), "d"),
    ("the next-token loss rises from {} to {} nats, by {} nats [{}, {}]",
     (COST + "text/ce_clean", COST + "text/ce_spliced", COST + "text/delta_nats",
      COST + "text/delta_ci/0", COST + "text/delta_ci/1"), ".3f"),
    ("{} of the way from zeroing the site back to the clean loss", (COST + "text/ce_recovered",),
     ".1%"),
    ("On the {} IOI prompts themselves the loss rises from {} to {} nats (+{})",
     ("n_pairs", COST + "ioi_prompts/ce_clean", COST + "ioi_prompts/ce_spliced",
      COST + "ioi_prompts/delta_nats"), ("d", ".2f", ".2f", ".2f")),
    ("the clean-minus-corrupted logit difference falls from {} to {} [{}, {}]",
     (COST + "ioi_logit_diff/gap", COST + "ioi_logit_diff/gap_spliced",
      COST + "ioi_logit_diff/gap_spliced_ci/0", COST + "ioi_logit_diff/gap_spliced_ci/1"),
     ".2f"),
    # END
    ("Feature {} fires (activation about {})",
     (END + "top/0/feature", END + "top/0/fires/clean BABA"), ("d", ".1f")),
    ("Patching it alone restores {} [{}, {}] of the logit difference, {} of the whole site's "
     "effect", (END + "top/0/exact", END + "top/0/exact_ci/0", END + "top/0/exact_ci/1",
                END + "top/0/exact / " + END + "site"), (".3f", ".3f", ".3f", ".0%")),
    ("1426 (same polarity, {}) and {}, {}, {} (the opposite polarity",
     (END + "top/1/exact", END + "top/3/feature", END + "top/4/feature", END + "top/8/feature"),
     (".3f", "d", "d", "d")),
    # S2
    ("the largest, {}, restores {} [{}, {}] of {}. The features that differ ({} per pair)",
     (S2 + "top/0/feature", S2 + "top/0/exact", S2 + "top/0/exact_ci/0",
      S2 + "top/0/exact_ci/1", S2 + "site", S2 + "differing_features"),
     ("d", ".3f", ".3f", ".3f", ".3f", ".0f")),
    ("({}: {} / {} / {} / {} — \"S2 repeats",
     (S2 + "top/0/feature", *(S2 + "top/0/fires/" + r for r in ROLES)),
     ("d", ".2f", ".2f", ".2f", ".2f")),
    ("with a name-fragment feature ({}, 'Ali') and a pronoun feature ({}, top tokens ' he', "
     "' He')", (S2 + "top/1/feature", S2 + "top/3/feature"), "d"),
    ("The two parts are not additive ({} + {} < {} at S2)",
     (S2 + "all_features_joint", S2 + "error_check", S2 + "site"), ".3f"),
    # the difference the SAE reconstructs
    ("Only at S2 does the SAE reconstruct any of the difference ({})",
     ("difference_explained/by_position/0/difference_explained",), ".0%"),
    ("Patching all features at END still restores {} of the logit difference",
     (END + "all_features_joint",), ".3f"),
    # sufficiency
    ("**Sufficiency on held-out templates.** Feature {}", (SUFF + "headline",), "d"),
    ("As controls, {} random features of the {} ({} on the second set) whose activation at END "
     "changes with the corruption in at least half of those pairs, as feature {}'s does (in {} "
     "and {} of {}), patched one at a time, restore next to nothing (none more than {})",
     ("settings/controls", HELD + "control_pool", HELD_NAMES + "control_pool",
      SUFF + "headline", HELD + "headline_changes_in", HELD_NAMES + "headline_changes_in",
      HELD + "n_pairs", HELD + "control_max_abs"), ("d",) * 7 + (".3f",)),
    ("carries about a quarter of what the residual stream at END carries to the answer ({} of "
     "{})", (HELD + "headline", HELD + "site"), ".3f"),
    # attribution
    ("Over all {} cells (2048 features x 2 positions) the estimates correlate with the exact "
     "effects at r = {}", (ATTR + "cells", ATTR + "pearson_all_cells"), (",d", ".3f")),
    ("only {} cells can be non-zero", (ATTR + "live_cells",), "d"),
    ("and one of them, feature {} at END, holds {} of their variance",
     (ATTR + "largest_cell/feature", ATTR + "largest_cell_share_of_variance"), ("d", ".0%")),
    ("Over the live cells r = {}, and {} without that one cell; Spearman's rank correlation "
     "is {} [{}, {}]", (ATTR + "pearson_live", ATTR + "pearson_live_without_largest",
                       ATTR + "spearman_live", ATTR + "spearman_live_ci/0",
                       ATTR + "spearman_live_ci/1"), ".3f"),
    ("the largest cell is underestimated ({} against {})",
     (ATTR + "largest_cell/estimate", ATTR + "largest_cell/exact"), ".3f"),
]


@pytest.mark.parametrize("text,paths,specs", QUOTES, ids=[q[0][:40] for q in QUOTES])
def test_quoted_number_matches_the_json(text, paths, specs):
    source = SAE_CFG if paths[0].startswith("metadata/") else SAE_IOI
    assert_quoted(DOC, text, source, paths, specs)


def rows_in_order(table_header: str, rows: list[str]) -> None:
    """Every row of ``rows`` is on the page, in this order, after ``table_header``."""
    text = page(DOC)
    assert table_header in text, f"docs/{DOC} has no table {table_header!r}"
    at = text.index(table_header)
    for i, expected in enumerate(rows):
        found = text.find(squash(expected), at)
        assert found >= 0, f"row {i} {expected!r} not in the table {table_header!r}"
        at = found + len(squash(expected))


def value_ci(value: float, lo: float, hi: float, spec: str) -> str:
    return f"{render(value, spec)} [{render(lo, spec)}, {render(hi, spec)}]"


@pytest.mark.parametrize("position", ["S2", "END"])
def test_feature_tables_match_the_json(position):
    """Every row of the S2 and END feature tables is one of the JSON's top 10 features, in
    order: feature, exact effect with its interval, estimate, mean activation per prompt kind."""
    top = load(SAE_IOI)["positions_detail"][position]["top"]
    assert len(top) == 10
    rows = [f"| {r['feature']} | {value_ci(r['exact'], *r['exact_ci'], '±.3f')} | "
            f"{render(r['estimate'], '±.3f')} | "
            + " / ".join(render(r["fires"][k], ".2f") for k in ROLES) + " |" for r in top]
    rows_in_order(f"| {position} feature |", rows)


def test_recovery_table_matches_the_json():
    """Whole site, top 10 together, all features together, error term alone: effect, interval
    and share of the site's effect, per position."""
    rows = []
    for name in ("S2", "END"):
        d = load(SAE_IOI)["positions_detail"][name]
        cells = [value_ci(d["site"], *d["site_ci"], ".3f")]
        for key, ci_key in (("top_joint", "top_joint_ci"),
                            ("all_features_joint", "all_features_ci"),
                            ("error_check", "error_ci")):
            cells.append(f"{value_ci(d[key], *d[ci_key], '.3f')} "
                         f"({render(d[key] / d['site'], '.0%')})")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    rows_in_order("| position | whole site |", rows)


def test_difference_explained_table_covers_every_position_that_differs():
    """One row per position from S2 to END (every position where the runs differ), signed."""
    data = load(SAE_IOI)
    by_pos = data["difference_explained"]["by_position"]
    s2, end = data["positions"]["S2"], data["positions"]["END"]
    assert [r["position"] for r in by_pos] == list(range(s2, end + 1))
    # before S2 the clean and corrupted prompts are the same tokens: bitwise equal activations
    assert data["difference_explained"]["identical_before_S2_max_abs_diff"] == 0.0
    names = {s2: " (S2)", end: " (END)"}
    rows = [f"| {r['position']}{names.get(r['position'], '')} | `{r['token']}` | "
            f"{value_ci(r['difference_explained'], *r['ci'], '±.2f')} | "
            f"{render(r['cosine'], '.2f')} | {render(r['difference_over_norm'], '.2f')} | "
            f"{render(r['recon_error_over_norm'], '.2f')} |" for r in by_pos]
    rows_in_order("| position | token (first pair) | difference explained", rows)


def test_attribution_table_matches_the_json():
    rows = []
    for name, r in load(SAE_IOI)["attribution_vs_exact"]["by_position"].items():
        rows.append(f"| {name} | {r['live_cells']} | "
                    f"{value_ci(r['spearman'], *r['spearman_ci'], '.3f')} | "
                    + " | ".join(value_ci(r[f'recall_top{k}'], *r[f'recall_top{k}_ci'], '.2f')
                                 for k in (5, 10, 20)) + " |")
    rows_in_order("| position | live cells |", rows)


def test_sufficiency_table_matches_the_json():
    s = load(SAE_IOI)["sufficiency"]
    rows = []
    for key, label in (("heldout_templates", "held-out templates"),
                       ("heldout_templates_and_names", "held-out templates and names")):
        r = s[key]
        rows.append(
            f"| {label} | {r['n_pairs']} | {value_ci(r['headline'], *r['headline_ci'], '.3f')} "
            f"| {r['headline_rank']} | "
            f"{value_ci(r['control_mean'], *r['control_mean_ci'], '±.3f')}; "
            f"{render(r['control_max_abs'], '.3f')} | "
            f"{value_ci(r['top10'], *r['top10_ci'], '.3f')} | "
            f"{value_ci(r['all_features'], *r['all_features_ci'], '.3f')} | "
            f"{value_ci(r['site'], *r['site_ci'], '.3f')} |")
    rows_in_order("| held-out set | pairs |", rows)


def test_run_facts_the_prose_relies_on():
    """What the page says in words about the run, checked on the JSON."""
    data = load(SAE_IOI)
    # the error term patched two ways (sae_patching's reference, a direct trace) agrees;
    # observed: equal to 1e-7 (float32 logits of different batch shapes)
    for name in ("S2", "END"):
        d = data["positions_detail"][name]
        assert math.isclose(d["error"], d["error_check"], abs_tol=1e-5), name
        assert math.isclose(d["all_features"], d["all_features_joint"], abs_tol=1e-5), name
    s = data["sufficiency"]
    # "the feature picked at END on the discovery template is ... on both held-out sets"
    assert s["headline"] == data["positions_detail"]["END"]["top"][0]["feature"]
    for key in ("heldout_templates", "heldout_templates_and_names"):
        r = s[key]
        assert r["headline_rank"] == 1, key
        assert r["templates_used"] == 11 and r["templates"] == list(range(1, 12)), key
        assert r["headline_ci"][0] > r["control_mean_ci"][1], key  # intervals do not overlap
        assert len(r["controls"]) == data["settings"]["controls"] <= r["control_pool"]
        assert r["headline_changes_in"] >= r["n_pairs"] / 2  # the pool's own criterion
    # "none more than {}" quotes the first set's largest control: it bounds the second's too
    assert (s["heldout_templates_and_names"]["control_max_abs"]
            <= round(s["heldout_templates"]["control_max_abs"], 3))
    assert s["unused_names"] >= 5
    # "at every later position, END included, it reconstructs it worse than not at all: there
    # the two runs differ by 6-28% of the activation's norm while the reconstruction error is
    # 41-50% of it"
    later = data["difference_explained"]["by_position"][1:]
    assert all(r["difference_explained"] < 0 and r["ci"][1] < 0 for r in later)
    differ = [r["difference_over_norm"] for r in later]
    error = [r["recon_error_over_norm"] for r in later]
    assert f"differ by {min(differ):.0%}–{max(differ):.0%} of the activation's norm".replace(
        "%–", "–") in page(DOC)
    assert f"reconstruction error is {min(error):.0%}–{max(error):.0%} of it".replace(
        "%–", "–") in page(DOC)
    # the splice: "+0.27 nats, the perplexity 1.31 times", "zeroing costs 7 nats" (cfg.json)
    report = load(SAE_CFG)["metadata"]["training_report"]
    delta = report["ce_spliced"] - report["ce_clean"]
    assert f"| {report['ce_recovered']:.1%} | {delta:+.2f} |" in page(DOC)
    assert f"{delta:+.2f} nats, the perplexity {math.exp(delta):.2f} times" in page(DOC)
    assert f"zeroing costs {report['ce_zero'] - report['ce_clean']:.0f} nats" in page(DOC)
    assert data["splice_cost"]["text"]["delta_ci"][0] > 0.1
    # "All 2048 features together carry under 40% of it"; "under half ... at END, and a fifth
    # at S2"
    for key in ("heldout_templates", "heldout_templates_and_names"):
        assert s[key]["all_features"] / s[key]["site"] < 0.4
    d = data["positions_detail"]
    assert d["END"]["all_features_joint"] / d["END"]["site"] < 0.5
    assert round(d["S2"]["all_features_joint"] / d["S2"]["site"], 1) == 0.2


@pytest.mark.parametrize("stem", FIGURES)
def test_every_sae_figure_has_its_json_from_the_same_run(stem):
    """``docs/img/<stem>.png`` has ``<stem>.json`` beside it, written by the run the summary
    describes (same command and commit)."""
    img = REPO_ROOT / "docs" / "img" / f"{stem}.png"
    assert img.exists(), img
    fig = json.loads(img.with_suffix(".json").read_text())
    summary = load(SAE_IOI)
    assert fig["figure"] == img.name
    assert fig["command"] == summary["command"]
    assert fig["command"].startswith("python examples/sae_ioi.py")
    assert fig["commit"] == summary["commit"] and len(fig["commit"]) >= 40
    assert fig["settings"] == summary["settings"]
    assert f"(img/{stem}.png)" in page(DOC)


def test_figure_jsons_hold_the_summary_numbers():
    """The numbers each figure draws are the summary's (one run made both)."""
    summary = load(SAE_IOI)

    def fig(stem: str) -> dict:
        return json.loads((REPO_ROOT / "docs" / "img" / f"{stem}.json").read_text())

    features = fig("sae_ioi_features")["data"]
    recovery = fig("sae_ioi_recovery")["data"]
    for name in ("S2", "END"):
        d = summary["positions_detail"][name]
        assert [r["feature"] for r in features[name]] == [r["feature"] for r in d["top"]]
        assert [r["exact_ci"] for r in features[name]] == [r["exact_ci"] for r in d["top"]]
        assert recovery[name]["whole site"] == {"effect": d["site"], "ci": d["site_ci"]}
        assert recovery[name]["error term alone"] == {"effect": d["error_check"],
                                                      "ci": d["error_ci"]}
    attribution = fig("sae_ioi_attribution")
    assert attribution["statistics"] == summary["attribution_vs_exact"]
    live = summary["attribution_vs_exact"]["live_cells_by_position"]
    assert [len(attribution["data"][n]["features"]) for n in ("S2", "END")] == live
    sufficiency = fig("sae_ioi_sufficiency")["data"]
    for key in ("heldout_templates", "heldout_templates_and_names"):
        r = summary["sufficiency"][key]
        headline = sufficiency[key][f"feature {summary['sufficiency']['headline']}"]
        assert headline == {"effect": r["headline"], "ci": r["headline_ci"]}


def test_the_checks_fail_on_a_changed_number():
    """Not vacuous: a JSON value nudged past its rounding is no longer found on the page."""
    text, paths, specs = next(q for q in QUOTES if q[1][0] == ATTR + "pearson_live")
    data = json.loads(json.dumps(load(SAE_IOI)))
    assert quoted(text, data, paths, specs) in page(DOC)
    data["attribution_vs_exact"]["spearman_live_ci"][0] -= 0.01
    assert quoted(text, data, paths, specs) not in page(DOC)

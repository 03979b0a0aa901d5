"""The numbers the docs quote from committed JSON still match that JSON.

Each row of :data:`QUOTES` names a doc page, the quoted text with ``{}`` where each number
stands, the committed JSON file behind the numbers, one key path per number and its rounding.
The test formats each JSON value with its rounding, puts it into the text, and checks that the
page holds exactly that text (whitespace, including line breaks, counts as one space). A doc
edited without the JSON, or JSON regenerated without the doc, fails here and says which.

Key paths are ``/``-separated keys and list indices into the JSON; ``"a / b"`` is the ratio of
two values (a share, quoted as a percentage). Roundings are Python format specs; a leading
``±`` means a sign on every number, written with the typographic minus the pages use, and
``min`` means seconds quoted as whole minutes.

docs/sae_patching.md's numbers are checked in ``test_doc_numbers_sae.py``. Numbers the docs
quote with no committed JSON behind them (the benchmark pages' timings, the
4096-feature SAE kept in ``benchmarks/.cache``) are not checked here.
"""

from __future__ import annotations

import json
import re
from functools import cache
from typing import Any

import pytest
from conftest import REPO_ROOT

AB_CORE = "benchmarks/results/ab_method_core_part_two.json"
CIRCUITS = "benchmarks/results/circuits_ioi.json"
CHECKED = tuple(f"checked/{i}/{k}" for i in range(6) for k in ("src", "dst", "eap_ig", "eap",
                                                                "exact"))

#: (doc page, quoted text with ``{}`` per number, JSON file, key paths, roundings): one rounding
#: for every number, or one per number.
QUOTES: list[tuple[str, str, str, tuple[str, ...], str | tuple[str, ...]]] = [
    # -- docs/benchmarks.md: the A/B run of the core refactor -----------------------------------
    ("benchmarks.md", "in one process on a quiet machine, interleaved, min of {}, SmolLM2, {} "
     "threads: resid_post by position {} s old vs {} s new ({}), attn_head {} s vs {} s ({})",
     AB_CORE, ("repeats", "threads", "sweeps/resid_post_by_position/old_min_s",
               "sweeps/resid_post_by_position/new_min_s",
               "sweeps/resid_post_by_position/new_over_old", "sweeps/attn_head/old_min_s",
               "sweeps/attn_head/new_min_s", "sweeps/attn_head/new_over_old"),
     ("d", "d", ".3f", ".3f", ".3f", ".3f", ".3f", ".3f")),
    # -- docs/circuits.md: the IOI circuit of SmolLM2 (benchmarks/circuits_ioi.py's JSON) --------
    ("circuits.md", "scores the {} edges on {} IOI pairs (noising, `logit_diff`, EAP-IG with {} "
     "steps)", CIRCUITS, ("n_graph_edges", "n_pairs", "ig_steps"), (",d", "d", "d")),
    ("circuits.md", "| EAP-IG, top edges | {} | {} | | EAP, top edges | {} | {} | | random "
     "edges | {} | {} |", CIRCUITS,
     ("eap_ig/curve/cpr", "eap_ig/curve/cmd", "eap/curve/cpr", "eap/curve/cmd",
      "eap_ig/curve/random_cpr", "eap_ig/curve/random_cmd"), ".3f"),
    ("circuits.md", "| edges | {} | {} | {} | {} | {} | {} |", CIRCUITS,
     tuple(f"eap_ig/curve/sizes/{i}" for i in range(1, 7)), ",d"),
    ("circuits.md", "| EAP-IG | {} | {} | {} | {} | {} | {} | | EAP | {} | {} | {} | {} | {} | "
     "{} |", CIRCUITS, tuple(f"{m}/curve/faithfulness/{i}" for m in ("eap_ig", "eap")
                             for i in range(1, 7)), ".3f"),
    ("circuits.md", "half of the edges ({} at 50%)", CIRCUITS,
     ("eap_ig/curve/random_faithfulness/9",), ".3f"),
    ("circuits.md", "At {} edges EAP's circuit keeps {} edges after pruning (EAP-IG's {}): EAP "
     "scores `input -> m0` at {} where its exact effect is {} (EAP-IG: {})", CIRCUITS,
     ("eap/curve/sizes/1", "eap/curve/n_edges/1", "eap_ig/curve/n_edges/1", "checked/0/eap",
      "checked/0/exact", "checked/0/eap_ig"), ("d", "d", "d", ".3f", ".3f", ".3f")),
    ("circuits.md", "With {} edges, EAP-IG's top circuit ({} edges after pruning) is {} "
     "faithful and its greedy circuit ({}) {}; EAP's {} ({}) and {} ({}).", CIRCUITS,
     ("eap_ig/circuit/requested", "eap_ig/circuit/top_edges", "eap_ig/circuit/top_faithfulness",
      "eap_ig/circuit/greedy_edges", "eap_ig/circuit/greedy_faithfulness",
      "eap/circuit/top_faithfulness", "eap/circuit/top_edges",
      "eap/circuit/greedy_faithfulness", "eap/circuit/greedy_edges"),
     ("d", "d", ".3f", "d", ".3f", ".3f", "d", ".3f", "d")),
    ("circuits.md", " ".join(["| `{} -> {}` | {} | {} | {} |"] * 6), CIRCUITS, CHECKED,
     ("s", "s", "±.3f", "±.3f", "±.3f") * 6),
]

#: docs/positive_control.md: every number on the page, line by line, from
#: ``benchmarks/positive_control.py``'s JSON (``(quoted text, key paths, roundings)``).
POSITIVE_CONTROL = "docs/data/positive_control.json"
POSITIVE_CONTROL_QUOTES: list[tuple[str, tuple[str, ...], str | tuple[str, ...]]] = [
    ("the repeated tokens. It was trained for {} steps on one CPU thread",
     ("training/steps",), 'd'),
    ("({} s); on {} held-out predictions it is",
     ("training/seconds", "training/heldout_predictions"), ('.0f', 'd')),
    ("right {} of the time. It ships in `tests/data/induction_model/`",
     ("training/heldout_accuracy",), '.2%'),
    ("Three scores, on {} held-out repeated sequences (`[BOS] a_1..a_10 "
     "a_1..a_10`), from clean",
     ("circuit/n_sequences",), 'd'),
    ("| a0.h0 | {} | {} | ≈ 0 |",
     ("circuit/previous_token_scores/0/0", "circuit/induction_scores/0/0"), '.3f'),
    ("| a0.h1 | {} | {} | ≈ 0 |",
     ("circuit/previous_token_scores/0/1", "circuit/induction_scores/0/1"), '.3f'),
    ("| a0.h2 | {} | {} | ≈ 0 |",
     ("circuit/previous_token_scores/0/2", "circuit/induction_scores/0/2"), '.3f'),
    ("| a0.h3 | {} | {} | ≈ 0 |",
     ("circuit/previous_token_scores/0/3", "circuit/induction_scores/0/3"), '.3f'),
    ("| a1.h0 | {} | {} | {} |",
     ("circuit/previous_token_scores/1/0", "circuit/induction_scores/1/0",
      "circuit/copying_scores/1/0"),
     '.3f'),
    ("| a1.h1 | {} | {} | {} |",
     ("circuit/previous_token_scores/1/1", "circuit/induction_scores/1/1",
      "circuit/copying_scores/1/1"),
     '.3f'),
    ("| a1.h2 | {} | {} | {} |",
     ("circuit/previous_token_scores/1/2", "circuit/induction_scores/1/2",
      "circuit/copying_scores/1/2"),
     '.3f'),
    ("| a1.h3 | {} | {} | {} |",
     ("circuit/previous_token_scores/1/3", "circuit/induction_scores/1/3",
      "circuit/copying_scores/1/3"),
     '.3f'),
    ("(The layer-0 heads' copying scores are at most {} in",
     ("circuit/copying_scores_layer0_max_abs",), '.4f'),
    ("previous token, {} times as much as the next head (a0.h2). Attention "
     "alone does **not** single out one",
     ("circuit/previous_token_scores/0/3 / circuit/previous_token_scores/0/2",), '.1f'),
    ("differ in what they write: **a1.h1 copies** {} times more strongly than "
     "the next head (a1.h2),",
     ("circuit/copying_scores/1/1 / circuit/copying_scores/1/2",), '.1f'),
    ("Held-out prompts `[BOS] a_1..a_10 a_1..a_6` (17 tokens, {} pairs): the "
     "answer is `a_7`.",
     ("n_pairs",), 'd'),
    ("log-probability falls from {} to",
     ("activation_patching/clean_logprob",), '.4f'),
    ("{} (mean over pairs). The metric is the answer's",
     ("activation_patching/corrupted_logprob",), '.2f'),
    ("over the {} pairs (`result.ci()`, {} resamples); edge scores have no "
     "interval (`EdgeResult`",
     ("n_pairs", "n_boot"), ('d', ',d')),
    ("largest cells are the predicted ones: a0.h3 at position 7 {}",
     ("activation_patching/top/0/effect",), '.3f'),
    ("[{}, {}] and a1.h1 at the",
     ("activation_patching/top/0/ci95/0", "activation_patching/top/0/ci95/1"), '.3f'),
    ("last position {} [{},",
     ("activation_patching/top/1/effect", "activation_patching/top/1/ci95/0"), '.3f'),
    ("{}]. Next come the weaker induction heads at the last",
     ("activation_patching/top/1/ci95/1",), '.3f'),
    ("position, a1.h2 {} and a1.h0",
     ("activation_patching/top/2/effect",), '.3f'),
    ("{}; a0.h3 at position 6 itself is",
     ("activation_patching/top/3/effect",), '.3f'),
    ("{}.",
     ("activation_patching/previous_token_head_at_corrupted/effect",), '.4f'),
    ("| noising (Wang et al.'s default) | {} | {} [{}, {}] | {} |",
     ("path_patching/noise/q/effect", "path_patching/noise/k/effect",
      "path_patching/noise/k/ci95/0", "path_patching/noise/k/ci95/1",
      "path_patching/noise/v/effect"),
     ('.4f', '.3f', '.3f', '.3f', '.4f')),
    ("| denoising | {} | {} [{}, {}] | {} |",
     ("path_patching/denoise/q/effect", "path_patching/denoise/k/effect",
      "path_patching/denoise/k/ci95/0", "path_patching/denoise/k/ci95/1",
      "path_patching/denoise/v/effect"),
     ('.4f', '.3f', '.3f', '.3f', '.4f')),
    ("find the match (the key path alone does {} of the corruption's damage); "
     "denoising restores",
     ("path_patching/noise/k/effect",), '.0%'),
    ("it into a run where nothing else works ({} of the recovery). Path "
     "patching every head into the logits puts a1.h1 first",
     ("path_patching/denoise/k/effect",), '.0%'),
    ("({}), a1.h2 next ({}).",
     ("path_patching/direct_to_logits/0/effect", "path_patching/direct_to_logits/1/effect"),
     ('.3f', '.4f')),
    ("**Causal tracing** (ROME's: Gaussian noise on the first `a_6`'s "
     "embedding, {} draws, restore",
     ("causal_tracing/16/samples",), 'd'),
    ("{} clean and {} noised. Restoring the",
     ("causal_tracing/16/p_clean", "causal_tracing/16/p_noised"), '.3f'),
    ("{}",
     ("causal_tracing/16/resid_post/layer0_at_after_first/effect",), '.3f'),
    ("[{},",
     ("causal_tracing/16/resid_post/layer0_at_after_first/ci95/0",), '.3f'),
    ("{}], all of the difference; at",
     ("causal_tracing/16/resid_post/layer0_at_after_first/ci95/1",), '.3f'),
    ("position 6, the noised token itself, {}",
     ("causal_tracing/16/resid_post/layer0_at_corrupted/effect",), '±.4f'),
    ("[{},",
     ("causal_tracing/16/resid_post/layer0_at_corrupted/ci95/0",), '±.4f'),
    ("{}]. Layer 0's attention output gives",
     ("causal_tracing/16/resid_post/layer0_at_corrupted/ci95/1",), '±.4f'),
    ("the same at position 7 ({}) and nothing",
     ("causal_tracing/16/attn/layer0_at_after_first/effect",), '.3f'),
    ("elsewhere (at most {}); in layer 1 only the",
     ("causal_tracing/16/attn/layer0_max_abs_elsewhere",), '.4f'),
    ("the same two cells first, a1.h1 at the last position {}",
     ("attribution_patching/atp/top/0/effect",), '.3f'),
    ("and a0.h3 at position 7 {}",
     ("attribution_patching/atp/top/1/effect",), '.3f'),
    ("[{}, {}],",
     ("attribution_patching/atp/top/1/ci95/0", "attribution_patching/atp/top/1/ci95/1"), '.3f'),
    ("ahead of a1.h2 {}, but the magnitudes are off: a0.h3's",
     ("attribution_patching/atp/top/2/effect",), '.3f'),
    ("exact effect is {}, and its estimate is less than half of it. The error",
     ("activation_patching/top/0/effect",), '.3f'),
    ("from {} to {} (mean over pairs): a change far too large for",
     ("attribution_patching/induction_attention_last_to_after_first/corrupted",
      "attribution_patching/induction_attention_last_to_after_first/clean"),
     '.2f'),
    ("{}, AtP gives",
     ("attribution_patching/exact_induction_key_at_after_first/effect",), '.3f'),
    ("{} and AtP*",
     ("attribution_patching/atp/induction_key_at_after_first/effect",), '.3f'),
    ("{}: both rank it first, neither",
     ("attribution_patching/atp*/induction_key_at_after_first/effect",), '.3f'),
    ("| exact, noising | {}, {}, {} | {}, {}, {} | {} |",
     ("edge_attribution/exact_noise/known_ranks/input -> a0.h3.v",
      "edge_attribution/exact_noise/known_ranks/a0.h3 -> a1.h1.k",
      "edge_attribution/exact_noise/known_ranks/a1.h1 -> logits",
      "edge_attribution/exact_noise/top/0/score", "edge_attribution/exact_noise/top/1/score",
      "edge_attribution/exact_noise/top/2/score", "edge_attribution/exact_noise/top/3/score"),
     ('d', 'd', 'd', '.3f', '.3f', '.3f', '.4f')),
    ("| exact, denoising | {}, {}, {} | | {} |",
     ("edge_attribution/exact_denoise/known_ranks/input -> a0.h3.v",
      "edge_attribution/exact_denoise/known_ranks/a0.h3 -> a1.h1.k",
      "edge_attribution/exact_denoise/known_ranks/a1.h1 -> logits",
      "edge_attribution/exact_denoise/top/3/score"),
     ('d', 'd', 'd', '.3f')),
    ("| EAP-IG, noising | {}, {}, {} | | {} |",
     ("edge_attribution/eap_ig_noise/known_ranks/input -> a0.h3.v",
      "edge_attribution/eap_ig_noise/known_ranks/a0.h3 -> a1.h1.k",
      "edge_attribution/eap_ig_noise/known_ranks/a1.h1 -> logits",
      "edge_attribution/eap_ig_noise/top/3/score"),
     ('d', 'd', 'd', '.3f')),
    ("| EAP, denoising | {}, {}, {} | | {} (`a1.h2 -> logits`, rank 3) |",
     ("edge_attribution/eap_denoise/known_ranks/input -> a0.h3.v",
      "edge_attribution/eap_denoise/known_ranks/a0.h3 -> a1.h1.k",
      "edge_attribution/eap_denoise/known_ranks/a1.h1 -> logits",
      "edge_attribution/eap_denoise/top/2/score"),
     ('d', 'd', 'd', '.3f')),
    ("| EAP, noising | {}, {}, {} | every score at most {} | |",
     ("edge_attribution/eap_noise/known_ranks/input -> a0.h3.v",
      "edge_attribution/eap_noise/known_ranks/a0.h3 -> a1.h1.k",
      "edge_attribution/eap_noise/known_ranks/a1.h1 -> logits",
      "edge_attribution/eap_noise/max_abs"),
     ('d', 'd', 'd', '.4f')),
    ("Exact edge patching finds exactly the three edges, {} times above the "
     "next one when",
     ("edge_attribution/exact_noise/top/2/score / edge_attribution/exact_noise/top/3/score",),
     '.0f'),
    ("its gradient is taken at the clean run, where p(answer) is {} and the "
     "log-probability is flat,",
     ("causal_tracing/16/p_clean",), '.3f'),
    ("patching keeps a1.h1 at the last position ({})",
     ("control_value_corruption/induction_head_at_last/effect",), '.3f'),
    ("and drops a0.h3 at position 7 from {} to",
     ("activation_patching/top/0/effect",), '.3f'),
    ("{}; exact edge patching's",
     ("control_value_corruption/previous_token_head_at_after_first/effect",), '.4f'),
    ("top two edges become `a1.h1 -> logits` ({})",
     ("edge_attribution/control_value_exact_noise/top/0/score",), '.3f'),
    ("and `input -> a1.h1.v` ({}), the third",
     ("edge_attribution/control_value_exact_noise/top/1/score",), '.3f'),
    ("{}.",
     ("edge_attribution/control_value_exact_noise/top/2/score",), '.4f'),
    ("{}, induction scores at most",
     ("control_random_init/previous_token_scores_max",), '.3f'),
    ("{}), and the corruption barely moves the answer",
     ("control_random_init/induction_scores_max",), '.3f'),
    ("(log-probability {} clean, {} corrupted).",
     ("control_random_init/clean_logprob", "control_random_init/corrupted_logprob"), '.4f'),
    ("difference: no cell's 95% interval excludes 0 ({} of",
     ("control_random_init/cells_ci_excluding_0",), 'd'),
    ("{}; on the trained model {}",
     ("control_random_init/n_cells", "activation_patching/cells_ci_excluding_0"), 'd'),
    ("not absolute: the same key path is {} of the damage when noising and {} "
     "of the recovery when",
     ("path_patching/noise/k/effect", "path_patching/denoise/k/effect"), '.0%'),
    ("family of corruptions, {} pairs.",
     ("n_pairs",), 'd'),
    ("python benchmarks/positive_control.py --json "
     "docs/data/positive_control.json   # one thread, {} minutes here",
     ("seconds",), 'min'),
]
QUOTES += [("positive_control.md", text, POSITIVE_CONTROL, paths, specs)
           for text, paths, specs in POSITIVE_CONTROL_QUOTES]

@cache
def load(path: str) -> Any:
    return json.loads((REPO_ROOT / path).read_text())


@cache
def page(name: str) -> str:
    """The doc page with every run of whitespace (line breaks included) as one space."""
    return squash((REPO_ROOT / "docs" / name).read_text())


def squash(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def lookup(data: Any, path: str) -> Any:
    """The value at a ``/``-separated key path; ``"a / b"`` is the ratio of two paths."""
    if " / " in path:
        top, bottom = path.split(" / ")
        return lookup(data, top) / lookup(data, bottom)
    for key in path.split("/"):
        data = data[int(key)] if isinstance(data, list) else data[key]
    return data


def render(value: Any, spec: str) -> str:
    """``value`` rounded as the docs write it (``±``: always signed, typographic minus)."""
    if spec.startswith("±"):
        return format(value, "+" + spec[1:]).replace("-", "\u2212")
    if spec == "min":  # seconds quoted as whole minutes
        return format(value / 60, ".0f")
    if spec == "d":
        assert value == int(value), f"{value} is not a whole number"
        value = int(value)
    return format(value, spec)


def quoted(text: str, data: Any, paths: tuple[str, ...], specs: str | tuple[str, ...]) -> str:
    if isinstance(specs, str):
        specs = (specs,) * len(paths)
    assert len(specs) == len(paths) == text.count("{}"), text
    return squash(text.format(*(render(lookup(data, p), s) for p, s in zip(paths, specs))))


@pytest.mark.parametrize("doc,text,source,paths,specs", QUOTES,
                         ids=[f"{q[0]}:{q[1][:40]}" for q in QUOTES])
def test_quoted_number_matches_its_json(doc, text, source, paths, specs):
    assert_quoted(doc, text, source, paths, specs)


def assert_quoted(doc: str, text: str, source: Any, paths: Any, specs: Any) -> None:
    """``text`` with the JSON's numbers filled in is on the page ``docs/<doc>``; otherwise say
    which side moved: the text around the numbers, or a number."""
    expected = quoted(text, load(source), paths, specs)
    if expected in page(doc):
        return
    pieces = [squash(p).strip() for p in text.split("{}") if squash(p).strip()]
    missing = [p for p in pieces if p not in page(doc)]
    where = (f"the page no longer has the text {missing}" if missing else
             f"a number differs from {source}")
    raise AssertionError(f"docs/{doc}: {where}; expected to find {expected!r}")


def test_ab_run_found_every_effect_bitwise_equal():
    """docs/benchmarks.md says the refactored tree's effects equal the old tree's bitwise."""
    assert "every effect equal bitwise (`benchmarks/results/ab_method_core_part_two.json`)" in (
        page("benchmarks.md"))
    sweeps = load(AB_CORE)["sweeps"]
    assert set(sweeps) == {"resid_post_by_position", "attn_head"}
    assert all(s["max_abs_diff"] == 0.0 for s in sweeps.values())


def test_the_checks_fail_on_a_changed_number():
    """The check is not vacuous: one JSON value nudged past its rounding is not found."""
    doc, text, source, paths, specs = next(q for q in QUOTES if q[2] == CIRCUITS)  # n_pairs
    data = json.loads(json.dumps(load(source)))
    assert quoted(text, data, paths, specs) in page(doc)
    data["n_pairs"] += 1
    assert quoted(text, data, paths, specs) not in page(doc)


# -- docs/attribution_patching.md: AtP/AtP* accuracy and cost (benchmarks/results/) -------------
ATP_ACCURACY = "benchmarks/results/atp_accuracy.json"
ATP_COST = "benchmarks/results/atp_cost.json"


def _atp(task_component: str, method: str = "atp") -> dict[str, Any]:
    return load(ATP_ACCURACY)["results"][task_component][method]


def test_attribution_accuracy_table_is_the_committed_json():
    """The accuracy table is exactly what ``atp_accuracy.py --render`` prints from the JSON."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "atp_accuracy", REPO_ROOT / "benchmarks" / "atp_accuracy.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    table = module.render(load(ATP_ACCURACY))
    assert table.count("\n") == 21  # header, rule, 2 tasks x 5 components x 2 methods
    assert squash(table) in page("attribution_patching.md")


def test_attribution_prose_and_cost_numbers_match_the_json():
    """The numbers the text around the tables quotes, and the cost table."""
    rows = load(ATP_ACCURACY)["results"]
    rho = {k: format(_atp(k)["spearman"], ".2f") for k in rows} | {
        k + "*": format(_atp(k, "atp*")["spearman"], ".2f") for k in rows}
    doc = page("attribution_patching.md")
    for text in (
            f"**Heads on IOI rank well**: ρ = {rho['ioi/attn_head']}",
            f"**On factual recall they rank worse** (ρ = {rho['factual/attn_head']})",
            f"it raises ρ from {rho['ioi/attn_head_q']} to {rho['ioi/attn_head_q*']} "
            f"(`attn_head_q`) and from {rho['ioi/attn_head_k']} to {rho['ioi/attn_head_k*']} "
            f"(`attn_head_k`) on IOI, from {rho['factual/attn_head_q']} to "
            f"{rho['factual/attn_head_q*']} and {rho['factual/attn_head_k']} to "
            f"{rho['factual/attn_head_k*']} on factual recall",
            f"ranks well overall (ρ = {rho['ioi/resid_post']} on IOI)"):
        assert squash(text) in doc, text
    assert _atp("factual/attn_head")["false_negatives_top20_outside_top40"] == 5 and _atp("factual/attn_head", "atp*")[
        "false_negatives_top20_outside_top40"] == 1  # "five ... one outside AtP*'s"
    assert _atp("factual/attn_head_k", "atp*")["false_negatives_top20_outside_top40"] == 3
    assert _atp("factual/resid_post")["false_negatives_top20_outside_top40"] == 12
    cost = load(ATP_COST)["results"]
    for task, label in (("ioi", "IOI"), ("factual", "factual recall")):
        row = cost[f"{task}/attn_head"]
        fe = row["forward_equivalents_per_pair"]
        found = round(row["recall_top_k"] * row["top_k"])
        text = (f"| {label} | {row['cells']} | {fe['atp']:.1f} | {fe['atp*']:.1f} | "
                f"{fe['screen_prove']:.1f} | {fe['exact']:.1f} | "
                f"{row['screen_prove_over_exact']:.2f} | {found} of {row['top_k']} | "
                f"{row['verified_cells']} | {'yes' if row['bound_holds'] else 'no'} |")
        assert text in doc, text

"""docs/causal_tracing.md's findings equal the committed JSON of ``benchmarks/rome_controls.py``.

Each row of :data:`QUOTES` is a piece of the page with ``{}`` where a number stands, the JSON
file behind the numbers, one key path per number and its rounding. The test formats each JSON
value with its rounding, puts it into the text and checks that the page holds exactly that text
(any run of whitespace, line breaks included, counts as one space). A page edited without
rerunning the script, or JSON regenerated without the page, fails here and says which.

Key paths are ``/``-separated keys and list indices; ``"a - b"`` is the difference of two
values. Roundings are Python format specs; ``%`` specs format a fraction as a percentage and
``min`` quotes seconds as whole minutes.

Every ``docs/img/rome_*.png`` also has its JSON beside it (same stem) with the command, commit,
seed, settings and the plotted numbers, and the figures say they used 10 noise samples.
"""

from __future__ import annotations

import json
import re
from functools import cache
from typing import Any

import pytest
from conftest import REPO_ROOT

CONTROLS = "docs/img/rome_controls.json"
RESID, MLP, ATTN = "docs/img/rome_resid.json", "docs/img/rome_mlp.json", "docs/img/rome_attn.json"
LS, LT, FS = "last subject token", "last token", "first subject token"
F = "figures/"
W = "mlp_windows/"

#: (quoted text with ``{}`` per number, JSON file, key paths, roundings: one for all or one per
#: number).
QUOTES: list[tuple[str, str, tuple[str, ...], str | tuple[str, ...]]] = [
    ('resid_post`, `mlp`, `attn`, windows of 10) | {} | ',
     CONTROLS, ('sizes/fig_facts',), 'd'),
    (' | {} | | MLP win',
     CONTROLS, ('sizes/fig_samples',), 'd'),
    (" severed traces (the figures' first facts) | {} | ",
     CONTROLS, ('sizes/ctl_facts',), 'd'),
    (' | {} | | facts w',
     CONTROLS, ('sizes/ctl_samples',), 'd'),
    ('whose subject does not start at position 0 | {} | ',
     CONTROLS, ('sizes/late_facts',), 'd'),
    (' | {} | | token r',
     CONTROLS, ('sizes/ctl_samples',), 'd'),
    ('eplacement (activation patching, no noise) | {} pairs | — |',
     CONTROLS, ('sizes/token_pairs',), 'd'),
    ("token is the first token of the answer for **{} of ROME's ",
     CONTROLS, ('known/known',), 'd'),
    (" of ROME's {} known facts",
     CONTROLS, ('known/total',), ',d'),
    (' known facts ({})**; the run',
     CONTROLS, ('known/fraction',), '.1%'),
    (')**; the runs use those. {} of the ',
     CONTROLS, ('known/subject_at_0',), 'd'),
    (' of the {} (',
     CONTROLS, ('known/known',), 'd'),
    (' ({}) start with',
     CONTROLS, ('known/subject_at_0_fraction',), '.0%'),
    ('ntion sink). **The figures** (mean `p_clean` {}, `p_corrupt',
     CONTROLS, ('figures/p_clean/mean',), '.3f'),
    (', `p_corrupted` {} with noise ',
     CONTROLS, ('figures/p_corrupted/mean',), '.3f'),
    ("bject token's hidden state brings back up to {} [",
     CONTROLS, ('figures/resid_post/last subject token/peak/mean',), '.3f'),
    (' [{}, ',
     CONTROLS, ('figures/resid_post/last subject token/peak/ci95/0',), '.3f'),
    (', {}] (layer ',
     CONTROLS, ('figures/resid_post/last subject token/peak/ci95/1',), '.3f'),
    ('] (layer {}); restoring',
     CONTROLS, ('figures/resid_post/last subject token/peak_layer',), 'd'),
    ("); restoring the last token's, {} [",
     CONTROLS, ('figures/resid_post/last token/peak/mean',), '.3f'),
    (' [{}, ',
     CONTROLS, ('figures/resid_post/last token/peak/ci95/0',), '.3f'),
    (', {}] (layer ',
     CONTROLS, ('figures/resid_post/last token/peak/ci95/1',), '.3f'),
    ('] (layer {}). - *MLP, w',
     CONTROLS, ('figures/resid_post/last token/peak_layer',), 'd'),
    ('en:* largest for the window centred at layer {}: ',
     CONTROLS, ('figures/mlp/last subject token/peak_layer',), 'd'),
    (': {} [',
     CONTROLS, ('figures/mlp/last subject token/peak/mean',), '.3f'),
    (' [{}, ',
     CONTROLS, ('figures/mlp/last subject token/peak/ci95/0',), '.3f'),
    (', {}]. *Last tok',
     CONTROLS, ('figures/mlp/last subject token/peak/ci95/1',), '.3f'),
    (']. *Last token:* {} [',
     CONTROLS, ('figures/mlp/last token/peak/mean',), '.3f'),
    (' [{}, ',
     CONTROLS, ('figures/mlp/last token/peak/ci95/0',), '.3f'),
    (', {}] at the win',
     CONTROLS, ('figures/mlp/last token/peak/ci95/1',), '.3f'),
    ('] at the window centred at layer {}. - *Attenti',
     CONTROLS, ('figures/mlp/last token/peak_layer',), 'd'),
    ('. - *Attention, window 10, last token:* {} [',
     CONTROLS, ('figures/attn/last token/peak/mean',), '.3f'),
    (' [{}, ',
     CONTROLS, ('figures/attn/last token/peak/ci95/0',), '.3f'),
    (', {}] at the win',
     CONTROLS, ('figures/attn/last token/peak/ci95/1',), '.3f'),
    ('] at the window centred at layer {}; at the las',
     CONTROLS, ('figures/attn/last token/peak_layer',), 'd'),
    (" subject token attention's largest window is {}. **What the",
     CONTROLS, ('figures/attn/last subject token/peak/mean',), '.3f'),
    ("kens' identity, not a looked-up fact. On the {} control fac",
     CONTROLS, ('sizes/ctl_facts',), 'd'),
    (" window 10 (the figures' run on these facts, {} samples) | ",
     CONTROLS, ('mlp_windows/w10/samples',), 'd'),
    (' samples) | {} | ',
     CONTROLS, ('mlp_windows/w10/last subject token/peak_layer',), 'd'),
    (' | {} [',
     CONTROLS, ('mlp_windows/w10/last subject token/peak/mean',), '.3f'),
    (' [{}, ',
     CONTROLS, ('mlp_windows/w10/last subject token/peak/ci95/0',), '.3f'),
    (', {}] | | window',
     CONTROLS, ('mlp_windows/w10/last subject token/peak/ci95/1',), '.3f'),
    ('] | | window 10 without layer 0 | {} | ',
     CONTROLS, ('mlp_windows/w10_no0/last subject token/peak_layer',), 'd'),
    (' | {} [',
     CONTROLS, ('mlp_windows/w10_no0/last subject token/peak/mean',), '.3f'),
    (' [{}, ',
     CONTROLS, ('mlp_windows/w10_no0/last subject token/peak/ci95/0',), '.3f'),
    (', {}] | | window',
     CONTROLS, ('mlp_windows/w10_no0/last subject token/peak/ci95/1',), '.3f'),
    ('led"`, 10/48 of the depth) without layer 0 | {} | ',
     CONTROLS, ('mlp_windows/w6_no0/last subject token/peak_layer',), 'd'),
    (' | {} [',
     CONTROLS, ('mlp_windows/w6_no0/last subject token/peak/mean',), '.3f'),
    (' [{}, ',
     CONTROLS, ('mlp_windows/w6_no0/last subject token/peak/ci95/0',), '.3f'),
    (', {}] | | window',
     CONTROLS, ('mlp_windows/w6_no0/last subject token/peak/ci95/1',), '.3f'),
    ('] | | window 1 (one MLP) | {} | ',
     CONTROLS, ('mlp_windows/w1/last subject token/peak_layer',), 'd'),
    (' | {} [',
     CONTROLS, ('mlp_windows/w1/last subject token/peak/mean',), '.3f'),
    (' [{}, ',
     CONTROLS, ('mlp_windows/w1/last subject token/peak/ci95/0',), '.3f'),
    (', {}] | Leaving ',
     CONTROLS, ('mlp_windows/w1/last subject token/peak/ci95/1',), '.3f'),
    ('10 restoration at its peak changes the IE by {} [',
     CONTROLS, ('mlp_windows/w10_no0_vs_w10_at_peak/mean',), '+.3f'),
    (' [{}, ',
     CONTROLS, ('mlp_windows/w10_no0_vs_w10_at_peak/ci95/0',), '+.3f'),
    (', {}] (fact by f',
     CONTROLS, ('mlp_windows/w10_no0_vs_w10_at_peak/ci95/1',), '+.3f'),
    ('amples). The window centred at layer 0 gives {} with MLP 0 ',
     CONTROLS, ('mlp_windows/w10/layer0_window_at_last_subject/mean',), '.3f'),
    (' with MLP 0 and {} without it.',
     CONTROLS, ('mlp_windows/w10_no0/layer0_window_at_last_subject/mean',), '.3f'),
    ('ition later) on the same facts, `p_clean` is {} (',
     CONTROLS, ('bos/p_clean/mean',), '.3f'),
    (' ({} without) an',
     CONTROLS, ('bos/p_clean_same_facts_no_bos/mean',), '.3f'),
    (' without) and `p_corrupted` {}. The first ',
     CONTROLS, ('bos/p_corrupted/mean',), '.3f'),
    (' for the window centred at layer 0 goes from {} without the',
     CONTROLS, ('bos/no_bos_mlp_same_facts/first subject token/by_layer/0',), '.3f'),
    (' without the BOS to {} with it, an',
     CONTROLS, ('bos/mlp/first subject token/by_layer/0',), '.3f'),
    (" with it, and the last subject token's from {} to ",
     CONTROLS, ('bos/no_bos_mlp_same_facts/last subject token/by_layer/0',), '.3f'),
    (' to {}; the last s',
     CONTROLS, ('bos/mlp/last subject token/by_layer/0',), '.3f'),
    ("e last subject token's largest MLP window is {} [",
     CONTROLS, ('bos/mlp/last subject token/peak/mean',), '.3f'),
    (' [{}, ',
     CONTROLS, ('bos/mlp/last subject token/peak/ci95/0',), '.3f'),
    (', {}] (centred a',
     CONTROLS, ('bos/mlp/last subject token/peak/ci95/1',), '.3f'),
    ('] (centred at layer {}) with the B',
     CONTROLS, ('bos/mlp/last subject token/peak_layer',), 'd'),
    (') with the BOS and {} (layer ',
     CONTROLS, ('bos/no_bos_mlp_same_facts/last subject token/peak/mean',), '.3f'),
    (' (layer {}) without. O',
     CONTROLS, ('bos/no_bos_mlp_same_facts/last subject token/peak_layer',), 'd'),
    (') without. On {} other known',
     CONTROLS, ('subject_start/n_late',), 'd'),
    ('ubject starts later in the prompt (`p_clean` {}, `p_corrupt',
     CONTROLS, ('subject_start/late_p_clean/mean',), '.3f'),
    (', `p_corrupted` {}), the last ',
     CONTROLS, ('subject_start/late_p_corrupted/mean',), '.3f'),
    ("e last subject token's hidden state peaks at {} [",
     CONTROLS, ('subject_start/resid_post/late/last subject token/peak/mean',), '.3f'),
    (' [{}, ',
     CONTROLS, ('subject_start/resid_post/late/last subject token/peak/ci95/0',), '.3f'),
    (', {}] and its la',
     CONTROLS, ('subject_start/resid_post/late/last subject token/peak/ci95/1',), '.3f'),
    ('] and its largest MLP window at {} [',
     CONTROLS, ('subject_start/mlp/late/last subject token/peak/mean',), '.3f'),
    (' [{}, ',
     CONTROLS, ('subject_start/mlp/late/last subject token/peak/ci95/0',), '.3f'),
    (', {}] (centred a',
     CONTROLS, ('subject_start/mlp/late/last subject token/peak/ci95/1',), '.3f'),
    ('] (centred at layer {}), against ',
     CONTROLS, ('subject_start/mlp/late/last subject token/peak_layer',), 'd'),
    ('), against {} and ',
     CONTROLS, ('subject_start/resid_post/start_0/last subject token/peak/mean',), '.3f'),
    (' and {} for the ',
     CONTROLS, ('subject_start/mlp/start_0/last subject token/peak/mean',), '.3f'),
    (' for the {} figure fact',
     CONTROLS, ('subject_start/n_start_0',), 'd'),
    ("' embeddings; over the subject tokens of the {} known facts",
     CONTROLS, ('known/known',), 'd'),
    (' known facts it is {}, so the noi',
     CONTROLS, ('sigma_subject/subject_std',), '.4f'),
    (', so the noise is {} against ',
     CONTROLS, ('sigma_subject/sigma',), '.3f'),
    (' against {} with the vo',
     CONTROLS, ('sigma_subject/vocab_sigma',), '.3f'),
    (" with the vocabulary's σ. `p_corrupted` is {} (",
     CONTROLS, ('sigma_subject/p_corrupted/mean',), '.3f'),
    (' ({} with the vo',
     CONTROLS, ('sigma_subject/p_corrupted_vocab_same_facts/mean',), '.3f'),
    ("e last subject token's largest MLP window is {} [",
     CONTROLS, ('sigma_subject/mlp/last subject token/peak/mean',), '.3f'),
    (' [{}, ',
     CONTROLS, ('sigma_subject/mlp/last subject token/peak/ci95/0',), '.3f'),
    (', {}] (centred a',
     CONTROLS, ('sigma_subject/mlp/last subject token/peak/ci95/1',), '.3f'),
    ('] (centred at layer {}; with the v',
     CONTROLS, ('sigma_subject/mlp/last subject token/peak_layer',), 'd'),
    ("; with the vocabulary's σ {}), the last ",
     CONTROLS, ('mlp_windows/w10/last subject token/peak/mean',), '.3f'),
    ("), the last token's {}. **Control ",
     CONTROLS, ('sigma_subject/mlp/last token/peak/mean',), '.3f'),
    ('en state after layer 10 restored alone gives {}; with the M',
     CONTROLS, ('severed/resid_post_layer10/mean',), '.3f'),
    ('t that token kept at their corrupted values, {} (a change o',
     CONTROLS, ('severed/resid_post_sever_mlp_layer10/mean',), '.3f'),
    (' (a change of {} [',
     CONTROLS, ('severed/resid_post_sever_mlp_minus_plain_layer10/mean',), '+.3f'),
    (' [{}, ',
     CONTROLS, ('severed/resid_post_sever_mlp_minus_plain_layer10/ci95/0',), '+.3f'),
    (', {}]); with the',
     CONTROLS, ('severed/resid_post_sever_mlp_minus_plain_layer10/ci95/1',), '+.3f'),
    ('th the later attention outputs kept instead, {} (',
     CONTROLS, ('severed/resid_post_sever_attn_layer10/mean',), '.3f'),
    (' ({} [',
     CONTROLS, ('severed/resid_post_sever_attn_minus_plain_layer10/mean',), '+.3f'),
    (' [{}, ',
     CONTROLS, ('severed/resid_post_sever_attn_minus_plain_layer10/ci95/0',), '+.3f'),
    (', {}]). After la',
     CONTROLS, ('severed/resid_post_sever_attn_minus_plain_layer10/ci95/1',), '+.3f'),
    (']). After layer 5: {} alone, ',
     CONTROLS, ('severed/resid_post_layer5/mean',), '.3f'),
    (' alone, {} with the ML',
     CONTROLS, ('severed/resid_post_sever_mlp_layer5/mean',), '.3f'),
    (' with the MLPs severed, {} with attent',
     CONTROLS, ('severed/resid_post_sever_attn_layer5/mean',), '.3f'),
    ('(answer)` patched minus corrupted (`p_clean` {}, `p_corrupt',
     CONTROLS, ('token_replacement/p_clean/mean',), '.3f'),
    (', `p_corrupted` {}; single lay',
     CONTROLS, ('token_replacement/p_corrupted/mean',), '.3f'),
    (" subject token's hidden state restores up to {} [",
     CONTROLS, ('token_replacement/resid_post/last subject token/peak/mean',), '.3f'),
    (' [{}, ',
     CONTROLS, ('token_replacement/resid_post/last subject token/peak/ci95/0',), '.3f'),
    (', {}] (layer ',
     CONTROLS, ('token_replacement/resid_post/last subject token/peak/ci95/1',), '.3f'),
    ('] (layer {}), the last ',
     CONTROLS, ('token_replacement/resid_post/last subject token/peak_layer',), 'd'),
    ("), the last token's {} (layer ",
     CONTROLS, ('token_replacement/resid_post/last token/peak/mean',), '.3f'),
    (' (layer {}); one MLP a',
     CONTROLS, ('token_replacement/resid_post/last token/peak_layer',), 'd'),
    ('); one MLP at the last subject token at most {} [',
     CONTROLS, ('token_replacement/mlp/last subject token/peak/mean',), '.3f'),
    (' [{}, ',
     CONTROLS, ('token_replacement/mlp/last subject token/peak/ci95/0',), '.3f'),
    (', {}] (layer ',
     CONTROLS, ('token_replacement/mlp/last subject token/peak/ci95/1',), '.3f'),
    ('] (layer {}), one atten',
     CONTROLS, ('token_replacement/mlp/last subject token/peak_layer',), 'd'),
    ('e attention output at the last token at most {} [',
     CONTROLS, ('token_replacement/attn/last token/peak/mean',), '.3f'),
    (' [{}, ',
     CONTROLS, ('token_replacement/attn/last token/peak/ci95/0',), '.3f'),
    (', {}] (layer ',
     CONTROLS, ('token_replacement/attn/last token/peak/ci95/1',), '.3f'),
    ('] (layer {}). **What su',
     CONTROLS, ('token_replacement/attn/last token/peak_layer',), 'd'),
    ('e removes (restoring that hidden state gives {} after layer',
     CONTROLS, ('figures/resid_post/last token/by_layer/22',), '.3f'),
    (' after layer 22 and {} after layer',
     CONTROLS, ('figures/resid_post/last token/by_layer/23',), '.3f'),
    ('ne attention output at the last token (layer {}) restores ',
     CONTROLS, ('token_replacement/attn/last token/peak_layer',), 'd'),
    (') restores {}. - **A mid-',
     CONTROLS, ('token_replacement/attn/last token/peak/mean',), '.3f'),
    ('ndow of 10 MLPs without MLP 0 still restores {} (interval a',
     CONTROLS, ('mlp_windows/w10_no0/last subject token/peak/mean',), '.3f'),
    ('out: one MLP at layers 1-29 restores at most {} [',
     CONTROLS, ('mlp_windows/w1/last subject token from layer 1/peak/mean',), '.3f'),
    (' [{}, ',
     CONTROLS, ('mlp_windows/w1/last subject token from layer 1/peak/ci95/0',), '.3f'),
    (', {}] under nois',
     CONTROLS, ('mlp_windows/w1/last subject token from layer 1/peak/ci95/1',), '.3f'),
    ('] under noise (layer {}) and ',
     CONTROLS, ('mlp_windows/w1/last subject token from layer 1/peak_layer',), 'd'),
    (') and {} [',
     CONTROLS, ('token_replacement/mlp/last subject token from layer 1/peak/mean',), '.3f'),
    (' [{}, ',
     CONTROLS, ('token_replacement/mlp/last subject token from layer 1/peak/ci95/0',), '.3f'),
    (', {}] under toke',
     CONTROLS, ('token_replacement/mlp/last subject token from layer 1/peak/ci95/1',), '.3f'),
    ('] under token replacement (layer {}), and a win',
     CONTROLS, ('token_replacement/mlp/last subject token from layer 1/peak_layer',), 'd'),
    ('ve: the window centred at layer 0 falls from {} to ',
     CONTROLS, ('mlp_windows/w10/layer0_window_at_last_subject/mean',), '.3f'),
    (' to {} without MLP',
     CONTROLS, ('mlp_windows/w10_no0/layer0_window_at_last_subject/mean',), '.3f'),
    (' without MLP 0 and to {} with a BOS ',
     CONTROLS, ('bos/mlp/last subject token/by_layer/0',), '.3f'),
    ('ont, where the largest window moves to layer {}. The larges',
     CONTROLS, ('bos/mlp/last subject token/peak_layer',), 'd'),
    ("ect token is MLP 0's under both corruptions ({} with noise,",
     CONTROLS, ('mlp_windows/w1/last subject token/peak/mean',), '.3f'),
    (' with noise, {} with token ',
     CONTROLS, ('token_replacement/mlp/last subject token/peak/mean',), '.3f'),
    ('s there too: the MLP window centred at layer {} restores ',
     CONTROLS, ('figures/mlp/last token/peak_layer',), 'd'),
    (' restores {} at the last',
     CONTROLS, ('figures/mlp/last token/peak/mean',), '.3f'),
    ('ne MLP there under token replacement at most {} [',
     CONTROLS, ('token_replacement/mlp/last token/peak/mean',), '.3f'),
    (' [{}, ',
     CONTROLS, ('token_replacement/mlp/last token/peak/ci95/0',), '.3f'),
    (', {}] (layer ',
     CONTROLS, ('token_replacement/mlp/last token/peak/ci95/1',), '.3f'),
    ('] (layer {}). - **The f',
     CONTROLS, ('token_replacement/mlp/last token/peak_layer',), 'd'),
]


@cache
def load(path: str) -> Any:
    return json.loads((REPO_ROOT / path).read_text())


@cache
def page() -> str:
    return squash((REPO_ROOT / "docs" / "causal_tracing.md").read_text())


def squash(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def lookup(data: Any, path: str) -> Any:
    """The value at a ``/``-separated key path; ``"a - b"``: the difference of two paths."""
    if " - " in path:
        left, right = path.split(" - ")
        return lookup(data, left) - lookup(data, right)
    for key in path.split("/"):
        data = data[int(key)] if isinstance(data, list) else data[key]
    return data


def render(value: Any, spec: str) -> str:
    """``value`` rounded as the page writes it (a typographic minus for negative numbers)."""
    if spec == "min":
        return format(value / 60, ".0f")
    if spec == "d":
        assert value == int(value), f"{value} is not a whole number"
        value = int(value)
    return format(value, spec).replace("-", "\u2212")


def quoted(text: str, data: Any, paths: tuple[str, ...], specs: str | tuple[str, ...]) -> str:
    if isinstance(specs, str):
        specs = (specs,) * len(paths)
    assert len(specs) == len(paths) == text.count("{}"), text
    return squash(text.format(*(render(lookup(data, p), s) for p, s in zip(paths, specs))))


def test_the_page_quotes_these_runs():
    assert len(QUOTES) >= 20, "the page's findings are checked number by number"
    assert "python benchmarks/rome_controls.py" in page()


@pytest.mark.parametrize("text,source,paths,specs", QUOTES, ids=[q[0][:50] for q in QUOTES])
def test_quoted_number_matches_its_json(text, source, paths, specs):
    expected = quoted(text, load(source), paths, specs)
    if expected in page():
        return
    pieces = [squash(p).strip() for p in text.split("{}") if squash(p).strip()]
    missing = [p for p in pieces if p not in page()]
    where = (f"the page no longer has the text {missing}" if missing else
             f"a number differs from {source}")
    raise AssertionError(f"docs/causal_tracing.md: {where}; expected to find {expected!r}")


def test_every_rome_figure_has_its_json():
    images = sorted((REPO_ROOT / "docs" / "img").glob("rome_*.png"))
    assert {p.name for p in images} >= {"rome_resid.png", "rome_mlp.png", "rome_attn.png"}
    for image in images:
        data = json.loads(image.with_suffix(".json").read_text())
        assert data["figure"] == image.name
        assert data["command"].startswith("python benchmarks/rome_controls.py"), data["command"]
        assert data["commit"] and data["seed"] == 0
        assert data["settings"]["samples"] == 10, "the documented figures use 10 noise samples"
        effect = data["data"]["effect"]  # [group][layer], as drawn
        assert len(effect) == 6 and all(len(row) == 30 for row in effect)
        assert len(data["data"]["ci95_lower"]) == 6
        assert f"![" in page() and f"img/{image.name}" in page(), f"the page shows {image.name}"

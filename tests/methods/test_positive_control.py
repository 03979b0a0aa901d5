"""Positive control: the patching methods recover a circuit that is known without patching.

The model (``conftest.induction_model``, trained by ``scripts/train_induction_model.py``) is a
two-layer attention-only LLaMA trained on ``[BOS] a_1..a_n a_1..a_n``. Its circuit is found here
from attention patterns alone, before any method runs:

* the **previous-token head** is the layer-0 head whose attention from position t to t-1 is
  largest on average (:func:`previous_token_scores`);
* the **induction head** is the layer-1 head whose attention from the second occurrence of a
  token to the token after its first occurrence is largest (:func:`induction_scores`).

The methods then run on held-out prompts ``[BOS] a_1..a_n a_1..a_k`` (answer ``a_{k+1}``). The
corruption replaces the *first* occurrence of ``a_k`` (position ``k``) by a content token ``y``
that is not in the segment. This is the corruption that exercises the whole circuit: in the
clean run the previous-token head at position ``k+1`` (the token after the first occurrence)
writes "the token before me is ``a_k``", and the induction head at the last position (query
``a_k``) finds that key and copies ``a_{k+1}``. In the corrupted run that key says ``y``, the
induction head finds no match and the answer's log-probability falls from about 0 to about -4.
(Corrupting ``a_{k+1}`` instead would only change what the induction head copies, its value,
and leave the previous-token head out of the picture; a fresh random first half changes every
position at once and localises nothing.) The metric is the answer's log-probability (there is no
single wrong answer to make a logit difference with).

What the circuit predicts, and what each test checks against it:

* (a) ``activation_patching(component="attn_head", by_position=True)``: the induction head at
  the last position and the previous-token head at position ``k+1`` are the two largest cells;
* (b) ``path_patching`` from the previous-token head to the induction head: the effect goes
  through the induction head's key, not its query or value;
* (c) ``causal_tracing`` with noise on the first ``a_k``: in layer 0, restoring the residual
  stream helps at ``k+1`` (where the previous-token head moved the information), not at ``k``
  itself; restoring layer 0's attention output helps only at ``k+1``;
* (d) ``attribution_patching`` (AtP and AtP*): the two heads have the two largest estimates.

Each threshold is stated next to the value observed when the test was written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pytest
import torch
from conftest import induction_model

from causalpatch import activation_patching, attribution_patching, causal_tracing, path_patching

BOS = 1
FIRST_CONTENT, VOCAB = 2, 64
#: Held-out prompts: a segment of N tokens repeated up to its K-th token (so the answer is the
#: (K+1)-th); 1 + N + K = 17 tokens, equal for every pair.
N, K = 10, 6
#: The generator of the held-out prompts (training used seeds 0 and 12345).
HELDOUT_SEED = 2026
N_PAIRS = 16
#: Where the circuit acts on these prompts: the first occurrence of a_k (the corrupted token),
#: the token after it, and the last position (the second occurrence of a_k).
CORRUPTED_POS = K
AFTER_FIRST = K + 1
LAST = N + K


# -- the circuit from attention patterns alone -------------------------------------------------
def repeated_sequences(n_seq: int, n: int = N, seed: int = HELDOUT_SEED) -> list[list[int]]:
    """``n_seq`` held-out sequences ``[BOS] a_1..a_n a_1..a_n`` (``a`` without repeats)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_seq):
        seg = (FIRST_CONTENT + torch.randperm(VOCAB - FIRST_CONTENT, generator=gen)[:n]).tolist()
        out.append([BOS, *seg, *seg])
    return out


def patterns(model, ids: Sequence[int]) -> torch.Tensor:
    """``[n_layers, n_heads, pos, pos]``: every head's attention on one prompt."""
    return torch.stack([model.attention_pattern(list(ids), layer=layer)
                        for layer in range(model.n_layers)])


def previous_token_scores(model, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
    """``[n_layers, n_heads]``: mean attention from position t to t - 1, over t >= 2 (position 1
    would attend to BOS, where many heads rest anyway) and over ``sequences``."""
    scores = []
    for ids in sequences:
        p = patterns(model, ids)
        t = torch.arange(2, len(ids))
        scores.append(p[:, :, t, t - 1].mean(-1))
    return torch.stack(scores).mean(0)


def induction_scores(model, sequences: Sequence[Sequence[int]], n: int = N) -> torch.Tensor:
    """``[n_layers, n_heads]``: mean attention from the second occurrence of ``a_i`` (position
    ``n + i``) to the token after its first occurrence (position ``i + 1``), over i = 1..n-1 and
    over ``sequences`` of the form ``[BOS] a_1..a_n a_1..a_n``."""
    scores = []
    for ids in sequences:
        p = patterns(model, ids)
        i = torch.arange(1, n)
        scores.append(p[:, :, n + i, i + 1].mean(-1))
    return torch.stack(scores).mean(0)


@dataclass(frozen=True)
class Circuit:
    """The heads found from attention patterns, with their scores."""

    previous_token: tuple[int, int]
    induction: tuple[int, int]
    previous_token_scores: torch.Tensor
    induction_scores: torch.Tensor


def identify_circuit(model, n_seq: int = 32) -> Circuit:
    """The previous-token head (best layer-0 head by :func:`previous_token_scores`) and the
    induction head (best layer-1 head by :func:`induction_scores`) on held-out sequences."""
    seqs = repeated_sequences(n_seq)
    prev, ind = previous_token_scores(model, seqs), induction_scores(model, seqs)
    return Circuit((0, int(prev[0].argmax())), (1, int(ind[1].argmax())), prev, ind)


# -- held-out pairs ------------------------------------------------------------------------------
@dataclass
class Pairs:
    """Clean/corrupted prompts as token ids, the answer ids: a dataset the methods accept."""

    clean: list[list[int]]
    corrupted: list[list[int]]
    correct: list[int]


def corrupted_pairs(n_pairs: int = N_PAIRS, seed: int = HELDOUT_SEED + 1) -> Pairs:
    """``[BOS] a_1..a_n a_1..a_k`` (answer ``a_{k+1}``) against the same prompt with the first
    ``a_k`` replaced by a content token outside the segment."""
    gen = torch.Generator().manual_seed(seed)
    clean, corrupted, correct = [], [], []
    for _ in range(n_pairs):
        perm = (FIRST_CONTENT + torch.randperm(VOCAB - FIRST_CONTENT, generator=gen)).tolist()
        seg, y = perm[:N], perm[N]
        prompt = [BOS, *seg, *seg[:K]]
        bad = list(prompt)
        bad[CORRUPTED_POS] = y
        clean.append(prompt)
        corrupted.append(bad)
        correct.append(seg[K])
    return Pairs(clean, corrupted, correct)


@pytest.fixture(scope="module")
def model():
    return induction_model()


@pytest.fixture(scope="module")
def circuit(model) -> Circuit:
    return identify_circuit(model)


@pytest.fixture(scope="module")
def pairs() -> Pairs:
    return corrupted_pairs()

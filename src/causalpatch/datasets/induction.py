"""Induction: a random token sequence repeated twice; the answer continues the repetition.

Clean: ``[r, r]`` — ``seq_len`` random token ids ``r`` (no repeats inside) followed by ``r``
again. At the last position an induction mechanism looks back to where the current token
appeared before and copies what followed it, so it predicts ``r[0]``: ``correct`` is ``r[0]``.
Corrupted: ``[r, r']``, the second half a different random sequence of the same length sharing
no token with ``r``, so nothing can be copied; ``incorrect`` is ``r'[0]``, what ``r'`` repeated
would predict. Prompts are token-id lists (random ids do not round-trip through text), after the
special tokens the tokenizer puts before text (e.g. BOS for Gemma; none for SmolLM2).

Roles (one layout for every pair): ``"BOS"`` for that prefix, ``"A0"``.. ``"A{seq_len-1}"`` the
first copy, ``"B0"``.. the second, its last token ``"END"``. Metric: ``"logit"`` of ``r[0]``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar, cast

from ..errors import InvalidArgumentError
from .base import PatchingDataset, check_n

if TYPE_CHECKING:
    from ..model import HookedModel


class InductionDataset(PatchingDataset):
    """A random token sequence repeated twice; the answer continues the repetition.

    Clean: ``[r, r]`` — ``seq_len`` random token ids ``r`` (no repeats inside) followed by
    ``r`` again, so at the last position an induction mechanism predicts ``r[0]`` (what came
    after ``r[-1]`` the first time): ``correct[i] = r[0]``. Corrupted: ``[r, r']``, the second
    half a different random sequence of the same length (no token shared with ``r``), so
    nothing can be copied; ``incorrect[i] = r'[0]``, what ``r'`` repeated would predict.
    Prompts are token-id lists (random ids do not round-trip through text), prefixed by the
    special tokens the tokenizer adds to text (e.g. BOS for Gemma; none for SmolLM2), so each
    prompt has ``2 * seq_len`` (+ prefix) tokens.

    Token ids are drawn from ``token_range`` (default: ids ``[min(1000, vocab // 4),
    tokenizer size)``), skipping special and added tokens. Metric: ``"logit"`` of ``r[0]``.

    Attributes: ``clean_tokens``, ``corrupted_tokens`` (the same lists as ``clean``,
    ``corrupted``); ``prefix`` (the special-token prefix); ``seq_len``; ``roles`` (per token:
    ``"BOS"`` for the prefix, ``"A0"``.. ``"A{seq_len-1}"`` the first copy, ``"B0"``.. the
    second, the last one ``"END"``; the same for every pair).

    Example::

        ind = InductionDataset(model, n=8, seq_len=10, seed=0)
        len(ind.clean[0]), ind.correct[0] == ind.clean[0][0]     # 20, True
    """

    per_pair_fields: ClassVar[tuple[str, ...]] = ("clean_tokens", "corrupted_tokens", "roles")

    def __init__(self, model: HookedModel, n: int = 32, seq_len: int = 10,
                 seed: int = 0, token_range: tuple[int, int] | None = None) -> None:
        check_n(n)
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
            raise InvalidArgumentError(f"seq_len must be an int >= 2, got {seq_len!r}")
        tok = model.tokenizer
        try:
            size = min(model.vocab_size, len(tok))
        except TypeError:
            size = model.vocab_size
        low, high = token_range if token_range is not None else (min(1000, size // 4), size)
        if not 0 <= low < high <= model.vocab_size:
            raise InvalidArgumentError(
                f"token_range must satisfy 0 <= low < high <= {model.vocab_size}, got "
                f"{(low, high)}")
        special = set(getattr(tok, "all_special_ids", None) or [])
        special |= set(getattr(tok, "added_tokens_decoder", None) or {})
        candidates = [t for t in range(low, high) if t not in special]
        if len(candidates) < 2 * seq_len:
            raise InvalidArgumentError(
                f"token_range {(low, high)} has {len(candidates)} usable ids; need at least "
                f"{2 * seq_len}")
        with_special = list(tok("hello")["input_ids"])
        plain = list(tok.encode("hello", add_special_tokens=False))
        cut = len(with_special) - len(plain)
        self.prefix: list[int] = with_special[:cut] if cut > 0 and with_special[cut:] == plain \
            else []
        self.seq_len = seq_len
        rng = random.Random(seed)
        clean, corrupted, correct, incorrect = [], [], [], []
        for _ in range(n):
            drawn = rng.sample(candidates, 2 * seq_len)
            r, r2 = drawn[:seq_len], drawn[seq_len:]
            clean.append(self.prefix + r + r)
            corrupted.append(self.prefix + r + r2)
            correct.append(r[0])
            incorrect.append(r2[0])
        super().__init__(clean, corrupted, correct, incorrect, "logit", {}, "induction",
                         {"seed": seed, "seq_len": seq_len, "token_range": (low, high)},
                         model=model)
        self.clean_tokens, self.corrupted_tokens = self.clean, self.corrupted
        layout = (["BOS"] * len(self.prefix) + [f"A{k}" for k in range(seq_len)]
                  + [f"B{k}" for k in range(seq_len - 1)] + ["END"])
        self.roles = [list(layout) for _ in range(n)]

    def subset(self, indices: Sequence[int]) -> InductionDataset:
        new = cast(InductionDataset, super().subset(indices))  # subset keeps the class
        new.clean_tokens, new.corrupted_tokens = new.clean, new.corrupted  # keep them shared
        return new

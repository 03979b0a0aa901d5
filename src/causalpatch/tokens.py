"""Prompts to token ids, and right-padded batches.

Prompts of different lengths are right-padded. With causal attention a real token never attends
to a later (padding) position, and position ids stay ``0..len-1``, so every row's logits equal
the unbatched run's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .errors import InvalidArgumentError, InvalidTypeError

if TYPE_CHECKING:
    from .model import HookedModel

Prompts = str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]] | torch.Tensor


@dataclass
class Batch:
    """A right-padded batch of token ids.

    Attributes:
        input_ids: ``[batch, pos]`` token ids (padding = the tokenizer's pad id).
        attention_mask: ``[batch, pos]``, 1 for real tokens.
        lengths: ``[batch]`` number of real tokens per row.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    lengths: torch.Tensor

    @property
    def padded(self) -> bool:
        return bool((self.lengths != self.input_ids.shape[1]).any())

    @property
    def last_index(self) -> torch.Tensor:
        """``[batch]`` index of each row's last real token."""
        return self.lengths - 1


def is_single_prompt(prompts: object) -> bool:
    """One prompt (a string, a 1-D id tensor or a flat list of ids) rather than a list of
    them, as :func:`token_lists` reads it."""
    if isinstance(prompts, str):
        return True
    if isinstance(prompts, torch.Tensor):
        return prompts.dim() == 1
    return isinstance(prompts, Sequence) and len(prompts) > 0 and isinstance(prompts[0], int)


def token_lists(model: HookedModel, prompts: Prompts, what: str = "prompts") -> list[list[int]]:
    """Tokenise strings, or accept ids given as a tensor / list of ints / list of lists."""
    rows: list[list[int]]
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() == 1:
            prompts = prompts.unsqueeze(0)
        if prompts.dim() != 2 or prompts.dtype not in (torch.int64, torch.int32):
            raise InvalidTypeError(
                f"{what} given as a tensor must be integer token ids of shape [batch, pos], got "
                f"dtype {prompts.dtype} and shape {tuple(prompts.shape)}")
        rows = [row.tolist() for row in prompts]
    elif isinstance(prompts, str):
        rows = [encode(model, prompts, what)]
    elif isinstance(prompts, Sequence) and len(prompts) > 0:
        first = prompts[0]
        if isinstance(first, str):
            rows = [encode(model, p, f"{what}[{i}]") for i, p in enumerate(prompts)]
        elif isinstance(first, int):
            rows = [list(prompts)]  # type: ignore[arg-type]  # ids, as the first item is
        elif isinstance(first, (Sequence, torch.Tensor)):
            rows = [list(map(int, r))  # type: ignore[arg-type]  # id rows, as the first is
                    for r in prompts]
        else:
            raise InvalidTypeError(
                f"{what} must be strings or token ids, got {type(first).__name__}")
    elif isinstance(prompts, Sequence):
        raise InvalidArgumentError(f"{what} is empty: give at least one prompt")
    else:
        raise InvalidTypeError(
            f"{what} must be a string, a list of strings, or token ids; "
            f"got {type(prompts).__name__}")
    vocab = model.vocab_size
    for i, row in enumerate(rows):
        if not row:
            raise InvalidArgumentError(f"{what}[{i}] has no tokens: prompts must not be empty")
        bad = [t for t in row if not 0 <= t < vocab]
        if bad:
            raise InvalidArgumentError(
                f"{what}[{i}] has token ids {bad[:5]} outside the vocabulary [0, {vocab - 1}]")
    return rows


def encode(model: HookedModel, text: object, what: str) -> list[int]:
    """Token ids of ``text``; anything but a non-blank string is refused."""
    if not isinstance(text, str):
        raise InvalidTypeError(f"{what} must be a string, got {type(text).__name__}")
    if not text.strip():
        raise InvalidArgumentError(f"{what} is empty: prompts must contain text, got {text!r}")
    return list(model.tokenizer(text)["input_ids"])


def make_batch(rows: list[list[int]], pad_id: int, device: torch.device | str = "cpu") -> Batch:
    """Right-pad token lists into a :class:`Batch`."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    return Batch(ids.to(device), mask.to(device), lengths.to(device))




def prepended_bos(model: HookedModel, prepend_bos: object) -> int | None:
    """The token id a ``prepend_bos=`` option asks for: ``False``/``None`` nothing, ``True``
    the tokenizer's BOS token, an int that token id.

    Raises:
        InvalidArgumentError: ``True`` with a tokenizer that has no BOS token, or anything else
            than a bool or a token id of the vocabulary.
    """
    if prepend_bos is False or prepend_bos is None:
        return None
    if prepend_bos is True:
        bos = getattr(model.tokenizer, "bos_token_id", None)
        if bos is None:
            raise InvalidArgumentError(
                "prepend_bos=True but the tokenizer has no BOS token (bos_token_id is None); "
                "pass the token id to prepend instead, e.g. prepend_bos=0")
        return int(bos)
    if isinstance(prepend_bos, int) and 0 <= prepend_bos < model.vocab_size:
        return int(prepend_bos)
    raise InvalidArgumentError(
        f"prepend_bos must be True/False or a token id in [0, {model.vocab_size - 1}], got "
        f"{prepend_bos!r}")

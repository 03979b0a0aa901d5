"""Tokenised batches and the :class:`Trace` context: one forward pass, read and intervene.

Prompts of different lengths are right-padded. With causal attention a real token never attends
to a later (padding) position, and position ids stay ``0..len-1``, so every row's logits equal
the unbatched run's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .errors import InvalidArgumentError, InvalidTypeError
from .hooks import Hook, hooked
from .interventions import Intervention, as_intervention

if TYPE_CHECKING:
    from .model import InterpretableModel

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


def token_lists(model: InterpretableModel, prompts: Prompts, what: str = "prompts") -> list[list[int]]:
    """Tokenise strings, or accept ids given as a tensor / list of ints / list of lists."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() == 1:
            prompts = prompts.unsqueeze(0)
        if prompts.dim() != 2 or prompts.dtype not in (torch.int64, torch.int32):
            raise InvalidTypeError(
                f"{what} given as a tensor must be integer token ids of shape [batch, pos], got "
                f"dtype {prompts.dtype} and shape {tuple(prompts.shape)}")
        rows = [row.tolist() for row in prompts]
    elif isinstance(prompts, str):
        rows = [_encode(model, prompts, what)]
    elif isinstance(prompts, Sequence) and len(prompts) > 0:
        first = prompts[0]
        if isinstance(first, str):
            rows = [_encode(model, p, f"{what}[{i}]") for i, p in enumerate(prompts)]
        elif isinstance(first, int):
            rows = [list(prompts)]  # type: ignore[arg-type]
        elif isinstance(first, (Sequence, torch.Tensor)):
            rows = [list(map(int, r)) for r in prompts]  # type: ignore[arg-type]
        else:
            raise InvalidTypeError(f"{what} must be strings or token ids, got {type(first).__name__}")
    elif isinstance(prompts, Sequence):
        raise InvalidArgumentError(f"{what} is empty: give at least one prompt")
    else:
        raise InvalidTypeError(
            f"{what} must be a string, a list of strings, or token ids; got {type(prompts).__name__}")
    vocab = model.vocab_size
    for i, row in enumerate(rows):
        if not row:
            raise InvalidArgumentError(f"{what}[{i}] has no tokens: prompts must not be empty")
        bad = [t for t in row if not 0 <= t < vocab]
        if bad:
            raise InvalidArgumentError(
                f"{what}[{i}] has token ids {bad[:5]} outside the vocabulary [0, {vocab - 1}]")
    return rows


def _encode(model: InterpretableModel, text: str, what: str) -> list[int]:
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


class Trace:
    """Result of one forward pass with caching and interventions.

    Use as a context manager (the forward runs on entry)::

        with model.trace(["A prompt", "Another"], cache=["blocks.3.mlp"]) as tr:
            acts = tr.cache["blocks.3.mlp"]   # [batch, pos, d_model]
            logits = tr.logits                # [batch, pos, vocab]

    Attributes:
        logits: ``[batch, pos, vocab]``; padded positions hold whatever the model computed.
        last_logits: ``[batch, vocab]`` at each row's last real token.
        cache: site name -> activation ``[batch, pos, ...]`` (detached clones).
        batch: the :class:`Batch` that was run.
    """

    def __init__(self, model: InterpretableModel, prompts: Prompts,
                 interventions: Mapping[str, Any] | None = None,
                 cache: Sequence[str] | bool | str | None = None) -> None:
        self.model = model
        rows = token_lists(model, prompts)
        self.batch = make_batch(rows, model.pad_token_id, model.device)
        self._plan = _plan(model, self.batch, interventions or {}, cache)
        self.cache: dict[str, torch.Tensor] = {}
        self.logits: torch.Tensor | None = None
        self._ran = False

    # seed-style aliases
    @property
    def activations(self) -> dict[str, torch.Tensor]:
        return self.cache

    @property
    def output(self) -> torch.Tensor | None:
        return self.logits

    @property
    def last_logits(self) -> torch.Tensor:
        assert self.logits is not None
        rows = torch.arange(self.logits.shape[0], device=self.logits.device)
        return self.logits[rows, self.batch.last_index]

    def run(self) -> Trace:
        if self._ran:
            return self
        hooks: list[Hook] = []
        for site, ivs in self._plan.interventions:
            hooks += [Hook(site, iv) for iv in ivs]
        for site in self._plan.cache_sites:
            hooks.append(Hook(site, _cacher(self.cache, site.name)))
        with torch.no_grad():
            self.logits = self.model.forward(self.batch, hooks)
        self._ran = True
        return self

    def __enter__(self) -> Trace:
        return self.run()

    def __exit__(self, *exc: object) -> None:
        return None


def _cacher(store: dict[str, torch.Tensor], name: str):
    def save(act: torch.Tensor) -> None:
        store[name] = act.detach().clone()
        return None

    return save


@dataclass
class _Plan:
    interventions: list[tuple[Any, list[Intervention]]]
    cache_sites: list[Any]


def _plan(model: InterpretableModel, batch: Batch, interventions: Mapping[str, Any],
          cache: Sequence[str] | bool | str | None) -> _Plan:
    """Resolve names and validate every intervention before anything runs."""
    if not isinstance(interventions, Mapping):
        raise InvalidTypeError(
            "interventions must be a dict {component name: intervention or list of them}, got "
            f"{type(interventions).__name__}")
    planned = []
    for name, value in interventions.items():
        site = model.site(name)
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        ivs = [as_intervention(v, name) for v in items]
        feat = site.feature_shape(model.dims)
        if feat is not None:
            shape = (batch.input_ids.shape[0], batch.input_ids.shape[1], *feat)
            for iv in ivs:
                iv.validate(shape, name)
        planned.append((site, ivs))
    if cache is True:
        names = model.component_names()
    elif cache in (None, False):
        names = []
    elif isinstance(cache, str):
        names = [cache]
    else:
        names = list(cache)
    return _Plan(planned, [model.site(n) for n in names])

"""The :class:`Trace` context: one forward pass, read activations and intervene."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .errors import InvalidArgumentError, InvalidTypeError
from .hooks import Hook, hooked
from .interventions import Intervention, as_intervention
from .tokens import Batch, Prompts, make_batch, token_lists

if TYPE_CHECKING:
    from .model import HookedModel

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

    def __init__(self, model: HookedModel, prompts: Prompts,
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
        for requested, site in zip(self._plan.cache_names, self._plan.cache_sites):
            hooks.append(Hook(site, _cacher(self.cache, site.name, requested)))
        with torch.no_grad():
            self.logits = self.model.forward(self.batch, hooks)
        self._ran = True
        return self

    def __enter__(self) -> Trace:
        return self.run()

    def __exit__(self, *exc: object) -> None:
        return None


def _cacher(store: dict[str, torch.Tensor], name: str, requested: str | None = None):
    """Store under the canonical ``name`` and under the ``requested`` name (a raw module path
    or TransformerLens name), so ``cache[what_the_user_asked_for]`` works."""
    def save(act: torch.Tensor) -> None:
        store[name] = act.detach().clone()
        if requested is not None and requested != name:
            store[requested] = store[name]
        return None

    return save


@dataclass
class _Plan:
    interventions: list[tuple[Any, list[Intervention]]]
    cache_sites: list[Any]
    cache_names: list[str]


def _plan(model: HookedModel, batch: Batch, interventions: Mapping[str, Any],
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
    return _Plan(planned, [model.site(n) for n in names], names)

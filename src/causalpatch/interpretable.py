"""``InterpretableModel``: :class:`~causalpatch.model.HookedModel` plus the seeds' helpers.

The helpers are thin calls of the methods, so that the model layer below never calls upward::

    model = InterpretableModel("smollm2")
    results = model.activation_patching("Paris is the capital of France",
                                        "London is the capital of France", component="mlp")
    with model.causal_trace(clean, corrupted) as ct:
        ct.patch("layers.5.mlp")
        effect = ct.metric("l2")
"""

from __future__ import annotations

from typing import Any

from .enums import Direction, Engine
from .errors import InvalidArgumentError
from .methods.activation_patching import CausalTrace, activation_patching
from .model import HookedModel
from .tokens import Prompts


class InterpretableModel(HookedModel):
    """A Hugging Face causal LM ready for patching experiments (see :class:`HookedModel`)."""

    def activation_patching(self, clean_text: Prompts, corrupted_text: Prompts,
                            component: str = "mlp", metric: Any = None, plot: bool = False,
                            **kwargs: Any) -> dict[int, float]:
        """Per-layer recovery in percent, ``{layer: recovery_percent}`` (the seeds' helper).

        The metric defaults as everywhere: ``logit_diff`` when answers are given
        (``correct=``/``incorrect=``), else ``l2``. With ``plot=True`` the figure is shown.
        """
        result = activation_patching(self, clean_text, corrupted_text, component=component,
                                     metric=metric, **kwargs)
        matrix = result.effect_matrix
        if matrix.dim() != 1:
            raise InvalidArgumentError(
                f"model.activation_patching returns one value per layer, but component="
                f"{component!r} gives shape {tuple(matrix.shape)}; use "
                "causalpatch.activation_patching for per-head or per-position results")
        if plot:
            result.plot().show()
        return {int(layer): float(v) * 100 for layer, v in zip(result.layers, matrix.tolist())}

    def causal_trace(self, clean: Prompts | Any, corrupted: Prompts | None = None,
                     direction: str | Direction = "denoise",
                     engine: str | Engine = "fast") -> CausalTrace:
        """A context for multi-site patches: ``ct.patch(name)`` then ``ct.metric(...)``."""
        return CausalTrace(self, clean, corrupted, direction=direction, engine=engine)

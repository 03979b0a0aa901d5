"""``InterpretableModel``: :class:`~causalpatch.model.HookedModel` plus the seeds' helpers.

The helpers are thin calls of the methods, so that the model layer below never calls upward::

    model = InterpretableModel("smollm2")
    results = model.activation_patching("Paris is the capital of France",
                                        "London is the capital of France", component="mlp")
    with model.causal_trace(clean, corrupted) as ct:
        ct.patch("layers.5.mlp")
        effect = ct.metric("l2")

Every helper picks the metric by the one rule of :func:`causalpatch.plan.choose_metric`: the
one given, else the dataset's, else ``logit_diff`` when answer tokens are given, else ``l2``.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from .datasets import as_patching_dataset
from .enums import Direction, Engine
from .errors import InvalidArgumentError
from .methods.activation_patching import CausalTrace, activation_patching
from .model import HookedModel
from .tokens import Prompts

if TYPE_CHECKING:
    from .result import PatchingResult


class LayerRecovery(dict):
    """``{layer: recovery_percent}`` from :meth:`InterpretableModel.activation_patching`.

    A plain ``dict`` (``sorted(results.items(), ...)`` as in the seeds) that also keeps
    ``result`` (the :class:`~causalpatch.result.PatchingResult`) and ``figure`` (the
    matplotlib figure when ``plot=True``, else ``None``).
    """

    result: PatchingResult
    figure: Any = None


class InterpretableModel(HookedModel):
    """A Hugging Face causal LM ready for patching experiments (see :class:`HookedModel`)."""

    def activation_patching(self, clean_text: Prompts | Any, corrupted_text: Prompts | None = None,
                            component: str = "mlp", metric: Any = None, plot: bool = False,
                            **kwargs: Any) -> LayerRecovery:
        """Per-layer recovery in percent, ``{layer: recovery_percent}`` (the seeds' helper).

        Args:
            clean_text, corrupted_text: the prompts, or a dataset as ``clean_text`` (a
                :class:`~causalpatch.datasets.PatchingDataset`, also the seeds' subclass
                pattern with ``get_clean_corrupt_pairs``).
            component: a per-layer component (``"mlp"``, ``"attn"``, ``"resid_post"`` ...).
            metric: default by the one rule: the dataset's metric, else ``logit_diff`` when
                answers are given (``correct=``/``incorrect=`` or ``metric_kwargs``), else ``l2``.
            plot: build the bar chart: kept as ``results.figure`` and displayed (inline in a
                notebook; with pyplot's backend elsewhere).
            kwargs: passed to :func:`causalpatch.activation_patching`.

        Returns:
            :class:`LayerRecovery` (a dict with ``.result`` and ``.figure``).
        """
        result = activation_patching(self, as_patching_dataset(clean_text, self), corrupted_text,
                                     component=component, metric=metric, **kwargs)
        matrix, layers = result.effect_matrix, result.layers
        if matrix.dim() != 1 or layers is None:
            raise InvalidArgumentError(
                f"model.activation_patching returns one value per layer, but component="
                f"{component!r} gives axes {result.axes} of shape {tuple(matrix.shape)}; use "
                "causalpatch.activation_patching for per-head or per-position results")
        out = LayerRecovery({int(layer): float(v) * 100
                             for layer, v in zip(layers, matrix.tolist())})
        out.result = result
        if plot:
            out.figure = result.plot()
            _show(out.figure)
        return out

    def causal_trace(self, clean: Prompts | Any, corrupted: Prompts | None = None,
                     direction: str | Direction = "denoise",
                     engine: str | Engine = "fast") -> CausalTrace:
        """A context for multi-site patches: ``ct.patch(name)`` then ``ct.metric(...)``.

        ``direction="noise"`` patches corrupted activations into the clean run. ``clean`` may
        be a dataset (also the seeds' ``get_clean_corrupt_pairs`` pattern).
        """
        return CausalTrace(self, as_patching_dataset(clean, self), corrupted,
                           direction=direction, engine=engine)


def _show(figure: Any) -> None:
    """Display ``figure``: inline in a Jupyter kernel, else with pyplot's backend (nothing,
    and no warning, with a non-interactive backend such as Agg)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") \
        else None
    if shell is not None and getattr(shell, "kernel", None) is not None:
        from IPython.display import display

        display(figure)
        return
    import matplotlib

    if matplotlib.get_backend().lower() in _NON_INTERACTIVE:
        return  # a script without a display: the figure is in results.figure
    figure.show(warn=False)


_NON_INTERACTIVE = {"agg", "pdf", "ps", "svg", "pgf", "cairo", "template"}

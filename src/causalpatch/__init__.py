"""causalpatch: fast, exact activation patching on Hugging Face causal language models.

The pipeline (docs/architecture.md): ``adapters`` -> ``names`` -> ``hooks`` -> ``tokens`` ->
``interventions`` -> ``loading`` -> ``tracing`` -> ``model`` ; ``metrics`` -> ``plan`` ->
``engine`` -> ``assemble`` -> ``result`` (rendered by ``render/``) -> ``methods/`` ->
``interpretable`` -> ``cli``.

Importing the package has no side effects (no global plotting state, no downloads) and is
cheap: it imports neither torch nor transformers. Every name of ``__all__`` is resolved on
first use (module ``__getattr__``, PEP 562), so ``from causalpatch import activation_patching``
and ``causalpatch.activation_patching`` work as before and import torch only then.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

#: Public name -> the module (relative to this package) that defines it.
_EXPORTS: dict[str, str] = {
    "AblationKind": "enums",
    "Direction": "enums",
    "Engine": "enums",
    "CausalPatchError": "errors",
    "InterpretableModel": "interpretable",
    "ablate": "methods.ablation",
    "CausalTrace": "methods.activation_patching",
    "activation_patching": "methods.activation_patching",
    "attribution_patching": "methods.attribution",
    "causal_tracing": "methods.causal_tracing",
    "causal_tracing_dataset": "methods.causal_tracing",
    "path_patching": "methods.path_patching",
    "sae_attribution": "methods.sae_patching",
    "sae_patching": "methods.sae_patching",
    "DLAResult": "methods.lens",
    "LensResult": "methods.lens",
    "direct_logit_attribution": "methods.lens",
    "logit_lens": "methods.lens",
    "MetricInputs": "metrics",
    "get_metric": "metrics",
    "register_metric": "metrics",
    "HookedModel": "model",
    "report": "render.html",
    "plot_attention_pattern": "render.attention",
    "PatchingResult": "result",
    "write_report": "result",
    "load_sae": "sae",
    "save_sae": "sae",
    "ActivationPatcher": "framework",
    "HeadPatcher": "framework",
    "summarize_results": "framework",
    "find_important_heads": "framework",
    "print_head_results": "framework",
    "create_head_heatmap": "framework",
    "create_full_report": "framework",
    "edge_attribution": "methods.edges",
    "EdgeGraph": "graph",
    "EdgeResult": "graph",
    "Circuit": "graph",
    "evaluate_circuit": "methods.circuits",
    "faithfulness_curve": "methods.circuits",
}
#: Submodules exported by name (``causalpatch.datasets`` ...).
_SUBMODULES = ("datasets", "errors", "interventions", "metrics", "sae")

__all__ = [
    "CausalPatchError",
    "PatchingResult",
    "ablate",
    "attribution_patching",
    "causal_tracing",
    "causal_tracing_dataset",
    "datasets",
    "report",
    "write_report",
    "AblationKind",
    "CausalTrace",
    "Direction",
    "Engine",
    "HookedModel",
    "InterpretableModel",
    "MetricInputs",
    "activation_patching",
    "errors",
    "get_metric",
    "interventions",
    "metrics",
    "path_patching",
    "register_metric",
    "load_sae",
    "sae",
    "sae_attribution",
    "sae_patching",
    "save_sae",
    "DLAResult",
    "LensResult",
    "direct_logit_attribution",
    "logit_lens",
    "plot_attention_pattern",
    "ActivationPatcher",
    "HeadPatcher",
    "summarize_results",
    "find_important_heads",
    "print_head_results",
    "create_head_heatmap",
    "create_full_report",
    "edge_attribution",
    "EdgeGraph",
    "EdgeResult",
    "Circuit",
    "evaluate_circuit",
    "faithfulness_curve",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """Import an exported name (or any submodule, e.g. ``causalpatch.loading``) on first use."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs; never executed
    from . import datasets, errors, interventions, metrics, sae
    from .enums import AblationKind, Direction, Engine
    from .errors import CausalPatchError
    from .interpretable import InterpretableModel
    from .render.attention import plot_attention_pattern
    from .methods.ablation import ablate
    from .methods.activation_patching import CausalTrace, activation_patching
    from .methods.attribution import attribution_patching
    from .methods.causal_tracing import causal_tracing, causal_tracing_dataset
    from .methods.lens import DLAResult, LensResult, direct_logit_attribution, logit_lens
    from .methods.path_patching import path_patching
    from .methods.sae_patching import sae_attribution, sae_patching
    from .metrics import MetricInputs, get_metric, register_metric
    from .model import HookedModel
    from .render.html import report
    from .result import PatchingResult, write_report
    from .sae import load_sae, save_sae
    from .framework import (ActivationPatcher, HeadPatcher, create_full_report,
                            create_head_heatmap, find_important_heads, print_head_results,
                            summarize_results)
    from .graph import EdgeGraph, EdgeResult
    from .methods.edges import edge_attribution
    from .graph import Circuit
    from .methods.circuits import evaluate_circuit, faithfulness_curve

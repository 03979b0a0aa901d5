"""causalpatch: fast, exact activation patching on Hugging Face causal language models.

The pipeline (docs/architecture.md): ``adapters`` -> ``names`` -> ``hooks`` -> ``tokens`` ->
``interventions`` -> ``loading`` -> ``tracing`` -> ``model`` ; ``metrics`` -> ``plan`` ->
``engine`` -> ``assemble`` -> ``result`` (rendered by ``render/``) -> ``methods/`` ->
``interpretable`` -> ``cli``.

Importing the package has no side effects (no global plotting state, no downloads).
"""

from . import datasets, errors, interventions, metrics, sae
from .enums import AblationKind, Direction, Engine
from .errors import CausalPatchError
from .interpretable import InterpretableModel
from .methods.ablation import ablate
from .methods.activation_patching import CausalTrace, activation_patching
from .methods.attribution import attribution_patching
from .methods.causal_tracing import causal_tracing, causal_tracing_dataset
from .methods.path_patching import path_patching
from .methods.sae_patching import sae_attribution, sae_patching
from .metrics import MetricInputs, get_metric, register_metric
from .model import HookedModel
from .render.html import report
from .result import PatchingResult
from .sae import load_sae, save_sae

__all__ = [
    "CausalPatchError",
    "PatchingResult",
    "ablate",
    "attribution_patching",
    "causal_tracing",
    "causal_tracing_dataset",
    "datasets",
    "report",
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
]
__version__ = "0.1.0"

"""causalpatch: fast, exact activation patching on Hugging Face causal language models.

The pipeline, one module each: load (``loading``) -> names (``adapters``, ``names``) -> hooks
(``hooks``) -> interventions (``interventions``) -> trace (``tracing``) -> sweep engine
(``engine``, ``patching``, ``sweep``) -> metrics (``metrics``) -> result (``result``) ->
report/CLI (``report``, ``plotting``, ``cli``).

Importing the package has no side effects (no global plotting state, no downloads).
"""

from . import datasets, errors, interventions, metrics
from .ablation import ablate
from .attribution import attribution_patching
from .errors import CausalPatchError
from .metrics import MetricInputs, get_metric, register_metric
from .model import InterpretableModel
from .patching import CausalTrace, Direction, activation_patching
from .report import report
from .result import PatchingResult

__all__ = [
    "CausalPatchError",
    "PatchingResult",
    "ablate",
    "attribution_patching",
    "datasets",
    "report",
    "CausalTrace",
    "Direction",
    "InterpretableModel",
    "MetricInputs",
    "activation_patching",
    "errors",
    "get_metric",
    "interventions",
    "metrics",
    "register_metric",
]
__version__ = "0.1.0"

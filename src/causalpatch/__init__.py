"""causalpatch: fast, exact activation patching on Hugging Face causal language models."""

from . import interventions
from .model import InterpretableModel

__all__ = ["InterpretableModel", "interventions"]
__version__ = "0.1.0"

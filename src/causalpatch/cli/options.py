"""Option declarations and help texts that several commands share (``--model``,
``--component``, ``--format``, the executor flags), so that each reads the same everywhere."""

from __future__ import annotations

from typing import Any

import typer

MODEL_HELP = "Alias (smollm2, gemma3-270m), .gguf path, HF folder or hub name."
EXECUTOR_HELP = "local (default) or ray: distribute pairs over Ray workers."
ADDRESS_HELP = "Ray cluster HOST:PORT (default $RAY_ADDRESS, else local Ray)."
WORKERS_HELP = "Ray workers (model copies)."
JSON_HELP = "Print only machine-readable JSON."
DTYPE_HELP = "float32, float16 or bfloat16."
COMPONENT_HELP = (
    "What to patch: resid_pre, resid_mid, resid_post, attn, mlp (one cell per layer), "
    "attn_head, attn_head_q, attn_head_k, attn_head_v (per layer and head), mlp_neuron (per "
    "layer and neuron); a per-layer site kind such as attn.in, mlp.post, mlp.gate; or one site "
    "such as blocks.5.mlp. See causalpatch info MODEL.")


def format_option() -> Any:
    """``--format png|svg|pdf`` for the figures (default png)."""
    return typer.Option("png", "--format", help="Figure format: png, svg or pdf.")


def epilog(example: str) -> str:
    """The line under a command's help: global flags work after the command too."""
    return f"Global flags work here too: {example}"

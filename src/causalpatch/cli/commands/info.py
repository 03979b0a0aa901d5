"""``causalpatch info MODEL``: a model's sizes and component names, from its config and
tokenizer (the weights load only when those cannot be read on their own)."""

from __future__ import annotations

from contextlib import nullcontext

import typer

from .. import model_info, runtime
from ..checks import SWEEP_COMPONENTS
from ..failures import user_errors
from ..options import MODEL_HELP
from ..outputs import emit_json
from ..state import State, chatty, console, out_console


#: The site kind each sweep component patches (``--component`` of ``patch``).
SWEEP_KINDS = {"resid_pre": "resid_pre", "resid_mid": "resid_mid", "resid_post": "resid_post",
               "attn": "attn", "mlp": "mlp", "attn_head": "attn.z", "attn_head_q": "attn.q",
               "attn_head_k": "attn.k", "attn_head_v": "attn.v", "mlp_neuron": "mlp.post"}


def sweep_components(kinds: list[str]) -> list[str]:
    """The ``--component`` words of ``patch`` whose site this model has (all when the kinds
    are unknown)."""
    return [c for c in SWEEP_COMPONENTS if not kinds or SWEEP_KINDS.get(c, c) in kinds]


def info(model: str = typer.Argument(..., help=MODEL_HELP),
         as_json: bool = typer.Option(False, "--json", help="Machine-readable JSON.")) -> None:
    """Show a model's sizes, its sweep components (patch --component) and site names (reads the
    config, not the weights).

    Example:

      causalpatch info smollm2
    """
    with user_errors():
        status = console.status(f"reading {model}…") if chatty(as_json) else nullcontext()
        with status:
            got = model_info.inspect_model(model, need_kinds=True)
        if got is None:  # config/tokenizer not readable on their own: load the model
            got = model_info.ModelInfo.of(runtime.load_model(model))
    d = got.dims
    data = {"name": got.name, "architecture": got.architecture, "n_layers": d.n_layers,
            "n_heads": d.n_heads, "n_kv_heads": d.n_kv_heads, "d_model": d.d_model,
            "d_head": d.d_head, "d_mlp": d.d_mlp, "vocab_size": d.vocab_size,
            "sweep_components": sweep_components(got.kinds),
            "components": [f"blocks.L.{k}" for k in got.kinds]}
    if as_json or State.json:
        emit_json(data)
        return
    if State.quiet:
        return
    from rich.table import Table

    table = Table(title=f"{got.name}")
    table.add_column("property")
    table.add_column("value")
    for key, value in data.items():
        table.add_row(key, "\n".join(value) if isinstance(value, list) else str(value))
    out_console.print(table)

"""``causalpatch sae``: sparse autoencoders in the SAELens format. ``sae train`` trains one on a
model's activations of offline text and saves it; ``sae info`` shows one's configuration and
training report. The group is its own typer app (:data:`sae_app`), added under ``sae``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from .. import runtime
from ..failures import error, user_errors
from ..options import MODEL_HELP
from ..outputs import check_out_dir, emit_json
from ..state import State, chatty, console, out_console

sae_app = typer.Typer(no_args_is_help=True, rich_markup_mode="rich",
                      help="Sparse autoencoders (SAELens format): train one, inspect one.")


@sae_app.command("train")
def sae_train(
    model: str = typer.Option("smollm2", help=MODEL_HELP),
    site: str = typer.Option("blocks.20.resid_post", help="Site to read (canonical or "
                             "TransformerLens name, e.g. blocks.20.hook_resid_post)."),
    features: int = typer.Option(2048, help="Number of SAE features (d_sae)."),
    architecture: str = typer.Option("topk", help="topk (default) or standard (ReLU + L1)."),
    k: int = typer.Option(32, help="Active features per token (topk)."),
    l1: float = typer.Option(3.0, help="L1 coefficient (standard)."),
    tokens: int = typer.Option(100_000, help="Training tokens (activations collected once)."),
    eval_tokens: int = typer.Option(4096, help="Held-out tokens for the report."),
    epochs: int = typer.Option(8, help="Passes over the training activations."),
    lr: float = typer.Option(4e-4, help="Adam learning rate."),
    seed: int = typer.Option(0, help="Seed (data order and initialisation)."),
    storage_dtype: str = typer.Option("float16", help="Stored weights: float16 | float32."),
    threads: int | None = typer.Option(None, help="torch threads (default: torch's)."),
    out: Path = typer.Option(Path("out/sae"), help="Output folder (SAELens format)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Train an SAE on a model's activations of offline text and save it in the SAELens format.

    The text ships with Python and causalpatch (Python's language reference, the standard
    library's docstrings, ROME's known facts; see causalpatch.sae.training_texts). Reports
    explained variance, L0, dead features and the model's loss with the SAE spliced in.

    Example:

      causalpatch sae train --model smollm2 --site blocks.20.resid_post \\
        --features 2048 --k 32 --tokens 100000 --out out/sae
    """
    with user_errors():
        State.json = as_json = as_json or State.json
        if storage_dtype not in ("float16", "float32"):
            raise error(f"--storage-dtype must be float16 or float32, got {storage_dtype!r}")
        if features < 1 or tokens < 1 or epochs < 1:
            raise error("--features, --tokens and --epochs must be positive")
        check_out_dir(out)
        import torch

        from ...sae import save_sae
        from ...sae.train import train_sae

        if threads is not None:
            torch.set_num_threads(threads)
        m = runtime.load_model(model)
        log = (lambda msg: None) if not chatty(as_json) else (
            lambda msg: console.print(escape(msg)))
        sae, report = train_sae(m, site, features, architecture=architecture, k=k,
                                l1_coefficient=l1, train_tokens=tokens,
                                eval_tokens=eval_tokens, epochs=epochs, lr=lr, seed=seed,
                                log=log)
        folder = save_sae(sae, out, storage_dtype=getattr(torch, storage_dtype))
    if as_json:
        emit_json({"folder": str(folder), **report.to_dict()})
    elif not State.quiet:
        out_console.print(report.summary(), highlight=False)
        out_console.print(f"[green]wrote[/] {escape(str(folder))}")


@sae_app.command("info")
def sae_info(path: Path = typer.Argument(..., help="An SAE folder (cfg.json + "
                                          "sae_weights.safetensors)."),
             as_json: bool = typer.Option(False, "--json", help="Machine-readable JSON.")
             ) -> None:
    """Show an SAE's configuration (and its training report when it has one).

    Example:

      causalpatch sae info out/sae
    """
    from ...sae import load_sae

    with user_errors():
        sae = load_sae(path)
    data = {"architecture": sae.architecture, "d_in": sae.d_in, "d_sae": sae.d_sae,
            "k": sae.k, "site": sae.site, "hook_name": sae.hook_name,
            "model_name": sae.model_name,
            "training_report": sae.metadata.get("training_report")}
    if as_json or State.json:
        emit_json(data)
        return
    if State.quiet:
        return
    from rich.table import Table

    table = Table(title=str(path))
    table.add_column("property")
    table.add_column("value")
    for key, value in data.items():
        if key == "training_report" and isinstance(value, dict):
            for name in ("explained_variance", "l0", "dead_fraction", "ce_clean",
                         "ce_spliced", "ce_recovered"):
                if name in value:
                    table.add_row(name, f"{value[name]:.4g}")
        else:
            table.add_row(key, escape(str(value)))
    out_console.print(table)

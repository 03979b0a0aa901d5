"""``causalpatch sae``: sparse autoencoders in the SAELens format. ``sae train`` trains one on a
model's activations of offline text and saves it; ``sae info`` shows one's configuration and
training report. The group is its own typer app (:data:`sae_app`), added under ``sae``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from .. import model_info, runtime
from ..checks import COMPONENT_WORDS, check_choice, check_component
from ..failures import error, user_errors
from ..options import MODEL_HELP
from ..outputs import check_out_dir, emit_json
from ..state import State, chatty, console, out_console
from ..sweeps import Steps, resume_option

#: The SAELens files of an SAE folder (mirrors causalpatch.sae.format, which imports torch).
SAE_FILES = ("cfg.json", "sae_weights.safetensors")
ARCHITECTURES = ("topk", "standard")


def check_site(site: str) -> None:
    """Tier 0 for ``--site``: ``blocks.N.KIND`` with an integer layer and, for a word that looks
    like a typo of a site kind, a suggestion (other spellings are left to the library)."""
    import difflib

    if not site.startswith("blocks."):
        return
    parts = site.split(".", 2)
    if len(parts) != 3 or not parts[1].lstrip("-").isdigit() or not parts[2]:
        raise error(f"--site {site!r} must name one layer's site, like blocks.20.resid_post "
                    "(or the TransformerLens name blocks.20.hook_resid_post)")
    kind = parts[2]
    if kind not in COMPONENT_WORDS:
        close = difflib.get_close_matches(kind, COMPONENT_WORDS, n=3, cutoff=0.75)
        if close:
            raise error(f"unknown site kind {kind!r} in --site {site!r}. Did you mean: "
                        + ", ".join(f"blocks.{parts[1]}.{c}" for c in close) + "?")


def check_sae_folder(path: Path) -> None:
    """The folder checks of ``load_sae``, without importing torch (a bad path fails at once)."""
    folder = path.expanduser()
    if folder.is_file() and folder.name in SAE_FILES:
        folder = folder.parent
    if not folder.exists():
        raise error(f"SAE folder {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise error(f"{str(folder)!r} is a file; an SAE is a folder with {SAE_FILES[0]} and "
                    f"{SAE_FILES[1]} (SAELens format)")
    for name in SAE_FILES:
        if not (folder / name).is_file():
            raise error(f"{str(folder)!r} has no {name}: an SAE folder in the SAELens format "
                        f"holds {SAE_FILES[0]} and {SAE_FILES[1]}")


def epochs_checkpointed(path: Path) -> tuple[int, int]:
    """``(finished epochs, epochs)`` in the training checkpoint at ``path``."""
    from ...sae.checkpoint import checkpoint_status

    status = checkpoint_status(path)
    return status.epochs_done, status.epochs


def describe_checkpoint(path: Path) -> str | None:
    """What the training checkpoint at ``path`` holds, for the interrupt message."""
    from ...sae.checkpoint import checkpoint_status

    status = checkpoint_status(path)
    if not status.activations:
        return None
    what = "the collected activations"
    if status.epochs_done:
        what += f" and {status.epochs_done} of {status.epochs} epochs"
    within = status.steps_done - status.epochs_done * (status.steps // max(1, status.epochs))
    if within > 0:
        what += f"{',' if status.epochs_done else ' and'} {within} steps of epoch " \
                f"{status.epochs_done + 1}"
    return what


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
    threads: int | None = typer.Option(None, min=1, help="torch threads (default: the global "
                                       "--threads, else torch's)."),
    out: Path = typer.Option(Path("out/sae"), help="Output folder (SAELens format)."),
    checkpoint_steps: int | None = typer.Option(
        None, min=1, help="Also checkpoint every N training steps within an epoch (default: "
        "after every epoch only)."),
    resume: bool | None = resume_option(),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Train an SAE on a model's activations of offline text and save it in the SAELens format.

    The text ships with Python and causalpatch (Python's language reference, the standard
    library's docstrings, ROME's known facts; see causalpatch.sae.training_texts). Reports
    explained variance, L0, dead features and the model's loss with the SAE spliced in.

    The collected activations and, after every epoch, the training state are checkpointed in
    OUT/.checkpoints: after Ctrl-C, SIGTERM or a kill, the same command (or --resume)
    continues to the same SAE.

    Example:

      causalpatch sae train --model smollm2 --site blocks.20.resid_post \\
        --features 2048 --k 32 --tokens 100000 --out out/sae
    """
    steps = Steps(out, resume, as_json or State.json, total=1, progress_of=epochs_checkpointed,
                  describe=describe_checkpoint)
    with user_errors(), steps.interruptible():  # Ctrl-C/SIGTERM: a message, exit 130/143
        State.json = as_json = as_json or State.json
        if storage_dtype not in ("float16", "float32"):
            raise error(f"--storage-dtype must be float16 or float32, got {storage_dtype!r}")
        if features < 1 or tokens < 1 or epochs < 1:
            raise error("--features, --tokens and --epochs must be positive")
        check_choice(architecture, ARCHITECTURES, "--architecture")
        if k < 1 or eval_tokens < 1 or not lr > 0:
            raise error("--k, --eval-tokens and --lr must be positive")
        check_site(site)
        check_out_dir(out)
        info = model_info.inspect_model(model)  # --site's layer against the config, no weights
        if info is not None and site.startswith("blocks."):
            check_component(info, site, None, option="--site")
        steps.prepare()  # every check passed: the checkpoint folder
        if threads is None:
            threads = State.threads
        import torch

        from ...sae import save_sae
        from ...sae.train import train_sae

        if threads is not None:
            torch.set_num_threads(threads)
        m = runtime.load_model(model)
        log = (lambda msg: None) if not chatty(as_json) else (
            lambda msg: console.print(escape(msg)))
        trained: list[tuple[Any, Any]] = []

        def train(ckpt: str | None, progress: Any) -> list[Any]:
            trained.append(train_sae(m, site, features, architecture=architecture, k=k,
                                     l1_coefficient=l1, train_tokens=tokens,
                                     eval_tokens=eval_tokens, epochs=epochs, lr=lr, seed=seed,
                                     log=log, checkpoint=ckpt,
                                     checkpoint_steps=checkpoint_steps,
                                     progress=progress if callable(progress) else None))
            return []  # the SAE is saved below, not as a result JSON

        steps.run(1, "sae", "SAE training", train)
        sae, report = trained[0]
        folder = save_sae(sae, out, storage_dtype=getattr(torch, storage_dtype))
        steps.done()
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
    with user_errors():
        check_sae_folder(path)  # before torch is imported: a bad folder fails at once
        from ...sae import load_sae

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

"""The ``causalpatch`` command line.

Examples::

    causalpatch patch --model smollm2 \\
        --clean "When Mary and John went to the store, John gave a drink to" \\
        --corrupted "When Mary and John went to the store, Mary gave a drink to" \\
        --correct " Mary" --incorrect " John" --component attn_head --out out/ioi
    causalpatch ioi --model smollm2 --n 16 --out out/demo
    causalpatch ioi --n 256 --executor ray --address HOST:PORT --workers 8
    causalpatch trace --model smollm2 --prompt "The Eiffel Tower is in the city of" \\
        --subject "Eiffel Tower" --out out/trace
    causalpatch trace --dataset known_facts --n 100 --out out/rome
    causalpatch models
    causalpatch info smollm2

User errors print one line and exit with code 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
                  help="Fast, exact activation patching for Hugging Face language models.")
console = Console(stderr=True)
out_console = Console()


class _State:
    debug = False
    quiet = False


def _fail(exc: BaseException) -> None:
    if _State.debug:
        traceback.print_exception(exc)
    console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


@contextmanager
def _user_errors() -> Iterator[None]:
    """Turn causalpatch's errors (and bad files) into one line and exit code 2."""
    from .errors import CausalPatchError

    try:
        yield
    except typer.Exit:
        raise
    except (CausalPatchError, FileNotFoundError, PermissionError, ValueError, ImportError) as exc:
        _fail(exc)


@contextmanager
def _progress(label: str, enabled: bool) -> Iterator[Callable[[int, int], None] | bool]:
    if not enabled:
        yield False
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def _load(model: str, dtype: str | None = None) -> Any:
    import torch

    from .interpretable import InterpretableModel

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    dtypes = {None: None, "float32": torch.float32, "float16": torch.float16,
              "bfloat16": torch.bfloat16}
    if dtype not in dtypes:
        from .errors import InvalidArgumentError

        raise InvalidArgumentError(f"--dtype must be one of float32, float16, bfloat16; got {dtype!r}")
    with console.status(f"loading {model}…") if not _State.quiet else _nullcontext():
        return InterpretableModel(model, dtype=dtypes[dtype])


@contextmanager
def _nullcontext() -> Iterator[None]:
    yield


def _ints(text: str | None, what: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        from .errors import InvalidArgumentError

        raise InvalidArgumentError(
            f"{what} must be comma-separated integers like '0,5,-1', got {text!r}") from None


def _executor(executor: str | None, address: str | None, workers: int | None) -> Any:
    """``--executor/--address/--workers`` as the methods' ``executor=`` (None: local)."""
    from .errors import InvalidArgumentError

    if executor is None or executor == "local":
        if address is not None or workers is not None:
            raise InvalidArgumentError("--address and --workers need --executor ray")
        return None
    if executor != "ray":
        raise InvalidArgumentError(f"unknown --executor {executor!r}; expected local or ray")
    from .executors import RayExecutor, import_ray

    import_ray()
    if workers is not None and workers < 1:
        raise InvalidArgumentError(f"--workers must be at least 1, got {workers}")
    return RayExecutor(address=address, num_workers=workers)


def _executor_summary(results: list[Any]) -> None:
    """Per-worker throughput of the distributed sweeps (after the results)."""
    from .executors import format_summary

    for r in results:
        summary = r.extra.get("executor") if isinstance(r.extra, dict) else None
        if summary:
            console.print(f"{r.component}: " + format_summary(summary), highlight=False)


def _top_table(result: Any, k: int = 10) -> Table:
    table = Table(title=f"top {k} components: {result.component} ({result.metric}, "
                        f"{result.direction})")
    axes = list(result.axes)
    for axis in axes:
        table.add_column(axis)
    table.add_column("effect", justify="right")
    for index, effect in result.top_components(k):
        idx = index if isinstance(index, tuple) else (index,)
        cells = []
        for axis, value in zip(axes, idx):
            if axis == "position":
                cells.append(str(result.labels["position"][result.extra["positions"].index(value)]
                                 if value in result.extra.get("positions", []) else value))
            else:
                cells.append(str(value))
        table.add_row(*cells, f"{effect:+.3f}")
    return table


def _write_outputs(results: list[Any], out: Path, title: str,
                   figure: Callable[[Any], Any] | None = None) -> dict[str, str]:
    """Write each result's JSON and PNG (``figure(result)``, default ``result.plot()``) and
    one HTML report of all of them into ``out``."""
    from .render.html import report

    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}

    def save_png(result: Any, path: Path) -> None:
        if figure is None:
            result.save(path)
            return
        import io

        from ._io import atomic_write_bytes

        buffer = io.BytesIO()
        figure(result).savefig(buffer, format="png", dpi=150, bbox_inches="tight")
        atomic_write_bytes(path, buffer.getvalue())

    if len(results) == 1:
        results[0].to_json(out / "result.json")
        files["result"] = str(out / "result.json")
        save_png(results[0], out / "heatmap.png")
        files["heatmap"] = str(out / "heatmap.png")
    else:
        for r in results:
            stem = r.component + ("_by_position" if "position" in r.axes else "")
            r.to_json(out / f"{stem}.json")
            save_png(r, out / f"{stem}.png")
            files[stem] = str(out / f"{stem}.json")
    report(results, out / "report.html", title=title)
    files["report"] = str(out / "report.html")
    return files


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
         quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or tables.")
         ) -> None:
    """Fast, exact activation patching for Hugging Face language models."""
    _State.debug = debug
    _State.quiet = quiet


@app.command()
def patch(
    clean: str = typer.Option(..., help="Clean prompt."),
    corrupted: str = typer.Option(..., help="Corrupted prompt (same number of tokens)."),
    model: str = typer.Option("smollm2", help="Alias, .gguf path, HF folder or hub name."),
    correct: Optional[str] = typer.Option(None, help="Correct answer token, e.g. ' Mary'."),
    incorrect: Optional[str] = typer.Option(None, help="Incorrect answer token, e.g. ' John'."),
    component: str = typer.Option("resid_post", help="resid_pre|resid_mid|resid_post|attn|mlp|"
                                  "attn_head|attn_head_q|attn_head_k|attn_head_v|mlp_neuron"),
    metric: str = typer.Option("logit_diff", help="logit_diff|prob|logprob|ce_diff|l2|mse|cosine|kl"),
    by_position: bool = typer.Option(False, "--by-position", help="One patch per position."),
    direction: str = typer.Option("denoise", help="denoise (clean into corrupted) or noise."),
    layers: Optional[str] = typer.Option(None, help="Comma-separated layers (default all)."),
    heads: Optional[str] = typer.Option(None, help="Comma-separated heads (default all)."),
    positions: Optional[str] = typer.Option(None, help="Comma-separated positions."),
    dtype: Optional[str] = typer.Option(None, help="float32 | float16 | bfloat16"),
    out: Path = typer.Option(Path("out/patch"), help="Output folder."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
    executor: Optional[str] = typer.Option(
        None, "--executor", help="local (default) or ray: distribute pairs over Ray workers."),
    address: Optional[str] = typer.Option(
        None, "--address", help="Ray cluster HOST:PORT (default $RAY_ADDRESS, else local Ray)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Ray workers (model copies)."),
) -> None:
    """Patch one clean/corrupted pair and write result.json, heatmap.png and report.html.

    Example:

        causalpatch patch --model smollm2 --clean "When Mary and John went to the store,
        John gave a drink to" --corrupted "When Mary and John went to the store, Mary gave a
        drink to" --correct " Mary" --incorrect " John" --component attn_head --out out/ioi
    """
    from .methods.activation_patching import activation_patching

    with _user_errors():
        ex = _executor(executor, address, workers)
        m = _load(model, dtype)
        with _progress("patching", not _State.quiet and not as_json) as progress:
            result = activation_patching(
                m, clean, corrupted, component=component, metric=metric, correct=correct,
                incorrect=incorrect, by_position=by_position, direction=direction,
                layers=_ints(layers, "--layers"), heads=_ints(heads, "--heads"),
                positions=_ints(positions, "--positions"), progress=progress, executor=ex)
        if ex is not None:
            ex.shutdown()
        files = _write_outputs([result], out, f"causalpatch: {component}")
    if not as_json and not _State.quiet:
        _executor_summary([result])
    _finish([result], files, as_json)


def _finish(results: list[Any], files: dict[str, str], as_json: bool) -> None:
    if as_json:
        payload = {"files": files, "results": [
            {"component": r.component, "metric": r.metric, "direction": r.direction,
             "shape": list(r.effect_matrix.shape), "clean_metric": r.clean_metric,
             "corrupted_metric": r.corrupted_metric, "timings": r.timings,
             "top": [[list(i) if isinstance(i, tuple) else i, e] for i, e in r.top_components(10)]}
            for r in results]}
        out_console.print_json(json.dumps(payload))
        return
    if not _State.quiet:
        for r in results:
            out_console.print(_top_table(r))
        for name, path in files.items():
            out_console.print(f"[green]wrote[/] {name}: {path}")


@app.command()
def ioi(
    model: str = typer.Option("smollm2", help="Alias, .gguf path, HF folder or hub name."),
    n: int = typer.Option(16, help="Number of IOI prompt pairs."),
    seed: int = typer.Option(0, help="Dataset seed."),
    out: Path = typer.Option(Path("out/ioi"), help="Output folder."),
    dtype: Optional[str] = typer.Option(None, help="float32 | float16 | bfloat16"),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
    executor: Optional[str] = typer.Option(
        None, "--executor", help="local (default) or ray: distribute pairs over Ray workers."),
    address: Optional[str] = typer.Option(
        None, "--address", help="Ray cluster HOST:PORT (default $RAY_ADDRESS, else local Ray)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Ray workers (model copies)."),
) -> None:
    """Indirect-object identification on a dataset: resid_post by position, attn, mlp and heads.

    Example:

        causalpatch ioi --model smollm2 --n 16 --out out/demo

        causalpatch ioi --n 256 --executor ray --address HOST:PORT --workers 8
    """
    from .datasets import IOIDataset
    from .methods.activation_patching import activation_patching

    with _user_errors():
        if n < 1:
            from .errors import InvalidArgumentError

            raise InvalidArgumentError(f"--n must be at least 1, got {n}")
        ex = _executor(executor, address, workers)
        m = _load(model, dtype)
        dataset = IOIDataset(m, n=n, seed=seed)
        aligned = IOIDataset(m, n=n, seed=seed, equal_length=True)  # one length: by position
        results = []
        plan = [("resid_post", True), ("attn", True), ("mlp", True), ("attn_head", False)]
        for component, by_position in plan:
            with _progress(f"{component}", not _State.quiet and not as_json) as progress:
                results.append(activation_patching(m, aligned if by_position else dataset,
                                                   component=component,
                                                   by_position=by_position, progress=progress,
                                                   executor=ex))
        if ex is not None:
            ex.shutdown()
        files = _write_outputs(results, out, f"IOI on {m.name} ({len(dataset)} pairs)")
    if not as_json and not _State.quiet:
        _executor_summary(results)
    _finish(results, files, as_json)


@app.command()
def trace(
    prompt: Optional[str] = typer.Option(None, help="A factual prompt (one fact)."),
    subject: Optional[str] = typer.Option(None, help="The subject inside --prompt, to corrupt."),
    answer: Optional[str] = typer.Option(
        None, help="Answer token, e.g. ' Paris' (default: the model's top-1 next token)."),
    dataset: Optional[str] = typer.Option(
        None, help="known_facts: average over ROME's known facts the model gets right."),
    n: int = typer.Option(100, help="Number of facts with --dataset."),
    model: str = typer.Option("smollm2", help="Alias, .gguf path, HF folder or hub name."),
    components: str = typer.Option("resid_post,mlp,attn",
                                   help="Comma-separated: resid_post, mlp, attn, resid_pre."),
    samples: int = typer.Option(10, help="Noise samples per prompt."),
    noise: float = typer.Option(3.0, help="Noise scale, a multiple of the embedding std."),
    window: int = typer.Option(1, help="Layers restored together for mlp/attn (ROME: 10)."),
    seed: int = typer.Option(0, help="Noise seed (and the facts' shuffle with --dataset)."),
    dtype: Optional[str] = typer.Option(None, help="float32 | float16 | bfloat16"),
    out: Path = typer.Option(Path("out/trace"), help="Output folder."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
    executor: Optional[str] = typer.Option(
        None, "--executor", help="local (default) or ray: distribute pairs over Ray workers."),
    address: Optional[str] = typer.Option(
        None, "--address", help="Ray cluster HOST:PORT (default $RAY_ADDRESS, else local Ray)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Ray workers (model copies)."),
) -> None:
    """ROME causal tracing: noise the subject, restore one state per layer x position.

    --prompt traces one fact at every position; --dataset known_facts averages ROME's facts.

    Writes each component's JSON and ROME-style PNG, and report.html.

    Example:

        causalpatch trace --model smollm2 --prompt "The Eiffel Tower is in the city of"
        --subject "Eiffel Tower" --out out/trace

        causalpatch trace --dataset known_facts --n 100 --window 10 --out out/rome
    """
    from .errors import InvalidArgumentError
    from .methods.causal_tracing import causal_tracing, causal_tracing_dataset
    from .render.plots import plot_trace

    with _user_errors():
        if (prompt is None) == (dataset is None):
            raise InvalidArgumentError(
                "give either --prompt (with --subject) for one fact or --dataset known_facts")
        if dataset is not None and dataset != "known_facts":
            raise InvalidArgumentError(f"unknown --dataset {dataset!r}; expected known_facts")
        if prompt is not None and subject is None:
            raise InvalidArgumentError("--subject is required with --prompt")
        if dataset is not None and (subject is not None or answer is not None):
            raise InvalidArgumentError(
                "--subject and --answer are for --prompt; each known fact has its own")
        if n < 1:
            raise InvalidArgumentError(f"--n must be at least 1, got {n}")
        kinds = tuple(c for c in components.replace(" ", "").split(",") if c)
        ex = _executor(executor, address, workers)
        m = _load(model, dtype)
        settings = dict(noise=noise, samples=samples, seed=seed, components=kinds,
                        window=window, executor=ex)
        with _progress("causal tracing", not _State.quiet and not as_json) as progress:
            if prompt is not None:
                traced = causal_tracing(m, prompt, subject, answer=answer,
                                        position_groups=False, progress=progress, **settings)
                title = f"Causal tracing: {prompt}"
            else:
                from .datasets import known_facts

                facts = known_facts(m, n, seed=seed)
                if not facts:
                    raise InvalidArgumentError(
                        f"none of ROME's known facts is answered correctly by {m.name}")
                traced = causal_tracing_dataset(m, facts, progress=progress, **settings)
                title = f"Causal tracing: {len(facts)} known facts on {m.name}"
        if ex is not None:
            ex.shutdown()
        results = list(traced.values())
        files = _write_outputs(results, out, title, figure=plot_trace)
    if not as_json and not _State.quiet:
        out_console.print(traced.summary(), highlight=False)
    _finish(results, files, as_json)


@app.command()
def models(as_json: bool = typer.Option(False, "--json", help="Machine-readable JSON.")) -> None:
    """List model aliases, whether their packages are installed, and supported architectures.

    Example:

        causalpatch models
    """
    from .adapters import ADAPTERS
    from .loading import ALIASES, GEMMA3_PACKAGE, SMOLLM2_PACKAGE, package_dir

    installed = {"smollm2": package_dir(SMOLLM2_PACKAGE) is not None,
                 "smollm2-135m": package_dir(SMOLLM2_PACKAGE) is not None,
                 "gemma3-270m": package_dir(GEMMA3_PACKAGE) is not None}
    data = {"aliases": [{"alias": a, "description": d, "installed": installed.get(a, False)}
                        for a, d in ALIASES.items()],
            "adapters": [{"name": a.name, "model_types": list(a.model_types)} for a in ADAPTERS]}
    if as_json:
        out_console.print_json(json.dumps(data))
        return
    table = Table(title="model aliases")
    for col in ("alias", "description", "installed"):
        table.add_column(col)
    for row in data["aliases"]:
        table.add_row(row["alias"], row["description"], "yes" if row["installed"] else "no")
    out_console.print(table)
    adapters = Table(title="architecture adapters")
    adapters.add_column("adapter")
    adapters.add_column("config.model_type")
    for row in data["adapters"]:
        adapters.add_row(row["name"], ", ".join(row["model_types"]))
    out_console.print(adapters)


@app.command()
def info(model: str = typer.Argument(..., help="Alias, .gguf path, HF folder or hub name."),
         as_json: bool = typer.Option(False, "--json", help="Machine-readable JSON.")) -> None:
    """Show a model's sizes and its component names.

    Example:

        causalpatch info smollm2
    """
    from .names import site_kinds

    with _user_errors():
        m = _load(model)
    d = m.dims
    data = {"name": m.name, "architecture": m.architecture, "n_layers": d.n_layers,
            "n_heads": d.n_heads, "n_kv_heads": d.n_kv_heads, "d_model": d.d_model,
            "d_head": d.d_head, "d_mlp": d.d_mlp, "vocab_size": d.vocab_size,
            "components": [f"blocks.L.{k}" for k in site_kinds(m.adapter, m.config)]}
    if as_json:
        out_console.print_json(json.dumps(data))
        return
    table = Table(title=f"{m.name}")
    table.add_column("property")
    table.add_column("value")
    for key, value in data.items():
        table.add_row(key, "\n".join(value) if isinstance(value, list) else str(value))
    out_console.print(table)


sae_app = typer.Typer(no_args_is_help=True, rich_markup_mode="rich",
                      help="Sparse autoencoders (SAELens format): train one, inspect one.")
app.add_typer(sae_app, name="sae")


@sae_app.command("train")
def sae_train(
    model: str = typer.Option("smollm2", help="Alias, .gguf path, HF folder or hub name."),
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
    threads: Optional[int] = typer.Option(None, help="torch threads (default: torch's)."),
    out: Path = typer.Option(Path("out/sae"), help="Output folder (SAELens format)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Train an SAE on a model's activations of offline text and save it in the SAELens format.

    The text ships with Python and causalpatch (Python's language reference, the standard
    library's docstrings, ROME's known facts; see causalpatch.sae.training_texts). Reports
    explained variance, L0, dead features and the model's loss with the SAE spliced in.

    Example:

        causalpatch sae train --model smollm2 --site blocks.20.resid_post --features 2048
        --k 32 --tokens 100000 --out out/sae
    """
    import torch

    from .errors import InvalidArgumentError
    from .sae import save_sae, train_sae

    with _user_errors():
        if storage_dtype not in ("float16", "float32"):
            raise InvalidArgumentError(
                f"--storage-dtype must be float16 or float32, got {storage_dtype!r}")
        if features < 1 or tokens < 1 or epochs < 1:
            raise InvalidArgumentError("--features, --tokens and --epochs must be positive")
        if threads is not None:
            torch.set_num_threads(threads)
        m = _load(model)
        log = (lambda msg: None) if (_State.quiet or as_json) else (
            lambda msg: console.print(msg, highlight=False))
        sae, report = train_sae(m, site, features, architecture=architecture, k=k,
                                l1_coefficient=l1, train_tokens=tokens,
                                eval_tokens=eval_tokens, epochs=epochs, lr=lr, seed=seed,
                                log=log)
        folder = save_sae(sae, out, storage_dtype=getattr(torch, storage_dtype))
    if as_json:
        out_console.print_json(json.dumps({"folder": str(folder), **report.to_dict()}))
    elif not _State.quiet:
        out_console.print(report.summary(), highlight=False)
        out_console.print(f"[green]wrote[/] {folder}")


@sae_app.command("info")
def sae_info(path: Path = typer.Argument(..., help="An SAE folder (cfg.json + "
                                          "sae_weights.safetensors)."),
             as_json: bool = typer.Option(False, "--json", help="Machine-readable JSON.")
             ) -> None:
    """Show an SAE's configuration (and its training report when it has one).

    Example:

        causalpatch sae info out/sae
    """
    from .sae import load_sae

    with _user_errors():
        sae = load_sae(path)
    data = {"architecture": sae.architecture, "d_in": sae.d_in, "d_sae": sae.d_sae,
            "k": sae.k, "site": sae.site, "hook_name": sae.hook_name,
            "model_name": sae.model_name,
            "training_report": sae.metadata.get("training_report")}
    if as_json:
        out_console.print_json(json.dumps(data))
        return
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
            table.add_row(key, str(value))
    out_console.print(table)


def run() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())

"""``causalpatch ioi``: the indirect-object-identification analysis in four labelled steps
(``resid_post``, ``attn`` and ``mlp`` by position, then ``attn_head``) and one report."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from .. import model_info, runtime
from ..checks import DTYPES, FIGURE_FORMATS, check_choice, check_executor_args
from ..failures import error, user_errors
from ..options import (ADDRESS_HELP, DTYPE_HELP, EXECUTOR_HELP, JSON_HELP, MODEL_HELP,
                       WORKERS_HELP, format_option)
from ..outputs import check_out_dir, executor_summary, finish, save_outputs
from ..state import State, chatty, console
from ..sweeps import Steps, resume_option

#: The analysis: (component, by position), in order.
STEPS = (("resid_post", True), ("attn", True), ("mlp", True), ("attn_head", False))


def ioi(
    model: str = typer.Option("smollm2", help=MODEL_HELP),
    n: int = typer.Option(16, help="Number of IOI prompt pairs."),
    seed: int = typer.Option(0, help="Dataset seed."),
    out: Path = typer.Option(Path("out/ioi"), help="Output folder."),
    fmt: str = format_option(),
    dtype: str | None = typer.Option(None, help=DTYPE_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    executor: str | None = typer.Option(None, "--executor", help=EXECUTOR_HELP),
    address: str | None = typer.Option(None, "--address", help=ADDRESS_HELP),
    workers: int | None = typer.Option(None, "--workers", help=WORKERS_HELP),
    resume: bool | None = resume_option(),
) -> None:
    """Indirect-object identification: resid_post, attn and mlp by position, then heads.

    Example:

      causalpatch ioi --model smollm2 --n 16 --out out/demo

      causalpatch ioi --n 256 --executor ray --address HOST:PORT --workers 8

    Ctrl-C writes the finished steps and checkpoints the running one (OUT/.checkpoints);
    rerun the command (or add --resume) to continue.
    """
    steps = Steps(out, resume, as_json or State.json, total=len(STEPS))
    with user_errors(), steps.interruptible():
        State.json = as_json = as_json or State.json
        if n < 1:
            raise error(f"--n must be at least 1, got {n}")
        if dtype is not None:
            check_choice(dtype, DTYPES, "--dtype")
        check_executor_args(executor, address, workers)
        check_choice(fmt, FIGURE_FORMATS, "--format")
        check_out_dir(out)
        model_info.inspect_model(model)  # unknown models and architectures fail before the load
        steps.prepare()
        ex = runtime.make_executor(executor, address, workers)
        m = runtime.load_model(model, dtype)
        from ...datasets import IOIDataset
        from ...methods.activation_patching import activation_patching

        dataset = IOIDataset(m, n=n, seed=seed)
        aligned = IOIDataset(m, n=n, seed=seed, equal_length=True)  # one length: by position
        results = []
        for step, (component, by_position) in enumerate(STEPS, 1):
            what = component + (" by position" if by_position else " per head")
            t0 = time.perf_counter()
            data = aligned if by_position else dataset

            def sweep(ckpt: str | None, progress: Any, data: Any = data,
                      component: str = component, by_position: bool = by_position
                      ) -> list[Any]:
                return [activation_patching(m, data, component=component,
                                            by_position=by_position, progress=progress,
                                            executor=ex, checkpoint=ckpt)]

            results += steps.run(step, f"step{step}_{component}", what, sweep)
            if chatty(as_json):
                cells = results[-1].effect_matrix.numel()
                console.print(f"[green]✓[/] step {step}/{len(STEPS)}: {escape(what)}: {cells} "
                              f"cells x {len(data)} pairs in {time.perf_counter() - t0:.1f} s")
        if ex is not None:
            ex.shutdown()
        files = save_outputs(results, out, f"IOI on {m.name} ({len(dataset)} pairs)", fmt=fmt)
        steps.done()
    if chatty(as_json):
        executor_summary(results)
    finish(results, files, as_json)

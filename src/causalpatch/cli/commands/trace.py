"""``causalpatch trace``: ROME causal tracing of one fact (``--prompt`` with ``--subject``) or
averaged over ROME's known facts (``--dataset known_facts``); one ROME-style figure and JSON
per component, and a report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from .. import model_info, runtime
from ..checks import (DTYPES, FIGURE_FORMATS, TRACE_COMPONENTS, check_answer,
                      check_answer_text, check_choice, check_executor_args, check_prompt)
from ..failures import error, user_errors
from ..options import (ADDRESS_HELP, DTYPE_HELP, EXECUTOR_HELP, JSON_HELP, MODEL_HELP,
                       WORKERS_HELP, format_option)
from ..outputs import check_out_dir, finish, save_outputs
from ..state import State, chatty, out_console
from ..sweeps import Steps, resume_option



def trace(
    prompt: str | None = typer.Option(None, help="A factual prompt (one fact)."),
    subject: str | None = typer.Option(None, help="The subject inside --prompt, to corrupt."),
    answer: str | None = typer.Option(
        None, help="Answer token, e.g. ' Paris' (default: the model's top-1 next token)."),
    dataset: str | None = typer.Option(
        None, help="known_facts: average over ROME's known facts the model gets right."),
    n: int = typer.Option(100, help="Number of facts with --dataset."),
    model: str = typer.Option("smollm2", help=MODEL_HELP),
    components: str = typer.Option("resid_post,mlp,attn",
                                   help="Comma-separated: resid_post, mlp, attn, resid_pre."),
    samples: int = typer.Option(10, help="Noise samples per prompt."),
    noise: float = typer.Option(3.0, help="Noise scale, a multiple of the embedding std."),
    window: int = typer.Option(10, help="Layers restored together for mlp/attn (ROME: 10)."),
    seed: int = typer.Option(0, help="Noise seed (and the facts' shuffle with --dataset)."),
    dtype: str | None = typer.Option(None, help=DTYPE_HELP),
    out: Path = typer.Option(Path("out/trace"), help="Output folder."),
    fmt: str = format_option(),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    executor: str | None = typer.Option(None, "--executor", help=EXECUTOR_HELP),
    address: str | None = typer.Option(None, "--address", help=ADDRESS_HELP),
    workers: int | None = typer.Option(None, "--workers", help=WORKERS_HELP),
    resume: bool | None = resume_option(),
) -> None:
    """ROME causal tracing: noise the subject, restore one state per layer and position.

    --prompt traces one fact at every position; --dataset known_facts averages ROME's facts.
    Writes each component's JSON and ROME-style figure, and report.html.

    Example:

      causalpatch trace --model smollm2 --subject "Eiffel Tower" \\
        --prompt "The Eiffel Tower is in the city of" --out out/trace

      causalpatch trace --dataset known_facts --n 100 --window 10 --out out/rome
    """
    steps = Steps(out, resume, as_json or State.json, total=1)
    with user_errors(), steps.interruptible():
        State.json = as_json = as_json or State.json
        if (prompt is None) == (dataset is None):
            raise error(
                "give either --prompt (with --subject) for one fact or --dataset known_facts")
        if dataset is not None and dataset != "known_facts":
            raise error(f"unknown --dataset {dataset!r}; expected known_facts")
        if prompt is not None:
            check_prompt(prompt, "--prompt")
            if subject is None:
                raise error("--subject is required with --prompt")
            if not subject.strip():
                raise error("--subject is empty: give the subject's words as they appear in "
                            "--prompt")
            if subject not in prompt:
                raise error(f"--subject {subject!r} not found in --prompt {prompt!r} (it must "
                            "appear exactly, case included)")
            check_answer_text(answer, "--answer")
        if dataset is not None and (subject is not None or answer is not None):
            raise error("--subject and --answer are for --prompt; each known fact has its own")
        if n < 1:
            raise error(f"--n must be at least 1, got {n}")
        if samples < 1 or window < 1:
            raise error(f"--samples and --window must be at least 1, got {samples} and "
                        f"{window}")
        if not noise > 0:
            raise error(f"--noise must be positive (a multiple of the embeddings' standard "
                        f"deviation; ROME uses 3.0), got {noise}")
        kinds = tuple(c for c in components.replace(" ", "").split(",") if c)
        if not kinds:
            raise error("--components is empty; expected some of " + ", ".join(TRACE_COMPONENTS))
        for kind in kinds:
            check_choice(kind, TRACE_COMPONENTS, "component in --components")
        if dtype is not None:
            check_choice(dtype, DTYPES, "--dtype")
        check_executor_args(executor, address, workers)
        check_choice(fmt, FIGURE_FORMATS, "--format")
        check_out_dir(out)
        info = model_info.inspect_model(model)
        if info is not None and prompt is not None:
            check_answer(info, answer, [prompt], "--answer")
        steps.prepare()
        ex = runtime.make_executor(executor, address, workers)
        m = runtime.load_model(model, dtype)
        from ...methods.causal_tracing import causal_tracing, causal_tracing_dataset
        from ...render.plots import plot_trace

        settings: dict[str, Any] = dict(noise=noise, samples=samples, seed=seed,
                                        components=kinds, window=window, executor=ex)
        if prompt is not None:
            assert subject is not None  # checked above: --subject is required with --prompt
            title = f"Causal tracing: {prompt}"

            def compute(ckpt: str | None, progress: Any) -> Any:
                return causal_tracing(m, prompt, subject, answer=answer, position_groups=False,
                                      checkpoint=ckpt, progress=progress, **settings)
        else:
            from ...datasets import known_facts

            facts = known_facts(m, n, seed=seed)
            if not facts:
                raise error(f"none of ROME's known facts is answered correctly by {m.name}")
            title = f"Causal tracing: {len(facts)} known facts on {m.name}"

            def compute(ckpt: str | None, progress: Any) -> Any:
                return causal_tracing_dataset(m, facts, checkpoint=ckpt, progress=progress,
                                              **settings)
        traced: Any = None

        def one_step(ckpt: str | None, progress: Any) -> list[Any]:
            nonlocal traced
            traced = compute(ckpt, progress)
            return list(traced.values())

        results = steps.run(1, "trace", "causal tracing", one_step)
        if ex is not None:
            ex.shutdown()
        files = save_outputs(results, out, title, figure=plot_trace, fmt=fmt)
        steps.done()
    if chatty(as_json):
        out_console.print(traced.summary(), highlight=False)
    finish(results, files, as_json)

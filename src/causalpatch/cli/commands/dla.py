"""``causalpatch dla``: direct logit attribution of one prompt (``--prompt`` with
``--correct``) or of the IOI dataset (``--dataset ioi``, its own answers); writes
``result.json``, the figure and ``report.html`` through the result's own
``to_json``/``save``/``to_html``."""

from __future__ import annotations

from pathlib import Path

import typer

from .. import model_info, runtime
from ..checks import DTYPES, FIGURE_FORMATS, check_answer, check_answer_text, check_choice, \
    check_prompt
from ..failures import error, user_errors
from ..options import DTYPE_HELP, JSON_HELP, MODEL_HELP, format_option
from ..outputs import check_out_dir
from ..state import State
from .lens import save_result, show

#: Mirror of ``causalpatch.methods.lens.UNITS`` (tests/cli/test_cli_lens.py checks it).
DLA_UNITS = ("component", "layer", "head", "neuron")


def dla(
    prompt: str | None = typer.Option(None, help="One prompt (with --correct)."),
    dataset: str | None = typer.Option(
        None, help="ioi: the IOI prompts, each with its own answers (instead of --prompt)."),
    n: int = typer.Option(16, help="Number of prompts with --dataset."),
    seed: int = typer.Option(0, help="Dataset seed."),
    correct: str | None = typer.Option(None, help="Answer token, e.g. ' Mary'."),
    incorrect: str | None = typer.Option(
        None, help="Competing answer, e.g. ' John' (without it: the logit of --correct)."),
    unit: str = typer.Option("component", help="component, layer, head or neuron."),
    position: int = typer.Option(-1, help="Token position (negative counts from the end)."),
    model: str = typer.Option("smollm2", help=MODEL_HELP),
    dtype: str | None = typer.Option(None, help=DTYPE_HELP),
    out: Path = typer.Option(Path("out/dla"), help="Output folder."),
    fmt: str = format_option(),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Direct logit attribution: each residual-stream write's share of the logit difference.

    The parts (embeddings, attention and MLP outputs, per head or neuron with --unit,
    biases) sum to the model's logit difference at --position. Writes result.json, the
    figure and report.html.

    Example:

      causalpatch dla --model smollm2 --unit head --correct " Mary" --incorrect " John" \\
        --prompt "When Mary and John went to the store, John gave a drink to" --out out/dla

      causalpatch dla --dataset ioi --n 16 --unit head --out out/dla_ioi
    """
    with user_errors():
        State.json = as_json = as_json or State.json
        # tier 0: no imports
        if (prompt is None) == (dataset is None):
            raise error("give either --prompt (with --correct) or --dataset ioi")
        if dataset is not None:
            if dataset != "ioi":
                raise error(f"unknown --dataset {dataset!r}; expected ioi")
            if correct is not None or incorrect is not None:
                raise error("--correct and --incorrect are for --prompt; each IOI prompt has "
                            "its own answers")
            if n < 1:
                raise error(f"--n must be at least 1, got {n}")
        else:
            assert prompt is not None
            check_prompt(prompt, "--prompt")
            if correct is None:
                raise error("--correct is required with --prompt: the answer token whose "
                            "logit is attributed, e.g. --correct ' Mary'")
            check_answer_text(correct, "--correct")
            check_answer_text(incorrect, "--incorrect")
            if correct == incorrect:
                raise error(f"--correct and --incorrect are the same ({correct!r}); the logit "
                            "difference would be 0")
        check_choice(unit, DLA_UNITS, "--unit")
        if dtype is not None:
            check_choice(dtype, DTYPES, "--dtype")
        check_choice(fmt, FIGURE_FORMATS, "--format")
        check_out_dir(out)
        # tier 1: config and tokenizer, no weights
        info = model_info.inspect_model(model)
        if info is not None and prompt is not None:
            length = len(info.prompt_ids(prompt))
            if not -length <= position < length:
                raise error(f"--position {position} is out of range: --prompt is {length} "
                            f"tokens, so it must be in [{-length}, {length - 1}]")
            check_answer(info, correct, [prompt], "--correct")
            check_answer(info, incorrect, [prompt], "--incorrect")
        m = runtime.load_model(model, dtype)
        from ...methods.lens import direct_logit_attribution

        if prompt is not None:
            result = direct_logit_attribution(m, prompt, unit, correct=correct,
                                              incorrect=incorrect, position=position)
        else:
            from ...datasets import IOIDataset

            result = direct_logit_attribution(m, IOIDataset(m, n=n, seed=seed), unit,
                                              position=position)
        files = save_result(result, out, fmt)
    show(result, files, as_json)

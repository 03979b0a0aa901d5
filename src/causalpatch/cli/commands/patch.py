"""``causalpatch patch``: one clean/corrupted pair, one sweep, its JSON, heatmap and report.

``resid_*`` components are patched by position unless told otherwise (patching a whole
residual stream restores the clean run: +1.000 at every layer), with a note; forcing the
whole-stream sweep warns.
"""

from __future__ import annotations

from pathlib import Path

import typer

from .. import model_info, runtime
from ..checks import (DIRECTIONS, DTYPES, FIGURE_FORMATS, METRICS, check_answer,
                      check_answer_text, check_choice, check_component, check_component_word,
                      check_executor_args, check_layers, check_prompt, ints, is_resid)
from ..failures import error, user_errors
from ..options import (ADDRESS_HELP, COMPONENT_HELP, DTYPE_HELP, EXECUTOR_HELP, JSON_HELP,
                       MODEL_HELP, WORKERS_HELP, format_option)
from ..outputs import check_out_dir, executor_summary, finish, save_outputs
from ..state import State, chatty, note, warn
from ..sweeps import Steps, resume_option


def patch(
    clean: str = typer.Option(..., help="Clean prompt."),
    corrupted: str = typer.Option(..., help="Corrupted prompt (same number of tokens for "
                                  "--by-position)."),
    model: str = typer.Option("smollm2", help=MODEL_HELP),
    correct: str | None = typer.Option(None, help="Correct answer token, e.g. ' Mary' "
                                          "(mind the leading space)."),
    incorrect: str | None = typer.Option(None, help="Incorrect answer token, e.g. ' John'."),
    component: str = typer.Option("resid_post", help=COMPONENT_HELP),
    metric: str = typer.Option("logit_diff", help="logit_diff, logit, prob, logprob, ce_diff, "
                               "l2, mse, cosine or kl."),
    by_position: bool | None = typer.Option(
        None, "--by-position/--no-by-position",
        help="One patch per token position. Default: on for resid_* (patching a whole "
             "residual stream restores everything, +1.000 at every layer), off otherwise."),
    direction: str = typer.Option("denoise", help="denoise (clean into corrupted) or noise."),
    layers: str | None = typer.Option(None, help="Comma-separated layers, e.g. 0,5,-1 "
                                         "(default all)."),
    heads: str | None = typer.Option(None, help="Comma-separated heads (default all)."),
    positions: str | None = typer.Option(None, help="Comma-separated positions."),
    dtype: str | None = typer.Option(None, help=DTYPE_HELP),
    out: Path = typer.Option(Path("out/patch"), help="Output folder."),
    fmt: str = format_option(),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    executor: str | None = typer.Option(None, "--executor", help=EXECUTOR_HELP),
    address: str | None = typer.Option(None, "--address", help=ADDRESS_HELP),
    workers: int | None = typer.Option(None, "--workers", help=WORKERS_HELP),
    resume: bool | None = resume_option(),
) -> None:
    """Patch one clean/corrupted pair; write result.json, a heatmap and report.html.

    Example (IOI: which attention heads move the name?):

      CLEAN="When Mary and John went to the store, John gave a drink to"
      CORRUPTED="When Mary and John went to the store, Mary gave a drink to"
      causalpatch patch --clean "$CLEAN" --corrupted "$CORRUPTED" \\
        --correct " Mary" --incorrect " John" --component attn_head --out out/ioi

    Example (the residual stream; by position is the default for resid_*):

      causalpatch patch --clean "$CLEAN" --corrupted "$CORRUPTED" \\
        --correct " Mary" --incorrect " John" --layers 0,10,20,29 --format svg

    Answers are single tokens; after a word they start with a space (" Mary").
    Arguments are checked against the model's config and tokenizer before the
    weights load. Ctrl-C keeps the finished cells (OUT/.checkpoints); rerun to resume.
    """
    steps = Steps(out, resume, as_json or State.json, total=1, single=True)
    with user_errors(), steps.interruptible():
        State.json = as_json = as_json or State.json
        # tier 0: no imports
        check_prompt(clean, "--clean")
        check_prompt(corrupted, "--corrupted")
        check_answer_text(correct, "--correct")
        check_answer_text(incorrect, "--incorrect")
        if correct is not None and correct == incorrect:
            raise error(f"--correct and --incorrect are the same ({correct!r}); the logit "
                        "difference would be 0")
        check_component_word(component)
        check_choice(metric, METRICS, "--metric")
        check_choice(direction, DIRECTIONS, "--direction")
        if dtype is not None:
            check_choice(dtype, DTYPES, "--dtype")
        layer_list = ints(layers, "--layers")
        head_list = ints(heads, "--heads")
        position_list = ints(positions, "--positions")
        check_executor_args(executor, address, workers)
        check_choice(fmt, FIGURE_FORMATS, "--format")
        check_out_dir(out)
        auto_by_position = by_position is None
        if by_position is None:
            by_position = is_resid(component)
        # tier 1: config and tokenizer, no weights
        info = model_info.inspect_model(model)
        if info is not None:
            check_layers(info, layer_list)
            check_component(info, component, head_list)
            lengths = (len(info.prompt_ids(clean)), len(info.prompt_ids(corrupted)))
            if by_position and lengths[0] != lengths[1]:
                raise error(
                    f"--by-position needs prompts of equal token length: --clean is "
                    f"{lengths[0]} tokens, --corrupted {lengths[1]}. Make them the same "
                    "length (swap names of equal token count)"
                    + ("" if not is_resid(component) else
                       ", or pass --no-by-position (trivial for resid_*)"))
            for p in position_list or []:
                if not -min(lengths) <= p < min(lengths):
                    raise error(f"--positions contains {p}, out of range for a prompt of "
                                f"{min(lengths)} tokens")
            check_answer(info, correct, [clean, corrupted], "--correct")
            check_answer(info, incorrect, [clean, corrupted], "--incorrect")
        if auto_by_position and by_position:
            note(f"{component} is patched by position (patching the whole residual stream "
                 "restores the clean run: +1.000 at every layer); --no-by-position forces it")
        elif not by_position and is_resid(component) and position_list is None:
            warn(f"--no-by-position with {component}: patching the whole residual stream "
                 "restores the clean run, so every layer shows +1.000; use --by-position")
        steps.prepare()
        ex = runtime.make_executor(executor, address, workers)
        m = runtime.load_model(model, dtype)
        from ...methods.activation_patching import activation_patching

        (result,) = steps.run(1, "patch", f"{component} sweep", lambda ckpt, progress: [
            activation_patching(
                m, clean, corrupted, component=component, metric=metric, correct=correct,
                incorrect=incorrect, by_position=by_position, direction=direction,
                layers=layer_list, heads=head_list, positions=position_list,
                progress=progress, executor=ex, checkpoint=ckpt)])
        if ex is not None:
            ex.shutdown()
        files = save_outputs([result], out, f"causalpatch: {component}", fmt=fmt)
        steps.done()
    if chatty(as_json):
        executor_summary([result])
    finish([result], files, as_json)  # title, baselines, takeaway, table, files

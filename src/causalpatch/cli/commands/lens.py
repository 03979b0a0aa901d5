"""``causalpatch lens``: the logit lens of one prompt (every layer x the chosen positions read
out through the final norm and the unembedding); writes ``result.json``, the heatmap and
``report.html`` through the result's own ``to_json``/``save``/``to_html``."""

from __future__ import annotations

import tempfile
import traceback
from pathlib import Path
from typing import Any

import typer

from .. import model_info, runtime
from ..checks import DTYPES, FIGURE_FORMATS, check_answer, check_answer_text, check_choice, \
    check_prompt, ints
from ..failures import OutputsSavedElsewhere, error, user_errors
from ..options import DTYPE_HELP, JSON_HELP, MODEL_HELP, format_option
from ..outputs import check_out_dir, emit_json
from ..state import State, out_console

#: Mirror of ``causalpatch.methods.lens.LENS_STATS`` (tests/cli/test_cli_lens.py checks it).
LENS_STATS = ("top", "answer_prob", "answer_rank", "entropy", "kl")


def save_result(result: Any, out: Path, fmt: str, **plot_kw: Any) -> dict[str, str]:
    """``result.json``, ``heatmap.<fmt>`` and ``report.html`` in ``out`` by the result's own
    ``to_json``/``save``/``to_html``; when writing fails, the JSON goes to a temporary folder
    and :class:`OutputsSavedElsewhere` names it (the computed result is never lost)."""
    files = {"result": str(out / "result.json"), "heatmap": str(out / f"heatmap.{fmt}"),
             "report": str(out / "report.html")}
    try:
        out.mkdir(parents=True, exist_ok=True)
        result.to_json(files["result"])
        result.save(files["heatmap"], format=fmt, **plot_kw)
        result.to_html(files["report"])
    except Exception as exc:  # whatever failed, keep the computed result
        if State.debug:
            traceback.print_exception(exc)
        fallback = Path(tempfile.mkdtemp(prefix="causalpatch-results-")) / "result.json"
        result.to_json(fallback)
        raise OutputsSavedElsewhere(
            f"could not write the outputs to {str(out)!r} ({type(exc).__name__}: {exc}). The "
            f"computed result was saved to {fallback}") from exc
    return files


def show(result: Any, files: dict[str, str], as_json: bool) -> None:
    """``--json``: one document with the files, the title and takeaway line and every number
    of the result; otherwise the title, the takeaway line (the report summary's line), the
    result's summary and the files written (nothing with ``--quiet``)."""
    from ...render.lens import dla_headline, dla_title, is_lens, lens_headline, lens_title

    lens_like = is_lens(result)
    title = lens_title(result) if lens_like else dla_title(result)
    line = lens_headline(result) if lens_like else dla_headline(result)
    if as_json or State.json:
        emit_json({"files": files, "title": title, "takeaway": line,
                   "result": result.to_dict()})
        return
    if not State.quiet:
        from rich.markup import escape

        out_console.print(f"[bold]{escape(title)}[/]", highlight=False, soft_wrap=True)
        out_console.print(escape(line[:1].upper() + line[1:] + "."), highlight=False,
                          soft_wrap=True)
        out_console.print(escape(result.summary()), highlight=False)
        for name, path in files.items():
            out_console.print(f"[green]wrote[/] {escape(name)}: {escape(path)}")


def lens(
    prompt: str = typer.Option(..., help="The prompt to read out."),
    model: str = typer.Option("smollm2", help=MODEL_HELP),
    answer: str | None = typer.Option(
        None, help="Answer token, e.g. ' Paris': its probability and rank at every cell."),
    positions: str | None = typer.Option(
        None, help="Comma-separated token positions, e.g. '-1' (default: every position)."),
    k: int = typer.Option(5, "--k", help="Top tokens kept per cell."),
    include_embed: bool = typer.Option(False, "--include-embed",
                                       help="Add an 'embed' row: the input of layer 0."),
    stat: str = typer.Option("top", help="The figure's statistic: " + ", ".join(LENS_STATS)),
    dtype: str | None = typer.Option(None, help=DTYPE_HELP),
    out: Path = typer.Option(Path("out/lens"), help="Output folder."),
    fmt: str = format_option(),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Logit lens: every layer's residual stream read out as next-token predictions.

    Writes result.json (top-k, entropy, KL to the final layer, the answer's probability
    and rank per layer x position), the heatmap and report.html.

    Example:

      causalpatch lens --model smollm2 --prompt "The Eiffel Tower is in the city of" \\
        --answer " Paris" --positions -1 --out out/lens
    """
    with user_errors():
        State.json = as_json = as_json or State.json
        # tier 0: no imports
        check_prompt(prompt, "--prompt")
        check_answer_text(answer, "--answer")
        position_list = ints(positions, "--positions")
        if k < 1:
            raise error(f"--k must be at least 1, got {k}")
        check_choice(stat, LENS_STATS, "--stat")
        if stat.startswith("answer_") and answer is None:
            raise error(f"--stat {stat} needs --answer (e.g. --answer ' Paris')")
        if dtype is not None:
            check_choice(dtype, DTYPES, "--dtype")
        check_choice(fmt, FIGURE_FORMATS, "--format")
        check_out_dir(out)
        # tier 1: config and tokenizer, no weights
        info = model_info.inspect_model(model)
        if info is not None:
            length = len(info.prompt_ids(prompt))
            for p in position_list or []:
                if not -length <= p < length:
                    raise error(f"--positions contains {p}, out of range: --prompt is {length} "
                                f"tokens, so positions must be in [{-length}, {length - 1}]")
            check_answer(info, answer, [prompt], "--answer")
        m = runtime.load_model(model, dtype)
        from ...methods.lens import logit_lens

        if k > m.vocab_size:
            raise error(f"--k must be at most the vocabulary size {m.vocab_size}, got {k}")
        result = logit_lens(m, prompt, answer=answer, positions=position_list, k=k,
                            include_embed=include_embed, keep_logits=False)
        files = save_result(result, out, fmt, stat=stat)
    show(result, files, as_json)

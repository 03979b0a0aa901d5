"""``causalpatch report``: one self-contained HTML file from saved result JSON files (or
folders of them), written by ``patch``/``ioi``/``trace`` or ``result.save("x.json")``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import typer
from rich.markup import escape

from ..checks import PLOTLY_MODES, check_choice
from ..failures import error, user_errors
from ..outputs import check_out_file, emit_json
from ..state import State, out_console


def result_files(paths: Sequence[Path]) -> list[Path]:
    """Files as given; a folder stands for the result JSON files inside it."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(path.glob("*.json"))
            if not found:
                raise error(f"folder {str(path)!r} holds no .json result files")
            files += found
        elif not path.exists():
            raise error(f"result file {str(path)!r} does not exist")
        else:
            files.append(path)
    return files


def report_command(
    results: list[Path] = typer.Argument(..., help="Result JSON files (or folders of them), "
                                         "written by patch/ioi/trace or result.save('x.json')."),
    out: Path = typer.Option(Path("report.html"), "--out", help="The HTML file to write."),
    title: str | None = typer.Option(None, help="Page title."),
    plotly: str = typer.Option("inline", help="inline: plotly.js in the file, opens offline "
                               "(~4.8 MB); cdn: small file, needs network to draw."),
    shared_scale: bool = typer.Option(False, "--shared-scale",
                                      help="Start with one colour scale per kind of result."),
    as_json: bool = typer.Option(False, "--json", help="Print only machine-readable JSON."),
) -> None:
    """Build one HTML report from saved result JSON files.

    Example:

      causalpatch report out/ioi/*.json out/trace/*.json --out report.html

      causalpatch report out/ioi --out ioi.html --plotly cdn
    """
    with user_errors():
        check_choice(plotly, PLOTLY_MODES, "--plotly")
        files = result_files(results)
        check_out_file(out)
        from ...result import write_report

        out.parent.mkdir(parents=True, exist_ok=True)
        write_report(files, out, title=title, plotly=plotly, shared_scale=shared_scale)
    if as_json or State.json:
        emit_json({"report": str(out), "results": [str(f) for f in files]})
    elif not State.quiet:
        out_console.print(f"[green]wrote[/] report: {escape(str(out))} ({len(files)} results)")

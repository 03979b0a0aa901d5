"""``causalpatch report``: one self-contained HTML file from saved result JSON files (or
folders of them), written by ``patch``/``ioi``/``trace``/``lens``/``dla``/``circuit`` or
``result.save("x.json")``; a report of several opens with a summary, one line per section."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

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


def load_result(path: Path) -> Any:
    """A saved result of any kind: an edge-score, circuit, logit lens or DLA file (by its
    ``format`` field, the first key those files write) as ``EdgeResult``/``Circuit``/
    ``LensResult``/``DLAResult``, anything else as a ``PatchingResult``."""
    head = path.read_bytes()[:200]
    if b'"format"' in head:
        from ...graph import CIRCUIT_FORMAT, EDGES_FORMAT, Circuit, EdgeResult

        if f'"{EDGES_FORMAT}"'.encode() in head:
            return EdgeResult.from_json(path)
        if f'"{CIRCUIT_FORMAT}"'.encode() in head:
            return Circuit.from_json(path)
        from ...methods.circuits import EVALUATION_FORMAT, CircuitEvaluation

        if f'"{EVALUATION_FORMAT}"'.encode() in head:
            return CircuitEvaluation.from_json(path)
        from ...methods.lens import DLA_FORMAT, LENS_FORMAT, DLAResult, LensResult

        if f'"{LENS_FORMAT}"'.encode() in head:
            return LensResult.from_json(path)
        if f'"{DLA_FORMAT}"'.encode() in head:
            return DLAResult.from_json(path)
    from ...result import PatchingResult

    return PatchingResult.from_json(path)


def report_command(
    results: list[Path] = typer.Argument(..., help="Result JSON files (or folders of them), "
                                         "written by patch/ioi/trace/lens/dla/circuit or "
                                         "result.save('x.json')."),
    out: Path = typer.Option(Path("report.html"), "--out", help="The HTML file to write."),
    title: str | None = typer.Option(None, help="Page title."),
    plotly: str = typer.Option("inline", help="inline: plotly.js in the file, opens offline "
                               "(~4.8 MB); cdn: small file, needs network to draw."),
    shared_scale: bool = typer.Option(False, "--shared-scale",
                                      help="Start with one colour scale per kind of result."),
    as_json: bool = typer.Option(False, "--json", help="Print only machine-readable JSON."),
) -> None:
    """Build one HTML report from saved result JSON files (patching, tracing, lens, DLA).

    A report of several results opens with a summary: each section's main finding, one
    line each.

    Example:

      causalpatch report out/ioi/*.json out/trace/*.json --out report.html

      causalpatch report out/ioi --out ioi.html --plotly cdn
    """
    with user_errors():
        check_choice(plotly, PLOTLY_MODES, "--plotly")
        files = result_files(results)
        check_out_file(out)
        from ...render.html import report

        loaded = [load_result(f) for f in files]
        out.parent.mkdir(parents=True, exist_ok=True)
        report(loaded, out, title=title or "causalpatch report", plotly=plotly,
               shared_scale=shared_scale)
    if as_json or State.json:
        emit_json({"report": str(out), "results": [str(f) for f in files]})
    elif not State.quiet:
        out_console.print(f"[green]wrote[/] report: {escape(str(out))} ({len(files)} results)")

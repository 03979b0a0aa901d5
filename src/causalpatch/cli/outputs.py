"""Where results go: output paths probed before the compute, the files written after it (with
a fallback that never loses a computed result), and what the terminal or ``--json`` shows.

* **Before the compute**: :func:`check_out_dir` / :func:`check_out_file` reject a file where a
  folder is expected, a path below a file, or a folder where no file can be created (a probe
  file is created and removed, :func:`probe_dir`).
* **After the compute**: :func:`save_outputs` writes each result's JSON first, then its figure,
  then one HTML report; if anything fails, the JSON goes to a temporary folder and
  :class:`~causalpatch.cli.failures.OutputsSavedElsewhere` names it (exit code 1).
* **Shown**: :func:`finish` prints the top-components tables and the files written, or one
  JSON document (:func:`emit_json`, with the collected warnings).
"""

from __future__ import annotations

import json
import os
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from .failures import OutputsSavedElsewhere, error
from .state import State, console, out_console


# -- before the compute: the output paths ------------------------------------------------------
def probe_dir(folder: Path) -> str | None:
    """Why no file can be created in the existing folder ``folder`` (None: it can)."""
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".causalpatch-probe-")
    except OSError as exc:
        return exc.strerror or str(exc)
    os.close(fd)
    os.unlink(name)
    return None


def check_out_dir(out: Path, what: str = "--out") -> None:
    """Fail before any compute when ``out`` cannot become a folder we can write into."""
    if out.exists() and not out.is_dir():
        raise error(f"{what} {str(out)!r} is a file, but it must be a folder (the command "
                    f"writes several files into it); pass a folder such as "
                    f"{str(out.with_suffix('')) + '_out'!r}")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise error(f"{what} {str(out)!r} cannot be created: {str(existing)!r} is a file")
    why = probe_dir(existing)
    if why is not None:
        raise error(f"{what} {str(out)!r} is not writable: cannot create files in "
                    f"{str(existing)!r} ({why}); pass a folder you can write to")


def check_out_file(out: Path, what: str = "--out") -> None:
    """Fail before any work when the file ``out`` cannot be written."""
    if out.is_dir():
        raise error(f"{what} {str(out)!r} is a folder, but it must be a file name such as "
                    f"{str(out / 'report.html')!r}")
    check_out_dir(out.parent, f"the folder of {what}")
    if out.exists() and not os.access(out, os.W_OK):
        raise error(f"{what} {str(out)!r} exists and is not writable")


# -- after the compute: the files --------------------------------------------------------------
def stem(result: Any) -> str:
    """A result's file name without suffix when a command writes several results."""
    return result.component + ("_by_position" if "position" in result.axes else "")


def write_outputs(results: list[Any], out: Path, title: str,
                  figure: Callable[[Any], Any] | None = None, fmt: str = "png",
                  plotly: str = "inline") -> dict[str, str]:
    """Write each result's JSON first, then its figure (``figure(result)``, default
    ``result.plot()``) as ``fmt``, then one HTML report of all of them, into ``out``."""
    from ..render.figure import save_figure
    from ..render.html import report

    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    single = len(results) == 1
    stems = ["result"] if single else [stem(r) for r in results]
    for r, name in zip(results, stems):
        r.to_json(out / f"{name}.json")
        files[name] = str(out / f"{name}.json")
    for r, name in zip(results, stems):
        path = out / f"{'heatmap' if single else name}.{fmt}"
        if figure is None:
            r.save(path, format=fmt)
        else:
            fig = figure(r)
            if hasattr(fig, "save"):
                fig.save(path, format=fmt)
            else:
                save_figure(fig, path, format=fmt)
        if single:
            files["heatmap"] = str(path)
    report(results, out / "report.html", title=title, plotly=plotly)
    files["report"] = str(out / "report.html")
    return files


def save_outputs(results: list[Any], out: Path, title: str,
                 figure: Callable[[Any], Any] | None = None, fmt: str = "png",
                 plotly: str = "inline") -> dict[str, str]:
    """:func:`write_outputs`; when that fails, save the JSON to a temporary folder and raise
    :class:`OutputsSavedElsewhere` naming it (the computed results are never lost)."""
    try:
        return write_outputs(results, out, title, figure, fmt, plotly)
    except Exception as exc:  # whatever failed, keep the computed results
        if State.debug:
            traceback.print_exception(exc)
        fallback = Path(tempfile.mkdtemp(prefix="causalpatch-results-"))
        single = len(results) == 1
        saved = []
        for r in results:
            path = fallback / f"{'result' if single else stem(r)}.json"
            r.to_json(path)
            saved.append(str(path))
        raise OutputsSavedElsewhere(
            f"could not write the outputs to {str(out)!r} ({type(exc).__name__}: {exc}). The "
            f"computed results were saved to {fallback}: {', '.join(saved)}. Build the report "
            f"with: causalpatch report {fallback}/*.json --out report.html") from exc


# -- shown: terminal or JSON -------------------------------------------------------------------
def emit_json(payload: dict[str, Any]) -> None:
    """Print ``payload`` as the command's one JSON document (with ``warnings`` if any)."""
    if State.warnings:
        payload = {**payload, "warnings": list(State.warnings)}
    typer.echo(json.dumps(payload, indent=2))


def top_table(result: Any, k: int = 10) -> Any:
    """A rich table of the result's ``k`` largest effects, positions shown as token labels."""
    from rich.table import Table

    table = Table(title=f"top {k} components: {result.component} ({result.metric}, "
                        f"{result.direction})")
    axes = list(result.axes)
    for axis in axes:
        table.add_column(axis)
    from ..render.text import value_heading

    table.add_column(value_heading(result), justify="right")  # "indirect effect" for traces
    for index, effect in result.top_components(k):
        idx = index if isinstance(index, tuple) else (index,)
        cells = []
        for axis, value in zip(axes, idx):
            if axis == "position":
                cells.append(str(result.labels["position"][result.extra["positions"].index(value)]
                                 if value in result.extra.get("positions", []) else value))
            else:
                cells.append(str(value))
        table.add_row(*map(escape, cells), f"{effect:+.3f}")
    return table


def baselines(result: Any) -> str:
    """One line: the metric on the runs the effects are measured from, in the method's terms
    (patching: clean and corrupted, the 1 and 0 of normalised effects; causal tracing: the
    answer's probability clean and with the subject noised; ablation: nothing ablated)."""
    from ..render.text import baselines_text

    return baselines_text(result)


def story(result: Any) -> list[str]:
    """What the terminal shows above a result's table: its title (what was patched into what),
    its baselines and its takeaway (the same words as the report)."""
    from ..render.text import takeaway, title_words

    return [title_words(result), baselines(result), takeaway(result)]


def finish(results: list[Any], files: dict[str, str], as_json: bool) -> None:
    """The end of ``patch``/``ioi``/``trace``: JSON, or per result its title, baselines,
    takeaway and top-components table, then the files written."""
    if as_json or State.json:
        from ..render.text import takeaway, title_words

        emit_json({"files": files, "results": [
            {"component": r.component, "metric": r.metric, "direction": r.direction,
             "shape": list(r.effect_matrix.shape), "clean_metric": r.clean_metric,
             "corrupted_metric": r.corrupted_metric, "timings": r.timings,
             "title": title_words(r), "baselines": baselines(r), "takeaway": takeaway(r),
             "top": [[list(i) if isinstance(i, tuple) else i, e] for i, e in r.top_components(10)]}
            for r in results]})
        return
    if not State.quiet:
        for r in results:
            title, base, words = story(r)
            out_console.print(f"[bold]{escape(title)}[/]", highlight=False, soft_wrap=True)
            out_console.print(escape(base), highlight=False, soft_wrap=True)
            out_console.print(escape(words), highlight=False, soft_wrap=True)
            out_console.print(top_table(r))
        for name, path in files.items():
            out_console.print(f"[green]wrote[/] {escape(name)}: {escape(path)}")


def executor_summary(results: list[Any]) -> None:
    """Per-worker throughput of the distributed sweeps (printed after the results)."""
    from ..executors import format_summary

    for r in results:
        summary = r.extra.get("executor") if isinstance(r.extra, dict) else None
        if summary:
            console.print(f"{r.component}: " + format_summary(summary))

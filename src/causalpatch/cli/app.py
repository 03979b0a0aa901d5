"""The ``causalpatch`` typer app: its commands, and the global flags that work anywhere.

* **Global flags** (``--quiet``, ``--json``, ``--verbose``, ``--debug``, ``--no-progress``) are
  options of the top-level callback (:func:`main`, which sets
  :class:`~causalpatch.cli.state.State`); :func:`hoist_global_flags` moves them in front of
  the subcommand when they are given after it.
* **Start-up**: this module imports the command modules, which import only typer and rich at
  module level; every command imports torch and the library inside its body, so
  ``causalpatch --help`` and ``causalpatch models`` never import torch or transformers
  (``tests/cli/test_cli_startup.py``).
"""

from __future__ import annotations

import os
from typing import Any

import typer
from typer.core import TyperGroup

from . import runtime
from .commands import info, ioi, models, patch, report, sae, trace
from .commands import dla, lens
from .commands import circuit
from .options import epilog
from .state import State

#: Flags of the top-level callback that are also accepted after a subcommand.
GLOBAL_FLAGS = ("--quiet", "-q", "--verbose", "-v", "--debug", "--json", "--no-progress")
#: Global options with a value (``--threads 1`` or ``--threads=1``), also accepted after it.
GLOBAL_VALUE_FLAGS = ("--threads",)


def _declares(command: Any, flag: str) -> bool:
    return any(flag in p.opts or flag in p.secondary_opts for p in command.params)


def _takes_value(command: Any, token: str) -> bool:
    for p in command.params:
        if token in (*p.opts, *p.secondary_opts):
            return not getattr(p, "is_flag", False) and not getattr(p, "count", False)
    return False


def hoist_global_flags(group: Any, ctx: Any, args: list[str]) -> list[str]:
    """Move :data:`GLOBAL_FLAGS` that follow a subcommand in front of it (where the callback
    reads them). A flag the subcommand declares itself (``--json``) stays; option values
    (``--clean -q``) and everything after ``--`` are left alone."""
    hoisted: list[str] = []
    kept: list[str] = []
    command = group
    i = 0
    while i < len(args):
        token = args[i]
        if token == "--":
            kept += args[i:]
            break
        if hasattr(command, "get_command") and not token.startswith("-"):  # a group
            sub = command.get_command(ctx, token)
            kept.append(token)
            i += 1
            if sub is None:  # let click report the unknown command
                kept += args[i:]
                break
            command = sub
            continue
        if token in GLOBAL_FLAGS and command is not group and not _declares(command, token):
            hoisted.append(token)
            i += 1
            continue
        name = token.split("=", 1)[0]
        if name in GLOBAL_VALUE_FLAGS and command is not group \
                and not _declares(command, name):
            hoisted += args[i : i + (1 if "=" in token else 2)]
            i += 1 if "=" in token else 2
            continue
        kept.append(token)
        if token.startswith("-") and "=" not in token and _takes_value(command, token) \
                and i + 1 < len(args):
            kept.append(args[i + 1])
            i += 1
        i += 1
    return hoisted + kept


class _Group(TyperGroup):
    """Typer's group, with global flags accepted after the subcommand too."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        State.argv = list(args)  # for the resume line of an interrupted command
        return super().parse_args(ctx, hoist_global_flags(self, ctx, list(args)))


app = typer.Typer(cls=_Group, add_completion=False, no_args_is_help=True,
                  rich_markup_mode="rich", pretty_exceptions_enable=False,
                  help="Fast, exact activation patching for Hugging Face language models.",
                  epilog="Global flags (--quiet, --json, --verbose, --debug, --no-progress, "
                         "--threads N) "
                         "also work after the command: causalpatch models --quiet")


@app.callback()
def main(ctx: typer.Context,
         debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
         quiet: bool = typer.Option(False, "--quiet", "-q",
                                    help="Print nothing on success (errors still print)."),
         verbose: bool = typer.Option(False, "--verbose", "-v",
                                      help="Show transformers' loading logs and bars, timings."),
         as_json: bool = typer.Option(False, "--json", help="Print only JSON on stdout."),
         no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars."),
         threads: int | None = typer.Option(
             None, "--threads", min=1,
             help="torch CPU threads (default: torch's, one per core). 1 is often faster on "
                  "a busy machine or for small models; see docs/cli.md."),
         ) -> None:
    """Fast, exact activation patching for Hugging Face language models."""
    State.reset()
    State.debug, State.quiet, State.verbose = debug, quiet, verbose and not quiet
    State.json, State.progress = as_json, not no_progress
    if threads is not None:
        runtime.use_threads(ctx, threads)
    if quiet:
        _silence(ctx)


def _silence(ctx: Any) -> None:
    """``--quiet``: Python warnings and every logger (transformers' too) off for the command."""
    import logging
    import warnings

    catcher = warnings.catch_warnings()
    ctx.with_resource(catcher)
    warnings.simplefilter("ignore")
    before = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    ctx.call_on_close(lambda: logging.disable(before))
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


# -- the commands, in the order --help lists them ------------------------------------------------
app.command(epilog=epilog("causalpatch patch ... --quiet"))(patch.patch)
app.command(epilog=epilog("causalpatch ioi ... --quiet"))(ioi.ioi)
app.command(epilog=epilog("causalpatch trace ... --quiet"))(trace.trace)
app.command(epilog=epilog("causalpatch lens ... --quiet"))(lens.lens)
app.command(epilog=epilog("causalpatch dla ... --quiet"))(dla.dla)
app.command(epilog=epilog("causalpatch circuit ... --quiet"))(circuit.circuit)
app.command("report", epilog=epilog("causalpatch report ... --quiet"))(report.report_command)
app.command(epilog=epilog("causalpatch models --quiet"))(models.models)
app.command(epilog=epilog("causalpatch info smollm2 --json"))(info.info)
app.add_typer(sae.sae_app, name="sae")


def run() -> None:  # pragma: no cover - console entry point
    app()

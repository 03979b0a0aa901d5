"""What the global flags decided for the running command, and where its messages go.

The top-level callback (:mod:`causalpatch.cli.app`) sets :class:`State` once per command from
``--quiet``, ``--json``, ``--verbose``, ``--debug``, ``--no-progress`` and ``--threads``; every
other module reads it. Two consoles: :data:`console` (stderr: notes, warnings, errors, status
spinners) and :data:`out_console` (stdout: tables and the "wrote ..." lines). :func:`note` and
:func:`warn` print only when the command is chatty (neither quiet nor JSON); warnings are also
collected for the JSON output.

Imports nothing heavy: this module is loaded for ``causalpatch --help``.
"""

from __future__ import annotations

from typing import ClassVar

from rich.console import Console
from rich.markup import escape


class State:
    """The global flags of the running command (class attributes: one command per process)."""

    debug: bool = False
    quiet: bool = False
    verbose: bool = False
    json: bool = False
    progress: bool = True
    threads: int | None = None
    warnings: ClassVar[list[str]] = []
    argv: ClassVar[list[str]] = []
    """The command's arguments (after ``causalpatch``), for the resume line of an interrupt;
    set by the app's parser, not by :meth:`reset`."""

    @classmethod
    def reset(cls) -> None:
        cls.debug = cls.quiet = cls.verbose = cls.json = False
        cls.progress = True
        cls.threads = None
        cls.warnings = []


console = Console(stderr=True, highlight=False)
out_console = Console(highlight=False)


def chatty(as_json: bool = False) -> bool:
    """Whether to print tables, notes and progress (not with --quiet or --json)."""
    return not State.quiet and not (as_json or State.json)


def warn(message: str) -> None:
    """A warning: printed (unless quiet/JSON) and listed in the JSON output."""
    State.warnings.append(message)
    if chatty():
        console.print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True)


def note(message: str) -> None:
    """A note on stderr (unless quiet/JSON); not part of the JSON output."""
    if chatty():
        console.print(f"[cyan]note:[/] {escape(message)}", soft_wrap=True)

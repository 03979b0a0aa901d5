"""How a command fails: one line on stderr and an exit code, never a traceback by default.

User errors (causalpatch's own errors, bad files, bad values) print ``error: ...`` and exit
with code 2; a failed write after the compute (:class:`OutputsSavedElsewhere`, the results
already saved to a temporary folder) exits with code 1. ``--debug`` adds the traceback.
Every command body runs inside :func:`user_errors`.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import typer
from rich.markup import escape

from .state import State, console


class OutputsSavedElsewhere(Exception):
    """Writing to ``--out`` failed after the compute; the results were saved to ``fallback``."""


def error(message: str) -> Exception:
    """The exception a bad argument raises (:class:`causalpatch.errors.InvalidArgumentError`,
    imported on first use so that importing the CLI stays light)."""
    from ..errors import InvalidArgumentError

    return InvalidArgumentError(message)


def fail(exc: BaseException, code: int = 2) -> NoReturn:
    """Print ``exc`` as one line (with its traceback under ``--debug``) and exit with ``code``."""
    if State.debug:
        traceback.print_exception(exc)
    console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
    raise typer.Exit(code=code)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn causalpatch's errors (and bad files) into one line and exit code 2."""
    from ..errors import CausalPatchError

    try:
        yield
    except typer.Exit:
        raise
    except OutputsSavedElsewhere as exc:
        fail(exc, code=1)
    except (CausalPatchError, FileNotFoundError, PermissionError, NotADirectoryError,
            IsADirectoryError, ValueError, ImportError) as exc:
        fail(exc)

"""Progress bars of the long-running commands (``patch``, ``ioi``, ``trace``): the library's own.

causalpatch has one progress display, :func:`causalpatch.assemble.progress_callback`: a tqdm
bar on stderr with counts, rate and ETA, which in auto mode (``progress=None``) appears only in
a terminal or notebook and only once the work has run
:data:`causalpatch.assemble.PROGRESS_DELAY_S` (2) seconds, and is cleared when the work ends.
The commands do not draw bars of their own: they hand :func:`progress_mode` to the library
method as its ``progress=`` argument, so ``causalpatch patch`` shows exactly the bar that
``activation_patching(..., progress=None)`` shows in a terminal.
"""

from __future__ import annotations

from .state import State, chatty


def progress_mode(as_json: bool = False) -> bool | None:
    """The ``progress=`` argument of the command's library calls: ``None`` (the library's auto
    bar), or ``False`` (no bar) with ``--no-progress``, ``--quiet`` or ``--json``."""
    return None if State.progress and chatty(as_json) else False

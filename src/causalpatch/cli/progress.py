"""Progress bars of the long-running commands (``patch``, ``ioi``, ``trace``).

``with progress(as_json) as bars:`` then ``bars.task(label)`` is the ``progress=`` argument of
a library method: a ``(done, total)`` callback, or False when bars are off (``--quiet``,
``--json``, ``--no-progress``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from rich.markup import escape

from .state import State, chatty, console

#: Work shorter than this shows no progress bar (seconds).
PROGRESS_DELAY = 2.0


class ProgressDisplay:
    """Rich progress bars (counts, elapsed, ETA) that appear only when the work takes longer
    than :data:`PROGRESS_DELAY`; ``task(label)`` returns a ``(done, total)`` callback."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._progress: Any = None
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._stopped = False

    def __enter__(self) -> ProgressDisplay:
        if self.enabled:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("elapsed"), TimeElapsedColumn(), TextColumn("eta"),
                TimeRemainingColumn(), console=console, transient=True)
            self._timer = threading.Timer(PROGRESS_DELAY, self._start)
            self._timer.daemon = True
            self._timer.start()
        return self

    def _start(self) -> None:
        with self._lock:
            if not self._stopped:
                self._progress.start()

    def __exit__(self, *exc: Any) -> None:
        if self._timer is not None:
            self._timer.cancel()
        with self._lock:
            self._stopped = True
            if self._progress is not None:
                self._progress.stop()

    def task(self, label: str, total: int | None = None) -> Callable[[int, int], None] | bool:
        if self._progress is None:
            return False
        task = self._progress.add_task(escape(label), total=total)

        def update(done: int, total: int) -> None:
            self._progress.update(task, completed=done, total=total)

        return update

    def done(self, label: str) -> None:
        """Hide a finished task."""
        if self._progress is not None:
            for task in self._progress.tasks:
                if task.description == escape(label):
                    self._progress.update(task.id, visible=False)


def progress(as_json: bool) -> ProgressDisplay:
    """The display for a command: bars unless ``--no-progress``, quiet or JSON."""
    return ProgressDisplay(State.progress and chatty(as_json))

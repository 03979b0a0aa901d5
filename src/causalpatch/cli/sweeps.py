"""Interruptible, resumable sweeps: what ``patch``, ``ioi`` and ``trace`` do on Ctrl-C.

A command runs its sweeps as numbered *steps* (:class:`Steps`); each step hands the library
method a checkpoint file in the output folder (``OUT/.checkpoints/NAME.json``, the library's
``checkpoint=``: finished groups of pairs are saved atomically and never recomputed on rerun).

On Ctrl-C (SIGINT) or SIGTERM (turned into the same ``KeyboardInterrupt`` by a handler in the
main thread, :meth:`Steps.interruptible`), the command writes the JSON of every finished step
into ``--out``, leaves the running step's checkpoint in place, prints what it wrote and the
command that resumes (the same command with ``--resume``), and exits with 128 + the signal
number (130 for SIGINT, 143 for SIGTERM). Rerunning the same command (with or without
``--resume``) restores the finished steps and groups from their checkpoints and computes only
the rest: the numbers are identical to an uninterrupted run's. ``--no-resume`` discards the
checkpoints; ``--resume`` insists on them (a checkpoint of another run is an error). The
checkpoints are removed once every output is written.

:data:`HOLD_ENV` is a test hook (``tests/cli/test_cli_signals.py``): ``STEP:MARKER`` makes
the command stop, once step ``STEP`` (or a later one) has checkpointed part of its work, write
the file ``MARKER`` and wait for a signal, so that a test can interrupt it at a known point
without racing against the clock.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from .failures import error
from .progress import progress_mode
from .state import State, console, note, warn

#: The checkpoints' folder inside ``--out``.
CHECKPOINT_DIR = ".checkpoints"
#: Test hook: ``STEP:MARKER`` (module docstring).
HOLD_ENV = "CAUSALPATCH_CLI_HOLD"
#: Help of ``--resume/--no-resume``.
RESUME_HELP = ("Continue an interrupted run from OUT/.checkpoints (the default when they "
               "match this command); --no-resume discards them.")


def resume_option() -> Any:
    """``--resume/--no-resume`` (default: resume when the checkpoints match)."""
    return typer.Option(None, "--resume/--no-resume", help=RESUME_HELP)


def checkpoint_progress(path: Path) -> tuple[int, int]:
    """``(finished cells, all cells)`` over every pair of the checkpoint at ``path``."""
    try:
        data = json.loads(path.read_text("utf-8"))
        done = sum(len(c) for c in data.get("cells", {}).values())
        return done, int(data["n_pairs"]) * int(data["n_cells"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0, 0


class Steps:
    """The numbered sweeps of one command, their checkpoints, and what an interrupt writes.

    ``single``: the command writes one result (named ``result.json``), as
    :func:`~causalpatch.cli.outputs.save_outputs` names it. ``resumable=False``: the command
    has no ``--resume``; an interrupt says how to start it over instead. A checkpoint that is
    not a sweep's (``sae train``'s) comes with ``progress_of(path)`` (``(done, total)`` units
    of work, in place of :func:`checkpoint_progress`) and ``describe(path)`` (what it holds,
    for the message; None: nothing yet).
    """

    def __init__(self, out: Path, resume: bool | None, as_json: bool, total: int,
                 single: bool = False, resumable: bool = True,
                 progress_of: Callable[[Path], tuple[int, int]] = checkpoint_progress,
                 describe: Callable[[Path], str | None] | None = None) -> None:
        self.out, self.resume, self.as_json = out, resume, as_json
        self.total, self.single, self.resumable = total, single, resumable
        self.progress_of, self.describe = progress_of, describe
        self.folder = out / CHECKPOINT_DIR
        self.finished: list[tuple[str, list[Any]]] = []
        self.running: tuple[int, str, Path | None] | None = None
        self.signum: int | None = None

    # -- before the compute -----------------------------------------------------------------
    def prepare(self) -> None:
        """Create (or, with ``--no-resume``, empty) the checkpoint folder."""
        if self.resume is False and self.folder.exists():
            shutil.rmtree(self.folder)
        existing = sorted(self.folder.glob("*.json")) if self.folder.is_dir() else []
        if self.resume and not existing:
            warn(f"--resume: no checkpoints in {self.folder}; computing everything")
        elif existing and self.resume is None:
            note(f"resuming from the checkpoints in {self.folder} (--no-resume starts over)")
        self.folder.mkdir(parents=True, exist_ok=True)

    # -- the steps --------------------------------------------------------------------------
    def run(self, index: int, name: str, label: str,
            compute: Callable[[str | None, Any], list[Any]], checkpointed: bool = True
            ) -> list[Any]:
        """Run step ``index`` (``compute(checkpoint_path, progress)``, the library call) with
        its checkpoint ``OUT/.checkpoints/NAME.json`` (``None`` when not ``checkpointed``);
        its results count as finished."""
        from ..errors import CheckpointMismatchError

        path = self.folder / f"{name}.json"
        self.running = (index, label, path if checkpointed else None)
        if not checkpointed:
            results = compute(None, progress_mode(self.as_json))
            self.running = None
            self.finished.append((label, list(results)))
            return results
        try:
            results = compute(str(path), self._progress(index, path))
        except CheckpointMismatchError as exc:
            if self.resume:
                why = str(exc) if self.describe is not None else (
                    f"the checkpoint {str(path)!r} was written by a different run (other model, "
                    "prompts or arguments)")
                raise error(f"--resume: {why}; rerun that command, or drop --resume to start "
                            "over") from None
            note(f"discarding {path}: it was written by a different run")
            path.unlink()
            results = compute(str(path), self._progress(index, path))
        self.running = None
        self.finished.append((label, list(results)))
        return results

    def _progress(self, index: int, path: Path) -> Any:
        """The library's ``progress=``; with :data:`HOLD_ENV` from step ``STEP`` on, a
        callback that waits for a signal once the step's checkpoint holds some cells."""
        hold = os.environ.get(HOLD_ENV)
        mode = progress_mode(self.as_json)
        if not hold or threading.current_thread() is not threading.main_thread():
            return mode
        step, marker = hold.split(":", 1)
        if index < int(step):
            return mode

        def tick(done: int, total: int) -> None:
            if self.progress_of(path)[0] > 0:
                Path(marker).write_text(f"held in step {index}\n", "utf-8")
                while True:  # until a signal handler raises KeyboardInterrupt
                    signal.pause()

        return tick

    def done(self) -> None:
        """Every output is written: the checkpoints are no longer needed."""
        shutil.rmtree(self.folder, ignore_errors=True)

    # -- interrupts -------------------------------------------------------------------------
    @contextmanager
    def interruptible(self) -> Iterator[None]:
        """SIGINT and SIGTERM raise ``KeyboardInterrupt``; on it, write the finished steps,
        report, and exit with 128 + the signal number."""
        main = threading.current_thread() is threading.main_thread()
        old: dict[int, Any] = {}

        def handler(signum: int, frame: Any) -> None:
            self.signum = signum
            raise KeyboardInterrupt

        if main:
            for sig in (signal.SIGINT, signal.SIGTERM):
                old[sig] = signal.signal(sig, handler)
        try:
            yield
        except KeyboardInterrupt:
            if main:  # a second signal while the finished steps are written is only noted
                for number in old:
                    signal.signal(number, lambda signum, frame: None)
            code = 128 + (self.signum or signal.SIGINT)
            self._report(self._write_finished())
            raise typer.Exit(code=code) from None
        finally:
            for number, previous in old.items():
                signal.signal(number, previous)

    def _write_finished(self) -> dict[str, str]:
        """Each finished step's result JSON, into ``--out`` (else a temporary folder)."""
        from .outputs import stem

        results = [r for _, rs in self.finished for r in rs]
        if not results:
            return {}
        names = ["result"] if self.single else [stem(r) for r in results]
        files: dict[str, str] = {}
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            for r, name in zip(results, names):
                r.to_json(self.out / f"{name}.json")
                files[name] = str(self.out / f"{name}.json")
        except Exception:  # keep them anyway
            fallback = Path(tempfile.mkdtemp(prefix="causalpatch-results-"))
            for r, name in zip(results, names):
                r.to_json(fallback / f"{name}.json")
                files[name] = str(fallback / f"{name}.json")
        return files

    def resume_command(self) -> str:
        """The command line that continues this run (starts it over if not resumable)."""
        argv = [a for a in State.argv if a not in ("--resume", "--no-resume")]
        return "causalpatch " + shlex.join([*argv, "--resume"] if self.resumable else argv)

    def _report(self, files: dict[str, str]) -> None:
        name = signal.Signals(self.signum or signal.SIGINT).name
        checkpoint: dict[str, Any] | None = None
        if self.running is not None:
            index, label, path = self.running
            done, cells = self.progress_of(path) if path is not None else (0, 0)
            checkpoint = {"step": index, "label": label, "path": str(path),
                          "cells_done": done, "cells": cells}
            if path is None:
                checkpoint["path"] = None
            elif self.describe is not None:
                checkpoint["checkpointed"] = self.describe(path)
        if self.as_json or State.json:
            from .outputs import emit_json

            emit_json({"interrupted": name, "files": files,
                       "steps_finished": len(self.finished), "steps": self.total,
                       "checkpoint": checkpoint, "resume": self.resume_command()})
            return
        lines = [f"interrupted ({name}) after {len(self.finished)} of {self.total} "
                 f"finished step{'s' if self.total != 1 else ''}."]
        if files:
            lines.append("wrote the finished steps' results: " + ", ".join(files.values()))
        else:
            lines.append("no step had finished: no result written.")
        if checkpoint is not None and checkpoint["path"] is None:
            lines.append(f"step {checkpoint['step']}/{self.total} ({checkpoint['label']}) "
                         "keeps no checkpoint: it starts over.")
        elif checkpoint is not None and "checkpointed" in checkpoint:
            what = checkpoint["checkpointed"]
            lines.append(f"step {checkpoint['step']}/{self.total} ({checkpoint['label']}): "
                         f"{what} checkpointed in {checkpoint['path']}." if what else
                         f"step {checkpoint['step']}/{self.total} ({checkpoint['label']}) had "
                         "not checkpointed anything yet: it starts over.")
        elif checkpoint is not None and checkpoint["cells_done"] == 0:
            lines.append(f"step {checkpoint['step']}/{self.total} ({checkpoint['label']}) "
                         "had not finished a group of cells yet: it starts over.")
        elif checkpoint is not None:
            lines.append(f"step {checkpoint['step']}/{self.total} ({checkpoint['label']}): "
                         f"{checkpoint['cells_done']} of {checkpoint['cells']} cells "
                         f"checkpointed in {checkpoint['path']}.")
        lines.append(f"{'resume' if self.resumable else 'start over'} with: "
                     f"{self.resume_command()}")
        for line in lines:
            console.print(escape(line), soft_wrap=True, highlight=False)

"""Provenance for the figures and numbers in ``docs/``: one JSON beside every image.

Every script that writes a figure under ``docs/img/`` calls :func:`write_figure_json` with the
image's path; it writes ``docs/img/NAME.json`` beside ``docs/img/NAME.png`` holding the command
that made it, the commit it ran on (``+dirty`` when the work tree had changes), the seed, the
settings, the host, the wall time and the numbers the figure draws. ``make figures`` reruns every
such script; ``tests/package/test_figures.py`` checks that every image has its JSON.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]


def commit() -> str | None:
    """The commit the repository is at, ``+dirty`` appended when tracked files other than the
    outputs in ``docs/img/`` and ``docs/data/`` have changed."""
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                             check=False)
        return out.stdout.strip()

    head = git("rev-parse", "HEAD")
    if not head:
        return None
    # the figures and data the scripts write are outputs, not inputs: rewriting one does not
    # make the code that ran differ from the commit
    changed = git("status", "--porcelain", "--untracked-files=no", "--", ".",
                  ":(exclude)docs/img", ":(exclude)docs/data")
    return head + ("+dirty" if changed else "")


def command() -> str:
    """The command line that is running, relative to the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script_name = str(script.relative_to(REPO_ROOT))
    except ValueError:
        script_name = sys.argv[0]
    return " ".join(["python", script_name, *sys.argv[1:]])


def write_figure_json(image: str | os.PathLike[str], *, seed: int | None,
                      settings: dict[str, Any], data: Any, started: float | None = None,
                      extra: dict[str, Any] | None = None) -> Path:
    """Write ``<image stem>.json`` beside ``image`` and return its path.

    Args:
        image: the figure's path (``.png``/``.svg``); the JSON gets the same stem.
        seed: the seed the data was drawn with (``None`` when nothing is random).
        settings: everything else that chose the run (pairs, samples, window, threads, ...).
        data: the numbers the figure draws (lists, dicts; tensors converted with ``.tolist()``).
        started: ``time.time()`` at the start of the run, to record the wall time.
        extra: further keys (e.g. summary numbers the docs quote).
    """
    path = Path(image).with_suffix(".json")
    payload: dict[str, Any] = {
        "figure": Path(image).name,
        "command": command(),
        "commit": commit(),
        "seed": seed,
        "settings": settings,
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(),
                 "python": platform.python_version()},
        "wall_seconds": None if started is None else round(time.time() - started, 1),
        "data": data,
    }
    if extra:
        payload.update(extra)
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path

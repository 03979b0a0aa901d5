"""Atomic file writes: a reader sees the old file or the new one, never a torn one.

The data goes to a temporary file in the destination's own folder (same file system, so the
rename is atomic), is ``fsync``-ed, then ``os.replace``-d over the destination, and the folder
is ``fsync``-ed so the rename survives a crash. On any failure the temporary file is removed and
an existing destination is left untouched. The new file gets the mode an ordinary ``open()``
would give it (``0o666`` less the umask), or keeps the mode of the file it replaces.
"""

from __future__ import annotations

import os
import stat
import tempfile
import threading
from pathlib import Path

_UMASK: int | None = None
_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process umask (read once; ``os.umask`` can only be read by setting it)."""
    global _UMASK
    if _UMASK is None:
        with _UMASK_LOCK:
            if _UMASK is None:
                mask = os.umask(0o022)
                os.umask(mask)
                _UMASK = mask
    return _UMASK


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temp file in the same folder, ``fsync`` and rename.

    Raises:
        FileNotFoundError: the destination folder does not exist.
        IsADirectoryError: ``path`` is an existing folder.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder {str(path.parent)!r} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"cannot write to {str(path)!r}: it is a folder")
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)  # mkstemp creates 0o600
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # e.g. platforms that cannot open folders
        return path
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))

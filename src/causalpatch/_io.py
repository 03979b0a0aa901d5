"""Atomic file writes: a reader sees the old file or the new one, never a torn one.

The data goes to a temporary file in the destination's own folder (same file system, so the
rename is atomic), is ``fsync``-ed, then ``os.replace``-d over the destination, and the folder
is ``fsync``-ed so the rename survives a crash. On any failure the temporary file is removed and
an existing destination is left untouched. The new file gets the mode an ordinary ``open()``
would give it (``0o666`` less the umask), or keeps the mode of the file it replaces.

Folders are published the same way: fill a temporary folder made by :func:`temp_dir_beside`
(same parent, so the rename is atomic), then :func:`publish_dir` renames it into place. A
rename never replaces a non-empty folder, so when two processes publish the same folder the
first one wins and the other is told so (and uses the winner's folder).
"""

from __future__ import annotations

import errno
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
    fsync_dir(path.parent)
    return path


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """``fsync`` a folder so renames inside it survive a crash (a no-op where unsupported)."""
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. platforms that cannot open folders
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def fsync_file(path: str | os.PathLike[str]) -> None:
    """``fsync`` an existing file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_dir_beside(final: str | os.PathLike[str]) -> Path:
    """A new empty folder next to ``final`` (``.{name}.XXXX.tmp``), for :func:`publish_dir`.

    The parent folder is created when missing.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))


def publish_dir(tmp: str | os.PathLike[str], final: str | os.PathLike[str]) -> bool:
    """Atomically rename the filled folder ``tmp`` to ``final``; ``False`` if ``final`` exists.

    ``tmp`` must be in the same parent folder as ``final`` (see :func:`temp_dir_beside`). Every
    file inside ``tmp`` is ``fsync``-ed first. When ``final`` already exists (another process
    published first) nothing is renamed, ``tmp`` is left for the caller to remove, and the
    result is ``False``.
    """
    tmp, final = Path(tmp), Path(final)
    for file in tmp.rglob("*"):
        if file.is_file():
            fsync_file(file)
    fsync_dir(tmp)
    if final.exists():
        return False
    try:
        os.rename(tmp, final)  # POSIX: fails on a non-empty destination folder, never merges
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY) or final.exists():
            return False
        raise
    fsync_dir(final.parent)
    return True


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


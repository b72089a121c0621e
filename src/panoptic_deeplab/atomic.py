"""Atomic file writes: a reader (or a crash) sees the old file or the complete new one, never a part.

Every file the toolkit writes (checkpoints, configs, reports, annotations, pictures of predictions) goes
through :func:`write_atomic`.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def _process_umask() -> int:
    # Read by setting it: done once, at import, before any thread of ours could create files in between.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _process_umask()


def _mode_for(path: Path) -> int:
    """The permissions ``open(path, "wb")`` would leave: the existing file's, else 0o666 less the umask.
    (mkstemp creates 0o600 files: outputs on a shared machine would be unreadable to the group.)"""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return 0o666 & ~_UMASK


def move_into_place(tmp: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """``os.replace(tmp, path)`` for a temporary file made by ``tempfile.mkstemp`` beside ``path``, with the
    permissions ``open(path, "wb")`` would have left rather than mkstemp's 0o600."""
    os.chmod(tmp, _mode_for(Path(path)))
    os.replace(tmp, path)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; some platforms (Windows) cannot open a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class WriteError(OSError):
    """A file that could not be written completely (full disk, quota, permissions): the file at ``path``, if there
    was one, is unchanged and no partial file is left."""

    def __init__(self, path: Path, cause: OSError) -> None:
        super().__init__(cause.errno, cause.strerror or str(cause))
        self.path = path

    def __str__(self) -> str:
        return f"cannot write {self.path} ({self.strerror}); the file there before, if any, is unchanged"


def write_atomic(path: str | os.PathLike[str], write: Callable[[BinaryIO], object]) -> Path:
    """Write ``path`` through ``write(fileobj)``: temporary sibling, flush + fsync, ``os.replace``, fsync
    of the folder. Returns the path. A write that fails midway (e.g. no space left) removes the temporary file
    and raises :class:`WriteError` naming ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise WriteError(path, exc) from exc
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        move_into_place(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, WriteError):
            raise WriteError(path, exc) from exc
        raise
    _fsync_dir(path.parent)
    return path


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """:func:`write_atomic` for UTF-8 text."""
    data = text.encode("utf-8")
    return write_atomic(path, lambda f: f.write(data))

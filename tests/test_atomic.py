"""Atomic writes that fail midway (full disk): the previous file stays, nothing partial is left, the error names
the file. Checkpoints under a real file size limit: tests/engine/test_trainer.py (test_full_disk_...)."""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path

import pytest
import torch

from panoptic_deeplab.atomic import WriteError, move_into_place, write_atomic, write_text_atomic
from panoptic_deeplab.data.coco_panoptic import write_panoptic_png


class _DiskFull:
    """A writer that fills ``limit`` bytes, then fails as a full disk does."""

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def __call__(self, file) -> None:
        file.write(b"x" * self.limit)
        raise OSError(errno.ENOSPC, "No space left on device")


def test_failed_write_keeps_the_previous_file_and_names_it(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    write_text_atomic(path, '{"pq": 1}')
    with pytest.raises(WriteError) as info:
        write_atomic(path, _DiskFull(4096))
    assert str(info.value) == (f"cannot write {path} (No space left on device); the file there before, if any, "
                               "is unchanged")
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC and info.value.path == path
    assert path.read_text() == '{"pq": 1}' and list(tmp_path.iterdir()) == [path]
    with pytest.raises(ZeroDivisionError):  # not a write failure: passed on as it is, nothing left behind
        write_atomic(path, lambda f: 1 / 0)
    assert list(tmp_path.iterdir()) == [path]
    with pytest.raises(WriteError, match=f"cannot write {tmp_path / 'report.json' / 'x.png'} "):
        write_panoptic_png(path / "x.png", torch.zeros(2, 2, dtype=torch.int32).numpy())  # a file as folder


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_written_files_get_the_permissions_open_would_give(tmp_path: Path) -> None:
    """A temporary file is created 0o600; the written file has what ``open`` would leave: 0o666 less the umask
    for a new file (readable by the group on a shared machine), the old file's mode when it replaces one."""
    umask = os.umask(0o022)
    os.umask(umask)
    fresh = write_text_atomic(tmp_path / "predictions.json", "{}")
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o666 & ~umask != 0o600
    fresh.chmod(0o640)
    write_text_atomic(fresh, "[]")
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o640
    video = tmp_path / "frames_overlay.mp4"  # videos and downloads are written by their libraries, then moved
    handle, tmp = tempfile.mkstemp(dir=tmp_path)
    os.close(handle)
    move_into_place(tmp, video)
    assert stat.S_IMODE(video.stat().st_mode) == 0o666 & ~umask

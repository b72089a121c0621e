"""Atomic writes that fail midway (full disk): the previous file stays, nothing partial is left, the error names
the file. Checkpoints under a real file size limit: tests/engine/test_trainer.py (test_full_disk_...)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch

from panoptic_deeplab.atomic import WriteError, write_atomic, write_text_atomic
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

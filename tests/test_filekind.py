"""Files that are not what a verb wants: what they are, and output folders that cannot be folders."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from panoptic_deeplab.filekind import check_output_dir, describe_file


def test_describe_file_kinds(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text('{"images": []}')
    (tmp_path / "b.txt").write_text("caf\u00e9 " * 200)  # multi-byte characters across the 512-byte window
    (tmp_path / "c.tar.gz").write_bytes(b"\x1f\x8b\x08\x00rest")
    assert describe_file(tmp_path / "a.json") == ("a JSON or text file", "")
    assert describe_file(tmp_path / "b.txt") == ("a text file", "")
    assert describe_file(tmp_path / "c.tar.gz") == ("a gzip file (a deeplab2 .tar.gz?)",
                                                    "deeplab2 checkpoints go through convert --from dl2")
    assert describe_file(tmp_path) == ("a directory", "")


def test_output_folders_that_are_files(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("notes\n")
    assert check_output_dir(tmp_path / "new" / "deeper", "--output") == tmp_path / "new" / "deeper"
    with pytest.raises(NotADirectoryError, match=r"--output .*notes.txt/run cannot be a folder \(its parent "
                                                  r".*notes.txt is a text file\)"):
        check_output_dir(notes / "run", "--output")
    commands = [
        (["demo", "--output-dir", str(notes)], "--output-dir"),
        (["train", "--config", "synthetic_mnv3", f"train.output_dir={notes}"], "train.output_dir"),
        (["train", "--config", "synthetic_mnv3", "--output-dir", str(notes)], "--output-dir"),
        (["predict", "--checkpoint", str(notes), "--input", str(notes), "--output", str(notes)], "--output"),
        (["make-synthetic", "--out", str(notes), "--split", "val", "--num", "1"], "--out"),
    ]
    for command, option in commands:
        result = subprocess.run([sys.executable, "-m", "panoptic_deeplab.cli", *command], capture_output=True,
                                text=True)
        assert result.returncode == 2, (command, result.stderr[-1500:])
        assert f"error: {option} {notes} cannot be a folder: it is a text file" in result.stderr, command
    assert notes.read_text() == "notes\n"

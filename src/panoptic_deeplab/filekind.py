"""What a file is, told by its first bytes, for errors that say "X is a text file, not a checkpoint".

Only the signatures of formats a user may plausibly hand to a verb by mistake are known; anything else is
"a binary file of an unknown format".
"""

from __future__ import annotations

import os
from pathlib import Path

# (leading bytes, description, hint): the hint says what to do with such a file, where there is something.
_SIGNATURES: tuple[tuple[bytes, str, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image", ""),
    (b"\xff\xd8\xff", "a JPEG image", ""),
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file (a Keras model?)", ""),
    (b"\x1f\x8b", "a gzip file (a deeplab2 .tar.gz?)", "deeplab2 checkpoints go through convert --from dl2"),
    (b"PK\x03\x04", "a zip archive", ""),
    (b"\x80", "a Python pickle", "a detectron2 .pkl goes through convert --from d2"),
)


def describe_file(path: str | os.PathLike[str]) -> tuple[str, str]:
    """``(what the file is, a hint or "")``, e.g. ``("a text file", "")``, for a path that is not what a verb wants."""
    path = Path(path)
    if path.is_dir():
        return "a directory", ""
    if not path.exists():
        return "missing", ""
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return "an empty file", ""
    if path.suffix == ".onnx" or (path.suffix != ".pt" and head[:1] == b"\x08" and b"pytorch" in head):
        return "an ONNX model", "predict --onnx runs it"
    if path.name.endswith(".index") or ".data-" in path.name:
        return "part of a TensorFlow checkpoint", "deeplab2 checkpoints go through convert --from dl2"
    for signature, what, hint in _SIGNATURES:
        if head.startswith(signature):
            return what, hint
    text = ""
    for cut in (0, 1, 2, 3):  # the 512 bytes may end inside a multi-byte character
        try:
            text = head[: len(head) - cut].decode("utf-8")
            break
        except UnicodeDecodeError:
            continue
    if text and all(c.isprintable() or c in "\t\n\r\x0c" for c in text):
        if text.lstrip().startswith(("{", "[")):
            return "a JSON or text file", ""
        return ("a YAML or text file", "") if ":" in text else ("a text file", "")
    return "a binary file of an unknown format", ""


def check_output_dir(path: str | os.PathLike[str], option: str) -> Path:
    """``path`` as a folder to write into: it, or the first of its parents that exists, must be a folder.

    Checked before any work, so that ``--output notes.txt`` fails at once and names the option."""
    path = Path(path)
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                what = describe_file(folder)[0]
                where = "" if folder == path else f" (its parent {folder} is {what})"
                raise NotADirectoryError(f"{option} {path} cannot be a folder{where or f': it is {what}'}")
            return path
    return path

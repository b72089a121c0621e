"""Training checkpoints: atomic writes, rotation, safe loading and RNG state capture.

A checkpoint is a plain ``dict`` holding only tensors and plain Python types (``dict``, ``list``,
``tuple``, ``str``, ``int``, ``float``, ``bool``, ``None``) so that it loads with
``torch.load(weights_only=True)``: a file from a stranger cannot run code when it is opened.

Keys written by the trainer:

* ``model``: the state dict of the (unwrapped) model;
* ``optimizer``, ``scheduler``, ``scaler``: their state dicts (``scaler`` may be ``None``);
* ``iteration``: the number of completed optimisation steps;
* ``config``: the resolved configuration as a plain dict;
* ``rng``: one entry per rank, each ``{"python", "numpy", "torch", "cuda"}`` (see ``capture_rng_state``);
* ``best_metric``, ``best_iteration``: the best validation PQ so far (``None`` before any evaluation).

Files in the output directory: ``model_0001000.pt`` (the last ``keep_last`` are kept) and ``best.pt``.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import warnings
from pathlib import Path
from typing import Any, BinaryIO, Mapping

import numpy as np
import torch

from panoptic_deeplab.atomic import write_atomic
from panoptic_deeplab.filekind import describe_file

CHECKPOINT_PATTERN = re.compile(r"^model_(\d+)\.pt$")
BEST_NAME = "best.pt"


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable or not a checkpoint this project can load safely."""


def checkpoint_name(iteration: int) -> str:
    """File name of the periodic checkpoint after ``iteration`` completed steps."""
    return f"model_{iteration:07d}.pt"


class _WriteErrors:
    """A binary file that keeps the OSError one of its writes raised: torch.save's C++ writer turns it into a
    RuntimeError ("enforce fail ... unexpected pos") that no longer says the disk was full."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self._file.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self._file.flush()


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path`` so that a crash leaves either the old file or the complete new one.

    Writes a temporary file in the same directory (same file system, so the rename is atomic),
    flushes and fsyncs it, ``os.replace``s it over ``path`` and fsyncs the directory. A write that fails
    (full disk) raises :class:`~panoptic_deeplab.atomic.WriteError` naming ``path``.
    """

    def save(file: BinaryIO) -> None:
        recorder = _WriteErrors(file)
        try:
            torch.save(obj, recorder)
        except RuntimeError:
            if recorder.error is not None:
                raise recorder.error from None
            raise

    return write_atomic(path, save)


def load_tensors_only(path: str | os.PathLike, map_location: str | torch.device | None = "cpu") -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never code.

    torch warns about the pickle protocol of legacy (non-zip) files before it fails on a truncated one; the
    callers turn the failure into one clear error, so that warning is only noise before it (issue 23).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        return torch.load(path, map_location=map_location, weights_only=True)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device | None = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by this project, refusing anything that could run code.

    ``torch.load(weights_only=True)`` only rebuilds tensors and plain Python containers; a pickle
    that references any other callable (e.g. a malicious ``__reduce__``) raises ``CheckpointError``.
    """
    path = Path(path)
    if path.is_dir():
        held = " (it holds checkpoints: give one of them)" if list_checkpoints(path) else ""
        raise CheckpointError(f"checkpoint {path} is a directory, not a checkpoint file{held}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    kind, hint = describe_file(path)
    if kind not in ("a zip archive", "a Python pickle"):  # torch files are one or the other
        raise CheckpointError(f"{path} is {kind}, not a panoptic-deeplab checkpoint" + (f": {hint}" if hint else ""))
    try:
        ckpt = load_tensors_only(path, map_location)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refusing to load {path}: it contains objects other than tensors and plain Python types, "
            f"so it may run code when unpickled (torch.load weights_only=True said: {str(exc).splitlines()[0]}; "
            "a detectron2 .pkl goes through convert --from d2)"
        ) from exc
    except Exception as exc:  # a damaged zip or pickle makes torch raise many kinds (KeyError, ValueError, ...)
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: {kind} that torch.load cannot read ({detail}); "
                              "truncated or damaged?") from exc
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(
            f"{path} is a torch file but not a panoptic-deeplab checkpoint (expected a dict with a 'model' entry; "
            "a reference implementation's checkpoint goes through panoptic-deeplab convert)"
        )
    return ckpt


class NonFiniteWeightsError(ValueError):
    """A state dict holds NaN or Inf: a corrupted file or a run that diverged; its predictions are garbage."""


def check_finite(state: Mapping[str, Any], what: str) -> None:
    """Raise :class:`NonFiniteWeightsError` naming the tensors of ``state`` that hold NaN or Inf (first few
    and a count); ``what`` names the file in the message."""
    bad = [
        name for name, value in state.items()
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all())
    ]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise NonFiniteWeightsError(
            f"{what} holds NaN or Inf in {len(bad)} tensor(s): {shown}; the file is corrupted or comes from a "
            "run that diverged, and a model with these weights predicts garbage"
        )


def initialize_from(model: torch.nn.Module, path: str | os.PathLike) -> list[str]:
    """Copy a checkpoint's weights into ``model`` for fine-tuning; returns the names left as initialised.

    Names must match (the checkpoint's architecture options are the model's); a tensor whose shape differs,
    such as the semantic predictor of a model with other classes, is left as it is and named in the result.
    """
    checkpoint = load_checkpoint(path)
    source = checkpoint["model"]
    check_finite(source, f"model.init_checkpoint {path}")
    target = model.state_dict()
    missing = sorted(set(target) - set(source))
    unexpected = sorted(set(source) - set(target))
    if missing or unexpected:
        raise CheckpointError(
            f"model.init_checkpoint {path}: its weights belong to another architecture (missing: "
            f"{', '.join(missing[:8]) or 'none'}; unexpected: {', '.join(unexpected[:8]) or 'none'}); start from "
            "the config saved in that checkpoint"
        )
    kept = sorted(k for k in target if source[k].shape != target[k].shape)
    model.load_state_dict({k: v for k, v in source.items() if k not in kept}, strict=False)
    return kept


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """Periodic checkpoints in ``directory`` as ``(iteration, path)``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = CHECKPOINT_PATTERN.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The periodic checkpoint with the highest iteration in ``directory``, or ``None``."""
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def resolve_resume(resume: str | None, output_dir: str | os.PathLike) -> Path | None:
    """``None`` -> no resume; ``"auto"`` -> latest checkpoint in ``output_dir`` (``None`` if there is
    none: a fresh run); anything else is a path that must exist."""
    if resume is None or resume == "":
        return None
    if resume == "auto":
        return latest_checkpoint(output_dir)
    path = Path(resume)
    if not path.is_file():
        raise CheckpointError(f"--resume {resume}: no such checkpoint file")
    return path


def prune_checkpoints(directory: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete periodic checkpoints except the newest ``keep_last`` (``best.pt`` is never touched)."""
    if keep_last <= 0:
        return []
    removed = []
    for _, p in list_checkpoints(directory)[:-keep_last]:
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def capture_rng_state() -> dict[str, Any]:
    """RNG states of python, numpy, torch CPU and (when present) CUDA, as tensors and plain types."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),  # (int, tuple of ints, float | None): plain types
        "numpy": {
            "name": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of ``capture_rng_state``."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["name"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") is not None and torch.cuda.is_available():
        cuda_states = [s.cpu() for s in state["cuda"]]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)

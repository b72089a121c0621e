"""What every reference converter shares: safe reading, key maps, strict loading, downloads, the output file.

A converter (one module per reference) reads the reference's file into ``{name: tensor}``, chooses the
:class:`~panoptic_deeplab.config.ModelConfig` that reproduces the reference architecture, and builds a
:class:`KeyMap` from our parameter names to the reference's. :func:`load_strict` then fills a model built from
that config: every tensor of the file's model state is used (readers keep only that state: no optimizer), every
parameter and buffer of ours is filled, every shape agrees; anything else raises :class:`ConversionError` listing the names.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import tempfile
import urllib.request
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from panoptic_deeplab.atomic import move_into_place
from panoptic_deeplab.checkpoint import load_tensors_only
from panoptic_deeplab.modeling.backbone import summarize_names

from .tf_checkpoint import names_tf_checkpoint

# BN buffers that carry no information for inference and that some writers drop (D2 model-zoo .pkl files).
OPTIONAL_SUFFIXES = (".num_batches_tracked",)


class ConversionError(ValueError):
    """The input is not a checkpoint of the announced reference, or it does not fit the architecture."""


Transform = Callable[[Tensor], Tensor]


@dataclass
class KeyMap:
    """Our state-dict names -> (reference name, optional tensor transform), built module by module."""

    entries: dict[str, tuple[str, Transform | None]] = field(default_factory=dict)
    # Ours that no reference tensor holds, set from the reference's config (e.g. its input normalisation).
    constants: dict[str, Tensor] = field(default_factory=dict)

    def add(self, ours: str, theirs: str, transform: Transform | None = None) -> None:
        if ours in self.entries:
            raise KeyError(f"{ours} mapped twice")  # a bug in a converter's key map
        self.entries[ours] = (theirs, transform)

    def conv(self, ours: str, theirs: str, *, bias: bool = False) -> None:
        """A bare conv: ``ours.weight`` (and ``.bias``) <- ``theirs.weight`` (and ``.bias``)."""
        self.add(f"{ours}.weight", f"{theirs}.weight")
        if bias:
            self.add(f"{ours}.bias", f"{theirs}.bias")

    def bn(self, ours: str, theirs: str) -> None:
        """A batch norm with PyTorch's tensor names on both sides."""
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            self.add(f"{ours}.{name}", f"{theirs}.{name}")

    def conv_bn(self, ours: str, conv: str, bn: str) -> None:
        """One of our ``ConvBNReLU`` (``ours.conv`` + ``ours.bn``) from a reference conv and its norm."""
        self.conv(f"{ours}.conv", conv)
        self.bn(f"{ours}.bn", bn)


def load_strict(
    model: nn.Module,
    source: Mapping[str, Tensor],
    key_map: KeyMap,
    *,
    what: str,
) -> None:
    """Fill every parameter and buffer of ``model`` from ``source`` through ``key_map``, or raise.

    Every tensor of ``source`` must be used; ``num_batches_tracked`` may be absent on either side.
    """
    target = model.state_dict()
    filled = set(key_map.entries) | set(key_map.constants)
    missing_ours = sorted(k for k in target if k not in filled and not k.endswith(OPTIONAL_SUFFIXES))
    unmapped = sorted(filled - set(target))
    if unmapped:  # a bug in a converter: it names parameters the model does not have
        raise KeyError(f"key map names parameters the model does not have: {summarize_names(unmapped)}")
    used = {theirs for theirs, _ in key_map.entries.values()}
    absent = sorted(
        theirs for ours, (theirs, _) in key_map.entries.items()
        if theirs not in source and not theirs.endswith(OPTIONAL_SUFFIXES)
    )
    unexpected = sorted(k for k in source if k not in used)
    converted: dict[str, Tensor] = {}
    wrong_shape = []
    for ours, (theirs, transform) in key_map.entries.items():
        if theirs not in source:
            continue
        value = torch.as_tensor(source[theirs])
        if transform is not None:
            value = transform(value)
        expected = target[ours]
        if ours.endswith(OPTIONAL_SUFFIXES) and value.numel() == expected.numel():
            value = value.reshape(expected.shape)  # a counter saved as shape (1,) by some writers
        if tuple(value.shape) != tuple(expected.shape):
            wrong_shape.append(f"{theirs} {tuple(value.shape)} -> {ours} {tuple(expected.shape)}")
            continue
        converted[ours] = value.to(expected.dtype)
    for ours, value in key_map.constants.items():
        converted[ours] = value.reshape(target[ours].shape).to(target[ours].dtype)
    problems = []
    if absent:
        problems.append(f"missing in the file: {summarize_names(absent)}")
    if unexpected:
        problems.append(f"unexpected in the file (not part of this architecture): {summarize_names(unexpected)}")
    if wrong_shape:
        problems.append(f"wrong shapes: {summarize_names(sorted(wrong_shape))}")
    if missing_ours:
        problems.append(f"model parameters left unfilled: {summarize_names(missing_ours)}")
    if problems:
        raise ConversionError(f"{what}: the weights do not match the architecture: " + "; ".join(problems))
    model.load_state_dict(converted, strict=False)


# ---------------------------------------------------------------------------------------------------
# Reading files without running code
# ---------------------------------------------------------------------------------------------------

# What a pickle of numpy arrays (D2's model-zoo .pkl) may reference; anything else is refused. Pickles name
# numpy's internals by the module of the numpy that wrote them (numpy.core before 2.0, numpy._core since).
_multiarray = getattr(np, "_core", None) or np.core
_SAFE_PICKLE_GLOBALS = {
    ("collections", "OrderedDict"): OrderedDict,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    **{(f"{package}.multiarray", name): getattr(_multiarray.multiarray, name)
       for package in ("numpy.core", "numpy._core") for name in ("_reconstruct", "scalar")},
}


class _RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a callable other than numpy's array machinery."""


class _NumpyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _SAFE_PICKLE_GLOBALS[(module, name)]
        except KeyError:
            raise _RefusedGlobal(f"refusing to load {module}.{name}: only numpy arrays are allowed") from None


# torch/serialization.py MAGIC_NUMBER: the first of the pickles in a legacy (non-zip) torch.save file.
_LEGACY_TORCH_MAGIC = 0x1950A86A20F9469CFC6C


def read_pickle_of_arrays(path: Path) -> Any:
    """A Python 2/3 pickle of dicts, numbers and numpy arrays (``encoding="latin1"`` as D2 reads them)."""
    with open(path, "rb") as f:
        return _NumpyUnpickler(f, encoding="latin1").load()


def read_reference_file(path: str | os.PathLike[str], what: str) -> Any:
    """Read a ``.pkl`` (pickle of numpy arrays) or a torch file, with clear errors for the wrong kind."""
    path = Path(path)
    if path.is_dir():
        hint = ": it holds a TensorFlow checkpoint (*.index), use --from dl2" if names_tf_checkpoint(path) else ""
        raise ConversionError(f"{path} is a directory, not a {what} checkpoint file{hint}")
    if not path.is_file():
        raise ConversionError(f"{path} does not exist")
    with open(path, "rb") as f:
        head = f.read(8)
    try:
        if head.startswith(b"PK\x03\x04"):  # torch's zip format (.pth / .pt since torch 1.6)
            return load_tensors_only(path)
        if head[:1] == b"\x80":  # a pickle: D2 .pkl, or a legacy torch file (older torch's .pth)
            data = read_pickle_of_arrays(path)
            return load_tensors_only(path) if isinstance(data, int) and data == _LEGACY_TORCH_MAGIC else data
    except _RefusedGlobal as refused:
        raise ConversionError(f"{path}: {refused} (a pickle that could run code is never opened)") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConversionError(f"cannot read {path} as a {what} checkpoint (truncated or not a checkpoint): {first}") from None
    if head.startswith(b"\x1f\x8b") or names_tf_checkpoint(path):  # gzip: a .tar.gz of whatever name
        raise ConversionError(f"{path} is not a {what} checkpoint: it looks like a deeplab2 TF checkpoint: use --from dl2")
    raise ConversionError(
        f"{path} is not a {what} checkpoint: it is neither a torch file nor a pickle (first bytes {head!r})"
    )


def as_tensor_dict(state: Mapping[str, Any], what: str) -> dict[str, Tensor]:
    """Tensors (or numpy arrays) by name; a stray non-array value is an error naming it."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if isinstance(value, Tensor):
            out[key] = value
        elif isinstance(value, np.ndarray):
            out[key] = torch.from_numpy(np.ascontiguousarray(value))
        else:
            raise ConversionError(f"{what}: entry {key!r} is a {type(value).__name__}, not an array")
    return out


def strip_prefix(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Drop ``prefix`` (e.g. DataParallel's ``module.``) when every key has it."""
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return state


def guess_family(keys: Iterable[str]) -> str | None:
    """Which project a state dict's names come from, for "use --from X" hints."""
    keys = list(keys)
    if any(k.startswith(("sem_seg_head.", "ins_embed_head.")) for k in keys):
        return "d2"
    if any(k.startswith("decoder.semantic_decoder.") for k in keys):
        return "bc"
    if any(k.startswith(("semantic_decoder.", "instance_decoder.")) for k in keys):
        return "panoptic-deeplab"
    return None


FAMILY_NAMES = {
    "bc": "bowenc0221/panoptic-deeplab (--from bc)",
    "d2": "detectron2 Panoptic-DeepLab (--from d2)",
    "panoptic-deeplab": "panoptic-deeplab checkpoint already: use it directly",
}


def wrong_family_error(path: Path, expected: str, keys: Iterable[str]) -> ConversionError:
    family = guess_family(keys)
    hint = f": it looks like a {FAMILY_NAMES[family]}" if family and family != expected else ""
    return ConversionError(f"{path} is not a {FAMILY_NAMES[expected].split(' (')[0]} checkpoint{hint}")


# ---------------------------------------------------------------------------------------------------
# Downloads
# ---------------------------------------------------------------------------------------------------

URL_PATTERN = re.compile(r"^https?://", re.IGNORECASE)


def cache_dir() -> Path:
    """Where downloaded reference checkpoints are kept: ``$PANOPTIC_DEEPLAB_CACHE`` or ``~/.cache/panoptic_deeplab``."""
    env = os.environ.get("PANOPTIC_DEEPLAB_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "panoptic_deeplab"


def fetch(
    url_or_path: str,
    *,
    sha256: str | None = None,
    progress: bool = True,
    opener: Callable[[str], Any] = urllib.request.urlopen,
) -> Path:
    """A local path as is; a URL downloaded once into :func:`cache_dir` (progress bar, atomic, hash checked).

    ``sha256``: the expected digest (or a prefix of it, as published model zoos name files), checked after
    the download and on every later use of the cached file.
    """
    if not URL_PATTERN.match(url_or_path):
        return Path(url_or_path)
    from tqdm import tqdm

    name = file_name_of(url_or_path) or "download"
    digest = hashlib.sha256(url_or_path.encode()).hexdigest()[:12]
    target = cache_dir() / digest / name
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            response = opener(url_or_path)
        except OSError as exc:
            raise ConversionError(f"cannot download {url_or_path}: {exc}") from None
        total = int(response.headers.get("Content-Length") or 0) or None
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, desc=name,
                                                  disable=not progress) as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
            size = os.path.getsize(tmp)
            if total is not None and size != total:
                raise ConversionError(f"download of {url_or_path} stopped after {size} of {total} bytes")
            move_into_place(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        finally:
            response.close()
    if sha256 is not None:
        actual = file_sha256(target)
        if not actual.startswith(sha256.lower()):
            raise ConversionError(
                f"{target} (from {url_or_path}) has SHA-256 {actual}, not the published {sha256}: delete it and "
                "download again"
            )
    return target


def file_name_of(url_or_path: str) -> str:
    """The last component of a path or URL, without a query (``.../model_final_23d03a.pkl?dl=1`` -> the name)."""
    return url_or_path.rstrip("/").rsplit("/", 1)[-1].split("?")[0]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()

"""TensorFlow 2 checkpoints (``ckpt-N.index`` + ``ckpt-N.data-SSSSS-of-NNNNN``) read without TensorFlow.

The format is TensorFlow's "tensor bundle" (``tensorflow/core/util/tensor_bundle/tensor_bundle.cc``):

* ``.index`` is a LevelDB-style table (``tensorflow/core/lib/io/table_builder.cc``, ``format.cc``). Its last
  48 bytes are the footer: the metaindex and index block handles (two varint64 each: offset, size), zero padding
  to 40 bytes, then the magic ``0xdb4775248b80fb57`` (little-endian). Every block is followed by a 5-byte
  trailer: the compression type (0 = none, the only one the bundle writer uses) and the masked CRC-32C of the
  block's contents and that type byte.
* A block holds entries ``varint32 shared, varint32 non_shared, varint32 value_length, key delta, value`` (the
  key is the previous key's first ``shared`` bytes + the delta), then the uint32 restart offsets and their count.
  The index block maps separator keys to the handles of the data blocks; its keys are shortened, so only its
  handles are used.
* Data-block keys are tensor names, sorted bytewise. The empty key holds the ``BundleHeaderProto`` (1
  num_shards, 2 endianness, 3 version); every other value is a ``BundleEntryProto`` (1 dtype, 2 shape, 3
  shard_id, 4 offset, 5 size, 6 masked crc32c (fixed32), 7 slices), decoded here from the protobuf wire format.
* Tensor bytes are raw little-endian C-order values at ``[offset, offset + size)`` of data shard ``shard_id``.
  Strings are stored otherwise; the only string tensor of a Keras checkpoint is its object graph, skipped.

Every block's and every tensor's CRC-32C is verified (``google-crc32c``), so a damaged file is an error that
names it, never wrong weights.
"""

from __future__ import annotations

import os
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import google_crc32c
import torch
from torch import Tensor

__all__ = ["TFCheckpointError", "TensorEntry", "checkpoint_prefix", "names_tf_checkpoint", "read_index",
           "read_tf_checkpoint"]

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48
BLOCK_TRAILER_SIZE = 5
# tensorflow/core/framework/types.proto DataType values -> torch dtypes (7 = DT_STRING is never converted).
DTYPES = {
    1: torch.float32, 2: torch.float64, 3: torch.int32, 4: torch.uint8, 5: torch.int16, 6: torch.int8,
    9: torch.int64, 10: torch.bool, 14: torch.bfloat16, 19: torch.float16,
}
DT_STRING = 7
# The suffix Keras' object-based saver puts on every variable (tensorflow/python/training/saving).
VARIABLE_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")  # deeplab2 publishes a .tar.gz of the checkpoint's folder


class TFCheckpointError(ValueError):
    """The file is not a readable TensorFlow checkpoint (truncated, damaged, or of an unsupported kind)."""


def mask_crc(crc: int) -> int:
    """LevelDB's masked CRC (``crc32c::Mask``): stored CRCs are masked so that a CRC of CRCs stays strong."""
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def masked_crc32c(data: bytes | memoryview) -> int:
    return mask_crc(google_crc32c.value(bytes(data)))


@dataclass(frozen=True)
class TensorEntry:
    """One ``BundleEntryProto``: where a tensor's bytes are and what they hold."""

    name: str
    dtype: int  # TF DataType enum
    shape: tuple[int, ...]
    shard: int
    offset: int
    size: int
    crc32c: int  # masked
    sliced: bool  # a partitioned variable (``slices``): not supported


# ------------------------------------------------------------------------------------------- wire format


def _varint(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    """Decode a base-128 varint at ``pos``; returns (value, next position)."""
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise IndexError("varint runs past the end")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _proto_fields(data: bytes | memoryview) -> Iterator[tuple[int, int | bytes | memoryview]]:
    """(field number, value) pairs of a protobuf message: varints as ints, fixed32/64 as ints, bytes as views."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 1:
            value, pos = int.from_bytes(data[pos:pos + 8], "little"), pos + 8
        elif wire == 2:
            length, pos = _varint(data, pos)
            value, pos = data[pos:pos + length], pos + length
        elif wire == 5:
            value, pos = int.from_bytes(data[pos:pos + 4], "little"), pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > len(data):
            raise IndexError("field runs past the end")
        yield field, value


def _shape(data: memoryview) -> tuple[int, ...]:
    """TensorShapeProto: repeated field 2 (Dim: 1 size); field 3 unknown_rank."""
    dims = []
    for field, value in _proto_fields(data):
        if field == 2:
            size = next((v for f, v in _proto_fields(value) if f == 1), 0)  # type: ignore[arg-type]
            dims.append(int(size))  # type: ignore[arg-type]
        elif field == 3 and value:
            raise ValueError("a tensor of unknown rank")
    return tuple(dims)


def _entry(name: str, data: memoryview) -> TensorEntry:
    fields = {"dtype": 0, "shape": (), "shard": 0, "offset": 0, "size": 0, "crc32c": 0, "sliced": False}
    for field, value in _proto_fields(data):
        if field == 1:
            fields["dtype"] = value
        elif field == 2:
            fields["shape"] = _shape(value)  # type: ignore[arg-type]
        elif field in (3, 4, 5, 6):
            fields[{3: "shard", 4: "offset", 5: "size", 6: "crc32c"}[field]] = value
        elif field == 7:
            fields["sliced"] = True
    return TensorEntry(name=name, **fields)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------- the table


def _block(table: bytes, offset: int, size: int) -> memoryview:
    """Contents of the block at ``offset`` after checking its trailer (compression type and CRC)."""
    end = offset + size
    if offset < 0 or end + BLOCK_TRAILER_SIZE > len(table):
        raise IndexError(f"block [{offset}, {end}) runs past the end of the file ({len(table)} bytes)")
    kind = table[end]
    if kind != 0:
        raise ValueError(f"block at {offset} is compressed (type {kind}): TensorFlow's bundle writer never does this")
    stored = int.from_bytes(table[end + 1:end + 5], "little")
    if masked_crc32c(memoryview(table)[offset:end + 1]) != stored:
        raise ValueError(f"block at {offset} fails its CRC-32C check")
    return memoryview(table)[offset:end]


def _block_entries(block: memoryview) -> Iterator[tuple[bytes, memoryview]]:
    if len(block) < 4:
        raise IndexError("block shorter than its restart count")
    num_restarts = int.from_bytes(block[-4:], "little")
    end = len(block) - 4 * (num_restarts + 1)
    if end < 0:
        raise IndexError("block shorter than its restart array")
    pos, key = 0, b""
    while pos < end:
        shared, pos = _varint(block, pos)
        non_shared, pos = _varint(block, pos)
        value_length, pos = _varint(block, pos)
        if shared > len(key) or pos + non_shared + value_length > end:
            raise IndexError("block entry runs past the end")
        key = key[:shared] + bytes(block[pos:pos + non_shared])
        pos += non_shared
        yield key, block[pos:pos + value_length]
        pos += value_length


def read_index(index_path: str | os.PathLike[str]) -> tuple[int, dict[str, TensorEntry]]:
    """The number of data shards and every tensor entry of a ``.index`` file, by name."""
    path = Path(index_path)
    table = path.read_bytes()
    try:
        if len(table) < FOOTER_SIZE:
            raise IndexError(f"{len(table)} bytes, shorter than the {FOOTER_SIZE}-byte footer")
        footer = memoryview(table)[-FOOTER_SIZE:]
        if int.from_bytes(footer[-8:], "little") != TABLE_MAGIC:
            raise ValueError("no table magic number at the end (truncated, or not a .index file)")
        pos = 0
        for _ in range(2):  # the metaindex handle (unused: the bundle writer leaves it empty), then the index
            index_offset, pos = _varint(footer, pos)
            index_size, pos = _varint(footer, pos)
        num_shards, little_endian, entries = 1, True, {}
        for _, handle in _block_entries(_block(table, index_offset, index_size)):
            offset, next_pos = _varint(handle, 0)
            size, _ = _varint(handle, next_pos)
            for key, value in _block_entries(_block(table, offset, size)):
                if key == b"":
                    for field, header_value in _proto_fields(value):
                        if field == 1:
                            num_shards = int(header_value)  # type: ignore[arg-type]
                        elif field == 2:
                            little_endian = header_value == 0
                    continue
                name = key.decode("utf-8")
                entries[name] = _entry(name, value)
    except (IndexError, ValueError, UnicodeDecodeError) as exc:
        raise TFCheckpointError(f"{path} is not a readable TensorFlow checkpoint index: {exc}") from None
    if not little_endian:
        raise TFCheckpointError(f"{path} was written big-endian, which this reader does not support")
    if not entries:
        raise TFCheckpointError(f"{path} holds no tensors")
    return num_shards, entries


# ------------------------------------------------------------------------------------------- files


def names_tf_checkpoint(path: Path) -> bool:
    """Whether ``path`` is what :func:`read_tf_checkpoint` takes: an archive, an ``.index`` or data shard, or a
    folder holding an ``.index`` (by names only, nothing is read)."""
    if path.is_dir():
        return any(path.glob("*.index"))
    return path.name.endswith((*ARCHIVE_SUFFIXES, ".index")) or ".data-" in path.name


def checkpoint_prefix(path: str | os.PathLike[str]) -> Path:
    """``ckpt-N`` from ``ckpt-N``, ``ckpt-N.index``, a ``ckpt-N.data-*`` shard or a folder with one checkpoint."""
    path = Path(path)
    if path.is_dir():
        indexes = sorted(path.glob("*.index"))
        if not indexes:
            raise TFCheckpointError(f"{path} holds no TensorFlow checkpoint (no *.index file)")
        if len(indexes) > 1:
            # CheckpointManager keeps several: take the newest step, as tf.train.latest_checkpoint would.
            indexes.sort(key=lambda p: _step(p.name[: -len(".index")]))
        return indexes[-1].with_suffix("")
    if path.name.endswith(".index"):
        return path.with_suffix("")
    if ".data-" in path.name:
        return path.with_name(path.name.split(".data-")[0])
    return path


def _step(prefix: str) -> int:
    tail = prefix.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def _shard_path(prefix: Path, shard: int, num_shards: int) -> Path:
    return prefix.with_name(f"{prefix.name}.data-{shard:05d}-of-{num_shards:05d}")


def read_tf_checkpoint(
    path: str | os.PathLike[str], keep: Callable[[str], bool] = lambda name: True
) -> dict[str, Tensor]:
    """The tensors of a TF2 checkpoint whose names pass ``keep``, as CPU torch tensors, CRCs verified.

    ``path``: a ``.tar.gz`` of a folder with the checkpoint (as deeplab2 publishes them), a folder, or the
    ``ckpt-N`` prefix (or its ``.index``). String tensors are never returned.
    """
    path = Path(path)
    if path.is_file() and path.name.endswith(ARCHIVE_SUFFIXES):
        with tempfile.TemporaryDirectory(prefix="tf_checkpoint_") as tmp:
            _extract_checkpoint(path, Path(tmp))
            return read_tf_checkpoint(tmp, keep)
    prefix = checkpoint_prefix(path)
    index = prefix.with_name(prefix.name + ".index")
    if not index.is_file():
        raise TFCheckpointError(f"{index} does not exist: {path} is not a TensorFlow checkpoint")
    num_shards, entries = read_index(index)
    wanted = [e for name, e in entries.items() if e.dtype != DT_STRING and keep(name)]
    sliced = [e.name for e in wanted if e.sliced]
    if sliced:
        raise TFCheckpointError(f"{index}: partitioned variables are not supported ({', '.join(sliced[:3])})")
    tensors: dict[str, Tensor] = {}
    by_shard: dict[int, list[TensorEntry]] = {}
    for entry in wanted:
        if entry.dtype not in DTYPES:
            raise TFCheckpointError(f"{index}: tensor {entry.name} has TensorFlow dtype {entry.dtype}, not supported")
        if not 0 <= entry.shard < num_shards:
            raise TFCheckpointError(f"{index}: tensor {entry.name} is in shard {entry.shard} of {num_shards}")
        by_shard.setdefault(entry.shard, []).append(entry)
    for shard, shard_entries in sorted(by_shard.items()):
        data_path = _shard_path(prefix, shard, num_shards)
        if not data_path.is_file():
            raise TFCheckpointError(f"{data_path} is missing: the data shard {shard} of {num_shards} of {index}")
        with open(data_path, "rb") as f:
            for entry in sorted(shard_entries, key=lambda e: e.offset):
                f.seek(entry.offset)
                data = f.read(entry.size)
                tensors[entry.name] = _tensor(entry, data, data_path)
    return tensors


def _tensor(entry: TensorEntry, data: bytes, data_path: Path) -> Tensor:
    dtype = DTYPES[entry.dtype]
    count = 1
    for d in entry.shape:
        count *= d
    expected = count * torch.empty((), dtype=dtype).element_size()
    if len(data) != entry.size or entry.size != expected:
        raise TFCheckpointError(
            f"{data_path}: tensor {entry.name} {list(entry.shape)} needs {expected} bytes at offset {entry.offset}, "
            f"found {len(data)} (truncated file?)"
        )
    if masked_crc32c(data) != entry.crc32c:
        raise TFCheckpointError(f"{data_path}: tensor {entry.name} fails its CRC-32C check (the file is damaged)")
    if count == 0:
        return torch.zeros(entry.shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(entry.shape)


def _extract_checkpoint(archive: Path, into: Path) -> None:
    """The ``.index`` and ``.data-*`` members of a tar archive, flattened into ``into`` (never other paths)."""
    try:
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and (m.name.endswith(".index") or ".data-" in m.name)]
            if not any(m.name.endswith(".index") for m in members):
                raise TFCheckpointError(f"{archive} holds no TensorFlow checkpoint (no *.index file inside)")
            for member in members:
                source = tar.extractfile(member)
                assert source is not None  # a regular file
                with source, open(into / Path(member.name).name, "wb") as out:
                    while chunk := source.read(1 << 22):
                        out.write(chunk)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise TFCheckpointError(f"cannot read {archive} as a .tar.gz of a checkpoint: {exc}") from None


"""A writer of TensorFlow 2 checkpoints (tensor bundles) for the tests, from the format's public description.

It writes what TensorFlow's ``BundleWriter`` writes (``tensorflow/core/util/tensor_bundle``): ``PREFIX.index``, a
LevelDB-style table whose empty key holds the ``BundleHeaderProto`` and whose other keys (sorted bytewise) hold one
``BundleEntryProto`` each, and ``PREFIX.data-00000-of-00001`` with the raw little-endian tensor bytes, each entry
with the masked CRC-32C of its bytes. Keys are prefix-compressed with a restart every 16 entries and data blocks
are cut at about 4 KiB, as LevelDB's table builder does, so that the reader meets several blocks.
"""

from __future__ import annotations

from pathlib import Path

import google_crc32c
import numpy as np

DTYPES = {np.dtype(np.float32): 1, np.dtype(np.int64): 9}
MAGIC = 0xDB4775248B80FB57
BLOCK_SIZE = 4096
RESTART_INTERVAL = 16


def _masked(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field_varint(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def _field_bytes(field: int, value: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(value)) + value


def _entry_proto(array: np.ndarray, offset: int, data: bytes) -> bytes:
    shape = b"".join(_field_bytes(2, _field_varint(1, d) if d else b"") for d in array.shape)
    proto = _field_varint(1, DTYPES[array.dtype]) + _field_bytes(2, shape)
    if offset:  # proto3 leaves defaults out: the first tensor has no offset field
        proto += _field_varint(4, offset)
    proto += _field_varint(5, len(data))
    return proto + _varint(6 << 3 | 5) + _masked(data).to_bytes(4, "little")


class _BlockBuilder:
    def __init__(self) -> None:
        self.buffer = bytearray()
        self.restarts = [0]
        self.count = 0
        self.last = b""

    def add(self, key: bytes, value: bytes) -> None:
        shared = 0
        if self.count % RESTART_INTERVAL == 0 and self.count:
            self.restarts.append(len(self.buffer))
        elif self.count:
            while shared < min(len(key), len(self.last)) and key[shared] == self.last[shared]:
                shared += 1
        self.buffer += _varint(shared) + _varint(len(key) - shared) + _varint(len(value)) + key[shared:] + value
        self.last = key
        self.count += 1

    def finish(self) -> bytes:
        tail = b"".join(r.to_bytes(4, "little") for r in self.restarts) + len(self.restarts).to_bytes(4, "little")
        return bytes(self.buffer) + tail


def _write_block(out: bytearray, contents: bytes, block_type: int = 0) -> bytes:
    """Append a block with its trailer (type 0: not compressed); returns its handle."""
    handle = _varint(len(out)) + _varint(len(contents))
    trailer = bytes([block_type])
    out += contents + trailer + _masked(contents + trailer).to_bytes(4, "little")
    return handle


def write_tf_checkpoint(prefix: Path, tensors: dict[str, np.ndarray], *, num_shards: int = 1,
                        shard_of: dict[str, int] | None = None, big_endian: bool = False, block_type: int = 0,
                        extra_fields: dict[str, bytes] | None = None) -> None:
    """``prefix.index`` + ``prefix.data-0000S-of-0000N`` holding ``tensors`` (float32 / int64 arrays).

    For the reader's error paths: ``shard_of`` puts tensors in other shards, ``big_endian`` sets the header's
    endianness, ``block_type`` marks the data blocks as compressed, ``extra_fields`` appends raw protobuf fields
    to an entry (a later field overrides an earlier one, as protobuf parsers read them)."""
    shard_of, extra_fields = shard_of or {}, extra_fields or {}
    data = [bytearray() for _ in range(num_shards)]
    header = _field_varint(1, num_shards) + (_field_varint(2, 1) if big_endian else b"")
    entries = {b"": header + _field_bytes(3, _field_varint(1, 1))}  # version {producer 1}
    for name, array in tensors.items():
        raw = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()
        shard = shard_of.get(name, 0)
        entry = _entry_proto(array, len(data[shard]), raw)
        entries[name.encode()] = entry + (_field_varint(3, shard) if shard else b"") + extra_fields.get(name, b"")
        data[shard] += raw
    table = bytearray()
    index = _BlockBuilder()
    block = _BlockBuilder()
    for key in sorted(entries):
        block.add(key, entries[key])
        if len(block.buffer) >= BLOCK_SIZE:
            index.add(key, _write_block(table, block.finish(), block_type))
            block = _BlockBuilder()
    if block.count:
        index.add(block.last, _write_block(table, block.finish(), block_type))
    metaindex = _write_block(table, _BlockBuilder().finish())
    index_handle = _write_block(table, index.finish())
    footer = (metaindex + index_handle).ljust(40, b"\x00") + MAGIC.to_bytes(8, "little")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_name(prefix.name + ".index").write_bytes(bytes(table + footer))
    for shard, shard_data in enumerate(data):
        prefix.with_name(f"{prefix.name}.data-{shard:05d}-of-{num_shards:05d}").write_bytes(bytes(shard_data))


def field_bytes(field: int, value: bytes) -> bytes:
    """A length-delimited protobuf field (e.g. an entry's ``slices``)."""
    return _field_bytes(field, value)


def field_varint(field: int, value: int) -> bytes:
    """A varint protobuf field (e.g. an entry's ``dtype``)."""
    return _field_varint(field, value)

"""The TF2 tensor-bundle reader on the files it refuses and the layouts it reads, written by ``tf_bundle.py``.

(The reader itself is checked against TensorFlow's own files in ``test_deeplab2.py``.)
"""

from __future__ import annotations

import numpy as np
import pytest

from panoptic_deeplab.convert.tf_checkpoint import TFCheckpointError, read_index, read_tf_checkpoint

from tf_bundle import field_bytes, field_varint, write_tf_checkpoint

TENSORS = {"a/kernel": np.arange(12, dtype=np.float32).reshape(3, 4), "b/bias": np.ones(5, np.float32),
           "step": np.array(7, np.int64)}


def test_several_shards_are_read(tmp_path) -> None:
    prefix = tmp_path / "ckpt-1"
    write_tf_checkpoint(prefix, TENSORS, num_shards=3, shard_of={"b/bias": 2, "step": 1})
    assert sorted(p.name for p in tmp_path.glob("*.data-*")) == [f"ckpt-1.data-0000{i}-of-00003" for i in range(3)]
    tensors = read_tf_checkpoint(prefix)
    for name, array in TENSORS.items():
        np.testing.assert_array_equal(tensors[name].numpy(), array)


@pytest.mark.parametrize("damage, match", [
    ("big_endian", r"ckpt-1.index was written big-endian, which this reader does not support"),
    ("compressed", r"ckpt-1.index is not a readable TensorFlow checkpoint index: block at 0 is compressed \(type 1\)"),
    ("sliced", r"ckpt-1.index: partitioned variables are not supported \(a/kernel\)"),
    ("dtype", r"ckpt-1.index: tensor b/bias has TensorFlow dtype 8, not supported"),
    ("shard", r"ckpt-1.index: tensor step is in shard 4 of 1"),
    ("empty", r"ckpt-1.index holds no tensors"),
    ("not_a_table", r"ckpt-1.index is not a readable TensorFlow checkpoint index: 11 bytes, shorter than the "
                    r"48-byte footer"),
])
def test_files_the_reader_refuses(tmp_path, damage, match) -> None:
    prefix = tmp_path / "ckpt-1"
    options: dict = {}
    tensors = TENSORS
    if damage == "big_endian":
        options = dict(big_endian=True)
    elif damage == "compressed":
        options = dict(block_type=1)  # Snappy: TensorFlow's bundle writer never compresses
    elif damage == "sliced":
        options = dict(extra_fields={"a/kernel": field_bytes(7, field_varint(1, 1))})  # a TensorSliceProto
    elif damage == "dtype":
        options = dict(extra_fields={"b/bias": field_varint(1, 8)})  # DT_COMPLEX64
    elif damage == "shard":
        options = dict(extra_fields={"step": field_varint(3, 4)})
    elif damage == "empty":
        tensors = {}
    write_tf_checkpoint(prefix, tensors, **options)
    if damage == "not_a_table":
        prefix.with_name("ckpt-1.index").write_text("hello world")
    with pytest.raises(TFCheckpointError, match=match):
        read_tf_checkpoint(prefix)


def test_index_entries_carry_shapes_offsets_and_crcs(tmp_path) -> None:
    write_tf_checkpoint(tmp_path / "ckpt-1", TENSORS)
    num_shards, entries = read_index(tmp_path / "ckpt-1.index")
    assert num_shards == 1 and sorted(entries) == sorted(TENSORS)
    assert entries["a/kernel"].shape == (3, 4) and entries["step"].shape == () and entries["a/kernel"].offset == 0
    assert entries["b/bias"].offset == 48 and entries["b/bias"].size == 20

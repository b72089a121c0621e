"""rgb2id: the packed-word fast path gives exactly R + 256 G + 256^2 B as int32 for every layout."""

from __future__ import annotations

import numpy as np
import pytest

from panoptic_deeplab.data.coco_panoptic import id2rgb, rgb2id


def _reference(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.int64)
    return (rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]).astype(np.int32)


@pytest.mark.parametrize("shape", [(5, 7), (1, 1), (1, 9), (0, 4), (4, 0)])
def test_uint8_layouts(shape):
    rng = np.random.default_rng(sum(shape))
    rgba = rng.integers(0, 256, size=(*shape, 4), dtype=np.uint8)
    rgb = np.ascontiguousarray(rgba[..., :3])
    rgb.setflags(write=False)  # as np.asarray of a PIL image
    for x in (rgb, rgba[..., :3], rgb[::-1, ::2], rgb.transpose(1, 0, 2), rgb[1:]):
        out = rgb2id(x)
        assert out.dtype == np.int32 and out.shape == x.shape[:2]
        np.testing.assert_array_equal(out, _reference(x))


def test_extreme_colors_and_roundtrip():
    rgb = np.array([[[255, 255, 255], [0, 0, 0], [1, 0, 0], [0, 0, 1]]], dtype=np.uint8)
    np.testing.assert_array_equal(rgb2id(rgb), [[256**3 - 1, 0, 1, 65536]])
    ids = np.random.default_rng(0).integers(0, 256**3, size=(6, 5))
    np.testing.assert_array_equal(rgb2id(id2rgb(ids)), ids)


def test_wider_dtypes_keep_the_arithmetic_form():
    rgb = np.array([[[300, 1, 2]]], dtype=np.int64)  # not a byte: no packing
    assert rgb2id(rgb)[0, 0] == 300 + 256 + 2 * 65536
    with pytest.raises(ValueError, match="expected an"):
        rgb2id(np.zeros((2, 2, 4), np.uint8))

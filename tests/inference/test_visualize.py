"""Pictures: overlay with legend, center heatmap, offset color wheel."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from panoptic_deeplab.data.coco_panoptic import VOID_LABEL, CategoryInfo, DatasetMeta
from panoptic_deeplab.inference.visualize import (
    VIRIDIS_LUT,
    center_heatmap_image,
    class_colors,
    legend_entries,
    offset_field_image,
    overlay_panoptic,
)

META = DatasetMeta(
    [
        CategoryInfo(1, "road", False, (128, 64, 128)),
        CategoryInfo(2, "sky", False, (70, 130, 180)),
        CategoryInfo(5, "car", True, (0, 0, 142)),
        CategoryInfo(7, "person", True, (220, 20, 60)),
    ]
)


def _label_map(height: int = 61, width: int = 97) -> np.ndarray:
    labels = np.full((height, width), VOID_LABEL, np.int64)
    labels[: height // 2] = 1000  # sky
    labels[height // 2 :, : width // 2] = 0  # road
    labels[40:50, 10:20] = 2001  # car 1
    labels[40:50, 30:40] = 2002  # car 2
    return labels  # no person; void in the bottom-right


def test_overlay_size_mode_and_legend():
    image = np.full((61, 97, 3), 100, np.uint8)
    labels = _label_map()
    picture = overlay_panoptic(image, labels, META, alpha=0.5, legend=False)
    assert picture.mode == "RGB" and picture.size == (97, 61)
    with_legend = overlay_panoptic(image, labels, META)
    assert with_legend.mode == "RGB" and with_legend.width == 97 and with_legend.height > 61
    # the legend lists exactly the classes present, in train-id order, with their colors
    expected = [("road", (128, 64, 128)), ("sky", (70, 130, 180)), ("car", (0, 0, 142))]
    assert legend_entries(labels, META) == expected
    panel = np.asarray(with_legend)[61:].reshape(-1, 3)
    present = {tuple(c) for c in panel.tolist()}
    for _, color in legend_entries(labels, META):
        assert color in present
    assert (220, 20, 60) not in present  # person is absent from the image


def test_overlay_pixels():
    image = np.full((61, 97, 3), 100, np.uint8)
    labels = _label_map()
    out = np.asarray(overlay_panoptic(image, labels, META, alpha=0.5, legend=False)).astype(int)
    # void stays the image; stuff interior is the blend with the class color
    assert (out[60, 96] == 100).all()
    np.testing.assert_allclose(out[5, 50], (np.array([70, 130, 180]) + 100) / 2, atol=1)
    # boundaries (sky/road line, instance outlines) are white; two cars get different shades
    assert (out[61 // 2, 20] == 255).all() and (out[40, 15] == 255).all()
    assert not (out[45, 15] == out[45, 35]).all()
    # deterministic
    again = np.asarray(overlay_panoptic(image, labels, META, alpha=0.5, legend=False)).astype(int)
    np.testing.assert_array_equal(out, again)


def test_overlay_accepts_tensors_and_generates_colors():
    meta = DatasetMeta([CategoryInfo(i, f"class{i}", i >= 2) for i in range(4)])  # no colors given
    colors = class_colors(meta)
    assert len({tuple(c) for c in colors.tolist()}) == 4
    image = torch.rand(3, 32, 48)
    picture = overlay_panoptic(image, torch.from_numpy(_label_map(32, 48)), meta)
    assert picture.width == 48
    with pytest.raises(ValueError, match="does not match"):
        overlay_panoptic(image, _label_map(30, 48), meta)
    with pytest.raises(ValueError, match="alpha"):
        overlay_panoptic(image, _label_map(32, 48), meta, alpha=2.0)


def test_center_heatmap_image():
    heat = np.zeros((33, 50), np.float32)
    heat[10, 20] = 1.0
    heat[0, 0] = 5.0  # clipped to the top of the scale
    heat[1, 1] = -1.0  # clipped to the bottom
    picture = center_heatmap_image(heat)
    assert picture.mode == "RGB" and picture.size == (50, 33)
    pixels = np.asarray(picture)
    assert tuple(pixels[10, 20]) == tuple(VIRIDIS_LUT[255]) == tuple(pixels[0, 0])
    assert tuple(pixels[1, 1]) == tuple(VIRIDIS_LUT[0]) == tuple(pixels[30, 30])
    marked = np.asarray(center_heatmap_image(torch.from_numpy(heat)[None], centers=[(20, 30)]))
    assert tuple(marked[20, 30]) == (255, 0, 0)
    with pytest.raises(ValueError, match="heatmap"):
        center_heatmap_image(np.zeros((2, 3, 4)))


def test_offset_field_image_colors_follow_direction():
    offset = np.zeros((2, 60, 80), np.float32)
    offset[1, 30:40, 5:15] = 10.0  # pointing right
    offset[1, 30:40, 25:35] = -10.0  # pointing left
    offset[0, 45:55, 5:15] = -10.0  # pointing up
    picture = offset_field_image(offset, key=False)
    assert picture.mode == "RGB" and picture.size == (80, 60)
    pixels = np.asarray(picture).astype(int)
    assert tuple(pixels[35, 10]) == (255, 0, 0)  # right: red
    assert tuple(pixels[35, 30]) == (0, 255, 255)  # left: cyan
    r, g, b = pixels[50, 10]
    assert g == 255 and r < 200 and b < 10  # up: 90 degrees, yellow-green
    assert tuple(pixels[0, 0]) == (0, 0, 0)  # no offset: black
    half = np.asarray(offset_field_image(offset, max_magnitude=20.0, key=False)).astype(int)
    assert tuple(half[35, 10]) == (128, 0, 0)


def test_offset_field_key():
    picture = np.asarray(offset_field_image(np.zeros((2, 100, 150), np.float32))).astype(int)
    corner = picture[:30, -30:]
    assert corner.max() == 255 and len({tuple(c) for c in corner.reshape(-1, 3).tolist()}) > 20
    assert picture[50:, :100].max() == 0  # the rest of a zero field stays black
    assert offset_field_image(np.zeros((2, 8, 8))).size == (8, 8)  # too small for a key: none drawn
    with pytest.raises(ValueError, match=r"\[2, H, W\]"):
        offset_field_image(np.zeros((3, 8, 8)))

"""Targets on hand-built label maps whose answer is known by construction, and against a per-instance reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from panoptic_deeplab.config import TargetConfig
from panoptic_deeplab.data.coco_panoptic import CategoryInfo, DatasetMeta
from panoptic_deeplab.data.targets import (
    TARGET_KEYS,
    TargetGenerator,
    gaussian_patch,
    generate_targets,
    generate_targets_from_ids,
)

ROAD, PERSON, CAR = 0, 11, 13  # a stuff and two thing train ids
THINGS = [PERSON, CAR]
VOID = 255000


def _reference(label: np.ndarray, thing_ids, *, sigma=8, small_area=4096, small_weight=3.0, ignore_crowd=False,
               divisor=1000):
    """One full-image pass per segment, straight from SPEC §2 (integer sigma)."""
    h, w = label.shape
    yy, xx = np.mgrid[0:h, 0:w]
    semantic = label // divisor
    semantic_w = np.ones((h, w), np.float64)
    center = np.zeros((h, w), np.float64)
    center_w = np.ones((h, w), np.float64)
    offset = np.zeros((2, h, w), np.float64)
    offset_w = np.zeros((h, w), np.float64)
    for value in np.unique(label):
        cls, inst = divmod(int(value), divisor)
        mask = label == value
        if cls == 255:
            center_w[mask] = 0
        elif cls in thing_ids and inst == 0:  # crowd
            center_w[mask] = 0
            if ignore_crowd:
                semantic[mask] = 255
        elif cls in thing_ids:
            ys, xs = np.nonzero(mask)
            cy, cx = ys.mean(), xs.mean()
            if mask.sum() < small_area:
                semantic_w[mask] = small_weight
            offset_w[mask] = 1
            offset[0][mask] = cy - ys
            offset[1][mask] = cx - xs
            py, px = round(cy), round(cx)  # Python rounds half to even, like np.round / tf.round
            g = np.exp(-((yy - py) ** 2 + (xx - px) ** 2) / (2 * sigma**2))
            g[(np.abs(yy - py) > 3 * sigma + 1) | (np.abs(xx - px) > 3 * sigma + 1)] = 0
            center = np.maximum(center, g)
    return {
        "semantic": semantic,
        "semantic_weights": semantic_w,
        "center": center[None],
        "center_weights": center_w[None],
        "offset": offset,
        "offset_weights": offset_w[None],
    }


def _assert_matches(out, ref):
    assert set(out) == set(TARGET_KEYS)
    for key in TARGET_KEYS:
        expected = torch.as_tensor(ref[key])
        assert out[key].shape == expected.shape, key
        if key == "semantic":
            assert out[key].dtype == torch.int64
            assert torch.equal(out[key], expected.long()), key
        else:
            assert out[key].dtype == torch.float32, key
            torch.testing.assert_close(out[key], expected.float(), atol=2e-5, rtol=0, msg=key)


def _stuff_map(h=100, w=120):
    return torch.full((h, w), ROAD * 1000, dtype=torch.int64)


def test_single_square_instance():
    label = _stuff_map()
    label[30:51, 40:61] = PERSON * 1000 + 1  # 21 x 21, center of mass exactly (40, 50)
    out = generate_targets(label, THINGS)
    center = out["center"][0]
    assert center[40, 50] == 1.0 and center.max() == 1.0
    for dy, dx in [(3, 4), (-5, 0), (0, 12), (-7, -9)]:
        assert center[40 + dy, 50 + dx].item() == pytest.approx(math.exp(-(dy * dy + dx * dx) / (2 * 64)), rel=1e-6)
    # patch [c - 25, c + 26): last value at distance 25, nothing beyond
    assert center[40, 75].item() == pytest.approx(math.exp(-625 / 128), rel=1e-6)
    assert center[40, 76] == 0 and center[40, 24] == 0 and center[40, 25] > 0 and center[66, 50] == 0

    inside = label == PERSON * 1000 + 1
    ys, xs = torch.nonzero(inside, as_tuple=True)
    assert torch.equal(out["offset"][0][inside], (40 - ys).float())
    assert torch.equal(out["offset"][1][inside], (50 - xs).float())
    assert (out["offset"][:, ~inside] == 0).all()
    assert torch.equal(out["offset_weights"][0], inside.float())
    assert (out["center_weights"] == 1).all()
    assert torch.equal(out["semantic_weights"], torch.where(inside, 3.0, 1.0))
    assert torch.equal(out["semantic"], label // 1000)


def test_offset_points_to_float_center_of_mass():
    label = _stuff_map(20, 20)
    label[2:4, 5:9] = CAR * 1000 + 1  # center of mass (2.5, 6.5): rounded peak (2, 6), offsets to the float mean
    out = generate_targets(label, THINGS, sigma=2)
    assert out["center"][0, 2, 6] == 1.0
    assert out["offset"][0, 2, 5].item() == 0.5 and out["offset"][1, 2, 5].item() == 1.5
    assert out["offset"][0, 3, 8].item() == -0.5 and out["offset"][1, 3, 8].item() == -1.5


def test_small_instance_threshold_is_strict():
    label = _stuff_map(20, 20)
    label[0:3, 0:3] = PERSON * 1000 + 1  # 9 px
    label[10:12, 0:5] = PERSON * 1000 + 2  # 10 px
    out = generate_targets(label, THINGS, small_instance_area=10, small_instance_weight=5.0)
    assert (out["semantic_weights"][0:3, 0:3] == 5.0).all()
    assert (out["semantic_weights"][10:12, 0:5] == 1.0).all()
    assert out["semantic_weights"].sum() == 400 + 9 * 4


def test_two_touching_instances_point_to_their_own_centers():
    label = _stuff_map(40, 60)
    label[10:21, 10:21] = CAR * 1000 + 1  # center (15, 15)
    label[10:21, 21:32] = CAR * 1000 + 2  # center (15, 26), touching
    out = generate_targets(label, THINGS, sigma=3)
    left, right = label == CAR * 1000 + 1, label == CAR * 1000 + 2
    for mask, (cy, cx) in [(left, (15, 15)), (right, (15, 26))]:
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert torch.equal(out["offset"][0][mask], (cy - ys).float())
        assert torch.equal(out["offset"][1][mask], (cx - xs).float())
    assert out["center"][0, 15, 15] == 1.0 and out["center"][0, 15, 26] == 1.0
    # between the peaks the heatmap is the max of both Gaussians, not their sum
    expected = max(math.exp(-(4**2) / 18), math.exp(-(7**2) / 18))
    assert out["center"][0, 15, 19].item() == pytest.approx(expected, rel=1e-6)


def test_instance_cut_by_the_border():
    label = _stuff_map(30, 40)
    label[0:5, 0:7] = PERSON * 1000 + 1  # visible part: center of mass (2, 3)
    label[27:30, 36:40] = CAR * 1000 + 1  # center (28, 37.5) -> peak (28, 38)
    out = generate_targets(label, THINGS, sigma=2)
    center = out["center"][0]
    assert center[2, 3] == 1.0
    assert center[0, 0].item() == pytest.approx(math.exp(-(4 + 9) / 8), rel=1e-6)
    assert center[2, 10].item() == pytest.approx(math.exp(-49 / 8), rel=1e-6)  # distance 7 = 3 sigma + 1
    assert center[2, 11] == 0
    assert center[28, 38] == 1.0 and center[29, 39].item() == pytest.approx(math.exp(-2 / 8), rel=1e-6)
    assert out["offset"][0, 4, 6] == -2 and out["offset"][1, 4, 6] == -3
    assert out["offset"][1, 29, 39] == -1.5
    _assert_matches(out, _reference(label.numpy(), THINGS, sigma=2))


def test_crowd_gets_no_center_and_no_center_or_offset_weight():
    label = _stuff_map(30, 30)
    label[5:10, 5:10] = PERSON * 1000  # crowd, small
    out = generate_targets(label, THINGS, sigma=2)
    crowd = label == PERSON * 1000
    assert (out["center"] == 0).all()
    assert (out["offset"] == 0).all() and (out["offset_weights"] == 0).all()
    assert torch.equal(out["center_weights"][0], (~crowd).float())
    assert (out["semantic"][crowd] == PERSON).all()
    assert (out["semantic_weights"] == 1).all()
    ignored = generate_targets(label, THINGS, sigma=2, ignore_crowd_in_semantic=True)
    assert (ignored["semantic"][crowd] == 255).all() and (ignored["semantic"][~crowd] == ROAD).all()


def test_void_is_ignored_with_zero_weights():
    label = _stuff_map(30, 30)
    label[:, 20:] = VOID
    label[0:4, 25:] = 255 * 1000 + 7  # any instance number of class 255 is void too
    label[10:15, 2:6] = CAR * 1000 + 3
    out = generate_targets(label, THINGS, sigma=2)
    void = label // 1000 == 255
    assert (out["semantic"][void] == 255).all()
    assert (out["center_weights"][0][void] == 0).all() and (out["center_weights"][0][~void] == 1).all()
    assert (out["offset_weights"][0][void] == 0).all() and (out["offset"][:, void] == 0).all()
    assert (out["center"][0][:, 20:] == 0).all()


def test_stuff_only_image():
    label = _stuff_map(16, 24)
    label[8:] = 5 * 1000
    out = generate_targets(label, THINGS)
    assert (out["center"] == 0).all() and (out["offset"] == 0).all() and (out["offset_weights"] == 0).all()
    assert (out["center_weights"] == 1).all() and (out["semantic_weights"] == 1).all()
    assert torch.equal(out["semantic"], label // 1000)


def test_single_pixel_instance():
    label = _stuff_map(20, 20)
    label[7, 13] = PERSON * 1000 + 1
    out = generate_targets(label, THINGS, sigma=1)
    assert out["center"][0, 7, 13] == 1.0 and out["center"].sum() > 1.0
    assert (out["offset"] == 0).all()
    assert out["offset_weights"].sum() == 1 and out["offset_weights"][0, 7, 13] == 1
    assert out["semantic_weights"][7, 13] == 3.0 and out["semantic_weights"].sum() == 399 + 3


@pytest.mark.parametrize("seed", range(6))
def test_matches_per_instance_reference_on_random_maps(seed):
    gen = np.random.default_rng(seed)
    h, w = 48, 64
    label = np.full((h, w), int(gen.integers(0, 4)) * 1000, np.int64)
    for _ in range(int(gen.integers(3, 12))):
        y0, x0 = gen.integers(0, h), gen.integers(0, w)
        y1, x1 = y0 + gen.integers(1, 25), x0 + gen.integers(1, 30)
        kind = gen.random()
        if kind < 0.15:
            value = VOID
        elif kind < 0.3:
            value = int(gen.choice(THINGS)) * 1000  # crowd
        elif kind < 0.45:
            value = int(gen.integers(0, 4)) * 1000  # stuff
        else:
            value = int(gen.choice(THINGS)) * 1000 + int(gen.integers(1, 6))
        label[y0:y1, x0:x1] = value
    sigma = int(gen.integers(1, 4))
    kwargs = dict(small_instance_area=int(gen.integers(1, 300)), small_instance_weight=2.5)
    out = generate_targets(torch.from_numpy(label), THINGS, sigma=sigma, **kwargs)
    ref = _reference(label, THINGS, sigma=sigma, small_area=kwargs["small_instance_area"], small_weight=2.5)
    _assert_matches(out, ref)
    ignored = generate_targets(label.astype(np.int32), THINGS, sigma=sigma, ignore_crowd_in_semantic=True, **kwargs)
    ref_ignored = _reference(label, THINGS, sigma=sigma, small_area=kwargs["small_instance_area"], small_weight=2.5,
                             ignore_crowd=True)
    _assert_matches(ignored, ref_ignored)


def test_large_label_divisor_uses_the_sorting_path():
    divisor = 1 << 16
    label = np.full((32, 40), 3 * divisor, np.int64)
    label[:, 30:] = 255 * divisor
    label[2:12, 3:9] = PERSON * divisor + 40000
    label[20:31, 5:25] = CAR * divisor + 1
    label[14:18, 10:12] = CAR * divisor
    out = generate_targets(label, THINGS, label_divisor=divisor, sigma=2)
    _assert_matches(out, _reference(label, THINGS, sigma=2, divisor=divisor))


def test_gaussian_patch_size_and_peak():
    patch = gaussian_patch(8.0)
    assert patch.shape == (51, 51) and patch[25, 25] == 1.0 and patch.argmax() == 25 * 51 + 25
    assert gaussian_patch(10.0).shape == (63, 63)
    assert gaussian_patch(2.5).shape == (17, 17)  # floor(7.5) + 1 = 8 each side
    with pytest.raises(ValueError, match="sigma"):
        gaussian_patch(0.0)


@pytest.mark.parametrize(
    "label, match",
    [
        (torch.full((4, 4), -1), "outside"),
        (torch.full((4, 4), 256 * 1000), "outside"),
        (torch.zeros(4, 4, dtype=torch.float32), "integers"),
        (torch.zeros(2, 4, 4, dtype=torch.int64), r"\[H, W\]"),
    ],
)
def test_bad_label_maps_raise(label, match):
    with pytest.raises(ValueError, match=match):
        generate_targets(label, THINGS)


def test_bad_thing_ids_raise():
    with pytest.raises(ValueError, match="thing ids"):
        generate_targets(torch.zeros(4, 4, dtype=torch.int64), [255])


def _meta():
    return DatasetMeta(
        [
            CategoryInfo(1, "person", True),
            CategoryInfo(5, "road", False),
            CategoryInfo(7, "car", True),
        ]
    )


def test_generate_targets_from_ids_matches_label_map():
    meta = _meta()  # train ids: person 0, road 1, car 2
    ids = np.zeros((24, 32), np.int32)
    ids[:, :] = 300  # road
    ids[2:8, 2:10] = 17  # person
    ids[10:20, 5:15] = 42  # car, crowd
    ids[12:22, 20:30] = 99  # car
    ids[0:2, 28:] = 0  # void
    segments = [
        {"id": 300, "category_id": 5, "iscrowd": 0},
        {"id": 17, "category_id": 1, "iscrowd": 0},
        {"id": 42, "category_id": 7, "iscrowd": 1},
        {"id": 99, "category_id": 7, "iscrowd": 0},
    ]
    label = np.full(ids.shape, 1000, np.int64)
    label[2:8, 2:10] = 1
    label[10:20, 5:15] = 2000
    label[12:22, 20:30] = 2002
    label[0:2, 28:] = VOID
    out = generate_targets_from_ids(ids, segments, meta, sigma=2)
    expected = generate_targets(label, meta.thing_train_ids, sigma=2)
    for key in TARGET_KEYS:
        assert torch.equal(out[key], expected[key]), key

    with pytest.raises(ValueError, match=r"a\.png: segment 99: present in the PNG .* but missing from segments_info"):
        generate_targets_from_ids(ids, segments[:3], meta, context="a.png")
    with pytest.raises(ValueError, match="unknown category id 3"):
        generate_targets_from_ids(ids, segments + [{"id": 5, "category_id": 3}], meta)
    void_only = generate_targets_from_ids(np.zeros((4, 4), np.int32), [], meta)
    assert (void_only["semantic"] == 255).all() and (void_only["center_weights"] == 0).all()


def test_target_generator_uses_config():
    label = _stuff_map(40, 40)
    label[5:9, 5:9] = PERSON * 1000  # crowd
    label[20:25, 20:25] = CAR * 1000 + 1
    cfg = TargetConfig(sigma=3.0, small_instance_area=20, small_instance_weight=2.0, ignore_crowd_in_semantic=True)
    out = TargetGenerator(THINGS, cfg)(label)
    expected = generate_targets(label, THINGS, sigma=3.0, small_instance_area=20, small_instance_weight=2.0,
                                ignore_crowd_in_semantic=True)
    for key in TARGET_KEYS:
        assert torch.equal(out[key], expected[key]), key
    assert (out["semantic"][5:9, 5:9] == 255).all() and (out["semantic_weights"] == 1).all()
    default = TargetGenerator(THINGS)(label)
    assert (default["semantic"][5:9, 5:9] == PERSON).all() and (default["semantic_weights"][20:25, 20:25] == 3).all()
    with pytest.raises(ValueError, match="sigma"):
        TargetGenerator(THINGS, TargetConfig(sigma=-1.0))

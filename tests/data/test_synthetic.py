"""The built-in synthetic dataset: deterministic, valid, PQ 100 against itself with cityscapesscripts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from panoptic_deeplab.cli import main
from panoptic_deeplab.data.coco_panoptic import ids_to_label_map, load_panoptic_json, read_panoptic_png
from panoptic_deeplab.data.synthetic import (
    SyntheticSplit,
    make_synthetic_dataset,
    render_synthetic_image,
    render_synthetic_mosaic,
    synthetic_meta,
)
from panoptic_deeplab.data.validate import validate_dataset


def _files(split: SyntheticSplit) -> dict[str, bytes]:
    root = split.json_path.parent
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def train(tmp_path_factory) -> SyntheticSplit:
    return make_synthetic_dataset(tmp_path_factory.mktemp("a"), "train", 4, size=(64, 128), seed=1)


def test_layout_and_meta(train):
    root = train.json_path.parent
    assert train.json_path == root / "panoptic_train.json"
    assert train.png_dir == root / "panoptic" and train.image_dir == root / "images"
    assert sorted(p.name for p in train.image_dir.iterdir()) == [f"train_{i:06d}.png" for i in range(4)]
    dataset = load_panoptic_json(train.json_path)
    assert dataset.meta == synthetic_meta()
    ids = [c.id for c in dataset.meta.categories]
    assert ids == [3, 7, 11, 12, 20, 24, 31]  # non-contiguous on purpose
    assert [c.name for c in dataset.meta.categories if c.isthing] == ["disc", "square", "triangle"]
    assert [(im.id, im.height, im.width) for im in dataset.images] == [(i, 64, 128) for i in range(4)]


def test_same_seed_gives_identical_files_and_seed_and_split_change_them(train, tmp_path):
    again = make_synthetic_dataset(tmp_path / "b", "train", 4, size=(64, 128), seed=1)
    assert _files(again) == _files(train)
    other_seed = _files(make_synthetic_dataset(tmp_path / "c", "train", 4, size=(64, 128), seed=2))
    other_split = _files(make_synthetic_dataset(tmp_path / "d", "val", 4, size=(64, 128), seed=1))
    images = lambda files: [v for k, v in files.items() if k.startswith("images")]  # noqa: E731
    assert not set(images(other_seed)) & set(images(_files(train)))
    assert not set(images(other_split)) & set(images(_files(train)))


def test_synthetic_dataset_passes_validate(train):
    assert validate_dataset(train.json_path, train.png_dir, train.image_dir, progress=False) == []


def test_content_has_crowd_void_touching_instances_and_a_range_of_sizes():
    meta = synthetic_meta()
    thing_train = set(meta.thing_train_ids)
    crowd = void = touching = 0
    sizes = []
    for index in range(12):
        image, ids, segments = render_synthetic_image(index, "train", seed=0, size=(256, 512))
        assert image.shape == (256, 512, 3) and image.dtype == np.uint8
        crowd += sum(s.iscrowd for s in segments)
        void += int((ids == 0).sum() > 0)
        sizes += [max(s.bbox[2:]) for s in segments if meta.category_to_train[s.category_id] in thing_train]
        label = ids_to_label_map(ids, segments, meta)
        # Two different instances of one thing class sharing an edge (horizontal or vertical neighbours).
        for a, b in ((label[:, :-1], label[:, 1:]), (label[:-1], label[1:])):
            same_class = (a // 1000 == b // 1000) & (a != b) & (a % 1000 > 0) & (b % 1000 > 0)
            touching += int(same_class.any())
    assert crowd >= 2 and void >= 4 and touching >= 3
    assert min(sizes) <= 25 and max(sizes) >= 90


def test_synthetic_scores_pq_100_against_itself_with_cityscapesscripts(train):
    from cityscapesscripts.evaluation import evalPanopticSemanticLabeling as cs

    gt = json.loads(train.json_path.read_text())
    pred = json.loads(train.json_path.read_text())
    # The ground truth exercises the crowd and void rules of the evaluation.
    assert any(s["iscrowd"] for a in gt["annotations"] for s in a["segments_info"])
    assert any((read_panoptic_png(train.png_dir / a["file_name"]) == 0).any() for a in gt["annotations"])
    categories = {c["id"]: c for c in gt["categories"]}
    matched = list(zip(gt["annotations"], pred["annotations"]))
    # The single-core worker is what evaluatePanoptic runs per process; it reads both PNG folders.
    stat = cs.pq_compute_single_core(0, matched, str(train.png_dir), str(train.png_dir), categories)
    results = cs.average_pq(stat, categories)
    for name in ("All", "Things", "Stuff"):
        assert results[name]["pq"] == pytest.approx(1.0), name
        assert results[name]["n"] > 0

    # Control: relabelling one predicted instance (disc <-> square) must cost PQ.
    pred = json.loads(train.json_path.read_text())
    seg = next(s for a in pred["annotations"] for s in a["segments_info"]
               if s["category_id"] in (20, 24) and not s["iscrowd"])
    seg["category_id"] = 44 - seg["category_id"]
    matched = list(zip(gt["annotations"], pred["annotations"]))
    stat = cs.pq_compute_single_core(0, matched, str(train.png_dir), str(train.png_dir), categories)
    assert cs.average_pq(stat, categories)["Things"]["pq"] < 0.99


def test_make_synthetic_cli(tmp_path, capsys):
    code = main(["make-synthetic", "--out", str(tmp_path), "--split", "val", "--num", "2",
                 "--size", "32x48", "--seed", "4", "--no-progress"])
    assert code == 0
    assert "--json" in capsys.readouterr().out
    dataset = load_panoptic_json(Path(tmp_path) / "val" / "panoptic_val.json")
    assert [(im.height, im.width) for im in dataset.images] == [(32, 48), (32, 48)]


def test_mosaic_of_scenes_keeps_each_scene_and_renumbers_segments(tmp_path):
    image, ids, segments = render_synthetic_mosaic(3, "val", 2, (32, 48), scenes=(2, 3))
    assert image.shape == (64, 144, 3) and ids.shape == (64, 144)
    next_id = 1
    for k in range(6):
        top, left = (k // 3) * 32, (k % 3) * 48
        scene, scene_ids, scene_segments = render_synthetic_image(3 * 6 + k, "val", 2, (32, 48))
        np.testing.assert_array_equal(image[top : top + 32, left : left + 48], scene)
        cell = ids[top : top + 32, left : left + 48]
        np.testing.assert_array_equal(cell == 0, scene_ids == 0)  # void stays void
        for segment in scene_segments:
            np.testing.assert_array_equal(cell == next_id, scene_ids == segment.id)
            next_id += 1
    assert [s.id for s in segments] == list(range(1, next_id))
    # The files pass validation (areas and boxes in image coordinates); the CLI takes --scenes.
    assert main(["make-synthetic", "--out", str(tmp_path), "--split", "val", "--num", "2", "--size", "32x48",
                 "--scenes", "2x2", "--no-progress"]) == 0
    split = SyntheticSplit(tmp_path / "val" / "panoptic_val.json", tmp_path / "val" / "panoptic",
                           tmp_path / "val" / "images")
    assert [(im.height, im.width) for im in load_panoptic_json(split.json_path).images] == [(64, 96)] * 2
    assert validate_dataset(split.json_path, split.png_dir, split.image_dir, progress=False) == []
    with pytest.raises(ValueError, match=r"^scenes must be at least 1x1, got 0x2$"):
        render_synthetic_mosaic(0, scenes=(0, 2))


def test_bad_arguments_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="split name"):
        make_synthetic_dataset(tmp_path, "../x", 1)
    with pytest.raises(ValueError, match="num_images"):
        make_synthetic_dataset(tmp_path, "train", 0)
    with pytest.raises(ValueError, match="at least 8x8"):
        render_synthetic_image(0, size=(4, 100))

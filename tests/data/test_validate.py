"""Dataset validation: every deliberately broken copy is reported, naming the file and the segment."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from panoptic_deeplab.cli import main
from panoptic_deeplab.data.coco_panoptic import (
    DatasetError,
    ImageInfo,
    SegmentInfo,
    load_annotation,
    load_panoptic_json,
    save_panoptic_json,
    write_panoptic_png,
)
from panoptic_deeplab.data.synthetic import SyntheticSplit, make_synthetic_dataset
from panoptic_deeplab.data.validate import validate_dataset


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> SyntheticSplit:
    return make_synthetic_dataset(tmp_path_factory.mktemp("orig"), "val", 3, size=(64, 128), seed=5)


@pytest.fixture()
def ds(original, tmp_path) -> SyntheticSplit:
    """A fresh copy of the clean dataset, free to break."""
    root = tmp_path / "val"
    shutil.copytree(original.json_path.parent, root)
    return SyntheticSplit(root / original.json_path.name, root / "panoptic", root / "images")


def _validate(ds: SyntheticSplit) -> list[str]:
    return [str(p) for p in validate_dataset(ds.json_path, ds.png_dir, ds.image_dir, progress=False)]


def _first_thing(ds: SyntheticSplit, index: int = 0) -> tuple[str, SegmentInfo]:
    dataset = load_panoptic_json(ds.json_path)
    ann = dataset.annotations[index]
    seg = next(s for s in ann.segments_info if dataset.meta.is_thing_train_id(dataset.meta.train_id(s.category_id)))
    return ann.file_name, seg


def _edit_segments(ds: SyntheticSplit, edit) -> None:
    dataset = load_panoptic_json(ds.json_path)
    edit(dataset.annotations[0].segments_info)
    save_panoptic_json(ds.json_path, dataset)


def _assert_also_raised_by_loader(ds: SyntheticSplit, message: str) -> None:
    """load_annotation raises on the first problem with validate's message."""
    dataset = load_panoptic_json(ds.json_path)
    ann = dataset.annotations[0]
    with pytest.raises(DatasetError) as info:
        load_annotation(ann, ds.png_dir, dataset.meta, dataset.image_by_id()[ann.image_id])
    assert str(info.value) == message


def test_clean_dataset_has_no_problems(ds):
    assert _validate(ds) == []


def test_png_segment_missing_from_segments_info(ds):
    png, seg = _first_thing(ds)
    _edit_segments(ds, lambda segs: segs.remove(next(s for s in segs if s.id == seg.id)))
    problems = _validate(ds)
    assert problems == [f"{ds.png_dir / png}: segment {seg.id}: present in the PNG ({seg.area} pixels) "
                        "but missing from segments_info"]
    _assert_also_raised_by_loader(ds, problems[0])


def test_segments_info_id_absent_from_png(ds):
    png, _ = _first_thing(ds)
    _edit_segments(ds, lambda segs: segs.append(SegmentInfo(4242, 20, 10, (0, 0, 2, 5))))
    problems = _validate(ds)
    assert problems == [f"{ds.png_dir / png}: segment 4242: listed in segments_info but absent from the PNG"]
    _assert_also_raised_by_loader(ds, problems[0])


def test_wrong_area(ds):
    png, seg = _first_thing(ds)

    def edit(segs):
        next(s for s in segs if s.id == seg.id).area += 3

    _edit_segments(ds, edit)
    problems = _validate(ds)
    assert problems == [f"{ds.png_dir / png}: segment {seg.id}: area is {seg.area + 3} in the JSON "
                        f"but the PNG has {seg.area} pixels"]
    _assert_also_raised_by_loader(ds, problems[0])


def test_wrong_bbox(ds):
    png, seg = _first_thing(ds)

    def edit(segs):
        next(s for s in segs if s.id == seg.id).bbox = (0, 0, 1, 1)

    _edit_segments(ds, edit)
    (problem,) = _validate(ds)
    assert problem.startswith(f"{ds.png_dir / png}: segment {seg.id}: bbox is [0, 0, 1, 1] in the JSON")
    assert str(list(seg.bbox)) in problem


def test_unknown_category_id(ds):
    png, seg = _first_thing(ds)

    def edit(segs):
        next(s for s in segs if s.id == seg.id).category_id = 99

    _edit_segments(ds, edit)
    problems = _validate(ds)
    assert len(problems) == 1
    assert problems[0].startswith(f"{ds.png_dir / png}: segment {seg.id}: unknown category id 99; known ids")
    _assert_also_raised_by_loader(ds, problems[0])


def test_image_and_annotation_sizes_differ(ds):
    dataset = load_panoptic_json(ds.json_path)
    image_path = ds.image_dir / dataset.images[1].file_name
    Image.open(image_path).resize((100, 64)).save(image_path)
    problems = _validate(ds)
    assert problems == [
        f"{image_path}: image is 64x100 (HxW) but its JSON entry says 64x128",
        f"{image_path}: image is 64x100 (HxW) but its panoptic PNG "
        f"{ds.png_dir / dataset.annotations[1].file_name} is 64x128",
    ]


def test_png_and_json_entry_sizes_differ(ds):
    dataset = load_panoptic_json(ds.json_path)
    dataset.images[0].width = 120
    save_panoptic_json(ds.json_path, dataset)
    problems = _validate(ds)
    png = ds.png_dir / dataset.annotations[0].file_name
    assert f"{png}: PNG is 64x128 (HxW) but the JSON entry of image 0 says 64x120" in problems


@pytest.mark.parametrize("which", ["png", "image"])
def test_missing_file(ds, which):
    dataset = load_panoptic_json(ds.json_path)
    path = (ds.png_dir / dataset.annotations[2].file_name if which == "png"
            else ds.image_dir / dataset.images[2].file_name)
    path.unlink()
    assert _validate(ds) == [f"{path}: file not found"]


@pytest.mark.parametrize("which", ["png", "image"])
def test_truncated_file(ds, which):
    dataset = load_panoptic_json(ds.json_path)
    path = (ds.png_dir / dataset.annotations[1].file_name if which == "png"
            else ds.image_dir / dataset.images[1].file_name)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    (problem,) = _validate(ds)
    assert problem.startswith(f"{path}: unreadable or truncated image")


def test_every_problem_is_collected_not_only_the_first(ds):
    dataset = load_panoptic_json(ds.json_path)
    first = dataset.annotations[0].segments_info
    first[0].area += 1
    first[-1].category_id = 1000
    dataset.annotations[1].segments_info.append(SegmentInfo(77, 3, 1, (0, 0, 1, 1)))
    dataset.images.append(ImageInfo(99, "ghost.png", 64, 128))
    save_panoptic_json(ds.json_path, dataset)
    (ds.png_dir / dataset.annotations[2].file_name).unlink()
    problems = _validate(ds)
    assert len(problems) == 5
    assert any("ghost.png (id 99) has no annotation" in p for p in problems)
    assert any(f"segment {first[0].id}: area is" in p for p in problems)
    assert any(f"segment {first[-1].id}: unknown category id 1000" in p for p in problems)
    assert any("segment 77: listed in segments_info but absent" in p for p in problems)
    assert any(p.endswith("file not found") for p in problems)


def test_unparsable_json_is_a_problem(ds):
    ds.json_path.write_text("[1, 2")
    (problem,) = _validate(ds)
    assert problem.startswith(f"{ds.json_path}: cannot read the JSON")


def _cli(ds: SyntheticSplit, json_path: Path | None = None) -> int:
    return main(["validate", "--json", str(json_path or ds.json_path), "--png-dir", str(ds.png_dir),
                 "--images", str(ds.image_dir), "--no-progress"])


def test_cli_exit_codes(ds, tmp_path, capsys):
    assert _cli(ds) == 0
    assert "no problems found" in capsys.readouterr().out

    assert _cli(ds, tmp_path / "missing.json") == 2
    assert "missing.json not found" in capsys.readouterr().err

    data = json.loads(ds.json_path.read_text())
    data["annotations"][0]["segments_info"][0]["area"] += 1
    data["annotations"][1]["segments_info"][0]["category_id"] = 5
    ds.json_path.write_text(json.dumps(data))
    assert _cli(ds) == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3
    assert "area is" in out[0] and "unknown category id 5" in out[1]
    assert out[2] == "validate: 2 problem(s) in 2 file(s)"


def test_cli_reports_a_missing_directory(ds, capsys):
    shutil.rmtree(ds.image_dir)
    assert _cli(ds) == 2
    assert f"image directory {ds.image_dir} not found" in capsys.readouterr().err


def test_void_only_png_is_valid(ds):
    """A PNG that is entirely void with empty segments_info is valid."""
    dataset = load_panoptic_json(ds.json_path)
    dataset.annotations[0].segments_info = []
    save_panoptic_json(ds.json_path, dataset)
    write_panoptic_png(ds.png_dir / dataset.annotations[0].file_name, np.zeros((64, 128), dtype=np.int32))
    assert _validate(ds) == []


def test_empty_lists_are_problems(ds, capsys):
    dataset = load_panoptic_json(ds.json_path)
    dataset.images.clear()
    dataset.annotations.clear()
    save_panoptic_json(ds.json_path, dataset)
    assert _validate(ds) == [
        f"{ds.json_path}: 'images' is empty: the split has nothing to train or evaluate on",
        f"{ds.json_path}: 'annotations' is empty: no image has panoptic labels",
    ]
    assert _cli(ds) == 1
    assert "2 problem(s) in 1 file(s)" in capsys.readouterr().out


def test_repeated_image_ids_are_reported_and_refused_by_training(ds):
    from panoptic_deeplab.config import SplitConfig
    from panoptic_deeplab.data.dataset import PanopticDataset

    dataset = load_panoptic_json(ds.json_path)
    dataset.images[1].id = dataset.images[0].id
    dataset.annotations[1].image_id = dataset.images[0].id
    save_panoptic_json(ds.json_path, dataset)
    first = dataset.images[0].id
    problems = _validate(ds)
    assert f"{ds.json_path}: image id {first!r} appears 2 times in 'images'" in problems
    assert f"{ds.json_path}: image id {first!r} has 2 annotations" in problems
    split = SplitConfig(json=str(ds.json_path), panoptic=str(ds.png_dir), images=str(ds.image_dir))
    with pytest.raises(DatasetError, match=rf"image id {first!r} appears 2 times in 'images' \(1 repeated id\(s\)\): "
                                           r"each image needs one id and one annotation"):
        PanopticDataset(split)
    dataset.images[1].id = "other"
    save_panoptic_json(ds.json_path, dataset)
    with pytest.raises(DatasetError, match=rf"image id {first!r} appears 2 times in 'annotations'"):
        PanopticDataset(split)

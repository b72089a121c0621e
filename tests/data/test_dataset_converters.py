"""Dataset converters (data/converters, the convert-dataset verb): round trips of the synthetic dataset through
each source form, and bad input with exact messages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from panoptic_deeplab.data.coco_panoptic import (
    DatasetError,
    SegmentInfo,
    load_panoptic_json,
    read_panoptic_png,
)
from panoptic_deeplab.data.converters import convert_label_maps, convert_semantic_instance, read_categories
from panoptic_deeplab.data.synthetic import render_synthetic_image, synthetic_meta
from panoptic_deeplab.data.validate import validate_dataset

SIZE = (64, 112)
IMAGES = 3


def _maps(ids: np.ndarray, segments: list[SegmentInfo]) -> tuple[np.ndarray, np.ndarray]:
    """(category id per pixel, 255 void; instance number per thing pixel, 0 for crowd and stuff)."""
    classes = np.full(ids.shape, 255, dtype=np.int64)
    instances = np.zeros(ids.shape, dtype=np.int64)
    things = {c.id for c in synthetic_meta().categories if c.isthing}
    for number, segment in enumerate(segments, start=1):
        pixels = ids == segment.id
        classes[pixels] = segment.category_id
        if segment.category_id in things and not segment.iscrowd:
            instances[pixels] = number
    return classes, instances


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> dict:
    """Synthetic images with their ground truth, and a categories file."""
    root = tmp_path_factory.mktemp("source")
    (root / "images").mkdir()
    truth = {}
    for index in range(IMAGES):
        image, ids, segments = render_synthetic_image(index, "train", 3, SIZE)  # seed 3: crowds in two images
        Image.fromarray(image).save(root / "images" / f"frame{index}.jpg", quality=95)
        truth[f"frame{index}"] = (ids, segments)
    categories = root / "categories.yaml"
    categories.write_text("\n".join(
        f"- {{id: {c.id}, name: {c.name}, isthing: {int(c.isthing)}}}" for c in synthetic_meta().categories))
    return {"root": root, "truth": truth, "categories": categories}


def _assert_same_segmentation(split, truth: dict) -> None:
    """The written split holds the original segments (renumbered): same pixels, classes, crowd flags, areas,
    boxes; and it passes validate."""
    assert validate_dataset(split.json_path, split.png_dir, split.image_dir, progress=False) == []
    dataset = load_panoptic_json(split.json_path)
    assert dataset.meta.to_json()[0]["name"] == "sky" and len(dataset.images) == len(truth)
    names = {im.id: Path(im.file_name).stem for im in dataset.images}
    for annotation in dataset.annotations:
        ids, segments = truth[names[annotation.image_id]]
        written = read_panoptic_png(split.png_dir / annotation.file_name)
        assert ((written == 0) == (ids == 0)).all()
        ours = {s.id: s for s in annotation.segments_info}
        for segment in segments:
            values = np.unique(written[ids == segment.id])
            assert len(values) == 1, "a segment was split or merged"
            mine = ours.pop(int(values[0]))
            assert (mine.category_id, mine.iscrowd, mine.area, mine.bbox) == \
                (segment.category_id, segment.iscrowd, segment.area, segment.bbox)
        assert not ours, "segments that are not in the original"


def test_semantic_instance_round_trip_through_the_cli(source, tmp_path) -> None:
    for folder in ("semantic", "instance"):
        (tmp_path / folder).mkdir()
    for stem, (ids, segments) in source["truth"].items():
        classes, instances = _maps(ids, segments)
        Image.fromarray(classes.astype(np.uint8)).save(tmp_path / "semantic" / f"{stem}.png")
        Image.fromarray(instances.astype(np.uint16)).save(tmp_path / "instance" / f"{stem}.png")  # 16-bit
    done = subprocess.run(
        [sys.executable, "-m", "panoptic_deeplab.cli", "convert-dataset", "--from", "semantic-instance",
         "--images", str(source["root"] / "images"), "--semantic", str(tmp_path / "semantic"), "--instance",
         str(tmp_path / "instance"), "--categories", str(source["categories"]), "--out", str(tmp_path / "out"),
         "--no-progress"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    truth = source["truth"].values()
    things = sum(1 for _, segs in truth for s in segs if s.category_id in (20, 24, 31) and not s.iscrowd)
    crowds = sum(1 for _, segs in truth for s in segs if s.iscrowd)
    stuff = sum(1 for _, segs in truth for s in segs if s.category_id not in (20, 24, 31))
    assert crowds > 0 and things > 0
    out = tmp_path / "out" / "train"
    assert done.stdout.splitlines() == [
        f"wrote 3 images: {things} thing instances, {crowds} crowd regions, {stuff} stuff regions",
        "validate: no problems found",
        f"--json {out / 'panoptic_train.json'} --png-dir {out / 'panoptic'} --images {out / 'images'}",
    ]
    assert (out / "images" / "frame0.jpg").is_symlink()
    split = convert_semantic_instance(source["root"] / "images", tmp_path / "semantic", tmp_path / "instance",
                                      source["categories"], tmp_path / "api", split="val", copy_images=True)
    assert not (split.image_dir / "frame0.jpg").is_symlink() and split.json_path.name == "panoptic_val.json"
    _assert_same_segmentation(split, source["truth"])


@pytest.mark.parametrize("suffix", [".npy", ".png"])
def test_label_map_round_trip(source, tmp_path, suffix) -> None:
    (tmp_path / "labels").mkdir()
    divisor = 1000 if suffix == ".npy" else 256  # a 16-bit PNG holds class * 256 + instance for ids < 256
    for stem, (ids, segments) in source["truth"].items():
        classes, instances = _maps(ids, segments)
        label = classes * divisor + instances
        if suffix == ".npy":
            np.save(tmp_path / "labels" / f"{stem}.npy", label.astype(np.int32))
        else:
            Image.fromarray(label.astype(np.uint16)).save(tmp_path / "labels" / f"{stem}.png")
    split = convert_label_maps(source["root"] / "images", tmp_path / "labels", source["categories"], tmp_path / "out",
                               label_divisor=divisor)
    _assert_same_segmentation(split, source["truth"])
    assert json.loads(split.json_path.read_text())["info"]["label_divisor"] == divisor


def test_bad_input_names_the_file_and_the_value(source, tmp_path) -> None:
    images, categories = source["root"] / "images", source["categories"]
    labels = tmp_path / "labels"
    labels.mkdir()
    stems = sorted(source["truth"])
    shape = source["truth"][stems[0]][0].shape
    for stem in stems:
        np.save(labels / f"{stem}.npy", np.full(shape, 7000, dtype=np.int32))  # road everywhere
    np.save(labels / f"{stems[1]}.npy", np.full(shape, 9000, dtype=np.int32))
    with pytest.raises(DatasetError, match=rf"{labels / stems[1]}.npy: unknown class id\(s\) 9 \(7168 pixels\); "
                                            r"the categories file declares \[3, 7, 11, 12, 20, 24, 31\] and 255 is void"):
        convert_label_maps(images, labels, categories, tmp_path / "a")
    np.save(labels / f"{stems[1]}.npy", np.full((10, 10), 7000, dtype=np.int32))
    with pytest.raises(DatasetError, match=rf"{labels / stems[1]}.npy: is 10x10 \(HxW\) but its image "
                                            rf"{images / stems[1]}.jpg is 64x112"):
        convert_label_maps(images, labels, categories, tmp_path / "b")
    (labels / f"{stems[1]}.npy").unlink()
    with pytest.raises(DatasetError, match=rf"{labels}: no label map for image '{stems[1]}' \(looked for "):
        convert_label_maps(images, labels, categories, tmp_path / "c")
    Image.new("RGB", (112, 64)).save(labels / f"{stems[1]}.png")
    with pytest.raises(DatasetError, match=rf"{labels / stems[1]}.png: is a RGB image: a label map has one integer "
                                            "channel"):
        convert_label_maps(images, labels, categories, tmp_path / "d")
    np.save(labels / f"{stems[1]}.npy", np.zeros(shape, dtype=np.int32))
    with pytest.raises(DatasetError, match=rf"several label maps for image '{stems[1]}': {stems[1]}.png, "
                                            rf"{stems[1]}.npy"):
        convert_label_maps(images, labels, categories, tmp_path / "e")
    (labels / f"{stems[1]}.png").unlink()
    np.save(labels / f"{stems[1]}.npy", np.full(shape, 0.5))
    with pytest.raises(DatasetError, match=rf"{labels / stems[1]}.npy: holds float64 values, expected integers"):
        convert_label_maps(images, labels, categories, tmp_path / "f")
    np.save(labels / f"{stems[1]}.npy", np.full(shape, -3, dtype=np.int32))
    with pytest.raises(DatasetError, match=rf"{labels / stems[1]}.npy: negative label -3"):
        convert_label_maps(images, labels, categories, tmp_path / "g")
    for text, message in (("- {id: 1, name: a}", r"lacks the field\(s\) \['isthing'\]"),
                          ("just text", "must hold a list of categories"),
                          ("- {id: 1, name: a, isthing: 1}\n- {id: 1, name: b, isthing: 0}", "duplicate category ids")):
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(ValueError, match=f"categories file {bad}: .*{message}"
                           if "must hold" not in message else f"categories file {bad} {message}"):
            read_categories(bad)


def test_cli_refusals(source, tmp_path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "panoptic_deeplab.cli", "convert-dataset", *args,
                               "--images", str(source["root"] / "images"), "--categories", str(source["categories"]),
                               "--no-progress"], capture_output=True, text=True)

    done = run("--from", "semantic-instance", "--semantic", str(tmp_path), "--out", str(tmp_path / "o"))
    assert (done.returncode, done.stderr) == (2, "error: --from semantic-instance needs --images, --categories, "
                                                 "--semantic, --instance; missing --instance\n")
    done = run("--from", "label-map", "--labels", str(tmp_path / "none"), "--out", str(tmp_path / "o"))
    assert (done.returncode, done.stderr) == (2, f"error: --labels folder {tmp_path / 'none'} does not exist\n")
    (tmp_path / "file").write_text("x")
    done = run("--from", "label-map", "--labels", str(tmp_path), "--out", str(tmp_path / "file"))
    assert done.returncode == 2 and done.stderr.startswith(f"error: --out {tmp_path / 'file'} cannot be a folder")


def _cityscapes_tree(root: Path) -> None:
    """A small Cityscapes-layout tree: two cities, stuff, ignored labels, instances and crowds of two classes."""
    rng = np.random.default_rng(0)
    for city, frames in (("aachen", 2), ("bremen", 1)):
        for frame in range(frames):
            stem = f"{city}_000000_{frame:06d}"
            ids = np.full((32, 64), 7, dtype=np.uint16)  # road
            ids[:8] = 23  # sky
            ids[8:12, :20] = 11  # building
            ids[-3:] = 1  # ego vehicle: ignored in evaluation
            ids[12:14, 40:] = 5  # dynamic: ignored
            for k in range(int(rng.integers(2, 5))):
                y, x = int(rng.integers(12, 26)), int(rng.integers(0, 56))
                ids[y : y + 5, x : x + 7] = 26000 + k if k % 2 == 0 else 24000 + k  # cars and persons
            ids[20:24, 0:6] = 26  # a car crowd
            ids[14:16, 10:14] = 24  # a person crowd
            (root / "gtFine" / "val" / city).mkdir(parents=True, exist_ok=True)
            (root / "leftImg8bit" / "val" / city).mkdir(parents=True, exist_ok=True)
            Image.fromarray(ids).save(root / "gtFine" / "val" / city / f"{stem}_gtFine_instanceIds.png")
            image = rng.integers(0, 256, (32, 64, 3), dtype=np.uint8)
            Image.fromarray(image).save(root / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png")


@pytest.mark.parametrize("train_ids", [False, True])
def test_cityscapes_equals_create_panoptic_imgs(tmp_path, train_ids) -> None:
    """The same JSON (images, annotations, categories) and the same PNGs as cityscapesscripts' own converter."""
    create = pytest.importorskip("cityscapesscripts.preparation.createPanopticImgs")
    from panoptic_deeplab.data.converters import convert_cityscapes

    root = tmp_path / "cityscapes"
    _cityscapes_tree(root)
    reference = tmp_path / "reference"
    reference.mkdir()
    create.convert2panoptic(str(root / "gtFine"), str(reference), useTrainId=train_ids, setNames=["val"])
    base = "cityscapes_panoptic_val" + ("_trainId" if train_ids else "")
    theirs = json.loads((reference / f"{base}.json").read_text())
    split = convert_cityscapes(root, tmp_path / "out", "val", train_ids=train_ids)
    ours = json.loads(split.json_path.read_text())
    # The one deliberate difference: createPanopticImgs names images "*_gtFine_leftImg8bit.png", a file that does
    # not exist (it edits the label file's name); ours is the real image, linked into the split.
    for image in theirs["images"]:
        image["file_name"] = image["file_name"].replace("_gtFine_leftImg8bit.png", "_leftImg8bit.png")
    for key in ("images", "annotations", "categories"):
        assert ours[key] == theirs[key], key
    assert any(s["iscrowd"] for a in ours["annotations"] for s in a["segments_info"])
    for annotation in theirs["annotations"]:
        np.testing.assert_array_equal(read_panoptic_png(split.png_dir / annotation["file_name"]),
                                      read_panoptic_png(reference / base / annotation["file_name"]))
    assert validate_dataset(split.json_path, split.png_dir, split.image_dir, progress=False) == []


def test_cityscapes_bad_input(tmp_path) -> None:
    from panoptic_deeplab.data.converters import convert_cityscapes

    with pytest.raises(FileNotFoundError, match=rf"no {tmp_path}/gtFine/val/<city>/\*_gtFine_instanceIds.png files: "
                                                 rf"is {tmp_path} a Cityscapes root"):
        convert_cityscapes(tmp_path, tmp_path / "out")
    root = tmp_path / "cityscapes"
    _cityscapes_tree(root)
    label = root / "gtFine" / "val" / "bremen" / "bremen_000000_000000_gtFine_instanceIds.png"
    Image.fromarray(np.full((32, 64), 50, dtype=np.uint16)).save(label)
    with pytest.raises(DatasetError, match=rf"{label}: value 50 is not a Cityscapes instance id"):
        convert_cityscapes(root, tmp_path / "out")
    (root / "leftImg8bit" / "val" / "bremen" / "bremen_000000_000000_leftImg8bit.png").unlink()
    with pytest.raises(DatasetError, match=rf"{label}: its image .*bremen_000000_000000_leftImg8bit.png does not "
                                            "exist"):
        convert_cityscapes(root, tmp_path / "out")


def test_remaining_refusals_have_exact_messages(source, tmp_path) -> None:
    from panoptic_deeplab.data.converters import segments_from_maps
    from panoptic_deeplab.data.converters.common import SplitWriter, read_label_map

    with pytest.raises(FileNotFoundError, match=f"^categories file {tmp_path} is a directory$"):
        read_categories(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"^categories file {tmp_path / 'none.yaml'} does not exist$"):
        read_categories(tmp_path / "none.yaml")
    bad = tmp_path / "bad.npy"
    bad.write_bytes(b"not numpy")
    with pytest.raises(DatasetError, match=rf"^{bad}: not a readable \.npy array"):
        read_label_map(bad)
    np.save(bad, np.zeros((2, 3, 4), dtype=np.int32))
    with pytest.raises(DatasetError, match=rf"^{bad}: has shape \(2, 3, 4\), expected a 2-D \[H, W\] map$"):
        read_label_map(bad)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    with pytest.raises(DatasetError, match=rf"^{broken}: unreadable or truncated image"):
        read_label_map(broken)
    meta = synthetic_meta()
    with pytest.raises(DatasetError, match=r"^x: class map is 2x2 but instance map is 2x3$"):
        segments_from_maps(np.full((2, 2), 7), np.zeros((2, 3), dtype=np.int64), meta, 255, "x")
    with pytest.raises(DatasetError, match=r"^x: negative instance id -1$"):
        segments_from_maps(np.full((2, 2), 20), np.full((2, 2), -1), meta, 255, "x")
    with pytest.raises(ValueError, match=r"^split name 'a/b' must be letters, digits, '_' or '-'$"):
        SplitWriter(tmp_path / "w", "a/b", meta)
    writer = SplitWriter(tmp_path / "w", "train", meta)
    with pytest.raises(ValueError, match=r"^no image was converted: the split would be empty$"):
        writer.finish({})
    image = source["root"] / "images" / "frame0.jpg"
    ids, segments = source["truth"]["frame0"]
    classes, instances = _maps(ids, segments)
    writer.add(image, classes, instances, 255, "labels of frame0")
    with pytest.raises(DatasetError, match=rf"^{image}: a second image of this file name$"):
        writer.add(image, classes, instances, 255, "labels of frame0")
    done = subprocess.run([sys.executable, "-m", "panoptic_deeplab.cli", "quantize", "--onnx", "x.onnx",
                           "--calibration", str(source["root"] / "images"), "--max-images", "0", "--output", "y.onnx"],
                          capture_output=True, text=True)
    assert (done.returncode, done.stderr) == (2, "error: --max-images must be at least 1, got 0\n")


def _column_major_runs(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE counts of a boolean mask (runs of 0, 1, 0, ... in column-major order)."""
    flat = mask.T.reshape(-1).astype(np.int8)
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    return [0, *runs] if flat[0] else runs


def test_coco_instances_round_trip_with_stuff_maps(source, tmp_path) -> None:
    """The synthetic ground truth as a COCO instances JSON (compressed and uncompressed RLE, crowds) plus stuff
    maps that also carry the thing classes (as COCO-Stuff's do) converts back to the same segmentation."""
    from pycocotools import mask as mask_utils

    from panoptic_deeplab.data.converters import convert_coco_instances

    meta = synthetic_meta()
    things = {c.id for c in meta.categories if c.isthing}
    (tmp_path / "stuff").mkdir()
    images, annotations = [], []
    for image_id, (stem, (ids, segments)) in enumerate(sorted(source["truth"].items()), start=10):
        images.append({"id": image_id, "file_name": f"{stem}.jpg", "height": SIZE[0], "width": SIZE[1]})
        stuff = np.full(SIZE, 255, dtype=np.uint8)
        for segment in segments:
            mask = ids == segment.id
            stuff[mask] = segment.category_id
            if segment.category_id not in things:
                continue
            if len(annotations) % 2:
                rle = {"size": list(SIZE), "counts": _column_major_runs(mask)}
            else:
                rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
                rle = {"size": list(SIZE), "counts": rle["counts"].decode("ascii")}
            annotations.append({"id": 100 + len(annotations), "image_id": image_id, "category_id": segment.category_id,
                                "segmentation": rle, "iscrowd": int(segment.iscrowd), "area": segment.area,
                                "bbox": list(segment.bbox)})
        Image.fromarray(stuff).save(tmp_path / "stuff" / f"{stem}.png")
    categories = [{"id": c.id, "name": c.name, "supercategory": "thing"} for c in meta.categories if c.isthing]
    instances = tmp_path / "instances.json"
    instances.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    assert any(a["iscrowd"] for a in annotations)

    split = convert_coco_instances(source["root"] / "images", instances, tmp_path / "out", stuff=tmp_path / "stuff",
                                   categories=source["categories"])
    _assert_same_segmentation(split, source["truth"])
    assert split.dropped_segments == 0
    assert [im.id for im in load_panoptic_json(split.json_path).images] == [10, 11, 12]

    # Through the CLI, without stuff maps: the things alone, every other pixel void.
    out = tmp_path / "cli"
    result = subprocess.run([sys.executable, "-m", "panoptic_deeplab.cli", "convert-dataset", "--from", "coco-instances",
                             "--instances", str(instances), "--images", str(source["root"] / "images"), "--out",
                             str(out), "--no-progress"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    thing_segments = sum(1 for a in annotations if not a["iscrowd"])
    crowds = len(annotations) - thing_segments
    assert result.stdout.splitlines()[0] == (f"wrote 3 images: {thing_segments} thing instances, {crowds} crowd "
                                             "regions, 0 stuff regions")
    dataset = load_panoptic_json(out / "train" / "panoptic_train.json")
    assert all(c.isthing for c in dataset.meta.categories)
    for annotation, (ids, segments) in zip(dataset.annotations, (source["truth"][s] for s in sorted(source["truth"]))):
        written = read_panoptic_png(out / "train" / "panoptic" / annotation.file_name)
        thing_pixels = np.isin(ids, [s.id for s in segments if s.category_id in things])
        assert ((written != 0) == thing_pixels).all()


def test_coco_instances_overlap_rule_polygons_and_dropped_segments(tmp_path) -> None:
    from panoptic_deeplab.data.converters import convert_coco_instances

    (tmp_path / "images").mkdir()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "images" / "a.png")

    def box(y0: int, x0: int, y1: int, x1: int) -> dict:
        mask = np.zeros((20, 20), bool)
        mask[y0:y1, x0:x1] = True
        return {"size": [20, 20], "counts": _column_major_runs(mask)}

    annotations = [
        {"id": 1, "category_id": 1, "segmentation": box(0, 0, 10, 10)},  # large, under the small ones
        {"id": 2, "category_id": 1, "segmentation": box(5, 5, 8, 8)},  # small: wins its pixels
        {"id": 3, "category_id": 2, "segmentation": box(0, 0, 20, 20), "iscrowd": 1},  # only what nothing covers
        {"id": 4, "category_id": 1, "segmentation": box(5, 5, 8, 8)},  # same mask as 2, higher id: dropped
        # a polygon: the triangle (12, 12), (18, 12), (12, 18) in x, y
        {"id": 5, "category_id": 2, "segmentation": [[12.0, 12.0, 18.0, 12.0, 12.0, 18.0]]},
    ]
    for annotation in annotations:
        annotation["image_id"] = 7
    instances = tmp_path / "instances.json"
    instances.write_text(json.dumps({
        "images": [{"id": 7, "file_name": "a.png", "height": 20, "width": 20}], "annotations": annotations,
        "categories": [{"id": 1, "name": "car"}, {"id": 2, "name": "person"}]}))
    split = convert_coco_instances(tmp_path / "images", instances, tmp_path / "out")
    assert split.dropped_segments == 1
    assert (split.thing_segments, split.crowd_segments, split.stuff_segments) == (3, 1, 0)
    (annotation,) = load_panoptic_json(split.json_path).annotations
    segments = {s.id: s for s in annotation.segments_info}
    written = read_panoptic_png(split.png_dir / "a.png")
    # segment ids follow the kept annotations' ids: 1 -> 1, 2 -> 2, 3 -> 3 (crowd), 5 -> 4
    assert (written[5:8, 5:8] == 2).all() and segments[2].area == 9
    assert segments[1].area == 100 - 9 and (written[:10, :10][written[:10, :10] != 2] == 1).all()
    assert segments[3].iscrowd and segments[3].category_id == 2
    triangle = written == 4
    assert segments[4].category_id == 2 and 15 <= triangle.sum() <= 25 and triangle[13, 13]
    assert (written[written == 3].size + triangle.sum() + 100) == 400  # every other pixel is the crowd's


def test_coco_instances_bad_input(source, tmp_path) -> None:
    from panoptic_deeplab.data.converters import convert_coco_instances
    from panoptic_deeplab.data.converters.coco_instances import decode_segmentation

    images = source["root"] / "images"
    instances = tmp_path / "instances.json"
    image = {"id": 1, "file_name": "frame0.jpg", "height": SIZE[0], "width": SIZE[1]}
    good = {"id": 5, "image_id": 1, "category_id": 24, "segmentation": [[1, 1, 9, 1, 1, 9]]}

    def convert(annotations: list, **options):
        instances.write_text(json.dumps({"images": [image], "annotations": annotations,
                                         "categories": [{"id": 24, "name": "person"}]}))
        return convert_coco_instances(images, instances, tmp_path / "out", **options)

    cases = [
        ({**good, "category_id": 3}, "annotation 5: unknown category id 3"),
        ({**good, "image_id": 2}, "annotation 5: unknown image id 2"),
        ({"id": 5, "image_id": 1}, "annotation 5: lacks category_id, segmentation"),
        ({**good, "segmentation": [[1, 1, 9, 1]]}, "image 1: annotation 5: polygons must be lists of x, y numbers, "
                                                  "at least 3 points each"),
        ({**good, "segmentation": {"size": [4, 4], "counts": [16]}},
         r"image 1: annotation 5: RLE size \[4, 4\] but the image is 64x112 \(HxW\)"),
        ({**good, "segmentation": {"size": list(SIZE), "counts": [5, 3]}},
         "image 1: annotation 5: RLE counts cover 8 pixels, the image has 7168"),
        ({**good, "segmentation": {"size": list(SIZE), "counts": "ab~"}},
         "image 1: annotation 5: character '~' is not in the RLE alphabet"),
        ({**good, "segmentation": {"size": list(SIZE), "counts": "0o"}},
         "image 1: annotation 5: the counts string ends inside a number"),
        ({**good, "segmentation": "mask"}, "image 1: annotation 5: segmentation is neither polygons nor an RLE"),
    ]
    for annotation, message in cases:
        with pytest.raises(DatasetError, match=f"^{instances}: {message}"):
            convert([annotation])
    with pytest.raises(ValueError, match="^--stuff needs --categories: the stuff maps' category ids"):
        convert([good], stuff=tmp_path)
    stuff = tmp_path / "stuff"
    stuff.mkdir()
    np.save(stuff / "frame0.npy", np.full(SIZE, 9, dtype=np.int32))
    with pytest.raises(DatasetError, match=rf"^{stuff / 'frame0.npy'}: unknown class id\(s\) \[9\]; the stuff "
                                           r"categories are \[3, 7, 11, 12\], 255 is void \(--ignore-label\)"):
        convert([good], stuff=stuff, categories=source["categories"])
    np.save(stuff / "frame0.npy", np.full((8, 8), 3, dtype=np.int32))
    with pytest.raises(DatasetError, match=rf"^{stuff / 'frame0.npy'}: is 8x8 \(HxW\) but {instances} gives image 1 "
                                           "as 64x112"):
        convert([good], stuff=stuff, categories=source["categories"])
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("- {id: 24, name: person, isthing: 0}")
    with pytest.raises(DatasetError, match=rf"^{wrong}: category 24 \(person\) is stuff here but an instance "
                                           rf"category in {instances}"):
        convert([good], categories=wrong)
    image["height"] = 60
    with pytest.raises(DatasetError, match=rf"^{instances}: image 1: is 60x112 \(HxW\) but its image "
                                           rf"{images / 'frame0.jpg'} is 64x112"):
        convert([{**good, "segmentation": {"size": [60, 112], "counts": [60 * 112]}}])
    instances.write_text("{not json")
    with pytest.raises(DatasetError, match=rf"^{instances}: not a JSON file"):
        convert_coco_instances(images, instances, tmp_path / "out")
    instances.write_text(json.dumps({"images": []}))
    with pytest.raises(DatasetError, match=rf"^{instances}: not a COCO instances JSON: it needs the lists 'images', "
                                           "'annotations' and 'categories'"):
        convert_coco_instances(images, instances, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match=f"^instances JSON {tmp_path} is a directory"):
        convert_coco_instances(images, tmp_path, tmp_path / "out")
    # the decoder against pycocotools' own encoder, on a random mask
    from pycocotools import mask as mask_utils

    mask = np.random.default_rng(0).random((37, 53)) < 0.3
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    decoded = decode_segmentation({"size": [37, 53], "counts": encoded["counts"].decode()}, 37, 53)
    np.testing.assert_array_equal(decoded, mask)


def _mapillary_root(tmp_path: Path, layout: str) -> Path:
    """A Mapillary Vistas tree made of synthetic images: ``v2.0`` (the v2.0 release: v1.2/ and v2.0/ label folders)
    or ``v1.2`` (the v1.2 release: panoptic/ beside images/)."""
    import shutil

    from panoptic_deeplab.data.synthetic import make_synthetic_dataset

    root = tmp_path / "mapillary"
    make_synthetic_dataset(tmp_path / "synthetic", "training", 3, SIZE, seed=3)
    source = tmp_path / "synthetic" / "training"
    shutil.copytree(source / "images", root / "training" / "images")
    label_dirs = [root / "training" / "v1.2" / "panoptic", root / "training" / "v2.0" / "panoptic"] \
        if layout == "v2.0" else [root / "training" / "panoptic"]
    for folder, name in zip(label_dirs, ("panoptic_2018.json", "panoptic_2020.json")):
        shutil.copytree(source / "panoptic", folder)
        shutil.copy(source / "panoptic_training.json", folder / name)
    return root


def test_mapillary_resizes_to_the_long_side_and_remeasures(tmp_path) -> None:
    from panoptic_deeplab.data.converters import convert_mapillary

    root = _mapillary_root(tmp_path, "v2.0")
    original = load_panoptic_json(root / "training" / "v2.0" / "panoptic" / "panoptic_2020.json")
    # twice the size: nearest-neighbour doubling copies every label pixel 2x2, so areas are exactly 4x
    split = convert_mapillary(root, tmp_path / "out", split="train", version="v2.0", long_side=2 * SIZE[1])
    assert validate_dataset(split.json_path, split.png_dir, split.image_dir, progress=False) == []
    assert split.json_path == tmp_path / "out" / "train" / "panoptic_train.json" and split.dropped_segments == 0
    dataset = load_panoptic_json(split.json_path)
    assert dataset.meta.to_json() == original.meta.to_json()
    for before, after, image in zip(original.annotations, dataset.annotations, dataset.images):
        assert (image.height, image.width) == (2 * SIZE[0], 2 * SIZE[1])
        assert Image.open(split.image_dir / image.file_name).size == (2 * SIZE[1], 2 * SIZE[0])
        assert not (split.image_dir / image.file_name).is_symlink()
        for a, b in zip(before.segments_info, after.segments_info):
            assert (b.id, b.category_id, b.iscrowd) == (a.id, a.category_id, a.iscrowd)
            assert b.area == 4 * a.area and b.bbox == tuple(2 * v for v in a.bbox)
    # shrunk to a long side of 16 px, small segments vanish: dropped and counted, the split still valid
    small = convert_mapillary(root, tmp_path / "small", split="training", version="v2.0", long_side=16)
    assert small.dropped_segments > 0
    assert validate_dataset(small.json_path, small.png_dir, small.image_dir, progress=False) == []


def test_mapillary_v12_release_kept_at_its_size_through_the_cli(tmp_path) -> None:
    root = _mapillary_root(tmp_path, "v1.2")
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "panoptic_deeplab.cli", "convert-dataset", "--from", "mapillary",
                             "--mapillary", str(root), "--split", "train", "--long-side", "0", "--out", str(out),
                             "--no-progress"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "validate: no problems found" in result.stdout
    original = load_panoptic_json(root / "training" / "panoptic" / "panoptic_2018.json")
    written = load_panoptic_json(out / "train" / "panoptic_train.json")
    assert [a.segments_info for a in written.annotations] == [a.segments_info for a in original.annotations]
    for annotation in original.annotations:
        np.testing.assert_array_equal(read_panoptic_png(out / "train" / "panoptic" / annotation.file_name),
                                      read_panoptic_png(root / "training" / "panoptic" / annotation.file_name))
    assert all((out / "train" / "images" / im.file_name).is_symlink() for im in written.images)


def test_mapillary_bad_input(tmp_path) -> None:
    import json as json_module

    from panoptic_deeplab.data.converters import convert_mapillary
    from panoptic_deeplab.data.metadata import dataset_meta

    meta = dataset_meta("mapillary_vistas")
    assert (meta.num_classes, len(meta.thing_train_ids)) == (65, 37)
    assert meta.categories[13].name == "Road" and meta.categories[55].name == "Car"
    root = _mapillary_root(tmp_path, "v1.2")
    with pytest.raises(FileNotFoundError) as info:
        convert_mapillary(root, tmp_path / "a", version="v2.0")
    assert str(info.value) == (f"{root} is not a Mapillary Vistas v2.0 root: none of "
                               f"{root / 'training' / 'v2.0' / 'panoptic'} exists")
    with pytest.raises(ValueError, match=r"^Mapillary Vistas version must be one of v1.2, v2.0, got 'v3'"):
        convert_mapillary(root, tmp_path / "a", version="v3")
    with pytest.raises(ValueError, match="^--long-side must be 0 .* got -5"):
        convert_mapillary(root, tmp_path / "a", long_side=-5)
    folder = root / "training" / "panoptic"
    json_path = folder / "panoptic_2018.json"
    data = json_module.loads(json_path.read_text())
    (folder / "panoptic_2020.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=rf"^{folder} holds 2 panoptic_\*\.json files, expected one"):
        convert_mapillary(root, tmp_path / "a")
    (folder / "panoptic_2020.json").unlink()
    first = data["images"][0]
    png = folder / data["annotations"][0]["file_name"]
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(png)
    with pytest.raises(DatasetError, match=rf"^{png}: is 8x8 \(HxW\) but its image "
                                           rf"{root / 'training' / 'images' / first['file_name']} is 64x112"):
        convert_mapillary(root, tmp_path / "b")
    data["annotations"] = data["annotations"][1:]
    json_path.write_text(json_module.dumps(data))
    with pytest.raises(DatasetError, match=rf"^{json_path}: image {first['id']!r} \({first['file_name']}\) has no "
                                           "annotation"):
        convert_mapillary(root, tmp_path / "c")

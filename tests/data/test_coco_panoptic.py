"""COCO panoptic I/O and label-map conversions."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from panoptic_deeplab.data.coco_panoptic import (
    VOID_LABEL,
    CategoryInfo,
    DatasetError,
    DatasetMeta,
    ImageInfo,
    PanopticAnnotation,
    PanopticDataset,
    SegmentInfo,
    ids_to_label_map,
    label_map_to_ids,
    load_annotation,
    load_image,
    load_panoptic_json,
    read_panoptic_png,
    save_panoptic_json,
    segment_areas_bboxes,
    write_panoptic_png,
)
from panoptic_deeplab.data.synthetic import render_synthetic_image, synthetic_meta


@pytest.fixture()
def meta() -> DatasetMeta:
    return DatasetMeta([
        CategoryInfo(5, "road", False, (128, 64, 128)),
        CategoryInfo(17, "car", True, (0, 0, 142)),
        CategoryInfo(40, "person", True, (220, 20, 60)),
    ])


def _partition_equal(a: np.ndarray, b: np.ndarray) -> bool:
    """True when two maps split the pixels into the same regions (up to renaming)."""
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return pairs.shape[1] == len(np.unique(a)) == len(np.unique(b))


def test_png_round_trip_is_exact_including_large_ids(tmp_path):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 256**3, size=(17, 23), dtype=np.int64)
    ids[0, :4] = [0, 65535, 65536, 256**3 - 1]
    path = tmp_path / "sub" / "pan.png"
    write_panoptic_png(path, ids)
    back = read_panoptic_png(path)
    assert back.dtype == np.int32
    np.testing.assert_array_equal(back, ids)
    assert os.listdir(path.parent) == ["pan.png"]  # the temporary file was renamed, not left behind


def test_png_write_replaces_and_rejects_unstorable_ids(tmp_path):
    path = tmp_path / "pan.png"
    write_panoptic_png(path, np.ones((4, 4), dtype=np.int32))
    write_panoptic_png(path, np.full((4, 4), 7, dtype=np.int32))
    assert (read_panoptic_png(path) == 7).all()
    with pytest.raises(ValueError, match="256"):
        write_panoptic_png(path, np.full((2, 2), 256**3))
    with pytest.raises(ValueError, match="256"):
        write_panoptic_png(path, np.full((2, 2), -1))
    assert (read_panoptic_png(path) == 7).all()  # a failed write leaves the old file intact


def test_read_panoptic_png_rejects_non_rgb(tmp_path):
    path = tmp_path / "gray.png"
    Image.fromarray(np.zeros((3, 3), dtype=np.uint8)).save(path)
    with pytest.raises(DatasetError, match=r"gray\.png.*mode 'L'"):
        read_panoptic_png(path)


def test_json_written_then_read_is_equal(tmp_path, meta):
    dataset = PanopticDataset(
        images=[ImageInfo(1, "a.jpg", 10, 20), ImageInfo("city_000001", "b.png", 5, 6)],
        annotations=[
            PanopticAnnotation(1, "a.png", [SegmentInfo(70000, 17, 12, (1, 2, 3, 4), False),
                                            SegmentInfo(3, 40, 5, (0, 0, 1, 5), True)]),
            PanopticAnnotation("city_000001", "b.png", []),
        ],
        meta=meta,
        extra={"info": {"year": 2024}},
    )
    path = tmp_path / "pan.json"
    save_panoptic_json(path, dataset)
    assert load_panoptic_json(path) == dataset
    raw = json.loads(path.read_text())
    assert raw["annotations"][0]["segments_info"][1] == {
        "id": 3, "category_id": 40, "area": 5, "bbox": [0, 0, 1, 5], "iscrowd": 1}
    assert raw["categories"][1] == {"id": 17, "name": "car", "isthing": 1, "color": [0, 0, 142]}


def test_load_json_structural_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"images": [], "annotations": [{"image_id": 1}],
                                "categories": [{"id": 1, "name": "a", "isthing": 0}]}))
    with pytest.raises(DatasetError, match=r"bad\.json.*lacks the field"):
        load_panoptic_json(path)
    path.write_text("{not json")
    with pytest.raises(DatasetError, match=r"bad\.json: cannot read the JSON"):
        load_panoptic_json(path)
    path.write_text(json.dumps({"images": [], "annotations": [], "categories": [
        {"id": 1, "name": "a", "isthing": 0}, {"id": 1, "name": "b", "isthing": 1}]}))
    with pytest.raises(DatasetError, match=r"bad\.json: invalid categories: duplicate category ids"):
        load_panoptic_json(path)
    path.write_text(json.dumps({"images": [], "categories": [{"id": 1, "name": "a", "isthing": 0}],
                                "annotations": [{"image_id": 1, "file_name": "x.png", "segments_info": [
                                    {"id": 4, "category_id": 1, "area": 2.5, "bbox": [0, 0, 1, 1]}]}]}))
    with pytest.raises(DatasetError, match=r"x\.png.*segment 4: area is 2.5"):
        load_panoptic_json(path)


@pytest.mark.parametrize("shape", [(30, 41), (1, 9), (9, 1)])
def test_segment_areas_bboxes_match_a_per_segment_loop(shape):
    rng = np.random.default_rng(1)
    id_map = rng.integers(0, 6, size=shape) * 1000 + 7
    if shape == (30, 41):
        id_map[5:9, 10:30] = 99  # a compact segment besides the scattered ones
    values, areas, bboxes = segment_areas_bboxes(id_map)
    assert values.tolist() == sorted(np.unique(id_map).tolist())
    for v, area, box in zip(values, areas, bboxes):
        ys, xs = np.nonzero(id_map == v)
        assert area == len(ys)
        assert box.tolist() == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    if shape == (30, 41):
        assert bboxes[values.tolist().index(99)].tolist() == [10, 5, 20, 4]


def test_ids_to_label_map_numbers_instances_per_class_in_segment_order(meta):
    ids = np.array([[0, 11, 22, 33],
                    [44, 55, 66, 11]], dtype=np.int32)
    segments = [
        SegmentInfo(11, 5, 2, (1, 0, 3, 2)),        # road (stuff): instance 0
        SegmentInfo(66, 17, 1, (2, 1, 1, 1)),       # car #1
        SegmentInfo(22, 40, 1, (2, 0, 1, 1)),       # person #1
        SegmentInfo(33, 17, 1, (3, 0, 1, 1), True),  # car crowd: instance 0, not counted
        SegmentInfo(44, 17, 1, (0, 1, 1, 1)),       # car #2
        SegmentInfo(55, 40, 1, (1, 1, 1, 1)),       # person #2
    ]
    label = ids_to_label_map(ids, segments, meta)
    assert label.dtype == np.int32
    np.testing.assert_array_equal(label, [[VOID_LABEL, 0, 2001, 1000],
                                          [1002, 2002, 1001, 0]])


def test_ids_to_label_map_names_unknown_ids_and_categories(meta):
    ids = np.array([[1, 2, 2]], dtype=np.int32)
    with pytest.raises(DatasetError, match=r"x\.png: segment 2: present in the PNG \(2 pixels\).*missing"):
        ids_to_label_map(ids, [SegmentInfo(1, 5, 1, (0, 0, 1, 1))], meta, "x.png")
    with pytest.raises(DatasetError, match=r"x\.png: segment 1: unknown category id 6"):
        ids_to_label_map(ids, [SegmentInfo(1, 6, 1, (0, 0, 1, 1))], meta, "x.png")


def test_label_map_to_ids_computes_segments(meta):
    label = np.array([[0, 0, 1001, 1001],
                      [VOID_LABEL, 1000, 1001, 2005]], dtype=np.int32)
    ids, segments = label_map_to_ids(label, meta)
    assert ids[1, 0] == 0 and ids.dtype == np.int32
    by_id = {s.id: s for s in segments}
    assert sorted(by_id) == list(range(1, 5))
    road, crowd, car, person = (by_id[int(ids[0, 0])], by_id[int(ids[1, 1])], by_id[int(ids[0, 2])],
                                by_id[int(ids[1, 3])])
    assert (road.category_id, road.area, road.bbox, road.iscrowd) == (5, 2, (0, 0, 2, 1), False)
    assert (crowd.category_id, crowd.area, crowd.iscrowd) == (17, 1, True)
    assert (car.category_id, car.area, car.bbox, car.iscrowd) == (17, 3, (2, 0, 2, 2), False)
    assert (person.category_id, person.iscrowd) == (40, False)


def test_label_map_to_ids_rejects_labels_outside_the_contract(meta):
    with pytest.raises(ValueError, match="train id 7"):
        label_map_to_ids(np.array([[7001]]), meta)
    with pytest.raises(ValueError, match="stuff class 'road'"):
        label_map_to_ids(np.array([[3]]), meta)


@pytest.mark.parametrize("index", [0, 1, 2, 3])
def test_label_map_ids_round_trip_preserves_partition_classes_and_crowd(index):
    meta = synthetic_meta()
    _, ids, segments = render_synthetic_image(index, "train", seed=3, size=(96, 192))
    label = ids_to_label_map(ids, segments, meta)
    ids2, segments2 = label_map_to_ids(label, meta)
    assert _partition_equal(ids, ids2)
    np.testing.assert_array_equal(ids_to_label_map(ids2, segments2, meta), label)

    def signature(id_map, segs):  # per pixel: category and crowd flag of its segment
        table = {0: (0, -1)} | {s.id: (s.category_id, int(s.iscrowd)) for s in segs}
        values, inverse = np.unique(id_map, return_inverse=True)
        return np.array([table[int(v)] for v in values])[inverse.ravel()]

    np.testing.assert_array_equal(signature(ids, segments), signature(ids2, segments2))
    values, areas, bboxes = segment_areas_bboxes(ids2)
    for s in segments2:
        k = values.tolist().index(s.id)
        assert s.area == areas[k] and list(s.bbox) == bboxes[k].tolist()


def test_load_annotation_returns_the_label_map_and_raises_on_problems(tmp_path, meta):
    ids = np.array([[0, 70000], [70000, 3]], dtype=np.int32)
    write_panoptic_png(tmp_path / "a.png", ids)
    ann = PanopticAnnotation(1, "a.png", [SegmentInfo(70000, 17, 2, (0, 0, 2, 2)),
                                          SegmentInfo(3, 5, 1, (1, 1, 1, 1))])
    image = ImageInfo(1, "a.jpg", 2, 2)
    label = load_annotation(ann, tmp_path, meta, image, image_shape=(2, 2))
    np.testing.assert_array_equal(label, [[VOID_LABEL, 1001], [1001, 0]])
    with pytest.raises(DatasetError, match=r"a\.png.*but its image a\.jpg is 3x2"):
        load_annotation(ann, tmp_path, meta, image, image_shape=(3, 2))
    ann.segments_info[0].area = 5
    with pytest.raises(DatasetError, match=r"a\.png: segment 70000: area is 5 in the JSON but the PNG has 2"):
        load_annotation(ann, tmp_path, meta, image)


def test_load_image_reports_missing_and_truncated_files(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "im.png"
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    assert load_image(path).shape == (32, 32, 3)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DatasetError, match=r"im\.png: unreadable or truncated"):
        load_image(path)
    with pytest.raises(DatasetError, match=r"nope\.jpg: file not found"):
        load_image(tmp_path / "nope.jpg")


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height pixels, with almost no data behind it."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 10)) + \
        chunk(b"IEND", b"")


def test_png_declaring_huge_dimensions_is_a_clear_error(tmp_path):
    from panoptic_deeplab.data.converters.common import read_label_map

    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(100000, 100000))
    for reader in (load_image, read_panoptic_png, read_label_map):
        with pytest.raises(DatasetError, match=rf"^{path}: declares more pixels than PIL reads by default "
                                               r"\(Image size \(10000000000 pixels\) exceeds limit"):
            reader(path)


def test_image_readers_on_damaged_files_give_an_image_or_a_clear_error(tmp_path_factory):
    """Property: any byte-level damage to a PNG or JPEG (truncation, random bytes, a changed magic number or header)
    gives either a correct-looking image or a DatasetError that names the file; never another exception."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from panoptic_deeplab.data.converters.common import read_label_map

    folder = tmp_path_factory.mktemp("fuzz")
    rng = np.random.default_rng(0)
    originals = {}
    for suffix in (".png", ".jpg"):
        Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)).save(folder / f"source{suffix}")
        originals[suffix] = (folder / f"source{suffix}").read_bytes()

    @settings(max_examples=150, deadline=None, derandomize=True)
    @given(suffix=st.sampled_from(sorted(originals)), cut=st.integers(0, 2000),
           flips=st.lists(st.tuples(st.integers(0, 3000), st.integers(0, 255)), max_size=6),
           header=st.sampled_from([None, (1, 1), (0, 5), (70000, 70000), (2**31 - 1, 3)]))
    def check(suffix, cut, flips, header):
        data = bytearray(originals[suffix])
        if header is not None and suffix == ".png":
            data = bytearray(_png_header_only(*header))
        for position, value in flips:
            if position < len(data):
                data[position] = value
        data = data[: len(data) - cut] if cut < len(data) else data[:1]
        path = folder / f"damaged{suffix}"
        path.write_bytes(bytes(data))
        for reader in (load_image, read_panoptic_png, read_label_map):
            try:
                array = reader(path)
            except DatasetError as exc:
                assert str(path) in str(exc)
            else:
                assert array.ndim in (2, 3) and array.size > 0

    check()

"""``convert-dataset --from coco-instances``: COCO instance annotations (the detection JSON: one polygon list or RLE
per object) and, optionally, stuff maps -> COCO panoptic.

Things: every annotation is one segment of its category, ``iscrowd`` kept. Instance annotations may overlap
(COCO's do; panopticapi's ``converters/detection2panoptic_coco_format.py`` stops at the first overlap). The rule
here: a pixel covered by several non-crowd annotations goes to the one with the smallest mask (a small object
usually lies in front of a large one, which would otherwise hide it), ties to the lower annotation id; crowd
regions keep only pixels that no non-crowd annotation covers (by the same rule among crowds). An annotation left
without pixels is dropped and counted.

Stuff (``--stuff DIR``, optional): per image a map ``<stem>.png`` (or ``.tif`` / ``.npy``) of category ids, like
COCO-Stuff's pixel maps, for the pixels that no annotation covers; its categories come from ``--categories``
(entries with ``isthing: 0``). In that map the ``--ignore-label`` value and thing categories (COCO-Stuff's maps
carry them) are void: things come from the annotations only. Without stuff maps those pixels are void.

Segment ids: 1, 2, ... for the kept annotations in id order, then one per stuff class present, by category id.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from tqdm import tqdm

from panoptic_deeplab.data.coco_panoptic import (
    DatasetError,
    DatasetMeta,
    Problem,
    SegmentInfo,
)

from .common import (
    ConvertedSplit,
    SplitWriter,
    existing_folder,
    find_label_map,
    measure_segments,
    read_categories,
    read_label_map,
)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"instances JSON {path} {'is a directory' if path.is_dir() else 'does not exist'}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(Problem(str(path), f"not a JSON file ({exc})")) from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations",
                                                                                      "categories")):
        raise DatasetError(Problem(str(path), "not a COCO instances JSON: it needs the lists 'images', "
                                   "'annotations' and 'categories'"))
    return data


def _categories(data: dict[str, Any], json_path: Path, categories_file: str | os.PathLike[str] | None) -> DatasetMeta:
    """The JSON's categories as things, with the categories file's stuff (and its colours, and thing categories
    that no annotation uses)."""
    try:
        things = DatasetMeta.from_json({**c, "isthing": 1} for c in data["categories"])
    except (ValueError, TypeError, KeyError) as exc:
        raise DatasetError(Problem(str(json_path), f"categories: {exc}")) from None
    if categories_file is None:
        return things
    listed = {c.id: c for c in read_categories(categories_file).categories}
    merged = []
    for thing in things.categories:
        other = listed.pop(thing.id, None)
        if other is not None and not other.isthing:
            raise DatasetError(Problem(str(categories_file), f"category {thing.id} ({other.name}) is stuff here but "
                                       f"an instance category in {json_path}"))
        merged.append(other or thing)
    return DatasetMeta(merged + list(listed.values()))


def _decode_compressed_counts(text: str) -> list[int]:
    """Run lengths of a compressed COCO RLE string (the encoding of pycocotools' maskApi.c ``rleFrString``: 5 bits
    per character from '0', a continuation bit, sign-extended, each count after the second stored as the difference
    to the count two before it). Decoded here so that malformed counts become an error, not a write past the mask."""
    counts: list[int] = []
    position = 0
    while position < len(text):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(text):
                raise ValueError("the counts string ends inside a number")
            char = ord(text[position]) - 48
            if not 0 <= char < 64:
                raise ValueError(f"character {text[position]!r} is not in the RLE alphabet")
            value |= (char & 0x1F) << shift
            more = bool(char & 0x20)
            position += 1
            shift += 5
            if not more and char & 0x10:
                value -= 1 << shift
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Boolean mask ``[height, width]`` of a COCO ``segmentation``: polygons (rasterised by pycocotools), an
    uncompressed RLE (list of counts) or a compressed one (string). ValueError says what is wrong."""
    if isinstance(segmentation, list):
        if not segmentation or not all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0
                                       and all(isinstance(v, (int, float)) for v in p) for p in segmentation):
            raise ValueError("polygons must be lists of x, y numbers, at least 3 points each")
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
        segmentation = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    elif not isinstance(segmentation, dict) or "counts" not in segmentation or "size" not in segmentation:
        raise ValueError("segmentation is neither polygons nor an RLE {size, counts}")
    if list(segmentation["size"]) != [height, width]:
        raise ValueError(f"RLE size {list(segmentation['size'])} but the image is {height}x{width} (HxW)")
    counts = segmentation["counts"]
    if isinstance(counts, str):
        counts = _decode_compressed_counts(counts)
    if not isinstance(counts, list) or not all(isinstance(c, int) and c >= 0 for c in counts):
        raise ValueError("RLE counts must be non-negative integers")
    if sum(counts) != height * width:
        raise ValueError(f"RLE counts cover {sum(counts)} pixels, the image has {height * width}")
    # Runs alternate 0, 1, 0, ... over the pixels in column-major order.
    runs = np.repeat(np.arange(len(counts)) % 2 == 1, counts)
    return runs.reshape(width, height).T


def _paint_things(annotations: list[dict[str, Any]], height: int, width: int, context: str) -> np.ndarray:
    """Index map (0 = no annotation, k = annotations[k - 1]) by the overlap rule (module doc)."""
    masks = []
    for annotation in annotations:
        try:
            masks.append(decode_segmentation(annotation["segmentation"], height, width))
        except ValueError as exc:
            raise DatasetError(Problem(context, f"annotation {annotation['id']}: {exc}")) from None
    index = np.zeros((height, width), dtype=np.int64)
    # Painted last wins: crowds before instances, larger before smaller, higher id before lower.
    order = sorted(range(len(annotations)), key=lambda k: (not annotations[k].get("iscrowd", 0),
                                                           -int(masks[k].sum()), -annotations[k]["id"]))
    for k in order:
        index[masks[k]] = k + 1
    return index


def convert_coco_instances(
    images: str | os.PathLike[str],
    instances_json: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    split: str = "train",
    stuff: str | os.PathLike[str] | None = None,
    categories: str | os.PathLike[str] | None = None,
    ignore_label: int = 255,
    copy_images: bool = False,
    progress: bool = False,
) -> ConvertedSplit:
    """Write ``out_dir/<split>`` (COCO panoptic) from a COCO instances JSON, its image folder and optional stuff
    maps (rules: module doc)."""
    json_path = Path(instances_json)
    data = _read_json(json_path)
    image_dir = existing_folder(images, "--images")
    stuff_dir = existing_folder(stuff, "--stuff") if stuff is not None else None
    if stuff_dir is not None and categories is None:
        raise ValueError("--stuff needs --categories: the stuff maps' category ids, names and isthing 0")
    meta = _categories(data, json_path, categories)
    stuff_ids = np.array([c.id for c in meta.categories if not c.isthing])
    thing_ids = {c.id for c in meta.categories if c.isthing}
    image_ids = {im.get("id") for im in data["images"]}
    by_image: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for number, annotation in enumerate(data["annotations"], start=1):
        where = f"{json_path}: annotation {annotation.get('id', f'number {number}')}"
        missing = [k for k in ("id", "image_id", "category_id", "segmentation") if k not in annotation]
        if missing:
            raise DatasetError(Problem(where, f"lacks {', '.join(missing)}"))
        if annotation["category_id"] not in thing_ids:
            raise DatasetError(Problem(where, f"unknown category id {annotation['category_id']}"))
        if annotation["image_id"] not in image_ids:
            raise DatasetError(Problem(where, f"unknown image id {annotation['image_id']}"))
        by_image[annotation["image_id"]].append(annotation)

    writer = SplitWriter(out_dir, split, meta, copy_images)
    dropped = 0
    for image in tqdm(data["images"], desc=f"convert {split}", unit="image", disable=not progress):
        try:
            image_path, height, width = image_dir / image["file_name"], int(image["height"]), int(image["width"])
        except (KeyError, TypeError, ValueError):
            raise DatasetError(Problem(str(json_path), f"image entry {image!r} needs id, file_name, height and "
                                       "width")) from None
        annotations = sorted(by_image.get(image["id"], []), key=lambda a: a["id"])
        context = f"{json_path}: image {image['id']}"
        index = _paint_things(annotations, height, width, context)
        ids = np.zeros((height, width), dtype=np.int64)
        kept: list[tuple[int, dict[str, Any]]] = []
        for k, annotation in enumerate(annotations, start=1):
            pixels = index == k
            if pixels.any():
                kept.append((len(kept) + 1, annotation))
                ids[pixels] = len(kept)
            else:
                dropped += 1
        stuff_classes: list[int] = []
        if stuff_dir is not None:
            stuff_path = find_label_map(stuff_dir, Path(image["file_name"]).stem, "stuff map")
            context = str(stuff_path)
            stuff_map = read_label_map(stuff_path)
            if stuff_map.shape != (height, width):
                raise DatasetError(Problem(context, f"is {stuff_map.shape[0]}x{stuff_map.shape[1]} (HxW) but "
                                           f"{json_path} gives image {image['id']} as {height}x{width}"))
            unknown = ~np.isin(stuff_map, [*stuff_ids.tolist(), *thing_ids, ignore_label])
            if unknown.any():
                raise DatasetError(Problem(context, f"unknown class id(s) {np.unique(stuff_map[unknown])[:5].tolist()}; "
                                           f"the stuff categories are {stuff_ids.tolist()}, {ignore_label} is void "
                                           "(--ignore-label)"))
            free = (ids == 0) & np.isin(stuff_map, stuff_ids)
            for category_id in np.unique(stuff_map[free]).tolist():
                stuff_classes.append(category_id)
                ids[free & (stuff_map == category_id)] = len(kept) + len(stuff_classes)
        measured = measure_segments(ids)
        segments = [SegmentInfo(number, int(annotation["category_id"]), *measured[number],
                                bool(annotation.get("iscrowd", 0))) for number, annotation in kept]
        segments += [SegmentInfo(len(kept) + k, category_id, *measured[len(kept) + k], False)
                     for k, category_id in enumerate(stuff_classes, start=1)]
        writer.add_segments(image_path, ids, segments, image["id"], f"{Path(image['file_name']).stem}.png", context)
    written = writer.finish({"description": "converted by panoptic-deeplab convert-dataset --from coco-instances",
                             "source": str(json_path.resolve())})
    return dataclasses.replace(written, dropped_segments=dropped)

"""What every dataset converter shares: the categories file, reading label maps, turning a (class, instance)
pair of maps into COCO panoptic segments, and writing the split.

The split goes where ``make-synthetic`` puts its splits and where the README's layout expects one::

    OUT/<split>/images/          the images (symbolic links to the originals, or copies)
    OUT/<split>/panoptic/*.png   one PNG per image: segment id = R + 256 G + 256^2 B, 0 = void
    OUT/<split>/panoptic_<split>.json

Segments from a class map and an instance map (:func:`segments_from_maps`): each stuff class present in an image
is one segment (its instance ids are ignored); each (thing class, instance id > 0) pair is one instance
segment; thing pixels with instance id 0 are the class's crowd region (one ``iscrowd: 1`` segment), the
Cityscapes and COCO convention for "many instances, not separated". Pixels whose class is the ignore value are
void (segment id 0). Segment ids are 1, 2, ... in order of (class, instance).
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from panoptic_deeplab.atomic import write_atomic
from panoptic_deeplab.data.coco_panoptic import (
    DatasetError,
    DatasetMeta,
    ImageInfo,
    PanopticAnnotation,
    PanopticDataset,
    Problem,
    SegmentInfo,
    load_image,
    save_panoptic_json,
    segment_areas_bboxes,
    too_many_pixels,
    write_panoptic_png,
)

# Label maps: single-channel PNG (8 or 16 bit) or TIFF (32 bit), or a numpy array file.
LABEL_MAP_EXTENSIONS = (".png", ".tif", ".tiff", ".npy")


def read_categories(path: str | os.PathLike[str]) -> DatasetMeta:
    """A categories file: YAML or JSON, a list of ``{id, name, isthing[, color]}`` or ``{"categories": [...]}``
    (a COCO JSON's own list reads as is). Categories without a color get a distinct one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"categories file {path} {'is a directory' if path.is_dir() else 'does not exist'}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))  # YAML reads JSON too
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ValueError(f"categories file {path} is neither YAML nor JSON: {exc}") from None
    if isinstance(data, dict) and "categories" in data:
        data = data["categories"]
    if not isinstance(data, list) or not data:
        raise ValueError(f"categories file {path} must hold a list of categories (id, name, isthing[, color]), "
                         f"or an object with such a list under 'categories'")
    palette = np.random.default_rng(0).integers(40, 256, size=(len(data), 3))
    entries = []
    for index, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise ValueError(f"categories file {path}: entry {index + 1} is {entry!r}, expected id, name, isthing")
        entries.append({"color": [int(v) for v in palette[index]], **entry})
    try:
        return DatasetMeta.from_json(entries)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"categories file {path}: {exc}") from None


def read_label_map(path: str | os.PathLike[str]) -> np.ndarray:
    """An integer map ``[H, W]`` int64 from a single-channel PNG / TIFF or a ``.npy`` file; clear errors naming
    the file for colour images, float arrays, other shapes and unreadable files."""
    path = Path(path)
    if path.suffix.lower() == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DatasetError(Problem(str(path), f"not a readable .npy array ({exc})")) from None
        if not np.issubdtype(array.dtype, np.integer):
            raise DatasetError(Problem(str(path), f"holds {array.dtype} values, expected integers"))
    else:
        try:
            image = Image.open(path)
            image.load()
        except FileNotFoundError:
            raise DatasetError(Problem(str(path), "file not found")) from None
        except Image.DecompressionBombError as exc:
            raise DatasetError(Problem(str(path), too_many_pixels(exc))) from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise DatasetError(Problem(str(path), f"unreadable or truncated image ({exc})")) from None
        if image.mode not in ("L", "I", "I;16", "I;16B", "I;16L", "P"):
            raise DatasetError(Problem(str(path), f"is a {image.mode} image: a label map has one integer channel "
                                       "(8/16-bit grayscale PNG, 32-bit TIFF or .npy)"))
        array = np.asarray(image)
    if array.ndim != 2:
        raise DatasetError(Problem(str(path), f"has shape {tuple(array.shape)}, expected a 2-D [H, W] map"))
    return array.astype(np.int64)


def existing_folder(path: str | os.PathLike[str], option: str) -> Path:
    """``path`` as a Path, or the error naming ``option`` when it is not a folder."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{option} folder {path} does not exist")
    return path


def find_label_map(folder: Path, stem: str, what: str) -> Path:
    """The file of ``folder`` named ``stem`` with a label-map extension; a clear error when none or several."""
    found = [folder / f"{stem}{ext}" for ext in LABEL_MAP_EXTENSIONS if (folder / f"{stem}{ext}").is_file()]
    if not found:
        raise DatasetError(Problem(str(folder), f"no {what} for image {stem!r} (looked for {stem}"
                                   f"{{{','.join(LABEL_MAP_EXTENSIONS)}}})"))
    if len(found) > 1:
        raise DatasetError(Problem(str(folder), f"several {what}s for image {stem!r}: "
                                   f"{', '.join(p.name for p in found)}"))
    return found[0]


def segments_from_maps(
    classes: np.ndarray,
    instances: np.ndarray,
    meta: DatasetMeta,
    ignore_label: int,
    context: str,
) -> tuple[np.ndarray, list[SegmentInfo]]:
    """Segment id map (0 = void) and segments of a class map (category ids) and an instance map (module doc)."""
    if classes.shape != instances.shape:
        raise DatasetError(Problem(context, f"class map is {classes.shape[0]}x{classes.shape[1]} but instance map is "
                                   f"{instances.shape[0]}x{instances.shape[1]}"))
    if instances.size and int(instances.min()) < 0:
        raise DatasetError(Problem(context, f"negative instance id {int(instances.min())}"))
    known = np.array([c.id for c in meta.categories])
    # A lookup over the pixels (np.isin's table for integers), not a sort: the segments' own np.unique follows.
    unknown_pixels = ~np.isin(classes, [*known.tolist(), ignore_label])
    if unknown_pixels.any():
        values, counts = np.unique(classes[unknown_pixels], return_counts=True)
        listed = ", ".join(f"{v} ({n} pixels)" for v, n in zip(values.tolist()[:5], counts.tolist()))
        raise DatasetError(Problem(context, f"unknown class id(s) {listed}; the categories file declares "
                                   f"{known.tolist()} and {ignore_label} is void (--ignore-label)"))
    thing_ids = np.array([c.id for c in meta.categories if c.isthing])
    # One key per segment: class * span + instance for things, class * span for stuff; void -1, sorting first.
    span = int(instances.max(initial=0)) + 1
    key = np.where(classes == ignore_label, -1, classes * span + np.where(np.isin(classes, thing_ids), instances, 0))
    keys, inverse = np.unique(key, return_inverse=True)
    has_void = bool(keys[0] == -1)
    ids = inverse.reshape(classes.shape) + int(not has_void)  # segment ids 1.. in key order, void 0
    keys = keys[int(has_void):]
    values, areas, boxes = segment_areas_bboxes(ids)
    if has_void:
        values, areas, boxes = values[1:], areas[1:], boxes[1:]
    segments = []
    for value, segment_key, area, box in zip(values, keys, areas, boxes):
        category_id, instance = divmod(int(segment_key), span)
        crowd = bool(category_id in thing_ids and instance == 0)
        segments.append(SegmentInfo(int(value), category_id, int(area), tuple(int(v) for v in box), crowd))
    return ids, segments


def measure_segments(ids: np.ndarray) -> dict[int, tuple[int, tuple[int, int, int, int]]]:
    """``{segment id: (area, bbox (x, y, w, h))}`` of every value of a segment id map, void 0 included."""
    values, areas, boxes = segment_areas_bboxes(ids)
    return {int(v): (int(a), tuple(int(x) for x in b)) for v, a, b in zip(values, areas, boxes)}  # type: ignore[misc]


@dataclass(frozen=True)
class ConvertedSplit:
    """What a converter wrote: the three paths ``validate`` and the config's ``data.<split>`` take, and counts."""

    json_path: Path
    png_dir: Path
    image_dir: Path
    images: int
    stuff_segments: int
    thing_segments: int
    crowd_segments: int
    # segments left without pixels: annotations others cover entirely (coco-instances), segments too small for
    # the resizing (mapillary)
    dropped_segments: int = 0


class SplitWriter:
    """Writes one COCO panoptic split (layout: module doc), one image at a time."""

    def __init__(self, out_dir: str | os.PathLike[str], split: str, meta: DatasetMeta, copy_images: bool = False):
        if not re.fullmatch(r"[A-Za-z0-9_-]+", split):
            raise ValueError(f"split name {split!r} must be letters, digits, '_' or '-'")
        root = Path(out_dir) / split
        self.json_path, self.png_dir, self.image_dir = root / f"panoptic_{split}.json", root / "panoptic", root / "images"
        self.meta, self.split, self.copy_images = meta, split, copy_images
        self.png_dir.mkdir(parents=True, exist_ok=True)
        self.image_dir.mkdir(parents=True, exist_ok=True)
        self._images: list[ImageInfo] = []
        self._annotations: list[PanopticAnnotation] = []
        self._names: set[str] = set()

    def add(self, image_path: Path, classes: np.ndarray, instances: np.ndarray, ignore_label: int,
            label_context: str) -> None:
        """Convert one image's class and instance maps (rules: module doc) and add it."""
        size = self._image_size(image_path, classes.shape, label_context)
        ids, segments = segments_from_maps(classes, instances, self.meta, ignore_label, label_context)
        self._add(image_path, size, ids, segments, len(self._images), f"{image_path.stem}.png")

    def add_segments(self, image_path: Path, ids: np.ndarray, segments: list[SegmentInfo], image_id: int | str,
                     png_name: str, label_context: str) -> None:
        """Add one image with its segment id map and segments as they are."""
        size = self._image_size(image_path, ids.shape, label_context)
        self._add(image_path, size, ids, segments, image_id, png_name)

    def add_image_array(self, file_name: str, image: np.ndarray, ids: np.ndarray, segments: list[SegmentInfo],
                        image_id: int | str, png_name: str) -> None:
        """Add one image given as pixels (a resized copy), written as ``file_name`` (JPEG at quality 95 or PNG, by
        its suffix), with its segment id map and segments as they are."""
        if file_name in self._names:
            raise DatasetError(Problem(file_name, "a second image of this file name"))
        jpeg = Path(file_name).suffix.lower() in (".jpg", ".jpeg")
        target = self.image_dir / file_name
        if target.is_symlink():
            target.unlink()
        write_atomic(target, lambda f: Image.fromarray(image).save(f, format="JPEG" if jpeg else "PNG",
                                                                   **({"quality": 95} if jpeg else {})))
        self._record(file_name, image.shape[:2], ids, segments, image_id, png_name)

    def _image_size(self, image_path: Path, label_shape: tuple[int, ...], label_context: str) -> tuple[int, int]:
        """(height, width) of a new image, equal to its labels'; decoding it in full finds truncated files now."""
        if image_path.name in self._names:
            raise DatasetError(Problem(str(image_path), "a second image of this file name"))
        height, width = load_image(image_path).shape[:2]
        if tuple(label_shape) != (height, width):
            raise DatasetError(Problem(label_context, f"is {label_shape[0]}x{label_shape[1]} (HxW) but its image "
                                       f"{image_path} is {height}x{width}"))
        return height, width

    def _add(self, image_path: Path, size: tuple[int, int], ids: np.ndarray, segments: list[SegmentInfo],
             image_id: int | str, png_name: str) -> None:
        """Link (or copy) the image under its own name, write the PNG, record both."""
        target = self.image_dir / image_path.name
        if target.is_symlink() or target.exists():
            target.unlink()
        if self.copy_images:
            shutil.copyfile(image_path, target)
        else:
            try:
                target.symlink_to(image_path.resolve())
            except OSError:  # file systems without symbolic links
                shutil.copyfile(image_path, target)
        self._record(image_path.name, size, ids, segments, image_id, png_name)

    def _record(self, file_name: str, size: tuple[int, int], ids: np.ndarray, segments: list[SegmentInfo],
                image_id: int | str, png_name: str) -> None:
        write_panoptic_png(self.png_dir / png_name, ids)
        self._names.add(file_name)
        self._images.append(ImageInfo(image_id, file_name, *size))
        self._annotations.append(PanopticAnnotation(image_id, png_name, segments))

    def finish(self, info: dict[str, Any]) -> ConvertedSplit:
        """Write the JSON (atomically) and count the segments."""
        if not self._images:
            raise ValueError("no image was converted: the split would be empty")
        save_panoptic_json(self.json_path, PanopticDataset(self._images, self._annotations, self.meta,
                                                           {"info": {**info, "split": self.split}}))
        segments = [s for a in self._annotations for s in a.segments_info]
        things = {c.id for c in self.meta.categories if c.isthing}
        return ConvertedSplit(
            self.json_path, self.png_dir, self.image_dir, len(self._images),
            stuff_segments=sum(1 for s in segments if s.category_id not in things),
            thing_segments=sum(1 for s in segments if s.category_id in things and not s.iscrowd),
            crowd_segments=sum(1 for s in segments if s.iscrowd),
        )

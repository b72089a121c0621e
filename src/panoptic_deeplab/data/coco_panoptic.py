"""COCO panoptic format: PNG ids, JSON annotations, category metadata and label maps.

See docs/ARCHITECTURE.md for the label-map representation shared by every stage.

* Files: :func:`read_panoptic_png` / :func:`write_panoptic_png` (ids ``R + 256 G + 256^2 B``, 0 = void),
  :func:`load_panoptic_json` / :func:`save_panoptic_json` (typed as :class:`PanopticDataset`),
  :func:`load_image`. Writes are atomic (temporary file + ``os.replace``).
* Conversions: :func:`ids_to_label_map` and :func:`label_map_to_ids`; :func:`segment_areas_bboxes`.
* Checks: :func:`annotation_problems` lists every defect of one annotation; :func:`load_annotation`
  (what datasets use) raises :class:`DatasetError` on the first one. Whole-dataset validation is in
  :mod:`panoptic_deeplab.data.validate`.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image

from panoptic_deeplab.atomic import write_atomic

LABEL_DIVISOR = 1000
IGNORE_LABEL = 255
VOID_LABEL = IGNORE_LABEL * LABEL_DIVISOR
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def rgb2id(rgb: np.ndarray) -> np.ndarray:
    """Panoptic PNG colors ``[H, W, 3]`` -> segment ids ``R + 256 G + 256^2 B`` (int32)."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an [H, W, 3] RGB array, got shape {tuple(rgb.shape)}")
    if rgb.dtype != np.uint8:  # wider values may exceed 255: the arithmetic form, not byte packing
        rgb = rgb.astype(np.int32)
        return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]
    # Bytes R, G, B of a pixel are the low 3 bytes of the little-endian 32-bit word starting at that pixel, so one
    # pass of overlapping word reads (stride 3) and a mask gives the ids, several times faster than widening the
    # three channels. The last pixel's word would read past the buffer: it is done on its own.
    rgb = np.ascontiguousarray(rgb)  # copies only strided input, e.g. the RGB part of an RGBA image
    h, w, _ = rgb.shape
    ids = np.empty(h * w, dtype=np.int32)
    if ids.size:
        words = np.ndarray((ids.size - 1,), dtype="<u4", buffer=rgb, strides=(3,))
        np.bitwise_and(words, 0xFFFFFF, out=ids[:-1], casting="unsafe")  # < 2^24: exact in int32
        r, g, b = rgb[-1, -1].tolist()
        ids[-1] = r + 256 * g + 256 * 256 * b
    return ids.reshape(h, w)


def id2rgb(ids: np.ndarray) -> np.ndarray:
    """Segment ids ``[H, W]`` -> panoptic PNG colors ``[H, W, 3]`` (uint8)."""
    ids = np.asarray(ids)
    if ids.min(initial=0) < 0 or ids.max(initial=0) >= 256**3:
        raise ValueError("segment ids must lie in [0, 256^3) to be stored in a panoptic PNG")
    ids = ids.astype(np.int64)
    return np.stack([ids % 256, (ids // 256) % 256, ids // (256 * 256)], axis=-1).astype(np.uint8)


@dataclass(frozen=True)
class CategoryInfo:
    """One category as declared in a COCO panoptic JSON."""

    id: int
    name: str
    isthing: bool
    color: tuple[int, int, int] = (0, 0, 0)
    supercategory: str = ""

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> "CategoryInfo":
        missing = [k for k in ("id", "name", "isthing") if k not in entry]
        if missing:
            raise ValueError(f"category {entry!r} lacks the field(s) {missing}")
        color = tuple(int(c) for c in entry.get("color", (0, 0, 0)))
        if len(color) != 3:
            raise ValueError(f"category {entry['id']} has color {entry.get('color')!r}, expected [r, g, b]")
        return cls(
            id=int(entry["id"]),
            name=str(entry["name"]),
            isthing=bool(entry["isthing"]),
            color=color,  # type: ignore[arg-type]
            supercategory=str(entry.get("supercategory", "")),
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "name": self.name,
            "isthing": int(self.isthing),
            "color": list(self.color),
        }
        if self.supercategory:
            out["supercategory"] = self.supercategory
        return out


@dataclass
class DatasetMeta:
    """Categories of a dataset and the mapping between dataset category ids and train ids.

    Train ids are contiguous ``0 .. num_classes-1`` in the order of increasing category id.
    """

    categories: list[CategoryInfo]
    label_divisor: int = LABEL_DIVISOR
    ignore_label: int = IGNORE_LABEL
    category_to_train: dict[int, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.categories = sorted(self.categories, key=lambda c: c.id)
        ids = [c.id for c in self.categories]
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate category ids in {ids}")
        if not self.categories:
            raise ValueError("a dataset needs at least one category")
        if len(self.categories) >= self.ignore_label:
            raise ValueError(
                f"{len(self.categories)} categories: at most {self.ignore_label - 1} are supported "
                f"because train id {self.ignore_label} means void"
            )
        self.category_to_train = {c.id: i for i, c in enumerate(self.categories)}

    @classmethod
    def from_json(cls, categories: Iterable[dict[str, Any]]) -> "DatasetMeta":
        return cls([CategoryInfo.from_json(c) for c in categories])

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    @property
    def thing_train_ids(self) -> list[int]:
        return [i for i, c in enumerate(self.categories) if c.isthing]

    @property
    def stuff_train_ids(self) -> list[int]:
        return [i for i, c in enumerate(self.categories) if not c.isthing]

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.categories]

    @property
    def colors(self) -> list[tuple[int, int, int]]:
        return [c.color for c in self.categories]

    @property
    def void_label(self) -> int:
        return self.ignore_label * self.label_divisor

    def train_id(self, category_id: int, context: str = "") -> int:
        """Train id of a dataset category id; unknown ids raise naming ``context`` (a file, a segment)."""
        try:
            return self.category_to_train[int(category_id)]
        except KeyError:
            where = f"{context}: " if context else ""
            raise ValueError(
                f"{where}unknown category id {category_id}; known ids are {sorted(self.category_to_train)}"
            ) from None

    def category_id(self, train_id: int) -> int:
        if not 0 <= train_id < self.num_classes:
            raise ValueError(f"train id {train_id} outside 0..{self.num_classes - 1}")
        return self.categories[train_id].id

    def is_thing_train_id(self, train_id: int) -> bool:
        return self.categories[train_id].isthing

    def to_json(self) -> list[dict[str, Any]]:
        return [c.to_json() for c in self.categories]


def thing_mask_lookup(thing_ids: Sequence[int], num_entries: int = IGNORE_LABEL + 1) -> np.ndarray:
    """Boolean lookup table ``is_thing[train_id]`` (void included, False)."""
    table = np.zeros(num_entries, dtype=bool)
    table[list(thing_ids)] = True
    return table


# ---------------------------------------------------------------------------------------------
# Errors


@dataclass(frozen=True)
class Problem:
    """One defect found in a dataset: the file concerned, the segment if any, and what is wrong."""

    file: str
    message: str
    segment_id: int | None = None

    def __str__(self) -> str:
        segment = f"segment {self.segment_id}: " if self.segment_id is not None else ""
        return f"{self.file}: {segment}{self.message}"


class DatasetError(ValueError):
    """A dataset file is missing, unreadable or inconsistent; the message names the file (and segment).

    Constructed from a :class:`Problem` (kept as ``.problem``) or from a plain message, so that it can be
    re-raised from a single string (as DataLoader workers do).
    """

    def __init__(self, problem: Problem | str) -> None:
        self.problem = problem if isinstance(problem, Problem) else None
        super().__init__(str(problem))


# ---------------------------------------------------------------------------------------------
# Typed JSON representation


def _require(entry: Any, keys: Sequence[str], what: str, context: str) -> None:
    if not isinstance(entry, dict):
        raise DatasetError(Problem(context, f"{what} {entry!r} is not a JSON object"))
    missing = [k for k in keys if k not in entry]
    if missing:
        raise DatasetError(Problem(context, f"{what} {_short(entry)} lacks the field(s) {missing}"))


def _short(entry: Any, limit: int = 120) -> str:
    text = repr(entry)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _as_int(value: Any, what: str, context: str, segment_id: int | None = None) -> int:
    """JSON numbers to int; integral floats (``12.0``) are accepted, anything else is an error."""
    try:
        as_float = float(value)
    except (TypeError, ValueError):
        raise DatasetError(Problem(context, f"{what} is {value!r}, expected an integer", segment_id)) from None
    if not as_float.is_integer():
        raise DatasetError(Problem(context, f"{what} is {value!r}, expected an integer", segment_id))
    return int(as_float)


@dataclass
class SegmentInfo:
    """One entry of an annotation's ``segments_info``; ``bbox`` is ``(x, y, w, h)`` in pixels."""

    id: int
    category_id: int
    area: int
    bbox: tuple[int, int, int, int]
    iscrowd: bool = False

    @classmethod
    def from_json(cls, entry: dict[str, Any], context: str = "") -> "SegmentInfo":
        _require(entry, ("id", "category_id"), "segment", context)
        seg_id = _as_int(entry["id"], "id", context)
        bbox = entry.get("bbox", (0, 0, 0, 0))
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            raise DatasetError(Problem(context, f"bbox is {bbox!r}, expected [x, y, w, h]", seg_id))
        iscrowd = _as_int(entry.get("iscrowd", 0), "iscrowd", context, seg_id)
        if iscrowd not in (0, 1):
            raise DatasetError(Problem(context, f"iscrowd is {iscrowd}, expected 0 or 1", seg_id))
        return cls(
            id=seg_id,
            category_id=_as_int(entry["category_id"], "category_id", context, seg_id),
            area=_as_int(entry.get("area", 0), "area", context, seg_id),
            bbox=tuple(_as_int(v, "bbox", context, seg_id) for v in bbox),  # type: ignore[arg-type]
            iscrowd=bool(iscrowd),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "id": int(self.id),
            "category_id": int(self.category_id),
            "area": int(self.area),
            "bbox": [int(v) for v in self.bbox],
            "iscrowd": int(self.iscrowd),
        }


@dataclass
class ImageInfo:
    """One entry of ``images``. Ids may be ints (COCO) or strings (Cityscapes)."""

    id: int | str
    file_name: str
    height: int
    width: int

    @classmethod
    def from_json(cls, entry: dict[str, Any], context: str = "") -> "ImageInfo":
        _require(entry, ("id", "file_name", "height", "width"), "image", context)
        return cls(
            id=entry["id"],
            file_name=str(entry["file_name"]),
            height=_as_int(entry["height"], f"height of image {entry['id']!r}", context),
            width=_as_int(entry["width"], f"width of image {entry['id']!r}", context),
        )

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "file_name": self.file_name, "height": int(self.height), "width": int(self.width)}


@dataclass
class PanopticAnnotation:
    """One entry of ``annotations``: the PNG ``file_name`` and its segments."""

    image_id: int | str
    file_name: str
    segments_info: list[SegmentInfo] = field(default_factory=list)

    @classmethod
    def from_json(cls, entry: dict[str, Any], context: str = "") -> "PanopticAnnotation":
        _require(entry, ("image_id", "file_name", "segments_info"), "annotation", context)
        where = f"{context} (annotation {entry['file_name']})" if context else str(entry["file_name"])
        if not isinstance(entry["segments_info"], list):
            raise DatasetError(Problem(where, "segments_info is not a list"))
        return cls(
            image_id=entry["image_id"],
            file_name=str(entry["file_name"]),
            segments_info=[SegmentInfo.from_json(s, where) for s in entry["segments_info"]],
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "image_id": self.image_id,
            "file_name": self.file_name,
            "segments_info": [s.to_json() for s in self.segments_info],
        }


@dataclass
class PanopticDataset:
    """A COCO panoptic JSON file: images, annotations and categories (as :class:`DatasetMeta`).

    Top-level keys other than the three (``info``, ``licenses``) are kept verbatim in ``extra``.
    """

    images: list[ImageInfo]
    annotations: list[PanopticAnnotation]
    meta: DatasetMeta
    extra: dict[str, Any] = field(default_factory=dict)

    def image_by_id(self) -> dict[int | str, ImageInfo]:
        return {im.id: im for im in self.images}

    def to_json(self) -> dict[str, Any]:
        out = dict(self.extra)
        out["images"] = [im.to_json() for im in self.images]
        out["annotations"] = [a.to_json() for a in self.annotations]
        out["categories"] = self.meta.to_json()
        return out


def load_panoptic_json(path: str | os.PathLike[str]) -> PanopticDataset:
    """Read a COCO panoptic JSON file; structural defects raise :class:`DatasetError` naming the file."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise DatasetError(Problem(path, "file not found")) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(Problem(path, f"cannot read the JSON: {exc}")) from None
    _require(raw, ("images", "annotations", "categories"), "the top-level object", path)
    for key in ("images", "annotations", "categories"):
        if not isinstance(raw[key], list):
            raise DatasetError(Problem(path, f"'{key}' is not a list"))
    try:
        meta = DatasetMeta.from_json(raw["categories"])
    except (ValueError, TypeError) as exc:
        raise DatasetError(Problem(path, f"invalid categories: {exc}")) from None
    return PanopticDataset(
        images=[ImageInfo.from_json(e, path) for e in raw["images"]],
        annotations=[PanopticAnnotation.from_json(e, path) for e in raw["annotations"]],
        meta=meta,
        extra={k: v for k, v in raw.items() if k not in ("images", "annotations", "categories")},
    )


def save_panoptic_json(path: str | os.PathLike[str], dataset: PanopticDataset) -> None:
    """Write ``dataset`` as a COCO panoptic JSON file (atomically)."""
    data = json.dumps(dataset.to_json()).encode("utf-8")
    write_atomic(path, lambda f: f.write(data))


# ---------------------------------------------------------------------------------------------
# PNG files


def _open_image(path: str) -> Image.Image:
    """Open and fully decode an image; missing, unreadable and truncated files raise DatasetError."""
    try:
        image = Image.open(path)
        image.load()  # decoding everything is what detects truncated files
    except FileNotFoundError:
        raise DatasetError(Problem(path, "file not found")) from None
    except Image.DecompressionBombError as exc:
        raise DatasetError(Problem(path, too_many_pixels(exc))) from None
    except (OSError, SyntaxError, ValueError, EOFError, zlib.error) as exc:
        raise DatasetError(Problem(path, f"unreadable or truncated image ({exc})")) from None
    return image


def too_many_pixels(exc: Exception) -> str:
    """What to say of an image whose header declares more pixels than PIL decodes by default."""
    return (f"declares more pixels than PIL reads by default ({exc}); a corrupt header, or a real image that "
            "needs PIL.Image.MAX_IMAGE_PIXELS raised (then predict it with --tile)")


def read_panoptic_png(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a panoptic PNG -> segment ids ``[H, W]`` int32 (``R + 256 G + 256^2 B``, 0 = void)."""
    path = os.fspath(path)
    image = _open_image(path)
    if image.mode not in ("RGB", "RGBA"):
        raise DatasetError(Problem(path, f"a panoptic PNG must be RGB, this one has mode {image.mode!r}"))
    return rgb2id(np.asarray(image)[..., :3])


def write_panoptic_png(path: str | os.PathLike[str], ids: np.ndarray) -> None:
    """Write segment ids ``[H, W]`` as a panoptic RGB PNG (atomically)."""
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(f"expected an [H, W] id map, got shape {tuple(ids.shape)}")
    image = Image.fromarray(id2rgb(ids), mode="RGB")
    write_atomic(path, lambda f: image.save(f, format="PNG"))


def list_images(path: str | os.PathLike[str]) -> list[Path]:
    """An image file itself, or the image files directly inside a folder (sorted); clear errors otherwise."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input {path} does not exist")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"folder {path} contains no images (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return files


def load_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image as RGB uint8 ``[H, W, 3]``; missing, corrupt or truncated files raise DatasetError."""
    return np.asarray(_open_image(os.fspath(path)).convert("RGB"))


# ---------------------------------------------------------------------------------------------
# Segment statistics and conversions


def segment_areas_bboxes(id_map: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct values of an integer map with their pixel counts and boxes, without per-segment loops.

    Returns ``(values [K], areas [K] int64, bboxes [K, 4] int64 as (x, y, w, h))``, values sorted.
    """
    id_map = np.asarray(id_map)
    if id_map.ndim != 2 or id_map.size == 0:
        raise ValueError(f"expected a non-empty [H, W] map, got shape {tuple(id_map.shape)}")
    width = id_map.shape[1]
    # Work on horizontal runs of equal values instead of pixels: segment maps have few runs per row,
    # so sorting the run values is far cheaper than np.unique over every pixel.
    starts = np.ones(id_map.shape, dtype=bool)
    np.not_equal(id_map[:, 1:], id_map[:, :-1], out=starts[:, 1:])
    ys, xs = np.nonzero(starts)  # raster order
    ends = np.full(len(xs), width - 1, dtype=xs.dtype)  # last column of each run
    same_row = ys[1:] == ys[:-1]
    ends[:-1][same_row] = xs[1:][same_row] - 1
    values, inverse = np.unique(id_map[ys, xs], return_inverse=True)
    k = len(values)
    areas = np.bincount(inverse, weights=ends - xs + 1, minlength=k).astype(np.int64)
    x0, y0 = np.full(k, width, dtype=np.int64), np.full(k, id_map.shape[0], dtype=np.int64)
    x1, y1 = np.full(k, -1, dtype=np.int64), np.full(k, -1, dtype=np.int64)
    np.minimum.at(x0, inverse, xs)
    np.maximum.at(x1, inverse, ends)
    np.minimum.at(y0, inverse, ys)
    np.maximum.at(y1, inverse, ys)
    bboxes = np.stack([x0, y0, x1 - x0 + 1, y1 - y0 + 1], axis=1)
    return values, areas, bboxes


def segment_labels(segments: Sequence[SegmentInfo], meta: DatasetMeta, context: str = "") -> np.ndarray:
    """Label (``train_id * divisor + instance``) of each segment, in ``segments`` order.

    Non-crowd thing segments are numbered 1, 2, ... per class in list order; stuff and crowd get 0.
    """
    counters: dict[int, int] = {}
    labels = np.empty(len(segments), dtype=np.int64)
    for i, seg in enumerate(segments):
        try:
            train_id = meta.train_id(seg.category_id)
        except ValueError:
            raise DatasetError(
                Problem(context, f"unknown category id {seg.category_id}; known ids are "
                        f"{sorted(meta.category_to_train)}", seg.id)
            ) from None
        instance = 0
        if meta.is_thing_train_id(train_id) and not seg.iscrowd:
            instance = counters.get(train_id, 0) + 1
            counters[train_id] = instance
            if instance >= meta.label_divisor:
                raise DatasetError(
                    Problem(context, f"more than {meta.label_divisor - 1} instances of category "
                            f"{seg.category_id} do not fit label_divisor {meta.label_divisor}", seg.id)
                )
        labels[i] = train_id * meta.label_divisor + instance
    return labels


def ids_to_label_map(
    ids: np.ndarray, segments: Sequence[SegmentInfo], meta: DatasetMeta, context: str = ""
) -> np.ndarray:
    """Panoptic id map + segments_info -> label map ``train_id * divisor + instance`` (int32).

    Id 0 becomes ``meta.void_label``; a nonzero id without a segment raises DatasetError naming
    ``context`` (the PNG) and the id.
    """
    ids = np.asarray(ids)
    seg_ids = np.array([s.id for s in segments], dtype=np.int64)
    labels = segment_labels(segments, meta, context)
    # Void joins the table as id 0 so one searchsorted resolves every pixel.
    seg_ids = np.concatenate([[0], seg_ids])
    labels = np.concatenate([[meta.void_label], labels])
    order = np.argsort(seg_ids, kind="stable")
    sorted_ids, sorted_labels = seg_ids[order], labels[order]
    pos = np.searchsorted(sorted_ids, ids).clip(max=len(sorted_ids) - 1)
    found = sorted_ids[pos] == ids
    if not found.all():
        missing = np.unique(ids[~found])
        raise DatasetError(
            Problem(context, f"present in the PNG ({int((ids == missing[0]).sum())} pixels) but missing "
                    "from segments_info" + (f"; also ids {missing[1:6].tolist()}" if len(missing) > 1 else ""),
                    int(missing[0]))
        )
    return sorted_labels[pos].astype(np.int32)


def label_map_to_ids(
    label_map: np.ndarray, meta: DatasetMeta, context: str = "", stable: bool = False
) -> tuple[np.ndarray, list[SegmentInfo]]:
    """Label map -> (panoptic id map int32, segments_info) with fresh ids ``1..K``, or with ``stable`` ids
    ``category_id * label_divisor + instance`` (the same segment id for the same label in every frame of a video).

    One segment per distinct label, in increasing label order; void (train id = ignore label) -> id 0;
    thing labels with instance 0 become crowd segments. Area and bbox are computed from the map.
    ``context`` (e.g. the image) starts error messages.
    """
    where = f"{context}: " if context else ""
    label_map = np.asarray(label_map)
    values, areas, bboxes = segment_areas_bboxes(label_map)
    train_ids = values // meta.label_divisor
    instances = values % meta.label_divisor
    is_void = train_ids == meta.ignore_label
    bad = (~is_void) & ((values < 0) | (train_ids >= meta.num_classes))
    if bad.any():
        raise ValueError(
            f"{where}label {int(values[bad][0])} has a class outside 0..{meta.num_classes - 1} "
            f"(train id {int(train_ids[bad][0])}; void is {meta.void_label})"
        )
    is_thing = thing_mask_lookup(meta.thing_train_ids, max(meta.num_classes, meta.ignore_label + 1))
    stuff_with_instance = (~is_void) & (~is_thing[np.where(is_void, 0, train_ids)]) & (instances != 0)
    if stuff_with_instance.any():
        raise ValueError(
            f"{where}label {int(values[stuff_with_instance][0])} gives an instance number to the stuff class "
            f"{meta.class_names[int(train_ids[stuff_with_instance][0])]!r}"
        )
    new_ids = np.zeros(len(values), dtype=np.int32)
    keep = np.flatnonzero(~is_void)
    if stable:
        category_ids = np.array([meta.category_id(int(t)) for t in train_ids[keep]], dtype=np.int64)
        new_ids[keep] = category_ids * meta.label_divisor + instances[keep]
    else:
        new_ids[keep] = np.arange(1, len(keep) + 1, dtype=np.int32)
    ids = new_ids[np.searchsorted(values, label_map)]
    segments = [
        SegmentInfo(
            id=int(new_ids[k]),
            category_id=meta.category_id(int(train_ids[k])),
            area=int(areas[k]),
            bbox=tuple(int(v) for v in bboxes[k]),  # type: ignore[arg-type]
            iscrowd=bool(is_thing[train_ids[k]] and instances[k] == 0),
        )
        for k in keep
    ]
    return ids, segments


# ---------------------------------------------------------------------------------------------
# Validation of one annotation


def annotation_problems(
    ids: np.ndarray,
    annotation: PanopticAnnotation,
    meta: DatasetMeta,
    png_path: str,
    image: ImageInfo | None = None,
) -> list[Problem]:
    """Every inconsistency between a decoded panoptic PNG, its ``segments_info`` and its image entry."""
    problems: list[Problem] = []
    if image is not None and ids.shape != (image.height, image.width):
        problems.append(Problem(
            png_path, f"PNG is {ids.shape[0]}x{ids.shape[1]} (HxW) but the JSON entry of image "
            f"{image.id!r} says {image.height}x{image.width}"))
    values, areas, bboxes = segment_areas_bboxes(ids)
    in_png = {int(v): k for k, v in enumerate(values)}
    seen: set[int] = set()
    for seg in annotation.segments_info:
        if seg.id in seen:
            problems.append(Problem(png_path, "listed twice in segments_info", seg.id))
            continue
        seen.add(seg.id)
        if seg.id == 0:
            problems.append(Problem(png_path, "id 0 is reserved for void and cannot be a segment", 0))
            continue
        if seg.category_id not in meta.category_to_train:
            problems.append(Problem(png_path, f"unknown category id {seg.category_id}; known ids are "
                                    f"{sorted(meta.category_to_train)}", seg.id))
        k = in_png.get(seg.id)
        if k is None:
            problems.append(Problem(png_path, "listed in segments_info but absent from the PNG", seg.id))
            continue
        if seg.area != areas[k]:
            problems.append(Problem(png_path, f"area is {seg.area} in the JSON but the PNG has "
                                    f"{int(areas[k])} pixels", seg.id))
        if tuple(seg.bbox) != tuple(int(v) for v in bboxes[k]):
            problems.append(Problem(png_path, f"bbox is {list(seg.bbox)} in the JSON but the PNG gives "
                                    f"{bboxes[k].tolist()}", seg.id))
    for value, k in in_png.items():
        if value != 0 and value not in seen:
            problems.append(Problem(png_path, f"present in the PNG ({int(areas[k])} pixels) but missing "
                                    "from segments_info", value))
    return problems


def load_annotation(
    annotation: PanopticAnnotation,
    png_dir: str | os.PathLike[str],
    meta: DatasetMeta,
    image: ImageInfo | None = None,
    image_shape: tuple[int, int] | None = None,
) -> np.ndarray:
    """Read, check and convert one annotation to a label map ``[H, W]`` int32.

    ``image`` (its JSON entry) and ``image_shape`` (the decoded image's ``(H, W)``) enable the size
    checks. Raises :class:`DatasetError` on the first problem, with the messages of ``validate``.
    """
    png_path = os.path.join(os.fspath(png_dir), annotation.file_name)
    ids = read_panoptic_png(png_path)
    problems = annotation_problems(ids, annotation, meta, png_path, image)
    if image_shape is not None and tuple(image_shape) != ids.shape:
        problems.append(Problem(png_path, f"PNG is {ids.shape[0]}x{ids.shape[1]} (HxW) but its image "
                                f"{image.file_name if image else ''} is {image_shape[0]}x{image_shape[1]}"))
    if problems:
        raise DatasetError(problems[0])
    return ids_to_label_map(ids, annotation.segments_info, meta, png_path)

"""A built-in synthetic panoptic dataset, in COCO panoptic format, for tests, demos and smoke training.

Layout written by :func:`make_synthetic_dataset` (``<split>`` is e.g. ``train`` or ``val``)::

    <out_dir>/<split>/images/<split>_000000.png      RGB image
    <out_dir>/<split>/panoptic/<split>_000000.png    panoptic PNG: ids R + 256 G + 256^2 B, 0 = void
    <out_dir>/<split>/panoptic_<split>.json          COCO panoptic JSON (images, annotations, categories)

so ``panoptic-deeplab validate --json <out_dir>/train/panoptic_train.json --png-dir <out_dir>/train/panoptic
--images <out_dir>/train/images`` checks it. Image ids are the integers ``0..N-1``.

Content (sizes quoted for 256x512 and scaled with the image): four stuff classes as large textured regions
(``sky`` smooth blue gradient above a wavy horizon, ``road`` a noisy dark-grey perspective trapezoid,
``grass`` green with stripes, ``wall`` a block of beige bricks with dark mortar) and three thing classes of
distinct shape and colour (``disc`` red, ``square`` magenta and rotated, ``triangle`` yellow), each instance
with its own colour jitter and shading, 15 to 120 px across. About a third of the instances are placed
touching or overlapping an instance of the same class, so that colour and semantics alone cannot separate
them. Some images hold one crowd segment (a clump of small shapes of one thing class, ``iscrowd=1``) and
void pixels (a dark strip at the bottom, an unlabelled grey blob). Global lighting (gain and a ramp) and
pixel noise vary per image. Category ids are deliberately non-contiguous (3, 7, 11, 12, 20, 24, 31).

Everything is drawn with array operations on bounding windows, and each image's random generator is
seeded from ``(seed, split, index)``: the same arguments give byte-identical files, and splits differ.

Objects scale with the image size; for large images with objects at a given scale (tiled prediction), each
image can instead be a grid of independent scenes (``scenes``, ``make-synthetic --scenes 4x4``).
"""

from __future__ import annotations

import dataclasses
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from panoptic_deeplab.data.coco_panoptic import (
    CategoryInfo,
    DatasetMeta,
    ImageInfo,
    PanopticAnnotation,
    PanopticDataset,
    SegmentInfo,
    rgb2id,
    save_panoptic_json,
    segment_areas_bboxes,
    write_atomic,
    write_panoptic_png,
)

# (id, name, isthing, colour): the colour is the class's base appearance in the images and its
# visualisation colour. Ids are non-contiguous on purpose, to exercise the category -> train id mapping.
_CATEGORIES = (
    CategoryInfo(3, "sky", False, (95, 150, 230), "synthetic"),
    CategoryInfo(7, "road", False, (80, 80, 88), "synthetic"),
    CategoryInfo(11, "grass", False, (50, 140, 45), "synthetic"),
    CategoryInfo(12, "wall", False, (175, 165, 150), "synthetic"),
    CategoryInfo(20, "disc", True, (225, 35, 45), "synthetic"),
    CategoryInfo(24, "square", True, (190, 50, 210), "synthetic"),
    CategoryInfo(31, "triangle", True, (240, 215, 40), "synthetic"),
)
_SKY, _ROAD, _GRASS, _WALL, _DISC, _SQUARE, _TRIANGLE = _CATEGORIES
_THINGS = (_DISC, _SQUARE, _TRIANGLE)

_REFERENCE_SIZE = (256, 512)  # sizes of shapes and textures are given for this image size
_THING_SIZE_RANGE = (15.0, 120.0)  # across, in pixels at the reference size
_P_TOUCHING = 0.35  # chance that a new instance touches/overlaps the previous one, same class
_P_CROWD = 0.35
_P_VOID_STRIP = 0.5
_P_VOID_BLOB = 0.4
_P_WALL = 0.75


def synthetic_meta() -> DatasetMeta:
    """Categories of the synthetic dataset: 4 stuff and 3 thing classes, non-contiguous ids."""
    return DatasetMeta(list(_CATEGORIES))


@dataclass(frozen=True)
class SyntheticSplit:
    """Where :func:`make_synthetic_dataset` wrote a split (the arguments ``validate`` takes)."""

    json_path: Path
    png_dir: Path
    image_dir: Path


def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    # crc32 of the split name mixes it into the seed, so train and val never share an image.
    return np.random.default_rng([seed, zlib.crc32(split.encode("utf-8")), index])


def _shape_mask(kind: CategoryInfo, size: float, angle: float, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """Mask of a shape of ``size`` px across centred at the origin, on pixel offsets ``dy, dx``."""
    if kind is _DISC:
        return dy**2 + dx**2 <= (size / 2) ** 2
    cos, sin = np.cos(angle), np.sin(angle)
    u, v = dx * cos + dy * sin, -dx * sin + dy * cos
    if kind is _SQUARE:
        return (np.abs(u) <= size / 2) & (np.abs(v) <= size / 2)
    # Equilateral triangle of side ``size``: inside all three edges' half-planes (inradius size / 2 sqrt 3).
    inradius = size / (2 * np.sqrt(3))
    inside = np.ones(np.broadcast_shapes(u.shape, v.shape), dtype=bool)
    for k in range(3):
        theta = 2 * np.pi * k / 3
        inside &= u * np.cos(theta) + v * np.sin(theta) <= inradius
    return inside


def _window(cy: float, cx: float, radius: float, height: int, width: int) -> tuple[slice, slice] | None:
    y0, y1 = max(int(cy - radius), 0), min(int(cy + radius) + 2, height)
    x0, x1 = max(int(cx - radius), 0), min(int(cx + radius) + 2, width)
    if y0 >= y1 or x0 >= x1:
        return None
    return slice(y0, y1), slice(x0, x1)


class _Canvas:
    """An image being painted and its panoptic id map; later paint covers earlier paint."""

    def __init__(self, height: int, width: int, rng: np.random.Generator) -> None:
        self.height, self.width, self.rng = height, width, rng
        self.image = np.zeros((height, width, 3), dtype=np.float32)
        self.ids = np.zeros((height, width), dtype=np.int32)
        self.used_ids: set[int] = {0}
        self.segments: list[tuple[int, CategoryInfo, bool]] = []  # (id, category, iscrowd) in paint order

    def new_segment(self, category: CategoryInfo, iscrowd: bool = False) -> int:
        """A fresh segment id near the category colour (as panopticapi does), so PNGs are viewable."""
        while True:
            rgb = np.clip(np.array(category.color) + self.rng.integers(-40, 41, 3), 0, 255)
            seg_id = int(rgb2id(rgb.reshape(1, 1, 3))[0, 0])
            if seg_id not in self.used_ids:
                break
        self.used_ids.add(seg_id)
        self.segments.append((seg_id, category, iscrowd))
        return seg_id

    def paint_shape(self, kind: CategoryInfo, cy: float, cx: float, size: float, seg_id: int,
                    color: np.ndarray) -> None:
        """Paint one shape with a shading gradient (a light direction) in its bounding window only."""
        window = _window(cy, cx, 0.75 * size, self.height, self.width)
        if window is None:
            return
        ys, xs = window
        dy = np.arange(ys.start, ys.stop, dtype=np.float32)[:, None] - cy
        dx = np.arange(xs.start, xs.stop, dtype=np.float32)[None, :] - cx
        mask = _shape_mask(kind, size, self.rng.uniform(0, 2 * np.pi), dy, dx)
        light = self.rng.uniform(-1, 1, 2)
        shade = 1 + 0.25 * (dy * light[0] + dx * light[1]) / max(size, 1.0)
        self.image[ys, xs][mask] = (color * shade[..., None])[mask]
        self.ids[ys, xs][mask] = seg_id


def _stuff_layout(height: int, width: int, rng: np.random.Generator, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Stuff class index (into _CATEGORIES, 0..3) per pixel, and the painted stuff textures."""
    y = np.arange(height, dtype=np.float32)[:, None]
    x = np.arange(width, dtype=np.float32)[None, :]
    horizon = height * rng.uniform(0.3, 0.5) + height * rng.uniform(0.0, 0.05) * np.sin(
        2 * np.pi * x / (width * rng.uniform(0.5, 1.5)) + rng.uniform(0, 2 * np.pi)
    )
    layout = np.full((height, width), 2, dtype=np.int8)  # grass below the horizon by default
    layout[np.broadcast_to(y < horizon, layout.shape)] = 0
    # Road: a trapezoid in perspective, narrow at the horizon, wide at the bottom.
    t = np.clip((y - horizon) / np.maximum(height - horizon, 1.0), 0.0, 1.0)
    centre = width * (rng.uniform(0.35, 0.65) + t * (rng.uniform(0.2, 0.8) - 0.5))
    half = width * (rng.uniform(0.02, 0.06) + t * rng.uniform(0.15, 0.3))
    layout[(y >= horizon) & (np.abs(x - centre) < half)] = 1
    if rng.random() < _P_WALL:
        x0 = rng.uniform(-0.1, 0.8) * width
        x1 = x0 + rng.uniform(0.15, 0.45) * width
        top = rng.uniform(0.05, 0.25) * height
        bottom = horizon + rng.uniform(0.03, 0.12) * height
        layout[(x >= x0) & (x < x1) & (y >= top) & (y < bottom)] = 3

    textures = np.empty((4, height, width, 3), dtype=np.float32)
    sky = np.array(_SKY.color, dtype=np.float32)
    textures[0] = sky + (y / height)[..., None] * np.array([70, 60, 25], dtype=np.float32)
    asphalt = rng.normal(0.0, 14.0, (height, width, 1)).astype(np.float32)
    textures[1] = np.array(_ROAD.color, dtype=np.float32) + asphalt
    period = 6.0 * max(scale, 0.5)
    stripes = np.sin(2 * np.pi * x / period + 2.0 * np.sin(2 * np.pi * y / (4 * period)))
    textures[2] = np.array(_GRASS.color, dtype=np.float32) + 25.0 * stripes[..., None] * np.array([0.6, 1.0, 0.5])
    brick_h = max(round(10 * scale), 4)
    brick_w = 2 * brick_h + 2
    row = (y // brick_h).astype(np.int64)
    shifted = (x.astype(np.int64) + (row % 2) * (brick_w // 2)) % brick_w
    mortar = (y.astype(np.int64) % brick_h == 0) | (shifted == 0)
    textures[3] = np.where(mortar[..., None], np.float32(100.0), np.array(_WALL.color, dtype=np.float32))
    return layout, textures


def render_synthetic_image(
    index: int, split: str = "train", seed: int = 0, size: tuple[int, int] = _REFERENCE_SIZE
) -> tuple[np.ndarray, np.ndarray, list[SegmentInfo]]:
    """Draw one synthetic image: ``(image [H, W, 3] uint8, ids [H, W] int32, segments_info)``.

    Deterministic in ``(index, split, seed, size)``. ``segments_info`` lists every segment visible in
    ``ids`` (stuff, then the crowd segment if any, then instances in paint order) with exact area/bbox.
    """
    height, width = size
    if height < 8 or width < 8:
        raise ValueError(f"synthetic images must be at least 8x8, got {height}x{width}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    rng = _image_rng(seed, split, index)
    scale = min(height / _REFERENCE_SIZE[0], width / _REFERENCE_SIZE[1])
    canvas = _Canvas(height, width, rng)

    layout, textures = _stuff_layout(height, width, rng, scale)
    stuff = (_SKY, _ROAD, _GRASS, _WALL)
    # One gather paints all stuff: textures[class, y, x].
    canvas.image[:] = textures[layout, np.arange(height)[:, None], np.arange(width)[None, :]]
    for k in np.unique(layout):
        canvas.ids[layout == k] = canvas.new_segment(stuff[k])

    if rng.random() < _P_VOID_BLOB:  # an unlabelled object: void, seen as a grey checkerboard
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ry, rx = rng.uniform(10, 35) * scale + 2, rng.uniform(15, 50) * scale + 2
        window = _window(cy, cx, max(ry, rx), height, width)
        if window is not None:
            ys, xs = window
            yy = np.arange(ys.start, ys.stop)[:, None]
            xx = np.arange(xs.start, xs.stop)[None, :]
            mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
            cell = max(int(4 * scale), 2)
            checker = np.where(((yy // cell + xx // cell) % 2 == 0), 150.0, 110.0).astype(np.float32)
            canvas.image[ys, xs][mask] = np.broadcast_to(checker[..., None], mask.shape + (3,))[mask]
            canvas.ids[ys, xs][mask] = 0

    if rng.random() < _P_CROWD:  # a clump of small same-class shapes annotated as one crowd segment
        kind = _THINGS[rng.integers(len(_THINGS))]
        seg_id = canvas.new_segment(kind, iscrowd=True)
        cy, cx = rng.uniform(0.2, 0.8) * height, rng.uniform(0.1, 0.9) * width
        for _ in range(rng.integers(5, 10)):
            color = np.array(kind.color, dtype=np.float32) + rng.uniform(-25, 25, 3).astype(np.float32)
            canvas.paint_shape(kind, cy + rng.normal(0, 15 * scale), cx + rng.normal(0, 25 * scale),
                               max(rng.uniform(10, 20) * scale, 3.0), seg_id, color)

    low, high = (max(v * scale, 4.0) for v in _THING_SIZE_RANGE)
    previous: tuple[CategoryInfo, float, float, float] | None = None
    for _ in range(rng.integers(4, 11)):
        if previous is not None and rng.random() < _P_TOUCHING:
            kind, py, px, psize = previous
            thing_size = float(np.clip(psize * rng.uniform(0.7, 1.3), low, high))
            direction = rng.uniform(0, 2 * np.pi)
            distance = (psize + thing_size) / 2 * rng.uniform(0.55, 0.95)  # overlapping or touching
            cy, cx = py + distance * np.sin(direction), px + distance * np.cos(direction)
        else:
            kind = _THINGS[rng.integers(len(_THINGS))]
            thing_size = float(np.exp(rng.uniform(np.log(low), np.log(high))))
            cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        color = np.array(kind.color, dtype=np.float32) + rng.uniform(-25, 25, 3).astype(np.float32)
        canvas.paint_shape(kind, cy, cx, thing_size, canvas.new_segment(kind), color)
        previous = (kind, cy, cx, thing_size)

    if rng.random() < _P_VOID_STRIP:  # like Cityscapes' ego-vehicle: dark, unlabelled
        strip = max(int(rng.uniform(0.03, 0.08) * height), 1)
        canvas.image[-strip:] = 35.0 + rng.normal(0, 6, (strip, width, 1)).astype(np.float32)
        canvas.ids[-strip:] = 0

    # Lighting: a global gain and a linear ramp in a random direction, then sensor noise.
    y = np.arange(height, dtype=np.float32)[:, None] / height - 0.5
    x = np.arange(width, dtype=np.float32)[None, :] / width - 0.5
    angle = rng.uniform(0, 2 * np.pi)
    light = rng.uniform(0.8, 1.2) * (1 + rng.uniform(0, 0.3) * (x * np.cos(angle) + y * np.sin(angle)))
    noise = rng.normal(0, rng.uniform(2, 6), (height, width, 3)).astype(np.float32)
    image = np.clip(canvas.image * light[..., None] + noise, 0, 255).astype(np.uint8)

    values, areas, bboxes = segment_areas_bboxes(canvas.ids)
    visible = {int(v): k for k, v in enumerate(values)}
    segments = [
        SegmentInfo(seg_id, category.id, int(areas[visible[seg_id]]),
                    tuple(int(v) for v in bboxes[visible[seg_id]]), iscrowd)  # type: ignore[arg-type]
        for seg_id, category, iscrowd in canvas.segments
        if seg_id in visible  # instances painted over entirely are not annotated
    ]
    return image, canvas.ids, segments


def render_synthetic_mosaic(
    index: int, split: str = "train", seed: int = 0, size: tuple[int, int] = _REFERENCE_SIZE,
    scenes: tuple[int, int] = (1, 1),
) -> tuple[np.ndarray, np.ndarray, list[SegmentInfo]]:
    """:func:`render_synthetic_image` of a ``rows x columns`` grid of independent scenes of ``size`` each: a
    large image whose objects keep the scale of ``size`` (what a model trained on ``size`` expects; for tiled
    prediction). Scene ``k`` of image ``index`` is scene ``index * rows * columns + k`` of the split; segment
    ids are renumbered to stay unique in the image. ``scenes=(1, 1)`` is :func:`render_synthetic_image`."""
    rows, columns = scenes
    if rows < 1 or columns < 1:
        raise ValueError(f"scenes must be at least 1x1, got {rows}x{columns}")
    if (rows, columns) == (1, 1):
        return render_synthetic_image(index, split, seed, size)
    height, width = size
    image = np.empty((rows * height, columns * width, 3), dtype=np.uint8)
    ids = np.zeros((rows * height, columns * width), dtype=np.int32)
    segments: list[SegmentInfo] = []
    next_id = 1
    for k in range(rows * columns):
        top, left = (k // columns) * height, (k % columns) * width
        scene, scene_ids, scene_segments = render_synthetic_image(index * rows * columns + k, split, seed, size)
        image[top : top + height, left : left + width] = scene
        renumber = np.zeros(int(scene_ids.max()) + 1, dtype=np.int32)  # 0 (void) stays 0
        for segment in scene_segments:
            renumber[segment.id] = next_id
            x, y, w, h = segment.bbox
            segments.append(dataclasses.replace(segment, id=next_id, bbox=(x + left, y + top, w, h)))
            next_id += 1
        ids[top : top + height, left : left + width] = renumber[scene_ids]
    return image, ids, segments


def make_synthetic_dataset(
    out_dir: str | os.PathLike[str],
    split: str = "train",
    num_images: int = 100,
    size: tuple[int, int] = _REFERENCE_SIZE,
    seed: int = 0,
    progress: bool = False,
    scenes: tuple[int, int] = (1, 1),
) -> SyntheticSplit:
    """Write ``num_images`` synthetic images and their COCO panoptic annotations (layout: module doc); with
    ``scenes`` (rows, columns) each image is a grid of scenes of ``size`` (:func:`render_synthetic_mosaic`)."""
    if not re.fullmatch(r"[A-Za-z0-9_-]+", split):
        raise ValueError(f"split name {split!r} must be letters, digits, '_' or '-'")
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    root = Path(out_dir) / split
    paths = SyntheticSplit(root / f"panoptic_{split}.json", root / "panoptic", root / "images")
    paths.png_dir.mkdir(parents=True, exist_ok=True)
    paths.image_dir.mkdir(parents=True, exist_ok=True)

    images: list[ImageInfo] = []
    annotations: list[PanopticAnnotation] = []
    for index in tqdm(range(num_images), desc=f"synthetic {split}", disable=not progress):
        image, ids, segments = render_synthetic_mosaic(index, split, seed, size, scenes)
        name = f"{split}_{index:06d}.png"
        # compress_level 1: the noisy images barely compress better at higher levels, at several times the cost.
        pil_image = Image.fromarray(image, mode="RGB")
        write_atomic(paths.image_dir / name, lambda f: pil_image.save(f, format="PNG", compress_level=1))
        write_panoptic_png(paths.png_dir / name, ids)
        images.append(ImageInfo(index, name, image.shape[0], image.shape[1]))
        annotations.append(PanopticAnnotation(index, name, segments))
    info = {"description": "panoptic_deeplab synthetic dataset", "split": split, "seed": seed}
    save_panoptic_json(paths.json_path, PanopticDataset(images, annotations, synthetic_meta(), {"info": info}))
    return paths

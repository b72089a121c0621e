"""A synthetic video: things that move, occlude each other, enter and leave, with ground truth that keeps each
object's id over the frames, for the tracker's tests and demonstrations on a CPU.

The scene uses the synthetic dataset's categories (:func:`~panoptic_deeplab.data.synthetic.synthetic_meta`): sky
above, road below, and discs and squares of their class colours moving in straight lines. An object drawn later
(higher ``depth``) hides the ones under it. Ground truth per frame is a panoptic label map in train ids,
``train_id * 1000 + n`` where ``n`` numbers the objects of a class in the order given: the same label in every
frame where the object is visible.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from panoptic_deeplab.data.coco_panoptic import LABEL_DIVISOR
from panoptic_deeplab.data.synthetic import synthetic_meta


@dataclass(frozen=True)
class MovingObject:
    """A disc or square (``category_id`` 20 or 24) of ``radius`` px, at ``start`` (y, x) in frame 0, moving
    ``velocity`` (dy, dx) px per frame; higher ``depth`` is in front."""

    category_id: int
    radius: float
    start: tuple[float, float]
    velocity: tuple[float, float]
    depth: int = 0


def random_objects(count: int, size: tuple[int, int], num_frames: int, seed: int = 0) -> list[MovingObject]:
    """``count`` objects with random classes, sizes, paths (some entering or leaving the frame) and depths."""
    rng = np.random.default_rng(seed)
    height, width = size
    objects = []
    for index in range(count):
        start = (rng.uniform(0.35, 0.9) * height, rng.uniform(-0.1, 1.1) * width)
        speed = rng.uniform(0.5, 1.5) * width / num_frames
        objects.append(MovingObject(int(rng.choice([20, 24])), float(rng.uniform(0.05, 0.1) * height), start,
                                    (float(rng.uniform(-0.3, 0.3)), float(speed * rng.choice([-1, 1]))), index))
    return objects


def synthetic_sequence(
    num_frames: int, size: tuple[int, int] = (128, 256), objects: Sequence[MovingObject] | None = None, seed: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields ``(image [H, W, 3] uint8, ground-truth label map [H, W] int64)`` per frame (module doc); without
    ``objects``, five random ones."""
    meta = synthetic_meta()
    train_id = {c.id: t for t, c in enumerate(meta.categories)}
    colour = {c.id: np.array(c.color, dtype=np.float64) for c in meta.categories}
    objects = list(objects) if objects is not None else random_objects(5, size, num_frames, seed)
    numbers: dict[int, int] = {}
    labels = []
    for obj in objects:
        numbers[obj.category_id] = numbers.get(obj.category_id, 0) + 1
        labels.append(train_id[obj.category_id] * LABEL_DIVISOR + numbers[obj.category_id])
    height, width = size
    yy, xx = np.mgrid[:height, :width].astype(np.float64)
    horizon = height // 3
    noise = np.random.default_rng(seed).normal(0.0, 6.0, (height, width, 1))
    for frame in range(num_frames):
        label_map = np.full((height, width), train_id[7] * LABEL_DIVISOR, dtype=np.int64)  # road
        label_map[:horizon] = train_id[3] * LABEL_DIVISOR  # sky
        image = np.where((yy < horizon)[..., None], colour[3], colour[7]) + noise
        for obj, label in sorted(zip(objects, labels), key=lambda pair: pair[0].depth):
            cy, cx = obj.start[0] + obj.velocity[0] * frame, obj.start[1] + obj.velocity[1] * frame
            if obj.category_id == 20:
                inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= obj.radius**2
            else:
                inside = (np.abs(yy - cy) <= obj.radius) & (np.abs(xx - cx) <= obj.radius)
            label_map[inside] = label
            shade = 0.85 + 0.3 * ((label % LABEL_DIVISOR) % 3) / 2  # objects of a class differ a little
            image[inside] = np.clip(colour[obj.category_id] * shade, 0, 255)
        yield np.clip(image, 0, 255).astype(np.uint8), label_map

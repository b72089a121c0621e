"""Synthetic dataset generation speed, and vectorized segment statistics vs a per-segment loop.

Run: .venv/bin/python benchmarks/bench_synthetic.py [--num 200] [--size 256x512]
Prints the time to write the dataset (render and file writing separately), and, on a 1024x2048 panoptic
id map with 100 segments, segment_areas_bboxes against one full-image mask per segment (same results).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from panoptic_deeplab.cli import _parse_size
from panoptic_deeplab.data.coco_panoptic import segment_areas_bboxes
from panoptic_deeplab.data.synthetic import make_synthetic_dataset, render_synthetic_image


def _loop_stats(id_map: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    values = np.unique(id_map)
    areas, boxes = [], []
    for v in values:
        ys, xs = np.nonzero(id_map == v)
        areas.append(len(ys))
        boxes.append([xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1])
    return values, np.array(areas), np.array(boxes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num", type=int, default=200)
    parser.add_argument("--size", type=_parse_size, default=(256, 512))
    args = parser.parse_args()

    start = time.perf_counter()
    for index in range(args.num):
        render_synthetic_image(index, "train", 0, args.size)
    render_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        make_synthetic_dataset(tmp, "train", args.num, args.size, seed=0)
        total_s = time.perf_counter() - start
    h, w = args.size
    print(f"make_synthetic_dataset: {args.num} images of {h}x{w} in {total_s:.2f} s "
          f"({1000 * total_s / args.num:.1f} ms/image; rendering alone {1000 * render_s / args.num:.1f} ms/image)")

    rng = np.random.default_rng(0)
    coarse = rng.integers(1, 2**24, size=(16, 16))[rng.integers(0, 16, 100), rng.integers(0, 16, 100)]
    id_map = np.kron(rng.choice(coarse, size=(32, 64)), np.ones((32, 32), dtype=np.int64)).astype(np.int32)
    start = time.perf_counter()
    fast = segment_areas_bboxes(id_map)
    fast_s = time.perf_counter() - start
    start = time.perf_counter()
    slow = _loop_stats(id_map)
    slow_s = time.perf_counter() - start
    assert all(np.array_equal(a, b) for a, b in zip(fast, slow))
    print(f"segment_areas_bboxes on 1024x2048, {len(fast[0])} segments: {1000 * fast_s:.1f} ms vs "
          f"per-segment loop {1000 * slow_s:.1f} ms (x{slow_s / fast_s:.1f})")


if __name__ == "__main__":
    main()

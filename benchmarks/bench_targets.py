"""Target generation on a 1025x2049 label map with 50 instances: generate_targets vs a per-instance version.

Run: .venv/bin/python benchmarks/bench_targets.py [--repeats N] [--instances N] [--threads N]
Both are timed in the same run, on one thread by default, and checked to give the same targets.
"""

from __future__ import annotations

import argparse
import time

import torch

from panoptic_deeplab.data.targets import TARGET_KEYS, generate_targets

THING_IDS = list(range(11, 19))  # Cityscapes-like: 11 stuff classes 0..10, 8 thing classes 11..18


def _count_instances(label: torch.Tensor) -> int:
    segments = torch.unique(label)
    return int((torch.isin(segments // 1000, torch.tensor(THING_IDS)) & (segments % 1000 > 0)).sum())


def make_label_map(height: int, width: int, num_instances: int, seed: int = 0) -> torch.Tensor:
    """Stuff bands, some void, a few crowd regions, then thing rectangles of varied sizes (some cut by the
    border) until exactly ``num_instances`` instances are visible."""
    gen = torch.Generator().manual_seed(seed)

    def draw(value_fn) -> None:
        h = int(torch.randint(4, height // 6, (1,), generator=gen))
        w = int(torch.randint(4, width // 10, (1,), generator=gen))
        y = int(torch.randint(0, height - 1, (1,), generator=gen))
        x = int(torch.randint(0, width - 1, (1,), generator=gen))
        cls = THING_IDS[int(torch.randint(0, len(THING_IDS), (1,), generator=gen))]
        label[y : y + h, x : x + w] = value_fn(cls)  # may run past the border: clipped

    label = torch.zeros(height, width, dtype=torch.int64)
    band = height // 6
    for i in range(6):
        label[i * band :, :] = int(torch.randint(0, 11, (1,), generator=gen)) * 1000
    label[: height // 20, :] = 255000
    for _ in range(5):
        draw(lambda cls: cls * 1000)  # crowd
    next_instance = 1
    while _count_instances(label) < num_instances:
        for _ in range(num_instances - _count_instances(label)):
            draw(lambda cls: cls * 1000 + next_instance)
            next_instance += 1
    return label


def straightforward_targets(label: torch.Tensor, thing_ids: list[int], sigma: float = 8.0) -> dict[str, torch.Tensor]:
    """For each segment: a full-image mask, the mean of its coordinates, a full-image Gaussian and offsets."""
    height, width = label.shape
    ys = torch.arange(height, dtype=torch.float32).view(-1, 1).expand(height, width)
    xs = torch.arange(width, dtype=torch.float32).view(1, -1).expand(height, width)
    semantic = label // 1000
    semantic_weights = torch.ones(height, width)
    center = torch.zeros(height, width)
    center_weights = (semantic != 255).float()
    offset = torch.zeros(2, height, width)
    offset_weights = torch.zeros(height, width)
    radius = int(3 * sigma) + 1
    for value in torch.unique(label).tolist():
        cls, instance = divmod(value, 1000)
        if cls not in thing_ids:
            continue
        mask = label == value
        if instance == 0:  # crowd
            center_weights[mask] = 0
            continue
        coords = mask.nonzero().double()
        cy, cx = coords[:, 0].mean().item(), coords[:, 1].mean().item()
        if coords.shape[0] < 4096:
            semantic_weights[mask] = 3.0
        offset_weights[mask] = 1
        offset[0][mask] = cy - ys[mask]
        offset[1][mask] = cx - xs[mask]
        py, px = round(cy), round(cx)
        gaussian = torch.exp(-((ys - py) ** 2 + (xs - px) ** 2) / (2 * sigma**2))
        gaussian[((ys - py).abs() > radius) | ((xs - px).abs() > radius)] = 0
        center = torch.maximum(center, gaussian)
    return {
        "semantic": semantic,
        "semantic_weights": semantic_weights,
        "center": center[None],
        "center_weights": center_weights[None],
        "offset": offset,
        "offset_weights": offset_weights[None],
    }


def time_ms(fn, repeats: int) -> tuple[float, float]:
    """Best wall-clock and best process CPU time in ms; on a shared machine the CPU time is the steadier one."""
    fn()  # warm-up
    best_wall = best_cpu = float("inf")
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    return best_wall * 1000, best_cpu * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--instances", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", type=int, nargs=2, default=(1025, 2049), metavar=("H", "W"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    label = make_label_map(*args.size, args.instances)
    fast = generate_targets(label, THING_IDS)
    slow = straightforward_targets(label, THING_IDS)
    for key in TARGET_KEYS:
        torch.testing.assert_close(fast[key], slow[key], atol=1e-4, rtol=0, msg=f"{key} differs")
    segments = torch.unique(label)
    classes, instances = segments // 1000, segments % 1000
    is_thing = torch.isin(classes, torch.tensor(THING_IDS))
    print(
        f"label map {args.size[0]}x{args.size[1]}: {int((is_thing & (instances > 0)).sum())} instances, "
        f"{int((is_thing & (instances == 0)).sum())} crowd, {int((~is_thing).sum())} stuff/void segments; "
        f"torch threads {args.threads}; outputs match"
    )

    fast_wall, fast_cpu = time_ms(lambda: generate_targets(label, THING_IDS), args.repeats)
    slow_repeats = max(1, args.repeats // 2)
    slow_wall, slow_cpu = time_ms(lambda: straightforward_targets(label, THING_IDS), slow_repeats)
    print(f"{'':26s}{'wall ms/image':>14s}{'CPU ms/image':>14s}")
    print(f"{'generate_targets':26s}{fast_wall:14.1f}{fast_cpu:14.1f}   (best of {args.repeats})")
    print(f"{'straightforward reference':26s}{slow_wall:14.1f}{slow_cpu:14.1f}   (best of {slow_repeats})")
    print(f"{'speed-up':26s}{slow_wall / fast_wall:13.1f}x{slow_cpu / fast_cpu:13.1f}x")

if __name__ == "__main__":
    main()

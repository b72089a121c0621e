"""Every backbone preset at the paper's input sizes: the forward pass computes, outputs have the right shapes and
are finite, and how long each takes relative to the smallest size (the suite runs each preset at that one only).

    .venv/bin/python benchmarks/bench_presets.py [--sizes 1025x2049,513x1025,640x640,257x300] [--backbones ...]

Prints one row per preset: seconds per forward (batch 2, random weights, no grad) at each size and the ratio to
the smallest size; exits non-zero if any output is wrong.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from panoptic_deeplab.config import ModelConfig
from panoptic_deeplab.modeling import build_model
from panoptic_deeplab.modeling.backbone import BACKBONE_PRESETS


def _size(text: str) -> tuple[int, int]:
    height, width = text.lower().split("x")
    return int(height), int(width)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1025x2049,513x1025,640x640,257x300")
    parser.add_argument("--backbones", nargs="*", default=sorted(BACKBONE_PRESETS))
    args = parser.parse_args()
    sizes = [_size(s) for s in args.sizes.split(",")]
    failures = []
    print(f"{'preset':20s} " + " ".join(f"{h}x{w:<10d}" for h, w in sizes) + "  (s per forward, x smallest)")
    for name in args.backbones:
        model = build_model(ModelConfig(backbone=name, pretrained=False)).eval()
        seconds = []
        for height, width in sizes:
            with torch.no_grad():
                start = time.perf_counter()
                out = model(torch.rand(2, 3, height, width))
                seconds.append(time.perf_counter() - start)
            expected = {"semantic": (2, 19, height, width), "center": (2, 1, height, width),
                        "offset": (2, 2, height, width)}
            for key, shape in expected.items():
                if tuple(out[key].shape) != shape or not torch.isfinite(out[key]).all():
                    failures.append(f"{name} {height}x{width} {key}: {tuple(out[key].shape)}, expected {shape}")
        smallest = seconds[sizes.index(min(sizes, key=lambda s: s[0] * s[1]))]
        print(f"{name:20s} " + " ".join(f"{s:6.2f} x{s / smallest:<5.1f}" for s in seconds), flush=True)
    for failure in failures:
        print("FAILED", failure, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

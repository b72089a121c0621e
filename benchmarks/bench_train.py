"""Training throughput (images/s) of the ``synthetic_mnv3`` preset on this machine, fp32 vs bf16 autocast.

    .venv/bin/python benchmarks/bench_train.py [--steps 3] [--warmup 1] [--device cpu] [key=value ...]

Makes a small synthetic dataset at the preset's size (256x512) in a temporary directory, trains
``warmup + steps`` iterations with each precision and reports the throughput of the steps after the
warm-up (``steps`` a multiple of ``warmup``), measured by the trainer itself (data loading included),
and the bf16 / fp32 ratio.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import torch

from panoptic_deeplab.config import load_config
from panoptic_deeplab.data.synthetic import make_synthetic_dataset
from panoptic_deeplab.engine import train


def throughput(root: Path, out: Path, amp: str, steps: int, warmup: int, device: str, extra: list[str]) -> float:
    overrides = [
        f"data.train.images={root}/train/images",
        f"data.train.json={root}/train/panoptic_train.json",
        f"data.train.panoptic={root}/train/panoptic",
        f"solver.amp={amp}",
        f"solver.max_iter={warmup + steps}",
        f"train.log_period={warmup}",  # the first log window is the warm-up
        "train.eval_period=0",
        f"train.output_dir={out / amp}",
        f"train.device={device}",
        *extra,
    ]
    cfg = load_config("synthetic_mnv3", overrides)
    measured = train(cfg).history[1:]  # windows of `warmup` steps after the warm-up
    images = sum(h["images_per_s"] for h in measured) / len(measured)
    print(f"{amp:5s}: {images:7.2f} images/s (batch {cfg.data.batch_size}, crop {cfg.data.crop_size}, "
          f"{torch.get_num_threads()} threads, {device})")
    return images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("overrides", nargs="*", help="extra config overrides, e.g. data.batch_size=4")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        make_synthetic_dataset(root, "train", 16, (256, 512), seed=0)
        fp32 = throughput(root, Path(tmp), "none", args.steps, args.warmup, args.device, args.overrides)
        bf16 = throughput(root, Path(tmp), "bf16", args.steps, args.warmup, args.device, args.overrides)
    print(f"bf16 / fp32 throughput ratio: {bf16 / fp32:.2f}")


if __name__ == "__main__":
    main()

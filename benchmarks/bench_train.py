"""Training throughput (images/s) of the ``synthetic_mnv3`` preset on this machine, per layout and precision.

    .venv/bin/python benchmarks/bench_train.py [--steps 3] [--warmup 1] [--device cpu] [key=value ...]

Makes a small synthetic dataset (256x512 images, cropped to the preset's 129x257) in a temporary
directory, trains ``warmup + steps`` iterations in each setting and reports the throughput of the steps
after the warm-up (``steps`` a multiple of ``warmup``), measured by the trainer itself (data loading
included), and each setting's ratio to contiguous (NCHW) fp32. Settings: ``train.memory_format``
contiguous or channels_last, ``solver.amp`` none (fp32) or bf16.
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


SETTINGS = (("contiguous", "none"), ("channels_last", "none"), ("contiguous", "bf16"), ("channels_last", "bf16"))


def throughput(root: Path, out: Path, memory_format: str, amp: str, steps: int, warmup: int, device: str,
               extra: list[str]) -> float:
    overrides = [
        f"data.train.images={root}/train/images",
        f"data.train.json={root}/train/panoptic_train.json",
        f"data.train.panoptic={root}/train/panoptic",
        f"solver.amp={amp}",
        f"train.memory_format={memory_format}",
        f"solver.max_iter={warmup + steps}",
        f"train.log_period={warmup}",  # the first log window is the warm-up
        "train.eval_period=0",
        f"train.output_dir={out / memory_format / amp}",
        f"train.device={device}",
        *extra,
    ]
    cfg = load_config("synthetic_mnv3", overrides)
    measured = train(cfg, progress=False).history[1:]  # windows of `warmup` steps after the warm-up
    images = sum(h["images_per_s"] for h in measured) / len(measured)
    print(f"{memory_format:13s} {'fp32' if amp == 'none' else amp:5s}: {images:7.2f} images/s "
          f"(batch {cfg.data.batch_size}, crop {cfg.data.crop_size}, {torch.get_num_threads()} threads, {device})")
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
        measured = {setting: throughput(root, Path(tmp), *setting, args.steps, args.warmup, args.device,
                                        args.overrides) for setting in SETTINGS}
    base = measured[SETTINGS[0]]
    print("ratio to contiguous fp32: " + ", ".join(
        f"{layout} {'fp32' if amp == 'none' else amp} {value / base:.2f}x" for (layout, amp), value in measured.items()))


if __name__ == "__main__":
    main()

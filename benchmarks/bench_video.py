"""Video prediction in constant memory: ``predict`` on a video file, frames decoded, predicted (with tracking) and
written one at a time.

    .venv/bin/python benchmarks/bench_video.py [--frames 300] [--size 128x256]

Writes a synthetic video (moving objects, ``data.synthetic_video``) of ``--frames`` frames, then runs the same path
as ``predict --input VIDEO`` (``inference.video.predict_video`` and the overlay video) with a MobileNetV3-L of
random weights, and prints the resident memory after 10% of the frames and at the end (their ratio should stay
near 1 whatever the length; the prediction set's JSON entries are the only thing that grows) and frames per
second. Needs the 'video' extra (PyAV).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from panoptic_deeplab.checkpoint import atomic_torch_save
from panoptic_deeplab.config import config_to_dict, load_config
from panoptic_deeplab.data.synthetic import synthetic_meta
from panoptic_deeplab.data.synthetic_video import synthetic_sequence
from panoptic_deeplab.inference.predictor import Predictor
from panoptic_deeplab.inference.video import VideoWriter, predict_video
from panoptic_deeplab.inference.visualize import overlay_panoptic
from panoptic_deeplab.modeling import build_model


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--size", default="128x256")
    args = parser.parse_args()
    height, width = (int(v) for v in args.size.lower().split("x"))
    meta = synthetic_meta()
    cfg = load_config("synthetic_mnv3", ["model.pretrained=false"])
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        checkpoint = atomic_torch_save({"model": build_model(cfg.model).state_dict(), "config": config_to_dict(cfg),
                                        "meta": [c.to_json() for c in meta.categories]}, folder / "model.pt")
        with VideoWriter(folder / "clip.mp4", 25) as writer:
            for image, _ in synthetic_sequence(args.frames, (height, width), seed=0):
                writer.write(image)
        predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
        early, start = None, time.perf_counter()
        with VideoWriter(folder / "overlay.mp4", 25) as overlay:
            for index, (_, frame, result) in enumerate(predict_video(predictor, folder / "clip.mp4",
                                                                     folder / "p.json", folder / "png")):
                overlay.write(np.asarray(overlay_panoptic(frame, result.label_map, meta, legend=False)))
                if index + 1 == max(1, args.frames // 10):
                    early = (index + 1, _rss_mib())
        seconds = time.perf_counter() - start
        late = _rss_mib()
    assert early is not None
    print(f"{args.frames} frames of {height}x{width}: {args.frames / seconds:.1f} frames/s (MobileNetV3-L, "
          f"{torch.get_num_threads()} threads); resident memory {early[1]:.0f} MiB after {early[0]} frames, "
          f"{late:.0f} MiB after {args.frames} (x{late / early[1]:.2f})")


if __name__ == "__main__":
    main()

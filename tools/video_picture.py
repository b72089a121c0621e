"""The README's tracking picture: a model trained on the synthetic dataset (e.g. by ``make demo``) run with
``Predictor.predict_sequence`` on a synthetic video, four frames of the overlay side by side (each tracked object
keeps its colour).

    .venv/bin/python tools/video_picture.py --checkpoint demo_output/run/model_0000200.pt [--output docs/tracking.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from panoptic_deeplab.atomic import write_atomic
from panoptic_deeplab.data.synthetic_video import MovingObject, synthetic_sequence
from panoptic_deeplab.inference.predictor import Predictor
from panoptic_deeplab.inference.visualize import overlay_panoptic

# Two discs and two squares; the large square passes in front of a disc, the other objects cross the frame.
OBJECTS = [
    MovingObject(20, 12, (80, 40), (0.0, 0.0), depth=0),
    MovingObject(24, 16, (78, -30), (0.0, 8.0), depth=1),
    MovingObject(20, 10, (100, 230), (0.0, -4.0), depth=0),
    MovingObject(24, 9, (60, 150), (1.0, -1.0), depth=0),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--output", type=Path, default=Path("docs/tracking.png"))
    parser.add_argument("--frames", type=int, nargs="+", default=[0, 9, 16, 24])
    args = parser.parse_args()
    predictor = Predictor.from_checkpoint(args.checkpoint, device="cpu")
    video = list(synthetic_sequence(max(args.frames) + 1, (128, 256), OBJECTS))
    results = list(predictor.predict_sequence(image for image, _ in video))
    tiles = [np.asarray(overlay_panoptic(video[i][0], results[i].label_map, predictor.meta, legend=False))
             for i in args.frames]
    gap = np.full((tiles[0].shape[0], 4, 3), 255, np.uint8)
    strip = np.concatenate([part for tile in tiles for part in (tile, gap)][:-1], axis=1)
    write_atomic(args.output, lambda f: Image.fromarray(strip).save(f, format="PNG", optimize=True))
    print(f"wrote {args.output}: frames {args.frames}")


if __name__ == "__main__":
    main()

"""The README's tiling picture: a model trained on the synthetic dataset (e.g. by ``make demo``) on a large synthetic
image (a grid of scenes, objects at the model's training scale), predicted in tiles (their outlines drawn, one colour
per tile) above the same image predicted whole.

    .venv/bin/python tools/tiling_picture.py --checkpoint demo_output/run/model_0000200.pt [--output docs/tiling.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw

from panoptic_deeplab.atomic import write_atomic
from panoptic_deeplab.data.synthetic import render_synthetic_mosaic
from panoptic_deeplab.inference.predictor import Predictor
from panoptic_deeplab.inference.tiling import tile_layout
from panoptic_deeplab.inference.visualize import distinct_colors, overlay_panoptic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--output", type=Path, default=Path("docs/tiling.png"))
    parser.add_argument("--scene", type=int, nargs=2, default=(128, 256), help="scene size H W (the model's images)")
    parser.add_argument("--scenes", type=int, nargs=2, default=(4, 4), help="grid of scenes, rows columns")
    parser.add_argument("--tile", type=int, nargs=2, default=(256, 512))
    parser.add_argument("--overlap", type=int, default=128)
    parser.add_argument("--index", type=int, default=0, help="which image of the synthetic val split")
    args = parser.parse_args()
    image, _, _ = render_synthetic_mosaic(args.index, "val", 0, tuple(args.scene), tuple(args.scenes))
    tiled = Predictor.from_checkpoint(args.checkpoint, device="cpu", tile=args.tile, tile_overlap=args.overlap)
    whole = Predictor.from_checkpoint(args.checkpoint, device="cpu")
    panels = []
    for predictor in (tiled, whole):
        result = predictor.predict(image)
        panels.append(overlay_panoptic(image, result.label_map, predictor.meta, legend=False).convert("RGB"))
    draw = ImageDraw.Draw(panels[0])
    layout = tile_layout(image.shape[0], image.shape[1], args.tile, args.overlap, tiled.model_cfg.output_stride)
    for k, (((top, left, bottom, right), _), color) in enumerate(zip(layout, distinct_colors(len(layout)))):
        inset = 3 * (k % 3)  # outlines of overlapping tiles stay apart
        draw.rectangle((left + inset, top + inset, right - 1 - inset, bottom - 1 - inset), outline=color, width=2)
    gap = Image.new("RGB", (panels[0].width, 6), (255, 255, 255))
    picture = Image.new("RGB", (panels[0].width, 2 * panels[0].height + gap.height), (255, 255, 255))
    picture.paste(panels[0], (0, 0))
    picture.paste(panels[1], (0, panels[0].height + gap.height))
    # A palette of 128 colours: the noisy synthetic textures would make a full-colour PNG several megabytes.
    picture = picture.resize((picture.width * 3 // 4, picture.height * 3 // 4), Image.Resampling.LANCZOS)
    picture = picture.quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    write_atomic(args.output, lambda f: picture.save(f, format="PNG", optimize=True))
    print(f"wrote {args.output}: {image.shape[0]}x{image.shape[1]} image, tiles {args.tile[0]}x{args.tile[1]} "
          f"(overlap {args.overlap}) above, whole below")


if __name__ == "__main__":
    main()

"""Tiled prediction (``Predictor(tile=...)``, ``predict --tile``) against whole-image prediction.

    .venv/bin/python benchmarks/bench_tiling.py [--size 2048x4096] [--tile 512x512] [--overlap 128] [--no-memory]
        [--checkpoint demo_output/run/model_0000200.pt --split data/mosaic/val --split-tile 256x512
         --split-overlap 128 [--top-k 999] [--tile-context-passes 2]]

1. Memory and time, MobileNetV3-L (``cityscapes_mnv3``) with random weights on random images of half ``--size``
   and ``--size``, each run in a fresh subprocess: peak resident memory of ``predict`` above the loaded model
   (Linux ``VmHWM`` after resetting it), whole image against tiles and against tiles with ``low_memory`` (bands),
   and how much each grows per image pixel. The network's activations follow the tile; with plain tiles the
   stitched maps ((classes + 3) float32 per pixel) and the post-processing follow the image; with ``low_memory``
   what grows with the image is the result itself (label and semantic maps, center heatmap, offsets) and the
   input.
2. With ``--checkpoint`` (a model trained on the synthetic dataset, e.g. by ``make demo``) and a synthetic
   ``--split`` folder: PQ against the ground truth of whole-image and of tiled predictions (tiles of
   ``--split-tile``), and PQ of the tiled predictions scored against the whole-image ones (100 = identical). Make
   the split with objects at the scale the model was trained on, e.g. for the demo model (128x256 images)
   ``make-synthetic --out data/mosaic --split val --num 8 --size 128x256 --scenes 4x4`` (512x1024 images of 16
   scenes each) with ``--split-tile 256x512``: the image is four times the tile. Larger tiles see more of the
   network's reach (``--scenes 10x10``, 1280x2560 images, with ``--split-tile 640x1280 --split-overlap 256``);
   give ``--top-k 999``: such an image holds about 700 objects, more than the default 200 centers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from panoptic_deeplab.checkpoint import atomic_torch_save, load_checkpoint
from panoptic_deeplab.config import SplitConfig, config_from_dict, config_to_dict, load_config
from panoptic_deeplab.data.metadata import dataset_meta
from panoptic_deeplab.evaluation import evaluate_model, evaluate_panoptic_files
from panoptic_deeplab.inference.predictor import Predictor, list_images, predict_folder
from panoptic_deeplab.modeling import build_model
from panoptic_deeplab.modeling.random_weights import randomize_weights


def _size(text: str) -> tuple[int, int]:
    height, width = text.lower().split("x")
    return int(height), int(width)


# What any prediction holds per image pixel: the result's label and semantic maps (int64), center heatmap (float32)
# and offsets (2 x float32); the input as the float32 [3, H, W] tensor the predictor converts it to.
RESULT_BYTES = 8 + 8 + 4 + 8
INPUT_BYTES = 12


def _kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def worker(checkpoint: str, size: tuple[int, int], tile: tuple[int, int] | None, overlap: int,
           low_memory: bool) -> None:
    """One measured ``predict`` in this process; prints a JSON line."""
    torch.set_num_threads(2)
    image = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu", tile=tile, tile_overlap=overlap,
                                          low_memory=low_memory)
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak-RSS counter (Linux >= 4.0)
        f.write("5")
    before = _kib("VmRSS")
    start = time.perf_counter()
    result = predictor.predict(image)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_mib": (_kib("VmHWM") - before) / 1024,
                      "instances": len(result.instances)}))


def _measure(checkpoint: Path, size: tuple[int, int], tile: tuple[int, int] | None, overlap: int,
             low_memory: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--worker", str(checkpoint), "--size", f"{size[0]}x{size[1]}",
           "--overlap", str(overlap)] + (["--tile", f"{tile[0]}x{tile[1]}"] if tile else [])
    cmd += ["--low-memory"] if low_memory else []
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _pq(checkpoint: Path, split: Path, tile: tuple[int, int], overlap: int, top_k: int | None, passes: int,
        folder: Path) -> dict[str, float]:
    """PQ of whole-image and tiled predictions against the split's ground truth, and of tiled against whole."""
    (gt_json,) = split.glob("*.json")
    truth = SplitConfig(images=str(split / "images"), json=str(gt_json), panoptic=str(split / "panoptic"))
    images = list_images(split / "images")
    post = config_from_dict(load_checkpoint(checkpoint, map_location="cpu")["config"]).postprocess
    post = post if top_k is None else dataclasses.replace(post, top_k=top_k)
    pq, sets = {}, {}
    tiled = {"tile": tile, "tile_overlap": overlap, "tile_context_passes": passes}
    for name, options in (("whole", {}), ("tiled", tiled)):
        predictor = Predictor.from_checkpoint(checkpoint, device="cpu", postprocess=post, **options)
        pq[f"{name} vs ground truth"] = 100 * evaluate_model(predictor, truth, progress=False).panoptic.all.pq
        json_path, png_dir = folder / f"{name}.json", folder / name
        for _ in predict_folder(predictor, images, json_path, png_dir):
            pass
        sets[name] = (json_path, png_dir)
    pq["tiled vs whole"] = 100 * evaluate_panoptic_files(*sets["whole"], *sets["tiled"], progress=False).all.pq
    return pq


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=_size, default=(2048, 4096))
    parser.add_argument("--tile", type=_size, default=(512, 512))
    parser.add_argument("--overlap", type=int, default=128)
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--split", type=Path, default=None)
    parser.add_argument("--split-tile", type=_size, default=(256, 512))
    parser.add_argument("--split-overlap", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=None, help="instance centers kept per image (default the "
                        "checkpoint's, 200): a split of many scenes per image needs more")
    parser.add_argument("--tile-context-passes", type=int, default=1, help="backbone passes gathering the image's "
                        "averages (Predictor(tile_context_passes=...), default 1)")
    parser.add_argument("--no-memory", action="store_true", help="skip part 1 (memory and time)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--low-memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.size, args.tile if "--tile" in sys.argv else None, args.overlap, args.low_memory)
        return

    if not args.no_memory:
        _memory(args.size, args.tile, args.overlap)
    if args.checkpoint is not None:
        if args.split is None:
            parser.error("--checkpoint needs --split")
        with tempfile.TemporaryDirectory() as tmp:
            pq = _pq(args.checkpoint, args.split, args.split_tile, args.split_overlap, args.top_k,
                     args.tile_context_passes, Path(tmp))
        tile = args.split_tile
        print(f"PQ on {args.split}, tiles {tile[0]}x{tile[1]} (overlap {args.split_overlap}, "
              f"{args.tile_context_passes} context pass(es)): "
              + ", ".join(f"{name} {value:.2f}" for name, value in pq.items()))


def _memory(size: tuple[int, int], tile: tuple[int, int], overlap: int) -> None:
    """Part 1: peak memory and time of whole, tiled and low-memory tiled prediction at half ``size`` and ``size``."""
    cfg = load_config("cityscapes_mnv3", ["model.pretrained=false"])
    torch.manual_seed(0)
    model = randomize_weights(build_model(cfg.model).eval())
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = atomic_torch_save({"model": model.state_dict(), "config": config_to_dict(cfg),
                                        "meta": dataset_meta("cityscapes").to_json()}, Path(tmp) / "model.pt")
        height, width = size
        print("MobileNetV3-L, random weights, 2 threads; peak memory of predict above the loaded model")
        print(f"tiles {tile[0]}x{tile[1]} with {overlap} px overlap; the result alone holds "
              f"{RESULT_BYTES} bytes per pixel and the input {INPUT_BYTES}")
        modes = {"whole": (None, False), "tiles": (tile, False), "tiles --low-memory": (tile, True)}
        sizes = ((height // 2, width // 2), (height, width))
        runs: dict[str, list[dict]] = {mode: [] for mode in modes}
        for image_size in sizes:
            for mode, (mode_tile, low_memory) in modes.items():
                run = _measure(checkpoint, image_size, mode_tile, overlap if mode_tile else 0, low_memory)
                runs[mode].append(run)
                print(f"{image_size[0]}x{image_size[1]} {mode:<19} {run['seconds']:6.1f} s "
                      f"{run['peak_mib']:7.0f} MiB (whole / this "
                      f"{runs['whole'][-1]['peak_mib'] / run['peak_mib']:.1f}x)",
                      flush=True)
        added_pixels = sizes[1][0] * sizes[1][1] - sizes[0][0] * sizes[0][1]
        for mode, (small, large) in runs.items():
            per_pixel = (large["peak_mib"] - small["peak_mib"]) * 2**20 / added_pixels
            fixed = large["peak_mib"] - per_pixel * sizes[1][0] * sizes[1][1] / 2**20
            print(f"{mode:<19} grows by {per_pixel:.0f} bytes per image pixel "
                  f"({per_pixel - RESULT_BYTES - INPUT_BYTES:.0f} beyond the result and the input) on top of "
                  f"{fixed:.0f} MiB")


if __name__ == "__main__":
    main()

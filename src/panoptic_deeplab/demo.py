"""The main job end to end on the built-in synthetic dataset (what `make demo` runs).

1. write the synthetic train and val splits (COCO panoptic format),
2. train the CPU preset ``synthetic_mnv3``,
3. evaluate the final model on val (PQ/SQ/RQ, mIoU, COCO and Cityscapes mask AP),
4. predict a few val images and draw their pictures (overlay, center heatmap, offset field),
5. print where everything is.

Every step goes through the public Python API, as a user's script would.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from panoptic_deeplab.config import Config, load_config
from panoptic_deeplab.data.coco_panoptic import load_image, load_panoptic_json
from panoptic_deeplab.data.synthetic import make_synthetic_dataset


@dataclass
class DemoOptions:
    output_dir: str = "demo_output"
    preset: str = "synthetic_mnv3"
    train_images: int = 300
    val_images: int = 50
    image_size: tuple[int, int] = (128, 256)
    iterations: int | None = None  # None: the preset's solver.max_iter
    num_pictures: int = 4
    seed: int = 0
    overrides: Sequence[str] = ()
    progress: bool = True


@dataclass
class DemoResult:
    config: Config
    checkpoint: Path
    report_path: Path
    pictures: list[Path]
    summary: dict[str, float | None]
    seconds: dict[str, float] = field(default_factory=dict)


def _demo_config(options: DemoOptions, data_root: Path, run_dir: Path) -> Config:
    overrides = [
        f"data.train.images={data_root / 'train' / 'images'}",
        f"data.train.json={data_root / 'train' / 'panoptic_train.json'}",
        f"data.train.panoptic={data_root / 'train' / 'panoptic'}",
        f"data.val.images={data_root / 'val' / 'images'}",
        f"data.val.json={data_root / 'val' / 'panoptic_val.json'}",
        f"data.val.panoptic={data_root / 'val' / 'panoptic'}",
        f"train.output_dir={run_dir}",
        f"train.seed={options.seed}",
        # the demo evaluates the final model itself, with the full report: no periodic evaluation
        "train.eval_period=0",
    ]
    if options.iterations is not None:
        overrides.append(f"solver.max_iter={options.iterations}")
    return load_config(options.preset, [*overrides, *options.overrides])


def run_demo(options: DemoOptions) -> DemoResult:
    """Run the whole demo; returns where its outputs are and the headline metrics."""
    # imported here: torch and the model are heavy, and the data step does not need them
    from panoptic_deeplab.engine.trainer import train
    from panoptic_deeplab.evaluation.evaluator import evaluate_model
    from panoptic_deeplab.inference.predictor import Predictor
    from panoptic_deeplab.inference.visualize import save_pictures

    out = Path(options.output_dir)
    data_root, run_dir = out / "data", out / "run"
    seconds: dict[str, float] = {}

    start = time.perf_counter()
    for split, count in (("train", options.train_images), ("val", options.val_images)):
        print(f"[1/4] writing {count} synthetic {split} images of {options.image_size[0]}x{options.image_size[1]} "
              f"to {data_root / split}")
        make_synthetic_dataset(data_root, split, count, options.image_size, options.seed, progress=options.progress)
    seconds["data"] = time.perf_counter() - start

    cfg = _demo_config(options, data_root, run_dir)
    print(f"[2/4] training {cfg.model.backbone} for {cfg.solver.max_iter} iterations "
          f"(batch {cfg.data.batch_size}, crop {cfg.data.crop_size[0]}x{cfg.data.crop_size[1]}) in {run_dir}")
    start = time.perf_counter()
    result = train(cfg, progress=options.progress)
    seconds["train"] = time.perf_counter() - start
    if result.last_checkpoint is None:
        raise RuntimeError(f"training wrote no checkpoint in {run_dir}")

    print(f"[3/4] evaluating {result.last_checkpoint.name} on {options.val_images} val images")
    start = time.perf_counter()
    predictor = Predictor.from_checkpoint(result.last_checkpoint, device=cfg.train.device)
    report = evaluate_model(predictor, cfg.data.val, predictions_dir=out / "predictions", progress=options.progress)
    report_path = out / "evaluation.json"
    report.save_json(report_path)
    seconds["evaluate"] = time.perf_counter() - start
    print(report.format_table())

    print(f"[4/4] drawing {options.num_pictures} val predictions in {out / 'pictures'}")
    val = load_panoptic_json(cfg.data.val.json)
    pictures: list[Path] = []
    for image_info in val.images[: options.num_pictures]:
        image_path = Path(cfg.data.val.images) / image_info.file_name
        image = load_image(image_path)
        pictures += save_pictures(image, predictor.predict(image), predictor.meta, out / "pictures", image_path.stem)

    summary = report.summary()
    print()
    print(f"PQ {100 * summary['PQ']:.1f}  SQ {100 * summary['SQ']:.1f}  RQ {100 * summary['RQ']:.1f}  "
          f"mIoU {100 * summary['mIoU']:.1f}  (synthetic val, {options.val_images} images)")
    print(f"data:        {data_root}")
    print(f"checkpoint:  {result.last_checkpoint}")
    print(f"tensorboard: tensorboard --logdir {run_dir / 'tensorboard'}")
    print(f"report:      {report_path}")
    print(f"predictions: {out / 'predictions'} (COCO panoptic)")
    print(f"pictures:    {out / 'pictures'} (*_overlay.png, *_center.png, *_offset.png)")
    print("time:        " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()))
    return DemoResult(cfg, result.last_checkpoint, report_path, pictures, summary, seconds)

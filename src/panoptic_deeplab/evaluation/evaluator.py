"""Evaluate a model over a dataset split: predictor -> PQ, mIoU, COCO and Cityscapes mask AP (SPEC §6).

:func:`evaluate_model` runs a :class:`~panoptic_deeplab.inference.predictor.Predictor` over every image of a
split at the image's own size (no augmentation; the predictor pads and crops back), feeds the ground-truth
label maps and the predictions to the four evaluators of this package and, optionally, writes the predictions
in the COCO panoptic format so that the files form (:func:`evaluate_panoptic_files`, ``panoptic-deeplab
evaluate --gt-json ...``) re-scores them to the same PQ. :func:`evaluate_in_memory` is the form for a model
being trained: it wraps the model in a predictor and gives the model back in the mode it had.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from panoptic_deeplab.config import Config, ConfigError, SplitConfig, config_from_dict, load_config, parse_override
from panoptic_deeplab.data.coco_panoptic import DatasetMeta
from panoptic_deeplab.data.dataset import PanopticDataset
from panoptic_deeplab.data.transforms import EvalTransform
from panoptic_deeplab.evaluation.instance_ap import CityscapesInstanceEvaluator, COCOInstanceEvaluator
from panoptic_deeplab.evaluation.panoptic_quality import PanopticEvaluator
from panoptic_deeplab.evaluation.report import (
    InstanceReport,
    PanopticReport,
    SemanticReport,
    format_percent,
    write_json_atomic,
)
from panoptic_deeplab.evaluation.semantic import SemanticEvaluator
from panoptic_deeplab.inference.predictor import Predictor
from panoptic_deeplab.inference.results import PanopticPredictionWriter, PanopticResult

PREDICTIONS_JSON = "predictions.json"  # inside predictions_dir, beside the PNG folder (as `predict` writes)
PREDICTIONS_PNG_DIR = "panoptic"


@dataclass
class EvaluationReport:
    """Every metric of one evaluation run (fractions in [0, 1]; AP ``None`` where there is no thing ground truth)."""

    panoptic: PanopticReport
    semantic: SemanticReport
    coco_ap: InstanceReport
    cityscapes_ap: InstanceReport
    num_images: int
    seconds: float

    def summary(self) -> dict[str, float | None]:
        """The headline numbers as a flat dict (for logs and TensorBoard)."""
        return {
            "PQ": self.panoptic.all.pq,
            "SQ": self.panoptic.all.sq,
            "RQ": self.panoptic.all.rq,
            "PQ_things": self.panoptic.things.pq,
            "PQ_stuff": self.panoptic.stuff.pq,
            "mIoU": self.semantic.miou,
            "AP_coco": self.coco_ap.ap,
            "AP50_coco": self.coco_ap.ap50,
            "AP_cityscapes": self.cityscapes_ap.ap,
            "AP50_cityscapes": self.cityscapes_ap.ap50,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_images": self.num_images,
            "seconds": self.seconds,
            "summary": self.summary(),
            "panoptic": self.panoptic.to_dict(),
            "semantic": self.semantic.to_dict(),
            "coco_ap": self.coco_ap.to_dict(),
            "cityscapes_ap": self.cityscapes_ap.to_dict(),
        }

    def save_json(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_dict` to ``path`` atomically."""
        write_json_atomic(path, self.to_dict())

    def format_table(self) -> str:
        """Summary (PQ/SQ/RQ All/Things/Stuff, mIoU, AP/AP50 COCO and Cityscapes), then one row per class."""
        p = self.panoptic
        rows = [(c.name, c) for c in p.per_class]
        name_w = max([20] + [len(name) for name, _ in rows])  # 20: "AP / AP50 Cityscapes"
        lines = [f"{self.num_images} images in {self.seconds:.1f} s", ""]
        lines.append(f"{'':{name_w}s} | {'PQ':>6s} {'SQ':>6s} {'RQ':>6s} {'N':>4s}")
        lines.append("-" * (name_w + 30))
        for label, m in (("All", p.all), ("Things", p.things), ("Stuff", p.stuff)):
            values = (None, None, None) if m.n == 0 else (m.pq, m.sq, m.rq)
            lines.append(f"{label:{name_w}s} | " + " ".join(format_percent(v) for v in values) + f" {m.n:4d}")
        lines.append("")
        lines.append(f"{'mIoU':{name_w}s} | {format_percent(self.semantic.miou)}")
        lines.append(f"{'pixel accuracy':{name_w}s} | {format_percent(self.semantic.pixel_accuracy)}")
        lines.append(f"{'AP / AP50 COCO':{name_w}s} | {format_percent(self.coco_ap.ap)} {format_percent(self.coco_ap.ap50)}")
        lines.append(
            f"{'AP / AP50 Cityscapes':{name_w}s} | {format_percent(self.cityscapes_ap.ap)} {format_percent(self.cityscapes_ap.ap50)}"
        )
        lines.append("")
        header = (
            f"{'Category':{name_w}s} | {'PQ':>6s} {'SQ':>6s} {'RQ':>6s} {'TP':>6s} {'FP':>6s} {'FN':>6s} | "
            f"{'IoU':>6s} | {'AP-CO':>6s} {'AP-CS':>6s}  kind"
        )
        lines.extend([header, "-" * len(header)])
        for name, c in rows:
            pq = (c.pq, c.sq, c.rq) if c.evaluated else (None, None, None)
            ap = (self.coco_ap.per_class_ap.get(name), self.cityscapes_ap.per_class_ap.get(name))
            lines.append(
                f"{name:{name_w}s} | " + " ".join(format_percent(v) for v in pq)
                + f" {c.tp:6d} {c.fp:6d} {c.fn:6d} | {format_percent(self.semantic.per_class_iou.get(name))} | "
                + (" ".join(format_percent(v) for v in ap) if c.isthing else f"{'':13s}")
                + f"  {'thing' if c.isthing else 'stuff'}"
            )
        return "\n".join(lines)


def _category_signature(meta: DatasetMeta) -> list[tuple[int, bool]]:
    return [(c.id, c.isthing) for c in meta.categories]


def _open_split(split: SplitConfig | PanopticDataset, meta: DatasetMeta) -> PanopticDataset:
    """The dataset to evaluate on, checked to give original-size samples with the predictor's categories."""
    if isinstance(split, SplitConfig):
        dataset = PanopticDataset(split, transform=None)
    elif isinstance(split, PanopticDataset):
        # Padding only (EvalTransform) is undone with orig_size; a resizing/cropping transform cannot be.
        if split.transform is not None and not isinstance(split.transform, EvalTransform):
            raise ValueError(
                f"{split.split.json}: evaluation needs the original images, but the dataset has the transform "
                f"{type(split.transform).__name__}; build it with transform=None"
            )
        dataset = split
    else:
        raise TypeError(f"expected a SplitConfig or a PanopticDataset to evaluate on, got {type(split).__name__}")
    if _category_signature(dataset.meta) != _category_signature(meta):
        raise ValueError(
            f"{dataset.split.json}: the dataset's categories (id, isthing) {_category_signature(dataset.meta)} "
            f"differ from the model's {_category_signature(meta)}"
        )
    return dataset


def _instances(result: PanopticResult) -> list[dict[str, Any]]:
    """Instances as the AP evaluators take them (train ids; each mask computed once, shared by both)."""
    return [{"category_id": inst.train_id, "score": inst.score, "mask": inst.mask} for inst in result.instances]


def _image_file_name(dataset: PanopticDataset, index: int) -> str:
    info = dataset.image_infos[index]
    return info.file_name if info is not None else os.path.basename(dataset.image_paths[index])


def evaluate_model(
    predictor: Predictor,
    split: SplitConfig | PanopticDataset,
    *,
    predictions_dir: str | os.PathLike[str] | None = None,
    max_images: int | None = None,
    progress: bool = True,
    num_workers: int = 0,
) -> EvaluationReport:
    """Predict every image of ``split`` and score the predictions: PQ, mIoU, COCO and Cityscapes mask AP.

    ``split``: the paths of a split (a :class:`SplitConfig`), or a :class:`PanopticDataset` without
    augmentation (``transform`` None or an :class:`EvalTransform`, whose padding is cropped off). Images run
    ``predictor.batch_size`` at a time; ground truth is compared at the image's original size.
    ``predictions_dir``: also write ``DIR/predictions.json`` + ``DIR/panoptic/*.png`` (COCO panoptic,
    committed atomically when the run completes; image ids as in the ground-truth JSON). ``max_images``: only
    the first N images (the written predictions then cover only those). ``num_workers``: DataLoader processes
    reading images. The predictor's model is left in the train/eval mode it had when this was called.
    """
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    dataset = _open_split(split, predictor.meta)
    meta = dataset.meta
    count = len(dataset) if max_images is None else min(max_images, len(dataset))
    loader = DataLoader(
        Subset(dataset, range(count)),
        batch_size=predictor.batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=list,  # images keep their own sizes: the predictor pads each batch itself
        # Its own generator: creating the iterator then draws no seed from the global torch RNG, so evaluating
        # in the middle of training leaves the training run's random stream unchanged.
        generator=torch.Generator(),
    )
    panoptic = PanopticEvaluator(meta)
    semantic = SemanticEvaluator(meta.num_classes, meta.ignore_label, meta.class_names)
    coco = COCOInstanceEvaluator(meta)
    cityscapes = CityscapesInstanceEvaluator(meta)
    writer = None
    if predictions_dir is not None:
        out = Path(predictions_dir)
        writer = PanopticPredictionWriter(out / PREDICTIONS_JSON, out / PREDICTIONS_PNG_DIR, predictor.meta)

    was_training = predictor.model.training
    start = time.perf_counter()
    bar = tqdm(total=count, unit="img", desc="evaluate", disable=not progress)
    try:
        for samples in loader:
            sizes = [(int(s["orig_size"][0]), int(s["orig_size"][1])) for s in samples]  # crop EvalTransform padding
            results = predictor.predict_batch([s["image"][:, :h, :w] for s, (h, w) in zip(samples, sizes)])
            for sample, (height, width), result in zip(samples, sizes, results):
                index = int(sample["index"])
                gt = sample["label_map"][:height, :width].numpy()
                image_id = dataset.annotations[index].image_id  # the JSON's value (int or str), as the files form
                panoptic.update(gt, result.label_map, image_id=image_id)
                # SPEC §6: semantic gt = train id, void 255 (label // divisor gives both; crowd keeps its class)
                semantic.update(gt // meta.label_divisor, result.semantic)
                instances = _instances(result)
                coco.update(gt, instances)
                cityscapes.update(gt, instances)
                if writer is not None:
                    writer.add(result, _image_file_name(dataset, index), image_id=image_id)
                bar.update(1)
        if writer is not None:
            writer.commit()
    finally:
        bar.close()
        if writer is not None:
            writer.discard()  # no-op after a commit
        predictor.model.train(was_training)
    seconds = time.perf_counter() - start
    return EvaluationReport(
        panoptic=panoptic.compute(),
        semantic=semantic.compute(),
        coco_ap=coco.compute(),
        cityscapes_ap=cityscapes.compute(),
        num_images=count,
        seconds=seconds,
    )


def evaluate_in_memory(
    model: nn.Module,
    cfg: Config,
    meta: DatasetMeta,
    split: SplitConfig | PanopticDataset | None = None,
    *,
    tta_flip: bool = False,
    tta_scales: Sequence[float] = (1.0,),
    max_images: int | None = None,
    progress: bool = False,
) -> EvaluationReport:
    """Periodic evaluation of a model being trained: ``model`` (unwrapped from DDP) on ``split``.

    ``split`` defaults to ``cfg.data.val``; batches of ``cfg.data.eval_batch_size`` images, read by
    ``cfg.data.num_workers`` processes; post-processing per ``cfg.postprocess``. The model stays on its device
    and gets back the train/eval mode it had (``Predictor`` switches it to eval mode).
    """
    was_training = model.training
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    try:
        predictor = Predictor(
            model, cfg, meta, device=device, tta_flip=tta_flip, tta_scales=tta_scales,
            batch_size=cfg.data.eval_batch_size,
        )
        return evaluate_model(
            predictor, cfg.data.val if split is None else split, max_images=max_images, progress=progress,
            num_workers=cfg.data.num_workers,
        )
    finally:
        model.train(was_training)


def evaluation_config(
    checkpoint: dict[str, Any],
    source: str,
    config: str | None = None,
    overrides: Sequence[str] = (),
) -> Config:
    """The config to evaluate a loaded ``checkpoint`` with: ``config`` (a preset or YAML file) when given, else
    the one saved in the checkpoint; then the ``key=value`` ``overrides``. ``source`` names the checkpoint."""
    if config is not None:
        return load_config(config, overrides)
    if not isinstance(checkpoint.get("config"), dict):
        raise ValueError(f"checkpoint {source} has no saved 'config': give one with --config")
    raw = copy.deepcopy(checkpoint["config"])
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for depth, key in enumerate(path[:-1]):
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {'.'.join(path[: depth + 1])!r} is a value, not a section")
        node[path[-1]] = value
    with_overrides = f" with the overrides {' '.join(overrides)}" if overrides else ""
    # config_from_dict checks keys and types and names this source in its errors
    return config_from_dict(raw, source=f"config of checkpoint {source}{with_overrides}")


__all__ = [
    "EvaluationReport",
    "evaluate_in_memory",
    "evaluate_model",
    "evaluation_config",
    "PREDICTIONS_JSON",
    "PREDICTIONS_PNG_DIR",
]

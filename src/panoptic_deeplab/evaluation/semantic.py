"""Semantic segmentation mIoU from a confusion matrix (SPEC §6: ignore label 255)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from panoptic_deeplab.data.coco_panoptic import IGNORE_LABEL
from panoptic_deeplab.evaluation.report import SemanticReport


def _as_int_array(x: Any, what: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.integer):
        raise ValueError(f"{what}: expected integer class ids, got {x.dtype}")
    return x.astype(np.int64, copy=False)


class SemanticEvaluator:
    """Accumulates a ``[num_classes, num_classes]`` confusion matrix (rows ground truth, columns prediction).

    Ground-truth pixels equal to ``ignore_label`` are skipped. A prediction outside ``0..num_classes-1`` (e.g. 255
    for void) on a labelled pixel counts as a miss of the ground-truth class and as no class's false positive.
    """

    def __init__(self, num_classes: int, ignore_label: int = IGNORE_LABEL, class_names: Sequence[str] | None = None):
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.num_classes = num_classes
        self.ignore_label = ignore_label
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        self.reset()

    def reset(self) -> None:
        # one extra column collects predictions that are not a class
        self.confusion = np.zeros((self.num_classes, self.num_classes + 1), dtype=np.int64)

    def update(self, gt: Any, pred: Any) -> None:
        """Add ground-truth and predicted semantic maps of the same shape (numpy or torch, any batch shape)."""
        gt = _as_int_array(gt, "ground truth")
        pred = _as_int_array(pred, "prediction")
        if gt.shape != pred.shape:
            raise ValueError(f"ground truth {gt.shape} and prediction {pred.shape} differ in shape")
        valid = gt != self.ignore_label
        g = gt[valid]
        if g.size and (g.min() < 0 or g.max() >= self.num_classes):
            bad = np.unique(g[(g < 0) | (g >= self.num_classes)])[:10].tolist()
            raise ValueError(
                f"ground truth has class ids {bad} outside 0..{self.num_classes - 1} (ignore is {self.ignore_label})"
            )
        p = pred[valid]
        p = np.where((p >= 0) & (p < self.num_classes), p, self.num_classes)
        n = self.num_classes + 1
        self.confusion += np.bincount(g * n + p, minlength=self.num_classes * n).reshape(self.num_classes, n)

    def iou_per_class(self) -> np.ndarray:
        """IoU of each class; NaN for a class absent from both ground truth and prediction."""
        tp = np.diag(self.confusion[:, : self.num_classes]).astype(np.float64)
        gt_count = self.confusion.sum(axis=1)
        pred_count = self.confusion[:, : self.num_classes].sum(axis=0)
        union = gt_count + pred_count - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, tp / union, np.nan)

    def compute(self) -> SemanticReport:
        iou = self.iou_per_class()
        total = self.confusion.sum()
        present = ~np.isnan(iou)
        return SemanticReport(
            miou=float(iou[present].mean()) if present.any() else 0.0,
            pixel_accuracy=float(np.trace(self.confusion[:, : self.num_classes]) / total) if total else 0.0,
            per_class_iou={
                name: (float(v) if ok else None) for name, v, ok in zip(self.class_names, iou, present)
            },
        )

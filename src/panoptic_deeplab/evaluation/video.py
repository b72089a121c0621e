"""Video panoptic metrics on label maps (``train_id * label_divisor + instance``, void ``ignore_label *
label_divisor``), computed as deeplab2 computes them:

* **STQ**, segmentation and tracking quality (Weber et al., "STEP", 2021), from deeplab2's
  ``evaluation/numpy/segmentation_and_tracking_quality.py`` (``STQuality``): STQ = sqrt(AQ x IoU). AQ, association
  quality, over the ground-truth tracks g of thing classes (crowd regions, instance 0, left out on both sides):
  ``sum_g 1/|g| sum_p TPA(p, g) * TPA / (TPA + FPA + FNA)`` with sizes and overlaps counted over all frames of a
  sequence, divided by the number of tracks of all sequences. IoU: the mean class IoU of one confusion matrix per
  sequence, summed over the sequences; as in deeplab2, pixels whose ground truth is void are left out, pixels
  predicted void count as a column of the void class, and that class enters the mean (with IoU 0) whenever
  some pixel was predicted void.
* **VPQ**, video panoptic quality (Kim et al., 2020), from deeplab2's ``evaluation/video_panoptic_quality.py``: the
  frames of a window of k consecutive frames concatenated side by side and scored as one image by PQ (a track
  must keep its id within the window to count), accumulated over every window of every sequence; VPQ is the
  mean over the window sizes.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any, Hashable, Sequence

import numpy as np

from panoptic_deeplab.data.coco_panoptic import DatasetMeta
from panoptic_deeplab.evaluation.panoptic_quality import PanopticEvaluator


def _counts(values: np.ndarray) -> dict[int, int]:
    labels, counts = np.unique(values, return_counts=True)
    return {int(label): int(count) for label, count in zip(labels, counts)}


class SegmentationTrackingQuality:
    """STQ over sequences of label maps (module doc); ``update`` frame by frame, then ``result``."""

    def __init__(self, num_classes: int, thing_train_ids: Sequence[int], label_divisor: int = 1000,
                 ignore_label: int = 255) -> None:
        if ignore_label < num_classes:
            raise ValueError(f"ignore_label {ignore_label} is one of the {num_classes} classes: it must be above them")
        self.num_classes, self.label_divisor, self.ignore_label = num_classes, label_divisor, ignore_label
        self.thing_train_ids = list(thing_train_ids)
        self._size = num_classes + 1  # the last row and column: void
        self._confusion: dict[Hashable, np.ndarray] = {}
        self._gt: dict[Hashable, Counter] = defaultdict(Counter)
        self._pred: dict[Hashable, Counter] = defaultdict(Counter)
        self._both: dict[Hashable, Counter] = defaultdict(Counter)

    def update(self, gt_label_map: np.ndarray, pred_label_map: np.ndarray, sequence_id: Hashable = 0) -> None:
        """Add one frame of sequence ``sequence_id`` (frames of a sequence in any order)."""
        gt, pred = np.asarray(gt_label_map, np.int64), np.asarray(pred_label_map, np.int64)
        if gt.shape != pred.shape:
            raise ValueError(f"ground truth is {gt.shape} but the prediction is {pred.shape}")
        gt_class, pred_class = gt // self.label_divisor, pred // self.label_divisor
        void = self.num_classes  # the ignore label's row and column
        rows = np.where(gt_class == self.ignore_label, void, gt_class).ravel()
        cols = np.where(pred_class == self.ignore_label, void, pred_class).ravel()
        if ((rows < 0) | (rows > void) | (cols < 0) | (cols > void)).any():
            raise ValueError(f"labels must decode to classes 0..{self.num_classes - 1} or the ignore label "
                             f"{self.ignore_label}")
        confusion = self._confusion.setdefault(sequence_id, np.zeros((self._size, self._size), dtype=np.int64))
        np.add.at(confusion, (rows, cols), 1)
        gt_thing = np.isin(gt_class, self.thing_train_ids)
        crowd = gt_thing & (gt % self.label_divisor == 0)
        gt_thing &= ~crowd
        pred_thing = np.isin(pred_class, self.thing_train_ids) & ~crowd
        self._gt[sequence_id].update(_counts(gt[gt_thing]))
        self._pred[sequence_id].update(_counts(pred[pred_thing]))
        both = gt_thing & pred_thing
        pairs = np.stack([gt[both], pred[both]], axis=1)
        if len(pairs):
            values, counts = np.unique(pairs, axis=0, return_counts=True)
            self._both[sequence_id].update({(int(g), int(p)): int(c) for (g, p), c in zip(values, counts)})

    def result(self) -> dict[str, Any]:
        """``STQ``, ``AQ``, ``IoU`` over all sequences, and the same per sequence (``*_per_sequence``, in the order
        sequences were first seen)."""
        sequences = list(self._confusion)
        aq_sums, tubes = [], []
        for sequence in sequences:
            gt, pred, both = self._gt[sequence], self._pred[sequence], self._both[sequence]
            total = 0.0
            for (g, p), tpa in both.items():
                total += tpa * tpa / (pred[p] + gt[g] - tpa) / gt[g]
            aq_sums.append(total)
            tubes.append(len(gt))
        aq = sum(aq_sums) / max(sum(tubes), 1e-15)
        ious = [self._mean_iou(self._confusion[s]) for s in sequences]
        iou = self._mean_iou(sum(self._confusion.values()))
        aq_per = [a / max(t, 1e-15) for a, t in zip(aq_sums, tubes)]
        return {
            "STQ": float(np.sqrt(aq * iou)), "AQ": float(aq), "IoU": float(iou),
            "STQ_per_sequence": [float(np.sqrt(a * i)) for a, i in zip(aq_per, ious)],
            "AQ_per_sequence": aq_per, "IoU_per_sequence": ious, "sequences": sequences,
        }

    def _mean_iou(self, confusion: np.ndarray) -> float:
        confusion = confusion.copy()
        confusion[self.num_classes, :] = 0  # ground-truth void is not scored
        hits = np.diag(confusion)
        unions = confusion.sum(axis=0) + confusion.sum(axis=1) - hits
        scored = np.count_nonzero(unions)
        return float((hits / np.maximum(unions, 1e-15)).sum() / max(scored, 1))


def video_panoptic_quality(
    sequences: Sequence[tuple[Sequence[np.ndarray], Sequence[np.ndarray]]],
    meta: DatasetMeta,
    window_sizes: Sequence[int] = (1, 2, 3, 4),
) -> dict[str, Any]:
    """VPQ of ``sequences`` (pairs of ground-truth and predicted frame lists, label maps) (module doc): ``VPQ`` the
    mean over ``window_sizes`` of ``VPQ_k`` (PQ of every k-frame window side by side), each also given."""
    if not window_sizes or any(k < 1 for k in window_sizes):
        raise ValueError(f"window sizes must be positive frame counts, got {list(window_sizes)}")
    scores: dict[str, Any] = {}
    for k in window_sizes:
        evaluator = PanopticEvaluator(meta)
        windows = 0
        for gt_frames, pred_frames in sequences:
            if len(gt_frames) != len(pred_frames):
                raise ValueError(f"a sequence has {len(gt_frames)} ground-truth frames but {len(pred_frames)} "
                                 "predicted ones")
            for start in range(len(gt_frames) - k + 1):
                evaluator.update(np.concatenate(gt_frames[start : start + k], axis=1),
                                 np.concatenate(pred_frames[start : start + k], axis=1))
                windows += 1
        if windows == 0:
            raise ValueError(f"no sequence has {k} frames for a window of that size")
        scores[f"VPQ_{k}"] = evaluator.compute().all.pq
    scores["VPQ"] = float(np.mean([scores[f"VPQ_{k}"] for k in window_sizes]))
    return scores

"""Instance mask AP: COCO-style (through pycocotools) and Cityscapes-style (SPEC §6).

Both evaluators take, per image, the ground-truth label map (``train_id * label_divisor + instance``; a thing
class with instance 0 is crowd, ``meta.void_label`` is void) and the predicted instances as a list of dicts
``{"category_id": train id of a thing class, "score": float, "mask": bool [H, W]}`` (the COCO evaluator also
accepts ``"segmentation"``: a COCO RLE instead of ``"mask"``).
"""

from __future__ import annotations

import contextlib
import io
from typing import Any, Mapping, Sequence

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from panoptic_deeplab.data.coco_panoptic import DatasetMeta
from panoptic_deeplab.evaluation.report import InstanceReport


def _as_label_map(x: Any, what: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.integer):
        raise ValueError(f"{what}: expected an integer [H, W] label map, got {x.dtype} {tuple(x.shape)}")
    return x.astype(np.int64, copy=False)


def _check_instance(inst: Mapping[str, Any], meta: DatasetMeta, where: str) -> tuple[int, float]:
    try:
        cls, score = int(inst["category_id"]), float(inst["score"])
    except KeyError as exc:
        raise ValueError(f"{where}: an instance lacks the field {exc} (needs category_id, score, mask)") from None
    if not 0 <= cls < meta.num_classes or not meta.is_thing_train_id(cls):
        raise ValueError(f"{where}: instance category_id {cls} is not a thing train id {meta.thing_train_ids}")
    return cls, score


def _instance_mask(inst: Mapping[str, Any], shape: tuple[int, ...], where: str) -> np.ndarray:
    if "mask" in inst:
        m = inst["mask"]
        if hasattr(m, "detach"):
            m = m.detach().cpu().numpy()
        m = np.asarray(m).astype(bool, copy=False)
    elif "segmentation" in inst:
        m = mask_utils.decode(inst["segmentation"]).astype(bool)
    else:
        raise ValueError(f"{where}: an instance needs 'mask' (bool [H, W]) or 'segmentation' (RLE)")
    if m.shape != shape:
        raise ValueError(f"{where}: instance mask {m.shape} and ground truth {shape} differ in size")
    return m


def _encode(mask: np.ndarray) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")  # JSON-friendly; pycocotools accepts str counts
    return rle


def _none_if_nan(v: float) -> float | None:
    return None if np.isnan(v) else float(v)


def _coco_entry(entry_id: int, image_id: int, category_id: int, rle: dict[str, Any]) -> dict[str, Any]:
    """The fields a pycocotools annotation or detection shares: id, image, category, RLE, area, box."""
    return {
        "id": entry_id,
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": rle,
        "area": float(mask_utils.area(rle)),
        "bbox": mask_utils.toBbox(rle).tolist(),
    }


class COCOInstanceEvaluator:
    """COCO mask AP (``COCOeval`` with ``iouType="segm"``): AP, AP50, AP75 and per-class AP.

    Ground truth: every non-crowd thing segment is an annotation, every crowd region (thing class, instance 0) an
    ``iscrowd=1`` annotation. Category ids are the dataset's (``meta``), image ids 1, 2, ... in update order.
    """

    def __init__(self, meta: DatasetMeta, max_dets: int = 100) -> None:
        self.meta = meta
        self.max_dets = max_dets
        self.reset()

    def reset(self) -> None:
        self._images: list[dict[str, Any]] = []
        self._gt: list[dict[str, Any]] = []
        self._dt: list[dict[str, Any]] = []

    def update(self, gt_label_map: Any, instances: Sequence[Mapping[str, Any]]) -> None:
        image_id = len(self._images) + 1
        where = f"image {image_id}"
        gt = _as_label_map(gt_label_map, f"{where} (ground truth)")
        self._images.append({"id": image_id, "height": gt.shape[0], "width": gt.shape[1]})
        div = self.meta.label_divisor
        for value in np.unique(gt).tolist():
            train = value // div
            if train == self.meta.ignore_label:
                continue
            if not 0 <= train < self.meta.num_classes:
                raise ValueError(f"{where} (ground truth): label {value} has a class outside 0..{self.meta.num_classes - 1}")
            if not self.meta.is_thing_train_id(train):
                continue
            entry = _coco_entry(len(self._gt) + 1, image_id, self.meta.category_id(train), _encode(gt == value))
            self._gt.append({**entry, "iscrowd": int(value % div == 0)})
        for inst in instances:
            cls, score = _check_instance(inst, self.meta, where)
            if "segmentation" in inst and "mask" not in inst:
                rle = dict(inst["segmentation"])
                if list(rle.get("size", ())) != list(gt.shape):
                    raise ValueError(f"{where}: instance RLE size {rle.get('size')} differs from {gt.shape}")
            else:
                rle = _encode(_instance_mask(inst, gt.shape, where))
            entry = _coco_entry(len(self._dt) + 1, image_id, self.meta.category_id(cls), rle)
            self._dt.append({**entry, "score": score, "iscrowd": 0})

    def _coco(self, annotations: list[dict[str, Any]]) -> COCO:
        coco = COCO()
        coco.dataset = {
            "images": self._images,
            "annotations": annotations,
            "categories": [{"id": c.id, "name": c.name} for c in self.meta.categories if c.isthing],
        }
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
        return coco

    def compute(self) -> InstanceReport:
        things = [c for c in self.meta.categories if c.isthing]
        if not self._gt:
            return InstanceReport(None, None, None, {c.name: None for c in things}, "COCO")
        coco_eval = COCOeval(self._coco(self._gt), self._coco(self._dt), iouType="segm")
        coco_eval.params.maxDets = [1, 10, self.max_dets]
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and the summary
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        # precision: [iou thresholds, recall points, categories, area ranges, max dets]; -1 = no ground truth
        precision = coco_eval.eval["precision"][:, :, :, 0, -1]
        per_class: dict[str, float | None] = {}
        for k, cat_id in enumerate(coco_eval.params.catIds):
            p = precision[:, :, k]
            p = p[p > -1]
            per_class[self.meta.categories[self.meta.train_id(cat_id)].name] = float(p.mean()) if p.size else None
        stats = coco_eval.stats
        return InstanceReport(
            ap=_none_if_nan(stats[0]) if stats[0] >= 0 else None,
            ap50=_none_if_nan(stats[1]) if stats[1] >= 0 else None,
            ap75=_none_if_nan(stats[2]) if stats[2] >= 0 else None,
            per_class_ap=per_class,
            protocol="COCO",
        )


class CityscapesInstanceEvaluator:
    """Cityscapes AP and AP50 with the definitions of ``cityscapesscripts.evaluation.evalInstanceLevelSemanticLabeling``.

    Per thing class and IoU threshold t in 0.5:0.05:0.95 (strict ``IoU > t``, IoU = I / (|gt| + |pred| - I)):
    ground-truth instances count when non-crowd and of at least ``min_region_size`` pixels; a gt matched by several
    predictions keeps the highest score and the others become false positives; an unmatched prediction is a false
    positive unless (its void pixels + its pixels on crowd and on too-small gt of its class) / its area > t.
    AP per class is the area under the precision-recall curve sampled at every distinct score; a class without
    ground truth is NaN (left out of the means), one with ground truth but no prediction 0. AP averages over
    classes and thresholds, AP50 over classes at t = 0.5.
    """

    def __init__(self, meta: DatasetMeta, min_region_size: int = 100) -> None:
        self.meta = meta
        self.min_region_size = min_region_size
        self.overlaps = np.arange(0.5, 1.0, 0.05)  # the same floats as cityscapesscripts
        self.reset()

    def reset(self) -> None:
        # per class: list over images of (gt pixel counts, gt crowd flags, predictions)
        self._images: dict[int, list[tuple[np.ndarray, np.ndarray, list[tuple[float, int, int, dict[int, int]]]]]]
        self._images = {c: [] for c in self.meta.thing_train_ids}
        self._num_images = 0

    def update(self, gt_label_map: Any, instances: Sequence[Mapping[str, Any]]) -> None:
        where = f"image {self._num_images}"
        gt = _as_label_map(gt_label_map, f"{where} (ground truth)")
        div = self.meta.label_divisor
        values, inverse, counts = np.unique(gt, return_inverse=True, return_counts=True)
        inverse = inverse.reshape(gt.shape)
        train = values // div
        is_void = train == self.meta.ignore_label
        preds: dict[int, list[tuple[float, int, int, dict[int, int]]]] = {c: [] for c in self._images}
        for inst in instances:
            cls, score = _check_instance(inst, self.meta, where)
            mask = _instance_mask(inst, gt.shape, where)
            area = int(mask.sum())
            if area == 0:  # cityscapesscripts skips empty masks
                continue
            under = np.bincount(inverse[mask], minlength=len(values))
            void = int(under[is_void].sum())
            # intersections with the gt segments of the same class, keyed by position in this class's gt list
            same = np.flatnonzero(train == cls)
            overlaps = {k: int(under[v]) for k, v in enumerate(same) if under[v] > 0}
            preds[cls].append((score, area, void, overlaps))
        for cls in self._images:
            same = np.flatnonzero(train == cls)
            self._images[cls].append((counts[same], values[same] % div == 0, preds[cls]))
        self._num_images += 1

    def _class_ap(self, cls: int, threshold: float) -> float:
        scores: list[float] = []
        trues: list[int] = []
        hard_fns = 0
        have_gt = have_pred = False
        for gt_area, gt_crowd, preds in self._images[cls]:
            valid = ~gt_crowd & (gt_area >= self.min_region_size)
            have_gt |= bool(valid.any())
            have_pred |= bool(preds)
            for g in np.flatnonzero(valid):
                best: float | None = None
                for score, area, _, inter in preds:
                    i = inter.get(int(g), 0)
                    if i == 0 or i / (gt_area[g] + area - i) <= threshold:
                        continue
                    if best is None:
                        best = score
                    else:  # duplicate: the gt keeps the higher score, the lower one is a false positive
                        scores.append(min(best, score))
                        trues.append(0)
                        best = max(best, score)
                if best is None:
                    hard_fns += 1
                else:
                    scores.append(best)
                    trues.append(1)
            for score, area, void, inter in preds:
                if any(i / (gt_area[g] + area - i) > threshold for g, i in inter.items()):
                    continue
                ignored = void
                for g, i in inter.items():
                    # crowd and too-small gt pixels are ignored; a small crowd counts twice, as in cityscapesscripts
                    ignored += i * (int(gt_crowd[g]) + int(gt_area[g] < self.min_region_size))
                if ignored / area <= threshold:
                    scores.append(score)
                    trues.append(0)
        if not have_gt:
            return float("nan")
        if not have_pred or not scores:
            return 0.0
        return _ap_from_scores(np.asarray(scores, np.float64), np.asarray(trues, np.float64), hard_fns)

    def ap_matrix(self) -> np.ndarray:
        """AP per thing class (rows, in train-id order) and IoU threshold (columns)."""
        return np.array(
            [[self._class_ap(c, t) for t in self.overlaps] for c in self.meta.thing_train_ids], dtype=np.float64
        ).reshape(len(self.meta.thing_train_ids), len(self.overlaps))

    def compute(self) -> InstanceReport:
        aps = self.ap_matrix()
        names = [self.meta.categories[c].name for c in self.meta.thing_train_ids]
        have = ~np.isnan(aps)
        return InstanceReport(
            ap=float(aps[have].mean()) if have.any() else None,
            ap50=float(aps[have[:, 0], 0].mean()) if have[:, 0].any() else None,
            ap75=None,
            per_class_ap={n: _none_if_nan(float(row.mean())) for n, row in zip(names, aps)},
            protocol="Cityscapes",
        )


def _ap_from_scores(scores: np.ndarray, trues: np.ndarray, hard_fns: int) -> float:
    """Area under the precision-recall curve, one point per distinct score (cityscapesscripts' definition)."""
    order = np.argsort(scores, kind="stable")
    scores, trues = scores[order], trues[order]
    cum = np.cumsum(trues)
    total_true = cum[-1]
    _, first = np.unique(scores, return_index=True)
    below = np.where(first > 0, cum[first - 1], 0.0)  # true examples scored strictly below each threshold
    tp = total_true - below
    fp = len(scores) - first - tp
    fn = below + hard_fns
    precision = np.append(tp / (tp + fp), 1.0)
    recall = np.append(tp / (tp + fn), 0.0)
    padded = np.concatenate([recall[:1], recall, [0.0]])
    steps = (padded[:-2] - padded[2:]) / 2.0
    return float(np.dot(precision, steps))

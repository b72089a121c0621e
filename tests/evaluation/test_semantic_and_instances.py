"""mIoU and instance AP on hand-made cases, and against pycocotools / cityscapesscripts run directly."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from panoptic_deeplab.data.coco_panoptic import VOID_LABEL, CategoryInfo, DatasetMeta
from panoptic_deeplab.evaluation.instance_ap import CityscapesInstanceEvaluator, COCOInstanceEvaluator
from panoptic_deeplab.evaluation.semantic import SemanticEvaluator


def test_miou_hand_made():
    gt = np.array([[0, 0, 1, 1], [0, 0, 1, 255], [2, 2, 2, 255]])
    pred = np.array([[0, 1, 1, 1], [0, 0, 255, 0], [2, 2, 0, 2]])
    ev = SemanticEvaluator(4, class_names=["a", "b", "c", "d"])
    ev.update(gt, pred)
    report = ev.compute()
    # class 0: tp 3, gt 4, pred 4 (the one on ignore is not counted) -> 3 / 5; class 1: tp 2, gt 3, pred 3 (the
    # 255 prediction is a miss, no one's false positive) -> 2 / 4; class 2: tp 2, gt 3, pred 2 -> 2 / 3; 3 absent
    assert report.per_class_iou == {"a": pytest.approx(0.6), "b": pytest.approx(0.5), "c": pytest.approx(2 / 3), "d": None}
    assert report.miou == pytest.approx((0.6 + 0.5 + 2 / 3) / 3)
    assert report.pixel_accuracy == pytest.approx(7 / 10)
    with pytest.raises(ValueError, match="outside 0..3"):
        ev.update(np.array([7]), np.array([0]))


THING_META = DatasetMeta(
    [
        CategoryInfo(1, "road", False),
        CategoryInfo(5, "person", True),
        CategoryInfo(9, "car", True),
    ]
)


def _box(shape, y0, y1, x0, x1):
    m = np.zeros(shape, bool)
    m[y0:y1, x0:x1] = True
    return m


def test_coco_ap_known_answers():
    gt = np.zeros((20, 20), np.int64)  # road
    gt[2:10, 2:10] = 1 * 1000 + 1
    perfect = [{"category_id": 1, "score": 0.9, "mask": gt == 1001}]
    ev = COCOInstanceEvaluator(THING_META)
    ev.update(gt, perfect)
    r = ev.compute()
    assert r.ap == pytest.approx(1.0) and r.ap50 == pytest.approx(1.0) and r.ap75 == pytest.approx(1.0)
    assert r.per_class_ap == {"person": pytest.approx(1.0), "car": None}
    # a higher-scored false positive in front of the true positive halves the precision at every recall
    ev = COCOInstanceEvaluator(THING_META)
    ev.update(gt, perfect + [{"category_id": 1, "score": 0.95, "mask": _box(gt.shape, 12, 18, 12, 18)}])
    assert ev.compute().ap50 == pytest.approx(0.5)


def test_coco_ap_agrees_with_pycocotools_directly():
    rng = np.random.default_rng(0)
    shape = (40, 48)
    ev = COCOInstanceEvaluator(THING_META)
    gt_anns, dt_anns, images = [], [], []
    for image_id in (1, 2, 3):
        gt = np.zeros(shape, np.int64)
        gt[30:, :] = VOID_LABEL
        for k in range(1, 5):
            y, x = rng.integers(0, 25), rng.integers(0, 35)
            h, w = rng.integers(5, 14), rng.integers(5, 14)
            cls = int(rng.integers(1, 3))
            gt[y : y + h, x : x + w] = cls * 1000 + k
        gt[0:6, 40:48] = 2 * 1000  # crowd car
        instances = []
        for value in np.unique(gt):
            if value // 1000 in (1, 2) and value % 1000:
                m = gt == value
                jitter = np.roll(m, tuple(rng.integers(-2, 3, size=2)), axis=(0, 1))
                instances.append({"category_id": int(value // 1000), "score": float(rng.random()), "mask": jitter})
        instances.append({"category_id": 2, "score": 0.5, "mask": _box(shape, 1, 5, 41, 47)})  # on the crowd
        instances.append({"category_id": 1, "score": 0.7, "mask": _box(shape, 20, 30, 0, 8)})
        ev.update(gt, instances)
        # the same data, handed to pycocotools by hand
        images.append({"id": image_id, "height": shape[0], "width": shape[1]})
        for value in np.unique(gt):
            if value // 1000 in (1, 2):
                rle = mask_utils.encode(np.asfortranarray((gt == value).astype(np.uint8)))
                gt_anns.append({"id": len(gt_anns) + 1, "image_id": image_id, "category_id": [5, 9][value // 1000 - 1],
                                "segmentation": rle, "area": float(mask_utils.area(rle)),
                                "iscrowd": int(value % 1000 == 0)})
        for inst in instances:
            rle = mask_utils.encode(np.asfortranarray(inst["mask"].astype(np.uint8)))
            dt_anns.append({"image_id": image_id, "category_id": [5, 9][inst["category_id"] - 1],
                            "segmentation": rle, "score": inst["score"]})
    coco_gt = COCO()
    coco_gt.dataset = {"images": images, "annotations": gt_anns,
                       "categories": [{"id": 5, "name": "person"}, {"id": 9, "name": "car"}]}
    coco_gt.createIndex()
    coco_eval = COCOeval(coco_gt, coco_gt.loadRes(dt_anns), iouType="segm")
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    ours = ev.compute()
    assert ours.ap == pytest.approx(coco_eval.stats[0], abs=1e-12)
    assert ours.ap50 == pytest.approx(coco_eval.stats[1], abs=1e-12)
    assert ours.ap75 == pytest.approx(coco_eval.stats[2], abs=1e-12)
    assert 0.0 < ours.ap < 1.0


def test_cityscapes_ap_hand_made():
    gt = np.zeros((40, 40), np.int64)
    gt[0:20, 0:20] = 1001  # person, 400 px
    gt[30:34, 30:34] = 1002  # person, 16 px: too small to count
    gt[20:30, 0:20] = 2000  # crowd car
    ev = CityscapesInstanceEvaluator(THING_META)
    ev.update(gt, [
        {"category_id": 1, "score": 0.8, "mask": gt == 1001},
        {"category_id": 1, "score": 0.9, "mask": _box(gt.shape, 0, 20, 20, 40)},  # false positive, higher score
        {"category_id": 1, "score": 0.95, "mask": gt == 1002},  # on a too-small gt: ignored
        {"category_id": 2, "score": 0.99, "mask": _box(gt.shape, 22, 28, 2, 10)},  # inside the crowd: ignored
    ])
    r = ev.compute()
    # person: 0.8 TP, 0.9 FP. One point per distinct score: (r 1, p 1/2) at 0.8, (r 0, p 0) at 0.9, then (r 0, p 1);
    # weights are central differences of recall (1 - 0) / 2, (1 - 0) / 2, 0 -> AP = 0.5 * 0.5 = 0.25
    assert r.per_class_ap["person"] == pytest.approx(0.25)
    assert r.per_class_ap["car"] is None  # no non-crowd car: NaN, left out
    assert r.ap == pytest.approx(0.25) and r.ap50 == pytest.approx(0.25)


def test_cityscapes_ap_agrees_with_cityscapesscripts(tmp_path, monkeypatch):
    ev_mod = pytest.importorskip("cityscapesscripts.evaluation.evalInstanceLevelSemanticLabeling")
    from cityscapesscripts.helpers.labels import labels

    cats = sorted((lb for lb in labels if 0 <= lb.trainId < 255), key=lambda lb: lb.id)
    meta = DatasetMeta([CategoryInfo(lb.id, lb.name, lb.hasInstances) for lb in cats])
    to_train = {lb.id: (lb.trainId if not lb.ignoreInEval else 255) for lb in labels if lb.id >= 0}
    rng = np.random.default_rng(3)
    shape = (48, 80)
    gt_files, pred_files = [], []
    ours = CityscapesInstanceEvaluator(meta)
    for n in range(4):
        ids = np.full(shape, 7, np.int32)  # road
        ids[:10] = 23  # sky
        ids[40:, :12] = 0  # unlabelled (void)
        ids[40:, 12:20] = 29  # caravan group: ignored in eval, void
        for k in range(1, 7):
            label = int(rng.choice([24, 26, 27]))
            y, x = rng.integers(10, 40), rng.integers(0, 70)
            h, w = rng.integers(6, 20), rng.integers(6, 20)  # some under 100 px
            ids[y : y + h, x : x + w] = label * 1000 + k
        ids[0:8, 60:80] = 26  # car group (crowd)
        gt_path = tmp_path / f"city_{n:06d}_000019_gtFine_instanceIds.png"
        Image.fromarray(ids.astype(np.uint16)).save(gt_path)
        gt_files.append(str(gt_path))
        # label map in train ids
        lab = ids // 1000
        lab = np.where(ids < 1000, ids, lab)
        train = np.vectorize(to_train.get)(lab)
        label_map = np.where(train == 255, VOID_LABEL, train * 1000 + np.where(ids >= 1000, ids % 1000, 0))
        instances, lines = [], []
        objects = [v for v in np.unique(ids) if v >= 1000]
        # one false positive per class in the sky keeps cityscapesscripts away from its empty-list crash (a class
        # whose every prediction is ignored); the evaluator under test returns 0 there instead
        sky_fps = [-24, -26, -27]
        for j, v in enumerate(objects + objects[:2] + [26, 0] + sky_fps):
            if v < 0:
                x0 = int(rng.integers(0, 40))
                m = _box(shape, 0, int(rng.integers(2, 9)), x0, x0 + int(rng.integers(3, 20)))
                lid = -v
            elif v < 1000:  # inside the crowd or the void region, sometimes sticking out
                m = np.roll(ids == v, int(rng.integers(0, 6)), axis=1) if v else _box(shape, 41, 47, 1, 11)
                lid = 26
            else:
                m = np.roll(ids == v, tuple(rng.integers(-2, 3, size=2)), axis=(0, 1))
                lid = int(v // 1000) if rng.random() < 0.9 else 26
            score = float(np.round(rng.random(), 2))  # rounded so that some scores tie
            mask_name = f"pred_{n}_{j}.png"
            Image.fromarray(m.astype(np.uint8) * 255).save(tmp_path / mask_name)
            lines.append(f"{mask_name} {lid} {score}\n")
            instances.append({"category_id": to_train[lid], "score": score, "mask": m})
        pred_txt = tmp_path / f"city_{n:06d}_000019_pred.txt"
        pred_txt.write_text("".join(lines))
        pred_files.append(str(pred_txt))
        ours.update(label_map, instances)

    # the steps of cityscapesscripts' evaluateImgLists, without its JSON dumps (which fail on NumPy 2 integers)
    args = ev_mod.args
    monkeypatch.setattr(args, "predictionPath", str(tmp_path))
    monkeypatch.setattr(args, "quiet", True)
    if not hasattr(np, "in1d"):  # removed in NumPy 2.4, still called by cityscapesscripts
        monkeypatch.setattr(np, "in1d", np.isin, raising=False)
    ev_mod.setInstanceLabels(args)
    matches = ev_mod.matchGtWithPreds(pred_files, gt_files, ev_mod.instances2dict(gt_files), args)
    ref = ev_mod.computeAverages(ev_mod.evaluateMatches(matches, args), args)
    report = ours.compute()
    assert report.ap == pytest.approx(ref["allAp"], abs=1e-12)
    assert report.ap50 == pytest.approx(ref["allAp50%"], abs=1e-12)
    for name in ("person", "car", "truck"):
        expected = ref["classes"][name]["ap"]
        got = report.per_class_ap[name]
        assert (got is None and np.isnan(expected)) or got == pytest.approx(expected, abs=1e-12), name
    assert 0.0 < report.ap < 1.0

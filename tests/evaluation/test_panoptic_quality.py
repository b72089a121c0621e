"""PQ / SQ / RQ against the official algorithm (cityscapesscripts' copy of panopticapi ``pq_compute``)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from panoptic_deeplab.data.coco_panoptic import VOID_LABEL, CategoryInfo, DatasetMeta
from panoptic_deeplab.evaluation.panoptic_quality import (
    PanopticEvaluator,
    PQStat,
    evaluate_panoptic_files,
    label_map_to_segments,
    pq_image_stat,
)

from _eval_cases import CATEGORIES, KINDS


def _official(gt_json, gt_dir, pred_json, pred_dir):
    """panopticapi's algorithm as shipped in cityscapesscripts, in process (no Pool)."""
    ev = pytest.importorskip("cityscapesscripts.evaluation.evalPanopticSemanticLabeling")
    gt = json.loads(gt_json.read_text())
    pred = {a["image_id"]: a for a in json.loads(pred_json.read_text())["annotations"]}
    pairs = [(a, pred[a["image_id"]]) for a in gt["annotations"]]
    categories = {c["id"]: c for c in gt["categories"]}
    stat = ev.pq_compute_single_core(0, pairs, str(gt_dir), str(pred_dir), categories)
    return ev.average_pq(stat, categories)


def _assert_same(ours, official):
    for name, ours_m in (("All", ours.all), ("Things", ours.things), ("Stuff", ours.stuff)):
        ref = official[name]
        assert ours_m.n == ref["n"], name
        for key in ("pq", "sq", "rq"):
            assert getattr(ours_m, key) == pytest.approx(ref[key], abs=1e-9), (name, key)
    for c in ours.per_class:
        ref = official["per_class"][c.category_id]
        for key in ("pq", "sq", "rq"):
            assert getattr(c, key) == pytest.approx(ref[key], abs=1e-9), (c.name, key)


@pytest.mark.parametrize("kind", KINDS)
def test_matches_official_per_corruption(panoptic_case, kind):
    gt_json, gt_dir, pred_json, pred_dir = panoptic_case([kind], seed=KINDS.index(kind), repeats=3)
    official = _official(gt_json, gt_dir, pred_json, pred_dir)
    ours = evaluate_panoptic_files(gt_json, gt_dir, pred_json, pred_dir, workers=1)
    _assert_same(ours, official)
    if kind == "identity":
        assert ours.all.pq == pytest.approx(1.0)


def test_matches_official_mixed_with_workers(panoptic_case):
    gt_json, gt_dir, pred_json, pred_dir = panoptic_case(KINDS, seed=123, repeats=2)
    official = _official(gt_json, gt_dir, pred_json, pred_dir)
    ours = evaluate_panoptic_files(gt_json, gt_dir, pred_json, pred_dir, workers=2)
    _assert_same(ours, official)
    assert ours.num_images == 2 * len(KINDS)
    # the total is the sum of the per-image stats in any grouping
    assert 0.0 < ours.all.pq < 1.0


def _segs(*entries):
    return [dict(zip(("id", "category_id", "iscrowd"), e)) for e in entries]


def test_hand_made_image():
    """4x4 image worked out by hand: one TP with the void part of the prediction left out of the union."""
    gt = np.array([[1, 1, 1, 0], [1, 1, 1, 0], [2, 2, 2, 2], [2, 2, 2, 2]])
    pred = np.array([[5, 5, 5, 5], [5, 5, 6, 6], [7, 7, 7, 7], [7, 7, 7, 7]])
    stat = pq_image_stat(gt, _segs((1, 10, 0), (2, 1, 0)), pred, _segs((5, 10), (6, 10), (7, 1)))
    # seg 5: I = 5 with gt 1, |pred| = 6, |gt| = 6, void part 1 -> IoU = 5 / (6 + 6 - 5 - 1) = 5/6
    # seg 6: 1 pixel on gt 1, 1 on void: unmatched, void fraction 0.5 is not > 0.5 -> false positive
    assert stat[10].tp == 1 and stat[10].fp == 1 and stat[10].fn == 0
    assert stat[10].iou == pytest.approx(5 / 6)
    assert stat[1].tp == 1 and stat[1].iou == pytest.approx(1.0)


def test_crowd_and_void_ignore_rules():
    gt = np.array([[3, 3, 3, 3], [3, 3, 3, 3], [0, 0, 4, 4], [0, 0, 4, 4]])
    # 3: crowd of category 10; 4: stuff 1
    gt_segs = _segs((3, 10, 1), (4, 1, 0))
    pred = np.array([[8, 8, 9, 9], [8, 8, 9, 9], [6, 6, 4, 4], [6, 4, 4, 4]])
    # 8 on the crowd of its own class -> ignored; 9 on the crowd but another class -> FP;
    # 6 is 3/3 on void -> ignored; 4 has 4 pixels on stuff 1 and 1 on void: IoU 4 / (5 + 4 - 4 - 1) = 1
    pred_segs = _segs((8, 10), (9, 11), (6, 7), (4, 1))
    stat = pq_image_stat(gt, gt_segs, pred, pred_segs)
    assert stat[10].fp == 0 and stat[10].fn == 0 and stat[10].tp == 0
    assert stat[11].fp == 1
    assert stat[7].fp == 0
    assert stat[1].tp == 1 and stat[1].iou == pytest.approx(1.0)


def test_bad_inputs_name_the_problem():
    gt = np.ones((2, 2), np.int64)
    with pytest.raises(ValueError, match="in the PNG but not in the JSON"):
        pq_image_stat(gt, _segs((1, 1, 0)), np.full((2, 2), 9), _segs((5, 1)), context="img7")
    with pytest.raises(ValueError, match="in the JSON but not in the PNG"):
        pq_image_stat(gt, _segs((1, 1, 0)), gt, _segs((1, 1), (2, 1)))
    with pytest.raises(ValueError, match="differ in size"):
        pq_image_stat(gt, _segs((1, 1, 0)), np.ones((3, 2), np.int64), _segs((1, 1)))
    with pytest.raises(ValueError, match="duplicate segment ids"):
        pq_image_stat(gt, _segs((1, 1, 0), (1, 3, 0)), gt, _segs((1, 1)))


def test_stat_addition_and_evaluator_on_label_maps():
    meta = DatasetMeta([CategoryInfo.from_json(c) for c in CATEGORIES])  # train ids: road sky grass person car bike
    gt = np.full((6, 8), 0 * 1000, np.int64)
    gt[:, 4:] = 1 * 1000
    gt[1:3, 1:3] = 3 * 1000 + 1
    gt[3:5, 5:7] = 3 * 1000 + 2
    gt[0, :] = VOID_LABEL
    gt[5, 0:3] = 4 * 1000  # crowd car
    pred = gt.copy()
    pred[3:5, 5:7] = 3 * 1000 + 7  # same person under another instance number
    ev = PanopticEvaluator(meta)
    ev.update(gt, pred, image_id="a")
    ev.update(gt, np.where(gt == 3 * 1000 + 1, 0, gt), image_id="b")  # person 1 painted road: FN + road FP-free
    report = ev.compute()
    assert report.num_images == 2
    assert report.per_image["a"].pq == pytest.approx(1.0)
    person = next(c for c in report.per_class if c.name == "person")
    assert (person.tp, person.fp, person.fn) == (3, 0, 1)
    ids, segs = label_map_to_segments(gt, meta)
    crowd = [s for s in segs if s["iscrowd"]]
    assert len(crowd) == 1 and crowd[0]["category_id"] == 11
    assert (ids[0] == 0).all()
    # the evaluator's total is the sum of its per-image stats
    total = PQStat()
    for s in ev.per_image.values():
        total = total + s
    assert total == ev.stat
    with pytest.raises(ValueError, match="class outside"):
        ev.update(gt, np.full_like(gt, 9 * 1000))


def test_report_json_and_table(panoptic_case, tmp_path):
    gt_json, gt_dir, pred_json, pred_dir = panoptic_case(["erode"], seed=5, repeats=1)
    report = evaluate_panoptic_files(gt_json, gt_dir, pred_json, pred_dir, workers=1)
    out = tmp_path / "sub" / "report.json"
    report.save_json(out)
    data = json.loads(out.read_text())
    assert data["All"]["pq"] == pytest.approx(report.all.pq)
    assert [c["name"] for c in data["per_class"]] == [c["name"] for c in CATEGORIES]
    table = report.format_table()
    assert "Things" in table and "person" in table
    assert f"{100 * report.all.pq:6.2f}" in table

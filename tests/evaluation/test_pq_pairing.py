"""The O(pixels) pairing of ``pq_image_stat``: lookup table and binary-search paths, unlisted gt ids, crowd."""

from __future__ import annotations

import numpy as np
import pytest

from panoptic_deeplab.evaluation.panoptic_quality import LOOKUP_LIMIT, _id_table, pq_image_stat


def _segs(*entries):
    return [dict(zip(("id", "category_id", "iscrowd"), e)) for e in entries]


def _random_image(seed: int, ids: list[int]):
    """Random gt / pred maps over ``ids`` (0 = void) with segment lists, categories 1..3, a crowd segment."""
    rng = np.random.default_rng(seed)
    gt = rng.choice([0] + ids[:6], size=(24, 32))
    pred = np.where(rng.random((24, 32)) < 0.8, gt, rng.choice([0] + ids[6:], size=(24, 32)))
    cats = {i: int(rng.integers(1, 4)) for i in ids}
    gt_segs = [{"id": i, "category_id": cats[i], "iscrowd": int(k == 0)} for k, i in enumerate(ids[:6])]
    pred_segs = [{"id": i, "category_id": cats[i]} for i in np.unique(pred).tolist() if i]
    return gt, gt_segs, pred, pred_segs


@pytest.mark.parametrize("seed", range(4))
def test_table_and_search_paths_agree(seed):
    ids = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    gt, gt_segs, pred, pred_segs = _random_image(seed, ids)
    small = pq_image_stat(gt, gt_segs, pred, pred_segs)
    assert small.per_cat  # the case is not empty
    for shift in (LOOKUP_LIMIT - 10, 1 << 40):  # largest PNG ids (table) and ids beyond any PNG (search)
        moved = {i: i + shift for i in ids}
        stat = pq_image_stat(
            np.where(gt > 0, gt + shift, 0),
            [{**s, "id": moved[s["id"]]} for s in gt_segs],
            np.where(pred > 0, pred + shift, 0),
            [{**s, "id": moved[s["id"]]} for s in pred_segs],
        )
        assert stat == small


@pytest.mark.parametrize("shift", [0, 1 << 40])
def test_unlisted_gt_ids_are_neither_void_nor_matchable(shift):
    """As in panopticapi, pixels of a gt id missing from the JSON stay in the union (void ones would not)."""
    gt = np.array([[1, 1, 7, 7]]) + shift
    pred = np.array([[5, 5, 5, 5]]) + shift
    stat = pq_image_stat(gt, _segs((1 + shift, 1, 0)), pred, _segs((5 + shift, 1)))
    # I = 2, union = 4 + 2 - 2 - 0 = 4: IoU 0.5 is no match -> FN + FP (nothing of it lies on void)
    assert (stat[1].tp, stat[1].fn, stat[1].fp) == (0, 1, 1)
    stat = pq_image_stat(np.array([[1, 1, 0, 0]]), _segs((1, 1, 0)), pred - shift, _segs((5, 1)))
    assert (stat[1].tp, stat[1].fn, stat[1].fp) == (1, 0, 0) and stat[1].iou == pytest.approx(1.0)


def test_last_crowd_segment_of_a_category_is_its_crowd_region():
    gt = np.array([[3, 3, 4, 4]])
    pred = np.array([[0, 0, 8, 8]])
    stat = pq_image_stat(gt, _segs((3, 10, 1), (4, 10, 1)), pred, _segs((8, 10)))
    assert stat[10].fp == 0  # 8 lies on crowd 4, listed last: the crowd region of category 10, ignored
    stat = pq_image_stat(gt, _segs((4, 10, 1), (3, 10, 1)), pred, _segs((8, 10)))
    assert stat[10].fp == 1  # crowd 3 is now the region: 8 is a false positive (as in panopticapi)


def test_lookup_table_is_left_clean():
    gt = np.array([[1, 1], [2, 2]], dtype=np.int32) + 1000
    pq_image_stat(gt, _segs((1001, 1, 0), (1002, 2, 0)), gt, _segs((1001, 1), (1002, 2)))
    assert not _id_table().any()
    with pytest.raises(ValueError, match=r"prediction segment ids \[1002\] are in the PNG but not in the JSON"):
        pq_image_stat(gt, _segs((1001, 1, 0)), gt, _segs((1001, 1)))
    assert not _id_table().any()


def test_negative_ids_are_rejected():
    with pytest.raises(ValueError, match="negative segment ids"):
        pq_image_stat(np.array([[-1, 1]]), _segs((1, 1, 0)), np.array([[1, 1]]), _segs((1, 1)))

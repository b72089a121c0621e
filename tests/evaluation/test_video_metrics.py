"""STQ and VPQ (evaluation/video.py) on hand-computed cases, and on a tracked synthetic video."""

from __future__ import annotations

import math

import numpy as np
import pytest

from panoptic_deeplab.data.coco_panoptic import CategoryInfo, DatasetMeta
from panoptic_deeplab.evaluation.video import SegmentationTrackingQuality, video_panoptic_quality

VOID = 255000
# class 0 stuff, class 1 thing; four pixels per frame, two frames
GT = [np.array([[0, 1001, 1001, 1002]]), np.array([[0, 1001, 1002, 1002]])]
PRED = [np.array([[0, 1005, 1005, 1006]]), np.array([[0, 1006, 1006, 1006]])]
META = DatasetMeta([CategoryInfo(1, "road", False, (0, 0, 0)), CategoryInfo(2, "car", True, (0, 0, 0))])


def test_stq_hand_computed() -> None:
    """Tracks g1 = 1001 (3 px over both frames), g2 = 1002 (3 px); predicted p5 = 1005 (2 px), p6 = 1006 (4 px).
    g1: p5 overlaps 2 px (IoU 2/3), p6 1 px (IoU 1/6): (2 * 2/3 + 1 * 1/6) / 3 = 1/2. g2: p6 3 px (IoU 3/4):
    3 * 3/4 / 3 = 3/4. AQ = (1/2 + 3/4) / 2 = 5/8; the semantics are right: IoU 1; STQ = sqrt(5/8)."""
    stq = SegmentationTrackingQuality(2, [1])
    for gt, pred in zip(GT, PRED):
        stq.update(gt, pred)
    result = stq.result()
    assert result["AQ"] == pytest.approx(5 / 8) and result["IoU"] == 1.0
    assert result["STQ"] == pytest.approx(math.sqrt(5 / 8))
    perfect = SegmentationTrackingQuality(2, [1])
    for gt in GT:
        perfect.update(gt, gt)
    assert perfect.result()["STQ"] == 1.0


def test_stq_void_crowd_and_sequences() -> None:
    """Ground-truth void is not scored; a prediction of void is, as deeplab2's void column: class 0 loses one
    pixel (IoU 1/2) and the void class enters the mean with IoU 0: (1/2 + 1 + 0) / 3. Crowd (instance 0) pixels
    are left out of AQ on both sides. Two sequences: AQ sums over all tracks."""
    stq = SegmentationTrackingQuality(2, [1])
    stq.update(np.array([[0, 0, 1001, VOID]]), np.array([[VOID, 0, 1003, 1004]]), sequence_id="a")
    stq.update(np.array([[1000, 1001]]), np.array([[1007, 1003]]), sequence_id="b")  # a crowd pixel, then g1
    result = stq.result()
    assert result["sequences"] == ["a", "b"]
    assert result["IoU_per_sequence"][0] == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert result["AQ_per_sequence"] == [1.0, 1.0] and result["AQ"] == 1.0
    with pytest.raises(ValueError, match="ignore_label 1 is one of the 2 classes"):
        SegmentationTrackingQuality(2, [1], ignore_label=1)
    with pytest.raises(ValueError, match=r"ground truth is \(1, 4\) but the prediction is \(1, 3\)"):
        stq.update(GT[0], PRED[0][:, :3])


def test_vpq_hand_computed() -> None:
    """Window 1: frame 1 is perfect; in frame 2 p6 (3 px) matches g2 (IoU 2/3) and g1 is missed: the thing class
    has TP 3 (IoU 1 + 1 + 2/3), FN 1: PQ (8/3) / 3.5; stuff PQ 1. Window 2 (frames side by side): g1 matches p5
    (IoU 2/3), g2 p6 (IoU 3/4): thing PQ 17/24."""
    scores = video_panoptic_quality([(GT, PRED)], META, window_sizes=(1, 2))
    assert scores["VPQ_1"] == pytest.approx(((8 / 3) / 3.5 + 1) / 2)
    assert scores["VPQ_2"] == pytest.approx((17 / 24 + 1) / 2)
    assert scores["VPQ"] == pytest.approx((scores["VPQ_1"] + scores["VPQ_2"]) / 2)
    assert video_panoptic_quality([(GT, GT)], META, window_sizes=(1, 2))["VPQ"] == 1.0
    with pytest.raises(ValueError, match="no sequence has 3 frames for a window of that size"):
        video_panoptic_quality([(GT, PRED)], META, window_sizes=(3,))


def test_tracked_synthetic_video_scores_one_and_per_frame_ids_do_not() -> None:
    """Ground truth scored against itself: STQ = VPQ = 1. Per-frame numbering (what a model without tracking gives)
    keeps IoU and VPQ_1 at 1 but loses AQ and the longer VPQ windows; the tracker restores them."""
    from panoptic_deeplab.data.synthetic import synthetic_meta
    from panoptic_deeplab.data.synthetic_video import synthetic_sequence
    from panoptic_deeplab.inference.tracking import InstanceTracker, renumber_labels

    meta = synthetic_meta()
    frames = [truth for _, truth in synthetic_sequence(40, (96, 192), seed=3)]
    rng = np.random.default_rng(0)

    def shuffled(label_map: np.ndarray) -> np.ndarray:
        out = label_map.copy()
        labels = [v for v in np.unique(label_map).tolist() if v % 1000]
        for new, label in zip(rng.permutation(len(labels)) + 1, labels):
            out[label_map == label] = (label // 1000) * 1000 + new + 50
        return out

    per_frame = [shuffled(f) for f in frames]
    tracker = InstanceTracker(1000, meta.thing_train_ids)
    tracked = []
    for frame in per_frame:
        renumber = tracker.update(frame)
        tracked.append(renumber_labels(frame, renumber))

    def stq(predicted):
        metric = SegmentationTrackingQuality(meta.num_classes, meta.thing_train_ids)
        for gt, pred in zip(frames, predicted):
            metric.update(gt, pred)
        return metric.result()

    assert stq(frames)["STQ"] == 1.0 and video_panoptic_quality([(frames, frames)], meta)["VPQ"] == 1.0
    untracked, with_tracker = stq(per_frame), stq(tracked)
    assert untracked["IoU"] == 1.0 and untracked["AQ"] < 0.8
    assert with_tracker["AQ"] == 1.0
    vpq = video_panoptic_quality([(frames, per_frame)], meta)
    assert vpq["VPQ_1"] == 1.0 and vpq["VPQ_4"] < 0.9
    assert video_panoptic_quality([(frames, tracked)], meta)["VPQ"] == 1.0

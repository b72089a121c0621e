"""Evaluation: panoptic quality (panopticapi semantics), mIoU, COCO and Cityscapes mask AP, video panoptic quality
(STQ, VPQ), reports."""

from importlib import import_module
from typing import Any

from panoptic_deeplab.evaluation.instance_ap import CityscapesInstanceEvaluator, COCOInstanceEvaluator
from panoptic_deeplab.evaluation.panoptic_quality import (
    PanopticEvaluator,
    PQStat,
    PQStatCat,
    evaluate_panoptic_files,
    label_map_to_segments,
    pq_image_stat,
)
from panoptic_deeplab.evaluation.report import (
    ClassPQ,
    InstanceReport,
    PanopticReport,
    PQMetrics,
    SemanticReport,
    write_json_atomic,
)
from panoptic_deeplab.evaluation.semantic import SemanticEvaluator
from panoptic_deeplab.evaluation.video import SegmentationTrackingQuality, video_panoptic_quality

# Evaluating a model (evaluator.py) needs torch: imported on first use (PEP 562), so that the files form of
# `evaluate` and other torch-free users of this package do not pay for it.
_LAZY_EXPORTS = {
    "EvaluationReport": "panoptic_deeplab.evaluation.evaluator",
    "evaluate_in_memory": "panoptic_deeplab.evaluation.evaluator",
    "evaluate_model": "panoptic_deeplab.evaluation.evaluator",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY_EXPORTS:
        return getattr(import_module(_LAZY_EXPORTS[name]), name)
    raise AttributeError(f"module 'panoptic_deeplab.evaluation' has no attribute {name!r}")


__all__ = [
    "SegmentationTrackingQuality",
    "video_panoptic_quality",
    "COCOInstanceEvaluator",
    "CityscapesInstanceEvaluator",
    "ClassPQ",
    "InstanceReport",
    "PQMetrics",
    "PQStat",
    "PQStatCat",
    "PanopticEvaluator",
    "PanopticReport",
    "SemanticEvaluator",
    "SemanticReport",
    "evaluate_panoptic_files",
    "label_map_to_segments",
    "pq_image_stat",
    "write_json_atomic",
    *_LAZY_EXPORTS,
]

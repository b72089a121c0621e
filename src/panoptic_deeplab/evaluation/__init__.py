"""Evaluation: panoptic quality (panopticapi semantics), mIoU, COCO and Cityscapes mask AP, reports."""

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

__all__ = [
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
]

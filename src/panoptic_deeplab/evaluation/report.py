"""Evaluation reports: dataclasses with JSON export and readable tables, and atomic JSON writing."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from panoptic_deeplab.atomic import write_text_atomic


def format_percent(value: float | None) -> str:
    """A fraction as a 6-wide percentage for the tables; ``-`` where there is no value."""
    return "     -" if value is None else f"{100 * value:6.2f}"


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` as JSON to ``path`` atomically (temporary file in the same folder, then rename).

    A reader never sees a half-written report, even if the process is killed while writing.
    """
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n")


@dataclass(frozen=True)
class PQMetrics:
    """PQ, SQ, RQ (fractions in [0, 1]) averaged over ``n`` categories."""

    pq: float
    sq: float
    rq: float
    n: int


@dataclass(frozen=True)
class ClassPQ:
    """Panoptic quality of one category, with the counts it comes from."""

    category_id: int
    name: str
    isthing: bool
    pq: float
    sq: float
    rq: float
    tp: int
    fp: int
    fn: int
    iou_sum: float

    @property
    def evaluated(self) -> bool:
        """False when the category appears in neither ground truth nor prediction (excluded from means)."""
        return self.tp + self.fp + self.fn > 0


@dataclass
class PanopticReport:
    """Result of a panoptic evaluation (PQ as panopticapi ``pq_compute`` defines it).

    ``all`` / ``things`` / ``stuff`` average over the categories that occur (tp + fp + fn > 0); a group with no
    such category has n = 0 and zeros (panopticapi would divide by zero there).
    ``per_image`` maps the image id (as a string) to the PQ averaged over the categories of that image.
    """

    all: PQMetrics
    things: PQMetrics
    stuff: PQMetrics
    per_class: list[ClassPQ]
    per_image: dict[str, PQMetrics] = field(default_factory=dict)
    num_images: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_images": self.num_images,
            "All": asdict(self.all),
            "Things": asdict(self.things),
            "Stuff": asdict(self.stuff),
            "per_class": [asdict(c) for c in self.per_class],
            "per_image": {k: asdict(v) for k, v in self.per_image.items()},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    def save_json(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_dict` to ``path`` atomically."""
        write_json_atomic(path, self.to_dict())

    def format_table(self) -> str:
        """Summary (All / Things / Stuff) then one row per category, values in percent."""
        name_w = max([14] + [len(c.name) for c in self.per_class])
        lines = [f"{'':{name_w}s} | {'PQ':>6s} {'SQ':>6s} {'RQ':>6s} {'N':>5s}", "-" * (name_w + 31)]
        for label, m in (("All", self.all), ("Things", self.things), ("Stuff", self.stuff)):
            if m.n == 0:
                lines.append(f"{label:{name_w}s} | {'-':>6s} {'-':>6s} {'-':>6s} {0:5d}")
            else:
                lines.append(f"{label:{name_w}s} | {100 * m.pq:6.2f} {100 * m.sq:6.2f} {100 * m.rq:6.2f} {m.n:5d}")
        lines.append("")
        lines.append(
            f"{'Category':{name_w}s} | {'PQ':>6s} {'SQ':>6s} {'RQ':>6s} {'TP':>7s} {'FP':>7s} {'FN':>7s}  kind"
        )
        lines.append("-" * (name_w + 54))
        for c in self.per_class:
            kind = "thing" if c.isthing else "stuff"
            if not c.evaluated:
                lines.append(f"{c.name:{name_w}s} | {'-':>6s} {'-':>6s} {'-':>6s} {0:7d} {0:7d} {0:7d}  {kind}")
                continue
            lines.append(
                f"{c.name:{name_w}s} | {100 * c.pq:6.2f} {100 * c.sq:6.2f} {100 * c.rq:6.2f} "
                f"{c.tp:7d} {c.fp:7d} {c.fn:7d}  {kind}"
            )
        return "\n".join(lines)


@dataclass
class SemanticReport:
    """mIoU over the classes that occur (in ground truth or prediction), per-class IoU and pixel accuracy."""

    miou: float
    pixel_accuracy: float
    per_class_iou: dict[str, float | None]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format_table(self) -> str:
        name_w = max([14] + [len(n) for n in self.per_class_iou])
        lines = [f"{'mIoU':{name_w}s} | {100 * self.miou:6.2f}", f"{'pixel acc.':{name_w}s} | {100 * self.pixel_accuracy:6.2f}"]
        lines.append("-" * (name_w + 10))
        for name, iou in self.per_class_iou.items():
            lines.append(f"{name:{name_w}s} | {format_percent(iou)}")
        return "\n".join(lines)


@dataclass
class InstanceReport:
    """Mask AP (fractions in [0, 1]); ``None`` where there is no ground truth to measure against."""

    ap: float | None
    ap50: float | None
    ap75: float | None
    per_class_ap: dict[str, float | None]
    protocol: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format_table(self) -> str:
        pct = format_percent
        name_w = max([14] + [len(n) for n in self.per_class_ap])
        lines = [f"{self.protocol} mask AP", f"{'AP':{name_w}s} | {pct(self.ap)}", f"{'AP50':{name_w}s} | {pct(self.ap50)}"]
        if self.ap75 is not None:
            lines.append(f"{'AP75':{name_w}s} | {pct(self.ap75)}")
        lines.append("-" * (name_w + 10))
        lines.extend(f"{name:{name_w}s} | {pct(v)}" for name, v in self.per_class_ap.items())
        return "\n".join(lines)

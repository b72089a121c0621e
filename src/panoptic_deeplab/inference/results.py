"""What a prediction is and where it goes: :class:`PanopticResult` (one image) and :class:`PanopticPredictionWriter`
(many images as one COCO panoptic JSON + PNG folder, committed atomically), shared by every predictor.

A result is at the image's own size: the panoptic label map (``train_id * 1000 + instance``, void ``255000``,
docs/ARCHITECTURE.md), its COCO panoptic form (id map + ``segments_info`` with dataset category ids), the semantic
map, the instances and the raw center heatmap / offset field.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from types import TracebackType

import numpy as np
from torch import Tensor

from panoptic_deeplab.data.coco_panoptic import (
    DatasetMeta,
    ImageInfo,
    PanopticAnnotation,
    PanopticDataset,
    SegmentInfo,
    label_map_to_ids,
    save_panoptic_json,
    write_panoptic_png,
)
from panoptic_deeplab.inference.postprocess import PanopticPrediction


@dataclass
class Instance:
    """One detected thing instance. ``box`` is ``(x0, y0, x1, y1)`` with exclusive ``x1, y1``."""

    label: int  # panoptic label train_id * divisor + number
    train_id: int
    category_id: int
    name: str
    score: float
    box: tuple[float, float, float, float]
    area: int
    _label_map: np.ndarray = field(repr=False, compare=False)

    @property
    def mask(self) -> np.ndarray:
        """Boolean mask ``[H, W]`` (computed on request; masks are not stored)."""
        return self._label_map == self.label


@dataclass
class PanopticResult:
    """Prediction for one image, at the image's size."""

    label_map: np.ndarray  # [H, W] int64, train_id * divisor + instance, void = meta.void_label
    semantic: np.ndarray  # [H, W] int64, argmax train id of every pixel (255 where a void channel wins)
    instances: list[Instance]
    centers: np.ndarray  # [K, 2] int64 (y, x) detected centers, by decreasing score
    center_scores: np.ndarray  # [K] float32 raw heatmap values at the centers
    center: np.ndarray  # [H, W] float32 raw center heatmap (TTA-averaged)
    offset: np.ndarray  # [2, H, W] float32 (dy, dx) in pixels of this image (TTA-averaged)
    meta: DatasetMeta = field(repr=False)
    stable_ids: bool = False  # COCO segment ids category_id * label_divisor + instance (video frames), else 1..K

    @cached_property
    def _coco_form(self) -> tuple[np.ndarray, list[SegmentInfo]]:
        # On first use: 33 ms at 1024x2048, which a caller that never saves would pay for nothing.
        return label_map_to_ids(self.label_map, self.meta, stable=self.stable_ids)

    @property
    def segment_ids(self) -> np.ndarray:
        """``[H, W]`` int32 COCO panoptic ids (0 = void), the keys of :attr:`segments_info`."""
        return self._coco_form[0]

    @property
    def segments_info(self) -> list[SegmentInfo]:
        """One entry per segment: dataset category id, area, bbox ``(x, y, w, h)``."""
        return self._coco_form[1]

    @property
    def size(self) -> tuple[int, int]:
        """``(H, W)``."""
        return int(self.label_map.shape[0]), int(self.label_map.shape[1])

    def annotation(self, file_name: str, image_id: int | str) -> PanopticAnnotation:
        """The COCO panoptic annotation entry, its PNG being ``file_name``."""
        return PanopticAnnotation(image_id=image_id, file_name=file_name, segments_info=list(self.segments_info))

    def save(
        self,
        out_dir: str | os.PathLike,
        stem: str,
        image_id: int | str | None = None,
        image_file_name: str | None = None,
    ) -> PanopticAnnotation:
        """Write ``out_dir/stem.png`` (panoptic PNG) and ``out_dir/stem.json`` (a one-image COCO panoptic
        JSON with ``images``, ``annotations`` and ``categories``); returns the annotation entry.

        ``image_id`` and ``image_file_name`` (the input image's name) default to ``stem``."""
        out = Path(out_dir)
        image_id = stem if image_id is None else image_id
        write_panoptic_png(out / f"{stem}.png", self.segment_ids)
        annotation = self.annotation(f"{stem}.png", image_id)
        height, width = self.size
        dataset = PanopticDataset(
            images=[ImageInfo(id=image_id, file_name=image_file_name or stem, height=height, width=width)],
            annotations=[annotation],
            meta=self.meta,
        )
        save_panoptic_json(out / f"{stem}.json", dataset)
        return annotation


def warn_if_centers_dropped(prediction: PanopticPrediction, top_k: int, remedy: str) -> None:
    """Warn when an image reached ``top_k`` centers. Large images hold more objects than the references' top_k (200)
    was chosen for: the centers past it are dropped and their pixels join a neighbour's instance, which silently
    merges objects. ``remedy`` says how to raise it. Reported where it is raised: inference_mode wrappers sit
    between here and the user's call, so no stack level reaches it."""
    if prediction.centers.shape[0] >= top_k:
        warnings.warn(f"an image reached top_k={top_k} instance centers: any further objects were merged into their "
                      f"neighbours; {remedy}", stacklevel=1)


def result_from_prediction(
    prediction: PanopticPrediction, center: Tensor, offset: Tensor, meta: DatasetMeta, stable_ids: bool = False
) -> PanopticResult:
    """The :class:`PanopticResult` of one post-processed image (``center`` [1, H, W], ``offset`` [2, H, W]);
    ``stable_ids``: COCO segment ids ``category_id * label_divisor + instance`` (video frames), else 1..K."""
    label_map = prediction.label_map.cpu().numpy().astype(np.int64, copy=False)
    inst = prediction.instances
    classes = inst.classes.tolist()
    instances = [
        Instance(
            label=int(label),
            train_id=int(train_id),
            category_id=meta.category_id(int(train_id)),
            name=meta.class_names[int(train_id)],
            score=float(score),
            box=tuple(float(v) for v in box),  # type: ignore[arg-type]
            area=int(area),
            _label_map=label_map,
        )
        for label, train_id, score, box, area in zip(
            inst.ids.tolist(), classes, inst.scores.tolist(), inst.boxes.tolist(), inst.areas.tolist()
        )
    ]
    return PanopticResult(
        label_map=label_map,
        semantic=prediction.semantic.cpu().numpy().astype(np.int64, copy=False),
        instances=instances,
        centers=prediction.centers.cpu().numpy(),
        center_scores=prediction.center_scores.float().cpu().numpy(),
        center=center[0].float().cpu().numpy(),
        offset=offset.float().cpu().numpy(),
        meta=meta,
        stable_ids=stable_ids,
    )


class PanopticPredictionWriter:
    """Collect predictions as one COCO panoptic JSON + a folder of PNGs, committed atomically.

    PNGs go to a temporary sibling folder while results are added; :meth:`commit` moves it to ``png_dir``
    (replacing an older one) and then writes ``json_path``, so an interrupted run leaves no half-written
    prediction set. Used as a context manager it commits on success and discards on error.
    """

    def __init__(self, json_path: str | os.PathLike, png_dir: str | os.PathLike, meta: DatasetMeta) -> None:
        self.json_path = Path(json_path)
        self.png_dir = Path(png_dir)
        self.meta = meta
        self.png_dir.parent.mkdir(parents=True, exist_ok=True)
        self._tmp_dir: Path | None = Path(
            tempfile.mkdtemp(prefix=f".{self.png_dir.name}.", suffix=".tmp", dir=self.png_dir.parent)
        )
        self._images: list[ImageInfo] = []
        self._annotations: list[PanopticAnnotation] = []
        self._names: set[str] = set()

    def add(self, result: PanopticResult, file_name: str, image_id: int | str | None = None) -> PanopticAnnotation:
        """Add the prediction of image ``file_name``; its PNG is named after the image's stem."""
        if self._tmp_dir is None:
            raise RuntimeError("this writer was already committed or discarded")
        stem = Path(file_name).stem
        if stem in self._names:
            raise ValueError(f"two images have the stem {stem!r}: their panoptic PNGs would overwrite each other")
        self._names.add(stem)
        image_id = stem if image_id is None else image_id
        write_panoptic_png(self._tmp_dir / f"{stem}.png", result.segment_ids)
        height, width = result.size
        self._images.append(ImageInfo(id=image_id, file_name=file_name, height=height, width=width))
        annotation = result.annotation(f"{stem}.png", image_id)
        self._annotations.append(annotation)
        return annotation

    def commit(self) -> None:
        """Move the PNGs into place, then write the JSON."""
        if self._tmp_dir is None:
            raise RuntimeError("this writer was already committed or discarded")
        if self.png_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{self.png_dir.name}.", suffix=".old", dir=self.png_dir.parent))
            os.replace(self.png_dir, old / self.png_dir.name)
            shutil.rmtree(old)
        os.replace(self._tmp_dir, self.png_dir)
        self._tmp_dir = None
        save_panoptic_json(
            self.json_path, PanopticDataset(images=self._images, annotations=self._annotations, meta=self.meta)
        )

    def discard(self) -> None:
        """Drop everything added so far."""
        if self._tmp_dir is not None:
            shutil.rmtree(self._tmp_dir, ignore_errors=True)
            self._tmp_dir = None

    def __enter__(self) -> "PanopticPredictionWriter":
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()

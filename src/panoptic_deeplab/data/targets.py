"""Training targets of Panoptic-DeepLab (SPEC §2), generated after augmentation from a label map.

The label map is ``train_id * label_divisor + instance`` (docs/ARCHITECTURE.md): instance 0 of a thing
class is a crowd region, ``ignore_label * label_divisor`` (and anything with class ``ignore_label``) is void.

The work is O(pixels + instances x patch): pixels are mapped once to a compact segment index, every
per-segment statistic (area, center of mass, which weights apply) is a bincount or a small table, each
per-pixel map is one ``index_select`` of such a table, and each Gaussian is stamped only inside its
``(6 sigma + 3)^2`` patch.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from panoptic_deeplab.config import TargetConfig
from panoptic_deeplab.data.coco_panoptic import (
    IGNORE_LABEL,
    LABEL_DIVISOR,
    DatasetMeta,
    SegmentInfo,
    ids_to_label_map,
)

TARGET_KEYS = ("semantic", "semantic_weights", "center", "center_weights", "offset", "offset_weights")

# Above this many possible label values the dense lookup table would be too large (it costs 8 bytes per
# value); such maps (e.g. label_divisor = 256^2) are compacted by sorting instead.
_MAX_DENSE_LABELS = 1 << 21


def gaussian_patch(sigma: float, device: torch.device | str | None = None) -> Tensor:
    """The ``[2r+1, 2r+1]`` float32 Gaussian stamped at every center, peak 1.0 at index ``r``.

    ``r = floor(3 sigma) + 1``, so the patch is ``6 sigma + 3`` wide (51 for sigma 8) and spans
    ``[c - 3 sigma - 1, c + 3 sigma + 2)`` around the center ``c``, as in all three implementations (SPEC §2.2).
    """
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    radius = int(math.floor(3 * sigma)) + 1
    d = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    patch = torch.exp(-(d.view(-1, 1) ** 2 + d.view(1, -1) ** 2) / (2 * sigma**2))
    return patch.to(torch.float32)


def _compact(flat: Tensor, num_labels: int) -> tuple[Tensor, Tensor, Tensor]:
    """Unique labels, each pixel's index into them, and their pixel counts.

    A bincount over the label values plus a lookup table is O(pixels + num_labels) and several times faster
    than ``torch.unique`` (a sort) for the usual ``label_divisor = 1000`` (256k possible values).
    """
    if num_labels > _MAX_DENSE_LABELS:
        return torch.unique(flat, sorted=True, return_inverse=True, return_counts=True)
    counts = torch.bincount(flat, minlength=num_labels)
    labels = counts.nonzero().squeeze(1)
    table = torch.zeros(num_labels, dtype=torch.int64, device=flat.device)
    table[labels] = torch.arange(labels.numel(), device=flat.device)
    return labels, torch.index_select(table, 0, flat), counts[labels]


def generate_targets(
    label_map: Tensor | np.ndarray,
    thing_ids: Sequence[int],
    *,
    label_divisor: int = LABEL_DIVISOR,
    ignore_label: int = IGNORE_LABEL,
    sigma: float = 8.0,
    small_instance_area: int = 4096,
    small_instance_weight: float = 3.0,
    ignore_crowd_in_semantic: bool = False,
) -> dict[str, Tensor]:
    """Targets and loss-weight maps of one (augmented) label map ``[H, W]`` (SPEC §2).

    Returns, on the label map's device:

    * ``semantic`` int64 ``[H, W]``: train id, ``ignore_label`` on void (and on crowd when
      ``ignore_crowd_in_semantic``; by default crowd keeps its class, SPEC §0).
    * ``semantic_weights`` float32 ``[H, W]``: ``small_instance_weight`` on pixels of non-crowd thing
      instances whose area in this map is below ``small_instance_area``, 1 elsewhere.
    * ``center`` float32 ``[1, H, W]``: max-merged Gaussians (peak 1) at the rounded centers of mass of the
      non-crowd thing instances.
    * ``center_weights`` float32 ``[1, H, W]``: 1 on labelled non-crowd pixels (thing and stuff), 0 on crowd and void.
    * ``offset`` float32 ``[2, H, W]``: ``(dy, dx)`` = center of mass minus pixel, 0 outside thing instances.
    * ``offset_weights`` float32 ``[1, H, W]``: 1 on non-crowd thing instance pixels.
    """
    label = torch.as_tensor(label_map)
    if label.dim() != 2:
        raise ValueError(f"label_map must be [H, W], got shape {tuple(label.shape)}")
    if label.dtype.is_floating_point or label.dtype.is_complex or label.dtype == torch.bool:
        raise ValueError(f"label_map must hold integers, got dtype {label.dtype}")
    if label_divisor < 1 or ignore_label < 1:
        raise ValueError(f"need label_divisor >= 1 and ignore_label > 0, got {label_divisor}, {ignore_label}")
    if small_instance_area < 0 or small_instance_weight < 0:
        raise ValueError(
            f"small_instance_area and small_instance_weight must be >= 0, got "
            f"{small_instance_area}, {small_instance_weight}"
        )
    thing_list = [int(t) for t in thing_ids]
    bad = [t for t in thing_list if not 0 <= t < ignore_label]
    if bad:
        raise ValueError(f"thing ids {bad} outside the train ids 0..{ignore_label - 1}")

    label = label.to(torch.int64)
    device = label.device
    height, width = label.shape
    num_labels = (ignore_label + 1) * label_divisor
    if label.numel() == 0:
        raise ValueError("label_map is empty")
    lo, hi = (int(v) for v in torch.aminmax(label))
    if lo < 0 or hi >= num_labels:
        bad_value = lo if lo < 0 else hi
        raise ValueError(
            f"label_map value {bad_value} is outside [0, {num_labels}): labels are "
            f"train_id * {label_divisor} + instance with train_id <= {ignore_label} (void)"
        )

    flat = label.reshape(-1)
    seg_labels, inverse, areas = _compact(flat, num_labels)

    # Per-segment tables (K entries, K = number of distinct labels in the map).
    seg_class = torch.div(seg_labels, label_divisor, rounding_mode="floor")
    seg_instance = seg_labels - seg_class * label_divisor
    is_thing_class = torch.zeros(ignore_label + 1, dtype=torch.bool, device=device)
    is_thing_class[thing_list] = True
    seg_thing = is_thing_class[seg_class]
    seg_void = seg_class == ignore_label
    seg_crowd = seg_thing & (seg_instance == 0)
    seg_instance_mask = seg_thing & (seg_instance > 0)

    seg_semantic = seg_class.clone()
    if ignore_crowd_in_semantic:
        seg_semantic[seg_crowd] = ignore_label
    # SPEC §2.4 / §9.6: the small-instance weight uses the area in the augmented crop.
    seg_semantic_weight = torch.where(
        seg_instance_mask & (areas < small_instance_area),
        torch.tensor(float(small_instance_weight), device=device),
        torch.tensor(1.0, device=device),
    ).to(torch.float32)
    seg_center_weight = (~seg_void & ~seg_crowd).to(torch.float32)
    seg_offset_weight = seg_instance_mask.to(torch.float32)

    # Centers of mass: coordinate sums per segment by scatter-add (torch.bincount with weights is slower
    # here: it scans the index for its min and max first), in float64 so that the sums are exact.
    num_segments = seg_labels.numel()
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    coordinate = torch.empty(height, width, dtype=torch.float64, device=device)
    coordinate.copy_(rows.view(-1, 1).expand(height, width))
    sum_y = coordinate.new_zeros(num_segments).scatter_add_(0, inverse, coordinate.view(-1))
    coordinate.copy_(cols.view(1, -1).expand(height, width))
    sum_x = coordinate.new_zeros(num_segments).scatter_add_(0, inverse, coordinate.view(-1))
    area_f = areas.to(torch.float64)
    center_y = sum_y / area_f
    center_x = sum_x / area_f
    # Offsets point to the exact (float) center of mass, as BC and D2 do, not to the rounded peak (DL2):
    # SPEC §0 asks for float offsets, the float mean is the unbiased target of the regression, and
    # pixel + offset then lands within half a pixel per axis of the heatmap peak, which the grouping by
    # nearest center absorbs.
    seg_center_y = torch.where(seg_instance_mask, center_y, 0.0).to(torch.float32)
    seg_center_x = torch.where(seg_instance_mask, center_x, 0.0).to(torch.float32)

    semantic = torch.index_select(seg_semantic, 0, inverse).view(height, width)
    semantic_weights = torch.index_select(seg_semantic_weight, 0, inverse).view(height, width)
    center_weights = torch.index_select(seg_center_weight, 0, inverse).view(1, height, width)
    offset_weights = torch.index_select(seg_offset_weight, 0, inverse).view(1, height, width)
    # center - pixel on instance pixels; the tables hold 0 elsewhere, so multiplying the coordinate by the
    # weight (0/1) makes the offset exactly 0 outside instances without another mask pass.
    offset = torch.empty(2, height, width, dtype=torch.float32, device=device)
    torch.index_select(seg_center_y, 0, inverse, out=offset[0].view(-1))
    torch.index_select(seg_center_x, 0, inverse, out=offset[1].view(-1))
    offset[0].addcmul_(offset_weights[0], rows.to(torch.float32).view(-1, 1), value=-1)
    offset[1].addcmul_(offset_weights[0], cols.to(torch.float32).view(1, -1), value=-1)

    center = torch.zeros(1, height, width, dtype=torch.float32, device=device)
    instance_index = seg_instance_mask.nonzero().squeeze(1)
    if instance_index.numel():
        patch = gaussian_patch(sigma, device)
        radius = (patch.shape[0] - 1) // 2
        # SPEC §0/§2.2: peak at the ROUNDED center of mass (D2, DL2; BC floors). torch.round rounds half to
        # even, like np.round (D2) and tf.round (DL2). No Gaussian for crowd (DL2, SPEC §0).
        peaks_y = torch.round(center_y[instance_index]).to(torch.int64).tolist()
        peaks_x = torch.round(center_x[instance_index]).to(torch.int64).tolist()
        heatmap = center[0]
        for cy, cx in zip(peaks_y, peaks_x):
            y0, y1 = max(cy - radius, 0), min(cy + radius + 1, height)
            x0, x1 = max(cx - radius, 0), min(cx + radius + 1, width)
            region = heatmap[y0:y1, x0:x1]
            stamp = patch[y0 - cy + radius : y1 - cy + radius, x0 - cx + radius : x1 - cx + radius]
            torch.maximum(region, stamp, out=region)

    return {
        "semantic": semantic,
        "semantic_weights": semantic_weights,
        "center": center,
        "center_weights": center_weights,
        "offset": offset,
        "offset_weights": offset_weights,
    }


def generate_targets_from_ids(
    ids: Tensor | np.ndarray,
    segments_info: Sequence[SegmentInfo | Mapping[str, Any]],
    meta: DatasetMeta,
    *,
    sigma: float = 8.0,
    small_instance_area: int = 4096,
    small_instance_weight: float = 3.0,
    ignore_crowd_in_semantic: bool = False,
    context: str = "",
) -> dict[str, Tensor]:
    """``generate_targets`` for a COCO panoptic id map ``[H, W]`` and its ``segments_info``."""
    segments = [s if isinstance(s, SegmentInfo) else SegmentInfo.from_json(dict(s), context) for s in segments_info]
    label_map = torch.from_numpy(ids_to_label_map(np.asarray(ids), segments, meta, context).astype(np.int64))
    return generate_targets(
        label_map,
        meta.thing_train_ids,
        label_divisor=meta.label_divisor,
        ignore_label=meta.ignore_label,
        sigma=sigma,
        small_instance_area=small_instance_area,
        small_instance_weight=small_instance_weight,
        ignore_crowd_in_semantic=ignore_crowd_in_semantic,
    )


class TargetGenerator:
    """Callable ``label_map [H, W] -> targets`` built once from a ``TargetConfig`` and the thing train ids."""

    def __init__(
        self,
        thing_ids: Sequence[int],
        cfg: TargetConfig | None = None,
        *,
        label_divisor: int = LABEL_DIVISOR,
        ignore_label: int = IGNORE_LABEL,
    ) -> None:
        self.cfg = cfg if cfg is not None else TargetConfig()
        self.thing_ids = [int(t) for t in thing_ids]
        self.label_divisor = label_divisor
        self.ignore_label = ignore_label
        gaussian_patch(self.cfg.sigma)  # fail at construction, not in a DataLoader worker, on a bad sigma

    def __call__(self, label_map: Tensor | np.ndarray) -> dict[str, Tensor]:
        return generate_targets(
            label_map,
            self.thing_ids,
            label_divisor=self.label_divisor,
            ignore_label=self.ignore_label,
            sigma=self.cfg.sigma,
            small_instance_area=self.cfg.small_instance_area,
            small_instance_weight=self.cfg.small_instance_weight,
            ignore_crowd_in_semantic=self.cfg.ignore_crowd_in_semantic,
        )

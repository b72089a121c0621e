"""Panoptic post-processing: centers, grouping, majority-vote merge and the instance by-product.

Pure torch, CPU or CUDA. The order of SPEC §5 is followed: semantic argmax -> center threshold + NMS ->
top-k -> grouping of thing pixels to the nearest center -> majority-vote class per instance -> stuff area
filter. Output is the label map of docs/ARCHITECTURE.md (``train_id * label_divisor + instance``, void =
``VOID_LABEL``).

Why this is fast and memory-sane where the reference implementations are not (they build a
``[centers, pixels, 2]`` tensor): only thing pixels are grouped, and each of them is compared with a short
list of candidate centers, those that can be nearest to some point of its grid cell (see
:func:`_build_table`); work and memory grow with the number of pixels, not pixels x centers. Class
votes, areas, scores and boxes are all computed with ``bincount`` / ``scatter_reduce`` in one pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from panoptic_deeplab.config import PostProcessConfig
from panoptic_deeplab.data.coco_panoptic import IGNORE_LABEL, LABEL_DIVISOR, VOID_LABEL

# "compiled": the numba kernels of .cpu_kernels (CPU only); "torch": torch operations (any device);
# "auto": compiled where it applies.
BACKENDS = ("auto", "torch", "compiled")


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")


__all__ = [
    "Instances",
    "PanopticPrediction",
    "find_instance_centers",
    "group_pixels",
    "merge_semantic_and_instance",
    "panoptic_postprocess",
]

# Elements of the [points, candidates] distance block handled at once (float64): bounds the temporary
# memory of grouping to ~20 MB whatever the image size; the scores use 4x this many float32 logits.
_CHUNK_ELEMENTS = 1 << 19
# Fewest points per grouping chunk, so that a wide candidate table does not make the chunks tiny.
_MIN_CHUNK_POINTS = 4096


@dataclass
class Instances:
    """Thing instances of one image, struct-of-tensors, ``M`` entries ordered by center index.

    Masks are not stored: they are the pixels of ``label_map`` equal to ``ids`` (see :meth:`masks`).
    """

    label_map: Tensor  # [H, W] int64, the panoptic label map the instances live in
    ids: Tensor  # [M] int64 panoptic label of each instance (train_id * label_divisor + number)
    classes: Tensor  # [M] int64 train ids
    scores: Tensor  # [M] float32: center heatmap value at its center x mean softmax prob of its class
    boxes: Tensor  # [M, 4] float32 (x0, y0, x1, y1), x1/y1 exclusive (max pixel index + 1)
    areas: Tensor  # [M] int64 pixel counts
    center_index: Tensor  # [M] int64 row of PanopticPrediction.centers that formed the instance

    def __len__(self) -> int:
        return int(self.ids.numel())

    def masks(self) -> Tensor:
        """Stacked boolean masks ``[M, H, W]`` (allocated on request: M x H x W bytes)."""
        return self.label_map.unsqueeze(0) == self.ids.view(-1, 1, 1)


@dataclass
class PanopticPrediction:
    """Post-processed output for one image."""

    label_map: Tensor  # [H, W] int64, train_id * label_divisor + instance, void = void_label
    semantic: Tensor  # [H, W] int64 argmax of the semantic logits (a train id; IGNORE_LABEL on a void channel)
    centers: Tensor  # [K, 2] int64 (y, x) detected centers, by decreasing score
    center_scores: Tensor  # [K] raw heatmap values at the centers
    instances: Instances


def _check_positive_int(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _sliding_max(x: Tensor, kernel: int, dim: int) -> Tensor:
    """Centred max over windows of odd length ``kernel`` along ``dim`` of a 4-D tensor, -inf padded.

    A k x k max pool is two such 1-D passes; each pass doubles the covered window (1, 2, 4, ...) and
    finishes with one overlapping step, so it costs about log2(k) elementwise maxima instead of k.
    """
    pad = kernel // 2
    padding = (pad, pad, 0, 0) if dim == 3 else (0, 0, pad, pad)
    out = F.pad(x, padding, value=float("-inf"))
    covered = 1
    while covered * 2 <= kernel:
        size = out.shape[dim] - covered
        out = torch.maximum(out.narrow(dim, 0, size), out.narrow(dim, covered, size))
        covered *= 2
    if covered < kernel:
        step = kernel - covered
        size = out.shape[dim] - step
        out = torch.maximum(out.narrow(dim, 0, size), out.narrow(dim, step, size))
    return out


def _compiled_peaks(heat: Tensor, threshold: float, nms_kernel: int) -> Tensor:
    """The keep mask of :func:`find_instance_centers` for a float32 CPU heatmap, by the numba kernel."""
    from panoptic_deeplab.inference import cpu_kernels

    _set_numba_threads()
    heat = heat.detach().contiguous()
    keep = torch.empty(heat.shape, dtype=torch.bool)
    # torch compares a float32 tensor with the threshold rounded to float32: so does the kernel.
    threshold32 = np.float32(threshold)
    for n in range(heat.shape[0]):
        cpu_kernels.center_peaks(heat[n, 0].numpy(), threshold32, nms_kernel // 2, keep[n, 0].numpy())
    return keep


def find_instance_centers(
    center_heatmap: Tensor, threshold: float = 0.1, nms_kernel: int = 7, top_k: int = 200, backend: str = "auto"
) -> tuple[list[Tensor], list[Tensor]]:
    """Detect instance centers in a raw heatmap ``[N, 1, H, W]`` (SPEC §5).

    Keeps locations whose value is ``> threshold`` and equal to the maximum of its ``nms_kernel`` window
    (-inf padding; plateaus all survive), then exactly the ``top_k`` highest (ties broken by row-major
    position, smaller first; SPEC §0: not the references' "strictly above the k-th score").
    ``backend``: "auto" and "compiled" find the peaks of a float32 CPU heatmap with a numba kernel
    (:func:`.cpu_kernels.center_peaks`: the same set, 5x faster at 1025x2049), other heatmaps and "torch"
    with torch operations (comparisons in the heatmap's own dtype).

    Returns per image the centers ``[K_i, 2]`` int64 (y, x), by decreasing score, and their scores ``[K_i]``.
    """
    if center_heatmap.dim() != 4 or center_heatmap.shape[1] != 1:
        raise ValueError(f"center_heatmap must have shape [N, 1, H, W], got {tuple(center_heatmap.shape)}")
    _check_positive_int("nms_kernel", nms_kernel)
    if nms_kernel % 2 == 0:
        raise ValueError(f"nms_kernel must be odd so the window is centred, got {nms_kernel}")
    _check_positive_int("top_k", top_k)
    _check_backend(backend)
    heat = center_heatmap if center_heatmap.is_floating_point() else center_heatmap.float()
    if backend != "torch" and heat.dtype == torch.float32 and heat.device.type == "cpu":
        keep = _compiled_peaks(heat, threshold, nms_kernel)
    else:
        # Equals F.max_pool2d(heat, nms_kernel, stride=1, padding=nms_kernel // 2) (-inf padding), ~10x faster.
        pooled = _sliding_max(_sliding_max(heat, nms_kernel, dim=3), nms_kernel, dim=2)
        # Thresholding before or after the pool keeps the same set: a kept value exceeds the threshold, so
        # neighbours under it could never be the window maximum.
        keep = (heat == pooled) & (heat > threshold)
    width = heat.shape[3]
    centers, scores = [], []
    for n in range(heat.shape[0]):
        flat = keep[n, 0].reshape(-1).nonzero().squeeze(1)  # row-major ascending
        values = heat[n, 0].reshape(-1)[flat]
        # Stable descending sort keeps row-major order among equal scores: the deterministic tie rule.
        order = torch.sort(values, descending=True, stable=True).indices[:top_k]
        flat = flat[order]
        centers.append(torch.stack([flat // width, flat % width], dim=1))
        scores.append(values[order])
    return centers, scores


@dataclass
class _CandidateTable:
    """Per grid cell, the centers that can be nearest to some point of the cell (see :func:`_build_table`)."""

    cell_size: int
    ny: int  # cells -1 .. ny - 2 along y (one cell of margin around the image)
    nx: int
    counts: Tensor  # [cells] number of candidates
    index: Tensor  # [cells, width] candidate center indices, ascending, padded
    y: Tensor  # [cells, width] float64 candidate coordinates, +inf padding (never nearest)
    x: Tensor
    cy: Tensor  # [K] float64 all centers, for points off the grid
    cx: Tensor


def _build_table(centers: Tensor, height: int, width: int, cell_size: int | None = None) -> _CandidateTable:
    """Candidate centers per square cell of side ``cell_size`` (a power of two, so a point's cell is exact).

    For a cell B let U = min over centers of the largest distance from the center to B. A center whose
    smallest distance to B exceeds U is farther than that center from every point of B, so it can never be
    nearest there, nor tie. The inequalities survive float rounding: rounding is monotone, and the cell
    bounds and centers are integers, exact in float64.
    """
    num_centers = centers.shape[0]
    device = centers.device
    cy = centers[:, 0].double()
    cx = centers[:, 1].double()
    if cell_size is None:
        # About half the mean spacing of the centers: few candidates per cell, few cells.
        spacing = math.sqrt(height * width / num_centers)
        cell_size = 1 << max(2, min(9, round(math.log2(max(spacing / 2, 1.0)))))
    ny = -(-height // cell_size) + 2
    nx = -(-width // cell_size) + 2

    def axis_bounds(n: int, c: Tensor) -> tuple[Tensor, Tensor]:
        low = (torch.arange(n, device=device, dtype=torch.float64)[:, None] - 1) * cell_size
        high = low + cell_size
        near = (low - c).clamp(min=0) + (c - high).clamp(min=0)
        far = torch.maximum((low - c).abs(), (high - c).abs())
        return near * near, far * far  # [n, K] squared per-axis distances

    near_y, far_y = axis_bounds(ny, cy)
    near_x, far_x = axis_bounds(nx, cx)
    d_min = near_y[:, None, :] + near_x[None, :, :]  # [ny, nx, K]
    bound = (far_y[:, None, :] + far_x[None, :, :]).amin(dim=2, keepdim=True)
    is_cand = (d_min <= bound).reshape(ny * nx, num_centers)
    counts = is_cand.sum(dim=1)
    table_width = int(counts.max())
    index = torch.sort((~is_cand).to(torch.uint8), dim=1, stable=True).indices[:, :table_width].contiguous()
    valid = torch.arange(table_width, device=device) < counts[:, None]
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=device)
    return _CandidateTable(
        cell_size, ny, nx, counts, index, torch.where(valid, cy[index], inf), torch.where(valid, cx[index], inf), cy, cx
    )


def _search(py: Tensor, px: Tensor, table: _CandidateTable) -> Tensor:
    """Nearest center index (ties to the smaller) of points ``py``/``px`` (float64), via the table.

    Distances are computed as written, ``(py - cy)^2 + (px - cx)^2`` in float64, so the argmin equals a
    float64 full-distance reference bit for bit. Points off the grid (wild offsets) see all centers.
    """
    cell_y = torch.div(py, table.cell_size).floor_()  # exact: the cell size is a power of two
    cell_x = torch.div(px, table.cell_size).floor_()
    inside = (cell_y >= -1) & (cell_y < table.ny - 1) & (cell_x >= -1) & (cell_x < table.nx - 1)
    labels = torch.empty(py.shape[0], dtype=torch.long, device=py.device)
    idx = None if bool(inside.all()) else inside.nonzero().squeeze(1)
    if idx is not None:
        out = (~inside).nonzero().squeeze(1)
        ddy = py[out, None] - table.cy
        ddx = px[out, None] - table.cx
        labels[out] = (ddy * ddy + ddx * ddx).argmin(dim=1)
        py, px, cell_y, cell_x = py[idx], px[idx], cell_y[idx], cell_x[idx]
    if py.numel() == 0:
        # Every point is off the grid (issue 23: untrained models, tiles at the edge of a huge image), or
        # there were none: the table has nothing to answer, and an argmin over no candidates would raise.
        return labels
    cell = cell_y.add_(1).mul_(table.nx).add_(cell_x).add_(1).long()  # small integers: exact in float64
    # The chunk's own maximum candidate count, usually well under the table's width (>= 1: every cell has
    # the center that bounds it).
    m = int(table.counts.index_select(0, cell).max())
    ddy = table.y[:, :m].index_select(0, cell).neg_().add_(py[:, None])
    ddx = table.x[:, :m].index_select(0, cell).neg_().add_(px[:, None])
    dist = ddy.mul_(ddy).add_(ddx.mul_(ddx))  # (py - cy)^2 + (px - cx)^2, the same roundings
    best = dist.argmin(dim=1)  # first minimum: candidates are ascending, so the smaller center index
    found = table.index.view(-1).index_select(0, cell * table.index.shape[1] + best)
    if idx is None:
        return found
    labels[idx] = found
    return labels


def _points_per_chunk(table: _CandidateTable) -> int:
    return max(_MIN_CHUNK_POINTS, _CHUNK_ELEMENTS // table.index.shape[1])


def _nearest_center(
    py: Tensor, px: Tensor, centers: Tensor, height: int, width: int, cell_size: int | None = None
) -> Tensor:
    """Index (0..K-1, K > 0) of the nearest center of each float64 point, ties to the smaller index."""
    table = _build_table(centers, height, width, cell_size)
    chunk = _points_per_chunk(table)
    return torch.cat([_search(py[i : i + chunk], px[i : i + chunk], table) for i in range(0, py.shape[0], chunk)])


def _group_flat(
    thing_idx: Tensor, centers: Tensor, offset: Tensor, table: _CandidateTable | None = None
) -> Tensor:
    """Class-agnostic instance id (1..K, or 0 when no center) of the flat thing pixels ``thing_idx``.

    Everything but the result is computed per chunk of pixels, so temporary memory stays bounded. ``table``:
    the centers' :func:`_build_table` for the offset's size, when the caller groups the image in parts.
    """
    if centers.shape[0] == 0:
        return torch.zeros_like(thing_idx)
    height, width = offset.shape[1:]
    table = table if table is not None else _build_table(centers, height, width)
    labels = torch.empty_like(thing_idx)
    flat_dy = offset[0].reshape(-1)
    flat_dx = offset[1].reshape(-1)
    chunk = _points_per_chunk(table)
    for start in range(0, thing_idx.numel(), chunk):
        idx = thing_idx[start : start + chunk]
        # SPEC §9.2: offsets are (dy, dx) from the pixel to its center; predicted center = pixel + offset.
        py = (idx // width).double().add_(flat_dy.index_select(0, idx).double())
        px = (idx % width).double().add_(flat_dx.index_select(0, idx).double())
        if not bool(torch.isfinite(py).all() & torch.isfinite(px).all()):
            raise ValueError("offset contains non-finite values (nan/inf) at thing pixels")
        labels[start : start + chunk] = _search(py, px, table).add_(1)
    return labels


def group_pixels(thing_mask: Tensor, centers: Tensor | Sequence[Tensor], offset: Tensor) -> Tensor:
    """Assign each thing pixel to its nearest center (SPEC §5 grouping).

    ``thing_mask`` [H, W] bool, ``centers`` [K, 2] (y, x), ``offset`` [2, H, W] (dy, dx); or batched
    ``[N, H, W]``, a list of N center tensors and ``[N, 2, H, W]``. Returns the class-agnostic instance map
    (int64, same shape as ``thing_mask``): 0 = no instance (not a thing pixel, or no center), k + 1 =
    nearest center k by Euclidean distance of pixel + offset (ties to the smaller k).
    """
    if thing_mask.dim() == 3:
        if offset.dim() != 4 or len(centers) != thing_mask.shape[0]:
            raise ValueError(
                f"batched group_pixels needs offset [N, 2, H, W] and N center tensors; got thing_mask "
                f"{tuple(thing_mask.shape)}, offset {tuple(offset.shape)}, {len(centers)} center tensors"
            )
        return torch.stack([group_pixels(m, c, o) for m, c, o in zip(thing_mask, centers, offset)])
    if thing_mask.dim() != 2 or offset.dim() != 3 or offset.shape[0] != 2 or offset.shape[1:] != thing_mask.shape:
        raise ValueError(
            f"group_pixels needs thing_mask [H, W] and offset [2, H, W]; got {tuple(thing_mask.shape)} "
            f"and {tuple(offset.shape)}"
        )
    if not isinstance(centers, Tensor) or centers.dim() != 2 or centers.shape[1] != 2:
        raise ValueError(f"centers must be a [K, 2] tensor of (y, x), got {centers!r}")
    thing_idx = thing_mask.reshape(-1).nonzero().squeeze(1)
    instance = torch.zeros(thing_mask.numel(), dtype=torch.long, device=thing_mask.device)
    instance[thing_idx] = _group_flat(thing_idx, centers.to(thing_mask.device), offset)
    return instance.view(thing_mask.shape)


def _thing_lookup(thing_ids: Sequence[int] | Tensor, num_classes: int, device: torch.device) -> Tensor:
    ids = torch.as_tensor(thing_ids, dtype=torch.long).reshape(-1)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_classes):
        raise ValueError(f"thing_ids {ids.tolist()} must be train ids in [0, {num_classes})")
    lut = torch.zeros(num_classes, dtype=torch.bool)
    lut[ids] = True
    return lut.to(device)


@dataclass
class _Merged:
    label_flat: Tensor  # [H*W] int64
    classes: Tensor  # [M] train id of each kept instance
    numbers: Tensor  # [M] per-class instance number (1..)
    areas: Tensor  # [M]
    center_index: Tensor  # [M] 0-based index of the center that formed it


@dataclass
class _MergeTables:
    """The merge as lookup tables: the label of each instance's and each stuff class's pixels."""

    instance_labels: Tensor  # [K + 1] label of the thing pixels of instance k (row 0: no center -> void)
    stuff_labels: Tensor  # [classes] label of the pixels of each class that are not thing pixels
    kept: Tensor  # [M] 0-based center index of the instances that got pixels
    classes: Tensor  # [M] their majority class
    numbers: Tensor  # [M] their per-class number (1..)
    areas: Tensor  # [M]


def _check_label_space(num_centers: int, num_classes: int, label_divisor: int, void_label: int) -> None:
    if num_centers >= label_divisor:
        raise ValueError(
            f"{num_centers} centers could number instances past label_divisor={label_divisor}; "
            "lower top_k or raise label_divisor"
        )
    if 0 <= void_label < num_classes * label_divisor:
        raise ValueError(
            f"void_label={void_label} collides with real labels [0, {num_classes * label_divisor}) "
            f"of {num_classes} classes with label_divisor={label_divisor}"
        )


def _merge_tables(
    votes: Tensor,
    class_areas: Tensor,
    label_divisor: int,
    stuff_area: int,
    void_label: int,
    void_class: int | None,
) -> _MergeTables:
    """Majority vote, per-class numbering and the stuff area filter from the counts (SPEC §5).

    ``votes`` [K + 1, classes]: thing pixels per (instance, class), row 0 = no center; ``class_areas``
    [classes]: pixels per class. ``void_class``: a stuff class whose pixels are void whatever their area.
    """
    num_classes = class_areas.numel()
    device = votes.device
    votes = votes[1:]
    areas = votes.sum(dim=1)
    majority = votes.argmax(dim=1)  # first maximum: ties go to the smaller class id
    kept = (areas > 0).nonzero().squeeze(1)  # a center may attract no thing pixel
    kept_classes = majority[kept]
    # Per-class running count in center order: numbers 1, 2, ... for each class.
    one_hot = F.one_hot(kept_classes, num_classes).cumsum(dim=0)
    numbers = one_hot.gather(1, kept_classes[:, None]).squeeze(1)
    instance_labels = torch.full((votes.shape[0] + 1,), void_label, dtype=torch.long, device=device)
    # Thing pixels with instance 0 (no center at all) stay void: SPEC §5, the Python references' behaviour.
    instance_labels[kept + 1] = kept_classes * label_divisor + numbers
    # SPEC §9.12: a stuff region is kept when its area >= stuff_area (the Python references), else void.
    # Thing classes get a value here too, but all their pixels take the instance labels.
    stuff_labels = torch.where(
        class_areas >= stuff_area,
        torch.arange(num_classes, device=device) * label_divisor,
        torch.tensor(void_label, device=device),
    )
    if void_class is not None:
        stuff_labels[void_class] = void_label
    return _MergeTables(instance_labels, stuff_labels, kept, kept_classes, numbers, areas[kept])


def _merge_flat(
    semantic_flat: Tensor,
    thing_idx: Tensor,
    instance_ids: Tensor,
    num_centers: int,
    is_thing: Tensor,
    label_divisor: int,
    stuff_area: int,
    void_label: int,
    void_class: int | None = None,
) -> _Merged:
    """Majority vote + per-class numbering + stuff area filter, O(pixels) with bincount (SPEC §5)."""
    num_classes = is_thing.numel()
    _check_label_space(num_centers, num_classes, label_divisor, void_label)
    key = semantic_flat.index_select(0, thing_idx).add_(instance_ids * num_classes)  # (instance, class) pairs
    votes = torch.bincount(key, minlength=(num_centers + 1) * num_classes).view(num_centers + 1, num_classes)
    del key
    class_areas = torch.bincount(semantic_flat, minlength=num_classes)
    tables = _merge_tables(votes, class_areas, label_divisor, stuff_area, void_label, void_class)
    label_flat = tables.stuff_labels[semantic_flat]
    label_flat[thing_idx] = tables.instance_labels[instance_ids]
    return _Merged(label_flat, tables.classes, tables.numbers, tables.areas, tables.kept)


def merge_semantic_and_instance(
    semantic: Tensor,
    instance: Tensor,
    thing_ids: Sequence[int] | Tensor,
    label_divisor: int = LABEL_DIVISOR,
    stuff_area: int = 2048,
    void_label: int = VOID_LABEL,
) -> Tensor:
    """Panoptic label map from a semantic map and a class-agnostic instance map (SPEC §5).

    ``semantic`` [H, W] int64 train ids, ``instance`` [H, W] (0 = none, k + 1 = center k), or both
    ``[N, H, W]``. Thing pixels (semantic in ``thing_ids``) take the majority class of their instance
    (ties to the smaller class id) and per-class numbers 1.. in center order; thing pixels with instance 0
    become void. Each stuff class is kept when its area >= ``stuff_area``, else void.
    """
    if semantic.shape != instance.shape or semantic.dim() not in (2, 3):
        raise ValueError(
            f"semantic and instance must both be [H, W] or [N, H, W], got {tuple(semantic.shape)} "
            f"and {tuple(instance.shape)}"
        )
    if semantic.dtype.is_floating_point or instance.dtype.is_floating_point:
        raise ValueError("semantic and instance must be integer maps (argmax classes, instance ids)")
    if semantic.dim() == 3:
        return torch.stack(
            [
                merge_semantic_and_instance(s, i, thing_ids, label_divisor, stuff_area, void_label)
                for s, i in zip(semantic, instance)
            ]
        )
    if semantic.numel() and int(semantic.min()) < 0:
        raise ValueError("semantic contains negative class ids")
    thing_list = torch.as_tensor(thing_ids, dtype=torch.long).reshape(-1)
    num_classes = 1 + max(
        int(semantic.max()) if semantic.numel() else 0, int(thing_list.max()) if thing_list.numel() else 0
    )
    is_thing = _thing_lookup(thing_list, num_classes, semantic.device)
    semantic_flat = semantic.reshape(-1).long()
    thing_idx = is_thing[semantic_flat].nonzero().squeeze(1)
    instance_ids = instance.reshape(-1)[thing_idx].long()
    if instance_ids.numel() and int(instance_ids.min()) < 0:
        raise ValueError("instance contains negative ids")
    num_centers = int(instance_ids.max()) if instance_ids.numel() else 0
    merged = _merge_flat(
        semantic_flat, thing_idx, instance_ids, num_centers, is_thing, label_divisor, stuff_area, void_label
    )
    return merged.label_flat.view(semantic.shape)


def _probability_sums(logits: Tensor, thing_idx: Tensor, instance_ids: Tensor, channel_of_instance: Tensor) -> Tensor:
    """Per instance (row k + 1 of ``channel_of_instance``, the channel of its class), the sum over its pixels
    (flat ``thing_idx`` of the ``[C, H, W]`` logits, grouped to ``instance_ids``) of that class's softmax
    probability; float64 ``[K + 1]``."""
    num_classes = logits.shape[0]
    prob_sum = torch.zeros(channel_of_instance.numel(), dtype=torch.float64, device=logits.device)
    flat_logits = logits.reshape(num_classes, -1)
    # Chunked so that the [C, chunk] gather of logits stays small (8 MB in float32).
    chunk = max(1, 4 * _CHUNK_ELEMENTS // num_classes)
    for start in range(0, thing_idx.numel(), chunk):
        idx = thing_idx[start : start + chunk]
        ids = instance_ids[start : start + chunk]
        gathered = flat_logits.index_select(1, idx).float()
        own = gathered.gather(0, channel_of_instance[ids][None])
        # softmax_own = 1 / sum_c exp(l_c - l_own): no max subtraction needed, an overflow to inf gives the
        # right limit 0, and it saves the log/exp of logsumexp.
        prob = gathered.sub_(own).exp_().sum(dim=0).reciprocal_()
        prob_sum += torch.bincount(ids, weights=prob.double(), minlength=channel_of_instance.numel())
    return prob_sum


def _instance_scores_boxes(
    logits: Tensor,
    thing_idx: Tensor,
    instance_ids: Tensor,
    merged: _Merged,
    center_scores: Tensor,
    first_class_channel: int = 0,
) -> tuple[Tensor, Tensor]:
    """Scores (center value x mean softmax prob of the class over the mask) and boxes of kept instances.

    Class ``k``'s logit is channel ``first_class_channel + k`` (1 behind a void channel); the softmax runs over
    every channel.

    Sums over masks use bincount / scatter_reduce over the thing pixels once, never a scan per instance.
    """
    width = logits.shape[-1]
    num_centers = center_scores.numel()
    device = logits.device
    if merged.classes.numel() == 0:
        return torch.zeros(0, device=device), torch.zeros(0, 4, device=device)
    class_of_instance = torch.zeros(num_centers + 1, dtype=torch.long, device=device)
    class_of_instance[merged.center_index + 1] = merged.classes + first_class_channel
    prob_sum = _probability_sums(logits, thing_idx, instance_ids, class_of_instance)
    rows = merged.center_index + 1
    mean_prob = prob_sum[rows] / merged.areas.double()
    scores = (center_scores[merged.center_index].double() * mean_prob).float()

    ys = thing_idx // width
    xs = thing_idx % width
    boxes = torch.zeros(num_centers + 1, 4, dtype=torch.long, device=device)
    for col, (coord, reduce) in enumerate(((xs, "amin"), (ys, "amin"), (xs, "amax"), (ys, "amax"))):
        boxes[:, col].scatter_reduce_(0, instance_ids, coord, reduce=reduce, include_self=False)
    boxes = boxes[rows].float()
    boxes[:, 2:] += 1  # exclusive x1/y1: (x0, y0, x1 - x0, y1 - y0) is the COCO/pycocotools bbox
    return scores, boxes


# Row / pixel chunks of the compiled kernels, each with its own accumulators: a fixed number, so that the
# float sums (scores) do not depend on the number of threads.
_COMPILED_CHUNKS = 64


def _set_numba_threads() -> None:
    """The compiled kernels use as many threads as torch (within numba's pool)."""
    import numba

    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


def _use_compiled(backend: str, semantic_logits: Tensor) -> bool:
    _check_backend(backend)
    if backend == "torch":
        return False
    # float64 logits would round in the kernels' float32; other devices run the torch version.
    fits = semantic_logits.device.type == "cpu" and semantic_logits.dtype != torch.float64
    if backend == "compiled" and not fits:
        raise ValueError(f"the compiled backend runs float32/16 tensors on the CPU, got "
                         f"{semantic_logits.dtype} on {semantic_logits.device}")
    return fits


def _rows_in_place(maps: Tensor) -> tuple[np.ndarray, int]:
    """``[C, H, W]`` float maps as the kernels read them: a C-contiguous ``[C, n]`` array where pixel (y, x) of
    channel c is at ``[c, y * row_stride + x]``, and ``row_stride``. A crop of wider maps (the predictor pads
    the image and crops the network's outputs) is read in place: copying 19 channels at 1024x2048 cost 40 ms."""
    maps = maps.detach().float()
    channels, height, width = maps.shape
    channel_stride, row_stride, column_stride = maps.stride()
    if column_stride == 1 and row_stride >= width and channel_stride >= height * row_stride:
        try:  # the whole rows of every channel, padding columns included, when the storage holds them
            return torch.as_strided(maps, (channels, channel_stride), (channel_stride, 1)).numpy(), row_stride
        except RuntimeError:
            pass
    return maps.contiguous().view(channels, height * width).numpy(), width


def _postprocess_compiled(
    logits: Tensor,
    centers: Tensor,
    center_scores: Tensor,
    offset: Tensor,
    is_thing: Tensor,
    label_divisor: int,
    stuff_area: int,
    void_label: int,
    void_class: int | None,
) -> tuple[Tensor, Tensor, _MergeTables, Tensor, Tensor]:
    """One image through the numba kernels (:mod:`.cpu_kernels`): the torch version's results.

    Returns the flat label map, the flat semantic map, the merge tables, and the kept instances' scores
    and boxes.
    """
    from panoptic_deeplab.inference import cpu_kernels

    _set_numba_threads()
    channels, height, width = logits.shape
    num_classes = is_thing.numel()
    num_centers = centers.shape[0]
    _check_label_space(num_centers, num_classes, label_divisor, void_label)
    logits_np, row_stride = _rows_in_place(logits)
    offset_np, offset_stride = _rows_in_place(offset)
    if offset_stride != row_stride:  # laid out differently: read copies of both
        logits_np, row_stride = _rows_in_place(logits.contiguous())
        offset_np, _ = _rows_in_place(offset.contiguous())
    is_thing_np = is_thing.numpy()
    pixels = height * width
    semantic = torch.empty(pixels, dtype=torch.long)
    instance = np.empty(pixels, dtype=np.int32)  # internal: half the memory traffic of int64 (top_k < 2^31)
    chunks = min(_COMPILED_CHUNKS, height)
    votes = np.zeros((chunks, num_centers + 1, num_classes), dtype=np.int64)
    logit_max, exp_sum = np.empty(pixels, dtype=np.float32), np.empty(pixels, dtype=np.float32)
    if num_centers:
        table = _build_table(centers, height, width)
        grid = (table.cell_size, table.ny, table.nx, table.counts.numpy(), table.index.numpy(), table.y.numpy(),
                table.x.numpy(), table.cy.numpy(), table.cx.numpy())
    else:  # no center: no thing pixel is grouped, the table is never read
        empty_long, empty_float = np.zeros((1, 1), dtype=np.int64), np.zeros((1, 1))
        grid = (1, 0, 0, empty_long[0], empty_long, empty_float, empty_float, empty_float[0, :0], empty_float[0, :0])
    non_finite = cpu_kernels.classify_and_group(
        logits_np, offset_np, height, width, row_stride, is_thing_np, void_class is not None, *grid,
        semantic.numpy(), instance, votes, logit_max, exp_sum,
    )
    if non_finite:
        raise ValueError("offset contains non-finite values (nan/inf) at thing pixels")
    total_votes = torch.from_numpy(votes.sum(axis=0))
    tables = _merge_tables(total_votes, total_votes.sum(dim=0), label_divisor, stuff_area, void_label, void_class)
    rows = tables.kept + 1
    instance_channel = torch.full((num_centers + 1,), -1, dtype=torch.long)
    instance_channel[rows] = tables.classes + int(void_class is not None)
    label = torch.empty(pixels, dtype=torch.long)
    probability_sums = np.zeros((chunks, num_centers + 1))
    boxes = np.empty((chunks, num_centers + 1, 4), dtype=np.int64)
    boxes[..., :2], boxes[..., 2:] = np.iinfo(np.int64).max, -1
    cpu_kernels.label_and_measure(
        logits_np, semantic.numpy(), instance, logit_max, exp_sum, width, row_stride, is_thing_np,
        tables.stuff_labels.numpy(),
        tables.instance_labels.numpy(), instance_channel.numpy(), label.numpy(), probability_sums, boxes,
    )
    mean_probability = torch.from_numpy(probability_sums.sum(axis=0))[rows] / tables.areas.double()
    scores = (center_scores[tables.kept].double() * mean_probability).float()
    corners = torch.from_numpy(np.concatenate([boxes[..., :2].min(axis=0), boxes[..., 2:].max(axis=0)], axis=1))
    kept_boxes = corners[rows].float()
    kept_boxes[:, 2:] += 1  # exclusive x1/y1, as the torch version
    return label, semantic, tables, scores, kept_boxes


def panoptic_postprocess(
    semantic_logits: Tensor,
    center: Tensor,
    offset: Tensor,
    thing_ids: Sequence[int] | Tensor,
    cfg: PostProcessConfig | None = None,
    label_divisor: int = LABEL_DIVISOR,
    void_label: int = VOID_LABEL,
    void_channel: bool = False,
    backend: str = "auto",
) -> list[PanopticPrediction]:
    """Full post-processing of a batch of model outputs (SPEC §5), one :class:`PanopticPrediction` each.

    ``semantic_logits`` [N, C, H, W], ``center`` [N, 1, H, W] raw heatmap, ``offset`` [N, 2, H, W] (dy, dx);
    ``thing_ids`` are train ids. Thresholds come from ``cfg`` (defaults of :class:`PostProcessConfig`).
    ``void_channel``: channel 0 of the logits is void and channel ``k + 1`` is train id ``k``
    (``ModelConfig.semantic_void_channel``); a pixel whose argmax is channel 0 is void in the label map and
    ``IGNORE_LABEL`` in the semantic map: deeplab2's COCO post-processing, where that channel is its ignore
    label 0, a stuff class whose panoptic label is its void label at any area.
    """
    cfg = cfg or PostProcessConfig()
    if semantic_logits.dim() != 4:
        raise ValueError(f"semantic_logits must be [N, C, H, W], got {tuple(semantic_logits.shape)}")
    batch, channels, height, width = semantic_logits.shape
    num_classes = channels - int(void_channel)
    if num_classes < 1:
        raise ValueError(f"semantic_logits has {channels} channel(s): no class besides the void channel")
    if center.shape != (batch, 1, height, width) or offset.shape != (batch, 2, height, width):
        raise ValueError(
            f"center must be [{batch}, 1, {height}, {width}] and offset [{batch}, 2, {height}, {width}]; got "
            f"{tuple(center.shape)} and {tuple(offset.shape)}"
        )
    if cfg.top_k >= label_divisor:
        raise ValueError(
            f"top_k={cfg.top_k} centers could number instances past label_divisor={label_divisor}; "
            "lower top_k or raise label_divisor"
        )
    is_thing = _thing_lookup(thing_ids, num_classes, semantic_logits.device)
    compiled = _use_compiled(backend, semantic_logits)
    void_class = None
    if void_channel:  # void becomes the stuff class num_classes, after the real ones
        void_class = num_classes
        is_thing = torch.cat([is_thing, is_thing.new_zeros(1)])
    if not compiled:
        # max(dim).indices gives the first maximum like argmax, and is ~10x faster than argmax over dim 1 on CPU.
        semantic = semantic_logits.max(dim=1).indices
        if void_channel:
            semantic = torch.where(semantic == 0, num_classes, semantic - 1)
    centers, center_scores = find_instance_centers(
        center, cfg.center_threshold, cfg.nms_kernel, cfg.top_k, backend="torch" if not compiled else backend
    )
    predictions = []
    for n in range(batch):
        if compiled:
            label_flat, semantic_flat, tables, scores, boxes = _postprocess_compiled(
                semantic_logits[n], centers[n], center_scores[n], offset[n], is_thing, label_divisor,
                cfg.stuff_area, void_label, void_class,
            )
            merged = _Merged(label_flat, tables.classes, tables.numbers, tables.areas, tables.kept)
        else:
            semantic_flat = semantic[n].reshape(-1)
            thing_idx = is_thing[semantic_flat].nonzero().squeeze(1)
            instance_ids = _group_flat(thing_idx, centers[n], offset[n])
            merged = _merge_flat(
                semantic_flat,
                thing_idx,
                instance_ids,
                centers[n].shape[0],
                is_thing,
                label_divisor,
                cfg.stuff_area,
                void_label,
                void_class,
            )
            scores, boxes = _instance_scores_boxes(
                semantic_logits[n], thing_idx, instance_ids, merged, center_scores[n], int(void_channel)
            )
        label_map = merged.label_flat.view(height, width)
        instances = Instances(
            label_map=label_map,
            ids=merged.classes * label_divisor + merged.numbers,
            classes=merged.classes,
            scores=scores,
            boxes=boxes,
            areas=merged.areas,
            center_index=merged.center_index,
        )
        semantic_map = semantic_flat.view(height, width)
        if void_class is not None:
            semantic_map = semantic_map.masked_fill(semantic_map == void_class, IGNORE_LABEL)
        predictions.append(
            PanopticPrediction(label_map, semantic_map, centers[n], center_scores[n], instances)
        )
    return predictions

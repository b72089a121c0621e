"""Post-processing of an image whose network outputs are never held whole: they arrive in bands of rows.

For images larger than memory allows (``Predictor(tile=..., low_memory=True)``, ``predict --low-memory``): the
stitched maps of a tiled prediction ((classes + 3) float32 values per pixel: 88 bytes for Cityscapes, 544 for
COCO) come band by band from :func:`.tiling.stitch_bands`, and only what the result keeps is stored for the
whole image: the semantic argmax, the center heatmap and the offsets (the result's own maps), then the label
map. The steps and their results are those of :func:`.postprocess.panoptic_postprocess` on the same maps (SPEC
§5), in this order:

1. bands of the first pass: semantic argmax, center heatmap and offsets into the image-sized results;
2. centers on the whole heatmap (NMS, threshold, top-k);
3. grouping and votes band by band over the stored maps (one candidate table for the image);
4. majority vote, numbering and the stuff area rule from the counts;
5. a second pass over the bands for the instance scores, which average the softmax probability of the
   instance's *majority* class over its pixels: that class is known only after every pixel has voted, and
   storing every class's probability for every pixel is what this module avoids, so the network runs again;
6. the label map, band by band.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor

from panoptic_deeplab.config import PostProcessConfig
from panoptic_deeplab.data.coco_panoptic import IGNORE_LABEL, LABEL_DIVISOR, VOID_LABEL
from panoptic_deeplab.inference.postprocess import (
    Instances,
    PanopticPrediction,
    _build_table,
    _check_label_space,
    _group_flat,
    _merge_tables,
    _probability_sums,
    _thing_lookup,
    find_instance_centers,
)

Bands = Callable[[], Iterable[tuple[int, dict[str, Tensor]]]]

# Pixels grouped and labelled at once in steps 3 and 6: bounds their temporaries (~50 MB).
_ROWS_PIXELS = 1 << 20


def _row_ranges(height: int, width: int) -> Iterable[tuple[int, int]]:
    rows = max(1, _ROWS_PIXELS // width)
    return ((top, min(top + rows, height)) for top in range(0, height, rows))


def postprocess_bands(
    bands: Bands,
    size: Sequence[int],
    thing_ids: Sequence[int] | Tensor,
    cfg: PostProcessConfig | None = None,
    label_divisor: int = LABEL_DIVISOR,
    void_label: int = VOID_LABEL,
    void_channel: bool = False,
) -> tuple[PanopticPrediction, Tensor, Tensor]:
    """:func:`.postprocess.panoptic_postprocess` of one ``size`` = (H, W) image whose maps come in bands (module
    doc). ``bands()`` yields ``(top, maps)`` down the image, ``maps`` as ``panoptic_postprocess`` takes them for
    rows ``top..`` (``semantic`` [1, C, rows, W] logits or log-probabilities, ``center`` [1, 1, rows, W],
    ``offset`` [1, 2, rows, W]); it is called twice and must give the same maps both times. Returns the
    prediction (equal to ``panoptic_postprocess``'s, scores to float rounding), the center heatmap [1, H, W] and
    the offsets [2, H, W]."""
    cfg = cfg or PostProcessConfig()
    height, width = int(size[0]), int(size[1])
    semantic = torch.empty(height * width, dtype=torch.long)
    center = torch.empty(1, height, width)
    offset = torch.empty(2, height, width)
    filled = 0
    num_channels = None
    for top, maps in bands():  # step 1
        if top != filled:
            raise ValueError(f"bands must follow each other down the image: expected rows from {filled}, got {top}")
        logits = maps["semantic"][0]
        rows = int(logits.shape[1])
        num_channels = int(logits.shape[0])
        if maps["center"].shape[-2:] != (rows, width) or maps["offset"].shape[-2:] != (rows, width):
            raise ValueError(f"the band at row {top} has maps of different sizes: semantic {tuple(logits.shape)}, "
                             f"center {tuple(maps['center'].shape)}, offset {tuple(maps['offset'].shape)}")
        # max(dim).indices: the first maximum, as panoptic_postprocess takes it.
        semantic[top * width : (top + rows) * width] = logits.max(dim=0).indices.reshape(-1).cpu()
        center[:, top : top + rows] = maps["center"][0].float().cpu()
        offset[:, top : top + rows] = maps["offset"][0].float().cpu()
        filled = top + rows
        del maps, logits  # the band's memory goes back before the next one is made
    if filled != height or num_channels is None:
        raise ValueError(f"the bands cover {filled} of the image's {height} rows")
    num_classes = num_channels - int(void_channel)
    is_thing = _thing_lookup(thing_ids, num_classes, torch.device("cpu"))
    void_class = None
    if void_channel:  # void becomes the stuff class num_classes, after the real ones (as panoptic_postprocess)
        void_class = num_classes
        is_thing = torch.cat([is_thing, is_thing.new_zeros(1)])
        semantic = torch.where(semantic == 0, num_classes, semantic - 1)
    num_labels = is_thing.numel()

    centers_list, scores_list = find_instance_centers(  # step 2
        center[None], cfg.center_threshold, cfg.nms_kernel, cfg.top_k
    )
    centers, center_scores = centers_list[0], scores_list[0]
    num_centers = centers.shape[0]
    _check_label_space(num_centers, num_labels, label_divisor, void_label)

    # Step 3. The label map holds each pixel's instance (0 = none or not a thing pixel) until step 6.
    label = torch.zeros(height * width, dtype=torch.long)
    votes = torch.zeros((num_centers + 1) * num_labels, dtype=torch.long)
    class_areas = torch.zeros(num_labels, dtype=torch.long)
    corners = torch.stack([torch.full((num_centers + 1,), height * width, dtype=torch.long)] * 2
                          + [torch.full((num_centers + 1,), -1, dtype=torch.long)] * 2, dim=1)
    table = _build_table(centers, height, width) if num_centers else None
    for top, bottom in _row_ranges(height, width):
        part = semantic[top * width : bottom * width]
        class_areas += torch.bincount(part, minlength=num_labels)
        thing_idx = is_thing[part].nonzero().squeeze(1).add_(top * width)
        instance_ids = _group_flat(thing_idx, centers, offset, table)
        label[thing_idx] = instance_ids
        votes += torch.bincount(semantic[thing_idx] + instance_ids * num_labels, minlength=votes.numel())
        xs, ys = thing_idx % width, thing_idx // width
        for col, (coord, reduce) in enumerate(((xs, "amin"), (ys, "amin"), (xs, "amax"), (ys, "amax"))):
            corners[:, col].scatter_reduce_(0, instance_ids, coord, reduce=reduce)

    tables = _merge_tables(  # step 4
        votes.view(num_centers + 1, num_labels), class_areas, label_divisor, cfg.stuff_area, void_label, void_class
    )
    rows_of_kept = tables.kept + 1

    prob_sum = torch.zeros(num_centers + 1, dtype=torch.float64)  # step 5
    if tables.kept.numel():
        channel_of_instance = torch.zeros(num_centers + 1, dtype=torch.long)
        channel_of_instance[rows_of_kept] = tables.classes + int(void_channel)
        for top, maps in bands():
            logits = maps["semantic"][0].cpu()
            part = slice(top * width, (top + logits.shape[1]) * width)
            thing_idx = is_thing[semantic[part]].nonzero().squeeze(1)
            prob_sum += _probability_sums(logits, thing_idx, label[part][thing_idx], channel_of_instance)
            del maps, logits
    scores = (center_scores[tables.kept].double() * (prob_sum[rows_of_kept] / tables.areas.double())).float()
    boxes = corners[rows_of_kept].float()
    boxes[:, 2:] += 1  # exclusive x1/y1, as panoptic_postprocess

    for top, bottom in _row_ranges(height, width):  # step 6
        part = slice(top * width, bottom * width)
        classes = semantic[part]
        label[part] = torch.where(is_thing[classes], tables.instance_labels[label[part]], tables.stuff_labels[classes])

    label_map = label.view(height, width)
    semantic_map = semantic.view(height, width)
    if void_class is not None:
        semantic_map.masked_fill_(semantic_map == void_class, IGNORE_LABEL)
    instances = Instances(
        label_map=label_map,
        ids=tables.classes * label_divisor + tables.numbers,
        classes=tables.classes,
        scores=scores,
        boxes=boxes,
        areas=tables.areas,
        center_index=tables.kept,
    )
    return PanopticPrediction(label_map, semantic_map, centers, center_scores, instances), center, offset

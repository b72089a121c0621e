"""Images larger than the network should see at once: run it on overlapping tiles and stitch its outputs.

The tiles cover the image in a grid with at least ``overlap`` pixels shared between neighbours (the last tile of
a row or column ends at the border). Each tile's outputs are blended into image-sized maps with weights that fall
linearly towards the tile's inner edges over the overlap (a tile's border pixels saw least context), and stay 1 at
the image border: semantic probabilities (returned as their log, which post-processing reads as it reads the
log-probabilities of test-time augmentation), the center heatmap and the offsets. Offsets need no conversion: a
(dy, dx) vector from a pixel to its instance center is the same in tile and image coordinates. One post-processing
of the stitched maps then groups every instance once, also those that cross tile borders.

A network whose ASPP pools globally (the image-pooling branch averages its whole input) would see a different
context in each tile than in the whole image; the predictor first averages that branch's input over all tiles
(weighted by :func:`tile_shares`, so each pixel counts once) and runs every tile with the image's average
(``PanopticDeepLab.image_pooling``). That costs a second backbone pass per tile and brings the tiled result close
to the whole-image one (README "Large images").

The network's memory is bounded by the tile; the stitched maps hold (classes + 3) float32 values per image pixel.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``length`` with at least ``overlap`` shared between
    neighbours; one tile when it fits."""
    if tile >= length:
        return [0]
    step = tile - overlap
    return [*range(0, length - tile, step), length - tile]


def check_tiling(tile: Sequence[int], overlap: int) -> tuple[int, int]:
    """``tile`` as (height, width), refused unless both exceed ``overlap`` >= 0."""
    if len(tile) != 2 or any(int(t) < 1 for t in tile):
        raise ValueError(f"tile size must be two positive numbers (height, width), got {list(tile)}")
    height, width = int(tile[0]), int(tile[1])
    if overlap < 0 or overlap >= min(height, width):
        raise ValueError(f"tile overlap must be at least 0 and smaller than the tile ({height}x{width}), got {overlap}")
    return height, width


def _ramp(length: int, start: int, total: int, overlap: int) -> Tensor:
    """Weights along one side of a tile at ``start`` of ``length`` in an image of ``total``: rising over
    ``overlap`` pixels from each inner edge, 1 at edges on the image border."""
    position = torch.arange(length, dtype=torch.float32)
    weight = torch.ones(length)
    if overlap > 0:
        if start > 0:
            weight = torch.minimum(weight, (position + 1) / (overlap + 1))
        if start + length < total:
            weight = torch.minimum(weight, (length - position) / (overlap + 1))
    return weight


Box = tuple[int, int, int, int]  # top, left, bottom, right


def tile_layout(height: int, width: int, tile: Sequence[int], overlap: int) -> list[tuple[Box, Tensor]]:
    """The tiles of a ``height`` x ``width`` image (module doc): each tile's box and blending weights [h, w]."""
    tile_height, tile_width = check_tiling(tile, overlap)
    layout = []
    for top in tile_starts(height, tile_height, overlap):
        for left in tile_starts(width, tile_width, overlap):
            bottom, right = min(top + tile_height, height), min(left + tile_width, width)
            weight = torch.outer(_ramp(bottom - top, top, height, overlap), _ramp(right - left, left, width, overlap))
            layout.append(((top, left, bottom, right), weight))
    return layout


def tile_shares(height: int, width: int, tile: Sequence[int], overlap: int) -> list[tuple[Box, Tensor]]:
    """:func:`tile_layout` with each weight divided by the sum over all tiles: every image pixel's shares add
    up to 1, so a sum over tiles weighted by them counts each pixel once (the image-pooling average)."""
    layout = tile_layout(height, width, tile, overlap)
    total = torch.zeros(height, width)
    for (top, left, bottom, right), weight in layout:
        total[top:bottom, left:right] += weight
    return [((top, left, bottom, right), weight / total[top:bottom, left:right])
            for (top, left, bottom, right), weight in layout]


def stitch_tiles(
    image: Tensor,
    tile: Sequence[int],
    overlap: int,
    run: Callable[[Tensor], dict[str, Tensor]],
) -> dict[str, Tensor]:
    """Outputs of ``run`` (one ``[3, h, w]`` crop of ``image``, on its device -> ``semantic`` [1, C, h, w]
    logits or log-probabilities, ``center`` [1, 1, h, w], ``offset`` [1, 2, h, w]) for the whole ``[3, H, W]``
    image, stitched from tiles (module doc): ``semantic`` as log blended probabilities, ``center`` and
    ``offset`` blended."""
    height, width = int(image.shape[1]), int(image.shape[2])
    sums: dict[str, Tensor] = {}
    for (top, left, bottom, right), share in tile_shares(height, width, tile, overlap):
        out = run(image[:, top:bottom, left:right])
        share = share.to(image.device)
        parts = {"semantic": out["semantic"].softmax(dim=1), "center": out["center"], "offset": out["offset"]}
        for key, value in parts.items():
            if key not in sums:
                sums[key] = torch.zeros((1, value.shape[1], height, width), device=image.device)
            sums[key][..., top:bottom, left:right] += value * share
    return {**sums, "semantic": sums["semantic"].clamp_min_(1e-12).log_()}

"""Images larger than the network should see at once: run it on overlapping tiles and stitch its outputs.

The tiles cover the image in a grid with at least ``overlap`` pixels shared between neighbours (the last tile of a
row or column ends at the border). Tiles start at multiples of ``align``, the network's output stride: a strided
network samples a tile on the same grid as the whole image only when the tile starts on that grid (a tile grid off
by one pixel costs PQ 96.5 -> 82 against the whole image on the synthetic set, README "Large images"). Each tile's
outputs are blended into image-sized maps with weights that fall linearly towards the tile's inner edges over the
overlap (a tile's border pixels saw least context), and stay 1 at the image border: semantic probabilities (returned
as their log, which post-processing reads as it reads the log-probabilities of test-time augmentation), the center
heatmap and the offsets. Offsets need no conversion: a (dy, dx) vector from a pixel to its instance center is the
same in tile and image coordinates. One post-processing of the stitched maps then groups every instance once, also
those that cross tile borders.

A network that averages over its whole input (the ASPP's image-pooling branch, MobileNetV3's squeeze-excite
blocks) would see a different context in each tile than in the whole image; the predictor first averages what
those layers average over all tiles (weighted by :func:`tile_shares`, so each pixel counts once) and runs every
tile with the image's averages (``PanopticDeepLab.image_averages``). That costs one more backbone pass per tile
(per context pass: ``Predictor(tile_context_passes=...)``) and brings the tiled result close to the whole-image one
(README "Large images").

The network's memory is bounded by the tile. :func:`stitch_tiles` returns image-sized maps, (classes + 3) float32
values per image pixel; :func:`stitch_bands` gives the same maps a band of rows at a time, holding one row of
tiles' worth, for post-processing in bands (:mod:`.banded`).
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor


def tile_starts(length: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``length`` with at least ``overlap`` shared between
    neighbours; one tile when it fits. Every start is a multiple of ``align`` (module doc): the step is rounded
    down to one, and the last tile starts at the first multiple from which it reaches the border, so it may be
    shorter than ``tile``. It still shares ``overlap`` with its neighbour: both starts are multiples of ``align``
    and the neighbour's next step would have passed ``length - tile``."""
    if tile >= length:
        return [0]
    step = (tile - overlap) // align * align
    last = -(-(length - tile) // align) * align
    return [*range(0, length - tile, step), last]


def check_tiling(tile: Sequence[int], overlap: int, align: int = 1) -> tuple[int, int]:
    """``tile`` as (height, width), refused unless both sides exceed ``overlap`` >= 0 by ``align`` or more
    (the step between tiles, a multiple of ``align``, must not be 0)."""
    if len(tile) != 2 or any(int(t) < 1 for t in tile):
        raise ValueError(f"tile size must be two positive numbers (height, width), got {list(tile)}")
    height, width = int(tile[0]), int(tile[1])
    if overlap < 0 or min(height, width) - overlap < align:
        limit = f"smaller than the tile ({height}x{width})" if align == 1 else (
            f"at most {min(height, width) - align}: the tile ({height}x{width}) less the network's stride ({align})")
        raise ValueError(f"tile overlap must be at least 0 and {limit}, got {overlap}")
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


def tile_layout(
    height: int, width: int, tile: Sequence[int], overlap: int, align: int = 1
) -> list[tuple[Box, Tensor]]:
    """The tiles of a ``height`` x ``width`` image (module doc): each tile's box and blending weights [h, w]."""
    tile_height, tile_width = check_tiling(tile, overlap, align)
    layout = []
    for top in tile_starts(height, tile_height, overlap, align):
        for left in tile_starts(width, tile_width, overlap, align):
            bottom, right = min(top + tile_height, height), min(left + tile_width, width)
            weight = torch.outer(_ramp(bottom - top, top, height, overlap), _ramp(right - left, left, width, overlap))
            layout.append(((top, left, bottom, right), weight))
    return layout


def _axis_shares(length: int, tile: int, overlap: int, align: int) -> list[tuple[int, int, Tensor]]:
    """Along one image side: each tile's (start, end) and its weights divided by the sum over the tiles there."""
    ramps = [(start, min(start + tile, length), _ramp(min(tile, length - start), start, length, overlap))
             for start in tile_starts(length, tile, overlap, align)]
    total = torch.zeros(length)
    for start, end, ramp in ramps:
        total[start:end] += ramp
    return [(start, end, ramp / total[start:end]) for start, end, ramp in ramps]


def tile_shares(
    height: int, width: int, tile: Sequence[int], overlap: int, align: int = 1
) -> Iterator[tuple[Box, Tensor]]:
    """The tiles of :func:`tile_layout` in the same order, each weight divided by the sum over all tiles: every
    image pixel's shares add up to 1, so a sum over tiles weighted by them counts each pixel once (the stitching,
    the image-pooling average). The weights are products of a row and a column ramp and so are their sums: the
    shares come from the two sides' sums, without an image-sized array."""
    tile_height, tile_width = check_tiling(tile, overlap, align)
    columns = _axis_shares(width, tile_width, overlap, align)
    for top, bottom, row_share in _axis_shares(height, tile_height, overlap, align):
        for left, right, column_share in columns:
            yield (top, left, bottom, right), torch.outer(row_share, column_share)


def stitch_bands(
    image: Tensor,
    tile: Sequence[int],
    overlap: int,
    run: Callable[[Tensor], dict[str, Tensor]],
    align: int = 1,
) -> Iterator[tuple[int, dict[str, Tensor]]]:
    """The maps of :func:`stitch_tiles`, band of rows by band of rows: yields ``(top, maps)``, ``maps`` the
    image's rows from ``top`` on (``[1, channels, rows, W]``), as soon as every tile covering them has run; the
    bands follow each other down the image. Only one row of tiles' maps is held ((classes + 3) float32 values
    per pixel of a tile-high band of the image) while the network runs, as long as the caller lets go of each
    band before asking for the next; each pixel sums its tiles in the same order as a whole-image stitching
    would, so the values are the same."""
    height, width = int(image.shape[1]), int(image.shape[2])
    band_top = 0
    sums: dict[str, Tensor] = {}
    for (top, left, bottom, right), share in tile_shares(height, width, tile, overlap, align):
        if left == 0 and sums:  # a new row of tiles: the rows above it are complete
            yield band_top, _finished({key: value[..., : top - band_top, :] for key, value in sums.items()})
            # The rows shared with the new row of tiles move to a band reaching its bottom before the network
            # runs, so that the finished rows' memory is free by then.
            sums = {key: _extended(value[..., top - band_top :, :], bottom - top) for key, value in sums.items()}
            band_top = top
        out = run(image[:, top:bottom, left:right])
        parts = {"semantic": out["semantic"].softmax(dim=1), "center": out["center"], "offset": out["offset"]}
        for key, value in parts.items():
            if key not in sums:
                sums[key] = torch.zeros((1, value.shape[1], bottom - band_top, width), device=image.device)
            sums[key][..., top - band_top : bottom - band_top, left:right] += value * share.to(image.device)
    yield band_top, _finished(sums)


def _extended(rows: Tensor, height: int) -> Tensor:
    """A new ``[1, C, height, W]`` band starting with a copy of ``rows``, zeros below."""
    band = rows.new_zeros((*rows.shape[:2], height, rows.shape[-1]))
    band[..., : rows.shape[-2], :] = rows
    return band


def _finished(sums: dict[str, Tensor]) -> dict[str, Tensor]:
    """Blended sums as the stitched maps: semantic probabilities as their log (in place)."""
    return {**sums, "semantic": sums["semantic"].clamp_min_(1e-12).log_()}


def stitch_tiles(
    image: Tensor,
    tile: Sequence[int],
    overlap: int,
    run: Callable[[Tensor], dict[str, Tensor]],
    align: int = 1,
) -> dict[str, Tensor]:
    """Outputs of ``run`` (one ``[3, h, w]`` crop of ``image``, on its device -> ``semantic`` [1, C, h, w]
    logits or log-probabilities, ``center`` [1, 1, h, w], ``offset`` [1, 2, h, w]) for the whole ``[3, H, W]``
    image, stitched from tiles (module doc): ``semantic`` as log blended probabilities, ``center`` and
    ``offset`` blended."""
    height, width = int(image.shape[1]), int(image.shape[2])
    stitched: dict[str, Tensor] = {}
    for top, band in stitch_bands(image, tile, overlap, run, align):
        for key, value in band.items():
            if key not in stitched:
                stitched[key] = torch.empty((1, value.shape[1], height, width), device=image.device)
            stitched[key][..., top : top + value.shape[-2], :] = value
    return stitched

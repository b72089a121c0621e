"""Compiled CPU kernels of the post-processing (numba): two passes over the pixels instead of dozens.

The torch version in :mod:`panoptic_deeplab.inference.postprocess` makes one vectorised pass over the image
per operation (argmax, lookups, gathers of candidate centers, distances, bincounts, exps...): each pass is
fast, but at 1025x2049 there are dozens of them over millions of elements. Here each pixel is visited
twice, while its values are in registers:

1. :func:`classify_and_group`: semantic argmax (first maximum, a NaN wins as in ``torch.max``) and the
   softmax denominator ``sum_c exp(l_c - max)``, both a row at a time with the channel loop outside so that
   they run in SIMD registers; then for a thing pixel its nearest center among the candidates of its grid
   cell (the table of ``postprocess._build_table``), and the (instance, class) vote and the class area counts.
2. :func:`label_and_measure`: the label map from the lookup tables of the merge, and per instance the sum of
   the softmax probability of its class (one exponential per pixel, from pass 1's denominator) and its box.

The results are the torch version's exactly: the same float64 distances ``(py - cy)^2 + (px - cx)^2`` and
ties to the smaller center index, the same integer counts; only the instance scores differ by float
rounding (:func:`exp_nonpositive` instead of torch's exponential, ``exp(l_own - max) / sum`` instead of
``1 / sum_c exp(l_c - l_own)``, a different summation order).

Each kernel splits the rows into chunks run in parallel, every chunk with its own accumulators (summed
after), so the results do not depend on the number of threads. Kernels compile on first use and are cached
on disk by numba (a few seconds once per installation).
"""

from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from numba.extending import intrinsic


@intrinsic
def _float32_from_bits(typingctx, bits):  # noqa: ANN001, ARG001 (numba's intrinsic signature)
    """Reinterpret an int32 as a float32 (a bit cast, which numba has no function for)."""

    def codegen(context, builder, signature, args):  # noqa: ANN001, ARG001
        return builder.bitcast(args[0], ir.FloatType())

    return numba.types.float32(numba.types.int32), codegen


# Row chunks of center_peaks, for parallelism only (its output does not depend on them).
_PEAK_CHUNKS = 64
_LOG2_E = np.float32(1.4426950408889634)
_LN2_HIGH = np.float32(0.693359375)  # ln 2 = high + low, high with few mantissa bits: n * high is exact
_LN2_LOW = np.float32(-2.12194440e-4)


@numba.njit(inline="always")
def exp_nonpositive(x: np.float32) -> np.float32:
    """``exp(x)`` in float32 for ``x <= 0`` (below -87, ``exp(-87)``; NaN stays NaN), within 1 ulp.

    Only arithmetic and a bit cast, so that LLVM vectorises the loops that call it: numba compiles
    ``math.exp`` to a libm call per element (a vector version needs Intel's SVML), 5x slower here. The
    classic Cephes ``expf``: ``x = n ln 2 + r`` with ``|r| <= ln 2 / 2``, a degree-7 polynomial for
    ``exp(r)``, and ``2^n`` built in the exponent bits.
    """
    x = max(x, np.float32(-87.0))  # exp(-87) is still a normal float32
    n = np.float32(np.floor(x * _LOG2_E + np.float32(0.5)))
    r = x - n * _LN2_HIGH - n * _LN2_LOW
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * r * r + r + np.float32(1.0)
    return p * _float32_from_bits((np.int32(n) + np.int32(127)) << np.int32(23))


@numba.njit(parallel=True, cache=True, nogil=True)
def classify_and_group(
    logits: np.ndarray,  # [C, >= (H - 1) * row_stride + W] float32: pixel (y, x) at y * row_stride + x
    offset: np.ndarray,  # [2, same] float32 (dy, dx)
    height: int,
    width: int,
    row_stride: int,  # >= width: the maps may be a crop of wider ones (the predictor's padding), read in place
    is_thing: np.ndarray,  # [classes] bool, classes = C - void_channel (+ 1 for the void class)
    void_channel: bool,
    cell_size: int,
    grid_rows: int,
    grid_cols: int,
    counts: np.ndarray,  # [cells] int64 candidates per cell
    candidates: np.ndarray,  # [cells, width] int64 center indices, ascending
    candidate_y: np.ndarray,  # [cells, width] float64
    candidate_x: np.ndarray,
    center_y: np.ndarray,  # [K] float64
    center_x: np.ndarray,
    semantic: np.ndarray,  # out [H*W] int64
    instance: np.ndarray,  # out [H*W] int32, 0 = none, k + 1 = center k
    votes: np.ndarray,  # out [chunks, K + 1, classes] int64 (zeros): pixels per (instance, class)
    logit_max: np.ndarray,  # out [H*W] float32: max_c l_c
    exp_sum: np.ndarray,  # out [H*W] float32: sum_c exp(l_c - max_c l_c)
) -> int:
    """Pass 1 (see the module docstring). Returns the number of thing pixels with a non-finite offset."""
    channels = logits.shape[0]
    num_centers = center_y.shape[0]
    chunks = votes.shape[0]
    rows_per_chunk = (height + chunks - 1) // chunks
    non_finite = 0
    for chunk in numba.prange(chunks):
        chunk_votes = votes[chunk]
        best = np.empty(width, dtype=np.float32)
        best_channel = np.empty(width, dtype=np.int32)
        total = np.empty(width, dtype=np.float32)
        for y in range(chunk * rows_per_chunk, min(height, (chunk + 1) * rows_per_chunk)):
            row = y * row_stride
            # The loops below vectorise only over 1-D contiguous slices and with non-short-circuit & and |.
            first = logits[0, row : row + width]
            for x in range(width):
                best[x] = first[x]
                best_channel[x] = 0
            for k in range(1, channels):
                channel = logits[k, row : row + width]
                for x in range(width):
                    value, current = channel[x], best[x]
                    # torch.max: the first maximum, and the first NaN wins (nothing replaces a NaN).
                    take = (value > current) | ((value != value) & (current == current))
                    best[x] = value if take else current
                    best_channel[x] = k if take else best_channel[x]
            for x in range(width):
                total[x] = 0.0
            for k in range(channels):
                channel = logits[k, row : row + width]
                for x in range(width):
                    total[x] += exp_nonpositive(channel[x] - best[x])
            for x in range(width):
                p = y * width + x
                logit_max[p] = best[x]
                exp_sum[p] = total[x]
                cls = best_channel[x]
                if void_channel:  # channel 0 is void: the stuff class after the real ones
                    cls = channels - 1 if cls == 0 else cls - 1
                semantic[p] = cls
                found = 0
                if is_thing[cls] and num_centers > 0:
                    # SPEC §9.2: predicted center = pixel + (dy, dx), in float64 as the torch version.
                    py = y + np.float64(offset[0, row + x])
                    px = x + np.float64(offset[1, row + x])
                    if not (math.isfinite(py) and math.isfinite(px)):
                        non_finite += 1
                    else:
                        cell_y = math.floor(py / cell_size)  # exact: the cell size is a power of two
                        cell_x = math.floor(px / cell_size)
                        nearest = 0
                        best_distance = np.inf
                        if -1 <= cell_y < grid_rows - 1 and -1 <= cell_x < grid_cols - 1:
                            cell = int(cell_y + 1) * grid_cols + int(cell_x + 1)
                            for j in range(counts[cell]):
                                dy = py - candidate_y[cell, j]
                                dx = px - candidate_x[cell, j]
                                distance = dy * dy + dx * dx
                                if distance < best_distance:  # strict: ties keep the smaller index
                                    best_distance = distance
                                    nearest = candidates[cell, j]
                        else:  # off the grid (wild offsets): every center is a candidate
                            for j in range(num_centers):
                                dy = py - center_y[j]
                                dx = px - center_x[j]
                                distance = dy * dy + dx * dx
                                if distance < best_distance:
                                    best_distance = distance
                                    nearest = j
                        found = nearest + 1
                instance[p] = found
                chunk_votes[found, cls] += 1
    return non_finite


@numba.njit(parallel=True, cache=True, nogil=True)
def label_and_measure(
    logits: np.ndarray,  # [C, >= (H - 1) * row_stride + W] float32, as in pass 1
    semantic: np.ndarray,  # [H*W] int64 from pass 1
    instance: np.ndarray,  # [H*W] int32 from pass 1
    logit_max: np.ndarray,  # [H*W] float32 from pass 1
    exp_sum: np.ndarray,  # [H*W] float32 from pass 1
    width: int,
    row_stride: int,
    is_thing: np.ndarray,  # [classes] bool
    stuff_labels: np.ndarray,  # [classes] int64 label of each class's stuff pixels
    instance_labels: np.ndarray,  # [K + 1] int64 label of each instance's thing pixels
    instance_channel: np.ndarray,  # [K + 1] int64 logit channel of each kept instance's class, -1 otherwise
    label: np.ndarray,  # out [H*W] int64
    probability_sums: np.ndarray,  # out [chunks, K + 1] float64 (zeros)
    boxes: np.ndarray,  # out [chunks, K + 1, 4] int64 (x0, y0, x1, y1 inclusive; init max, max, -1, -1)
) -> None:
    """Pass 2 (see the module docstring): label map, class probability sums and boxes per instance."""
    pixels = semantic.shape[0]
    chunks = probability_sums.shape[0]
    per_chunk = (pixels + chunks - 1) // chunks
    for chunk in numba.prange(chunks):
        chunk_sums = probability_sums[chunk]
        chunk_boxes = boxes[chunk]
        for p in range(chunk * per_chunk, min(pixels, (chunk + 1) * per_chunk)):
            cls = semantic[p]
            if not is_thing[cls]:
                label[p] = stuff_labels[cls]
                continue
            k = instance[p]
            label[p] = instance_labels[k]
            own_channel = instance_channel[k]
            if own_channel < 0:
                continue
            y = p // width
            x = p - y * width
            # Softmax probability of the instance's class (its logit is at most the maximum).
            probability = exp_nonpositive(logits[own_channel, y * row_stride + x] - logit_max[p]) / exp_sum[p]
            chunk_sums[k] += np.float64(probability)
            box = chunk_boxes[k]
            box[0] = min(box[0], x)
            box[1] = min(box[1], y)
            box[2] = max(box[2], x)
            box[3] = max(box[3], y)


@numba.njit(inline="always")
def _is_window_maximum(heat: np.ndarray, y: int, x: int, y0: int, y1: int, x0: int, x1: int) -> bool:
    """Whether no value of ``heat[y0:y1, x0:x1]`` exceeds ``heat[y, x]`` or is NaN."""
    value = heat[y, x]
    for wy in range(y0, y1):
        for wx in range(x0, x1):
            if not heat[wy, wx] <= value:  # also true for a NaN, which torch's max pool propagates
                return False
    return True


@numba.njit(parallel=True, cache=True, nogil=True)
def center_peaks(heat: np.ndarray, threshold: np.float32, radius: int, keep: np.ndarray) -> None:
    """``keep[y, x]`` = ``heat[y, x] > threshold`` and the maximum of its ``2 radius + 1`` window (clipped to
    the image; a NaN in the window suppresses it): ``postprocess.find_instance_centers``'s set, exactly.

    Only the few values above the threshold look at their window, first at their 8 neighbours (on the
    slope of a peak a larger one is usually adjacent), so the cost is about one comparison per pixel.
    """
    height, width = heat.shape
    chunks = min(_PEAK_CHUNKS, height)
    rows_per_chunk = (height + chunks - 1) // chunks
    near = min(radius, 1)
    for chunk in numba.prange(chunks):
        for y in range(chunk * rows_per_chunk, min(height, (chunk + 1) * rows_per_chunk)):
            for x in range(width):
                peak = heat[y, x] > threshold
                if peak:
                    peak = _is_window_maximum(heat, y, x, max(y - near, 0), min(y + near + 1, height),
                                              max(x - near, 0), min(x + near + 1, width))
                if peak and radius > 1:
                    peak = _is_window_maximum(heat, y, x, max(y - radius, 0), min(y + radius + 1, height),
                                              max(x - radius, 0), min(x + radius + 1, width))
                keep[y, x] = peak

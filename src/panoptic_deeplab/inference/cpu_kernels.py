"""Compiled CPU kernels of the post-processing (numba): two passes over the pixels instead of dozens.

The torch version in :mod:`panoptic_deeplab.inference.postprocess` makes one vectorised pass over the image
per operation (argmax, lookups, gathers of candidate centers, distances, bincounts, exps...): each pass is
fast, but at 1025x2049 there are dozens of them over millions of elements. Here each pixel is visited
twice, while its values are in registers:

1. :func:`classify_and_group`: semantic argmax (first maximum, a NaN wins as in ``torch.max``), then for a
   thing pixel its nearest center among the candidates of its grid cell (the table of
   ``postprocess._build_table``), and the (instance, class) vote and the class area counts.
2. :func:`label_and_measure`: the label map from the lookup tables of the merge, and per instance the sum of
   the softmax probability of its class and its box.

The results are the torch version's exactly: the same float64 distances ``(py - cy)^2 + (px - cx)^2`` and
ties to the smaller center index, the same integer counts; only the instance scores differ by float
rounding (glibc's ``expf`` instead of torch's vectorised one, a different summation order).

Each kernel splits the rows into chunks run in parallel, every chunk with its own accumulators (summed
after), so the results do not depend on the number of threads. Kernels compile on first use and are cached
on disk by numba (a few seconds once per installation).
"""

from __future__ import annotations

import math

import numba
import numpy as np


@numba.njit(parallel=True, cache=True, nogil=True)
def classify_and_group(
    logits: np.ndarray,  # [C, H*W] float32
    offset: np.ndarray,  # [2, H*W] float32 (dy, dx)
    height: int,
    width: int,
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
    instance: np.ndarray,  # out [H*W] int64, 0 = none, k + 1 = center k
    votes: np.ndarray,  # out [chunks, K + 1, classes] int64 (zeros): pixels per (instance, class)
) -> int:
    """Pass 1 (see the module docstring). Returns the number of thing pixels with a non-finite offset."""
    channels = logits.shape[0]
    num_centers = center_y.shape[0]
    chunks = votes.shape[0]
    rows_per_chunk = (height + chunks - 1) // chunks
    non_finite = 0
    for chunk in numba.prange(chunks):
        chunk_votes = votes[chunk]
        for y in range(chunk * rows_per_chunk, min(height, (chunk + 1) * rows_per_chunk)):
            for x in range(width):
                p = y * width + x
                best = logits[0, p]
                cls = 0
                if best == best:
                    for k in range(1, channels):
                        value = logits[k, p]
                        if value != value:  # torch.max: a NaN is the maximum
                            cls = k
                            break
                        if value > best:
                            best = value
                            cls = k
                if void_channel:  # channel 0 is void: the stuff class after the real ones
                    cls = channels - 1 if cls == 0 else cls - 1
                semantic[p] = cls
                found = 0
                if is_thing[cls] and num_centers > 0:
                    # SPEC §9.2: predicted center = pixel + (dy, dx), in float64 as the torch version.
                    py = y + np.float64(offset[0, p])
                    px = x + np.float64(offset[1, p])
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
    logits: np.ndarray,  # [C, H*W] float32
    semantic: np.ndarray,  # [H*W] int64 from pass 1
    instance: np.ndarray,  # [H*W] int64 from pass 1
    width: int,
    is_thing: np.ndarray,  # [classes] bool
    stuff_labels: np.ndarray,  # [classes] int64 label of each class's stuff pixels
    instance_labels: np.ndarray,  # [K + 1] int64 label of each instance's thing pixels
    instance_channel: np.ndarray,  # [K + 1] int64 logit channel of each kept instance's class, -1 otherwise
    label: np.ndarray,  # out [H*W] int64
    probability_sums: np.ndarray,  # out [chunks, K + 1] float64 (zeros)
    boxes: np.ndarray,  # out [chunks, K + 1, 4] int64 (x0, y0, x1, y1 inclusive; init max, max, -1, -1)
) -> None:
    """Pass 2 (see the module docstring): label map, class probability sums and boxes per instance."""
    channels = logits.shape[0]
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
            # Softmax probability of the instance's class, 1 / sum_c exp(l_c - l_own) as the torch version.
            own = logits[own_channel, p]
            total = np.float32(0.0)
            for c in range(channels):
                total += math.exp(logits[c, p] - own)
            chunk_sums[k] += np.float64(np.float32(1.0) / total)
            y = p // width
            x = p - y * width
            box = chunk_boxes[k]
            box[0] = min(box[0], x)
            box[1] = min(box[1], y)
            box[2] = max(box[2], x)
            box[3] = max(box[3], y)

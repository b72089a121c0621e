"""Comparing panoptic label maps whose instance numbers may differ."""

from __future__ import annotations

import numpy as np


def rename_like(ours: np.ndarray, theirs: np.ndarray, divisor: int) -> np.ndarray:
    """``ours`` with each label replaced by the label of ``theirs`` it overlaps most; the renaming must be
    one-to-one and keep every segment's class."""
    pairs, counts = np.unique(np.stack([ours.ravel(), theirs.ravel()]), axis=1, return_counts=True)
    order = np.lexsort((-counts, pairs[0]))  # by our label, then largest overlap first
    labels, first = np.unique(pairs[0][order], return_index=True)
    targets = pairs[1][order][first]
    assert len(set(targets.tolist())) == len(targets), "two of our segments match one reference segment"
    assert np.array_equal(labels // divisor, targets // divisor), "a segment changed class"
    return targets[np.searchsorted(labels, ours)]

"""Fixtures of the evaluation tests."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from _eval_cases import corrupt, make_gt, write_panoptic


@pytest.fixture
def panoptic_case(tmp_path: Path) -> Callable[[list[str], int], tuple[Path, Path, Path, Path]]:
    """Builds gt / pred folders: one image per (kind, repetition); returns (gt_json, gt_dir, pred_json, pred_dir)."""

    def build(kinds: list[str], seed: int, repeats: int = 2):
        rng = np.random.default_rng(seed)
        gts, preds = [], []
        image_id = 0
        for kind in kinds:
            for _ in range(repeats):
                ids, segs = make_gt(rng)
                pred_ids, pred_segs = corrupt(rng, ids, segs, kind)
                gts.append((image_id, ids, segs))
                preds.append((image_id, pred_ids, pred_segs))
                image_id += 1
        root = tmp_path / f"case{seed}"
        gt_json = write_panoptic(root, "gt", gts)
        pred_json = write_panoptic(root, "pred", preds)
        return gt_json, root / "gt", pred_json, root / "pred"

    return build

"""Small synthetic COCO panoptic ground truth and corrupted predictions for the evaluation tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from panoptic_deeplab.data.coco_panoptic import id2rgb

# non-contiguous category ids, as in COCO
CATEGORIES = [
    {"id": 1, "name": "road", "isthing": 0, "color": [128, 64, 128]},
    {"id": 3, "name": "sky", "isthing": 0, "color": [70, 130, 180]},
    {"id": 7, "name": "grass", "isthing": 0, "color": [107, 142, 35]},
    {"id": 10, "name": "person", "isthing": 1, "color": [220, 20, 60]},
    {"id": 11, "name": "car", "isthing": 1, "color": [0, 0, 142]},
    {"id": 20, "name": "bike", "isthing": 1, "color": [119, 11, 32]},
]
STUFF = [1, 3, 7]
THINGS = [10, 11, 20]


def _new_id(rng: np.random.Generator, used: set[int]) -> int:
    while True:
        v = int(rng.integers(1, 256**3))
        if v not in used:
            used.add(v)
            return v


def make_gt(rng: np.random.Generator, h: int = 48, w: int = 64) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Stuff bands, a void box, overlapping thing boxes, one crowd box; ids random in [1, 256^3)."""
    used: set[int] = set()
    ids = np.zeros((h, w), np.int64)
    cats: dict[int, tuple[int, int]] = {}
    bounds = np.sort(rng.choice(np.arange(4, h - 4), size=2, replace=False))
    for k, (a, b) in enumerate(zip([0, *bounds], [*bounds, h])):
        sid = _new_id(rng, used)
        ids[a:b] = sid
        cats[sid] = (STUFF[(k + int(rng.integers(3))) % 3], 0)
    y, x = rng.integers(0, h - 6), rng.integers(0, w - 6)
    ids[y : y + rng.integers(3, 8), x : x + rng.integers(3, 10)] = 0
    for _ in range(int(rng.integers(4, 9))):
        sid = _new_id(rng, used)
        y, x = rng.integers(0, h - 4), rng.integers(0, w - 4)
        ids[y : y + rng.integers(4, 16), x : x + rng.integers(4, 20)] = sid
        cats[sid] = (int(rng.choice(THINGS)), 0)
    for _ in range(int(rng.integers(0, 3))):
        sid = _new_id(rng, used)
        y, x = rng.integers(0, h - 4), rng.integers(0, w - 4)
        ids[y : y + rng.integers(4, 12), x : x + rng.integers(4, 16)] = sid
        cats[sid] = (int(rng.choice(THINGS)), 1)
    segments = []
    values, counts = np.unique(ids, return_counts=True)
    for v, c in zip(values.tolist(), counts.tolist()):
        if v == 0:
            continue
        cat, crowd = cats[v]
        segments.append({"id": v, "category_id": cat, "iscrowd": crowd, "area": c, "bbox": [0, 0, 1, 1]})
    rng.shuffle(segments)  # panopticapi's "last crowd segment per category" depends on the order
    return ids, segments


def _erode(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] &= mask[:-1]
    out[:-1] &= mask[1:]
    out[:, 1:] &= mask[:, :-1]
    out[:, :-1] &= mask[:, 1:]
    return out


def corrupt(rng: np.random.Generator, gt_ids: np.ndarray, gt_segs: list[dict[str, Any]], kind: str):
    """A prediction derived from the ground truth by one kind of mistake (ids renumbered)."""
    ids = gt_ids.copy()
    segs = {s["id"]: {"id": s["id"], "category_id": s["category_id"]} for s in gt_segs}
    things = [s for s in gt_segs if s["category_id"] in THINGS and not s["iscrowd"]]
    used = set(segs)
    if kind == "merge" and len(things) >= 2:
        a, b = things[0], things[1]
        ids[ids == b["id"]] = a["id"]
        del segs[b["id"]]
    elif kind == "drop" and things:
        ids[ids == things[0]["id"]] = 0
        del segs[things[0]["id"]]
    elif kind == "erode":
        for s in things:
            m = ids == s["id"]
            for _ in range(int(rng.integers(1, 4))):
                m = _erode(m)
            ids[(ids == s["id"]) & ~m] = 0
    elif kind == "wrong_class":
        for s in rng.permutation(gt_segs)[:3]:
            pool = THINGS if s["category_id"] in THINGS else STUFF
            segs[s["id"]]["category_id"] = int(rng.choice(pool))
    elif kind in ("crowd", "void", "extra"):
        target = {"crowd": [s for s in gt_segs if s["iscrowd"]], "void": None, "extra": None}[kind]
        for _ in range(int(rng.integers(2, 6))):
            if kind == "crowd" and target:
                crowd = target[int(rng.integers(len(target)))]
                ys, xs = np.nonzero(gt_ids == crowd["id"])
                y, x = int(rng.choice(ys)), int(rng.choice(xs))
                cat = crowd["category_id"] if rng.random() < 0.8 else int(rng.choice(THINGS))
            elif kind == "void" and (gt_ids == 0).any():
                ys, xs = np.nonzero(gt_ids == 0)
                y, x = int(rng.choice(ys)), int(rng.choice(xs))
                cat = int(rng.choice(THINGS + STUFF))
            else:
                y, x = int(rng.integers(0, ids.shape[0])), int(rng.integers(0, ids.shape[1]))
                cat = int(rng.choice(THINGS + STUFF))
            sid = _new_id(rng, used)
            ids[max(0, y - 3) : y + int(rng.integers(1, 6)), max(0, x - 3) : x + int(rng.integers(1, 8))] = sid
            segs[sid] = {"id": sid, "category_id": cat}
    elif kind == "shift":
        # move every thing by a pixel or two so IoUs straddle 0.5 on small segments
        for s in things:
            m = ids == s["id"]
            dy, dx = (int(v) for v in rng.integers(-2, 3, size=2))
            ids[m] = 0
            ids[np.roll(m, (dy, dx), axis=(0, 1))] = s["id"]
    present = set(np.unique(ids).tolist())
    pred_segs = [s for sid, s in segs.items() if sid in present]
    # renumber so that pred ids have nothing to do with gt ids
    fresh: set[int] = set()
    remap = {s["id"]: _new_id(rng, fresh) for s in pred_segs}
    out = np.zeros_like(ids)
    for old, new in remap.items():
        out[ids == old] = new
    for s in pred_segs:
        s["id"] = remap[s["id"]]
    return out, pred_segs


KINDS = ["identity", "merge", "drop", "erode", "wrong_class", "crowd", "void", "extra", "shift"]


def write_panoptic(folder: Path, name: str, images: list[tuple[int, np.ndarray, list[dict[str, Any]]]]) -> Path:
    """Write ``name``.json and PNGs under ``folder/name``; returns the JSON path."""
    png_dir = folder / name
    png_dir.mkdir(parents=True, exist_ok=True)
    anns = []
    for image_id, ids, segs in images:
        file_name = f"img_{image_id:04d}.png"
        Image.fromarray(id2rgb(ids)).save(png_dir / file_name)
        anns.append({"image_id": image_id, "file_name": file_name, "segments_info": segs})
    data = {
        "images": [{"id": i, "file_name": f"img_{i:04d}.jpg", "height": ids.shape[0], "width": ids.shape[1]}
                   for i, ids, _ in images],
        "annotations": anns,
        "categories": CATEGORIES,
    }
    path = folder / f"{name}.json"
    path.write_text(json.dumps(data))
    return path

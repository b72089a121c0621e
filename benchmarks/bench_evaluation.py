"""PQ speed and agreement: ours (`evaluate_panoptic_files`) against cityscapesscripts' panoptic evaluation.

cityscapesscripts' `evalPanopticSemanticLabeling` is the COCO panopticapi `pq_compute` algorithm. Both read the
same COCO panoptic files: the built-in synthetic dataset (200 images, 256x512) as ground truth and a perturbed
copy as prediction (instances shifted, some dropped or merged, classes swapped, false positives added).
Both run with the same number of processes. A second measurement leaves PNG decoding out (both score images
already decoded in memory, one process): PNG decoding alone costs about as much as cityscapesscripts' scoring, so
it bounds the end-to-end ratio. Usage:

    .venv/bin/python benchmarks/bench_evaluation.py [--num 200] [--size 256x512] [--workers N] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from PIL import Image

from panoptic_deeplab.data.coco_panoptic import read_panoptic_png, rgb2id, write_panoptic_png
from panoptic_deeplab.data.synthetic import make_synthetic_dataset
from panoptic_deeplab.evaluation import PQStat, evaluate_panoptic_files


def perturb(gt_json: Path, gt_dir: Path, out_json: Path, out_dir: Path, seed: int) -> None:
    """Write a prediction derived from the ground truth with typical mistakes."""
    rng = np.random.default_rng(seed)
    data = json.loads(gt_json.read_text())
    cats = {c["id"]: c for c in data["categories"]}
    thing_ids = [c for c, v in cats.items() if v["isthing"]]
    out_dir.mkdir(parents=True, exist_ok=True)
    anns = []
    for ann in data["annotations"]:
        ids = read_panoptic_png(gt_dir / ann["file_name"]).astype(np.int64)
        segs = {s["id"]: {"id": s["id"], "category_id": s["category_id"]} for s in ann["segments_info"]}
        next_id = int(ids.max()) + 1
        for s in ann["segments_info"]:
            if not cats[s["category_id"]]["isthing"]:
                if rng.random() < 0.1:  # stuff class confusion
                    segs[s["id"]]["category_id"] = int(rng.choice([c for c, v in cats.items() if not v["isthing"]]))
                continue
            m = ids == s["id"]
            r = rng.random()
            if r < 0.1:  # dropped: becomes void
                ids[m] = 0
                del segs[s["id"]]
            elif r < 0.2:  # wrong class
                segs[s["id"]]["category_id"] = int(rng.choice(thing_ids))
            else:  # shifted by a few pixels
                dy, dx = (int(v) for v in rng.integers(-4, 5, size=2))
                ids[m] = 0
                ids[np.roll(m, (dy, dx), axis=(0, 1))] = s["id"]
        for _ in range(int(rng.integers(1, 4))):  # false positives
            h, w = ids.shape
            y, x = int(rng.integers(0, h - 20)), int(rng.integers(0, w - 20))
            ids[y : y + int(rng.integers(5, 20)), x : x + int(rng.integers(5, 20))] = next_id
            segs[next_id] = {"id": next_id, "category_id": int(rng.choice(thing_ids))}
            next_id += 1
        present = set(np.unique(ids).tolist())
        write_panoptic_png(out_dir / ann["file_name"], ids)
        anns.append({"image_id": ann["image_id"], "file_name": ann["file_name"],
                     "segments_info": [s for i, s in segs.items() if i in present]})
    out_json.write_text(json.dumps({"annotations": anns, "categories": data["categories"]}))


def run_cityscapesscripts(gt_json: Path, gt_dir: Path, pred_json: Path, pred_dir: Path, workers: int, out: Path):
    from cityscapesscripts.evaluation import evalPanopticSemanticLabeling as cs

    # cityscapesscripts sizes its Pool by cpu_count(); pin it to the same number of processes as ours
    original = cs.multiprocessing.cpu_count
    cs.multiprocessing.cpu_count = lambda: workers
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return cs.evaluatePanoptic(str(gt_json), str(gt_dir), str(pred_json), str(pred_dir), str(out))
    finally:
        cs.multiprocessing.cpu_count = original


def time_in_memory(gt_json: Path, gt_dir: Path, pred_json: Path, pred_dir: Path, repeats: int) -> tuple[float, float]:
    """Best times of the per-image scoring of both implementations on PNGs decoded beforehand (one process)."""
    from cityscapesscripts.evaluation import evalPanopticSemanticLabeling as cs

    gt = json.loads(gt_json.read_text())
    pred = {a["image_id"]: a for a in json.loads(pred_json.read_text())["annotations"]}
    pairs = [(a, pred[a["image_id"]]) for a in gt["annotations"]]
    decoded = {}
    for a, p in pairs:
        decoded[str(gt_dir / a["file_name"])] = np.asarray(Image.open(gt_dir / a["file_name"]))
        decoded[str(pred_dir / p["file_name"])] = np.asarray(Image.open(pred_dir / p["file_name"]))

    class _Decoded:  # stands in for PIL.Image inside cityscapesscripts: open() returns the decoded array
        @staticmethod
        def open(path: str) -> np.ndarray:
            return decoded[path]

    def ours() -> PQStat:
        stat = PQStat()
        for a, p in pairs:
            stat.update(rgb2id(decoded[str(gt_dir / a["file_name"])]), a["segments_info"],
                        rgb2id(decoded[str(pred_dir / p["file_name"])]), p["segments_info"])
        return stat

    categories = {c["id"]: c for c in gt["categories"]}
    original, cs.Image = cs.Image, _Decoded
    try:
        t_ours, t_ref = [], []
        for _ in range(repeats):
            t = time.perf_counter()
            ours()
            t_ours.append(time.perf_counter() - t)
            t = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                cs.pq_compute_single_core(0, pairs, str(gt_dir), str(pred_dir), categories)
            t_ref.append(time.perf_counter() - t)
    finally:
        cs.Image = original
    return min(t_ours), min(t_ref)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num", type=int, default=200)
    parser.add_argument("--size", default="256x512")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each; the best is reported")
    args = parser.parse_args()
    h, w = (int(v) for v in args.size.split("x"))

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        split = make_synthetic_dataset(root, "val", args.num, (h, w), seed=0)
        pred_json, pred_dir = root / "pred.json", root / "pred"
        perturb(split.json_path, split.png_dir, pred_json, pred_dir, seed=1)
        files = (split.json_path, split.png_dir, pred_json, pred_dir)

        times_ours, times_ref = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            ours = evaluate_panoptic_files(*files, workers=args.workers)
            times_ours.append(time.perf_counter() - t)
            t = time.perf_counter()
            ref = run_cityscapesscripts(*files, args.workers, root / "cs_result.json")
            times_ref.append(time.perf_counter() - t)
        mem_ours, mem_ref = time_in_memory(*files, args.repeats)

    worst = 0.0
    for name, m in (("All", ours.all), ("Things", ours.things), ("Stuff", ours.stuff)):
        assert m.n == ref[name]["n"], name
        worst = max(worst, *(abs(getattr(m, k) - ref[name][k]) for k in ("pq", "sq", "rq")))
    for c in ours.per_class:
        worst = max(worst, *(abs(getattr(c, k) - ref["per_class"][c.category_id][k]) for k in ("pq", "sq", "rq")))
    t_ours, t_ref = min(times_ours), min(times_ref)
    print(f"{args.num} images {h}x{w}, {args.workers} worker(s), best of {args.repeats}")
    print(f"PQ {100 * ours.all.pq:.3f}  SQ {100 * ours.all.sq:.3f}  RQ {100 * ours.all.rq:.3f}  "
          f"(things {100 * ours.things.pq:.3f}, stuff {100 * ours.stuff.pq:.3f})")
    print(f"max |ours - cityscapesscripts| over All/Things/Stuff/per-class PQ SQ RQ: {worst:.2e}")
    print(f"ours {t_ours:.3f} s ({1e3 * t_ours / args.num:.2f} ms/image)   "
          f"cityscapesscripts {t_ref:.3f} s ({1e3 * t_ref / args.num:.2f} ms/image)   speed-up x{t_ref / t_ours:.1f}")
    print(f"decoded in memory, 1 process: ours {1e3 * mem_ours / args.num:.2f} ms/image   cityscapesscripts "
          f"{1e3 * mem_ref / args.num:.2f} ms/image   speed-up x{mem_ref / mem_ours:.1f}")
    if worst > 1e-9:
        raise SystemExit("results differ")


if __name__ == "__main__":
    main()

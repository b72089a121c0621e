"""PQ speed and agreement: ours (`evaluate_panoptic_files`) against cityscapesscripts' panoptic evaluation.

cityscapesscripts' `evalPanopticSemanticLabeling` is the COCO panopticapi `pq_compute` algorithm. Both read the
same COCO panoptic files: the built-in synthetic dataset (``--num`` images of ``--size``, default 200 x 256x512)
as ground truth and a perturbed copy as prediction (instances shifted, some dropped, classes swapped, false
positives added). Both use the same number of workers: cityscapesscripts processes (forked from this one, with its
allocator state) and our threads. A second measurement leaves PNG decoding out (both score images already decoded
in memory, one process), and a third times decoding the PNGs alone (PIL in both; ours through
``read_panoptic_png``, which includes the id conversion). Decoding costs more than either scoring, so it bounds
the end-to-end ratio at (their decoding + their scoring) / our decoding. Usage:

    .venv/bin/python benchmarks/bench_evaluation.py [--num 200] [--size 256x512] [--workers N] [--repeats 3]
        [--cache DIR]   # keep the generated files in DIR and reuse them (Cityscapes size takes a while to write)

e.g. Cityscapes size: ``--num 30 --size 1024x2048 --cache /tmp/pq_bench``.
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
from typing import Callable

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


def make_files(root: Path, num: int, size: tuple[int, int]) -> tuple[Path, Path, Path, Path]:
    """Ground truth and prediction files under ``root`` (made once: a ``complete`` marker says they are whole)."""
    files = (root / "val" / "panoptic_val.json", root / "val" / "panoptic", root / "pred.json", root / "pred")
    if not (root / "complete").exists():
        split = make_synthetic_dataset(root, "val", num, size, seed=0)
        assert (split.json_path, split.png_dir) == files[:2], "synthetic layout changed"
        perturb(*files, seed=1)
        (root / "complete").write_text("")
    return files


def time_decoding(
    gt_json: Path, gt_dir: Path, pred_dir: Path, repeats: int, decode: Callable[[Path], object]
) -> float:
    """Best time of decoding every gt and pred PNG once with ``decode`` (one process)."""
    names = [a["file_name"] for a in json.loads(gt_json.read_text())["annotations"]]
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for name in names:
            decode(gt_dir / name)
            decode(pred_dir / name)
        times.append(time.perf_counter() - t)
    return min(times)


def time_in_memory(
    gt_json: Path, gt_dir: Path, pred_json: Path, pred_dir: Path, repeats: int
) -> tuple[float, float, float]:
    """Best times of the per-image scoring of both implementations on PNGs decoded beforehand (one process), and
    the largest difference of their per-category counts (tp, fp, fn exact; summed IoU)."""
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
            stat = ours()
            t_ours.append(time.perf_counter() - t)
            t = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                ref = cs.pq_compute_single_core(0, pairs, str(gt_dir), str(pred_dir), categories)
            t_ref.append(time.perf_counter() - t)
    finally:
        cs.Image = original
    worst = 0.0
    for cat in categories:
        a, b = stat[cat], ref.pq_per_cat[cat]
        if (a.tp, a.fp, a.fn) != (b.tp, b.fp, b.fn):
            raise SystemExit(f"in-memory counts differ for category {cat}: ours {a}, cityscapesscripts {vars(b)}")
        worst = max(worst, abs(a.iou - b.iou))
    return min(t_ours), min(t_ref), worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num", type=int, default=200)
    parser.add_argument("--size", default="256x512")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each; the best is reported")
    parser.add_argument("--cache", type=Path, help="folder keeping the generated files between runs")
    args = parser.parse_args()
    try:
        h, w = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        parser.error(f"--size must look like 256x512, got {args.size!r}")

    with tempfile.TemporaryDirectory() as tmp:
        root = args.cache / f"{args.num}_{h}x{w}" if args.cache else Path(tmp)
        files = make_files(root, args.num, (h, w))

        times_ours, times_ref = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            ours = evaluate_panoptic_files(*files, workers=args.workers)
            times_ours.append(time.perf_counter() - t)
            t = time.perf_counter()
            ref = run_cityscapesscripts(*files, args.workers, Path(tmp) / "cs_result.json")
            times_ref.append(time.perf_counter() - t)
        mem_ours, mem_ref, mem_worst = time_in_memory(*files, args.repeats)
        decode_pil = time_decoding(files[0], files[1], files[3], args.repeats, lambda p: np.asarray(Image.open(p)))
        decode_ours = time_decoding(files[0], files[1], files[3], args.repeats, read_panoptic_png)

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
          f"{1e3 * mem_ref / args.num:.2f} ms/image   speed-up x{mem_ref / mem_ours:.1f}   "
          f"(counts equal, max |summed IoU difference| {mem_worst:.1e})")
    print(f"decoding the two PNGs alone, 1 process: PIL (cityscapesscripts) {1e3 * decode_pil / args.num:.2f} ms/image, "
          f"read_panoptic_png (ours) {1e3 * decode_ours / args.num:.2f} ms/image")
    print(f"so end-to-end speed-up <= x{(decode_pil + mem_ref) / decode_ours:.1f} even if our scoring took no time")
    if max(worst, mem_worst) > 1e-9:
        raise SystemExit("results differ")


if __name__ == "__main__":
    main()

"""Benchmark of panoptic post-processing against a straightforward pixels x centers implementation.

Run: ``.venv/bin/python benchmarks/bench_postprocess.py`` (options: ``--help``; ``--onnx`` adds the
post-processing of the exported whole-pipeline graph, run by ONNX Runtime, measured the same way).
Methods: ``compiled`` (the numba kernels, the CPU default), ``torch`` (the same post-processing as torch
operations, what runs on CUDA), ``naive`` (below), ``graph`` (``--onnx``), ``cuda`` (``--cuda``: the torch
operations on the GPU, from model outputs already there to the label map back in host memory; its memory is
the peak of torch's CUDA allocator above what the inputs hold).

Input: a synthetic 1025x2049 Cityscapes-like frame (19 classes, things 11..18) with Gaussian center
peaks (sigma 8), offsets pointing to the centers with noise on thing pixels, and semantic logits with
stuff blobs and one thing class per instance, about half of the pixels being things.

Memory method: every measurement runs in a fresh subprocess that loads the inputs, resets the kernel's
peak-RSS counter (``echo 5 > /proc/self/clear_refs``), records the current RSS, runs the function once and
reads the new peak (``VmHWM``). "Extra" = peak - RSS before the call: every byte torch, numpy or Python
touched during the call, outputs included. (tracemalloc cannot see torch's allocations.) Timings are the
median of repeated calls in the same subprocess (after the one measured for memory), with
``torch.set_num_threads(--threads)``; process CPU time (all threads) is printed too, since the wall time
suffers when other processes share the cores.

OpenMP wait policy: by default OpenMP threads spin at the end of each parallel region. When other
processes keep the cores busy, a spinning thread waits for a descheduled partner at every one of the few
hundred parallel ops of a call, and a 0.2 s call was seen to take 10-25 s. The measured processes
therefore run with ``OMP_WAIT_POLICY=PASSIVE`` (both methods alike); on dedicated cores the policy makes
little difference (a futex wake instead of a spin per region). ``--omp-wait-policy default`` measures
without it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from panoptic_deeplab.config import PostProcessConfig
from panoptic_deeplab.data.coco_panoptic import LABEL_DIVISOR, VOID_LABEL
from panoptic_deeplab.inference.postprocess import panoptic_postprocess

NUM_CLASSES = 19
THING_IDS = list(range(11, 19))


def synthesize(height: int, width: int, num_centers: int, seed: int) -> dict[str, torch.Tensor]:
    """A realistic-looking model output with ``num_centers`` instances covering about half the image."""
    gen = torch.Generator().manual_seed(seed)
    # Centers at least 24 px apart, so each makes one peak after 7x7 NMS.
    centers: list[tuple[int, int]] = []
    while len(centers) < num_centers:
        y = int(torch.randint(0, height, (1,), generator=gen))
        x = int(torch.randint(0, width, (1,), generator=gen))
        if all((y - cy) ** 2 + (x - cx) ** 2 >= 24**2 for cy, cx in centers):
            centers.append((y, x))
    ctr = torch.tensor(centers, dtype=torch.float32)
    radius = 20 + 60 * torch.rand(num_centers, generator=gen)
    peak = 0.7 + 0.3 * torch.rand(num_centers, generator=gen)
    thing_class = torch.tensor(THING_IDS)[torch.randint(0, len(THING_IDS), (num_centers,), generator=gen)]

    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    ys, xs = ys.reshape(-1).float(), xs.reshape(-1).float()
    owner = torch.empty(height * width, dtype=torch.long)
    dist = torch.empty(height * width)
    for start in range(0, height * width, 65536):  # Voronoi cells of the true centers
        d = (ys[start : start + 65536, None] - ctr[:, 0]) ** 2 + (xs[start : start + 65536, None] - ctr[:, 1]) ** 2
        dist[start : start + 65536], owner[start : start + 65536] = d.min(dim=1)
    dist = dist.sqrt()
    relative = dist / radius[owner]
    thing = relative < relative.median()  # half of the pixels are things

    stuff_blobs = torch.randint(0, 11, (1, 1, 8, 16), generator=gen).float()
    semantic = F.interpolate(stuff_blobs, size=(height, width), mode="nearest").reshape(-1).long()
    semantic = torch.where(thing, thing_class[owner], semantic)
    logits = torch.randn(NUM_CLASSES, height * width, generator=gen)
    logits[semantic, torch.arange(height * width)] += 3.0

    heat = peak[owner] * torch.exp(-(dist**2) / (2 * 8.0**2)) + 0.03 * torch.rand(height * width, generator=gen)
    offset = 10.0 * torch.randn(2, height * width, generator=gen)
    noise = 1.5 * torch.randn(2, height * width, generator=gen)
    offset[0] = torch.where(thing, ctr[owner, 0] - ys + noise[0], offset[0])
    offset[1] = torch.where(thing, ctr[owner, 1] - xs + noise[1], offset[1])
    return {
        "semantic_logits": logits.view(1, NUM_CLASSES, height, width).contiguous(),
        "center": heat.view(1, 1, height, width).contiguous(),
        "offset": offset.view(1, 2, height, width).contiguous(),
    }


def naive_postprocess(
    semantic_logits: torch.Tensor, center: torch.Tensor, offset: torch.Tensor, cfg: PostProcessConfig
) -> torch.Tensor:
    """The straightforward way (detectron2's structure): all pixels x all centers, loops per instance."""
    semantic = semantic_logits[0].argmax(dim=0)
    heat = center[0, 0]
    pooled = F.max_pool2d(center, cfg.nms_kernel, stride=1, padding=cfg.nms_kernel // 2)[0, 0]
    candidates = ((heat == pooled) & (heat > cfg.center_threshold)).nonzero()
    cand_scores = heat[candidates[:, 0], candidates[:, 1]].tolist()
    order = sorted(range(len(cand_scores)), key=lambda i: (-cand_scores[i], candidates[i].tolist()))
    ctr = candidates[order[: cfg.top_k]]
    height, width = heat.shape
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    location = torch.stack([ys + offset[0, 0], xs + offset[0, 1]], dim=-1).reshape(1, -1, 2)
    distance = torch.norm(ctr.float()[:, None, :] - location, dim=-1)  # [K, H*W]
    instance = distance.argmin(dim=0).view(height, width) + 1
    thing = torch.isin(semantic, torch.tensor(THING_IDS))
    instance[~thing] = 0
    panoptic = torch.full_like(semantic, VOID_LABEL)
    counter = [0] * NUM_CLASSES
    probs = torch.softmax(semantic_logits[0], dim=0)
    scores, boxes = [], []
    for k in range(1, ctr.shape[0] + 1):
        mask = instance == k
        if not mask.any():
            continue
        cls = int(torch.bincount(semantic[mask], minlength=NUM_CLASSES).argmax())
        counter[cls] += 1
        panoptic[mask] = cls * LABEL_DIVISOR + counter[cls]
        scores.append(float(heat[ctr[k - 1, 0], ctr[k - 1, 1]] * probs[cls][mask].mean()))
        my, mx = mask.nonzero().unbind(1)
        boxes.append((int(mx.min()), int(my.min()), int(mx.max()) + 1, int(my.max()) + 1))
    for cls in range(NUM_CLASSES):
        if cls in THING_IDS:
            continue
        mask = (semantic == cls) & (instance == 0)
        if int(mask.sum()) >= cfg.stuff_area:
            panoptic[mask] = cls * LABEL_DIVISOR
    return panoptic


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class _PostprocessOnly(torch.nn.Module):
    """The post-processing of the exported whole-pipeline graph (``export.graph.PanopticGraph``), alone."""

    def __init__(self) -> None:
        super().__init__()
        from panoptic_deeplab.config import ModelConfig
        from panoptic_deeplab.export.graph import PanopticGraph

        self.pipeline = PanopticGraph(torch.nn.Identity(), ModelConfig(num_classes=NUM_CLASSES), PostProcessConfig(),
                                      THING_IDS, LABEL_DIVISOR, VOID_LABEL)

    def forward(self, logits: torch.Tensor, heatmap: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.pipeline.postprocess(logits, heatmap, offsets)


def export_graph(inputs: dict[str, torch.Tensor], path: str) -> None:
    """The graph's post-processing as ONNX (dynamic batch and size, 200 center slots)."""
    from panoptic_deeplab.export.graph import GRAPH_OUTPUT_NAMES, sym_stride_translation

    dims = {0: torch.export.Dim.DYNAMIC, 2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC}
    example = tuple(inputs[k][..., :129, :161].contiguous() for k in ("semantic_logits", "center", "offset"))
    torch.onnx.export(_PostprocessOnly(), example, path, dynamo=True, dynamic_shapes=(dims, dims, dims),
                      input_names=["logits", "heatmap", "offsets"], output_names=list(GRAPH_OUTPUT_NAMES),
                      custom_translation_table={torch.ops.aten.sym_stride.int: sym_stride_translation}, verbose=False)


def worker(method: str, path: str, repeat: int, threads: int, out_path: str, graph_path: str | None) -> None:
    torch.set_num_threads(threads)
    inputs = torch.load(path)
    cfg = PostProcessConfig()
    if method == "graph":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(graph_path, options, providers=["CPUExecutionProvider"])
        feed = {"logits": inputs["semantic_logits"].numpy(), "heatmap": inputs["center"].numpy(),
                "offsets": inputs["offset"].numpy()}

        def run() -> torch.Tensor:
            return torch.from_numpy(session.run(["panoptic"], feed)[0][0])

    elif method == "cuda":
        on_gpu = {key: value.cuda() for key, value in inputs.items()}

        def run() -> torch.Tensor:
            label_map = panoptic_postprocess(
                on_gpu["semantic_logits"], on_gpu["center"], on_gpu["offset"], THING_IDS, cfg, backend="torch"
            )[0].label_map
            return label_map.cpu()  # waits for the GPU

        run()  # CUDA context and kernel loading: not part of the call

    elif method in ("compiled", "torch"):

        def run() -> torch.Tensor:
            return panoptic_postprocess(
                inputs["semantic_logits"], inputs["center"], inputs["offset"], THING_IDS, cfg, backend=method
            )[0].label_map

        if method == "compiled":
            run()  # numba loads (or, the first time, compiles and caches) its kernels: not part of the call

    else:

        def run() -> torch.Tensor:
            return naive_postprocess(inputs["semantic_logits"], inputs["center"], inputs["offset"], cfg)

    if method == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        label_map = run()
        extra_mib = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        with open("/proc/self/clear_refs", "w") as f:  # reset the peak-RSS counter (Linux >= 4.0)
            f.write("5")
        before = _rss_kib("VmRSS")
        label_map = run()
        extra_mib = (_rss_kib("VmHWM") - before) / 1024
    times, cpu_times = [], []
    for _ in range(repeat):
        start, cpu_start = time.perf_counter(), time.process_time()
        run()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    torch.save(label_map, out_path)
    print(json.dumps({"times": times, "cpu_times": cpu_times, "extra_mib": extra_mib}))


def measure(method: str, path: str, repeat: int, threads: int, out_path: str, wait_policy: str,
            graph_path: str | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, path, "--repeat", str(repeat)]
    cmd += ["--threads", str(threads), "--out", out_path]
    if graph_path is not None:
        cmd += ["--graph", graph_path]
    env = dict(os.environ)
    if wait_policy != "default":
        env["OMP_WAIT_POLICY"] = wait_policy  # read by OpenMP when torch loads: set before the process starts
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, nargs=2, default=(1025, 2049), metavar=("H", "W"))
    parser.add_argument("--centers", type=int, nargs="+", default=(200, 50))
    parser.add_argument("--repeat", type=int, default=9, help="timed calls of ours (median reported)")
    parser.add_argument("--naive-repeat", type=int, default=3, help="timed calls of the naive version")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--omp-wait-policy",
        choices=("PASSIVE", "ACTIVE", "default"),
        default="PASSIVE",
        help="OMP_WAIT_POLICY of the measured processes (see the module docstring)",
    )
    parser.add_argument("--onnx", action="store_true",
                        help="also the post-processing of the exported ONNX graph under ONNX Runtime (extra 'export')")
    parser.add_argument("--cuda", action="store_true", help="also the torch operations on the GPU")
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "INPUT"), help=argparse.SUPPRESS)
    parser.add_argument("--graph", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], args.worker[1], args.repeat, args.threads, args.out, args.graph)
        return

    height, width = args.size
    print(
        f"post-processing {height}x{width}, {args.threads} torch threads, OMP_WAIT_POLICY={args.omp_wait_policy}, "
        "fresh subprocess per method"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for num_centers in args.centers:
            inputs = synthesize(height, width, num_centers, args.seed)
            path = os.path.join(tmp, f"inputs_{num_centers}.pt")
            torch.save(inputs, path)
            results = {}
            methods = [("compiled", args.repeat), ("torch", args.repeat), ("naive", args.naive_repeat)]
            graph_path = None
            if args.onnx:
                graph_path = os.path.join(tmp, "postprocess.onnx")
                if not os.path.exists(graph_path):
                    export_graph(inputs, graph_path)
                methods.append(("graph", args.naive_repeat))
            if args.cuda:
                methods.append(("cuda", args.repeat))
            for method, repeat in methods:
                out = os.path.join(tmp, f"{method}_{num_centers}.pt")
                results[method] = measure(method, path, repeat, args.threads, out, args.omp_wait_policy, graph_path)
                results[method]["label_map"] = torch.load(out)
            detected = panoptic_postprocess(
                inputs["semantic_logits"], inputs["center"], inputs["offset"], THING_IDS
            )[0]
            thing_fraction = float(torch.isin(detected.semantic, torch.tensor(THING_IDS)).float().mean())
            differ = {method: int((results[method]["label_map"] != results["naive"]["label_map"]).sum())
                      for method in results if method != "naive"}
            print(
                f"\n{num_centers} true centers -> {detected.centers.shape[0]} detected, "
                f"{len(detected.instances)} instances, thing pixels {thing_fraction:.0%}, "
                f"label maps differing from naive's: {differ} pixel(s)"
            )
            for method in results:
                r = results[method]
                print(
                    f"  {method:8s}: wall median {statistics.median(r['times']):7.3f} s "
                    f"(min {min(r['times']):.3f}, max {max(r['times']):.3f}, n={len(r['times'])}), "
                    f"CPU time median {statistics.median(r['cpu_times']):7.3f} s, "
                    f"peak extra memory {r['extra_mib']:7.1f} MiB"
                )
            compiled = statistics.median(results["compiled"]["times"])
            for method in ("torch", "naive", "graph", "cuda"):
                if method in results:
                    t_ratio = statistics.median(results[method]["times"]) / compiled
                    m_ratio = results[method]["extra_mib"] / max(results["compiled"]["extra_mib"], 1e-9)
                    print(f"  ratio {method}/compiled: time x{t_ratio:.1f}, peak extra memory x{m_ratio:.1f}")


if __name__ == "__main__":
    main()

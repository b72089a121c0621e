"""CPU forward latency of Panoptic-DeepLab, eager vs channels_last, and how close it runs to the matmul peak.

For each backbone: median latency over interleaved rounds of the whole network and of the backbone alone (eval, no_grad, random
weights, batch 1), in the default (contiguous NCHW) layout and in channels_last. Multiply-adds come from
``model_info``; the machine's reference rate is a large fp32 matmul timed in the same run, so the ratios
are comparable even on a busy machine.

    .venv/bin/python benchmarks/bench_model.py [--size 1025x2049] [--repeats 3] [--backbones mobilenetv3_large resnet50]
        [--checkpoints converted.pt ...]

``--checkpoints`` also times what ``predict`` costs with each checkpoint (e.g. one written by ``convert``):
``Predictor.predict`` on a random uint8 image of ``--size`` (network, post-processing, result), next to the
network alone (``Predictor.raw_outputs``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

import torch

from panoptic_deeplab.config import ModelConfig
from panoptic_deeplab.modeling import build_model
from panoptic_deeplab.modeling.flops import model_info


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _cases(names: list[str], size: tuple[int, int]) -> dict[tuple[str, str, str], Callable[[], object]]:
    """(backbone, layout, part) -> a no-grad forward pass; part is "total" or "backbone"."""
    cases: dict[tuple[str, str, str], Callable[[], object]] = {}
    for name in names:
        for layout in ("eager", "channels_last"):
            model = build_model(ModelConfig(backbone=name, pretrained=False)).eval()
            images = torch.rand(1, 3, *size)
            if layout == "channels_last":
                model = model.to(memory_format=torch.channels_last)
                images = images.contiguous(memory_format=torch.channels_last)
            normalized = model.normalize(images)
            cases[(name, layout, "total")] = lambda m=model, x=images: m(x)
            cases[(name, layout, "backbone")] = lambda m=model, x=normalized: m.backbone(x)
    return cases


def _matmul(n: int = 4096) -> tuple[Callable[[], object], int]:
    """An ``n x n`` fp32 matmul and its multiply-adds: the reference for the machine's peak."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return (lambda: a @ b), n**3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1025x2049", help="input HxW (default 1025x2049)")
    parser.add_argument("--repeats", type=int, default=3, help="timed forward passes (median is reported)")
    parser.add_argument("--backbones", nargs="+", default=["mobilenetv3_large", "resnet50"])
    parser.add_argument("--checkpoints", nargs="*", default=[], help="also time predict end to end with these")
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.lower().split("x"))
    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads ({cores} cores), input 1x3x{size[0]}x{size[1]}")

    cases = _cases(args.backbones, size)
    matmul, matmul_macs = _matmul()
    macs = {name: model_info(ModelConfig(backbone=name), size).parts for name in args.backbones}
    with torch.no_grad():
        for fn in [matmul, *cases.values()]:  # warm-up (oneDNN primitive creation)
            fn()
        # Rounds interleave every case and the matmul, so that load drift on a shared machine hits all alike.
        times: dict[object, list[float]] = {key: [] for key in [*cases, "matmul"]}
        for _ in range(args.repeats):
            times["matmul"].append(_seconds(matmul))
            for key, fn in cases.items():
                times[key].append(_seconds(fn))
    med = {key: statistics.median(v) for key, v in times.items()}
    peak = matmul_macs / med["matmul"]  # same statistic as the network's latencies
    print(f"fp32 4096^3 matmul: median {peak / 1e9:.1f} GMAC/s, best {matmul_macs / min(times['matmul']) / 1e9:.1f}\n")
    rows = [
        dict(backbone=name, layout=layout, total_s=med[(name, layout, "total")],
             backbone_s=med[(name, layout, "backbone")], macs=macs[name]["total"].macs)
        for name in args.backbones
        for layout in ("eager", "channels_last")
    ]

    header = f"{'backbone':<18} {'layout':<14} {'total ms':>9} {'backbone ms':>11} {'bb share':>8} " \
             f"{'GMACs':>7} {'GMAC/s':>7} {'of matmul':>9} {'vs eager':>8}"
    print(header)
    print("-" * len(header))
    eager_time = {}
    for row in rows:
        rate = row["macs"] / row["total_s"]
        if row["layout"] == "eager":
            eager_time[row["backbone"]] = row["total_s"]
        speedup = eager_time[row["backbone"]] / row["total_s"]
        print(
            f"{row['backbone']:<18} {row['layout']:<14} {row['total_s'] * 1e3:>9.0f} {row['backbone_s'] * 1e3:>11.0f} "
            f"{row['backbone_s'] / row['total_s']:>8.1%} {row['macs'] / 1e9:>7.1f} {rate / 1e9:>7.1f} "
            f"{rate / peak:>9.1%} {speedup:>7.2f}x"
        )
    print("\nbb share: backbone-only latency / whole-network latency, same layout; "
          "vs eager: speed-up over the eager (NCHW) row.\nGMACs are counted over full kernels; taps of the "
          "dilated ASPP convs that fall in zero padding (most of them on small maps) are skipped by oneDNN, "
          "so 'of matmul' can pass 100% at small sizes.")
    if args.checkpoints:
        _time_predictors(args.checkpoints, size, args.repeats)


def _time_predictors(paths: list[str], size: tuple[int, int], repeats: int) -> None:
    """Median seconds of ``Predictor.predict`` (image -> PanopticResult) and of its network alone."""
    import numpy as np

    from panoptic_deeplab.inference.predictor import Predictor

    image = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
    tensor = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    print(f"\n{'checkpoint':<40} {'predict s':>9} {'network s':>9} {'rest':>6}")
    for path in paths:
        predictor = Predictor.from_checkpoint(path, device="cpu")
        predictor.predict(image)  # warm-up
        predict = statistics.median(_seconds(lambda: predictor.predict(image)) for _ in range(repeats))
        network = statistics.median(_seconds(lambda: predictor.raw_outputs([tensor])) for _ in range(repeats))
        print(f"{os.path.basename(path):<40} {predict:>9.2f} {network:>9.2f} {1 - network / predict:>6.0%}")
    print("rest: post-processing, resizing and the result's conversion, as a share of predict.")


if __name__ == "__main__":
    main()

"""End-to-end inference on the CPU: image -> panoptic label map with PyTorch (eager NCHW, channels_last) and with
the exported ONNX graphs under ONNX Runtime (the network with PyTorch post-processing around it, and the whole
pipeline in one graph), for MobileNetV3-L and ResNet-50 at 1025x2049.

    .venv/bin/python benchmarks/bench_inference.py [--size 1024x2048] [--repeats 2] [--presets cityscapes_mnv3 ...]

Random weights with unit batch-norm scales (a fresh model's zero scales would give a flat heatmap and no
centers; these give up to ``top_k`` = 200 of them, the grouping's worst case). Per preset and runtime: the best
of ``--repeats`` runs of ``predict`` (padding, network, post-processing, result) after a warm-up, the ratio to
eager PyTorch, and the share of pixels whose label equals eager PyTorch's (float noise can flip a tie). Needs
the 'export' extra. Set OMP_WAIT_POLICY=PASSIVE on a busy machine.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from panoptic_deeplab.config import config_to_dict, load_config
from panoptic_deeplab.data.metadata import dataset_meta
from panoptic_deeplab.engine.checkpoint import atomic_torch_save
from panoptic_deeplab.export import export_onnx, onnx_predictor
from panoptic_deeplab.inference.predictor import Predictor
from panoptic_deeplab.modeling import build_model


def _size(text: str) -> tuple[int, int]:
    height, width = text.lower().split("x")
    return int(height), int(width)


def _best(predictor: Predictor, image: np.ndarray, repeats: int) -> tuple[float, np.ndarray]:
    label_map = predictor.predict(image).label_map  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        predictor.predict(image)
        times.append(time.perf_counter() - start)
    return min(times), label_map


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=_size, default=(1024, 2048))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--presets", nargs="*", default=["cityscapes_mnv3", "cityscapes_r50"])
    args = parser.parse_args()
    image = np.random.default_rng(0).integers(0, 256, (*args.size, 3), dtype=np.uint8)
    print(f"{'preset':18s} {'runtime':24s} {'s/image':>8s} {'x eager':>8s} {'labels = eager':>15s}")
    for preset in args.presets:
        cfg = load_config(preset, ["model.pretrained=false"])
        torch.manual_seed(0)
        model = build_model(cfg.model).eval()
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                torch.nn.init.ones_(module.weight)
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = atomic_torch_save({"model": model.state_dict(), "config": config_to_dict(cfg),
                                            "meta": dataset_meta("cityscapes").to_json()}, Path(tmp) / "model.pt")
            network = export_onnx(checkpoint, Path(tmp) / "network.onnx", postprocess=False)
            pipeline = export_onnx(checkpoint, Path(tmp) / "pipeline.onnx")
            channels_last = Predictor.from_checkpoint(checkpoint, device="cpu")  # the predictor's own layout
            eager = Predictor.from_checkpoint(checkpoint, device="cpu")
            eager.model = eager.model.to(memory_format=torch.contiguous_format)
            runs = {"PyTorch eager (NCHW)": eager, "PyTorch channels_last": channels_last,
                    "ORT fp32 network": onnx_predictor(network.path),
                    "ORT fp32 whole pipeline": onnx_predictor(pipeline.path)}
            results = {name: _best(predictor, image, args.repeats) for name, predictor in runs.items()}
            centers = len(channels_last.predict(image).centers)
        print(f"{preset}: {centers} centers detected")
        base_time, base_labels = results["PyTorch eager (NCHW)"]
        for name, (seconds, labels) in results.items():
            print(f"{preset:18s} {name:24s} {seconds:8.2f} {base_time / seconds:8.2f} "
                  f"{float((labels == base_labels).mean()):15.6f}", flush=True)


if __name__ == "__main__":
    main()

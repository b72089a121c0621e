"""End-to-end inference: image -> panoptic label map with PyTorch (eager NCHW, channels_last) and with
the exported ONNX graphs under ONNX Runtime (the network with PyTorch post-processing around it, and the whole
pipeline in one graph; fp32, and int8 by ``quantize``), for MobileNetV3-L and ResNet-50 at 1025x2049.

    .venv/bin/python benchmarks/bench_inference.py [--size 1024x2048] [--repeats 2] [--presets cityscapes_mnv3 ...]
        [--pq-checkpoint demo_output/train/model_final.pt --pq-split demo_output/data/val]
        [--device cuda [--compile]]

``--device cuda`` runs PyTorch on the GPU instead (eager, channels_last, TF32, bf16 with folded batch norms; ``--compile`` adds
``torch.compile`` of the channels_last network in fp32 and bf16) and the network graph under ONNX Runtime's CUDA
provider where the installed onnxruntime has it; post-processing then runs on the GPU (torch operations), or on
the CPU after ONNX Runtime.

Random weights with structure (``modeling.random_weights``: a fresh model's heatmap is flat, without centers;
these give many, up to ``top_k`` = 200). Per preset and runtime: the best
of ``--repeats`` runs of ``predict`` (padding, network, post-processing, result) after a warm-up, the ratios to
eager PyTorch and to channels_last PyTorch (the ``Predictor``'s default), and the share of pixels whose label equals eager PyTorch's (float noise can flip a tie). Needs
the 'export' extra. With ``--pq-checkpoint`` (a model trained on the synthetic dataset, e.g. by ``make demo``)
it also prints each runtime's PQ on the synthetic val split and its difference to fp32 (int8 calibrated on 8
images of the train split beside it). Set
OMP_WAIT_POLICY=PASSIVE on a busy machine.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from panoptic_deeplab.checkpoint import atomic_torch_save
from panoptic_deeplab.config import config_to_dict, load_config
from panoptic_deeplab.data.metadata import dataset_meta
from panoptic_deeplab.evaluation import evaluate_panoptic_files
from panoptic_deeplab.export import export_onnx, onnx_predictor, quantize_onnx
from panoptic_deeplab.inference.predictor import Predictor, list_images, predict_folder
from panoptic_deeplab.modeling import build_model
from panoptic_deeplab.modeling.random_weights import randomize_weights


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


def _runtimes(checkpoint: Path, folder: Path, calibration: Sequence[Any]) -> dict[str, Any]:
    """Every way this project runs ``checkpoint``, each a predictor with ``predict`` / ``predict_batch``; the int8
    files are calibrated on ``calibration`` images."""
    network = export_onnx(checkpoint, folder / "network.onnx", postprocess=False)
    pipeline = export_onnx(checkpoint, folder / "pipeline.onnx")
    network_int8 = quantize_onnx(network.path, folder / "network_int8.onnx", calibration)
    pipeline_int8 = quantize_onnx(pipeline.path, folder / "pipeline_int8.onnx", calibration)
    eager = Predictor.from_checkpoint(checkpoint, device="cpu")
    eager.model = eager.model.to(memory_format=torch.contiguous_format)
    return {
        "PyTorch eager (NCHW)": eager,
        "PyTorch channels_last": Predictor.from_checkpoint(checkpoint, device="cpu"),  # the predictor's default
        "PyTorch bf16 (BN folded)": Predictor.from_checkpoint(checkpoint, device="cpu", precision="bf16"),
        "ORT fp32 network": onnx_predictor(network.path),
        "ORT fp32 whole pipeline": onnx_predictor(pipeline.path),
        "ORT int8 network": onnx_predictor(network_int8.path),
        "ORT int8 whole pipeline": onnx_predictor(pipeline_int8.path),
    }


def _cuda_runtimes(checkpoint: Path, folder: Path, compile_network: bool) -> dict[str, Any]:
    """The GPU's ways to run ``checkpoint``: PyTorch on CUDA, and ONNX Runtime's CUDA provider if installed."""
    eager = Predictor.from_checkpoint(checkpoint, device="cuda")
    eager.model = eager.model.to(memory_format=torch.contiguous_format)
    runs: dict[str, Any] = {
        "PyTorch eager (NCHW)": eager,
        "PyTorch channels_last": Predictor.from_checkpoint(checkpoint, device="cuda"),
        "PyTorch tf32": Predictor.from_checkpoint(checkpoint, device="cuda", precision="tf32"),
        "PyTorch bf16 (BN folded)": Predictor.from_checkpoint(checkpoint, device="cuda", precision="bf16"),
    }
    if compile_network:
        for name, precision in (("torch.compile fp32", "fp32"), ("torch.compile bf16", "bf16")):
            runs[name] = Predictor.from_checkpoint(checkpoint, device="cuda", precision=precision)
            runs[name].model = torch.compile(runs[name].model)  # compiled at the warm-up call
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        network = export_onnx(checkpoint, folder / "network.onnx", postprocess=False)
        runs["ORT CUDA fp32 network"] = onnx_predictor(network.path,
                                                       providers=("CUDAExecutionProvider", "CPUExecutionProvider"))
    else:
        print(f"(no ORT runs: this onnxruntime has no CUDA provider, only {onnxruntime.get_available_providers()})")
    return runs


def _pq(predictor: Any, split: Path, folder: Path) -> float:
    """PQ of ``predictor`` on a split folder as make-synthetic writes it (``images/``, ``panoptic/``, one JSON)."""
    (gt_json,) = split.glob("*.json")
    json_path, png_dir = folder / "predictions.json", folder / "predictions"
    for _ in predict_folder(predictor, list_images(split / "images"), json_path, png_dir):
        pass
    # The prediction set names images by file stem; the ground truth by its own ids: match them by file name.
    truth = json.loads(gt_json.read_text())
    ids = {Path(im["file_name"]).stem: im["id"] for im in truth["images"]}
    predicted = json.loads(json_path.read_text())
    for entry in predicted["images"] + predicted["annotations"]:
        key = "id" if "file_name" in entry and "segments_info" not in entry else "image_id"
        entry[key] = ids[str(entry[key])]
    json_path.write_text(json.dumps(predicted))
    report = evaluate_panoptic_files(gt_json, split / "panoptic", json_path, png_dir, progress=False)
    return 100 * report.all.pq


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=_size, default=(1024, 2048))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--presets", nargs="*", default=["cityscapes_mnv3", "cityscapes_r50"])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--compile", action="store_true", help="with --device cuda: also torch.compile")
    parser.add_argument("--pq-checkpoint", type=Path, default=None,
                        help="a checkpoint trained on the synthetic dataset (e.g. demo_output/train/model_final.pt)")
    parser.add_argument("--pq-split", type=Path, default=None,
                        help="its synthetic val split (e.g. demo_output/data/val): PQ of every runtime on it")
    args = parser.parse_args()
    image = np.random.default_rng(0).integers(0, 256, (*args.size, 3), dtype=np.uint8)
    print(f"{'preset':18s} {'runtime':24s} {'s/image':>8s} {'x eager':>8s} {'x ch_last':>9s} {'labels = eager':>15s}")
    for preset in args.presets:
        cfg = load_config(preset, ["model.pretrained=false"])
        torch.manual_seed(0)
        model = randomize_weights(build_model(cfg.model).eval())
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = atomic_torch_save({"model": model.state_dict(), "config": config_to_dict(cfg),
                                            "meta": dataset_meta("cityscapes").to_json()}, Path(tmp) / "model.pt")
            if args.device == "cuda":
                runs = _cuda_runtimes(checkpoint, Path(tmp), args.compile)
            else:
                runs = _runtimes(checkpoint, Path(tmp), [image])
            results = {name: _best(predictor, image, args.repeats) for name, predictor in runs.items()}
            centers = len(runs["PyTorch channels_last"].predict(image).centers)
        print(f"{preset}: {centers} centers detected")
        base_time, base_labels = results["PyTorch eager (NCHW)"]
        channels_last_time = results["PyTorch channels_last"][0]  # the Predictor's default
        for name, (seconds, labels) in results.items():
            print(f"{preset:18s} {name:24s} {seconds:8.2f} {base_time / seconds:8.2f} "
                  f"{channels_last_time / seconds:9.2f} {float((labels == base_labels).mean()):15.6f}", flush=True)
    if args.pq_checkpoint is not None:
        if args.device == "cuda":
            parser.error("--pq-checkpoint measures the CPU runtimes: leave out --device cuda")
        if args.pq_split is None:
            parser.error("--pq-checkpoint needs --pq-split")
        print(f"\nPQ on {args.pq_split} of {args.pq_checkpoint}")
        with tempfile.TemporaryDirectory() as tmp:
            pqs = {}
            # Calibrated on training images where the split has them beside it, as a user would.
            train_images = args.pq_split.parent / "train" / "images"
            calibration = list_images(train_images if train_images.is_dir() else args.pq_split / "images")[:8]
            for name, predictor in _runtimes(args.pq_checkpoint, Path(tmp), calibration).items():
                folder = Path(tmp) / name.replace(" ", "_")
                pqs[name] = _pq(predictor, args.pq_split, folder)
                print(f"{name:24s} PQ {pqs[name]:6.2f} ({pqs[name] - pqs['PyTorch eager (NCHW)']:+.2f})", flush=True)


if __name__ == "__main__":
    main()

"""A tiny checkpoint whose outputs have structure, and synthetic images, shared by the export tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_setup import TINY_MODEL_OVERRIDES

from panoptic_deeplab.checkpoint import atomic_torch_save
from panoptic_deeplab.config import config_to_dict, load_config
from panoptic_deeplab.data.synthetic import make_synthetic_dataset, synthetic_meta
from panoptic_deeplab.modeling import build_model
from panoptic_deeplab.modeling.random_weights import randomize_weights

# Few center slots: the graph's export time grows with them.
EXPORT_OVERRIDES = [*TINY_MODEL_OVERRIDES, "postprocess.top_k=8", "postprocess.stuff_area=64"]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``checkpoint``: a randomised tiny model (8 center slots); ``images``: 3 synthetic val images of 96x160."""
    root = tmp_path_factory.mktemp("export")
    cfg = load_config("synthetic_mnv3", EXPORT_OVERRIDES)
    torch.manual_seed(0)
    model = randomize_weights(build_model(cfg.model).eval())
    checkpoint = atomic_torch_save({"model": model.state_dict(), "config": config_to_dict(cfg),
                                    "meta": synthetic_meta().to_json()}, root / "model.pt")
    split = make_synthetic_dataset(root / "data", "val", num_images=3, size=(96, 160), seed=3)
    return {"root": root, "checkpoint": checkpoint, "images": split.image_dir}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "panoptic_deeplab.cli", *args], capture_output=True, text=True)


@pytest.fixture(scope="session")
def exported(tiny_checkpoint) -> dict[str, Path]:
    """The tiny checkpoint's network exported by the CLI (--no-postprocess), with its images."""
    pytest.importorskip("onnxruntime", reason="the 'export' extra is not installed")
    onnx_path = tiny_checkpoint["root"] / "network.onnx"
    result = _cli("export", "--checkpoint", str(tiny_checkpoint["checkpoint"]), "--output", str(onnx_path),
                     "--no-postprocess")
    assert result.returncode == 0, result.stderr
    assert "exported the network" in result.stdout
    assert "ONNX Runtime vs PyTorch, max difference / std: semantic" in result.stdout
    return {**tiny_checkpoint, "onnx": onnx_path}


@pytest.fixture(scope="session")
def pipeline(tiny_checkpoint) -> dict[str, Path]:
    """The tiny checkpoint's whole pipeline exported by the CLI, with its images."""
    pytest.importorskip("onnxruntime", reason="the 'export' extra is not installed")
    onnx_path = tiny_checkpoint["root"] / "pipeline.onnx"
    result = _cli("export", "--checkpoint", str(tiny_checkpoint["checkpoint"]), "--output", str(onnx_path))
    assert result.returncode == 0, result.stderr
    assert "exported the whole pipeline" in result.stdout
    assert "label map pixels that differ from PyTorch on the check image: 0" in result.stdout
    return {**tiny_checkpoint, "onnx": onnx_path}

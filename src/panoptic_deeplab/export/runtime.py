"""ONNX Runtime inference of an exported network, behind the ordinary :class:`Predictor`.

The graph maps ``images`` ``[N, 3, H, W]`` (RGB in [0, 1], float32) to the network's raw outputs ``semantic``,
``center`` and ``offset`` at the input size (the model's normalisation is inside the graph). The ONNX file's
``metadata_props`` carry what the predictor needs besides the graph: the checkpoint's config, the dataset's
categories, the model's mean pixel (padding) and the fixed input size, if any.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from panoptic_deeplab.config import Config, PostProcessConfig, config_from_dict
from panoptic_deeplab.data.coco_panoptic import DatasetMeta
from panoptic_deeplab.inference.predictor import Predictor

METADATA_KEY = "panoptic_deeplab"  # metadata_props key of the JSON written by export_onnx
METADATA_VERSION = 1
OUTPUT_NAMES = ("semantic", "center", "offset")


class ExportError(ValueError):
    """An export that cannot be made, or an ONNX file this project cannot run."""


def require(module: str) -> ModuleType:
    """Import an optional dependency of the ``export`` extra, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(
            f"ONNX export and inference need the 'export' extra ({module} is not installed): "
            "pip install 'panoptic-deeplab[export]'"
        ) from None


def read_onnx_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The project's metadata of an exported file (config, categories, mean pixel, input size)."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path} {'is a directory' if path.is_dir() else 'does not exist'}: expected an .onnx file")
    onnx = require("onnx")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others for files that are not ONNX
        raise ExportError(f"{path} is not an ONNX model ({type(exc).__name__}: {exc})") from None
    props = {p.key: p.value for p in model.metadata_props}
    if METADATA_KEY not in props:
        raise ExportError(f"{path} is an ONNX model but not one exported by panoptic-deeplab export (no "
                          f"'{METADATA_KEY}' metadata: its config and categories are unknown)")
    data = json.loads(props[METADATA_KEY])
    if data.get("version") != METADATA_VERSION:
        raise ExportError(f"{path}: metadata version {data.get('version')}, this version reads {METADATA_VERSION}")
    return data


class OnnxNetwork(nn.Module):
    """An exported network as a module with the model's interface: ``forward(images)`` -> ``semantic``,
    ``center``, ``offset`` (torch tensors). A fixed-size graph gets its input padded bottom/right with the mean
    pixel, as the predictor pads, and its outputs cropped back."""

    def __init__(self, path: str | os.PathLike[str], pixel_mean: Sequence[float],
                 input_size: Sequence[int] | None = None, providers: Sequence[str] = ("CPUExecutionProvider",)):
        super().__init__()
        ort = require("onnxruntime")
        self.path = Path(path)
        self.session = ort.InferenceSession(str(self.path), providers=list(providers))
        self.input_size = tuple(int(v) for v in input_size) if input_size is not None else None
        self.register_buffer("pixel_mean", torch.tensor(list(pixel_mean), dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        height, width = int(images.shape[2]), int(images.shape[3])
        if self.input_size is not None:
            if height > self.input_size[0] or width > self.input_size[1]:
                raise ValueError(
                    f"{self.path} was exported for inputs of {self.input_size[0]}x{self.input_size[1]}, this one "
                    f"needs {height}x{width}: export again with a larger --size, or without --size (any size)"
                )
            padded = self.pixel_mean.to(images.dtype).expand(images.shape[0], 3, *self.input_size).clone()
            padded[:, :, :height, :width] = images
            images = padded
        outputs = self.session.run(list(OUTPUT_NAMES), {"images": np.ascontiguousarray(images.float().cpu().numpy())})
        return {name: torch.from_numpy(out[:, :, :height, :width].copy()) for name, out in zip(OUTPUT_NAMES, outputs)}


def onnx_predictor(
    path: str | os.PathLike[str],
    postprocess: PostProcessConfig | None = None,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    **kwargs: Any,
) -> Predictor:
    """A :class:`Predictor` whose network is the exported graph at ``path``, run by ONNX Runtime: the same
    results, COCO files and pictures as the PyTorch predictor. ``kwargs`` go to :class:`Predictor` (TTA, batch)."""
    data = read_onnx_metadata(path)
    cfg: Config = config_from_dict(data["config"], source=f"metadata of {path}")
    meta = DatasetMeta.from_json(data["meta"])
    network = OnnxNetwork(path, data["pixel_mean"], data.get("input_size"), providers)
    return Predictor(network, (cfg.model, postprocess or cfg.postprocess), meta, device="cpu", **kwargs)

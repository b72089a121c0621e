"""A checkpoint's network as an ONNX graph: ``images`` [N, 3, H, W] in [0, 1] -> ``semantic``, ``center``,
``offset`` at the input size, with the model's normalisation inside.

The graph is traced by ``torch.onnx.export(dynamo=True)`` (torch.export, then onnxscript). Without ``size`` the
batch, height and width stay dynamic: any size the network resamples exactly (k * output_stride + 1 with aligned
corners) runs, and the predictor pads every image to one, as it does for PyTorch. With ``size`` the graph is
fixed to it (for runtimes that need static shapes); smaller images are padded to it. After writing, the export
runs the graph with ONNX Runtime on a random input and reports the largest difference to PyTorch per output.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from panoptic_deeplab.atomic import write_atomic
from panoptic_deeplab.config import Config, config_to_dict
from panoptic_deeplab.data.transforms import valid_input_size
from panoptic_deeplab.inference.predictor import Predictor

from .runtime import METADATA_KEY, METADATA_VERSION, OUTPUT_NAMES, ExportError, require

DEFAULT_OPSET = 18
# The random input the export checks itself on, when the graph's size is free: small, so the check is quick.
CHECK_SIZE = (129, 161)


@dataclass(frozen=True)
class ExportedModel:
    """What :func:`export_onnx` wrote."""

    path: Path
    input_size: tuple[int, int] | None  # None: dynamic
    opset: int
    max_error: dict[str, float]  # per output: max |ONNX Runtime - PyTorch| / std(PyTorch) on the check input


class _RawOutputs(nn.Module):
    """The model with its outputs as a tuple in :data:`OUTPUT_NAMES` order (ONNX outputs are positional)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        outputs = self.model(images)
        return tuple(outputs[name] for name in OUTPUT_NAMES)  # type: ignore[return-value]


def export_onnx(
    checkpoint: str | os.PathLike[str],
    output: str | os.PathLike[str],
    size: tuple[int, int] | None = None,
    opset: int = DEFAULT_OPSET,
) -> ExportedModel:
    """Export the network of ``checkpoint`` (trained or converted) to ``output`` (written atomically).

    ``size`` (H, W) fixes the input size; it must be one the network resamples exactly (e.g. 1025x2049).
    """
    onnx = require("onnx")
    require("onnxscript")
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    model_cfg = predictor.model_cfg
    if size is not None:
        valid = valid_input_size(size[0], size[1], model_cfg.output_stride, model_cfg.align_corners,
                                 model_cfg.size_divisibility)
        if tuple(size) != valid:
            raise ExportError(f"--size {size[0]}x{size[1]} is not a size this network resamples exactly "
                              f"(output stride {model_cfg.output_stride}): use {valid[0]}x{valid[1]}")
    model = predictor.model.to(memory_format=torch.contiguous_format).eval()
    example_size = tuple(size) if size is not None else valid_input_size(
        *CHECK_SIZE, model_cfg.output_stride, model_cfg.align_corners, model_cfg.size_divisibility)
    example = torch.rand(1, 3, *example_size, generator=torch.Generator().manual_seed(0))
    dynamic = None if size is not None else {"images": {0: torch.export.Dim.DYNAMIC, 2: torch.export.Dim.DYNAMIC,
                                                        3: torch.export.Dim.DYNAMIC}}
    metadata = {
        "version": METADATA_VERSION,
        # the config as the predictor runs it (model + post-processing)
        "config": config_to_dict(Config(model=model_cfg, postprocess=predictor.postprocess_cfg)),
        "meta": predictor.meta.to_json(),
        "pixel_mean": [float(v) for v in predictor.model.pixel_mean.reshape(-1)],
        "input_size": list(size) if size is not None else None,
        "checkpoint": Path(checkpoint).name,
    }
    output = Path(output)
    with tempfile.TemporaryDirectory(prefix="onnx_export_") as tmp:
        traced = Path(tmp) / "model.onnx"
        try:
            with torch.no_grad():
                torch.onnx.export(_RawOutputs(model).eval(), (example,), str(traced), dynamo=True,
                                  dynamic_shapes=dynamic, input_names=["images"], output_names=list(OUTPUT_NAMES),
                                  opset_version=opset, verbose=False)
        except Exception as exc:  # torch.export / onnxscript raise many kinds; the message is what helps
            raise ExportError(f"cannot export the network of {checkpoint} to ONNX opset {opset}: "
                              f"{type(exc).__name__}: {str(exc)[:2000]}") from None
        graph = onnx.load(str(traced))
        graph.metadata_props.add(key=METADATA_KEY, value=json.dumps(metadata))
        write_atomic(output, lambda f: f.write(graph.SerializeToString()))
    return ExportedModel(output, tuple(size) if size else None, opset, _check(output, model, example))


def _check(path: Path, model: nn.Module, example: Tensor) -> dict[str, float]:
    """Max |ONNX Runtime - PyTorch| / std(PyTorch) per output on ``example``."""
    ort = require("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ours = session.run(list(OUTPUT_NAMES), {"images": example.numpy()})
    with torch.no_grad():
        reference = _RawOutputs(model)(example)
    return {name: float(np.abs(a - b.numpy()).max() / max(float(b.std()), 1e-12))
            for name, a, b in zip(OUTPUT_NAMES, ours, reference)}

"""A checkpoint as an ONNX graph, traced by ``torch.onnx.export(dynamo=True)`` (torch.export, then onnxscript).

Two graphs:

* the whole pipeline (default): ``images`` uint8 RGB ``[N, H, W, 3]`` -> panoptic label map, semantic map, center
  heatmap, offsets, centers and instances (:data:`~panoptic_deeplab.export.graph.GRAPH_OUTPUT_NAMES`), padding and
  post-processing inside (:class:`~panoptic_deeplab.export.graph.PanopticGraph`). Without ``size`` the batch, height
  and width are dynamic (any size); with ``size`` the graph takes images of exactly that size.
* the network only (``postprocess=False``): ``images`` ``[N, 3, H, W]`` in [0, 1] -> ``semantic``, ``center``,
  ``offset`` at the input size, the model's normalisation inside. Dynamic sizes are those the network resamples
  exactly (k * output_stride + 1 with aligned corners), and the predictor pads every image to one, as it does for
  PyTorch; with ``size`` the graph is fixed to it and smaller images are padded to it.

After writing, the export runs the graph with ONNX Runtime on a random input and compares it with PyTorch: the
largest difference per raw output and, for the whole pipeline, the number of label-map pixels that differ.
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

from .graph import GRAPH_OUTPUT_NAMES, PanopticGraph, sym_stride_translation
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
    max_error: dict[str, float]  # per raw output: max |ONNX Runtime - PyTorch| / std(PyTorch) on the check input
    postprocess: bool  # the whole pipeline (True) or the network only
    label_pixels_differ: int | None  # whole pipeline: label-map pixels where ONNX Runtime and PyTorch differ


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
    postprocess: bool = True,
) -> ExportedModel:
    """Export ``checkpoint`` (trained or converted) to ``output`` (written atomically), with its post-processing
    (default) or the network only. ``size`` (H, W) fixes the input size: any image size for the whole pipeline, a
    size the network resamples exactly (e.g. 1025x2049) for the network only."""
    onnx = require("onnx")
    require("onnxscript")
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    model_cfg = predictor.model_cfg
    valid = None if size is None else valid_input_size(size[0], size[1], model_cfg.output_stride,
                                                       model_cfg.align_corners, model_cfg.size_divisibility)
    if size is not None and not postprocess and tuple(size) != valid:
        raise ExportError(f"--size {size[0]}x{size[1]} is not a size this network resamples exactly "
                          f"(output stride {model_cfg.output_stride}): use {valid[0]}x{valid[1]}")
    model = predictor.model.to(memory_format=torch.contiguous_format).eval()
    generator = torch.Generator().manual_seed(0)
    # The batch is always dynamic; height and width unless the size is fixed.
    dynamic_dims = (0,) if size is not None else (0, 1, 2) if postprocess else (0, 2, 3)
    dynamic = {"images": {d: torch.export.Dim.DYNAMIC for d in dynamic_dims}}
    if postprocess:
        meta = predictor.meta
        try:
            traced_module: nn.Module = PanopticGraph(model, model_cfg, predictor.postprocess_cfg, meta.thing_train_ids,
                                                     meta.label_divisor, meta.void_label)
        except ValueError as exc:
            raise ExportError(f"cannot export {checkpoint} with its post-processing: {exc}") from None
        example_size = tuple(size) if size is not None else CHECK_SIZE
        # Two images: with one, torch.export may bake a batch of 1 into shapes it computes.
        example = torch.randint(0, 256, (2, *example_size, 3), dtype=torch.uint8, generator=generator)
        output_names = list(GRAPH_OUTPUT_NAMES)
    else:
        traced_module = _RawOutputs(model)
        example_size = valid if valid is not None else valid_input_size(
            *CHECK_SIZE, model_cfg.output_stride, model_cfg.align_corners, model_cfg.size_divisibility)
        example = torch.rand(1, 3, *example_size, generator=generator)
        output_names = list(OUTPUT_NAMES)
    metadata = {
        "version": METADATA_VERSION,
        "postprocess": postprocess,
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
                torch.onnx.export(traced_module.eval(), (example,), str(traced), dynamo=True,
                                  dynamic_shapes=dynamic, input_names=["images"], output_names=output_names,
                                  opset_version=opset, verbose=False,
                                  custom_translation_table={torch.ops.aten.sym_stride.int: sym_stride_translation})
        except Exception as exc:  # torch.export / onnxscript raise many kinds; the message is what helps
            raise ExportError(f"cannot export {checkpoint} to ONNX opset {opset}: "
                              f"{type(exc).__name__}: {str(exc)[:2000]}") from None
        graph = onnx.load(str(traced))
        graph.metadata_props.add(key=METADATA_KEY, value=json.dumps(metadata))
        write_atomic(output, lambda f: f.write(graph.SerializeToString()))
    if postprocess:
        max_error, differ = _check_pipeline(output, predictor, example)
        return ExportedModel(output, tuple(size) if size else None, opset, max_error, True, differ)
    return ExportedModel(output, tuple(size) if size else None, opset, _check(output, model, example), False, None)


def _relative_error(ours: np.ndarray, reference: Tensor) -> float:
    return float(np.abs(ours - reference.numpy()).max() / max(float(reference.std()), 1e-12))


def _check(path: Path, model: nn.Module, example: Tensor) -> dict[str, float]:
    """Max |ONNX Runtime - PyTorch| / std(PyTorch) per output on ``example``."""
    ort = require("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ours = session.run(list(OUTPUT_NAMES), {"images": example.numpy()})
    with torch.no_grad():
        reference = _RawOutputs(model)(example)
    return {name: _relative_error(a, b) for name, a, b in zip(OUTPUT_NAMES, ours, reference)}


def _check_pipeline(path: Path, predictor: Predictor, example: Tensor) -> tuple[dict[str, float], int]:
    """The whole-pipeline graph against the PyTorch predictor on ``example`` (uint8 [N, H, W, 3]): max relative
    difference of the center heatmap and offsets, and the number of label-map pixels that differ."""
    ort = require("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    panoptic, center, offset = session.run(["panoptic", "center", "offset"], {"images": example.numpy()})
    references = [predictor.predict(image.numpy()) for image in example]
    errors = {"center": max(_relative_error(c[0], torch.from_numpy(r.center)) for c, r in zip(center, references)),
              "offset": max(_relative_error(o, torch.from_numpy(r.offset)) for o, r in zip(offset, references))}
    return errors, sum(int((p != r.label_map).sum()) for p, r in zip(panoptic, references))

"""int8 static quantization of an exported ONNX file (ONNX Runtime's ``quantize_static``), calibrated on images.

The convolutions get int8 weights (per output channel) and uint8 input activations, in the QDQ format, which ONNX
Runtime runs as integer convolutions (VNNI / AMX on CPUs that have them); their outputs stay float. Everything else
(resizing, normalisation, the whole post-processing of a pipeline graph) stays float, so the graph keeps its
inputs, outputs and metadata, and ``predict --onnx`` runs it like the float file.

Calibration: each image goes through the float file's own predictor, and the tensors it feeds to the graph
(padded and normalised exactly as at inference) are what the calibration observes, so the activation ranges
are those of real inputs of the real sizes. A few images of the data the model will see are enough (ONNX
Runtime's min-max calibration); more make the ranges no better when they are alike.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from panoptic_deeplab.atomic import write_atomic
from panoptic_deeplab.inference.predictor import ImageInput

from .runtime import METADATA_KEY, ExportError, onnx_predictor, read_onnx_metadata, require

# Quantized: the convolutions, where the time goes. Resize, the ASPP pooling and the post-processing stay float.
QUANTIZED_OPS = ("Conv",)


@dataclass(frozen=True)
class QuantizedModel:
    """What :func:`quantize_onnx` wrote."""

    path: Path
    source: Path
    calibration_images: int
    quantized_nodes: int  # convolutions now running in int8


class _RecordingSession:
    """An ONNX Runtime session that keeps a copy of every input it is fed (the calibration data)."""

    def __init__(self, session: Any) -> None:
        self._session = session
        self.feeds: list[dict[str, np.ndarray]] = []

    def run(self, output_names: Sequence[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.feeds.append({name: np.array(value, copy=True) for name, value in feed.items()})
        return self._session.run(output_names, feed)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


def calibration_feeds(model: str | os.PathLike[str], images: Sequence[ImageInput],
                      progress: bool = False) -> list[dict[str, np.ndarray]]:
    """The inputs ``model``'s predictor feeds its graph for ``images`` (one feed per image)."""
    from tqdm import tqdm

    predictor = onnx_predictor(model)
    owner = getattr(predictor, "model", predictor)  # a network graph (OnnxNetwork) runs inside a Predictor
    recorder = _RecordingSession(owner.session)
    owner.session = recorder
    for image in tqdm(images, desc="calibrate", unit="image", disable=not progress):
        predictor.predict(image)
    return recorder.feeds


def quantize_onnx(
    model: str | os.PathLike[str],
    output: str | os.PathLike[str],
    calibration_images: Sequence[ImageInput],
    progress: bool = False,
) -> QuantizedModel:
    """Write ``output``: ``model`` (a file of ``export``, either kind) with int8 convolutions calibrated on
    ``calibration_images`` (paths, arrays, PIL images or tensors, as :class:`Predictor` takes). Atomic."""
    onnx = require("onnx")
    quantization = require("onnxruntime.quantization")
    model, output = Path(model), Path(output)
    metadata = read_onnx_metadata(model)
    if metadata.get("precision") == "int8":
        raise ExportError(f"{model} is already quantized (int8): quantize the float file export wrote")
    if not calibration_images:
        raise ExportError("quantization needs at least one calibration image")
    if output.resolve() == model.resolve():
        raise ExportError(f"--output {output} is the input file: write the int8 model to another file")
    feeds = calibration_feeds(model, calibration_images, progress)

    class Reader(quantization.CalibrationDataReader):
        def __init__(self) -> None:
            self._feeds: Iterator[dict[str, np.ndarray]] = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._feeds, None)

    with tempfile.TemporaryDirectory(prefix="onnx_quantize_") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quantized = Path(tmp) / "quantized.onnx"
        try:
            # Shape inference and graph clean-up first, as ONNX Runtime recommends; its symbolic shape inference
            # does not follow torch.export's symbolic sizes, so only ONNX's own runs.
            quantization.quant_pre_process(str(model), str(prepared), skip_symbolic_shape=True)
            quantization.quantize_static(
                str(prepared), str(quantized), Reader(), quant_format=quantization.QuantFormat.QDQ,
                activation_type=quantization.QuantType.QUInt8, weight_type=quantization.QuantType.QInt8,
                per_channel=True, op_types_to_quantize=list(QUANTIZED_OPS),
                # Convolution outputs stay float (each next convolution quantizes its own input): rounding them,
                # the heads' pixel offsets and center peaks included, cost 3.4 PQ on the synthetic val split of
                # a demo model (benchmarks/bench_inference.py), 0.1 without.
                extra_options={"OpTypesToExcludeOutputQuantization": list(QUANTIZED_OPS)},
            )
        except Exception as exc:  # ONNX Runtime's tools raise many kinds; the message is what helps
            raise ExportError(f"cannot quantize {model}: {type(exc).__name__}: {str(exc)[:2000]}") from None
        graph = onnx.load(str(quantized))
        metadata.update(precision="int8", calibration_images=len(feeds), source=model.name)
        for prop in graph.metadata_props:
            if prop.key == METADATA_KEY:
                prop.value = json.dumps(metadata)
        dequantized = {out for node in graph.graph.node if node.op_type == "DequantizeLinear" for out in node.output}
        quantized_nodes = sum(1 for node in graph.graph.node if node.op_type in QUANTIZED_OPS
                              and len(node.input) > 1 and node.input[1] in dequantized)
        write_atomic(output, lambda f: f.write(graph.SerializeToString()))
    return QuantizedModel(output, model, len(feeds), quantized_nodes)

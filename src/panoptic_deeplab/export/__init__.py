"""Deployment: a checkpoint exported to ONNX (:func:`export_onnx`), the whole pipeline (image -> label map and
instances, :class:`~panoptic_deeplab.export.graph.PanopticGraph`) or the network only, and run by ONNX Runtime with
the PyTorch predictor's results (:func:`onnx_predictor`), optionally with int8 convolutions (:func:`quantize_onnx`).

Needs the ``export`` extra (onnx, onnxscript, onnxruntime): ``pip install 'panoptic-deeplab[export]'``.
"""

from .onnx import ExportedModel, export_onnx
from .quantize import QuantizedModel, quantize_onnx
from .runtime import ExportError, OnnxNetwork, OnnxPanopticPredictor, onnx_predictor, read_onnx_metadata

__all__ = [
    "ExportError",
    "ExportedModel",
    "OnnxNetwork",
    "OnnxPanopticPredictor",
    "QuantizedModel",
    "export_onnx",
    "onnx_predictor",
    "quantize_onnx",
    "read_onnx_metadata",
]

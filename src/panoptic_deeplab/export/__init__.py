"""Deployment: a checkpoint exported to ONNX (:func:`export_onnx`), the whole pipeline (image -> label map and
instances, :class:`~panoptic_deeplab.export.graph.PanopticGraph`) or the network only, and run by ONNX Runtime with
the PyTorch predictor's results (:func:`onnx_predictor`).

Needs the ``export`` extra (onnx, onnxscript, onnxruntime): ``pip install 'panoptic-deeplab[export]'``.
"""

from .onnx import ExportedModel, export_onnx
from .runtime import ExportError, OnnxNetwork, OnnxPanopticPredictor, onnx_predictor, read_onnx_metadata

__all__ = [
    "ExportError",
    "ExportedModel",
    "OnnxNetwork",
    "OnnxPanopticPredictor",
    "export_onnx",
    "onnx_predictor",
    "read_onnx_metadata",
]

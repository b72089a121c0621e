"""Deployment: a checkpoint's network exported to ONNX (:func:`export_onnx`) and run by ONNX Runtime through the
same padding, TTA and post-processing as the PyTorch predictor (:func:`onnx_predictor`).

Needs the ``export`` extra (onnx, onnxscript, onnxruntime): ``pip install 'panoptic-deeplab[export]'``.
"""

from .onnx import ExportedModel, export_onnx
from .runtime import ExportError, OnnxNetwork, onnx_predictor, read_onnx_metadata

__all__ = ["ExportError", "ExportedModel", "OnnxNetwork", "export_onnx", "onnx_predictor", "read_onnx_metadata"]

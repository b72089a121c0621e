"""ONNX Runtime inference of an exported file (:func:`onnx_predictor`), with the PyTorch predictor's results.

* A whole-pipeline graph (``export``'s default) runs in :class:`OnnxPanopticPredictor`: uint8 images in, label maps
  and instances out, nothing around it but the conversion of its outputs to
  :class:`~panoptic_deeplab.inference.results.PanopticResult`.
* A network-only graph (``export --no-postprocess``: ``images`` ``[N, 3, H, W]`` in [0, 1] -> ``semantic``,
  ``center``, ``offset``) runs as :class:`OnnxNetwork` inside the ordinary :class:`Predictor`, so padding, TTA and
  post-processing are the PyTorch predictor's code.

The ONNX file's ``metadata_props`` carry what inference needs besides the graph: which of the two it is, the
checkpoint's config, the dataset's categories, the model's mean pixel (padding) and the fixed input size, if any.
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
from panoptic_deeplab.inference.postprocess import Instances, PanopticPrediction
from panoptic_deeplab.inference.predictor import ImageInput, Predictor, image_to_tensor
from panoptic_deeplab.inference.results import PanopticResult, result_from_prediction, warn_if_centers_dropped

METADATA_KEY = "panoptic_deeplab"  # metadata_props key of the JSON written by export_onnx
METADATA_VERSION = 2  # 2: the whole pipeline can be inside ('postprocess')
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
    if data.get("version") not in (1, METADATA_VERSION):
        raise ExportError(f"{path}: metadata version {data.get('version')}, this version reads 1 and "
                          f"{METADATA_VERSION}")
    data.setdefault("postprocess", False)  # version 1 files hold the network only
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


def image_to_uint8(image: ImageInput) -> np.ndarray:
    """Any input :class:`Predictor` accepts -> uint8 RGB ``[H, W, 3]``; a float tensor is rounded to k / 255 steps
    (exact for images that were uint8, as every decoded file is)."""
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
        return np.ascontiguousarray(image)
    tensor = image_to_tensor(image)  # checks and converts paths, PIL images and tensors
    return tensor.mul(255.0).round_().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()


class OnnxPanopticPredictor:
    """A whole-pipeline graph run by ONNX Runtime: :meth:`predict` / :meth:`predict_batch` as :class:`Predictor`'s,
    the same :class:`PanopticResult` (so :func:`~panoptic_deeplab.inference.predictor.predict_folder` and the
    pictures work unchanged)."""

    def __init__(self, path: str | os.PathLike[str], metadata: dict[str, Any],
                 providers: Sequence[str] = ("CPUExecutionProvider",), batch_size: int = 1) -> None:
        ort = require("onnxruntime")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.path = Path(path)
        cfg: Config = config_from_dict(metadata["config"], source=f"metadata of {path}")
        self.model_cfg, self.postprocess_cfg = cfg.model, cfg.postprocess
        self.meta = DatasetMeta.from_json(metadata["meta"])
        self.input_size = tuple(int(v) for v in metadata["input_size"]) if metadata.get("input_size") else None
        self.batch_size = int(batch_size)
        self.session = ort.InferenceSession(str(self.path), providers=list(providers))
        self._output_names = [o.name for o in self.session.get_outputs()]

    def predict(self, image: ImageInput) -> PanopticResult:
        """Panoptic prediction for one image (path, PIL image, uint8 HxWx3 array, or [3, H, W] tensor)."""
        return self.predict_batch([image])[0]

    def predict_batch(self, images: Sequence[ImageInput]) -> list[PanopticResult]:
        """Predictions for several images; consecutive images of one size run together, ``batch_size`` at a time."""
        arrays = [image_to_uint8(im) for im in images]
        for array in arrays:
            if self.input_size is not None and array.shape[:2] != self.input_size:
                raise ValueError(
                    f"{self.path} was exported for {self.input_size[0]}x{self.input_size[1]} images, this one is "
                    f"{array.shape[0]}x{array.shape[1]}: export again with --size {array.shape[0]}x{array.shape[1]}, "
                    "or without --size (any size)"
                )
        results: list[PanopticResult] = []
        start = 0
        while start < len(arrays):
            stop = start + 1
            while stop < len(arrays) and stop - start < self.batch_size and arrays[stop].shape == arrays[start].shape:
                stop += 1
            outputs = self.session.run(self._output_names, {"images": np.stack(arrays[start:stop])})
            named = dict(zip(self._output_names, outputs))
            results += [self._result(named, i) for i in range(stop - start)]
            start = stop
        return results

    def _result(self, out: dict[str, np.ndarray], i: int) -> PanopticResult:
        def tensor(name: str) -> Tensor:
            return torch.from_numpy(np.ascontiguousarray(out[name][i]))

        label_map = tensor("panoptic")
        count = int(out["num_centers"][i])
        kept = tensor("instance_areas") > 0
        instances = Instances(
            label_map=label_map,
            ids=tensor("instance_ids")[kept],
            classes=tensor("instance_classes")[kept],
            scores=tensor("instance_scores")[kept],
            boxes=tensor("instance_boxes")[kept],
            areas=tensor("instance_areas")[kept],
            center_index=kept.nonzero().squeeze(1),
        )
        prediction = PanopticPrediction(label_map, tensor("semantic"), tensor("centers")[:count],
                                        tensor("center_scores")[:count], instances)
        warn_if_centers_dropped(prediction, self.postprocess_cfg.top_k, f"{self.path} keeps the top_k it was "
                                "exported with: export with --no-postprocess and predict with --top-k")
        return result_from_prediction(prediction, tensor("center"), tensor("offset"), self.meta)


def onnx_predictor(
    path: str | os.PathLike[str],
    postprocess: PostProcessConfig | None = None,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    **kwargs: Any,
) -> Predictor | OnnxPanopticPredictor:
    """The predictor of an exported file at ``path``, run by ONNX Runtime: the same results, COCO files and pictures
    as the PyTorch predictor. A whole-pipeline graph gives an :class:`OnnxPanopticPredictor` (its post-processing
    settings are those it was exported with; ``kwargs``: ``batch_size``); a network-only graph a :class:`Predictor`
    around :class:`OnnxNetwork` (``postprocess`` overrides its settings; ``kwargs`` go to :class:`Predictor`: TTA,
    batch size)."""
    data = read_onnx_metadata(path)
    if data["postprocess"]:
        tta = kwargs.pop("tta_flip", False) or tuple(kwargs.pop("tta_scales", (1.0,))) != (1.0,)
        if tta or postprocess is not None or kwargs.keys() - {"batch_size"}:
            raise ExportError(
                f"{path} holds the whole pipeline (post-processing inside): test-time augmentation and other "
                "post-processing settings need the network only; export with --no-postprocess for them"
            )
        return OnnxPanopticPredictor(path, data, providers, **kwargs)
    cfg: Config = config_from_dict(data["config"], source=f"metadata of {path}")
    meta = DatasetMeta.from_json(data["meta"])
    network = OnnxNetwork(path, data["pixel_mean"], data.get("input_size"), providers)
    return Predictor(network, (cfg.model, postprocess or cfg.postprocess), meta, device="cpu", **kwargs)

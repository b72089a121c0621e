"""Run a trained model on images: input checks, padding, test-time augmentation, post-processing.

``Predictor.predict(image)`` returns a :class:`~panoptic_deeplab.inference.results.PanopticResult` at the image's
own size; :func:`predict_folder` writes many as one COCO panoptic prediction set
(:class:`~panoptic_deeplab.inference.results.PanopticPredictionWriter`). The network is a PyTorch model or, through
:func:`panoptic_deeplab.export.onnx_predictor`, an exported ONNX graph run by ONNX Runtime: both go through the same
padding, TTA and post-processing.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from panoptic_deeplab.config import Config, ModelConfig, PostProcessConfig
from panoptic_deeplab.data.coco_panoptic import (
    DatasetError,
    DatasetMeta,
    list_images,
    load_image,
)
from panoptic_deeplab.data.transforms import (
    IMAGENET_MEAN,
    pad_to_size,
    valid_input_size,
)
from panoptic_deeplab.device import cuda_tf32, resolve_device
from panoptic_deeplab.inference.banded import postprocess_bands
from panoptic_deeplab.inference.postprocess import PanopticPrediction, panoptic_postprocess
from panoptic_deeplab.inference.tiling import check_tiling, stitch_bands, stitch_tiles, tile_shares
from panoptic_deeplab.inference.tracking import InstanceTracker
from panoptic_deeplab.inference.results import (
    PanopticPredictionWriter,
    PanopticResult,
    result_from_prediction,
    warn_if_centers_dropped,
)

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray, Tensor]


# Arithmetic of the network: "fp32" (exact, the default: on CUDA without TF32, see device.cuda_tf32), "tf32" (CUDA
# convolutions and matrix products with TF32 inputs: on an H200 ResNet-50 at 1024x2048 took 0.16 s instead of
# 0.20 s; the same as fp32 on the CPU) or "bf16" (batch norms folded into the convolutions, then autocast:
# convolutions and matrix products in bfloat16; about 2x end to end on CPUs with AVX512-BF16 / AMX, 1.0-1.2x on an
# H200). Post-processing stays float32/float64.
PRECISIONS = ("fp32", "tf32", "bf16")


def image_to_tensor(image: ImageInput) -> Tensor:
    """Any accepted input -> float32 tensor ``[3, H, W]`` in [0, 1] (on the CPU for files/arrays).

    Accepted: a path (any format PIL reads), a ``PIL.Image`` (converted to RGB), a ``uint8`` numpy array
    ``[H, W, 3]``, or a floating tensor ``[3, H, W]`` with values in [0, 1].
    """
    if isinstance(image, (str, os.PathLike)):
        # load_image raises DatasetError (a ValueError) naming the file when missing or unreadable
        image = load_image(image)
    elif isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"a numpy image must be [H, W, 3] RGB, got shape {image.shape}")
        if image.dtype != np.uint8:
            raise ValueError(
                f"a numpy image must be uint8 (0..255), got dtype {image.dtype}; "
                "pass float images as a [3, H, W] tensor in [0, 1]"
            )
        # torch.tensor copies: the caller's array may be read-only (e.g. decoded by PIL)
        tensor = torch.tensor(image).permute(2, 0, 1).float().div_(255.0)
    elif isinstance(image, Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"a tensor image must be [3, H, W], got shape {tuple(image.shape)}")
        if not image.is_floating_point():
            raise ValueError(
                f"a tensor image must be floating point with values in [0, 1], got dtype {image.dtype}"
            )
        tensor = image.detach().float()
        if tensor.numel() and (tensor.min() < 0.0 or tensor.max() > 1.0 or not torch.isfinite(tensor).all()):
            raise ValueError(
                f"a tensor image must hold values in [0, 1], got the range "
                f"[{float(tensor.min()):.3g}, {float(tensor.max()):.3g}]"
            )
    else:
        raise TypeError(
            f"cannot predict on a {type(image).__name__}: expected a path, a PIL image, a uint8 [H, W, 3] "
            "numpy array or a float [3, H, W] tensor in [0, 1]"
        )
    if tensor.shape[1] == 0 or tensor.shape[2] == 0:
        raise ValueError(f"the image is empty (size {tensor.shape[1]}x{tensor.shape[2]})")
    return tensor


def _resize_ratio(src: int, dst: int, align_corners: bool) -> float:
    """Factor that converts a length in pixels of a ``src``-long axis to pixels of a ``dst``-long one.

    SPEC §1.7 / §9.2: with align_corners=True the grid ends map to each other, so distances scale by
    ``(dst - 1) / (src - 1)`` (DL2); otherwise by ``dst / src``.
    """
    if align_corners and src > 1 and dst > 1:
        return (dst - 1) / (src - 1)
    return dst / src


def resize_outputs(outputs: dict[str, Tensor], size: Sequence[int], align_corners: bool) -> dict[str, Tensor]:
    """Bilinearly resize ``semantic`` / ``center`` / ``offset`` ``[N, C, h, w]`` to ``size = (H, W)``,
    scaling the offset values per axis so they stay in pixels of the new size (SPEC §9.2)."""
    height, width = int(size[0]), int(size[1])
    src_h, src_w = outputs["offset"].shape[-2:]
    if (src_h, src_w) == (height, width):
        return outputs

    def resize(t: Tensor) -> Tensor:
        return F.interpolate(t, size=(height, width), mode="bilinear", align_corners=align_corners)

    scale = torch.tensor(
        [_resize_ratio(src_h, height, align_corners), _resize_ratio(src_w, width, align_corners)],
        dtype=outputs["offset"].dtype,
        device=outputs["offset"].device,
    ).view(1, 2, 1, 1)
    return {
        "semantic": resize(outputs["semantic"]),
        "center": resize(outputs["center"]),
        "offset": resize(outputs["offset"]) * scale,
    }


def flip_outputs(outputs: dict[str, Tensor]) -> dict[str, Tensor]:
    """Mirror outputs of a horizontally flipped input back; dx changes sign (SPEC §9.2)."""
    offset = outputs["offset"].flip(-1)
    sign = torch.tensor([1.0, -1.0], dtype=offset.dtype, device=offset.device).view(1, 2, 1, 1)
    return {
        "semantic": outputs["semantic"].flip(-1),
        "center": outputs["center"].flip(-1),
        "offset": offset * sign,
    }


def _memory_format(model: nn.Module) -> torch.memory_format:
    """The layout of the model's conv weights, so that inputs match it (no conversion inside each conv).

    1x1 kernels are contiguous in both layouts: only a kernel that is channels_last and not contiguous tells."""
    channels_last = any(
        p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
        for p in model.parameters()
    )
    return torch.channels_last if channels_last else torch.contiguous_format


def fit_to_range(height: int, width: int, size: Sequence[int]) -> tuple[int, int]:
    """The size deeplab2 resizes an eval image to with ``min_resize_value = max_resize_value = size``
    (``data/preprocessing/preprocess_utils.py``, ``resize_to_range_helper``): scale up until both sides reach
    ``size``, then down until both fit in it (never up), each step's sides floored in float32 (``_scale_dim``)."""
    target_h, target_w = (int(v) for v in size)

    def scaled(h: int, w: int, factor: float) -> tuple[int, int]:
        f = np.float32(factor)
        return int(np.floor(np.float32(h) * f)), int(np.floor(np.float32(w) * f))

    height, width = scaled(height, width, max(target_h / height, target_w / width))  # _resize_to_match_min_size
    return scaled(height, width, min(np.float32(min(target_h / height, target_w / width)), np.float32(1.0)))


class Predictor:
    """Panoptic-DeepLab inference on single images or batches, with optional test-time augmentation.

    ``tta_scales`` resizes the input by each factor; ``tta_flip`` adds a mirrored view of every scale.
    With more than one view, the semantic softmax probabilities, the center heatmaps and the offsets
    (converted to pixels of the original image) are averaged (SPEC §5 "TTA"); post-processing then
    receives ``log`` of the averaged probabilities, whose argmax and softmax are those of the average.
    ``precision`` is one of :data:`PRECISIONS`: ``"fp32"`` exact float32 (also on CUDA), ``"tf32"`` CUDA's
    TF32 convolutions, ``"bf16"`` the network with its batch norms folded into the convolutions, under bfloat16
    autocast.
    ``tile`` (height, width): an image larger than it runs on overlapping tiles (``tile_overlap`` pixels, default a
    quarter of the tile's smaller side; tiles start at multiples of the output stride) whose outputs are stitched
    before one post-processing (:mod:`.tiling`); TTA applies to each tile. ``low_memory`` (with ``tile``):
    :meth:`predict` and :meth:`predict_batch` post-process the stitched maps band by band and never hold them whole
    (:mod:`.banded`); the network runs twice per tile. ``tile_context_passes``: backbone passes over the tiles
    that gather the whole image's averages for layers that average their input (:meth:`_image_averages`); a second
    pass costs one more backbone run per tile and brings the tiled result closer to the whole image's.
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: Config | tuple[ModelConfig, PostProcessConfig],
        meta: DatasetMeta,
        device: str | torch.device = "auto",
        tta_flip: bool = False,
        tta_scales: Sequence[float] = (1.0,),
        batch_size: int = 1,
        precision: str = "fp32",
        tile: Sequence[int] | None = None,
        tile_overlap: int | None = None,
        low_memory: bool = False,
        tile_context_passes: int = 1,
    ) -> None:
        if isinstance(cfg, Config):
            model_cfg, post_cfg = cfg.model, cfg.postprocess
        else:
            model_cfg, post_cfg = cfg
        if model_cfg.num_classes != meta.num_classes:
            raise ValueError(
                f"the model predicts {model_cfg.num_classes} classes but the metadata lists "
                f"{meta.num_classes} categories"
            )
        scales = tuple(float(s) for s in tta_scales)
        if not scales or any(not np.isfinite(s) or s <= 0 for s in scales):
            raise ValueError(f"tta_scales must be positive numbers, got {list(tta_scales)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if precision != "fp32" and not any(isinstance(p, Tensor) for p in model.parameters()):
            raise ValueError(f"precision {precision} needs a PyTorch model; this network has no "
                             "PyTorch weights (an exported graph runs at the precision it was exported with)")
        if not 0 < post_cfg.top_k < meta.label_divisor:
            raise ValueError(f"top_k must be at least 1 and below the label divisor {meta.label_divisor} (instance "
                             f"numbers must fit under it), got {post_cfg.top_k}")
        self.precision = precision
        self.tile: tuple[int, int] | None = None
        self.tile_overlap = 0
        if tile is not None:
            self.tile_overlap = min(int(t) for t in tile) // 4 if tile_overlap is None else int(tile_overlap)
            self.tile = check_tiling(tile, self.tile_overlap, model_cfg.output_stride)
        if low_memory and tile is None:
            raise ValueError("low_memory post-processes tiled predictions in bands: it needs a tile size")
        self.low_memory = bool(low_memory)
        if not isinstance(tile_context_passes, int) or tile_context_passes < 1:
            raise ValueError(f"tile_context_passes must be a whole number of at least 1, got {tile_context_passes!r}")
        self.tile_context_passes = tile_context_passes
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.model_cfg = model_cfg
        self.postprocess_cfg = post_cfg
        self.meta = meta
        self.tta_flip = bool(tta_flip)
        self.tta_scales = scales
        self.batch_size = int(batch_size)
        # Padding value: the model's own mean pixel, so padded pixels are 0 after normalisation.
        mean = getattr(model, "pixel_mean", None)
        self._pad_fill = (
            [float(v) for v in mean.reshape(-1).tolist()] if isinstance(mean, Tensor) else list(IMAGENET_MEAN)
        )
        if precision == "bf16" and any(isinstance(m, nn.BatchNorm2d) for m in self.model.modules()):
            self.model = self._folded(self.model)

    def _folded(self, model: nn.Module) -> nn.Module:
        """A copy of ``model`` with its batch norms folded into the convolutions (:mod:`..modeling.fusion`):
        bf16 is approximate anyway, and the folded network skips a pass over every map (0.17 s of 1.5 s for
        MobileNetV3-L at 1024x2048 on 2 CPU cores)."""
        from panoptic_deeplab.modeling.fusion import FoldingError, fold_batch_norms

        cfg = self.model_cfg
        size = valid_input_size(64, 64, cfg.output_stride, cfg.align_corners, cfg.size_divisibility)
        example = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0)).to(self.device)
        try:
            folded, _ = fold_batch_norms(model, example.contiguous(memory_format=_memory_format(model)))
        except FoldingError as error:  # a network this rewrite does not understand still runs, unfolded
            warnings.warn(f"bf16: batch norms left unfolded: {error}", stacklevel=3)
            return model
        return folded

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        device: str | torch.device = "auto",
        meta: DatasetMeta | None = None,
        postprocess: PostProcessConfig | None = None,
        **kwargs: Any,
    ) -> "Predictor":
        """Build the model of a training checkpoint (its ``config``) and load its weights.

        The checkpoint must hold ``model`` (state dict), ``config`` (plain dict) and ``meta`` (the
        dataset's categories as a list of COCO category dicts) unless ``meta`` is given here.
        ``postprocess`` overrides the checkpoint's post-processing settings; ``kwargs`` go to ``__init__``.
        """
        from panoptic_deeplab.checkpoint import load_checkpoint

        checkpoint = load_checkpoint(path, map_location="cpu")
        return cls.from_checkpoint_state(checkpoint, str(path), device=device, meta=meta, postprocess=postprocess,
                                         **kwargs)

    @classmethod
    def from_checkpoint_state(
        cls,
        checkpoint: dict[str, Any],
        source: str,
        cfg: Config | None = None,
        device: str | torch.device = "auto",
        meta: DatasetMeta | None = None,
        postprocess: PostProcessConfig | None = None,
        **kwargs: Any,
    ) -> "Predictor":
        """:meth:`from_checkpoint` for a checkpoint already loaded; ``source`` names it in errors.

        ``cfg`` replaces the config saved in the checkpoint (e.g. ``model.output_stride=8`` at inference,
        other post-processing thresholds), as long as the weights fit its model.
        """
        from panoptic_deeplab.checkpoint import check_finite
        from panoptic_deeplab.config import config_from_dict
        from panoptic_deeplab.modeling import build_model

        if cfg is None:
            if not isinstance(checkpoint.get("config"), dict):
                raise ValueError(f"checkpoint {source} has no 'config' entry: cannot tell which model to build")
            cfg = config_from_dict(checkpoint["config"], source=f"config of checkpoint {source}")
        if meta is None:
            if "meta" not in checkpoint:
                raise ValueError(
                    f"checkpoint {source} has no 'meta' entry (the dataset's categories); pass meta= explicitly"
                )
            meta = DatasetMeta.from_json(checkpoint["meta"])
        # The weights come from the checkpoint: never fetch or read ImageNet backbone weights.
        model_cfg = dataclasses.replace(cfg.model, pretrained=False, backbone_weights=None)
        if model_cfg.num_classes != meta.num_classes:
            raise ValueError(
                f"checkpoint {source}: model.num_classes is {model_cfg.num_classes} but the dataset has "
                f"{meta.num_classes} categories"
            )
        check_finite(checkpoint["model"], f"checkpoint {source}")
        model = build_model(model_cfg)
        try:
            model.load_state_dict(checkpoint["model"])
        except RuntimeError as exc:
            raise ValueError(f"checkpoint {source}: the weights do not fit the model of its config: {exc}") from None
        # The predictor owns this model: channels_last runs 1.5-1.6x faster on CPU (benchmarks/bench_model.py).
        model = model.to(memory_format=torch.channels_last)
        post_cfg = postprocess if postprocess is not None else cfg.postprocess
        return cls(model, (model_cfg, post_cfg), meta, device=device, **kwargs)

    # ------------------------------------------------------------------ model runs

    @contextmanager
    def _arithmetic(self) -> Iterator[None]:
        """The network's arithmetic for ``self.precision``."""
        with cuda_tf32(self.precision == "tf32"), torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"
        ):
            yield

    def _pad_batch(self, images: Sequence[Tensor]) -> Tensor:
        """Images padded at the bottom/right to one valid size (at least ``inference_size``), stacked."""
        height = max(int(im.shape[1]) for im in images)
        width = max(int(im.shape[2]) for im in images)
        cfg = self.model_cfg
        size = valid_input_size(height, width, cfg.output_stride, cfg.align_corners, cfg.size_divisibility)
        if cfg.inference_size is not None:
            size = (max(size[0], int(cfg.inference_size[0])), max(size[1], int(cfg.inference_size[1])))
        batch = torch.stack([pad_to_size(im, size, self._pad_fill) for im in images])
        return batch.contiguous(memory_format=_memory_format(self.model))

    def _forward_padded(self, images: Sequence[Tensor], image_means: list[Tensor] | None = None
                        ) -> list[dict[str, Tensor]]:
        """Run the model once on :meth:`_pad_batch` of the images (with the whole image's averages ``image_means``
        when given: :meth:`_image_averages`); outputs cropped back to each image."""
        batch = self._pad_batch(images)
        averages = self.model.image_averages(image_means) if image_means is not None else nullcontext()
        with self._arithmetic(), averages:
            outputs = self.model(batch)
        # Offsets are in input pixels and padding is at the bottom/right: cropping needs no rescale.
        keys = ("semantic", "center", "offset")
        return [
            {k: outputs[k][i : i + 1, :, : im.shape[1], : im.shape[2]].float() for k in keys}
            for i, im in enumerate(images)
        ]

    def _scaled(self, image: Tensor, scale: float) -> Tensor:
        fitted = self.model_cfg.inference_size is not None
        if scale == 1.0 and not fitted:
            return image
        height, width = int(image.shape[1]), int(image.shape[2])
        if fitted:
            height, width = fit_to_range(height, width, self.model_cfg.inference_size)  # type: ignore[arg-type]
        height = max(1, int(round(height * scale)))
        width = max(1, int(round(width * scale)))
        if (height, width) == tuple(image.shape[1:]):
            return image
        return F.interpolate(
            image[None], size=(height, width), mode="bilinear", align_corners=self.model_cfg.align_corners
        )[0].clamp_(0.0, 1.0)

    @torch.inference_mode()
    def raw_outputs(self, images: Sequence[Tensor]) -> list[dict[str, Tensor]]:
        """Model outputs for ``[3, H, W]`` images in [0, 1], averaged over the TTA views, each at its
        image's size: ``semantic`` [1, C, H, W] (logits for one view, log mean probabilities for more or for
        tiles), ``center`` [1, 1, H, W], ``offset`` [1, 2, H, W] in pixels of the image."""
        self.model.eval()
        images = [im.to(self.device, torch.float32) for im in images]
        if not any(self._is_tiled(im) for im in images):
            return self._views(images)
        return [stitch_tiles(image, self.tile, self.tile_overlap, self._tile_runner(image),  # type: ignore[arg-type]
                             align=self.model_cfg.output_stride) for image in images]

    def _is_tiled(self, image: Tensor) -> bool:
        return self.tile is not None and (image.shape[1] > self.tile[0] or image.shape[2] > self.tile[1])

    def _tile_runner(self, image: Tensor) -> Callable[[Tensor], dict[str, Tensor]]:
        """The tiles' :meth:`raw_outputs` (tile crop -> maps), with the image's averages."""
        averages = self._image_averages(image)
        return lambda crop: self._views([crop], averages)[0]

    def _view_list(self) -> list[tuple[float, bool]]:
        """TTA views: (scale, flip) pairs."""
        return [(s, f) for s in self.tta_scales for f in ((False, True) if self.tta_flip else (False,))]

    def _image_averages(self, image: Tensor) -> list[list[Tensor]] | None:
        """For a tiled image and a network that averages over its whole input (image pooling, squeeze-excite): per
        TTA view, the averages over the whole image of the maps it averages (``global_average_inputs``); None for
        networks without such averages and for exported graphs. ``tile_context_passes`` backbone passes over the
        tiles: in the first, each squeeze-excite block sees the tile's own averages upstream, so the whole image's
        are nearly, not exactly, reproduced; each further pass runs with the previous pass's averages."""
        if not getattr(self.model, "pools_globally", False):  # an exported graph averages as it was exported
            return None
        averages = None
        for _ in range(self.tile_context_passes):
            averages = self._gather_averages(image, averages)
        return averages

    def _gather_averages(self, image: Tensor, previous: list[list[Tensor]] | None) -> list[list[Tensor]]:
        """One pass of :meth:`_image_averages`: the tiles' maps averaged, each pixel weighted once by its
        :func:`.tiling.tile_shares`, the network running with the ``previous`` pass's averages when given."""
        assert self.tile is not None
        views = self._view_list()
        sums: list[list[Tensor]] = [[] for _ in views]
        weights: list[list[float]] = [[] for _ in views]
        tiles = tile_shares(*image.shape[1:], self.tile, self.tile_overlap, align=self.model_cfg.output_stride)
        for (top, left, bottom, right), share in tiles:
            crop = image[:, top:bottom, left:right]
            for v, (scale, flip) in enumerate(views):
                view = self._scaled(crop, scale)
                view_share = F.interpolate(share[None, None].to(self.device), size=view.shape[1:], mode="bilinear",
                                           align_corners=False)
                if flip:
                    view, view_share = view.flip(-1), view_share.flip(-1)
                batch = self._pad_batch([view])
                upstream = nullcontext() if previous is None else self.model.image_averages(previous[v])
                with self._arithmetic(), upstream:
                    maps = self.model.global_average_inputs(batch)
                # The share of each feature cell: the shares of the input pixels it covers (padding has none).
                padding = (0, batch.shape[-1] - view.shape[-1], 0, batch.shape[-2] - view.shape[-2])
                padded_share = F.pad(view_share, padding)
                cell_shares = [F.adaptive_avg_pool2d(padded_share, m.shape[-2:]) for m in maps]
                totals = [(m.float() * c).sum(dim=(2, 3), keepdim=True) for m, c in zip(maps, cell_shares)]
                cell_weights = [float(c.sum()) for c in cell_shares]
                sums[v] = [a + b for a, b in zip(sums[v], totals)] if sums[v] else totals
                weights[v] = [a + b for a, b in zip(weights[v], cell_weights)] if weights[v] else cell_weights
        return [[total / weight for total, weight in zip(view_sums, view_weights)]
                for view_sums, view_weights in zip(sums, weights)]

    def _views(self, images: list[Tensor], image_means: list[list[Tensor]] | None = None) -> list[dict[str, Tensor]]:
        """:meth:`raw_outputs` of whole images (on the device); ``image_means`` per view: see
        :meth:`_image_averages`."""
        views = self._view_list()
        single = views == [(1.0, False)]
        sums: list[dict[str, Tensor]] = []
        for v, (scale, flip) in enumerate(views):
            inputs = [self._scaled(im, scale) for im in images]
            if flip:
                inputs = [im.flip(-1) for im in inputs]
            outputs = self._forward_padded(inputs, None if image_means is None else image_means[v])
            for i, out in enumerate(outputs):
                if flip:
                    out = flip_outputs(out)
                out = resize_outputs(out, images[i].shape[1:], self.model_cfg.align_corners)
                if single:
                    sums.append(out)
                    continue
                out = {**out, "semantic": out["semantic"].softmax(dim=1)}
                if len(sums) <= i:
                    sums.append(out)
                else:
                    sums[i] = {k: sums[i][k] + out[k] for k in out}
        if single:
            return sums
        n = float(len(views))
        return [
            {
                "semantic": (s["semantic"] / n).clamp_min_(1e-12).log_(),
                "center": s["center"] / n,
                "offset": s["offset"] / n,
            }
            for s in sums
        ]

    # ------------------------------------------------------------------ public API

    def predict(self, image: ImageInput) -> PanopticResult:
        """Panoptic prediction for one image (path, PIL image, uint8 HxWx3 array, or [3, H, W] tensor)."""
        return self.predict_batch([image])[0]

    def predict_batch(self, images: Sequence[ImageInput]) -> list[PanopticResult]:
        """Predictions for several images of any sizes, run ``batch_size`` at a time."""
        tensors = [image_to_tensor(im) for im in images]
        results: list[PanopticResult] = []
        if self.low_memory and any(self._is_tiled(t) for t in tensors):
            return [self._predict_in_bands(t) if self._is_tiled(t) else self.predict_batch([t])[0] for t in tensors]
        for start in range(0, len(tensors), self.batch_size):
            chunk = tensors[start : start + self.batch_size]
            for out in self.raw_outputs(chunk):
                prediction = self._postprocess(out)
                results.append(result_from_prediction(prediction, out["center"][0], out["offset"][0], self.meta))
        return results

    def predict_sequence(
        self, frames: Iterable[ImageInput], min_iou: float = 0.2, memory: int = 10
    ) -> Iterator[PanopticResult]:
        """Predictions for the frames of one video, in order and one at a time (memory does not grow with the
        length), each thing instance renumbered by an :class:`~.tracking.InstanceTracker` (``min_iou``,
        ``memory``) so that an object keeps its label over the sequence; the COCO segment ids
        (``category_id * label_divisor + instance``) stay the same across frames too."""
        tracker = InstanceTracker(self.meta.label_divisor, self.meta.thing_train_ids, min_iou, memory)
        for frame in frames:
            out = self.raw_outputs([image_to_tensor(frame)])[0]
            prediction = tracker.relabel(self._postprocess(out))
            yield result_from_prediction(prediction, out["center"][0], out["offset"][0], self.meta, stable_ids=True)

    @torch.inference_mode()
    def _predict_in_bands(self, image: Tensor) -> PanopticResult:
        """A tiled image post-processed band by band (``low_memory``, :mod:`.banded`)."""
        self.model.eval()
        image = image.to(self.device, torch.float32)
        assert self.tile is not None
        run = self._tile_runner(image)
        prediction, center, offset = postprocess_bands(
            lambda: stitch_bands(image, self.tile, self.tile_overlap, run,  # type: ignore[arg-type]
                                 align=self.model_cfg.output_stride),
            image.shape[1:],
            self.meta.thing_train_ids,
            self.postprocess_cfg,
            label_divisor=self.meta.label_divisor,
            void_label=self.meta.void_label,
            void_channel=self.model_cfg.semantic_void_channel,
        )
        self._warn_if_centers_dropped(prediction)
        return result_from_prediction(prediction, center, offset, self.meta)

    @torch.inference_mode()
    def _postprocess(self, out: dict[str, Tensor]) -> PanopticPrediction:
        prediction = panoptic_postprocess(
            out["semantic"],
            out["center"],
            out["offset"],
            self.meta.thing_train_ids,
            self.postprocess_cfg,
            label_divisor=self.meta.label_divisor,
            void_label=self.meta.void_label,
            void_channel=self.model_cfg.semantic_void_channel,
        )[0]
        self._warn_if_centers_dropped(prediction)
        return prediction

    def _warn_if_centers_dropped(self, prediction: PanopticPrediction) -> None:
        warn_if_centers_dropped(prediction, self.postprocess_cfg.top_k,
                                f"raise top_k (predict --top-k, at most {self.meta.label_divisor - 1})")


Key = TypeVar("Key")


def predict_keyed_sequence(
    predictor: Predictor, frames: Iterable[tuple[Key, np.ndarray]]
) -> Iterator[tuple[Key, np.ndarray, PanopticResult]]:
    """:meth:`Predictor.predict_sequence` over ``(key, frame)`` pairs (a file path, a frame name), each result
    yielded with its key and frame; frames are still taken one at a time."""
    current: list[tuple[Key, np.ndarray]] = []  # the pair whose frame is being predicted

    def images() -> Iterator[np.ndarray]:
        for key, frame in frames:
            current.append((key, frame))
            yield frame

    for result in predictor.predict_sequence(images()):
        key, frame = current.pop()
        yield key, frame, result


def predict_folder(
    predictor: Predictor,
    images: Iterable[Path],
    json_path: str | os.PathLike,
    png_dir: str | os.PathLike,
    on_unreadable: Callable[[Path, DatasetError], None] | None = None,
    sequence: bool = False,
) -> Iterator[tuple[Path, np.ndarray, PanopticResult]]:
    """Predict ``images`` one batch at a time, writing them as one COCO panoptic prediction set.

    A generator: yields ``(path, RGB image, result)`` as each image is done (for pictures, progress bars); the
    JSON and PNG folder are committed when it is exhausted and discarded if it fails or is closed early.
    A missing or unreadable image raises :class:`DatasetError`, unless ``on_unreadable`` is given: then it is
    called with the path and the error and the image is left out (when no image is left, nothing is committed
    and DatasetError is raised). ``sequence``: the images are the frames of one video, in order, predicted by
    :meth:`Predictor.predict_sequence` (instances keep their labels and segment ids across frames).
    """
    paths = list(images)

    def readable(chunk: Sequence[Path]) -> Iterator[tuple[Path, np.ndarray]]:
        for path in chunk:
            try:
                image = load_image(path)
            except DatasetError as exc:
                if on_unreadable is None:
                    raise
                on_unreadable(path, exc)
                continue
            yield path, image

    with PanopticPredictionWriter(json_path, png_dir, predictor.meta) as writer:
        predicted = 0
        if sequence:
            for path, image, result in predict_keyed_sequence(predictor, readable(paths)):
                writer.add(result, path.name)
                predicted += 1
                yield path, image, result
        else:
            for start in range(0, len(paths), predictor.batch_size):
                loaded = list(readable(paths[start : start + predictor.batch_size]))
                for (path, image), result in zip(loaded, predictor.predict_batch([image for _, image in loaded])):
                    writer.add(result, path.name)
                    predicted += 1
                    yield path, image, result
        if paths and not predicted:
            raise DatasetError(f"none of the {len(paths)} image(s) could be read")

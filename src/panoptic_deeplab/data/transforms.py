"""Joint image / label-map transforms for training and evaluation (SPEC §4.2).

Images are ``uint8`` or float tensors ``[3, H, W]``; label maps are integer tensors ``[H, W]`` in the
``train_id * 1000 + instance`` representation (values up to ``VOID_LABEL = 255000``). Both are wrapped in
``torchvision`` tv_tensors (``Image`` / ``Mask``) and transformed with the same
``transforms.v2.functional`` ops and parameters: the image is resized bilinearly, the label with nearest
neighbour, so label ids are copied, never interpolated, and int64 masks keep their exact values.

The random parameters of the training transform are drawn from an explicit ``torch.Generator``. The
dataset seeds it per sample from ``(seed, epoch, index)`` (see ``data/dataset.py``), which makes the
augmentation independent of the number of DataLoader workers and lets a resumed run reproduce it
without replaying any RNG.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from panoptic_deeplab.data.coco_panoptic import VOID_LABEL

# ImageNet mean of RGB in [0, 1]: the model normalises with it, so padding with it becomes 0 there.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)


def valid_input_size(
    height: int, width: int, output_stride: int = 32, align_corners: bool = True, size_divisibility: int = 0
) -> tuple[int, int]:
    """Smallest network input size ``>= (height, width)`` the model resamples exactly.

    With ``align_corners=True`` (the paper / TF lineage) sizes are ``k * output_stride + 1``
    (1025x2049, 641x641), so that every feature map's corners align with the input's; otherwise
    they are ``k * output_stride`` (SPEC §1.7). ``k >= 1``. ``size_divisibility > 0`` then rounds each
    side up to a multiple of it (D2's ``SIZE_DIVISIBILITY``: its COCO model sees 640x640 inputs).
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if output_stride <= 0:
        raise ValueError(f"output_stride must be positive, got {output_stride}")
    if size_divisibility < 0:
        raise ValueError(f"size_divisibility must be >= 0, got {size_divisibility}")

    def one(size: int) -> int:
        if align_corners:
            size = max(1, math.ceil((size - 1) / output_stride)) * output_stride + 1
        else:
            size = max(1, math.ceil(size / output_stride)) * output_stride
        if size_divisibility:
            size = math.ceil(size / size_divisibility) * size_divisibility
        return size

    return one(height), one(width)


def pad_to_size(
    image: torch.Tensor, size: Sequence[int], fill: float | Sequence[float] = 0
) -> torch.Tensor:
    """Pad ``image [..., H, W]`` at the bottom and right to ``size = (H', W')`` with ``fill``.

    ``fill`` is a scalar or one value per channel (``image`` then being ``[..., C, H, W]``). The
    original content stays at the top-left, so ``out[..., :H, :W]`` crops it back.
    """
    if image.dim() < 2:
        raise ValueError(f"expected a tensor [..., H, W], got shape {tuple(image.shape)}")
    height, width = image.shape[-2:]
    out_h, out_w = int(size[0]), int(size[1])
    if out_h < height or out_w < width:
        raise ValueError(f"cannot pad a {height}x{width} image to the smaller size {out_h}x{out_w}")
    if (out_h, out_w) == (height, width):
        return image
    out = image.new_empty(*image.shape[:-2], out_h, out_w)
    if isinstance(fill, (int, float)):
        out.fill_(fill)
    else:
        values = torch.as_tensor(list(fill), dtype=image.dtype, device=image.device)
        if image.dim() < 3 or image.shape[-3] != values.numel():
            raise ValueError(
                f"{values.numel()} fill values for an image of shape {tuple(image.shape)}: "
                "expected one per channel"
            )
        out.copy_(values.view(-1, 1, 1).expand_as(out))
    out[..., :height, :width] = image
    return out


def scale_choices(min_scale: float, max_scale: float, step: float) -> list[float]:
    """The discrete scales ``min, min + step, ..., max`` (SPEC §4.2: 0.5..2.0 step 0.1)."""
    if min_scale <= 0 or max_scale < min_scale:
        raise ValueError(f"need 0 < min_scale <= max_scale, got {min_scale} and {max_scale}")
    if step <= 0:
        if min_scale != max_scale:
            raise ValueError(f"scale_step must be positive when min_scale != max_scale, got {step}")
        return [min_scale]
    count = int(math.floor((max_scale - min_scale) / step + 1e-6)) + 1
    # Rounding avoids 0.30000000000000004-style scales (and their off-by-one pixel sizes).
    return [round(min_scale + i * step, 6) for i in range(count)]


def _fill_uint8_or_float(image: torch.Tensor, mean: Sequence[float]) -> list[float]:
    """Per-channel fill for ``image``: ``int(mean * 255)`` for uint8 images (SPEC §4.2), else ``mean``."""
    if image.dtype == torch.uint8:
        return [float(int(m * 255)) for m in mean]
    return [float(m) for m in mean]


@dataclass
class TrainTransform:
    """Random scale, random crop with random padding, horizontal flip (SPEC §4.2).

    1. scale both image and label by a factor drawn uniformly from ``scale_choices(...)``;
    2. crop ``crop_size`` at a uniformly random position; along an axis where the scaled image is
       smaller than the crop, the image is instead placed at a uniformly random offset inside the crop
       and the rest is padded (image: the mean pixel, label: ``VOID_LABEL``) -- the paper's random
       padding, which helps the instance branch;
    3. flip horizontally with probability ``flip_prob``.
    """

    crop_size: tuple[int, int]
    min_scale: float = 0.5
    max_scale: float = 2.0
    scale_step: float = 0.1
    flip_prob: float = 0.5
    mean: tuple[float, float, float] = IMAGENET_MEAN
    void_label: int = VOID_LABEL

    def __post_init__(self) -> None:
        if len(self.crop_size) != 2 or min(self.crop_size) <= 0:
            raise ValueError(f"crop_size must be two positive ints (H, W), got {self.crop_size!r}")
        self.crop_size = (int(self.crop_size[0]), int(self.crop_size[1]))
        self.scales = scale_choices(self.min_scale, self.max_scale, self.scale_step)

    def __call__(
        self, image: torch.Tensor, label: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``image [3, H, W]`` (uint8 or float), ``label [H, W]`` int -> the augmented crop of both."""
        _check_pair(image, label)
        img = tv_tensors.Image(image)
        lab = tv_tensors.Mask(label)

        def randint(high: int) -> int:  # uniform in [0, high]
            return int(torch.randint(high + 1, (1,), generator=generator))

        scale = self.scales[randint(len(self.scales) - 1)]
        height, width = image.shape[-2:]
        new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
        if (new_h, new_w) != (height, width):
            img = F.resize(img, [new_h, new_w], interpolation=InterpolationMode.BILINEAR, antialias=True)
            # NEAREST_EXACT copies the input pixel nearest to the point the bilinear image resize
            # samples (half-pixel centres); plain NEAREST (floor) would shift labels by up to a pixel.
            lab = F.resize(lab, [new_h, new_w], interpolation=InterpolationMode.NEAREST_EXACT)

        crop_h, crop_w = self.crop_size
        # Per axis: a crop offset into the image when it is larger, a pad offset when it is smaller.
        top = randint(max(new_h - crop_h, 0))
        left = randint(max(new_w - crop_w, 0))
        pad_top = randint(max(crop_h - new_h, 0))
        pad_left = randint(max(crop_w - new_w, 0))
        img = F.crop(img, top, left, min(crop_h, new_h), min(crop_w, new_w))
        lab = F.crop(lab, top, left, min(crop_h, new_h), min(crop_w, new_w))
        if new_h < crop_h or new_w < crop_w:
            padding = [
                pad_left,
                pad_top,
                max(crop_w - new_w, 0) - pad_left,
                max(crop_h - new_h, 0) - pad_top,
            ]
            img = F.pad(img, padding, fill=_fill_uint8_or_float(image, self.mean))
            lab = F.pad(lab, padding, fill=self.void_label)

        if self.flip_prob > 0 and float(torch.rand((1,), generator=generator)) < self.flip_prob:
            img = F.horizontal_flip(img)
            lab = F.horizontal_flip(lab)
        return img.as_subclass(torch.Tensor), lab.as_subclass(torch.Tensor)


@dataclass
class EvalTransform:
    """No augmentation; pad bottom/right to ``valid_input_size`` (image: mean pixel, label: void).

    ``orig_size`` (returned by the dataset) says how to crop predictions back: ``pred[..., :h, :w]``.
    """

    output_stride: int = 32
    align_corners: bool = True
    mean: tuple[float, float, float] = IMAGENET_MEAN
    void_label: int = VOID_LABEL

    def __call__(
        self, image: torch.Tensor, label: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``generator`` is accepted for interface parity with ``TrainTransform`` and unused."""
        _check_pair(image, label)
        size = valid_input_size(*image.shape[-2:], self.output_stride, self.align_corners)
        return (
            pad_to_size(image, size, _fill_uint8_or_float(image, self.mean)),
            pad_to_size(label, size, self.void_label),
        )


def _check_pair(image: torch.Tensor, label: torch.Tensor) -> None:
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an image [3, H, W], got shape {tuple(image.shape)}")
    if label.dim() != 2 or label.shape != image.shape[-2:]:
        raise ValueError(
            f"label map shape {tuple(label.shape)} does not match the image's {tuple(image.shape[-2:])}"
        )
    if label.is_floating_point():
        raise ValueError(f"label map must be an integer tensor, got {label.dtype}")

"""Atrous Spatial Pyramid Pooling, one per branch (SPEC §1.3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ConvBNReLU, DepthwiseSeparableConv, resize

# SPEC §1.3: rates scale inversely with the output stride (DL2 FAQ: os8 -> 12, 24, 36).
DEFAULT_ASPP_RATES: dict[int, tuple[int, int, int]] = {8: (12, 24, 36), 16: (6, 12, 18), 32: (3, 6, 9)}


def default_aspp_rates(output_stride: int) -> tuple[int, int, int]:
    """The paper's atrous rates for an output stride of 8, 16 or 32."""
    if output_stride not in DEFAULT_ASPP_RATES:
        raise ValueError(f"no default ASPP rates for output stride {output_stride}; give aspp_rates")
    return DEFAULT_ASPP_RATES[output_stride]


POOL_CONV_KINDS = ("bn", "bias", "plain")


class ASPPPooling(nn.Module):
    """Image-level branch: average pool -> 1x1 conv -> ReLU -> back to the input's size (SPEC §1.3).

    ``kernel=None`` pools globally at every input size (SPEC §0: DL2 with full-image crops, BC at test).
    ``kernel=(h, w)`` is D2's ``AvgPool2d(train crop / stride, stride 1)``: global on a train-crop-sized
    feature, a sliding window on larger ones, bilinearly resized back (``align_corners`` of the model).
    A feature smaller than the kernel pools globally along that axis (where D2 raises).

    ``conv``: ``"bn"`` 1x1 conv without bias + BN (DL2, the original TF), ``"bias"`` conv with bias and no
    BN (D2), ``"plain"`` conv with neither (BC).

    ``image_mean`` ([1, C, 1, 1], normally None): when set, a global branch uses it instead of its input's
    average, so that tiles of a large image see the whole image's context
    (:meth:`~panoptic_deeplab.modeling.PanopticDeepLab.image_averages`).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        bn_momentum: float,
        bn_eps: float,
        kernel: tuple[int, int] | None = None,
        conv: str = "bn",
        align_corners: bool = True,
    ) -> None:
        super().__init__()
        if conv not in POOL_CONV_KINDS:
            raise ValueError(f"ASPP pooling conv must be one of {POOL_CONV_KINDS}, got {conv!r}")
        if kernel is not None and (len(kernel) != 2 or min(int(k) for k in kernel) < 1):
            raise ValueError(f"ASPP pooling kernel must be two positive sizes (h, w) or None, got {kernel!r}")
        self.kernel = None if kernel is None else (int(kernel[0]), int(kernel[1]))
        self.align_corners = align_corners
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=conv == "bias")
        self.bn = nn.BatchNorm2d(out_channels, momentum=bn_momentum, eps=bn_eps) if conv == "bn" else nn.Identity()
        self.relu = nn.ReLU(inplace=True)
        self.image_mean: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] == 1 and type(self.bn) is nn.BatchNorm2d:
            # One value per channel: batch norm cannot normalise it (and torch refuses).
            raise ValueError(
                "ASPP image pooling uses batch norm over the batch (SPEC §1.3): training needs at least "
                "2 images per batch (per process without SyncBatchNorm); got 1"
            )
        height, width = x.shape[-2:]
        if self.kernel is None and self.image_mean is not None:
            pooled = self.image_mean.to(x.dtype).expand(x.shape[0], -1, -1, -1)
        elif self.kernel is None or (self.kernel[0] >= height and self.kernel[1] >= width):
            pooled = x.mean(dim=(2, 3), keepdim=True)
        else:
            pooled = F.avg_pool2d(x, (min(self.kernel[0], height), min(self.kernel[1], width)), stride=1)
        pooled = self.relu(self.bn(self.conv(pooled)))
        if pooled.shape[-2:] == (1, 1):
            # Bilinear upsampling of a 1x1 map is a constant map for either align_corners.
            return pooled.expand(-1, -1, height, width)
        return resize(pooled, (height, width), self.align_corners)


class ASPP(nn.Module):
    """Five parallel branches (1x1, three atrous 3x3, image pooling) -> concat -> 1x1 projection -> dropout."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int = 256,
        rates: tuple[int, int, int] = (6, 12, 18),
        *,
        dropout: float = 0.1,
        separable: bool = False,
        pool_kernel: tuple[int, int] | None = None,
        pool_conv: str = "bn",
        align_corners: bool = True,
        bn_momentum: float = 0.01,
        bn_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if len(rates) != 3 or any(int(r) < 1 for r in rates):
            raise ValueError(f"ASPP needs three positive atrous rates, got {tuple(rates)}")
        norm = dict(bn_momentum=bn_momentum, bn_eps=bn_eps)
        branches: list[nn.Module] = [ConvBNReLU(in_channels, out_channels, 1, **norm)]
        for rate in rates:
            if separable:  # D2's USE_DEPTHWISE_SEPARABLE_CONV
                branches.append(DepthwiseSeparableConv(in_channels, out_channels, 3, dilation=int(rate), **norm))
            else:
                branches.append(ConvBNReLU(in_channels, out_channels, 3, dilation=int(rate), **norm))
        branches.append(
            ASPPPooling(
                in_channels, out_channels, kernel=pool_kernel, conv=pool_conv, align_corners=align_corners, **norm
            )
        )
        self.branches = nn.ModuleList(branches)
        self.project = ConvBNReLU(out_channels * len(branches), out_channels, 1, **norm)
        self.dropout = nn.Dropout(dropout)
        self.rates = tuple(int(r) for r in rates)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.project(torch.cat([branch(x) for branch in self.branches], dim=1)))

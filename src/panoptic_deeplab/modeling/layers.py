"""Building blocks shared by the ASPP, the decoders and the heads, and resampling helpers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AtrousConv2d(nn.Conv2d):
    """A stride-1 'same'-padded dilated conv that skips the kernel taps that can only read the zero padding.

    Tap ``j`` of a ``k``-tap axis reads the input ``(j - k // 2) * dilation`` away from the output position;
    when that distance is at least the input's length along the axis, every one of its reads is padding and
    its product is zero. At Cityscapes sizes every tap lands (65x129 features, rates <= 18), but on small
    images the outer taps of the large rates do not: on the demo's 9x17 ASPP input, rate 18 is a 1x1 conv and
    rate 12 a 1x3 one, and skipping the rest halves the ASPP's time in training (forward and backward) and
    inference. The result is the full conv's (the same sums without their zero terms); the skipped taps get
    the zero gradient they would get anyway. While exporting, the full kernel is kept so that the graph holds
    for every input size.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        same = tuple(d * (k // 2) for d, k in zip(self.dilation, self.kernel_size))
        if self.stride != (1, 1) or self.padding != same or self.padding_mode != "zeros":
            raise ValueError(f"AtrousConv2d needs stride 1 and zero padding {same}, got stride {self.stride}, "
                             f"padding {self.padding} ({self.padding_mode})")

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if torch.compiler.is_exporting() or torch.jit.is_tracing():
            return super()._conv_forward(x, weight, bias)
        reach = []  # per axis, how many taps on each side of the centre can read the input
        for size, kernel, dilation in zip(x.shape[-2:], self.kernel_size, self.dilation):
            reach.append(min(kernel // 2, (int(size) - 1) // dilation))
        (reach_y, reach_x), (centre_y, centre_x) = reach, (k // 2 for k in self.kernel_size)
        if (reach_y, reach_x) == (centre_y, centre_x):
            return super()._conv_forward(x, weight, bias)
        trimmed = weight[:, :, centre_y - reach_y : centre_y + reach_y + 1, centre_x - reach_x : centre_x + reach_x + 1]
        padding = (reach_y * self.dilation[0], reach_x * self.dilation[1])
        return F.conv2d(x, trimmed, bias, self.stride, padding, self.dilation, self.groups)


class ConvBNReLU(nn.Sequential):
    """``conv (no bias) -> BatchNorm -> ReLU``; 'same' padding for odd kernels at any dilation."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        *,
        dilation: int = 1,
        groups: int = 1,
        bn_momentum: float = 0.1,
        bn_eps: float = 1e-5,
    ) -> None:
        padding = dilation * (kernel_size - 1) // 2
        super().__init__()
        self.conv = (AtrousConv2d if dilation > 1 else nn.Conv2d)(
            in_channels,
            out_channels,
            kernel_size,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=False,
        )
        self.bn = nn.BatchNorm2d(out_channels, momentum=bn_momentum, eps=bn_eps)
        self.relu = nn.ReLU(inplace=True)


class DepthwiseSeparableConv(nn.Module):
    """Depthwise ``k x k`` conv + BN + ReLU, then pointwise 1x1 conv + BN + ReLU (SPEC §1.4)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 5,
        *,
        dilation: int = 1,
        bn_momentum: float = 0.1,
        bn_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        norm = dict(bn_momentum=bn_momentum, bn_eps=bn_eps)
        self.depthwise = ConvBNReLU(
            in_channels, in_channels, kernel_size, dilation=dilation, groups=in_channels, **norm
        )
        self.pointwise = ConvBNReLU(in_channels, out_channels, 1, **norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


def resize(x: torch.Tensor, size: tuple[int, int], align_corners: bool) -> torch.Tensor:
    """Bilinear resize of ``[N, C, h, w]`` to ``size``; returns ``x`` itself when already that size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)


def offset_scale(src: int, dst: int, align_corners: bool) -> float:
    """Factor mapping a displacement in a map of length ``src`` to one of length ``dst`` (SPEC §1.7).

    With ``align_corners=True`` the corner pixels coincide, so pixel spacing scales by
    ``(dst - 1) / (src - 1)`` (DL2); otherwise by ``dst / src`` (D2).
    """
    if align_corners and src > 1:
        return (dst - 1) / (src - 1)
    return dst / src


def resize_offset(offset: torch.Tensor, size: tuple[int, int], align_corners: bool) -> torch.Tensor:
    """Resize an offset map ``[N, 2, h, w]`` (channels ``dy, dx`` in pixels) and rescale its values.

    The values are displacements in pixels of the map they live in, so they grow with the map
    (SPEC §9.2): each axis is multiplied by its own factor from :func:`offset_scale`.
    """
    if offset.dim() != 4 or offset.shape[1] != 2:
        raise ValueError(f"expected an offset map [N, 2, H, W], got shape {tuple(offset.shape)}")
    h, w = offset.shape[-2:]
    if (h, w) == tuple(size):
        return offset
    out = resize(offset, size, align_corners)
    scale = torch.tensor(
        [offset_scale(h, size[0], align_corners), offset_scale(w, size[1], align_corners)],
        dtype=out.dtype,
        device=out.device,
    )
    return out * scale.view(1, 2, 1, 1)

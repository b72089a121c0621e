"""DeepLabV3+-style decoder of one branch: ASPP, then fusion with the low-level taps (SPEC §1.4)."""

from __future__ import annotations

import torch
from torch import nn

from .aspp import ASPP
from .backbone import LAST_KEY, feature_key
from .layers import ConvBNReLU, DepthwiseSeparableConv, resize

FUSION_KINDS = ("dsconv", "d2")


def fusion_conv(in_channels: int, out_channels: int, kind: str, **norm: float) -> nn.Module:
    """One 5x5 depthwise-separable conv (paper, BC, DL2, D2 DSConv), or D2's two 3x3 convs (non-DSConv)."""
    if kind == "dsconv":
        return DepthwiseSeparableConv(in_channels, out_channels, 5, **norm)
    if kind == "d2":
        return nn.Sequential(ConvBNReLU(in_channels, out_channels, 3, **norm),
                             ConvBNReLU(out_channels, out_channels, 3, **norm))
    raise ValueError(f"unknown decoder fusion {kind!r}; expected one of {FUSION_KINDS}")


class PanopticDeepLabDecoder(nn.Module):
    """ASPP on the last feature, then per low-level tap (deepest first, e.g. stride 8 then stride 4):
    1x1 projection + BN + ReLU of the tap, bilinear upsampling of the running feature to the tap's exact
    size, concatenation, and one fusion conv.

    Returns the feature of the last tap (stride 4) with ``decoder_channels`` channels.
    """

    def __init__(
        self,
        in_channels: int,
        low_level_in_channels: tuple[int, ...],
        low_level_channels: tuple[int, ...],
        decoder_channels: int,
        *,
        low_level_strides: tuple[int, ...] = (8, 4),
        aspp_channels: int = 256,
        aspp_rates: tuple[int, int, int] = (6, 12, 18),
        aspp_dropout: float = 0.1,
        aspp_separable: bool = False,
        aspp_pool_kernel: tuple[int, int] | None = None,
        aspp_pool_conv: str = "bn",
        fusion: str = "dsconv",
        concat_low_level_first: bool = False,
        align_corners: bool = True,
        bn_momentum: float = 0.01,
        bn_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if not len(low_level_strides) == len(low_level_in_channels) == len(low_level_channels) >= 1:
            raise ValueError(
                f"the decoder needs one input and one projection width per low-level tap: taps at strides "
                f"{tuple(low_level_strides)}, inputs {tuple(low_level_in_channels)}, projections "
                f"{tuple(low_level_channels)}"
            )
        norm = dict(bn_momentum=bn_momentum, bn_eps=bn_eps)
        self.aspp = ASPP(
            in_channels,
            aspp_channels,
            aspp_rates,
            dropout=aspp_dropout,
            separable=aspp_separable,
            pool_kernel=aspp_pool_kernel,
            pool_conv=aspp_pool_conv,
            align_corners=align_corners,
            **norm,
        )
        self.keys = tuple(feature_key(s) for s in low_level_strides)
        self.project = nn.ModuleList()
        self.fuse = nn.ModuleList()
        running = aspp_channels
        for c_in, c_proj in zip(low_level_in_channels, low_level_channels):
            self.project.append(ConvBNReLU(c_in, c_proj, 1, **norm))
            self.fuse.append(fusion_conv(running + c_proj, decoder_channels, fusion, **norm))
            running = decoder_channels
        self.concat_low_level_first = concat_low_level_first
        self.align_corners = align_corners
        self.out_channels = decoder_channels

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        x = self.aspp(features[LAST_KEY])
        for key, project, fuse in zip(self.keys, self.project, self.fuse):
            low = project(features[key])
            x = resize(x, tuple(low.shape[-2:]), self.align_corners)
            # SPEC §1.4: BC/DL2 concatenate [upsampled, low-level]; D2 the reverse.
            x = torch.cat([low, x] if self.concat_low_level_first else [x, low], dim=1)
            x = fuse(x)
        return x

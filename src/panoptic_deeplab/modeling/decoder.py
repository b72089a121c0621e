"""DeepLabV3+-style decoder of one branch: ASPP, then fusion with the stride-8 and stride-4 taps (SPEC §1.4)."""

from __future__ import annotations

import torch
from torch import nn

from .aspp import ASPP
from .backbone import LAST_KEY, LOW_LEVEL_KEYS
from .layers import ConvBNReLU, DepthwiseSeparableConv, resize


class PanopticDeepLabDecoder(nn.Module):
    """ASPP on the last feature, then per low-level tap (stride 8, then stride 4):
    1x1 projection + BN + ReLU of the tap, bilinear upsampling of the running feature to the tap's exact
    size, concatenation, and one 5x5 depthwise-separable fusion conv.

    Returns the stride-4 feature with ``decoder_channels`` channels.
    """

    def __init__(
        self,
        in_channels: int,
        low_level_in_channels: tuple[int, int],
        low_level_channels: tuple[int, int],
        decoder_channels: int,
        *,
        aspp_channels: int = 256,
        aspp_rates: tuple[int, int, int] = (6, 12, 18),
        aspp_dropout: float = 0.1,
        aspp_separable: bool = False,
        concat_low_level_first: bool = False,
        align_corners: bool = True,
        bn_momentum: float = 0.01,
        bn_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if len(low_level_in_channels) != 2 or len(low_level_channels) != 2:
            raise ValueError("the decoder fuses exactly two low-level taps (stride 8, stride 4)")
        norm = dict(bn_momentum=bn_momentum, bn_eps=bn_eps)
        self.aspp = ASPP(
            in_channels,
            aspp_channels,
            aspp_rates,
            dropout=aspp_dropout,
            separable=aspp_separable,
            **norm,
        )
        self.project = nn.ModuleList()
        self.fuse = nn.ModuleList()
        running = aspp_channels
        for c_in, c_proj in zip(low_level_in_channels, low_level_channels):
            self.project.append(ConvBNReLU(c_in, c_proj, 1, **norm))
            self.fuse.append(DepthwiseSeparableConv(running + c_proj, decoder_channels, 5, **norm))
            running = decoder_channels
        self.concat_low_level_first = concat_low_level_first
        self.align_corners = align_corners
        self.out_channels = decoder_channels

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        x = self.aspp(features[LAST_KEY])
        for key, project, fuse in zip(LOW_LEVEL_KEYS, self.project, self.fuse):
            low = project(features[key])
            x = resize(x, tuple(low.shape[-2:]), self.align_corners)
            # SPEC §1.4: BC/DL2 concatenate [upsampled, low-level]; D2 the reverse.
            x = torch.cat([low, x] if self.concat_low_level_first else [x, low], dim=1)
            x = fuse(x)
        return x

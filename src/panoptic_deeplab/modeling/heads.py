"""Prediction heads: a conv tower then a 1x1 predictor with bias, no output activation (SPEC §1.5)."""

from __future__ import annotations

import torch
from torch import nn

from .layers import ConvBNReLU, DepthwiseSeparableConv

HEAD_KINDS = ("dsconv", "d2")


class PredictionHead(nn.Module):
    """``tower`` (5x5 DSConv to ``head_channels``, or D2's two 3x3 convs) then ``predictor`` (1x1).

    ``kind="d2"`` is detectron2's two-conv tower (its center head always, its semantic and offset heads in
    the non-DSConv models): 3x3 conv ``in -> in`` and 3x3 conv ``in -> head_channels``, each with BN + ReLU.
    Outputs are linear: logits, raw center heatmap, raw offsets.
    """

    def __init__(
        self,
        in_channels: int,
        head_channels: int,
        out_channels: int,
        *,
        kind: str = "dsconv",
        bn_momentum: float = 0.01,
        bn_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        norm = dict(bn_momentum=bn_momentum, bn_eps=bn_eps)
        if kind == "dsconv":
            self.tower: nn.Module = DepthwiseSeparableConv(in_channels, head_channels, 5, **norm)
        elif kind == "d2":
            self.tower = nn.Sequential(
                ConvBNReLU(in_channels, in_channels, 3, **norm),
                ConvBNReLU(in_channels, head_channels, 3, **norm),
            )
        else:
            raise ValueError(f"unknown head kind {kind!r}; expected one of {HEAD_KINDS}")
        self.predictor = nn.Conv2d(head_channels, out_channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.tower(x))

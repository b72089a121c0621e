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

    ``float32_predictor``: under autocast the predictor still runs in float32 (the center and offset heads:
    grouping reads exact peak positions and pixel-scale offsets). On the synthetic val split bf16 everywhere
    cost 3.8 PQ; these two heads entirely in float32 0.04, their predictors only 0.07, 30 ms faster at
    1024x2048 on 2 CPU cores (benchmarks/bench_inference.py).
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
        float32_predictor: bool = False,
    ) -> None:
        super().__init__()
        self.float32_predictor = float32_predictor
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
        features = self.tower(x)
        device = features.device.type
        # not on 'meta', where autocast is unavailable
        if self.float32_predictor and torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
            with torch.autocast(device, enabled=False):
                return self.predictor(features.float())
        return self.predictor(features)

"""MobileNetV3-Small / -Large exactly as deeplab2 builds them (``model/encoder/mobilenet.py``), for its checkpoints.

timm's MobileNetV3 differs from deeplab2's in three ways that change the outputs of a converted model, so the
deeplab2 encoder is written out here (SPEC §1.2, §8.3):

* the squeeze-excite gate is a plain sigmoid: ``InvertedBottleneckBlock`` builds ``SqueezeAndExcite`` without a
  ``gating_activation``, whose default is ``'sigmoid'`` (``model/layers/squeeze_and_excite.py``); timm uses a
  hard sigmoid;
* the decoder taps are the depthwise convs' outputs (after BN and activation, **before** squeeze-excite):
  ``InvertedBottleneckBlock.call`` returns ``depthwise_output`` and ``MobileNet.call`` stores it as the endpoint;
  timm's ``feature_location="expansion"`` taps after squeeze-excite;
* at an output stride below 32, the block whose stride becomes 1 keeps the previous atrous rate and the rate
  doubles for the blocks after it (``MobileNet._mobilenet_base``); residuals follow the spec's stride
  (``use_residual=(block_def['strides'] == 1)``), not the dilated one.

Padding: ``Conv2DSame`` / ``DepthwiseConv2DSame`` pad symmetrically (``_compute_padding_size``: (k - 1) // 2
on both sides for odd kernels), as PyTorch does. Endpoints ``res2`` .. ``res5`` are returned, ``res1``
(stride 2) is never tapped by Panoptic-DeepLab.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from timm.models import FeatureInfo
from torch import nn

__all__ = ["DL2_MOBILENET_SPECS", "DeepLab2MobileNetV3", "make_divisible"]


class BlockSpec(NamedTuple):
    """One row of deeplab2's ``block_specs`` (``block_spec_schema`` order)."""

    kind: str  # "conv_bn" or "inverted_bottleneck"
    kernel: int
    stride: int
    filters: int
    activation: str  # "relu" or "hard_swish"
    se_ratio: float | None
    expand_ratio: float | None
    is_endpoint: bool


def _spec(*rows: tuple) -> tuple[BlockSpec, ...]:
    return tuple(BlockSpec(*row) for row in rows)


# MNV3Small_BLOCK_SPECS and MNV3Large_BLOCK_SPECS of model/encoder/mobilenet.py.
DL2_MOBILENET_SPECS: dict[str, tuple[BlockSpec, ...]] = {
    "small": _spec(
        ("conv_bn", 3, 2, 16, "hard_swish", None, None, True),
        ("inverted_bottleneck", 3, 2, 16, "relu", 0.25, 1, True),
        ("inverted_bottleneck", 3, 2, 24, "relu", None, 72.0 / 16, False),
        ("inverted_bottleneck", 3, 1, 24, "relu", None, 88.0 / 24, True),
        ("inverted_bottleneck", 5, 2, 40, "hard_swish", 0.25, 4.0, False),
        ("inverted_bottleneck", 5, 1, 40, "hard_swish", 0.25, 6.0, False),
        ("inverted_bottleneck", 5, 1, 40, "hard_swish", 0.25, 6.0, False),
        ("inverted_bottleneck", 5, 1, 48, "hard_swish", 0.25, 3.0, False),
        ("inverted_bottleneck", 5, 1, 48, "hard_swish", 0.25, 3.0, True),
        ("inverted_bottleneck", 5, 2, 96, "hard_swish", 0.25, 6.0, False),
        ("inverted_bottleneck", 5, 1, 96, "hard_swish", 0.25, 6.0, False),
        ("inverted_bottleneck", 5, 1, 96, "hard_swish", 0.25, 6.0, False),
        ("conv_bn", 1, 1, 576, "hard_swish", None, None, True),
    ),
    "large": _spec(
        ("conv_bn", 3, 2, 16, "hard_swish", None, None, False),
        ("inverted_bottleneck", 3, 1, 16, "relu", None, 1.0, True),
        ("inverted_bottleneck", 3, 2, 24, "relu", None, 4.0, False),
        ("inverted_bottleneck", 3, 1, 24, "relu", None, 3.0, True),
        ("inverted_bottleneck", 5, 2, 40, "relu", 0.25, 3.0, False),
        ("inverted_bottleneck", 5, 1, 40, "relu", 0.25, 3.0, False),
        ("inverted_bottleneck", 5, 1, 40, "relu", 0.25, 3.0, True),
        ("inverted_bottleneck", 3, 2, 80, "hard_swish", None, 6.0, False),
        ("inverted_bottleneck", 3, 1, 80, "hard_swish", None, 2.5, False),
        ("inverted_bottleneck", 3, 1, 80, "hard_swish", None, 2.3, False),
        ("inverted_bottleneck", 3, 1, 80, "hard_swish", None, 2.3, False),
        ("inverted_bottleneck", 3, 1, 112, "hard_swish", 0.25, 6.0, False),
        ("inverted_bottleneck", 3, 1, 112, "hard_swish", 0.25, 6.0, True),
        ("inverted_bottleneck", 5, 2, 160, "hard_swish", 0.25, 6.0, False),
        ("inverted_bottleneck", 5, 1, 160, "hard_swish", 0.25, 6.0, False),
        ("inverted_bottleneck", 5, 1, 160, "hard_swish", 0.25, 6.0, False),
        ("conv_bn", 1, 1, 960, "hard_swish", None, None, True),
    ),
}


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """``model/utils.py`` ``make_divisible``: round to a multiple of ``divisor``, never more than 10% down."""
    min_value = divisor if min_value is None else min_value
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return int(new_value)


def _activation(name: str) -> nn.Module:
    # activations.hard_swish: x * relu6(x + 3) / 6, torch's Hardswish.
    return {"relu": nn.ReLU(inplace=True), "hard_swish": nn.Hardswish(inplace=True)}[name]


class ConvBNAct(nn.Sequential):
    """``Conv2DSame`` with ``use_bn`` (and an activation unless ``activation`` is None), groups for the depthwise."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, dilation: int = 1, groups: int = 1, *,
                 activation: str | None, bn_eps: float) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, dilation * (kernel // 2), dilation, groups, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=bn_eps)
        if activation is not None:
            self.act = _activation(activation)


class SqueezeExcite(nn.Module):
    """``SqueezeAndExcite``: mean -> 1x1 conv (bias) -> ReLU -> 1x1 conv (bias) -> sigmoid -> scale."""

    def __init__(self, channels: int, se_ratio: float) -> None:
        super().__init__()
        reduced = make_divisible(max(1, int(channels * se_ratio)), 8)
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.expand(torch.relu(self.reduce(x.mean(dim=(2, 3), keepdim=True))))
        return x * torch.sigmoid(gate)


class InvertedBottleneck(nn.Module):
    """``InvertedBottleneckBlock`` (``model/layers/blocks.py``) with MobileNet's arguments; ``forward`` returns the
    block output and the depthwise output (the endpoint)."""

    def __init__(self, cin: int, spec: BlockSpec, stride: int, dilation: int, bn_eps: float) -> None:
        super().__init__()
        expanded = cin
        if spec.expand_ratio is not None and spec.expand_ratio > 1:
            expanded = make_divisible(cin * spec.expand_ratio, 8)
            self.expand = ConvBNAct(cin, expanded, 1, activation=spec.activation, bn_eps=bn_eps)
        self.depthwise = ConvBNAct(expanded, expanded, spec.kernel, stride, dilation, groups=expanded,
                                   activation=spec.activation, bn_eps=bn_eps)
        if spec.se_ratio:
            self.se = SqueezeExcite(expanded, spec.se_ratio)
        self.project = ConvBNAct(expanded, spec.filters, 1, activation=None, bn_eps=bn_eps)
        self.residual = spec.stride == 1 and cin == spec.filters

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.expand(x) if hasattr(self, "expand") else x
        depthwise = self.depthwise(out)
        out = self.se(depthwise) if hasattr(self, "se") else depthwise
        out = self.project(out)
        return (out + x if self.residual else out), depthwise


class DeepLab2MobileNetV3(nn.Module):
    """deeplab2's ``MobileNet`` (width multiplier 1): ``blocks`` in spec order; ``forward`` returns the
    endpoints ``res2``, ``res3``, ``res4``, ``res5`` as a list, described by ``feature_info`` as timm's
    ``features_only`` models are."""

    def __init__(self, variant: str, output_stride: int = 32, bn_eps: float = 1e-3) -> None:
        super().__init__()
        if variant not in DL2_MOBILENET_SPECS:
            raise ValueError(f"unknown deeplab2 MobileNetV3 variant {variant!r}; expected small or large")
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        self.blocks = nn.ModuleList()
        self.endpoints: list[int] = []  # block index of res2 .. res5
        info = []
        current_stride, rate, level, cin = 1, 1, 1, 3
        for i, spec in enumerate(DL2_MOBILENET_SPECS[variant]):
            if current_stride == output_stride:  # MobileNet._mobilenet_base: atrous from here on
                stride, dilation, rate = 1, rate, rate * spec.stride
            else:
                stride, dilation = spec.stride, 1
                current_stride *= spec.stride
            if spec.kind == "conv_bn":
                block: nn.Module = ConvBNAct(cin, spec.filters, spec.kernel, stride, dilation,
                                             activation=spec.activation, bn_eps=bn_eps)
            else:
                dilation = dilation if spec.kernel != 1 else 1
                block = InvertedBottleneck(cin, spec, stride, dilation, bn_eps)
            self.blocks.append(block)
            if spec.is_endpoint:
                if level >= 2:
                    channels = block.depthwise.conv.out_channels if isinstance(block, InvertedBottleneck) \
                        else spec.filters
                    self.endpoints.append(i)
                    info.append(dict(num_chs=channels, reduction=current_stride, module=f"blocks.{i}"))
                level += 1
            cin = spec.filters
        self.feature_info = FeatureInfo(info, out_indices=tuple(range(len(info))))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for i, block in enumerate(self.blocks):
            if isinstance(block, InvertedBottleneck):
                x, depthwise = block(x)
                endpoint = depthwise
            else:
                x = endpoint = block(x)
            if i in self.endpoints:
                features.append(endpoint)
        return features

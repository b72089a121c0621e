"""ResNet-50, ResNet-50-Beta, Wide-ResNet-41 and SWideRNet-SAC exactly as deeplab2 builds them, for its checkpoints.

deeplab2's residual encoders (``model/encoder/axial_resnet.py`` ``AxialResNet`` with the configs of
``model/encoder/axial_resnet_instances.py``: ``ResNet50``, ``ResNet50Beta``, ``SWideRNet`` as ``wide_resnet41`` and
as ``swidernet`` with ``use_sac_beyond_stride: 32``)
differ from timm's and torchvision's ResNets in ways that change the outputs of a converted model (SPEC §1.2, §8.3):

* no max-pool: the stem convolves with stride 2 and the first block of the next stage strides instead
  ("we replace the strided max pooling layer in the stem by applying strided convolution in the immediate next
  residual block"); the stride sits on the block's 3x3 conv;
* stems (``AxialResNet.__init__``): ``resnet`` a 7x7 conv of 64 + BN, ``resnet_beta`` the ``InceptionSTEM`` of
  ``model/layers/stems.py`` (3x3 convs of 64 (stride 2), 64, 128, BN + ReLU after the first two), ``wider_resnet``
  a 3x3 conv of 64 + BN; none ends with an activation;
* each block (``AxialBlock.call``, ``model/layers/axial_blocks.py``) applies ReLU to its input first and returns
  ``convs(x) + shortcut`` without one; the shortcut is a strided 1x1 conv + BN where the width changes, else the
  input itself (subsampled where the block strides). So each stage's output is pre-activation, and the decoder's
  endpoints ``res2`` .. ``res5`` are their ReLUs (``call_encoder_before_stacked_decoder``);
* the atrous rule of ``BlockGroup.__init__`` (``model/layers/axial_block_groups.py``): a stage strides only in its
  first block and only while its input stride is below the output stride; a block's rate is its stage's running
  original stride over the output stride (so the first block of a newly dilated stage keeps the previous rate);
  a basic block's second conv uses the stage's final rate already in the first block;
* ``wider_resnet`` adds a stage of basic blocks at stride 2 (``_stage1``, widths 128) and uses basic blocks (two
  3x3 convs, ``filters * 4`` wide) below input stride 32 and ``[filters, 2 * filters, 4 * filters]`` bottlenecks
  beyond (``filters_list`` in ``BlockGroup``).

* SWideRNet-SAC-(1, 1, l) (``configs/cityscapes/panoptic_deeplab/swidernet_sac_1_1_*_os16.textproto``): the wide
  layout with ``backbone_layer_multiplier`` l (``utils.scale_int_list``: ``int(n * l)`` blocks per stage after
  ``_stage1``) and switchable atrous convolution in the stage at input stride 16 (``use_sac = input stride x
  stride >= 32``), see :class:`SwitchableConvBNAct`.

Padding: ``Conv2DSame`` pads symmetrically by ``rate * (k - 1) / 2`` for odd kernels, as PyTorch does.
Squeeze-and-excite and axial attention (other deeplab2 configs) are not built: no published Panoptic-DeepLab
model uses them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from timm.models import FeatureInfo
from torch import nn

from .dl2_mobilenet import ConvBNAct

__all__ = ["DL2_RESNET_SPECS", "DeepLab2ResNet"]


class ResNetSpec(NamedTuple):
    """An ``axial_resnet_instances`` model with its default multipliers (1.0)."""

    backbone_type: str  # "resnet", "resnet_beta" or "wider_resnet"
    num_blocks: tuple[int, ...]  # per stage, _stage1 (wider_resnet only) .. _stage5
    sac_beyond_stride: int = 0  # use_sac_beyond_stride (0: none)


def _swidernet(layer_multiplier: float) -> ResNetSpec:
    """SWideRNet-SAC-(1, 1, l): AxialResNet's [3] for _stage1, then utils.scale_int_list([3, 6, 3, 3], l)."""
    return ResNetSpec("wider_resnet", (3, *(int(n * layer_multiplier) for n in (3, 6, 3, 3))), sac_beyond_stride=32)


DL2_RESNET_SPECS: dict[str, ResNetSpec] = {
    "resnet50": ResNetSpec("resnet", (3, 4, 6, 3)),
    "resnet50_beta": ResNetSpec("resnet_beta", (3, 4, 6, 3)),
    # SWideRNet's num_blocks [3, 6, 3, 3] after AxialResNet's [3] for _stage1.
    "wide_resnet41": ResNetSpec("wider_resnet", (3, 3, 6, 3, 3)),
    "swidernet_sac_1_1_1": _swidernet(1),
    "swidernet_sac_1_1_3": _swidernet(3),
    "swidernet_sac_1_1_4.5": _swidernet(4.5),
}


class SwitchableConvBNAct(nn.Module):
    """``Conv2DSame`` with ``use_switchable_atrous_conv`` and ``use_global_context_in_sac`` (model/layers/
    convolutions.py), then BN and the activation:

    * ``GlobalContext``: ``x + conv1x1(mean(x))`` (with bias) before and after the convolution;
    * ``SwitchableAtrousConvolution`` (only where the conv strides 1; a strided one stays plain):
      ``s * conv(x, rate 3 * r) + (1 - s) * conv(x, rate r)`` with the same kernel, the switch ``s`` a 1x1 conv
      (with bias, no activation) of a 5x5 average pool ('same' padding, padded pixels not counted).
    """

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, dilation: int = 1, *,
                 activation: str | None, bn_eps: float) -> None:
        super().__init__()
        self.pre_context = nn.Conv2d(cin, cin, 1)
        self.conv = nn.Conv2d(cin, cout, kernel, stride, dilation * (kernel // 2), dilation, bias=False)
        self.switch = nn.Conv2d(cin, 1, 1) if stride == 1 else None
        self.post_context = nn.Conv2d(cout, cout, 1)
        self.bn = nn.BatchNorm2d(cout, eps=bn_eps)
        self.act = nn.ReLU(inplace=True) if activation == "relu" else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pre_context(x.mean(dim=(2, 3), keepdim=True))
        y = self.conv(x)
        if self.switch is not None:
            switch = self.switch(F.avg_pool2d(x, 5, 1, 2, count_include_pad=False))
            rate = 3 * self.conv.dilation[0]
            large = F.conv2d(x, self.conv.weight, None, 1, rate * (self.conv.kernel_size[0] // 2), rate)
            y = switch * large + (1 - switch) * y
        y = y + self.post_context(y.mean(dim=(2, 3), keepdim=True))
        return self.act(self.bn(y))


def _conv_bn(sac: bool, cin: int, cout: int, kernel: int, stride: int = 1, dilation: int = 1, *,
             activation: str | None, bn_eps: float) -> nn.Module:
    kind = SwitchableConvBNAct if sac else ConvBNAct
    return kind(cin, cout, kernel, stride, dilation, activation=activation, bn_eps=bn_eps)


class BottleneckBlock(nn.Module):
    """``AxialBlock`` with three filters and no attention: 1x1, 3x3 (stride, rate), 1x1; pre-activated input."""

    def __init__(self, cin: int, widths: tuple[int, int, int], stride: int, rate: int, bn_eps: float,
                 sac: bool = False) -> None:
        super().__init__()
        self.conv1_bn_act = ConvBNAct(cin, widths[0], 1, activation="relu", bn_eps=bn_eps)
        self.conv2_bn_act = _conv_bn(sac, widths[0], widths[1], 3, stride, rate, activation="relu", bn_eps=bn_eps)
        self.conv3_bn = ConvBNAct(widths[1], widths[2], 1, activation=None, bn_eps=bn_eps)
        self.shortcut = ConvBNAct(cin, widths[2], 1, stride, activation=None, bn_eps=bn_eps) \
            if cin != widths[2] else None
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(x)
        return self.conv3_bn(self.conv2_bn_act(self.conv1_bn_act(x))) + _shortcut(self.shortcut, x, self.stride)


class BasicBlock(nn.Module):
    """``AxialBlock`` with two filters: 3x3 (stride, rate), 3x3 (``second_rate``); pre-activated input."""

    def __init__(self, cin: int, widths: tuple[int, int], stride: int, rate: int, second_rate: int,
                 bn_eps: float, sac: bool = False) -> None:
        super().__init__()
        self.conv1_bn_act = _conv_bn(sac, cin, widths[0], 3, stride, rate, activation="relu", bn_eps=bn_eps)
        self.conv2_bn = _conv_bn(sac, widths[0], widths[1], 3, 1, second_rate, activation=None, bn_eps=bn_eps)
        self.shortcut = ConvBNAct(cin, widths[1], 1, stride, activation=None, bn_eps=bn_eps) \
            if cin != widths[1] else None
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(x)
        return self.conv2_bn(self.conv1_bn_act(x)) + _shortcut(self.shortcut, x, self.stride)


def _shortcut(conv: nn.Module | None, x: torch.Tensor, stride: int) -> torch.Tensor:
    if conv is not None:
        return conv(x)
    return x[:, :, ::stride, ::stride] if stride != 1 else x


class InceptionStem(nn.Module):
    """``stems.InceptionSTEM``: 3x3 convs of 64 (stride 2) and 64 with BN + ReLU, 128 with BN only."""

    def __init__(self, bn_eps: float) -> None:
        super().__init__()
        self.conv1_bn_act = ConvBNAct(3, 64, 3, 2, activation="relu", bn_eps=bn_eps)
        self.conv2_bn_act = ConvBNAct(64, 64, 3, activation="relu", bn_eps=bn_eps)
        self.conv3_bn = ConvBNAct(64, 128, 3, activation=None, bn_eps=bn_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3_bn(self.conv2_bn_act(self.conv1_bn_act(x)))


class DeepLab2ResNet(nn.Module):
    """deeplab2's ``AxialResNet`` in classification mode (width multipliers 1): ``stem`` and ``stages`` (deeplab2's
    ``_stage1`` .. ``_stage5`` from the first it builds); ``forward`` returns the endpoints ``res2`` .. ``res5`` as a
    list, described by ``feature_info`` as timm's ``features_only`` models are."""

    def __init__(self, variant: str, output_stride: int = 32, bn_eps: float = 1e-3) -> None:
        super().__init__()
        if variant not in DL2_RESNET_SPECS:
            raise ValueError(f"unknown deeplab2 ResNet {variant!r}; expected one of {', '.join(DL2_RESNET_SPECS)}")
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        spec = DL2_RESNET_SPECS[variant]
        wider = spec.backbone_type == "wider_resnet"
        if spec.backbone_type == "resnet_beta":
            self.stem: nn.Module = InceptionStem(bn_eps)
            cin = 128
        else:
            self.stem = ConvBNAct(3, 64, 3 if wider else 7, 2, activation=None, bn_eps=bn_eps)
            cin = 64
        # AxialResNet.__init__: total_strides_list, strides_list and filters_list per _stage1 .. _stage5.
        input_strides, strides = [1, 2, 4, 8, 16], [2] * 5
        if wider:
            input_strides[0], strides[0] = 2, 1
        first = 5 - len(spec.num_blocks)
        self.first_stage = first + 1  # deeplab2's number of stages[0]
        self.stages = nn.ModuleList()
        self.endpoint_stages: list[int] = []  # indices into stages of res2 .. res5
        info = []
        for index, num_blocks in zip(range(first, 5), spec.num_blocks):
            filters = 32 << index  # filters_list: 32 * the stage's original input stride (before wider's change)
            stage_stride, input_stride = strides[index], input_strides[index]
            final = input_stride * stage_stride  # the stage's original output stride
            bottleneck = not wider or final >= 32
            sac = final >= spec.sac_beyond_stride > 0  # BlockGroup's use_sac
            widths = (filters, filters, 4 * filters) if not wider else \
                ((filters, 2 * filters, 4 * filters) if bottleneck else (4 * filters, 4 * filters))
            blocks, running = [], input_stride
            for b in range(num_blocks):
                stride = stage_stride if b == 0 and input_stride < output_stride else 1
                rate = running // output_stride if running > output_stride else 1
                if bottleneck:
                    blocks.append(BottleneckBlock(cin, widths, stride, rate, bn_eps, sac))  # type: ignore[arg-type]
                else:
                    second = final // output_stride if b == 0 and final > output_stride else rate
                    blocks.append(BasicBlock(cin, widths, stride, rate, second, bn_eps, sac))  # type: ignore[arg-type]
                if b == 0 and stage_stride > 1:
                    running *= stage_stride
                cin = widths[-1]
            self.stages.append(nn.Sequential(*blocks))
            if index >= 1:  # res2 .. res5
                self.endpoint_stages.append(len(self.stages) - 1)
                info.append(dict(num_chs=cin, reduction=min(final, output_stride),
                                 module=f"stages.{len(self.stages) - 1}"))
        self.feature_info = FeatureInfo(info, out_indices=tuple(range(len(info))))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        features = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.endpoint_stages:
                features.append(torch.relu(x))
        return features

"""Xception-65 as bowenc0221/panoptic-deeplab builds it, for its converted checkpoints, from timm's modules.

bowenc0221's ``segmentation/model/backbone/xception.py`` (``Xception65``, a port of TF DeepLab's) has the layers of
timm's aligned ``xception65`` (the same stem, 21 blocks, symmetric padding, ReLU before each separable conv except
in the last block), but taps other points and keeps PyTorch's batch-norm epsilon (SPEC §1.2, §8.1):

* ``res2`` / ``res3`` are the outputs of the second separable conv of blocks 2 and 3 (``XceptionBlock`` with
  ``low_feat``: ``sc2``), **before** the ReLU that starts the third; timm's features tap after that ReLU;
* ``res4`` is the output of the middle flow (``block19``, 728 channels at stride 16), not the exit block's tap;
* ``res5`` is the output of the last block (2048 channels);
* ``nn.BatchNorm2d`` with its default epsilon 1e-5 (timm's ``xception65`` uses 1e-3).

Only output stride 32 is built: the model zoo's config (``DILATION (False, False, False)``).
"""

from __future__ import annotations

import functools

import timm
import torch
from timm.models import FeatureInfo
from torch import nn

__all__ = ["BCXception65"]

# Block indices (0-based) of the taps: res2 / res3 inside blocks 2 and 3, res4 after block 19, res5 after 21.
LOW_FEATURE_BLOCKS = (1, 2)
MIDDLE_FLOW_END = 18


class BCXception65(nn.Module):
    """``stem`` and ``blocks`` of timm's ``xception65`` (its names); ``forward`` returns ``res2`` .. ``res5`` as a
    list, described by ``feature_info`` as timm's ``features_only`` models are."""

    def __init__(self, output_stride: int = 32, bn_eps: float = 1e-5) -> None:
        super().__init__()
        if output_stride != 32:
            raise ValueError(f"bowenc0221's Xception-65 is built at output stride 32 (its config), not {output_stride}")
        net = timm.create_model("xception65", pretrained=False, num_classes=0,
                                norm_layer=functools.partial(nn.BatchNorm2d, eps=bn_eps))
        self.stem, self.blocks = net.stem, net.blocks
        for index in LOW_FEATURE_BLOCKS:  # the tap is this ReLU's input: it must not be overwritten in place
            self.blocks[index].stack.act3 = nn.ReLU()
        self.feature_info = FeatureInfo(
            [
                dict(num_chs=256, reduction=4, module="blocks.1.stack.conv2"),
                dict(num_chs=728, reduction=8, module="blocks.2.stack.conv2"),
                dict(num_chs=728, reduction=16, module=f"blocks.{MIDDLE_FLOW_END}"),
                dict(num_chs=2048, reduction=32, module="blocks.20"),
            ],
            out_indices=(0, 1, 2, 3),
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        features = []
        for index, block in enumerate(self.blocks):
            if index in LOW_FEATURE_BLOCKS:
                out = x
                for name, layer in block.stack.named_children():
                    if name == "act3":
                        features.append(out)
                    out = layer(out)
                x = out + block.shortcut(x)
            else:
                x = block(x)
            if index in (MIDDLE_FLOW_END, len(self.blocks) - 1):
                features.append(x)
        return features

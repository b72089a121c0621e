"""HRNet-W48 as bowenc0221/panoptic-deeplab builds it, for its converted checkpoints, from timm's modules.

bowenc0221's ``segmentation/model/backbone/hrnet.py`` is HRNet-Semantic-Segmentation's ``HighResolutionNet``: the
layers and names of timm's ``hrnet_w48`` (HRNet-Image-Classification's), and its four stage-4 branches are the
outputs ``res2`` .. ``res5`` (48, 96, 192, 384 channels at strides 4 .. 32; timm's ``feature_location=''``). One
difference changes the numbers (SPEC §1.2, §8.1): ``HighResolutionModule.forward`` upsamples a lower-resolution
branch for the fusion with ``F.interpolate(size=<that branch's size>, mode='bilinear', align_corners=True)``, where
timm's fuse layers end in ``nn.Upsample(scale_factor=2 ** k, mode='nearest')`` (which also needs sizes divisible by
32; bowenc0221 runs 1025x2049 crops). The timm modules are kept and their fusion is done here that way.
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from timm.models.hrnet import HighResolutionModule

__all__ = ["bc_hrnet_w48"]


class _AlignedFusion(HighResolutionModule):
    """timm's module with bowenc0221's fusion: an upsampled branch is conv + BN (the fuse layer without its
    ``nn.Upsample``), then bilinear with aligned corners to the target branch's size."""

    def forward(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.num_branches == 1:
            return [self.branches[0](x[0])]
        x = [branch(t) for branch, t in zip(self.branches, x)]
        fused = []
        for i, layers in enumerate(self.fuse_layers):
            y = None
            for j, layer in enumerate(layers):  # summed in branch order, as both implementations do
                if j > i:
                    term = F.interpolate(layer[:2](x[j]), size=x[i].shape[-2:], mode="bilinear", align_corners=True)
                else:
                    term = layer(x[j])  # identity for j == i, strided convs below
                y = term if y is None else y + term
            fused.append(self.fuse_act(y))
        return fused


def bc_hrnet_w48(output_stride: int = 32, bn_eps: float = 1e-5) -> torch.nn.Module:
    """timm's ``hrnet_w48`` features (the four stage-4 branches) with bowenc0221's fusion."""
    if output_stride != 32:
        raise ValueError(f"bowenc0221's HRNet-W48 ends at stride 32 (its branches never dilate), not {output_stride}")
    net = timm.create_model("hrnet_w48", pretrained=False, features_only=True, feature_location="",
                            out_indices=(1, 2, 3, 4))
    for module in net.modules():
        if type(module) is HighResolutionModule:
            module.__class__ = _AlignedFusion
        elif isinstance(module, torch.nn.BatchNorm2d):
            module.eps = bn_eps
    return net

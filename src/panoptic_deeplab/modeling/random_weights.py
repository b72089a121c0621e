"""Random weights whose outputs have structure, for checks and benchmarks that cannot wait for
training.

A freshly built model starts its decoders and heads with Normal(0, 0.001) convolutions (SPEC §1.6), so its
outputs are about 1e-16: a flat center heatmap, no centers, trivially equal label maps and a grouping that never
runs. He-scaled convolutions with unit-scale batch norms give peaked heatmaps, offsets of a few
pixels and varied semantic argmaxes instead.
"""

from __future__ import annotations

import torch
from torch import nn


def randomize_weights(model: nn.Module, seed: int = 1) -> nn.Module:
    """Overwrite ``model``'s convolutions (He-normal, bias N(0, 0.1)) and batch norms (scale U(0.5, 1.5), bias
    N(0, 0.1)) in place, deterministically from ``seed``; returns ``model``."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * (2.0 / fan_in) ** 0.5)
                if module.bias is not None:
                    module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
            elif isinstance(module, nn.BatchNorm2d):
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=generator))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
    return model

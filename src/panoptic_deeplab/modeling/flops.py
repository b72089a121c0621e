"""Parameters and multiply-adds of the network, split into backbone / semantic / instance branch."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..config import ModelConfig
from .panoptic_deeplab import PanopticDeepLab, build_model

# Which top-level submodules make up each part of the report.
PARTS: dict[str, tuple[str, ...]] = {
    "backbone": ("backbone",),
    "semantic": ("semantic_decoder", "semantic_head"),
    "instance": ("instance_decoder", "center_head", "offset_head"),
}


@dataclass
class PartCost:
    """Parameters and multiply-adds (one multiply-add = 2 FLOPs) of one part of the model."""

    params: int
    macs: int


@dataclass
class ModelInfo:
    """Cost of one model at one input size; ``parts`` has ``backbone``, ``semantic``, ``instance``, ``total``."""

    backbone: str
    num_classes: int
    output_stride: int
    size: tuple[int, int]
    parts: dict[str, PartCost]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def measure_model(model: PanopticDeepLab, size: tuple[int, int], batch_size: int = 1) -> ModelInfo:
    """Count parameters and multiply-adds of ``model`` for one forward pass at ``size`` (H, W).

    Multiply-adds are counted by ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matrix
    products; element-wise ops, pooling and resampling are not counted) and halved from FLOPs. The
    model may live on the ``meta`` device, which makes this instant at any size.
    """
    device = next(model.parameters()).device
    images = torch.zeros(batch_size, 3, size[0], size[1], device=device)
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(images)
    model.train(was_training)
    flops = counter.get_flop_counts()
    root = type(model).__name__
    parts: dict[str, PartCost] = {}
    for part, names in PARTS.items():
        modules: list[nn.Module] = [getattr(model, n) for n in names]
        parts[part] = PartCost(
            params=sum(p.numel() for m in modules for p in m.parameters()),
            macs=sum(sum(flops.get(f"{root}.{n}", {}).values()) for n in names) // 2,
        )
    parts["total"] = PartCost(
        params=sum(p.numel() for p in model.parameters()), macs=counter.get_total_flops() // 2
    )
    return ModelInfo(
        backbone=model.backbone.name,
        num_classes=model.num_classes,
        output_stride=model.backbone.output_stride,
        size=(int(size[0]), int(size[1])),
        parts=parts,
    )


def model_info(cfg: ModelConfig, size: tuple[int, int]) -> ModelInfo:
    """Build the model of ``cfg`` on the ``meta`` device (no weights, no memory) and measure it."""
    cfg = dataclasses.replace(cfg, pretrained=False, backbone_weights=None)
    with torch.device("meta"):
        model = build_model(cfg)
    return measure_model(model, size)


def format_model_info(info: ModelInfo) -> str:
    """A readable table of :class:`ModelInfo`."""
    h, w = info.size
    lines = [
        f"Panoptic-DeepLab, backbone {info.backbone}, {info.num_classes} classes, "
        f"output stride {info.output_stride}, input {h}x{w}",
        f"{'part':<10} {'params (M)':>11} {'M-Adds (G)':>11} {'share':>7}",
    ]
    total = info.parts["total"].macs or 1
    for name, label in (("backbone", "backbone"), ("semantic", "semantic"), ("instance", "instance"),
                        ("total", "total")):
        cost = info.parts[name]
        lines.append(f"{label:<10} {cost.params / 1e6:>11.3f} {cost.macs / 1e9:>11.2f} {cost.macs / total:>7.1%}")
    lines.append("semantic = ASPP + decoder + head; instance = ASPP + decoder + center and offset heads")
    return "\n".join(lines)

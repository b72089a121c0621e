"""A tiny checkpoint whose outputs have structure, and synthetic images, shared by the export tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_setup import TINY_MODEL_OVERRIDES

from panoptic_deeplab.config import config_to_dict, load_config
from panoptic_deeplab.data.synthetic import make_synthetic_dataset, synthetic_meta
from panoptic_deeplab.engine.checkpoint import atomic_torch_save
from panoptic_deeplab.modeling import build_model

# Few center slots: the graph's export time grows with them.
EXPORT_OVERRIDES = [*TINY_MODEL_OVERRIDES, "postprocess.top_k=8", "postprocess.stuff_area=64"]


def randomize_weights(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """He-scaled random convolutions and unit-scale batch norms: a freshly built model zero-initialises its batch
    norm scales, so its heatmap is flat and its label maps say nothing about parity."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * (2.0 / fan_in) ** 0.5)
                if module.bias is not None:
                    module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
            elif isinstance(module, torch.nn.BatchNorm2d):
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=generator))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
    return model


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``checkpoint``: a randomised tiny model (8 center slots); ``images``: 3 synthetic val images of 96x160."""
    root = tmp_path_factory.mktemp("export")
    cfg = load_config("synthetic_mnv3", EXPORT_OVERRIDES)
    torch.manual_seed(0)
    model = randomize_weights(build_model(cfg.model).eval())
    checkpoint = atomic_torch_save({"model": model.state_dict(), "config": config_to_dict(cfg),
                                    "meta": synthetic_meta().to_json()}, root / "model.pt")
    split = make_synthetic_dataset(root / "data", "val", num_images=3, size=(96, 160), seed=3)
    return {"root": root, "checkpoint": checkpoint, "images": split.image_dir}

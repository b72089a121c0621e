"""Shared helpers for the network tests: small configurations."""

from __future__ import annotations

import dataclasses

import pytest

from panoptic_deeplab.config import ModelConfig

def _tiny_config(**overrides) -> ModelConfig:
    cfg = ModelConfig(
        backbone="mobilenetv3_large",
        pretrained=False,
        num_classes=5,
        aspp_channels=16,
        semantic_decoder_channels=16,
        semantic_low_level_channels=(8, 4),
        semantic_head_channels=16,
        instance_decoder_channels=8,
        instance_low_level_channels=(4, 2),
        instance_head_channels=4,
    )
    return dataclasses.replace(cfg, **overrides)


@pytest.fixture
def tiny_config():
    """Factory of MobileNetV3-L configs with narrow decoders: the real structure at a fraction of the cost."""
    return _tiny_config

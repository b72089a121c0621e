"""Shared helpers for the network tests: small configurations and the opt-in `heavy` marker."""

from __future__ import annotations

import dataclasses
import os

import pytest

from panoptic_deeplab.config import ModelConfig

HEAVY_ENV = "PANOPTIC_DEEPLAB_HEAVY_TESTS"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"heavy: full-size forward passes of every backbone; run with {HEAVY_ENV}=1"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get(HEAVY_ENV) == "1":
        return
    skip = pytest.mark.skip(reason=f"heavy test: set {HEAVY_ENV}=1 to run")
    for item in items:
        if "heavy" in item.keywords:
            item.add_marker(skip)


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

"""Shared fixtures of the trainer tests: a tiny synthetic dataset and a tiny model config."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import pytest

from panoptic_deeplab.config import Config, load_config
from panoptic_deeplab.data.synthetic import make_synthetic_dataset
from tiny_setup import TINY_MODEL_OVERRIDES, synthetic_data_overrides


IMAGE_SIZE = (64, 128)


# A model small enough for a few dozen CPU steps in a test: timm's smallest MobileNetV3, narrow decoders.
TINY_OVERRIDES = [
    *TINY_MODEL_OVERRIDES,
    "data.crop_size=[65,129]",
    "data.batch_size=2",
    "targets.small_instance_area=64",
    "postprocess.stuff_area=32",
    "train.log_period=1",
    "train.eval_period=0",
]


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 training and 2 validation images of 64x128 (3 batches of 2 per epoch)."""
    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic_dataset(root, "train", 6, IMAGE_SIZE, seed=0)
    make_synthetic_dataset(root, "val", 2, IMAGE_SIZE, seed=1)
    return root


@pytest.fixture
def tiny_overrides(synthetic_root: Path) -> list[str]:
    """``key=value`` overrides of the synthetic preset: the tiny dataset and the tiny model."""
    return [*synthetic_data_overrides(synthetic_root), *TINY_OVERRIDES]


@pytest.fixture
def make_cfg(synthetic_root: Path, tmp_path: Path) -> Callable[..., Config]:
    """``make_cfg(*overrides, data_root=None)``: the synthetic preset with the tiny model, output in tmp_path."""

    def make(*overrides: str, data_root: Path | None = None) -> Config:
        root = data_root or synthetic_root
        return load_config(
            "synthetic_mnv3",
            [*synthetic_data_overrides(root), *TINY_OVERRIDES, f"train.output_dir={tmp_path / 'run'}", *overrides],
        )

    return make


@pytest.fixture
def private_data(synthetic_root: Path, tmp_path: Path) -> Path:
    """A copy of the synthetic dataset that a test may damage."""
    copy = tmp_path / "data"
    shutil.copytree(synthetic_root, copy)
    return copy

"""A tiny model on a tiny synthetic dataset: config overrides shared by the test folders.

(tests/ is on sys.path because tests/conftest.py lives there.)
"""

from __future__ import annotations

from pathlib import Path

# timm's smallest MobileNetV3 with narrow decoders: a few dozen CPU steps take seconds.
TINY_MODEL_OVERRIDES = [
    "model.backbone=mobilenetv3_small_050",
    "model.pretrained=false",
    "model.aspp_channels=16",
    "model.semantic_decoder_channels=16",
    "model.semantic_low_level_channels=[8,8]",
    "model.semantic_head_channels=16",
    "model.instance_decoder_channels=16",
    "model.instance_low_level_channels=[8,8]",
    "model.instance_head_channels=8",
    "data.num_workers=0",
    "train.device=cpu",
]


def synthetic_data_overrides(root: Path) -> list[str]:
    """``data.*`` overrides pointing at a dataset written by ``make_synthetic_dataset(root, ...)``."""
    return [
        f"data.{split}.{key}={root}/{split}/{leaf}"
        for split in ("train", "val")
        for key, leaf in (("images", "images"), ("json", f"panoptic_{split}.json"), ("panoptic", "panoptic"))
    ]

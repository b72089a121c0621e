"""model-info: parameter and multiply-add counts, and the paper's Xception-71 parameter count."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from panoptic_deeplab import build_model
from panoptic_deeplab.cli import main
from panoptic_deeplab.config import ModelConfig
from panoptic_deeplab.modeling.flops import format_model_info, measure_model, model_info

PAPER_X71_PARAMS = 46.7e6  # SPEC §7.1 (AX Tab. 2/4)


def test_parts_add_up_and_match_a_hand_count(tiny_config) -> None:
    cfg = tiny_config(num_classes=3)
    info = model_info(cfg, (64, 96))
    parts = info.parts
    assert parts["backbone"].params + parts["semantic"].params + parts["instance"].params == parts["total"].params
    assert parts["backbone"].macs + parts["semantic"].macs + parts["instance"].macs == parts["total"].macs
    # semantic predictor: 1x1 conv 16 -> 3 on the 16x24 stride-4 map
    with torch.device("meta"):
        model = build_model(dataclasses.replace(cfg, pretrained=False))
    pred_macs = 16 * 3 * 16 * 24
    model.semantic_head.predictor = torch.nn.Identity()  # type: ignore[assignment]
    without = measure_model(model, (64, 96))
    assert parts["semantic"].macs - without.parts["semantic"].macs == pred_macs
    assert info.size == (64, 96) and info.output_stride == 16 and info.num_classes == 3


def test_macs_scale_with_image_area() -> None:
    small = model_info(ModelConfig(backbone="resnet50"), (513, 1025)).parts["total"].macs
    large = model_info(ModelConfig(backbone="resnet50"), (1025, 2049)).parts["total"].macs
    assert 3.9 < large / small < 4.1


def test_xception71_params_match_paper() -> None:
    """46.7M needs depthwise-separable ASPP convs (TF-DeepLab's aspp_with_separable_conv).

    With standard 3x3 ASPP convs each branch's ASPP alone holds 3 * 9 * 2048 * 256 = 14.2M weights,
    which puts the model at 71.8M.
    """
    sep = model_info(ModelConfig(backbone="xception71", num_classes=19, aspp_separable=True), (65, 65))
    assert abs(sep.parts["total"].params / PAPER_X71_PARAMS - 1) < 0.03
    std = model_info(ModelConfig(backbone="xception71", num_classes=19), (65, 65))
    assert std.parts["backbone"].params == sep.parts["backbone"].params
    per_aspp_difference = 3 * (9 * 2048 * 256 - (9 * 2048 + 2 * 2048 + 2048 * 256))  # std minus DSConv weights + BN
    assert std.parts["total"].params - sep.parts["total"].params == 2 * per_aspp_difference


def test_format_and_cli(capsys) -> None:
    info = model_info(ModelConfig(backbone="mobilenetv3_large"), (129, 257))
    text = format_model_info(info)
    assert "backbone" in text and "instance" in text and "total" in text
    assert main(["model-info", "--backbone", "mobilenetv3_large", "--num-classes", "19", "--size", "129x257",
                 "--output-stride", "16"]) == 0
    printed = capsys.readouterr().out
    assert printed.strip() == text.strip()
    assert main(["model-info", "--backbone", "nope", "--size", "64x64"]) == 2


@pytest.mark.parametrize("bad", ["64", "0x5"])
def test_cli_bad_size(bad: str) -> None:
    with pytest.raises(SystemExit):
        main(["model-info", "--size", bad])

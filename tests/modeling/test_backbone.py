"""Backbones: presets, taps, output strides, weight files and the offline failure."""

from __future__ import annotations

import huggingface_hub.constants
import pytest
import timm
import torch
from safetensors.torch import save_file

from panoptic_deeplab.modeling import backbone as backbone_mod
from panoptic_deeplab.modeling.backbone import BACKBONE_PRESETS, Backbone, read_state_dict, resolve_backbone

# SPEC §1.2: channels of the stride-4, stride-8 and last taps.
EXPECTED_CHANNELS = {
    "mobilenetv3_large": {"res2": 72, "res3": 120, "res5": 960},
    "resnet50": {"res2": 256, "res3": 512, "res5": 2048},
    "resnet101": {"res2": 256, "res3": 512, "res5": 2048},
    "xception65": {"res2": 256, "res3": 728, "res5": 2048},
    "xception71": {"res2": 256, "res3": 728, "res5": 2048},
}


def test_presets_name_existing_timm_models() -> None:
    assert set(BACKBONE_PRESETS) == set(EXPECTED_CHANNELS)
    for preset in BACKBONE_PRESETS.values():
        assert timm.is_model(preset.timm_name), preset.timm_name


@pytest.mark.parametrize("name", sorted(EXPECTED_CHANNELS))
def test_preset_taps_on_meta(name: str) -> None:
    with torch.device("meta"):
        bb = Backbone(name, output_stride=16)
        features = bb(torch.zeros(2, 3, 257, 300))
    assert bb.channels == EXPECTED_CHANNELS[name]
    assert bb.strides == {"res2": 4, "res3": 8, "res5": 16}
    # 'same' padding: ceil(size / stride) at every tap
    for key, stride in bb.strides.items():
        assert tuple(features[key].shape) == (2, bb.channels[key], -(-257 // stride), -(-300 // stride))


@pytest.mark.parametrize("output_stride", [32, 8])
def test_other_output_strides(output_stride: int) -> None:
    bb = Backbone("mobilenetv3_large", output_stride=output_stride)
    assert bb.strides == {"res2": 4, "res3": 8, "res5": output_stride}
    out = bb(torch.rand(1, 3, 64, 96))
    assert out["res5"].shape[-2:] == (64 // output_stride, 96 // output_stride)


def test_any_timm_name_works() -> None:
    bb = Backbone("resnet18", output_stride=16)  # not a preset
    assert bb.channels == {"res2": 64, "res3": 128, "res5": 512}
    assert resolve_backbone("resnet18").timm_name == "resnet18"


def test_bad_backbones() -> None:
    with pytest.raises(ValueError, match="unknown backbone 'no_such_net'"):
        Backbone("no_such_net")
    with pytest.raises(ValueError, match="output_stride must be one of"):
        Backbone("mobilenetv3_large", output_stride=4)
    # a plain ViT has only stride-16 features
    with pytest.raises(ValueError, match="no stride-4 feature"):
        Backbone("vit_tiny_patch16_224", output_stride=32)


def _random_classification_weights(timm_name: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    state = timm.create_model(timm_name, pretrained=False).state_dict()
    return {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()}


@pytest.mark.parametrize("suffix", [".pth", ".safetensors", "wrapped.pth"])
def test_backbone_weights_file(tmp_path, suffix: str) -> None:
    state = _random_classification_weights("mobilenetv3_large_100")
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    elif suffix == "wrapped.pth":
        torch.save({"state_dict": state, "epoch": 3}, path)
    else:
        torch.save(state, path)
    assert read_state_dict(path).keys() == state.keys()
    bb = Backbone("mobilenetv3_large", weights_path=path)
    loaded = bb.body.state_dict()
    for key in ("conv_stem.weight", "blocks.1.1.conv_dw.weight", "blocks.6.0.bn1.running_var"):
        assert torch.equal(loaded[key], state[key]), key


def test_backbone_weights_file_renamed_modules(tmp_path) -> None:
    """timm's Xception feature wrapper renames modules (blocks.0 -> blocks_0); the file uses timm's names."""
    state = _random_classification_weights("xception41")  # the presets' smaller sibling, same wrapper
    path = tmp_path / "x41.pth"
    torch.save(state, path)
    bb = Backbone("xception41", weights_path=path)
    assert torch.equal(bb.body.state_dict()["blocks_0.shortcut.conv.weight"], state["blocks.0.shortcut.conv.weight"])


def test_backbone_weights_mismatch_lists_keys(tmp_path) -> None:
    path = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), path)
    with pytest.raises(ValueError, match=r"resnet18\.pth.*mobilenetv3_large_100.*missing keys: blocks\.0\.0.*unexpected keys: conv1\.weight"):
        Backbone("mobilenetv3_large", weights_path=path)
    state = timm.create_model("mobilenetv3_large_100", pretrained=False).state_dict()
    state["conv_stem.weight"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"wrong shapes: conv_stem\.weight"):
        Backbone("mobilenetv3_large", weights_path=path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Backbone("mobilenetv3_large", weights_path=tmp_path / "missing.pth")


def test_pretrained_offline_fails_fast(tmp_path, monkeypatch) -> None:
    """No hub and nothing cached: an immediate error naming the model and backbone_weights."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(backbone_mod, "_hub_reachable", lambda timeout=3.0: False)
    before = huggingface_hub.constants.HF_HUB_OFFLINE
    with pytest.raises(backbone_mod.PretrainedWeightsUnavailable,
                       match=r"'mobilenetv3_large'.*mobilenetv3_large_100.*backbone_weights=PATH.*model\.pretrained=false"):
        Backbone("mobilenetv3_large", pretrained=True)
    assert huggingface_hub.constants.HF_HUB_OFFLINE == before  # cache-only mode was temporary


@pytest.mark.parametrize("variant, channels", [("small", (16, 88, 144, 576)), ("large", (72, 120, 672, 960))])
def test_deeplab2_mobilenet_endpoints_and_atrous_rule(variant, channels) -> None:
    """deeplab2's MobileNetV3 (model/encoder/mobilenet.py): endpoints are the depthwise outputs of the blocks ending
    each stride level (SPEC §1.2); below output stride 32 the first block past it keeps rate 1, the next ones 2."""
    from panoptic_deeplab.modeling.dl2_mobilenet import DeepLab2MobileNetV3, InvertedBottleneck

    for output_stride, strides in ((32, (4, 8, 16, 32)), (16, (4, 8, 16, 16))):
        body = DeepLab2MobileNetV3(variant, output_stride).eval()
        assert tuple(body.feature_info.channels()) == channels
        assert tuple(body.feature_info.reduction()) == strides
        with torch.no_grad():
            features = body(torch.rand(1, 3, 65, 97))
        assert [tuple(f.shape[1:]) for f in features] == [
            (c, -(-65 // s), -(-97 // s)) for c, s in zip(channels, strides)
        ]
    blocks = [b for b in DeepLab2MobileNetV3(variant, 16).blocks if isinstance(b, InvertedBottleneck)]
    last_stage = [b for b in blocks if b.project.conv.out_channels == blocks[-1].project.conv.out_channels]
    assert [b.depthwise.conv.stride[0] for b in last_stage] == [1] * len(last_stage)
    assert [b.depthwise.conv.dilation[0] for b in last_stage] == [1] + [2] * (len(last_stage) - 1)
    assert not last_stage[0].residual and all(b.residual for b in last_stage[1:])

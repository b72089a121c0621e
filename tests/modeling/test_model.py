"""PanopticDeepLab: output contract at any size, offset rescaling, gradients, determinism, init."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from panoptic_deeplab import PanopticDeepLab, build_model
from panoptic_deeplab.config import ModelConfig
from panoptic_deeplab.modeling.backbone import BACKBONE_PRESETS
from panoptic_deeplab.modeling.random_weights import randomize_weights

SIZES = [(1025, 2049), (513, 1025), (640, 640), (257, 300)]


def _check_outputs(out: dict[str, torch.Tensor], batch: int, num_classes: int, size: tuple[int, int]) -> None:
    assert set(out) == {"semantic", "center", "offset"}
    assert tuple(out["semantic"].shape) == (batch, num_classes, *size)
    assert tuple(out["center"].shape) == (batch, 1, *size)
    assert tuple(out["offset"].shape) == (batch, 2, *size)
    for value in out.values():
        assert value.dtype == torch.float32


@pytest.mark.parametrize("backbone", sorted(BACKBONE_PRESETS))
def test_every_preset_every_size_on_meta(backbone: str) -> None:
    """Shapes and dtypes of every preset at every size with batch 2, on the meta device (no compute)."""
    with torch.device("meta"):
        model = build_model(ModelConfig(backbone=backbone, pretrained=False)).eval()
        for size in SIZES:
            _check_outputs(model(torch.zeros(2, 3, *size)), 2, 19, size)


@pytest.mark.parametrize("backbone", sorted(BACKBONE_PRESETS))
def test_every_preset_computes(tiny_config, backbone: str) -> None:
    # narrow decoders keep this quick; the full widths are checked on meta above
    model = build_model(tiny_config(backbone=backbone)).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 35, 46))
    _check_outputs(out, 2, 5, (35, 46))
    assert all(torch.isfinite(v).all() for v in out.values())


def test_mobilenet_every_size_computes(tiny_config) -> None:
    model = build_model(tiny_config()).eval()
    for size in SIZES + [(64, 64), (65, 97), (100, 37)]:
        batch = 1 if size in SIZES[:3] else 2  # batch 2 at large sizes: benchmarks/bench_presets.py
        with torch.no_grad():
            out = model(torch.rand(batch, 3, *size))
        _check_outputs(out, batch, 5, size)
        assert all(torch.isfinite(v).all() for v in out.values()), size


@pytest.mark.parametrize("backbone", sorted(BACKBONE_PRESETS))
def test_every_preset_computes(backbone: str) -> None:
    """At the smallest of SIZES; benchmarks/bench_presets.py runs every preset at all of them (minutes)."""
    size = SIZES[-1]
    model = build_model(ModelConfig(backbone=backbone, pretrained=False)).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, *size))
    _check_outputs(out, 2, 19, size)
    assert all(torch.isfinite(v).all() for v in out.values())


@pytest.mark.parametrize("align_corners", [True, False])
def test_offsets_rescaled_to_input_pixels(tiny_config, align_corners: bool) -> None:
    """Offsets of one stride-4 pixel become the matching number of input pixels, per axis (SPEC §1.7)."""
    model = build_model(tiny_config(align_corners=align_corners)).eval()
    model.offset_head.register_forward_hook(lambda m, i, o: torch.ones_like(o))
    model.center_head.register_forward_hook(lambda m, i, o: torch.ones_like(o))
    with torch.no_grad():
        out = model(torch.rand(1, 3, 129, 150))
    h4, w4 = 33, 38  # ceil(129 / 4), ceil(150 / 4)
    if align_corners:
        dy, dx = 128 / (h4 - 1), 149 / (w4 - 1)
    else:
        dy, dx = 129 / h4, 150 / w4
    torch.testing.assert_close(out["offset"][:, 0], torch.full((1, 129, 150), dy))
    torch.testing.assert_close(out["offset"][:, 1], torch.full((1, 129, 150), dx))
    torch.testing.assert_close(out["center"], torch.ones(1, 1, 129, 150))  # values of other maps unscaled


def test_forward_normalises_rgb_in_unit_range(tiny_config) -> None:
    model = build_model(tiny_config()).eval()
    seen = {}
    model.backbone.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    with torch.no_grad():
        model(mean.expand(1, 3, 32, 32).clone())
    assert torch.allclose(seen["x"], torch.zeros(1, 3, 32, 32), atol=1e-6)
    assert set(dict(model.named_buffers())) >= {"pixel_mean", "pixel_std"}


def test_eval_is_deterministic(tiny_config) -> None:
    model = build_model(tiny_config()).eval()
    images = torch.rand(2, 3, 33, 47)
    with torch.no_grad():
        first, second = model(images), model(images)
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_image_averages_with_the_inputs_own_means_change_nothing(tiny_config) -> None:
    """What tiles use to see the whole image's context: every whole-input average of the network (MobileNetV3's
    squeeze-excite blocks, then the ASPP's image pooling) can be replaced, and each replacement matters."""
    from timm.models._efficientnet_blocks import SqueezeExcite

    model = randomize_weights(build_model(tiny_config())).eval()
    blocks = sum(isinstance(m, SqueezeExcite) for m in model.modules())
    assert blocks == 8 and model.pools_globally
    resnet = build_model(tiny_config(backbone="resnet50", aspp_pool_kernel=(2, 2)))
    assert not resnet.pools_globally and resnet.global_average_inputs(torch.rand(1, 3, 33, 33)) == []
    images = torch.rand(1, 3, 65, 97)
    with torch.no_grad():
        plain = model(images)
        maps = model.global_average_inputs(images)
        assert len(maps) == blocks + 1 and maps[-1].shape[1] == 960  # the backbone's last features
        means = [m.mean(dim=(2, 3), keepdim=True) for m in maps]
        with model.image_averages(means):
            same = model(images)
        shifted = []
        for k in (0, blocks):  # the first squeeze-excite block; the image-pooling branches
            with model.image_averages([m + 1.0 if j == k else m for j, m in enumerate(means)]):
                shifted.append(model(images))
        after = model(images)  # the context ends with the block
    for key in plain:
        torch.testing.assert_close(same[key], plain[key], rtol=1e-5, atol=1e-5)
        assert torch.equal(after[key], plain[key]), key
    for other in shifted:
        assert not torch.allclose(other["semantic"], plain["semantic"], rtol=1e-3, atol=0)
    with pytest.raises(ValueError, match=r"^expected 9 averages \(one per squeeze-excite block, then one for the "
                       r"image-pooling branches\), got 1$"):
        with model.image_averages(means[-1:]):
            pass
    local_pooling = build_model(tiny_config(aspp_pool_kernel=(2, 2)))
    with pytest.raises(ValueError, match=r"^expected 8 averages \(one per squeeze-excite block\), got 9$"):
        with local_pooling.image_averages(means):
            pass


@pytest.mark.parametrize(
    "overrides",
    [{}, {"center_head": "d2", "aspp_separable": True, "concat_low_level_first": True, "init": "he"}],
    ids=["paper", "d2-variants"],
)
def test_gradient_reaches_every_parameter(tiny_config, overrides: dict) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_config(**overrides)).train()
    out = model(torch.rand(2, 3, 64, 80))
    # random weights: a plain sum of batch-normalised maps can have an exactly-zero gradient
    loss = sum((v * torch.randn_like(v)).sum() for v in out.values())
    loss.backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, dead


def test_training_with_one_image_gives_clear_error(tiny_config) -> None:
    model = build_model(tiny_config()).train()
    with pytest.raises(ValueError, match="at least 2 images"):
        model(torch.rand(1, 3, 64, 64))


def test_initialisation(tiny_config) -> None:
    cfg = tiny_config(semantic_decoder_channels=64, bn_momentum=0.03, bn_eps=1e-3)
    model = build_model(cfg)
    # SPEC §1.6 "normal": Normal(0, 0.001) for decoder/head convs and predictors, zero bias
    fuse_dw = model.semantic_decoder.fuse[0].pointwise.conv.weight
    assert 0.0007 < fuse_dw.std().item() < 0.0013
    for head in (model.semantic_head, model.center_head, model.offset_head):
        assert torch.count_nonzero(head.predictor.bias) == 0
        assert head.predictor.weight.abs().max() < 0.01
    decoder_bns = [m for m in model.semantic_decoder.modules() if isinstance(m, nn.BatchNorm2d)]
    assert decoder_bns and all(m.momentum == 0.03 and m.eps == 1e-3 for m in decoder_bns)
    assert all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in decoder_bns)
    backbone_bns = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(m.eps != 1e-3 for m in backbone_bns)  # timm's own settings stay

    he = build_model(dataclasses.replace(cfg, init="he"))
    w = he.semantic_decoder.fuse[0].pointwise.conv.weight
    expected = math.sqrt(2.0 / w[0].numel())
    assert 0.8 * expected < w.std().item() < 1.2 * expected
    pred = he.semantic_head.predictor.weight
    assert pred.abs().max() <= 0.02 + 1e-6 and 0.005 < pred.std().item() < 0.012  # trunc normal 0.01


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_classes": 0}, "num_classes"),
        ({"num_classes": 256}, "num_classes"),
        ({"center_head": "sigmoid"}, "center_head"),
        ({"init": "xavier"}, "init"),
        ({"offset_head": "mlp"}, "offset_head must be one of"),
        ({"decoder_fusion": "sum"}, "decoder_fusion must be one of"),
        ({"low_level_strides": (4, 8)}, r"low_level_strides must be distinct strides below the output stride 16, "
                                        r"deepest first \(e.g. \(8, 4\)\), got \(4, 8\)"),
        ({"low_level_strides": (16, 8, 4)}, "below the output stride 16"),
        ({"low_level_strides": (8,)}, r"semantic_low_level_channels needs one width per decoder tap \(8,\)"),
        ({"multi_grid": (1, 2, 4)}, "multi_grid needs a ResNet-style backbone"),
        ({"aspp_pool_conv": "gn"}, "ASPP pooling conv must be one of"),
    ],
)
def test_bad_config(tiny_config, overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_model(tiny_config(**overrides))


def test_bad_images(tiny_config) -> None:
    model = build_model(tiny_config()).eval()
    with pytest.raises(ValueError, match=r"expected RGB images \[N, 3, H, W\]"):
        model(torch.rand(1, 1, 32, 32))


def test_exports() -> None:
    import panoptic_deeplab

    assert panoptic_deeplab.build_model is build_model
    assert panoptic_deeplab.PanopticDeepLab is PanopticDeepLab
    model = build_model(ModelConfig(backbone="mobilenetv3_large", pretrained=False, num_classes=3))
    assert isinstance(model, PanopticDeepLab) and model.num_classes == 3


def test_multi_grid_sets_the_last_stage_dilations() -> None:
    """D2's R52: res5 blocks at dilations 2 * (1, 2, 4) at output stride 16 (SPEC §1.2)."""
    with torch.device("meta"):
        model = build_model(ModelConfig(backbone="resnet52_deeplab", pretrained=False, multi_grid=(1, 2, 4)))
    layer4 = model.backbone.body.layer4
    assert [(b.conv2.dilation, b.conv2.padding) for b in layer4] == [((2, 2), (2, 2)), ((4, 4), (4, 4)), ((8, 8), (8, 8))]
    assert tuple(model.backbone.body.conv1[6].weight.shape) == (128, 64, 3, 3)  # the DeepLab stem's third conv
    with pytest.raises(ValueError, match=r"one positive multiplier per block of the last stage \(3 for"):
        build_model(ModelConfig(backbone="resnet52_deeplab", pretrained=False, multi_grid=(1, 2)))
    with pytest.raises(RuntimeError, match="timm has no ImageNet weights for resnet52_deeplab"):
        build_model(ModelConfig(backbone="resnet52_deeplab", pretrained=True))

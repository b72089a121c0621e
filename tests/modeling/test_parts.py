"""ASPP, decoder, heads and the resampling helpers on their own."""

from __future__ import annotations

import pytest
import torch

from panoptic_deeplab.modeling.aspp import ASPP, ASPPPooling, default_aspp_rates
from panoptic_deeplab.modeling.decoder import PanopticDeepLabDecoder
from panoptic_deeplab.modeling.heads import PredictionHead
from panoptic_deeplab.modeling.layers import AtrousConv2d, DepthwiseSeparableConv, offset_scale, resize_offset


def test_default_rates() -> None:
    assert default_aspp_rates(16) == (6, 12, 18)
    assert default_aspp_rates(32) == (3, 6, 9)
    with pytest.raises(ValueError, match="no default ASPP rates for output stride 4"):
        default_aspp_rates(4)


@pytest.mark.parametrize(
    "size, dilation, used_taps",
    [((9, 17), 6, (3, 3)), ((9, 17), 12, (1, 3)), ((9, 17), 18, (1, 1)), ((40, 3), 5, (3, 1)), ((1, 1), 2, (1, 1))],
)
def test_atrous_conv_skips_taps_in_the_padding(size, dilation: int, used_taps: tuple[int, int]) -> None:
    """The trimmed conv is the full conv: outputs and all gradients, in float64 to rounding."""
    torch.manual_seed(0)
    full = torch.nn.Conv2d(6, 4, 3, padding=dilation, dilation=dilation, bias=True).double()
    atrous = AtrousConv2d(6, 4, 3, padding=dilation, dilation=dilation, bias=True).double()
    atrous.load_state_dict(full.state_dict())
    seen = []
    original = torch.nn.functional.conv2d

    def spy(x, weight, *args):
        seen.append(tuple(weight.shape[-2:]))
        return original(x, weight, *args)

    x = torch.randn(2, 6, *size, dtype=torch.double, requires_grad=True)
    grad_out = torch.randn(2, 4, *size, dtype=torch.double)
    (full(x) * grad_out).sum().backward()
    full_grads = [x.grad.clone(), full.weight.grad, full.bias.grad]
    x.grad = None
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.nn.functional, "conv2d", spy)
        out = atrous(x)
    torch.testing.assert_close(out, full(x), rtol=0, atol=1e-12)
    (out * grad_out).sum().backward()
    for ours, expected in zip([x.grad, atrous.weight.grad, atrous.bias.grad], full_grads):
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12)
    assert seen == [used_taps]


def test_atrous_conv_keeps_the_full_kernel_when_exported() -> None:
    atrous = AtrousConv2d(2, 2, 3, padding=18, dilation=18)
    dynamic = torch.export.Dim.DYNAMIC
    exported = torch.export.export(atrous, (torch.randn(1, 2, 9, 17),), dynamic_shapes=({2: dynamic, 3: dynamic},))
    convs = [n for n in exported.graph.nodes if "conv" in str(n.target)]
    weight_shapes = [tuple(n.args[1].meta["val"].shape) for n in convs]
    assert weight_shapes == [(2, 2, 3, 3)]
    x = torch.randn(1, 2, 40, 50)  # big enough for every tap: the exported module holds there too
    torch.testing.assert_close(exported.module()(x), atrous(x))


def test_atrous_conv_refuses_other_paddings() -> None:
    with pytest.raises(ValueError, match=r"AtrousConv2d needs stride 1 and zero padding \(6, 6\), got stride \(1, 1\), "
                       r"padding \(1, 1\) \(zeros\)"):
        AtrousConv2d(2, 2, 3, padding=1, dilation=6)


@pytest.mark.parametrize("size", [(5, 9), (17, 4), (1, 1)])
def test_image_pooling_is_global(size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    pool = ASPPPooling(6, 4, bn_momentum=0.01, bn_eps=1e-5).eval()
    x = torch.randn(2, 6, *size)
    out = pool(x)
    assert out.shape == (2, 4, *size)
    expected = pool.relu(pool.bn(pool.conv(x.mean(dim=(2, 3), keepdim=True))))
    torch.testing.assert_close(out, expected.expand_as(out))


def test_aspp_structure() -> None:
    aspp = ASPP(32, 8, (2, 4, 6), dropout=0.1, bn_momentum=0.01, bn_eps=1e-5)
    assert [b.conv.dilation[0] for b in list(aspp.branches)[1:4]] == [2, 4, 6]
    assert aspp.project.conv.in_channels == 5 * 8 and aspp.dropout.p == 0.1
    separable = ASPP(32, 8, (2, 4, 6), separable=True)
    assert all(isinstance(b, DepthwiseSeparableConv) for b in list(separable.branches)[1:4])
    assert separable.branches[2].depthwise.conv.dilation == (4, 4)
    assert separable.branches[2].depthwise.conv.groups == 32
    x = torch.randn(2, 32, 7, 9)
    assert aspp.eval()(x).shape == separable.eval()(x).shape == (2, 8, 7, 9)
    with pytest.raises(ValueError, match="three positive atrous rates"):
        ASPP(32, 8, (0, 1, 2))


@pytest.mark.parametrize("low_first", [False, True])
def test_decoder_concatenation_order(low_first: bool) -> None:
    torch.manual_seed(0)
    dec = PanopticDeepLabDecoder(24, (12, 6), (5, 3), 10, aspp_channels=8, aspp_rates=(1, 2, 3),
                                 concat_low_level_first=low_first).eval()
    seen = {}
    dec.aspp.register_forward_hook(lambda m, i, o: seen.setdefault("aspp", o))
    dec.project[0].register_forward_hook(lambda m, i, o: seen.setdefault("low", o))
    dec.fuse[0].register_forward_pre_hook(lambda m, args: seen.setdefault("fuse_in", args[0]))
    features = {"res5": torch.randn(2, 24, 4, 5), "res3": torch.randn(2, 12, 7, 9), "res2": torch.randn(2, 6, 13, 17)}
    out = dec(features)
    assert out.shape == (2, 10, 13, 17)  # the exact size of the stride-4 tap
    fuse_in = seen["fuse_in"]
    assert fuse_in.shape == (2, 8 + 5, 7, 9)
    up = torch.nn.functional.interpolate(seen["aspp"], size=(7, 9), mode="bilinear", align_corners=True)
    first, second = (seen["low"], up) if low_first else (up, seen["low"])
    torch.testing.assert_close(fuse_in, torch.cat([first, second], dim=1))


def test_decoder_channels() -> None:
    # SPEC §1.4 instance branch: 256 + 32 -> 128, then 128 + 16 -> 128
    dec = PanopticDeepLabDecoder(2048, (512, 256), (32, 16), 128)
    assert [f.depthwise.conv.in_channels for f in dec.fuse] == [288, 144]
    assert [f.depthwise.conv.kernel_size for f in dec.fuse] == [(5, 5), (5, 5)]
    assert [f.pointwise.conv.out_channels for f in dec.fuse] == [128, 128]


def test_heads() -> None:
    head = PredictionHead(128, 32, 2)
    assert head.tower.depthwise.conv.kernel_size == (5, 5) and head.predictor.bias is not None
    d2 = PredictionHead(128, 32, 1, kind="d2")
    assert [m.conv.out_channels for m in d2.tower] == [128, 32]
    assert [m.conv.kernel_size for m in d2.tower] == [(3, 3), (3, 3)]
    x = torch.randn(2, 128, 6, 7)
    # linear output: negative values survive (no ReLU / sigmoid after the predictor)
    torch.nn.init.constant_(head.predictor.bias, -5.0)
    assert (head.eval()(x) < 0).any()
    with pytest.raises(ValueError, match="unknown head kind"):
        PredictionHead(8, 4, 1, kind="mlp")


def test_offset_scale() -> None:
    assert offset_scale(65, 257, True) == 4.0  # odd sizes: corners line up (SPEC §1.7)
    assert offset_scale(64, 256, False) == 4.0
    assert offset_scale(33, 129, False) == 129 / 33
    assert offset_scale(1, 5, True) == 5.0  # a single row has no corner spacing


def test_resize_offset_per_axis() -> None:
    offset = torch.stack([torch.full((3, 5), 1.0), torch.full((3, 5), -2.0)]).unsqueeze(0)
    out = resize_offset(offset, (9, 9), align_corners=True)
    torch.testing.assert_close(out[0, 0], torch.full((9, 9), 4.0))  # dy * (9 - 1) / (3 - 1)
    torch.testing.assert_close(out[0, 1], torch.full((9, 9), -4.0))  # dx * (9 - 1) / (5 - 1)
    assert resize_offset(offset, (3, 5), True) is offset
    with pytest.raises(ValueError, match=r"\[N, 2, H, W\]"):
        resize_offset(torch.zeros(1, 3, 4, 4), (8, 8), True)

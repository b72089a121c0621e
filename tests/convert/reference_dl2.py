"""An independent re-computation of deeplab2's Panoptic-DeepLab (MobileNetV3 and residual encoders) for the tests.

Written from deeplab2's sources without this package's modules, and in deeplab2's own layout: tensors keep their
checkpoint names and TensorFlow shapes (HWIO kernels, (kh, kw, C, 1) depthwise kernels), activations are NHWC, and
convolutions are sums of shifted slices times kernel taps (not ``F.conv2d``), resizing is written out, so that
neither the kernel transposes nor the layer choices of the converter are shared with this check.

Sources: ``model/encoder/mobilenet.py`` (block specs, atrous rule, endpoints), ``model/layers/blocks.py``
(``InvertedBottleneckBlock``), ``model/layers/squeeze_and_excite.py``, ``model/encoder/axial_resnet.py`` and
``axial_resnet_instances.py`` (stems, stage widths and strides), ``model/layers/axial_block_groups.py`` (strides,
atrous rates, block widths), ``model/layers/axial_blocks.py`` (pre-activated blocks, shortcuts),
``model/layers/stems.py``, ``model/layers/convolutions.py``, ``model/decoder/{aspp,panoptic_deeplab}.py``,
``model/deeplab.py`` and ``model/utils.py``.

Encoders: ``small`` / ``large`` (MobileNetV3), ``resnet50``, ``resnet50_beta``, ``wide_resnet41``,
``swidernet_sac_1_1_1`` (switchable atrous convolution: ``model/layers/convolutions.py``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

VALUE = "/.ATTRIBUTES/VARIABLE_VALUE"

# (kind, kernel, stride, filters, activation, se_ratio, expand_ratio, is_endpoint): MNV3*_BLOCK_SPECS.
_S = [("c", 3, 2, 16, "hs", 0, 0, 1), ("b", 3, 2, 16, "re", .25, 1, 1), ("b", 3, 2, 24, "re", 0, 72 / 16, 0),
      ("b", 3, 1, 24, "re", 0, 88 / 24, 1), ("b", 5, 2, 40, "hs", .25, 4, 0), ("b", 5, 1, 40, "hs", .25, 6, 0),
      ("b", 5, 1, 40, "hs", .25, 6, 0), ("b", 5, 1, 48, "hs", .25, 3, 0), ("b", 5, 1, 48, "hs", .25, 3, 1),
      ("b", 5, 2, 96, "hs", .25, 6, 0), ("b", 5, 1, 96, "hs", .25, 6, 0), ("b", 5, 1, 96, "hs", .25, 6, 0),
      ("c", 1, 1, 576, "hs", 0, 0, 1)]
_L = [("c", 3, 2, 16, "hs", 0, 0, 0), ("b", 3, 1, 16, "re", 0, 1, 1), ("b", 3, 2, 24, "re", 0, 4, 0),
      ("b", 3, 1, 24, "re", 0, 3, 1), ("b", 5, 2, 40, "re", .25, 3, 0), ("b", 5, 1, 40, "re", .25, 3, 0),
      ("b", 5, 1, 40, "re", .25, 3, 1), ("b", 3, 2, 80, "hs", 0, 6, 0), ("b", 3, 1, 80, "hs", 0, 2.5, 0),
      ("b", 3, 1, 80, "hs", 0, 2.3, 0), ("b", 3, 1, 80, "hs", 0, 2.3, 0), ("b", 3, 1, 112, "hs", .25, 6, 0),
      ("b", 3, 1, 112, "hs", .25, 6, 1), ("b", 5, 2, 160, "hs", .25, 6, 0), ("b", 5, 1, 160, "hs", .25, 6, 0),
      ("b", 5, 1, 160, "hs", .25, 6, 0), ("c", 1, 1, 960, "hs", 0, 0, 1)]
SPECS = {"small": _S, "large": _L}


def _divisible(value: float, divisor: int = 8) -> int:
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * value else new


def _layout(variant: str, output_stride: int) -> list[dict]:
    """Per block: its input/expanded/output widths, stride, atrous rate and whether it is an endpoint."""
    blocks, current, rate, cin = [], 1, 1, 3
    for kind, k, s, f, act, se, er, end in SPECS[variant]:
        if current == output_stride:
            stride, layer_rate, rate = 1, rate, rate * s
        else:
            stride, layer_rate, current = s, 1, current * s
        expanded = _divisible(cin * er) if kind == "b" and er > 1 else cin
        blocks.append(dict(kind=kind, k=k, stride=stride, rate=layer_rate if k != 1 else 1, cin=cin,
                           expanded=expanded, cout=f, act=act, se=se, residual=s == 1 and cin == f,
                           endpoint=bool(end)))
        cin = f
    return blocks


# backbone_type and num_blocks of axial_resnet_instances' ResNet50, ResNet50Beta and SWideRNet (wide_resnet41),
# with AxialResNet's [3] blocks of _stage1 for wider_resnet.
RESNETS = {"resnet50": ("resnet", [3, 4, 6, 3]), "resnet50_beta": ("resnet_beta", [3, 4, 6, 3]),
           "wide_resnet41": ("wider_resnet", [3, 3, 6, 3, 3]),
           # SWideRNet (1, 1, 1) with use_sac_beyond_stride 32 (configs/cityscapes/.../swidernet_sac_1_1_1_os16)
           "swidernet_sac_1_1_1": ("wider_resnet", [3, 3, 6, 3, 3])}
SAC_BEYOND_STRIDE = {"swidernet_sac_1_1_1": 32}


def _resnet_layout(name: str, output_stride: int) -> tuple[list[dict], dict[str, int]]:
    """AxialResNet + BlockGroup: per block its stage, widths, stride, rates; and the endpoints' channels."""
    kind, num_blocks = RESNETS[name]
    input_strides, strides, filters = [1, 2, 4, 8, 16], [2] * 5, [32, 64, 128, 256, 512]
    if kind == "wider_resnet":
        input_strides[0], strides[0] = 2, 1
    first = 5 - len(num_blocks)
    cin = 128 if kind == "resnet_beta" else 64
    blocks, channels = [], {}
    for index in range(first, 5):
        current, stage_out = input_strides[index], input_strides[index] * strides[index]
        f = filters[index]
        widths = [f, f, 4 * f] if kind != "wider_resnet" else ([4 * f, 4 * f] if stage_out < 32 else [f, 2 * f, 4 * f])
        sac = stage_out >= SAC_BEYOND_STRIDE.get(name, 0) > 0  # BlockGroup: use_sac
        for b in range(num_blocks[index - first]):
            rate = current // output_stride if current > output_stride else 1
            blocks.append(dict(sac=sac,
                name=f"encoder/_stage{index + 1}/_block{b + 1}", cin=cin, widths=widths,
                stride=strides[index] if b == 0 and input_strides[index] < output_stride else 1, rate=rate,
                second_rate=stage_out // output_stride if b == 0 and stage_out > output_stride else rate,
                endpoint=f"res{index + 1}" if b == num_blocks[index - first] - 1 else None))
            if b == 0 and strides[index] > 1:
                current *= strides[index]
            cin = widths[-1]
        channels[f"res{index + 1}"] = cin
    return blocks, channels


def _resnet_tensors(name: str, output_stride: int, conv_bn, kernel, bias) -> None:  # noqa: ANN001
    kind = RESNETS[name][0]
    if kind == "resnet_beta":
        conv_bn("encoder/_stem/_conv1_bn_act", 3, 3, 64)
        conv_bn("encoder/_stem/_conv2_bn_act", 3, 64, 64)
        conv_bn("encoder/_stem/_conv3_bn", 3, 64, 128)
    else:
        conv_bn("encoder/_stem", 7 if kind == "resnet" else 3, 3, 64)
    for b in _resnet_layout(name, output_stride)[0]:
        w = b["widths"]
        def spatial(layer: str, cin: int, cout: int, stride: int) -> None:
            conv_bn(layer, 3, cin, cout)
            if b["sac"]:  # Conv2DSame's GlobalContexts; the switch only where it strides 1 (SAC)
                for context, channels in (("_pre_global_context", cin), ("_post_global_context", cout)):
                    kernel(f"{layer}/{context}/convolution/kernel", (1, 1, channels, channels), channels)
                    bias(f"{layer}/{context}/convolution/bias", channels)
                if stride == 1:
                    kernel(f"{layer}/_conv/_switch/kernel", (1, 1, cin, 1), cin)
                    bias(f"{layer}/_conv/_switch/bias", 1)

        if len(w) == 3:
            conv_bn(f"{b['name']}/_conv1_bn_act", 1, b["cin"], w[0])
            spatial(f"{b['name']}/_conv2_bn_act", w[0], w[1], b["stride"])
            conv_bn(f"{b['name']}/_conv3_bn", 1, w[1], w[2])
        else:
            spatial(f"{b['name']}/_conv1_bn_act", b["cin"], w[0], b["stride"])
            spatial(f"{b['name']}/_conv2_bn", w[0], w[1], 1)
        if b["cin"] != w[-1]:
            conv_bn(f"{b['name']}/_shortcut", 1, b["cin"], w[-1])


def dl2_tensors(variant: str, output_stride: int, num_classes: int, widths: dict[str, int], seed: int
                ) -> dict[str, np.ndarray]:
    """A deeplab2 checkpoint's model tensors with random values (names with the VARIABLE_VALUE suffix)."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}

    def kernel(name: str, shape: tuple[int, ...], fan_in: int) -> None:
        out[name + VALUE] = (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    def bn(name: str, c: int) -> None:
        out[f"{name}/gamma" + VALUE] = rng.uniform(0.5, 1.5, c).astype(np.float32)
        out[f"{name}/beta" + VALUE] = (rng.standard_normal(c) * 0.2).astype(np.float32)
        out[f"{name}/moving_mean" + VALUE] = (rng.standard_normal(c) * 0.2).astype(np.float32)
        out[f"{name}/moving_variance" + VALUE] = rng.uniform(0.5, 2.0, c).astype(np.float32)

    def conv_bn(name: str, k: int, cin: int, cout: int) -> None:
        kernel(f"{name}/_conv/kernel", (k, k, cin, cout), k * k * cin)
        bn(f"{name}/_batch_norm", cout)

    def separable(name: str, cin: int, cout: int) -> None:
        kernel(f"{name}/_conv1_bn_act/_depthwise/_depthwise_conv/depthwise_kernel", (5, 5, cin, 1), 25)
        bn(f"{name}/_conv1_bn_act/_depthwise/_batch_norm", cin)
        conv_bn(f"{name}/_conv1_bn_act/_pointwise", 1, cin, cout)

    last = 0
    if variant in RESNETS:
        def bias(name: str, c: int) -> None:
            out[name + VALUE] = (rng.standard_normal(c) * 0.1).astype(np.float32)

        _resnet_tensors(variant, output_stride, conv_bn, kernel, bias)
        last = _tap_channels(variant, output_stride)["res5"]
    for i, b in enumerate(_layout(variant, output_stride) if variant in SPECS else []):
        name = f"encoder/_blocks/{i}"
        if b["kind"] == "c":
            conv_bn(name, b["k"], b["cin"], b["cout"])
            last = b["cout"]
            continue
        if b["expanded"] != b["cin"]:
            conv_bn(f"{name}/_conv1_bn_act", 1, b["cin"], b["expanded"])
        kernel(f"{name}/_conv2_bn_act/_depthwise_conv/depthwise_kernel", (b["k"], b["k"], b["expanded"], 1),
               b["k"] ** 2)
        bn(f"{name}/_conv2_bn_act/_batch_norm", b["expanded"])
        if b["se"]:
            reduced = _divisible(max(1, int(b["expanded"] * b["se"])))
            kernel(f"{name}/_squeeze_excitation/_se_reduce/kernel", (1, 1, b["expanded"], reduced), b["expanded"])
            out[f"{name}/_squeeze_excitation/_se_reduce/bias" + VALUE] = rng.standard_normal(reduced).astype(np.float32) * .1
            kernel(f"{name}/_squeeze_excitation/_se_expand/kernel", (1, 1, reduced, b["expanded"]), reduced)
            out[f"{name}/_squeeze_excitation/_se_expand/bias" + VALUE] = rng.standard_normal(b["expanded"]).astype(np.float32) * .1
        conv_bn(f"{name}/_conv3_bn", 1, b["expanded"], b["cout"])
    taps = _tap_channels(variant, output_stride)
    for branch, prefix in (("semantic", "semantic_decoder"), ("instance", "instance_decoder")):
        aspp, decoder = widths[f"{branch}_aspp"], widths[f"{branch}_decoder"]
        conv_bn(f"{prefix}/_aspp/_conv_bn_act", 1, last, aspp)
        for j in (1, 2, 3):
            conv_bn(f"{prefix}/_aspp/_aspp_conv{j}/_conv_bn_act", 3, last, aspp)
        conv_bn(f"{prefix}/_aspp/_aspp_pool/_conv_bn_act", 1, last, aspp)
        conv_bn(f"{prefix}/_aspp/_proj_conv_bn_act", 1, 5 * aspp, aspp)
        running = aspp
        for j, (tap, project) in enumerate(zip(("res3", "res2"), widths[f"{branch}_low"]), start=1):
            conv_bn(f"{prefix}/_low_level_conv{j}", 1, taps[tap], project)
            separable(f"{prefix}/_fusion_conv{j}", running + project, decoder)
            running = decoder
    for tower, last_layer, cin, head, cout in (
        ("semantic_head_without_last_layer", "semantic_last_layer", widths["semantic_decoder"],
         widths["semantic_head"], num_classes),
        ("instance_center_head_without_last_layer", "instance_center_head_last_layer",
         widths["instance_decoder"], widths["instance_head"], 1),
        ("instance_regression_head_without_last_layer", "instance_regression_head_last_layer",
         widths["instance_decoder"], widths["instance_head"], 2),
    ):
        separable(tower, cin, head)
        kernel(f"{last_layer}/kernel", (1, 1, head, cout), head)
        out[f"{last_layer}/bias" + VALUE] = (rng.standard_normal(cout) * 0.1).astype(np.float32)
    return out


def _tap_channels(variant: str, output_stride: int) -> dict[str, int]:
    if variant in RESNETS:
        return _resnet_layout(variant, output_stride)[1]
    levels, channels = 0, {}
    for b in _layout(variant, output_stride):
        if b["endpoint"]:
            levels += 1
            channels[f"res{levels}"] = b["expanded"] if b["kind"] == "b" else b["cout"]
    return channels


# ------------------------------------------------------------------------------------------- forward (NHWC)


def _conv(x: Tensor, kernel: Tensor, stride: int = 1, rate: int = 1, depthwise: bool = False) -> Tensor:
    """``Conv2DSame`` / ``DepthwiseConv2DSame``: symmetric zero padding rate*(k-1)/2, then a sum over taps."""
    k = kernel.shape[0]
    pad = rate * (k - 1) // 2
    x = torch.nn.functional.pad(x, (0, 0, pad, pad, pad, pad))
    height = (x.shape[1] - rate * (k - 1) - 1) // stride + 1
    width = (x.shape[2] - rate * (k - 1) - 1) // stride + 1
    out = 0
    for i in range(k):
        for j in range(k):
            window = x[:, i * rate: i * rate + stride * (height - 1) + 1: stride,
                       j * rate: j * rate + stride * (width - 1) + 1: stride]
            out = out + (window * kernel[i, j, :, 0] if depthwise else window @ kernel[i, j])
    return out


def _bn(x: Tensor, t: dict[str, Tensor], name: str, eps: float) -> Tensor:
    return (x - t[f"{name}/moving_mean"]) / torch.sqrt(t[f"{name}/moving_variance"] + eps) * t[f"{name}/gamma"] \
        + t[f"{name}/beta"]


def _act(x: Tensor, name: str | None) -> Tensor:
    if name == "re":
        return torch.clamp(x, min=0)
    if name == "hs":
        return x * torch.clamp(x + 3, 0, 6) / 6
    return x


def _resize(x: Tensor, height: int, width: int) -> Tensor:
    """Bilinear resize with align_corners=True (``resize_align_corners``), written out on NHWC."""
    def axis(n_in: int, n_out: int) -> tuple[Tensor, Tensor, Tensor]:
        pos = torch.arange(n_out, dtype=torch.float64) * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
        low = pos.floor().long().clamp(max=n_in - 1)
        high = (low + 1).clamp(max=n_in - 1)
        return low, high, (pos - low).float()

    y0, y1, wy = axis(x.shape[1], height)
    x0, x1, wx = axis(x.shape[2], width)
    rows = x[:, y0] * (1 - wy)[None, :, None, None] + x[:, y1] * wy[None, :, None, None]
    return rows[:, :, x0] * (1 - wx)[None, None, :, None] + rows[:, :, x1] * wx[None, None, :, None]


def _average_pool_same(x: Tensor, k: int) -> Tensor:
    """AveragePooling2D(k, strides=1, padding='same') on NHWC: the mean over the window's pixels inside the image."""
    pad = k // 2
    padded = torch.nn.functional.pad(x, (0, 0, pad, pad, pad, pad))
    ones = torch.nn.functional.pad(torch.ones_like(x[..., :1]), (0, 0, pad, pad, pad, pad))
    total = sum(padded[:, i:i + x.shape[1], j:j + x.shape[2]] for i in range(k) for j in range(k))
    count = sum(ones[:, i:i + x.shape[1], j:j + x.shape[2]] for i in range(k) for j in range(k))
    return total / count


def _resnet_endpoints(x: Tensor, name: str, output_stride: int, t: dict[str, Tensor], eps: float
                      ) -> dict[str, Tensor]:
    """AxialResNet.call_encoder_before_stacked_decoder: stem without activation, pre-activated blocks,
    endpoints = ReLU of each stage's output."""
    relu = torch.relu

    def conv_bn(x: Tensor, layer: str, act: str | None, stride: int = 1, rate: int = 1, sac: bool = False) -> Tensor:
        kernel = t[f"{layer}/_conv/kernel"]
        if not sac:
            return _act(_bn(_conv(x, kernel, stride, rate), t, f"{layer}/_batch_norm", eps), act)

        def context(x: Tensor, part: str) -> Tensor:  # GlobalContext
            pooled = x.mean(dim=(1, 2), keepdim=True)
            return x + pooled @ t[f"{layer}/{part}/convolution/kernel"][0, 0] + t[f"{layer}/{part}/convolution/bias"]

        x = context(x, "_pre_global_context")
        y = _conv(x, kernel, stride, rate)
        if stride == 1:  # SwitchableAtrousConvolution.call
            switch = _average_pool_same(x, 5) @ t[f"{layer}/_conv/_switch/kernel"][0, 0] + t[f"{layer}/_conv/_switch/bias"]
            y = switch * _conv(x, kernel, 1, 3 * rate) + (1 - switch) * y
        y = context(y, "_post_global_context")
        return _act(_bn(y, t, f"{layer}/_batch_norm", eps), act)

    if RESNETS[name][0] == "resnet_beta":
        x = conv_bn(x, "encoder/_stem/_conv1_bn_act", "re", stride=2)
        x = conv_bn(x, "encoder/_stem/_conv2_bn_act", "re")
        x = conv_bn(x, "encoder/_stem/_conv3_bn", None)
    else:
        x = conv_bn(x, "encoder/_stem", None, stride=2)
    endpoints = {}
    for b in _resnet_layout(name, output_stride)[0]:
        inputs, s, sac = relu(x), b["stride"], b["sac"]
        shortcut = conv_bn(inputs, f"{b['name']}/_shortcut", None, stride=s) if b["cin"] != b["widths"][-1] \
            else inputs[:, ::s, ::s]
        if len(b["widths"]) == 3:
            y = conv_bn(inputs, f"{b['name']}/_conv1_bn_act", "re")
            y = conv_bn(y, f"{b['name']}/_conv2_bn_act", "re", stride=s, rate=b["rate"], sac=sac)
            y = conv_bn(y, f"{b['name']}/_conv3_bn", None)
        else:
            y = conv_bn(inputs, f"{b['name']}/_conv1_bn_act", "re", stride=s, rate=b["rate"], sac=sac)
            y = conv_bn(y, f"{b['name']}/_conv2_bn", None, rate=b["second_rate"], sac=sac)
        x = y + shortcut
        if b["endpoint"]:
            endpoints[b["endpoint"]] = relu(x)
    return endpoints


def reference_endpoints(tensors: dict[str, np.ndarray], image255: np.ndarray, variant: str, output_stride: int,
                        eps: float) -> dict[str, Tensor]:
    """A residual encoder's endpoints res2 .. res5 (NHWC, float64) on one HxWx3 image in 0..255."""
    t = {k.removesuffix(VALUE): torch.from_numpy(v).double() for k, v in tensors.items()}
    return _resnet_endpoints(torch.from_numpy(image255).double()[None] / 127.5 - 1.0, variant, output_stride, t, eps)


def dl2_forward(tensors: dict[str, np.ndarray], image255: np.ndarray, variant: str, output_stride: int,
                atrous_rates: tuple[int, int, int], eps: float) -> dict[str, Tensor]:
    """``DeepLab.call(training=False)`` on one HxWx3 image in 0..255: semantic [1, C, H, W], center [1, 1, H, W],
    offset [1, 2, H, W] (channels first, to compare with the converted model)."""
    t = {k.removesuffix(VALUE): torch.from_numpy(v).double() for k, v in tensors.items()}
    x = torch.from_numpy(image255).double()[None] / 127.5 - 1.0

    def conv_bn(x: Tensor, name: str, act: str | None, stride: int = 1, rate: int = 1) -> Tensor:
        return _act(_bn(_conv(x, t[f"{name}/_conv/kernel"], stride, rate), t, f"{name}/_batch_norm", eps), act)

    def separable(x: Tensor, name: str) -> Tensor:
        block = f"{name}/_conv1_bn_act"
        x = _conv(x, t[f"{block}/_depthwise/_depthwise_conv/depthwise_kernel"], depthwise=True)
        x = _act(_bn(x, t, f"{block}/_depthwise/_batch_norm", eps), "re")
        return conv_bn(x, f"{block}/_pointwise", "re")

    endpoints, level = {}, 0
    if variant in RESNETS:
        endpoints = _resnet_endpoints(x, variant, output_stride, t, eps)
    for i, b in enumerate(_layout(variant, output_stride) if variant in SPECS else []):
        name = f"encoder/_blocks/{i}"
        if b["kind"] == "c":
            x = conv_bn(x, name, b["act"], b["stride"], b["rate"])
            endpoint = x
        else:
            shortcut = x
            if b["expanded"] != b["cin"]:
                x = conv_bn(x, f"{name}/_conv1_bn_act", b["act"])
            x = _conv(x, t[f"{name}/_conv2_bn_act/_depthwise_conv/depthwise_kernel"], b["stride"], b["rate"], True)
            x = endpoint = _act(_bn(x, t, f"{name}/_conv2_bn_act/_batch_norm", eps), b["act"])
            if b["se"]:
                se = f"{name}/_squeeze_excitation"
                pooled = x.mean(dim=(1, 2), keepdim=True)
                gate = torch.clamp(pooled @ t[f"{se}/_se_reduce/kernel"][0, 0] + t[f"{se}/_se_reduce/bias"], min=0)
                gate = torch.sigmoid(gate @ t[f"{se}/_se_expand/kernel"][0, 0] + t[f"{se}/_se_expand/bias"])
                x = x * gate
            x = _bn(_conv(x, t[f"{name}/_conv3_bn/_conv/kernel"]), t, f"{name}/_conv3_bn/_batch_norm", eps)
            if b["residual"]:
                x = x + shortcut
        if b["endpoint"]:
            level += 1
            endpoints[f"res{level}"] = endpoint

    def decoder(prefix: str) -> Tensor:
        high = endpoints["res5"]
        aspp = f"{prefix}/_aspp"
        branches = [conv_bn(high, f"{aspp}/_conv_bn_act", "re")]
        branches += [conv_bn(high, f"{aspp}/_aspp_conv{j}/_conv_bn_act", "re", rate=r)
                     for j, r in zip((1, 2, 3), atrous_rates)]
        pooled = conv_bn(high.mean(dim=(1, 2), keepdim=True), f"{aspp}/_aspp_pool/_conv_bn_act", "re")
        branches.append(pooled.expand(-1, high.shape[1], high.shape[2], -1))
        y = conv_bn(torch.cat(branches, dim=3), f"{aspp}/_proj_conv_bn_act", "re")
        for j, tap in ((1, "res3"), (2, "res2")):
            low = conv_bn(endpoints[tap], f"{prefix}/_low_level_conv{j}", "re")
            y = _resize(y, low.shape[1], low.shape[2])
            y = separable(torch.cat([y, low], dim=3), f"{prefix}/_fusion_conv{j}")
        return y

    def head(features: Tensor, tower: str, last: str) -> Tensor:
        y = separable(features, tower)
        return y @ t[f"{last}/kernel"][0, 0] + t[f"{last}/bias"]

    semantic_features, instance_features = decoder("semantic_decoder"), decoder("instance_decoder")
    height, width = image255.shape[:2]
    semantic = head(semantic_features, "semantic_head_without_last_layer", "semantic_last_layer")
    center = head(instance_features, "instance_center_head_without_last_layer", "instance_center_head_last_layer")
    offset = head(instance_features, "instance_regression_head_without_last_layer",
                  "instance_regression_head_last_layer")
    # resize_and_rescale_offsets: scale by (target - 1) / (source - 1) per axis, then resize.
    scale = torch.tensor([(height - 1) / (offset.shape[1] - 1), (width - 1) / (offset.shape[2] - 1)], dtype=torch.float64)
    outputs = {"semantic": _resize(semantic, height, width), "center": _resize(center, height, width),
               "offset": _resize(offset * scale, height, width)}
    return {k: v.permute(0, 3, 1, 2).float() for k, v in outputs.items()}

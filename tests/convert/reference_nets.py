"""Independent functional re-computations of the reference networks, for the converter tests.

Each reference is written twice here, from its sources (cited per function) and without this package's
modules: a list of its state-dict entries with their shapes (the on-disk layout), and a forward pass in plain
``torch.nn.functional`` that reads those entries by the reference's own names. The tests fill the entries with
random weights and random batch-norm statistics, save them in the reference's container format, convert the
file and compare our model's raw outputs with this forward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

State = dict[str, Tensor]
Shapes = dict[str, tuple[int, ...]]


def conv_shapes(shapes: Shapes, name: str, cin: int, cout: int, k: int, *, groups: int = 1, bias: bool = False,
                norm: str | None = None) -> None:
    """A conv's weight (and bias), and its batch norm's four tensors + counter at ``norm``."""
    shapes[f"{name}.weight"] = (cout, cin // groups, k, k)
    if bias:
        shapes[f"{name}.bias"] = (cout,)
    if norm is not None:
        for t in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{norm}.{t}"] = (cout,)
        shapes[f"{norm}.num_batches_tracked"] = ()


def random_state(shapes: Shapes, seed: int) -> State:
    """Random weights scaled to keep activations near 1, random BN statistics (scale below 1 for deep nets)."""
    g = torch.Generator().manual_seed(seed)
    state: State = {}
    for name, shape in shapes.items():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(1000)
        elif name.endswith("running_var"):
            state[name] = torch.rand(shape, generator=g) + 0.5
        elif name.endswith(("running_mean", ".bias")):
            state[name] = torch.randn(shape, generator=g) * 0.1
        elif len(shape) == 1:
            state[name] = torch.rand(shape, generator=g) * 0.4 + 0.3
        else:
            fan_in = shape[1] * shape[2] * shape[3]
            state[name] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
    return state


def conv(x: Tensor, sd: State, name: str, *, norm: str | None = None, relu: bool = True, stride: int = 1,
         padding: int = 0, dilation: int = 1, groups: int = 1, eps: float = 1e-5) -> Tensor:
    x = F.conv2d(x, sd[f"{name}.weight"], sd.get(f"{name}.bias"), stride, padding, dilation, groups)
    if norm is not None:
        x = F.batch_norm(x, sd[f"{norm}.running_mean"], sd[f"{norm}.running_var"], sd[f"{norm}.weight"],
                         sd[f"{norm}.bias"], False, 0.0, eps)
    return F.relu(x) if relu else x


# ---------------------------------------------------------------------------------------------------
# detectron2 (projects/Panoptic-DeepLab, projects/DeepLab, detectron2/layers)
# ---------------------------------------------------------------------------------------------------

D2_BLOCKS = (3, 4, 6, 3)


def d2_shapes(num_classes: int, dsconv: bool) -> Shapes:
    """The state dict of ``PanopticDeepLab`` with the R52 configs (``Conv2d`` norms at ``<conv>.norm``)."""
    s: Shapes = {}

    def c(name: str, cin: int, cout: int, k: int, **kw) -> None:
        conv_shapes(s, name, cin, cout, k, norm=f"{name}.norm", **kw)

    def sep(name: str, cin: int, cout: int, k: int) -> None:  # DepthwiseSeparableConv2d
        c(f"{name}.depthwise", cin, cin, k, groups=cin)
        c(f"{name}.pointwise", cin, cout, 1)

    def two(name: str, cin: int, cout: int) -> None:
        c(f"{name}.0", cin, cout, 3)
        c(f"{name}.1", cout, cout, 3)

    # DeepLabStem (projects/DeepLab/deeplab/resnet.py)
    c("backbone.stem.conv1", 3, 64, 3)
    c("backbone.stem.conv2", 64, 64, 3)
    c("backbone.stem.conv3", 64, 128, 3)
    cin = 128
    for stage, blocks in enumerate(D2_BLOCKS, start=2):
        width = 64 * 2 ** (stage - 2)
        for j in range(blocks):
            name = f"backbone.res{stage}.{j}"
            if j == 0:
                c(f"{name}.shortcut", cin, width * 4, 1)
            c(f"{name}.conv1", cin, width, 1)
            c(f"{name}.conv2", width, width, 3)
            c(f"{name}.conv3", width, width * 4, 1)
            cin = width * 4
    for head, channels, head_channels in (("sem_seg_head", 256, 256), ("ins_embed_head", 128, 32)):
        aspp = f"{head}.decoder.res5.project_conv"
        c(f"{aspp}.convs.0", 2048, 256, 1)
        for i in (1, 2, 3):
            (sep if dsconv else c)(f"{aspp}.convs.{i}", 2048, 256, 3)
        conv_shapes(s, f"{aspp}.convs.4.1", 2048, 256, 1, bias=True)
        c(f"{aspp}.project", 5 * 256, 256, 1)
        running = 256
        for tap, cin, proj in (("res3", 512, 64), ("res2", 256, 32)):  # PROJECT_CHANNELS [32, 64]
            c(f"{head}.decoder.{tap}.project_conv", cin, proj, 1)
            if dsconv:
                sep(f"{head}.decoder.{tap}.fuse_conv", proj + running, channels, 5)
            else:
                two(f"{head}.decoder.{tap}.fuse_conv", proj + running, channels)
            running = channels
    if dsconv:
        sep("sem_seg_head.head", 256, 256, 5)
        sep("ins_embed_head.offset_head", 128, 32, 5)
    else:
        c("sem_seg_head.head.0", 256, 256, 3)
        c("sem_seg_head.head.1", 256, 256, 3)
        c("ins_embed_head.offset_head.0", 128, 128, 3)
        c("ins_embed_head.offset_head.1", 128, 32, 3)
    c("ins_embed_head.center_head.0", 128, 128, 3)
    c("ins_embed_head.center_head.1", 128, 32, 3)
    conv_shapes(s, "sem_seg_head.predictor", 256, num_classes, 1, bias=True)
    conv_shapes(s, "ins_embed_head.center_predictor", 32, 1, 1, bias=True)
    conv_shapes(s, "ins_embed_head.offset_predictor", 32, 2, 1, bias=True)
    return s


def d2_forward(sd: State, image255: Tensor, dsconv: bool, pool_kernel: tuple[int, int],
               size_divisibility: int = 0) -> dict[str, Tensor]:
    """``PanopticDeepLab.forward`` at inference on one RGB image ``[3, H, W]`` in 0..255 (panoptic_seg.py)."""
    mean = torch.tensor([123.675, 116.280, 103.530]).view(3, 1, 1)
    std = torch.tensor([58.395, 57.120, 57.375]).view(3, 1, 1)
    height, width = image255.shape[-2:]
    x = ((image255 - mean) / std)[None]
    if size_divisibility:  # ImageList.from_tensors pads bottom/right with 0
        x = F.pad(x, (0, (-width) % size_divisibility, 0, (-height) % size_divisibility))

    def cn(x: Tensor, name: str, relu: bool = True, **kw) -> Tensor:
        return conv(x, sd, name, norm=f"{name}.norm", relu=relu, **kw)

    def sep(x: Tensor, name: str, k: int, dilation: int = 1) -> Tensor:
        x = cn(x, f"{name}.depthwise", padding=dilation * (k // 2), dilation=dilation, groups=x.shape[1])
        return cn(x, f"{name}.pointwise")

    def tower(x: Tensor, name: str) -> Tensor:
        return sep(x, name, 5) if dsconv else cn(cn(x, f"{name}.0", padding=1), f"{name}.1", padding=1)

    # ResNet (projects/DeepLab/deeplab/resnet.py: DeepLabStem, BottleneckBlock with stride in the 3x3)
    x = cn(x, "backbone.stem.conv1", stride=2, padding=1)
    x = cn(x, "backbone.stem.conv2", padding=1)
    x = cn(x, "backbone.stem.conv3", padding=1)
    x = F.max_pool2d(x, 3, 2, 1)
    features = {}
    for stage, blocks in enumerate(D2_BLOCKS, start=2):
        for j in range(blocks):
            name = f"backbone.res{stage}.{j}"
            stride = 2 if j == 0 and stage in (3, 4) else 1
            dilation = 2 * (1, 2, 4)[j] if stage == 5 else 1  # RES5_DILATION 2, RES5_MULTI_GRID [1, 2, 4]
            shortcut = cn(x, f"{name}.shortcut", relu=False, stride=stride) if j == 0 else x
            out = cn(x, f"{name}.conv1")
            out = cn(out, f"{name}.conv2", stride=stride, padding=dilation, dilation=dilation)
            out = cn(out, f"{name}.conv3", relu=False)
            x = F.relu(out + shortcut)
        features[f"res{stage}"] = x

    def decoder(head: str) -> Tensor:
        # DeepLabV3PlusHead.layers + ASPP.forward (detectron2/layers/aspp.py)
        aspp = f"{head}.decoder.res5.project_conv"
        f5 = features["res5"]
        branches = [cn(f5, f"{aspp}.convs.0")]
        for i, rate in zip((1, 2, 3), (6, 12, 18)):
            branches.append(sep(f5, f"{aspp}.convs.{i}", 3, rate) if dsconv
                            else cn(f5, f"{aspp}.convs.{i}", padding=rate, dilation=rate))
        pooled = conv(F.avg_pool2d(f5, pool_kernel, stride=1), sd, f"{aspp}.convs.4.1")
        branches.append(F.interpolate(pooled, size=f5.shape[-2:], mode="bilinear", align_corners=False))
        y = cn(torch.cat(branches, 1), f"{aspp}.project")
        for tap in ("res3", "res2"):
            proj = cn(features[tap], f"{head}.decoder.{tap}.project_conv")
            y = F.interpolate(y, size=proj.shape[-2:], mode="bilinear", align_corners=False)
            y = tower(torch.cat([proj, y], 1), f"{head}.decoder.{tap}.fuse_conv")
        return y

    semantic = conv(tower(decoder("sem_seg_head"), "sem_seg_head.head"), sd, "sem_seg_head.predictor", relu=False)
    instance = decoder("ins_embed_head")
    center_tower = cn(cn(instance, "ins_embed_head.center_head.0", padding=1), "ins_embed_head.center_head.1", padding=1)
    center = conv(center_tower, sd, "ins_embed_head.center_predictor", relu=False)
    offset = conv(tower(instance, "ins_embed_head.offset_head"), sd, "ins_embed_head.offset_predictor", relu=False)

    def up(t: Tensor) -> Tensor:
        return F.interpolate(t, scale_factor=4, mode="bilinear", align_corners=False)[..., :height, :width]

    return {"semantic": up(semantic), "center": up(center), "offset": up(offset) * 4}


# ---------------------------------------------------------------------------------------------------
# bowenc0221/panoptic-deeplab (segmentation/model)
# ---------------------------------------------------------------------------------------------------

BC_BLOCKS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}
# DECODER.IN_CHANNELS and PANOPTIC_DEEPLAB.LOW_LEVEL_CHANNELS of the configs (res5; res4, res3, res2 or, for
# MobileNetV2, layer_18; layer_14, layer_7, layer_4)
BC_CHANNELS = {"resnet50": (2048, (1024, 512, 256)), "resnet101": (2048, (1024, 512, 256)),
               "mobilenet_v2": (320, (96, 32, 24)), "xception65": (2048, (728, 728, 256)),
               "hrnet48": (384, (192, 96, 48))}
# segmentation/config/hrnet_config.py HRNET_48: (NUM_MODULES, NUM_CHANNELS) of STAGE2..4, 4 BASIC blocks per branch
HRNET48_STAGES = ((1, (48, 96)), (4, (48, 96, 192)), (3, (48, 96, 192, 384)))
# Xception65.__init__ (segmentation/model/backbone/xception.py) at os32: channel_list, stride, skip type, relu_first
XCEPTION65_BLOCKS = ([([64, 128, 128, 128], 2, "conv", True), ([128, 256, 256, 256], 2, "conv", True),
                      ([256, 728, 728, 728], 2, "conv", True)] + [([728] * 4, 1, "sum", True)] * 16
                     + [([728, 728, 1024, 1024], 2, "conv", True), ([1024, 1536, 1536, 2048], 1, "none", False)])
# MobileNetV2's inverted_residual_setting (t, c, n, s)
MNV2_SETTING = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1)]


def _mnv2_blocks() -> list[tuple[int, int, int, int]]:
    """(in, out, stride, expand ratio) of features.1 .. features.17."""
    blocks, cin = [], 32
    for t, c, n, s in MNV2_SETTING:
        for i in range(n):
            blocks.append((cin, c, s if i == 0 else 1, t))
            cin = c
    return blocks


def bc_shapes(backbone: str, num_classes: int) -> Shapes:
    """The state dict of ``PanopticDeepLab`` with the R50/R101-os32 configs (``nn.Sequential`` indices)."""
    s: Shapes = {}

    def seq(name: str, cin: int, cout: int, k: int, groups: int = 1) -> None:  # Sequential(conv, BN, ReLU)
        conv_shapes(s, f"{name}.0", cin, cout, k, groups=groups, norm=f"{name}.1")

    def sep(name: str, cin: int, cout: int) -> None:  # stacked_conv(depthwise_separable_conv, num_stack=1)
        seq(f"{name}.0.0", cin, cin, 5, groups=cin)
        conv_shapes(s, f"{name}.0.1", cin, cout, 1, norm=f"{name}.0.2")

    if backbone == "hrnet48":
        _hrnet48_shapes(s)
    elif backbone == "xception65":
        conv_shapes(s, "backbone.conv1", 3, 32, 3, norm="backbone.bn1")
        conv_shapes(s, "backbone.conv2", 32, 64, 3, norm="backbone.bn2")
        for b, (channels, _, skip, _) in enumerate(XCEPTION65_BLOCKS, start=1):
            for j in (1, 2, 3):
                layers = f"backbone.block{b}.sep_conv{j}.block"
                conv_shapes(s, f"{layers}.depthwise", channels[j - 1], channels[j - 1], 3, groups=channels[j - 1],
                            norm=f"{layers}.bn_depth")
                conv_shapes(s, f"{layers}.pointwise", channels[j - 1], channels[j], 1, norm=f"{layers}.bn_point")
            if skip == "conv":
                conv_shapes(s, f"backbone.block{b}.conv", channels[0], channels[3], 1, norm=f"backbone.block{b}.bn")
    elif backbone == "mobilenet_v2":
        # segmentation/model/backbone/mobilenet.py: features.0 = ConvBNReLU(3, 32, stride 2), then the
        # InvertedResidual blocks of inverted_residual_setting (no last 1x1 conv)
        seq("backbone.features.0", 3, 32, 3)
        for i, (cin, cout, _, t) in enumerate(_mnv2_blocks(), start=1):
            name, hidden = f"backbone.features.{i}.conv", cin * t
            if t != 1:
                seq(f"{name}.0", cin, hidden, 1)
            dw = f"{name}.{int(t != 1)}"
            seq(dw, hidden, hidden, 3, groups=hidden)
            conv_shapes(s, f"{name}.{int(t != 1) + 1}", hidden, cout, 1, norm=f"{name}.{int(t != 1) + 2}")
    else:
        # TorchVision ResNet (segmentation/model/backbone/resnet.py), no fc
        conv_shapes(s, "backbone.conv1", 3, 64, 7, norm="backbone.bn1")
        cin = 64
        for stage, blocks in enumerate(BC_BLOCKS[backbone], start=1):
            width = 64 * 2 ** (stage - 1)
            for j in range(blocks):
                name = f"backbone.layer{stage}.{j}"
                conv_shapes(s, f"{name}.conv1", cin, width, 1, norm=f"{name}.bn1")
                conv_shapes(s, f"{name}.conv2", width, width, 3, norm=f"{name}.bn2")
                conv_shapes(s, f"{name}.conv3", width, width * 4, 1, norm=f"{name}.bn3")
                if j == 0:
                    conv_shapes(s, f"{name}.downsample.0", cin, width * 4, 1, norm=f"{name}.downsample.1")
                cin = width * 4
    high, taps = BC_CHANNELS[backbone]
    for branch, projections, channels in (("semantic_decoder", (128, 64, 32), 256),
                                          ("instance_decoder", (64, 32, 16), 128)):
        aspp = f"decoder.{branch}.aspp"
        seq(f"{aspp}.convs.0", high, 256, 1)
        for i in (1, 2, 3):
            seq(f"{aspp}.convs.{i}", high, 256, 3)
        conv_shapes(s, f"{aspp}.convs.4.aspp_pooling.1", high, 256, 1)
        seq(f"{aspp}.project", 5 * 256, 256, 1)
        running = 256
        for i, (cin, proj) in enumerate(zip(taps, projections)):
            seq(f"decoder.{branch}.project.{i}", cin, proj, 1)
            sep(f"decoder.{branch}.fuse.{i}", running + proj, channels)
            running = channels
    for name, cin, head, cout in (("semantic_head.classifier.semantic", 256, 256, num_classes),
                                  ("instance_head.classifier.center", 128, 32, 1),
                                  ("instance_head.classifier.offset", 128, 32, 2)):
        sep(f"decoder.{name}.0", cin, head)
        conv_shapes(s, f"decoder.{name}.1", head, cout, 1, bias=True)
    return s


def _resnet_features(sd: State, x: Tensor, backbone: str) -> dict[str, Tensor]:
    """TorchVision's ResNet (segmentation/model/backbone/resnet.py) at os32: res2 .. res5."""
    x = conv(x, sd, "backbone.conv1", norm="backbone.bn1", stride=2, padding=3)
    x = F.max_pool2d(x, 3, 2, 1)
    features = {}
    for stage, blocks in enumerate(BC_BLOCKS[backbone], start=1):
        for j in range(blocks):
            name = f"backbone.layer{stage}.{j}"
            stride = 2 if j == 0 and stage > 1 else 1
            identity = x
            if j == 0:
                identity = conv(x, sd, f"{name}.downsample.0", norm=f"{name}.downsample.1", relu=False, stride=stride)
            out = conv(x, sd, f"{name}.conv1", norm=f"{name}.bn1")
            out = conv(out, sd, f"{name}.conv2", norm=f"{name}.bn2", stride=stride, padding=1)
            out = conv(out, sd, f"{name}.conv3", norm=f"{name}.bn3", relu=False)
            x = F.relu(out + identity)
        features[f"res{stage + 1}"] = x
    return features


def _hrnet48_shapes(s: Shapes) -> None:
    """HighResolutionNet.__init__ (segmentation/model/backbone/hrnet.py): stem, layer1 of 4 Bottlenecks,
    transitions, stages of HighResolutionModules (BasicBlock branches, fuse layers)."""
    conv_shapes(s, "backbone.conv1", 3, 64, 3, norm="backbone.bn1")
    conv_shapes(s, "backbone.conv2", 64, 64, 3, norm="backbone.bn2")
    cin = 64
    for j in range(4):
        name = f"backbone.layer1.{j}"
        conv_shapes(s, f"{name}.conv1", cin, 64, 1, norm=f"{name}.bn1")
        conv_shapes(s, f"{name}.conv2", 64, 64, 3, norm=f"{name}.bn2")
        conv_shapes(s, f"{name}.conv3", 64, 256, 1, norm=f"{name}.bn3")
        if j == 0:
            conv_shapes(s, f"{name}.downsample.0", 64, 256, 1, norm=f"{name}.downsample.1")
        cin = 256
    previous = [256]
    for stage, (modules, channels) in enumerate(HRNET48_STAGES, start=2):
        for i, width in enumerate(channels):  # _make_transition_layer
            name = f"backbone.transition{stage - 1}.{i}"
            if i < len(previous):
                if previous[i] != width:
                    conv_shapes(s, f"{name}.0", previous[i], width, 3, norm=f"{name}.1")
            else:
                conv_shapes(s, f"{name}.0.0", previous[-1], width, 3, norm=f"{name}.0.1")
        for m in range(modules):
            module = f"backbone.stage{stage}.{m}"
            for b, width in enumerate(channels):
                for k in range(4):
                    name = f"{module}.branches.{b}.{k}"
                    conv_shapes(s, f"{name}.conv1", width, width, 3, norm=f"{name}.bn1")
                    conv_shapes(s, f"{name}.conv2", width, width, 3, norm=f"{name}.bn2")
            for i, width in enumerate(channels):  # _make_fuse_layers
                for j, other in enumerate(channels):
                    name = f"{module}.fuse_layers.{i}.{j}"
                    if j > i:
                        conv_shapes(s, f"{name}.0", other, width, 1, norm=f"{name}.1")
                    for k in range(i - j):
                        out = width if k == i - j - 1 else other
                        conv_shapes(s, f"{name}.{k}.0", other, out, 3, norm=f"{name}.{k}.1")
        previous = list(channels)


def _hrnet48_features(sd: State, x: Tensor) -> dict[str, Tensor]:
    """HighResolutionNet.forward: res2 .. res5 = the four branches of stage 4; fusion upsamples bilinearly with
    aligned corners to the target branch's size (HighResolutionModule.forward)."""
    x = conv(x, sd, "backbone.conv1", norm="backbone.bn1", stride=2, padding=1)
    x = conv(x, sd, "backbone.conv2", norm="backbone.bn2", stride=2, padding=1)
    for j in range(4):
        name = f"backbone.layer1.{j}"
        identity = conv(x, sd, f"{name}.downsample.0", norm=f"{name}.downsample.1", relu=False) if j == 0 else x
        out = conv(x, sd, f"{name}.conv1", norm=f"{name}.bn1")
        out = conv(out, sd, f"{name}.conv2", norm=f"{name}.bn2", padding=1)
        x = F.relu(conv(out, sd, f"{name}.conv3", norm=f"{name}.bn3", relu=False) + identity)
    branches, previous = [x], [256]
    for stage, (modules, channels) in enumerate(HRNET48_STAGES, start=2):
        inputs = []
        for i, width in enumerate(channels):
            name = f"backbone.transition{stage - 1}.{i}"
            if i < len(previous):
                inputs.append(conv(branches[i], sd, f"{name}.0", norm=f"{name}.1", padding=1)
                              if previous[i] != width else branches[i])
            else:
                inputs.append(conv(branches[-1], sd, f"{name}.0.0", norm=f"{name}.0.1", stride=2, padding=1))
        branches = inputs
        for m in range(modules):
            module = f"backbone.stage{stage}.{m}"
            for b in range(len(channels)):
                y = branches[b]
                for k in range(4):
                    name = f"{module}.branches.{b}.{k}"
                    out = conv(y, sd, f"{name}.conv1", norm=f"{name}.bn1", padding=1)
                    y = F.relu(conv(out, sd, f"{name}.conv2", norm=f"{name}.bn2", relu=False, padding=1) + y)
                branches[b] = y
            fused = []
            for i in range(len(channels)):
                total = None
                for j in range(len(channels)):
                    name = f"{module}.fuse_layers.{i}.{j}"
                    if j == i:
                        term = branches[j]
                    elif j > i:
                        term = F.interpolate(conv(branches[j], sd, f"{name}.0", norm=f"{name}.1", relu=False),
                                             size=branches[i].shape[-2:], mode="bilinear", align_corners=True)
                    else:
                        term = branches[j]
                        for k in range(i - j):
                            term = conv(term, sd, f"{name}.{k}.0", norm=f"{name}.{k}.1", relu=k < i - j - 1,
                                        stride=2, padding=1)
                    total = term if total is None else total + term
                fused.append(F.relu(total))
            branches = fused
        previous = list(channels)
    return {f"res{i + 2}": b for i, b in enumerate(branches)}


def _xception65_features(sd: State, x: Tensor) -> dict[str, Tensor]:
    """Xception65.forward: res2 / res3 = sc2 of blocks 2 / 3 (before the third separable conv's leading ReLU),
    res4 = block19's output, res5 = block21's."""
    x = conv(x, sd, "backbone.conv1", norm="backbone.bn1", stride=2, padding=1)
    x = conv(x, sd, "backbone.conv2", norm="backbone.bn2", padding=1)
    features = {}
    for b, (channels, stride, skip, relu_first) in enumerate(XCEPTION65_BLOCKS, start=1):
        y = x
        for j in (1, 2, 3):
            sep = f"backbone.block{b}.sep_conv{j}.block"
            s = stride if j == 3 else 1
            if relu_first:  # SeparableConv2d: ReLU, depthwise, BN, pointwise, BN
                y = F.relu(y)
            y = conv(y, sd, f"{sep}.depthwise", norm=f"{sep}.bn_depth", relu=not relu_first, stride=s, padding=1,
                     groups=channels[j - 1])
            y = conv(y, sd, f"{sep}.pointwise", norm=f"{sep}.bn_point", relu=not relu_first)
            if j == 2 and b in (2, 3):
                features[f"res{b}"] = y
        if skip == "conv":
            y = y + conv(x, sd, f"backbone.block{b}.conv", norm=f"backbone.block{b}.bn", relu=False, stride=stride)
        elif skip == "sum":
            y = y + x
        x = y
        if b == 19:
            features["res4"] = x
    features["res5"] = x
    return features


def bc_forward(sd: State, image: Tensor, backbone: str) -> dict[str, Tensor]:
    """``BaseSegmentationModel.forward`` + ``PanopticDeepLab._upsample_predictions`` at os32, image ``[3, H, W]``
    in [0, 1] normalised with the configs' ImageNet mean/std."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    if backbone == "xception65":  # its config's DATASET.MEAN = STD = 0.5
        mean, std = torch.full((3, 1, 1), 0.5), torch.full((3, 1, 1), 0.5)
    x = ((image - mean) / std)[None]

    def seq(x: Tensor, name: str, **kw) -> Tensor:
        return conv(x, sd, f"{name}.0", norm=f"{name}.1", **kw)

    def sep(x: Tensor, name: str) -> Tensor:
        x = seq(x, f"{name}.0.0", padding=2, groups=x.shape[1])
        return conv(x, sd, f"{name}.0.1", norm=f"{name}.0.2")

    if backbone == "mobilenet_v2":  # MobileNetV2._forward_impl: layer_{i + 1} = output of features[i]; ReLU6
        x = conv(x, sd, "backbone.features.0.0", norm="backbone.features.0.1", relu=False, stride=2, padding=1)
        x, layers = x.clamp(0, 6), {}
        for i, (cin, cout, stride, t) in enumerate(_mnv2_blocks(), start=1):
            name, y = f"backbone.features.{i}.conv", x
            if t != 1:
                y = conv(y, sd, f"{name}.0.0", norm=f"{name}.0.1", relu=False).clamp(0, 6)
            dw = f"{name}.{int(t != 1)}"
            y = conv(y, sd, f"{dw}.0", norm=f"{dw}.1", relu=False, stride=stride, padding=1,
                     groups=y.shape[1]).clamp(0, 6)
            y = conv(y, sd, f"{name}.{int(t != 1) + 1}", norm=f"{name}.{int(t != 1) + 2}", relu=False)
            x = x + y if stride == 1 and cin == cout else y
            layers[f"layer_{i + 1}"] = x
        # DECODER.FEATURE_KEY layer_18, PANOPTIC_DEEPLAB.LOW_LEVEL_KEY layer_14, layer_7, layer_4
        features = {"res5": layers["layer_18"], "res4": layers["layer_14"], "res3": layers["layer_7"],
                    "res2": layers["layer_4"]}
    elif backbone == "xception65":
        features = _xception65_features(sd, x)
    elif backbone == "hrnet48":
        features = _hrnet48_features(sd, x)
    else:
        features = _resnet_features(sd, x, backbone)

    def decoder(branch: str) -> Tensor:
        aspp = f"decoder.{branch}.aspp"
        f5 = features["res5"]
        branches = [seq(f5, f"{aspp}.convs.0")]
        branches += [seq(f5, f"{aspp}.convs.{i}", padding=r, dilation=r) for i, r in zip((1, 2, 3), (3, 6, 9))]
        pooled = conv(F.adaptive_avg_pool2d(f5, 1), sd, f"{aspp}.convs.4.aspp_pooling.1")
        branches.append(F.interpolate(pooled, size=f5.shape[-2:], mode="bilinear", align_corners=True))
        y = seq(torch.cat(branches, 1), f"{aspp}.project")
        for i, tap in enumerate(("res4", "res3", "res2")):
            low = seq(features[tap], f"decoder.{branch}.project.{i}")
            y = F.interpolate(y, size=low.shape[-2:], mode="bilinear", align_corners=True)
            y = sep(torch.cat([y, low], 1), f"decoder.{branch}.fuse.{i}")
        return y

    def head(y: Tensor, name: str) -> Tensor:
        return conv(sep(y, f"decoder.{name}.0"), sd, f"decoder.{name}.1", relu=False)

    semantic = head(decoder("semantic_decoder"), "semantic_head.classifier.semantic")
    instance = decoder("instance_decoder")
    outputs = {"semantic": semantic, "center": head(instance, "instance_head.classifier.center"),
               "offset": head(instance, "instance_head.classifier.offset")}
    size = image.shape[-2:]
    result = {}
    for key, value in outputs.items():
        out = F.interpolate(value, size=size, mode="bilinear", align_corners=True)
        if key == "offset":
            out = out * ((size[0] - 1) // (value.shape[2] - 1))
        result[key] = out
    return result

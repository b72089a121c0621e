"""bowenc0221/panoptic-deeplab (the first author's PyTorch code, ``segmentation/``): ``.pth`` state dicts.

The architecture, from its sources (SPEC §1, §8.1, §9.10):

* backbones ``segmentation/model/backbone/resnet.py``: TorchVision ResNet-50/101 and ResNeXt-101 32x8d (the same
  modules and names as timm's ``resnet50``, ``resnet101``, ``resnext101_32x8d``), taps ``res2``..``res5``; the
  model-zoo configs run them at output stride 32 (``DILATION (False, False, False)``) with ASPP rates 3/6/9;
  ``mobilenet.py``: TorchVision's MobileNetV2 (ReLU6, width 1.0) without its last 1x1 conv, the ``features``
  outputs ``layer_N`` of block ``N - 1``; its config taps ``layer_14, layer_7, layer_4`` (strides 16, 8, 4) and runs
  ASPP on ``layer_18``: timm's ``mobilenetv2_100`` (``features_only`` taps the same blocks, symmetric padding), names
  mapped by :data:`MOBILENET_V2_STAGES`; ``xception.py``: its Xception-65 (taps before the ReLUs timm's
  ``xception65`` taps after, the middle flow's output as ``res4``, BN epsilon 1e-5): ``bc_xception65`` of timm's
  modules, with its config's own normalisation (``DATASET.MEAN = STD = 0.5``) and ``BN_MOMENTUM`` 0.001;
  ``hrnet.py``: HRNet-Semantic-Segmentation's HRNet-W48, stage 4's branches as ``res2`` .. ``res5`` (its
  "os4" config: ASPP on the stride-32 branch, taps at 16, 8, 4): ``bc_hrnet_w48``, timm's ``hrnet_w48`` modules
  and names with its bilinear aligned-corner fusion;
* decoder ``segmentation/model/decoder/panoptic_deeplab.py`` (``SinglePanopticDeepLabDecoder``): ASPP
  (``aspp.py``: standard 3x3s, image pooling = global pool, 1x1 conv **without bias or norm**, ReLU, dropout 0.5),
  then one stage per ``LOW_LEVEL_KEY`` (``res4, res3, res2`` at os32): 1x1 projection + BN + ReLU,
  ``interpolate(align_corners=True)``, concatenation ``[upsampled, projected]``, one 5x5 depthwise-separable conv
  (``conv_module.stacked_conv``); heads ``SinglePanopticDeepLabHead``: DSConv 5x5 then 1x1 with bias;
* outputs ``meta_arch/panoptic_deeplab.py`` ``_upsample_predictions``: bilinear ``align_corners=True`` to the input,
  offsets x ``(H_in - 1) // (H_out - 1)`` (= our per-axis ``(H_in - 1) / (H_out - 1)`` on its k*32+1 inputs);
* input RGB in [0, 1] normalised with ImageNet mean/std (``DATASET.MEAN``/``STD``), padded to 1025x2049 at test.

Files: ``final_state.pth`` (a plain state dict) or ``checkpoint.pth.tar`` (``{"start_iter", "state_dict",
"optimizer", "lr_scheduler"}``), as ``tools/train_net.py`` writes them and ``tools/test_net_single_core.py`` reads them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from panoptic_deeplab.config import ModelConfig, PostProcessConfig

from .common import ConversionError, KeyMap, as_tensor_dict, read_reference_file, strip_prefix, wrong_family_error

NAME = "bc"
TITLE = "bowenc0221/panoptic-deeplab"
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # DATASET.MEAN / STD of the configs
IMAGENET_STD = (0.229, 0.224, 0.225)
# panoptic_deeplab_X65_os32_cityscapes_lr_x10.yaml: DATASET.MEAN = STD = (0.5, 0.5, 0.5), BN_MOMENTUM 0.001.
XCEPTION_NORMALISATION = (0.5, 0.5, 0.5)
XCEPTION_BN_MOMENTUM = 0.001
# LOW_LEVEL_KEY of the configs: three taps at output stride 32, two (res3, res2) with a dilated res5.
TAPS_BY_COUNT = {3: ("res4", "res3", "res2"), 2: ("res3", "res2")}
STRIDE_OF_TAP = {"res2": 4, "res3": 8, "res4": 16}
# Blocks per timm stage of mobilenetv2_100 = n of MobileNetV2's inverted_residual_setting: features.1 .. 17.
MOBILENET_V2_STAGES = (1, 2, 3, 4, 3, 3, 1)


def read(path: Path) -> dict[str, Tensor]:
    """A plain state dict, or the ``state_dict`` of a resumable checkpoint (``test_net_single_core.py``)."""
    data = read_reference_file(path, TITLE)
    if not isinstance(data, dict):
        raise ConversionError(f"{path} is not a {TITLE} checkpoint: expected a state dict")
    state = data.get("state_dict", data)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        inner = data.get("model") if isinstance(data.get("model"), dict) else data  # D2 keeps its tensors there
        raise wrong_family_error(path, NAME, list(inner))
    state = strip_prefix(as_tensor_dict(state, str(path)), "module.")
    if "decoder.semantic_head.classifier.semantic.1.weight" not in state:
        raise wrong_family_error(path, NAME, state)
    return state


def backbone_name(state: dict[str, Tensor]) -> str:
    """MobileNetV2 from its ``features``; ResNet depth from the blocks of layer3 (6: 50, 23: 101); ResNeXt from
    the grouped 3x3 conv."""
    if any(k.startswith("backbone.stage4.") for k in state):
        widths = tuple(int(state[f"backbone.stage4.0.branches.{b}.0.conv1.weight"].shape[0])
                       for b in range(4) if f"backbone.stage4.0.branches.{b}.0.conv1.weight" in state)
        if widths != (48, 96, 192, 384):
            raise ConversionError(
                f"{TITLE} checkpoint: an HRNet backbone with branch widths {widths}, not HRNet-W48 "
                "(48, 96, 192, 384): only hrnet48 of its model zoo is supported"
            )
        return "bc_hrnet_w48"
    if any(k.startswith("backbone.block") for k in state):
        blocks = {int(k.split(".")[1].removeprefix("block")) for k in state if k.startswith("backbone.block")}
        last = state.get("backbone.block21.sep_conv3.block.pointwise.weight")
        if blocks != set(range(1, 22)) or last is None or tuple(last.shape) != (2048, 1536, 1, 1):
            raise ConversionError(
                f"{TITLE} checkpoint: an Xception backbone with {len(blocks)} blocks, not Xception-65 (21 blocks, a "
                "2048-channel last one): only xception65 of its model zoo is supported"
            )
        return "bc_xception65"
    if any(k.startswith("backbone.features.") for k in state):
        features = {int(k.split(".")[2]) for k in state if k.startswith("backbone.features.")}
        last = state.get("backbone.features.17.conv.2.weight")
        if features != set(range(18)) or last is None or tuple(last.shape) != (320, 960, 1, 1):
            raise ConversionError(
                f"{TITLE} checkpoint: a MobileNet backbone with {len(features)} feature blocks, not MobileNetV2 "
                "width 1.0 (18 blocks, a 320-channel last one): only mobilenet_v2 of its model zoo is supported"
            )
        return "mobilenetv2_100"
    blocks = {int(k.split(".")[2]) for k in state if k.startswith("backbone.layer3.")}
    if not blocks or "backbone.conv1.weight" not in state:
        raise ConversionError(
            f"{TITLE} checkpoint: the backbone is not a TorchVision ResNet (no backbone.conv1 / backbone.layer3), "
            "MobileNetV2, Xception-65 or HRNet; only the ResNet-50, ResNet-101, ResNeXt-101 32x8d, MobileNetV2, "
            "Xception-65 and HRNet-W48 models are supported"
        )
    depth = {6: 50, 23: 101}.get(max(blocks) + 1)
    conv2 = state["backbone.layer1.0.conv2.weight"]
    grouped = conv2.shape[1] != conv2.shape[0]
    if depth == 101 and grouped and tuple(conv2.shape) == (256, 8, 3, 3):
        return "resnext101_32x8d"
    if depth is not None and not grouped:
        return f"resnet{depth}"
    raise ConversionError(
        f"{TITLE} checkpoint: unsupported ResNet variant ({max(blocks) + 1} blocks in layer3, first 3x3 conv "
        f"{tuple(conv2.shape)}); supported: ResNet-50, ResNet-101, ResNeXt-101 32x8d"
    )


def _taps(state: dict[str, Tensor]) -> tuple[str, ...]:
    count = len({k.split(".")[3] for k in state if k.startswith("decoder.semantic_decoder.project.")})
    if count not in TAPS_BY_COUNT:
        raise ConversionError(f"{TITLE} checkpoint: {count} decoder stages; expected 2 or 3")
    return TAPS_BY_COUNT[count]


def model_config(state: dict[str, Tensor], num_classes: int, output_stride: int | None = None) -> ModelConfig:
    """The options that rebuild BC's network. ``output_stride`` defaults to the configs': 32 with three
    decoder stages, 16 (dilated res5) with two."""
    taps = _taps(state)
    if output_stride is None:
        output_stride = 32 if len(taps) == 3 else 16
    strides = tuple(STRIDE_OF_TAP[t] for t in taps)
    if strides[0] >= output_stride:
        raise ConversionError(f"{TITLE} checkpoint: taps {taps} need an output stride above {strides[0]}")

    def widths(branch: str) -> tuple[int, ...]:
        return tuple(int(state[f"decoder.{branch}.project.{i}.0.weight"].shape[0]) for i in range(len(taps)))

    backbone = backbone_name(state)
    return ModelConfig(
        backbone=backbone,
        pretrained=False,
        num_classes=num_classes,
        output_stride=output_stride,
        aspp_channels=int(state["decoder.semantic_decoder.aspp.project.0.weight"].shape[0]),
        aspp_rates={32: (3, 6, 9), 16: (6, 12, 18), 8: (12, 24, 36)}[output_stride],
        aspp_dropout=0.5,
        aspp_separable=False,
        aspp_pool_kernel=None,
        aspp_pool_conv="plain",
        low_level_strides=strides,
        decoder_fusion="dsconv",
        semantic_decoder_channels=int(state["decoder.semantic_decoder.fuse.0.0.1.weight"].shape[0]),
        semantic_low_level_channels=widths("semantic_decoder"),
        semantic_head_channels=int(state["decoder.semantic_head.classifier.semantic.1.weight"].shape[1]),
        instance_decoder_channels=int(state["decoder.instance_decoder.fuse.0.0.1.weight"].shape[0]),
        instance_low_level_channels=widths("instance_decoder"),
        instance_head_channels=int(state["decoder.instance_head.classifier.center.1.weight"].shape[1]),
        center_head="dsconv",
        offset_head="dsconv",
        concat_low_level_first=False,
        align_corners=True,
        bn_momentum=XCEPTION_BN_MOMENTUM if backbone == "bc_xception65" else 0.01,  # MODEL.BN_MOMENTUM
        bn_eps=1e-5,
    )


def postprocess_config(model_cfg: ModelConfig) -> PostProcessConfig:
    """``POST_PROCESSING`` of the Cityscapes configs (the only dataset of BC's model zoo)."""
    return PostProcessConfig(center_threshold=0.1, nms_kernel=7, top_k=200, stuff_area=2048)


def configs(state: dict[str, Tensor], num_classes: int, output_stride: int | None = None) -> tuple[ModelConfig, PostProcessConfig]:
    """The network's options and the published configs' post-processing."""
    model_cfg = model_config(state, num_classes, output_stride)
    return model_cfg, postprocess_config(model_cfg)


def num_classes_of(state: dict[str, Tensor]) -> int:
    if "decoder.instance_head.classifier.center.1.weight" not in state:
        raise ConversionError(f"{TITLE} checkpoint has no instance head (a semantic-only DeepLab model)")
    return int(state["decoder.semantic_head.classifier.semantic.1.weight"].shape[0])


def key_map(model: nn.Module, state: dict[str, Tensor]) -> KeyMap:
    """Our names -> BC's (``nn.Sequential`` indices of ``conv_module.py``, ``aspp.py``, the decoder)."""
    km = KeyMap()

    def conv_bn(ours: str, theirs: str) -> None:  # nn.Sequential(conv, BN, ReLU)
        km.conv_bn(ours, f"{theirs}.0", f"{theirs}.1")

    def separable(ours: str, theirs: str) -> None:
        # stacked_conv(num_stack=1) -> Sequential(depthwise_separable_conv) =
        # Sequential(Sequential(dw conv, BN, ReLU), pw conv, BN, ReLU)
        km.conv_bn(f"{ours}.depthwise", f"{theirs}.0.0.0", f"{theirs}.0.0.1")
        km.conv_bn(f"{ours}.pointwise", f"{theirs}.0.1", f"{theirs}.0.2")

    backbone = backbone_name(state)
    if backbone == "mobilenetv2_100":
        _mobilenet_v2_keys(km)
    elif backbone == "bc_xception65":
        _xception65_keys(km)
    else:  # TorchVision's ResNet and HRNet-Semantic-Segmentation's names are timm's.
        for key in model.backbone.body.state_dict():
            km.add(f"backbone.body.{key}", f"backbone.{key}")

    for branch in ("semantic_decoder", "instance_decoder"):
        aspp, theirs = f"{branch}.aspp", f"decoder.{branch}.aspp"
        for i in range(4):
            conv_bn(f"{aspp}.branches.{i}", f"{theirs}.convs.{i}")
        km.conv(f"{aspp}.branches.4.conv", f"{theirs}.convs.4.aspp_pooling.1")
        conv_bn(f"{aspp}.project", f"{theirs}.project")
        for i in range(len(model.semantic_decoder.project)):
            conv_bn(f"{branch}.project.{i}", f"decoder.{branch}.project.{i}")
            separable(f"{branch}.fuse.{i}", f"decoder.{branch}.fuse.{i}")

    for ours, theirs in (("semantic_head", "semantic_head.classifier.semantic"),
                         ("center_head", "instance_head.classifier.center"),
                         ("offset_head", "instance_head.classifier.offset")):
        separable(f"{ours}.tower", f"decoder.{theirs}.0")
        km.conv(f"{ours}.predictor", f"decoder.{theirs}.1", bias=True)

    xception = backbone == "bc_xception65"
    km.constants["pixel_mean"] = torch.tensor(XCEPTION_NORMALISATION if xception else IMAGENET_MEAN)
    km.constants["pixel_std"] = torch.tensor(XCEPTION_NORMALISATION if xception else IMAGENET_STD)
    return km


def _mobilenet_v2_keys(km: KeyMap) -> None:
    """timm ``mobilenetv2_100`` <- BC's ``features`` (``ConvBNReLU`` = Sequential(conv, BN, ReLU6);
    ``InvertedResidual.conv`` = [expand ConvBNReLU,] depthwise ConvBNReLU, 1x1 conv, BN)."""
    km.conv("backbone.body.conv_stem", "backbone.features.0.0")
    km.bn("backbone.body.bn1", "backbone.features.0.1")
    index = 1
    for stage, blocks in enumerate(MOBILENET_V2_STAGES):
        for block in range(blocks):
            ours, theirs = f"backbone.body.blocks.{stage}.{block}", f"backbone.features.{index}.conv"
            if stage == 0:  # expand ratio 1: timm's DepthwiseSeparableConv
                km.conv(f"{ours}.conv_dw", f"{theirs}.0.0")
                km.bn(f"{ours}.bn1", f"{theirs}.0.1")
                km.conv(f"{ours}.conv_pw", f"{theirs}.1")
                km.bn(f"{ours}.bn2", f"{theirs}.2")
            else:  # timm's InvertedResidual
                km.conv(f"{ours}.conv_pw", f"{theirs}.0.0")
                km.bn(f"{ours}.bn1", f"{theirs}.0.1")
                km.conv(f"{ours}.conv_dw", f"{theirs}.1.0")
                km.bn(f"{ours}.bn2", f"{theirs}.1.1")
                km.conv(f"{ours}.conv_pwl", f"{theirs}.2")
                km.bn(f"{ours}.bn3", f"{theirs}.3")
            index += 1


def _xception65_keys(km: KeyMap) -> None:
    """timm's ``xception65`` names (``bc_xception65``) <- BC's ``Xception65`` (``conv1``/``bn1``, ``conv2``/``bn2``,
    ``block{1..21}`` of ``sep_conv{1,2,3}.block.{depthwise, bn_depth, pointwise, bn_point}`` and a ``conv``/``bn``
    shortcut)."""
    for i in (1, 2):
        km.conv(f"backbone.body.stem.{i - 1}.conv", f"backbone.conv{i}")
        km.bn(f"backbone.body.stem.{i - 1}.bn", f"backbone.bn{i}")
    for block in range(1, 22):
        ours, theirs = f"backbone.body.blocks.{block - 1}", f"backbone.block{block}"
        for conv in (1, 2, 3):
            sep, layers = f"{ours}.stack.conv{conv}", f"{theirs}.sep_conv{conv}.block"
            km.conv(f"{sep}.conv_dw", f"{layers}.depthwise")
            km.bn(f"{sep}.bn_dw", f"{layers}.bn_depth")
            km.conv(f"{sep}.conv_pw", f"{layers}.pointwise")
            km.bn(f"{sep}.bn_pw", f"{layers}.bn_point")
        if block in (1, 2, 3, 20):  # skip_connection_type 'conv'
            km.conv(f"{ours}.shortcut.conv", f"{theirs}.conv")
            km.bn(f"{ours}.shortcut.bn", f"{theirs}.bn")


def architecture(state: dict[str, Tensor]) -> str:
    """A one-line name of the converted network, for messages and the checkpoint's record."""
    return f"{backbone_name(state)} with {len(_taps(state))} decoder stages"

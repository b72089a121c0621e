"""deeplab2's Panoptic-DeepLab (``google-research/deeplab2``): TF2 training checkpoints, read without TensorFlow.

Supported encoders: MobileNetV3-Small and -Large (``model/encoder/mobilenet.py``, rebuilt exactly by
:class:`~panoptic_deeplab.modeling.dl2_mobilenet.DeepLab2MobileNetV3`), ResNet-50, ResNet-50-Beta and
Wide-ResNet-41, SWideRNet-SAC-(1, 1, 1 / 3 / 4.5) (``model/encoder/axial_resnet_instances.py``, rebuilt by
:class:`~panoptic_deeplab.modeling.dl2_resnet.DeepLab2ResNet`). The rest of the network, from deeplab2's
sources (SPEC §1, §8.3):

* decoders ``PanopticDeepLabSingleDecoder`` (``model/decoder/panoptic_deeplab.py``): ASPP (``model/decoder/aspp.py``)
  of standard convs, a pooling branch of global average pooling (the eval crop's feature size: global at full
  resolution) + 1x1 conv + BN + ReLU; per tap (``res3`` then ``res2``) a 1x1 projection, bilinear
  ``align_corners=True`` upsampling, ``concat([upsampled, projected])`` and one 5x5 ``SeparableConv2DSame`` with
  BN + activation after both halves; widths of every part are read from the checkpoint's shapes, per branch;
* heads ``PanopticDeepLabSingleHead``: a 5x5 separable conv, then ``final_conv`` 1x1 with bias;
* ``DeepLab.call``: input ``x / 127.5 - 1`` (our ``pixel_mean = pixel_std = 0.5`` on [0, 1]); outputs at stride 4
  resized with ``align_corners=True`` to the input size, offsets scaled by ``(H - 1) / (h - 1)`` per axis
  (``model/utils.py``, ``resize_and_rescale_offsets``).

COCO heads have 134 channels, channel 0 for deeplab2's void (its COCO ignore label 0): kept, with
``ModelConfig.semantic_void_channel`` (argmax there = void, as in deeplab2's merge), and COCO images are resized and
padded to 641x641 as deeplab2 evaluates them (``ModelConfig.inference_size``).

What no checkpoint records (BN epsilon, atrous rates, post-processing, eval resizing) comes from the published
configs (``configs/{cityscapes,coco}/panoptic_deeplab/*.textproto``), looked up by the published file name or by
the output stride.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from panoptic_deeplab.config import ModelConfig, PostProcessConfig
from panoptic_deeplab.modeling.dl2_mobilenet import ConvBNAct
from panoptic_deeplab.modeling.dl2_resnet import DL2_RESNET_SPECS, DeepLab2ResNet, SwitchableConvBNAct

from .common import (
    ConversionError,
    KeyMap,
    file_name_of,
    guess_family,
    read_reference_file,
)
from .textproto import field, read_textproto
from .tf_checkpoint import (
    VARIABLE_SUFFIX,
    TFCheckpointError,
    names_tf_checkpoint,
    read_tf_checkpoint,
)

NAME = "dl2"
TITLE = "deeplab2"

# train_lib.py saves these beside the model (tf.train.Checkpoint(global_step, optimizer, **checkpoint_items)):
# skipped deliberately. Every other tensor must be used.
SKIPPED_PREFIXES = ("_CHECKPOINTABLE_OBJECT_GRAPH", "save_counter/", "global_step/", "optimizer/")
OPTIMIZER_SLOT = "/.OPTIMIZER_SLOT/"
# tf.keras.layers.BatchNormalization variable names -> torch's.
BN_NAMES = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"}
MOBILENET_BLOCKS = {13: "dl2_mobilenetv3_small", 17: "dl2_mobilenetv3_large"}  # len(block_specs)
# Our encoder name -> deeplab2's backbone.name and the name people know it by.
ENCODERS = {
    "dl2_mobilenetv3_small": ("mobilenet_v3_small", "MobileNetV3-Small"),
    "dl2_mobilenetv3_large": ("mobilenet_v3_large", "MobileNetV3-Large"),
    "dl2_resnet50": ("resnet50", "ResNet-50"),
    "dl2_resnet50_beta": ("resnet50_beta", "ResNet-50-Beta"),
    "dl2_wide_resnet41": ("wide_resnet41", "Wide-ResNet-41"),
    "dl2_swidernet_sac_1_1_1": ("swidernet", "SWideRNet-SAC-(1, 1, 1)"),
    "dl2_swidernet_sac_1_1_3": ("swidernet", "SWideRNet-SAC-(1, 1, 3)"),
    "dl2_swidernet_sac_1_1_4.5": ("swidernet", "SWideRNet-SAC-(1, 1, 4.5)"),
}
# Sub-layers of AxialResNet's blocks that DeepLab2ResNet builds; any other (squeeze-and-excite, axial attention)
# means a config this converter does not rebuild. SAC_PARTS: switchable atrous convolution with global context.
SAC_PARTS = {"_pre_global_context", "_post_global_context", "convolution", "_switch"}
RESNET_PARTS = {"_stem", "_conv1_bn_act", "_conv2_bn_act", "_conv3_bn", "_conv2_bn", "_shortcut", "_conv",
                "_batch_norm", *SAC_PARTS}


@dataclass(frozen=True)
class ConfigFacts:
    """What a deeplab2 config sets and its checkpoint does not record."""

    output_stride: int
    bn_eps: float  # trainer_options.solver_options.batchnorm_epsilon (default 0.001, trainer.proto)
    aspp_rates: tuple[int, int, int]  # decoder.atrous_rates
    nms_kernel: int  # evaluator_options.nms_kernel
    top_k: int = 400  # evaluator_options.keep_k_centers (default 400, evaluator.proto)
    stuff_area: int = 2048  # evaluator_options.stuff_area_limit
    center_threshold: float = 0.1  # evaluator_options.center_score_threshold
    backbone: str | None = None  # model_options.backbone.name, where a .textproto tells it
    # eval_dataset_options.crop_size where min_resize_value = max_resize_value = it (COCO: 641x641)
    inference_size: tuple[int, int] | None = None


# configs/cityscapes/panoptic_deeplab/mobilenet_v3_{small,large}_os{16,32}.textproto: the os16 ones set
# batchnorm_epsilon 1e-5 and nms_kernel 7, the os32 ones keep epsilon's default 1e-3 and use nms_kernel 13.
MOBILENET_FACTS = {
    16: ConfigFacts(output_stride=16, bn_eps=1e-5, aspp_rates=(6, 12, 18), nms_kernel=7),
    32: ConfigFacts(output_stride=32, bn_eps=1e-3, aspp_rates=(3, 6, 9), nms_kernel=13),
}
# The residual encoders' Cityscapes configs keep epsilon's default 1e-3 and use nms_kernel 13:
# resnet50_os32_merge_with_pure_tf_func, resnet50_beta_os32 (os32) and wide_resnet41_os16 (os16).
RESNET_FACTS = {
    16: ConfigFacts(output_stride=16, bn_eps=1e-3, aspp_rates=(6, 12, 18), nms_kernel=13),
    32: ConfigFacts(output_stride=32, bn_eps=1e-3, aspp_rates=(3, 6, 9), nms_kernel=13),
}
# configs/coco/panoptic_deeplab/resnet50{,_beta}_os{16,32}.textproto: epsilon 1e-3, NMS kernel 41, stuff area 4096,
# eval images resized to a long side of 641 and padded to 641x641 (crop_size = min/max_resize_value = 641).
COCO_FACTS = {
    stride: replace(facts, nms_kernel=41, stuff_area=4096, inference_size=(641, 641))
    for stride, facts in RESNET_FACTS.items()
}
# data/dataset.py COCO_PANOPTIC_INFORMATION: 134 classes with ignore_label 0, i.e. void is class 0 of deeplab2's
# COCO labels (data/coco_constants.py get_id_mapping: category i of _COCO_META, in id order, is class i + 1), so
# its COCO heads have a void channel before the 133 categories.
VOID_FIRST_HEADS = {134: 133}
# g3doc/projects/panoptic_deeplab.md: the published checkpoints this converter reads, by file name.
PUBLISHED = {
    "mobilenet_v3_small_os16_panoptic_deeplab_cityscapes_dwo.tar.gz":
        replace(MOBILENET_FACTS[16], backbone="mobilenet_v3_small"),
    "mobilenet_v3_large_os16_panoptic_deeplab_cityscapes_dwo.tar.gz":
        replace(MOBILENET_FACTS[16], backbone="mobilenet_v3_large"),
    "resnet50_os32_panoptic_deeplab_cityscapes_trainfine.tar.gz": replace(RESNET_FACTS[32], backbone="resnet50"),
    "resnet50_beta_os32_panoptic_deeplab_cityscapes_trainfine.tar.gz":
        replace(RESNET_FACTS[32], backbone="resnet50_beta"),
    "wide_resnet41_os16_panoptic_deeplab_cityscapes_trainfine.tar.gz":
        replace(RESNET_FACTS[16], backbone="wide_resnet41"),
    **{f"swidernet_sac_1_1_{layers}_os16_panoptic_deeplab_cityscapes_trainfine.tar.gz":
       replace(RESNET_FACTS[16], backbone="swidernet") for layers in ("1", "3", "4.5")},
    "resnet50_os32_panoptic_deeplab_coco_train_2.tar.gz": replace(COCO_FACTS[32], backbone="resnet50"),
    "resnet50beta_os32_panoptic_deeplab_coco_train.tar.gz": replace(COCO_FACTS[32], backbone="resnet50_beta"),
    "resnet50_os16_panoptic_deeplab_coco_train.tar.gz": replace(COCO_FACTS[16], backbone="resnet50"),
    "resnet50beta_os16_panoptic_deeplab_coco_train.tar.gz": replace(COCO_FACTS[16], backbone="resnet50_beta"),
}


def is_model_tensor(name: str) -> bool:
    return not name.startswith(SKIPPED_PREFIXES) and OPTIMIZER_SLOT not in name


def read(path: Path) -> dict[str, Tensor]:
    """The model's tensors (``.ATTRIBUTES/VARIABLE_VALUE`` dropped from the names) of a ``.tar.gz``, a folder or
    a ``ckpt-N`` prefix."""
    if path.is_file() and not names_tf_checkpoint(path):
        _refuse_other_family(path)
    try:
        tensors = read_tf_checkpoint(path, is_model_tensor)
    except TFCheckpointError as exc:
        raise ConversionError(str(exc)) from None
    state = {name.removesuffix(VARIABLE_SUFFIX): value for name, value in tensors.items()}
    if "semantic_last_layer/kernel" not in state:
        raise ConversionError(f"{path} is not a deeplab2 Panoptic-DeepLab checkpoint (no semantic_last_layer)")
    if "instance_center_head_last_layer/kernel" not in state:
        raise ConversionError(f"{path} is a deeplab2 checkpoint without instance heads (a semantic-only DeepLab)")
    return state


def _refuse_other_family(path: Path) -> None:
    """A torch or pickle file given to ``--from dl2``: say which reference it looks like."""
    data = read_reference_file(path, TITLE)
    keys = list(data.get("model", data)) if isinstance(data, dict) else []
    family = guess_family(keys)
    hint = f": it looks like a {'detectron2' if family == 'd2' else 'bowenc0221'} checkpoint (--from {family})" \
        if family in ("d2", "bc") else ""
    raise ConversionError(f"{path} is not a deeplab2 TF checkpoint (.tar.gz, folder or ckpt-N prefix){hint}")


def _head_channels(state: dict[str, Tensor]) -> int:
    return int(state["semantic_last_layer/kernel"].shape[3])


def num_classes_of(state: dict[str, Tensor]) -> int:
    """The dataset's classes: the semantic head's channels, less the void channel of deeplab2's COCO heads."""
    channels = _head_channels(state)
    return VOID_FIRST_HEADS.get(channels, channels)


def _encoder(state: dict[str, Tensor]) -> str:
    """Our name of the checkpoint's encoder, told by its layer names (MobileNet's ``_blocks/N``, AxialResNet's
    ``_stem`` and ``_stageN/_blockM``) and its stem kernel."""
    if any(k.startswith("encoder/_blocks/") for k in state):
        blocks = {int(k.split("/")[2]) for k in state if k.startswith("encoder/_blocks/")}
        if len(blocks) in MOBILENET_BLOCKS:
            return MOBILENET_BLOCKS[len(blocks)]
        raise ConversionError(f"{TITLE} checkpoint: unsupported encoder ({len(blocks)} MobileNet blocks); "
                              f"supported: {_supported()}")
    parts = sorted({k.split("/")[1] for k in state if k.startswith("encoder/")})
    if "_stem" not in parts:
        raise ConversionError(f"{TITLE} checkpoint: unsupported encoder (parts {parts[:4]}); supported: {_supported()}")
    blocks = tuple(len({k.split("/")[2] for k in state if k.startswith(f"encoder/{stage}/")})
                   for stage in parts if stage.startswith("_stage"))
    sac_stages = sorted({k.split("/")[1] for k in state if k.startswith("encoder/") and SAC_PARTS & set(k.split("/"))})
    if "encoder/_stem/_conv1_bn_act/_conv/kernel" in state:
        name = "dl2_resnet50_beta"
    elif "_stage1" in parts and sac_stages:
        if sac_stages != ["_stage5"]:
            raise ConversionError(f"{TITLE} checkpoint: switchable atrous convolution in {sac_stages}; the "
                                  "SWideRNet-SAC configs (use_sac_beyond_stride 32) have it in _stage5 only")
        by_blocks = {DL2_RESNET_SPECS[n.removeprefix("dl2_")].num_blocks: n for n in ENCODERS if "swidernet" in n}
        name = by_blocks.get(blocks, "dl2_swidernet_sac_1_1_1")
    elif "_stage1" in parts:
        name = "dl2_wide_resnet41"
    else:
        name = "dl2_resnet50"
    unknown = sorted({layer for k in state if k.startswith("encoder/") and (layer := _unbuilt_layer(k))})
    if unknown:
        raise ConversionError(
            f"{TITLE} checkpoint: its residual encoder has layers {unknown} (squeeze-and-excite or axial "
            f"attention), which are not rebuilt; supported: {_supported()}"
        )
    expected = DL2_RESNET_SPECS[name.removeprefix("dl2_")].num_blocks
    if blocks != expected:
        raise ConversionError(
            f"{TITLE} checkpoint: a {ENCODERS[name][1]}-like encoder with {blocks} blocks per stage, not {expected} "
            f"(layer multipliers of no published config are not supported); supported: {_supported()}"
        )
    return name


def _unbuilt_layer(key: str) -> str | None:
    """The outermost layer of an encoder tensor's path that ``DeepLab2ResNet`` does not build, if any."""
    return next((p for p in key.split("/")[1:-1] if p not in RESNET_PARTS and not p.startswith(("_stage", "_block"))),
                None)


def _supported() -> str:
    return ", ".join(title for _, title in ENCODERS.values())


def _is_mobilenet(encoder: str) -> bool:
    return encoder.startswith("dl2_mobilenet")


def facts_from_textproto(path: str | os.PathLike[str]) -> ConfigFacts:
    """The facts of a deeplab2 ``.textproto`` config, with the proto files' defaults where it is silent
    (``model.proto`` output_stride 32, ``trainer.proto`` batchnorm_epsilon 0.001, ``evaluator.proto``
    nms_kernel 3, keep_k_centers 400, stuff_area_limit 0, center_score_threshold 0.1)."""
    if not Path(path).is_file():
        raise ConversionError(f"config {path} does not exist (a deeplab2 .textproto)")
    fields = read_textproto(path)
    backbone = str(field(fields, "model_options.backbone.name", "resnet50"))
    if backbone not in {name for name, _ in ENCODERS.values()}:
        raise ConversionError(f"{path}: backbone {backbone!r} is not supported ({_supported()} are)")
    rates = field(fields, "model_options.decoder", {}).get("atrous_rates", [])  # type: ignore[union-attr]
    output_stride = int(field(fields, "model_options.backbone.output_stride", 32))  # type: ignore[arg-type]
    if len(rates) != 3:
        raise ConversionError(f"{path}: model_options.decoder needs three atrous_rates, found {rates}")
    return ConfigFacts(
        inference_size=_inference_size(path, fields),
        backbone=backbone,
        output_stride=output_stride,
        bn_eps=float(field(fields, "trainer_options.solver_options.batchnorm_epsilon", 0.001)),  # type: ignore[arg-type]
        aspp_rates=tuple(int(r) for r in rates),  # type: ignore[arg-type]
        nms_kernel=int(field(fields, "evaluator_options.nms_kernel", 3)),  # type: ignore[arg-type]
        top_k=int(field(fields, "evaluator_options.keep_k_centers", 400)),  # type: ignore[arg-type]
        stuff_area=int(field(fields, "evaluator_options.stuff_area_limit", 0)),  # type: ignore[arg-type]
        center_threshold=float(field(fields, "evaluator_options.center_score_threshold", 0.1)),  # type: ignore[arg-type]
    )


def _inference_size(path: str | os.PathLike[str], fields: dict[str, list]) -> tuple[int, int] | None:
    """deeplab2's eval resizing (``input_preprocessing.preprocess_image_and_label``): none with resize values 0
    (the image is only padded), else ``resize_to_range(min_resize_value, max_resize_value)``; the inference here
    rebuilds the case min = max = ``crop_size`` (COCO's 641)."""
    options = field(fields, "eval_dataset_options", {})
    crop = [int(v) for v in options.get("crop_size", [])]  # type: ignore[union-attr]
    low = [int(v) for v in options.get("min_resize_value", [])]  # type: ignore[union-attr]
    high = [int(v) for v in options.get("max_resize_value", [])]  # type: ignore[union-attr]
    if not any(low + high):
        return None
    if len(crop) == 2 and all(len(v) in (1, 2) and (v * 2)[:2] == crop for v in (low, high)):
        return crop[0], crop[1]
    raise ConversionError(
        f"{path}: eval_dataset_options resizes with min_resize_value {low} and max_resize_value {high} to a crop of "
        f"{crop}; only min = max = crop_size (deeplab2's COCO configs) or no resizing is rebuilt"
    )


def published_facts(input_name: str) -> tuple[str, ConfigFacts] | None:
    """The name that tells a published checkpoint and its facts: the archive's name (path or URL), or a folder of
    the archive's name without its suffix (as given, or holding the ``ckpt-N`` prefix given)."""
    parent = input_name.rstrip("/").rsplit("/", 1)[0] if "/" in input_name.rstrip("/") else ""
    for name in (file_name_of(input_name), file_name_of(parent) if parent else ""):
        for published, facts in PUBLISHED.items():
            if name and name in (published, published.removesuffix(".tar.gz")):
                return name, facts
    return None


def config_facts(input_name: str, output_stride: int | None, config: str | os.PathLike[str] | None,
                 encoder: str, coco: bool = False) -> ConfigFacts:
    """The facts of the checkpoint's config: from ``config`` (a ``.textproto``), else by the published file
    name, else those of deeplab2's configs of the ``encoder``'s family at the given output stride (its COCO
    configs for a ``coco`` head)."""
    if config is not None:
        facts = facts_from_textproto(config)
        if output_stride is not None and output_stride != facts.output_stride:
            raise ConversionError(f"--output-stride {output_stride} contradicts {config} ({facts.output_stride})")
        if facts.backbone != ENCODERS[encoder][0]:
            raise ConversionError(f"{config} is a config of backbone {facts.backbone!r}, but the checkpoint holds a "
                                  f"{ENCODERS[encoder][1]} ({ENCODERS[encoder][0]!r})")
        return facts
    mobilenet = _is_mobilenet(encoder)
    family, table = ("MobileNetV3", MOBILENET_FACTS) if mobilenet else ("residual", RESNET_FACTS)
    if coco:
        if mobilenet:
            raise ConversionError("deeplab2 has no COCO config of a MobileNetV3: give --config (its .textproto)")
        family, table = "residual COCO", COCO_FACTS
    if output_stride is not None:
        if output_stride not in table:
            raise ConversionError(f"deeplab2's {family} configs use output stride 16 or 32, not {output_stride}: "
                                  "give --config (its .textproto) for another")
        return table[output_stride]
    published = published_facts(input_name)
    if published is not None:
        name, facts = published
        if facts.backbone != ENCODERS[encoder][0]:
            raise ConversionError(f"{name} is named as deeplab2's published {facts.backbone} checkpoint, but it "
                                  f"holds a {ENCODERS[encoder][1]}: give --config or --output-stride")
        if (facts.inference_size is not None) != coco:
            named, holds = ("COCO", "Cityscapes-like") if facts.inference_size else ("Cityscapes", "COCO")
            raise ConversionError(f"{name} is named as a deeplab2 {named} checkpoint, but its semantic head is "
                                  f"{holds}: give --config or --output-stride")
        return facts
    raise ConversionError(
        f"{file_name_of(input_name)} is not a published deeplab2 file, and a checkpoint does not record its output "
        "stride: give --config (its .textproto) or --output-stride 16 or 32 (backbone.output_stride of its config)"
    )


def _out(state: dict[str, Tensor], name: str) -> int:
    return int(state[name].shape[3])  # HWIO kernels


def configs(
    state: dict[str, Tensor], num_classes: int, output_stride: int | None = None, input_name: str = "",
    config: str | os.PathLike[str] | None = None,
) -> tuple[ModelConfig, PostProcessConfig]:
    """The network's options (widths from the shapes) and the post-processing, the rest from :func:`config_facts`."""
    facts = config_facts(input_name, output_stride, config, _encoder(state), _head_channels(state) in VOID_FIRST_HEADS)
    post = PostProcessConfig(center_threshold=facts.center_threshold, nms_kernel=facts.nms_kernel,
                             top_k=facts.top_k, stuff_area=facts.stuff_area)
    return model_config(state, num_classes, facts), post


def model_config(state: dict[str, Tensor], num_classes: int, facts: ConfigFacts) -> ModelConfig:
    """The options that rebuild deeplab2's network: widths from the shapes, the rest from ``facts``."""
    taps = sorted({k.split("/")[1] for k in state if k.startswith("semantic_decoder/_low_level_conv")})
    if taps != ["_low_level_conv1", "_low_level_conv2"]:
        raise ConversionError(f"{TITLE} checkpoint: decoder taps {taps}; expected two (res3, res2)")

    def widths(branch: str) -> tuple[int, ...]:
        return tuple(_out(state, f"{branch}/_low_level_conv{i}/_conv/kernel") for i in (1, 2))

    def pointwise(part: str) -> int:
        return _out(state, f"{part}/_conv1_bn_act/_pointwise/_conv/kernel")

    center, offset = pointwise("instance_center_head_without_last_layer"), \
        pointwise("instance_regression_head_without_last_layer")
    if center != offset:
        raise ConversionError(f"{TITLE} checkpoint: center head {center} and offset head {offset} channels differ")
    aspp = "_aspp/_proj_conv_bn_act/_conv/kernel"
    return ModelConfig(
        backbone=_encoder(state),
        pretrained=False,
        num_classes=num_classes,
        # deeplab2 keeps its void channel at inference: a pixel whose argmax is void is void (COCO heads).
        semantic_void_channel=_head_channels(state) == num_classes + 1,
        output_stride=facts.output_stride,
        aspp_channels=_out(state, f"semantic_decoder/{aspp}"),
        instance_aspp_channels=_out(state, f"instance_decoder/{aspp}"),
        aspp_rates=facts.aspp_rates,
        aspp_dropout=0.1,
        aspp_separable=False,
        aspp_pool_kernel=None,
        aspp_pool_conv="bn",
        low_level_strides=(8, 4),
        decoder_fusion="dsconv",
        semantic_decoder_channels=pointwise("semantic_decoder/_fusion_conv1"),
        semantic_low_level_channels=widths("semantic_decoder"),
        semantic_head_channels=pointwise("semantic_head_without_last_layer"),
        instance_decoder_channels=pointwise("instance_decoder/_fusion_conv1"),
        instance_low_level_channels=widths("instance_decoder"),
        instance_head_channels=center,
        center_head="dsconv",
        offset_head="dsconv",
        concat_low_level_first=False,
        align_corners=True,
        bn_momentum=0.01,  # Keras momentum 0.99 (batchnorm_momentum)
        bn_eps=facts.bn_eps,
        inference_size=facts.inference_size,
        init="he",
    )


def _conv_kernel(kernel: Tensor) -> Tensor:
    return kernel.permute(3, 2, 0, 1).contiguous()  # HWIO -> OIHW


def _depthwise_kernel(kernel: Tensor) -> Tensor:
    return kernel.permute(2, 3, 0, 1).contiguous()  # (kh, kw, C, 1) -> (C, 1, kh, kw)


def key_map(model: nn.Module, state: dict[str, Tensor]) -> KeyMap:
    """Our names -> deeplab2's Keras attribute paths (``checkpoint_items`` of ``DeepLab`` and the decoder)."""
    km = KeyMap()

    def bn(ours: str, theirs: str) -> None:
        for name, keras in BN_NAMES.items():
            km.add(f"{ours}.{name}", f"{theirs}/{keras}")

    def conv_bn(ours: str, theirs: str) -> None:  # Conv2DSame with use_bn
        km.add(f"{ours}.conv.weight", f"{theirs}/_conv/kernel", _conv_kernel)
        bn(f"{ours}.bn", f"{theirs}/_batch_norm")

    def separable(ours: str, theirs: str) -> None:  # StackedConv2DSame(num_layers=1) of SeparableConv2DSame
        block = f"{theirs}/_conv1_bn_act"
        km.add(f"{ours}.depthwise.conv.weight", f"{block}/_depthwise/_depthwise_conv/depthwise_kernel",
               _depthwise_kernel)
        bn(f"{ours}.depthwise.bn", f"{block}/_depthwise/_batch_norm")
        conv_bn(f"{ours}.pointwise", f"{block}/_pointwise")

    encoder = model.backbone.body
    if isinstance(encoder, DeepLab2ResNet):
        for ours, module in encoder.named_modules():
            if isinstance(module, (ConvBNAct, SwitchableConvBNAct)):
                theirs = _resnet_layer(ours, encoder.first_stage)
                conv_bn(f"backbone.body.{ours}", theirs)
            if isinstance(module, SwitchableConvBNAct):
                for part, layer in (("pre_context", "_pre_global_context/convolution"),
                                    ("post_context", "_post_global_context/convolution"), ("switch", "_conv/_switch")):
                    if getattr(module, part) is not None:
                        km.add(f"backbone.body.{ours}.{part}.weight", f"{theirs}/{layer}/kernel", _conv_kernel)
                        km.add(f"backbone.body.{ours}.{part}.bias", f"{theirs}/{layer}/bias")
    for i, block in enumerate(getattr(encoder, "blocks", ())):
        ours, theirs = f"backbone.body.blocks.{i}", f"encoder/_blocks/{i}"
        if not hasattr(block, "depthwise"):  # a conv_bn block
            conv_bn(ours, theirs)
            continue
        if hasattr(block, "expand"):
            conv_bn(f"{ours}.expand", f"{theirs}/_conv1_bn_act")
        km.add(f"{ours}.depthwise.conv.weight", f"{theirs}/_conv2_bn_act/_depthwise_conv/depthwise_kernel",
               _depthwise_kernel)
        bn(f"{ours}.depthwise.bn", f"{theirs}/_conv2_bn_act/_batch_norm")
        if hasattr(block, "se"):
            for part in ("reduce", "expand"):
                km.add(f"{ours}.se.{part}.weight", f"{theirs}/_squeeze_excitation/_se_{part}/kernel", _conv_kernel)
                km.add(f"{ours}.se.{part}.bias", f"{theirs}/_squeeze_excitation/_se_{part}/bias")
        conv_bn(f"{ours}.project", f"{theirs}/_conv3_bn")

    for branch in ("semantic_decoder", "instance_decoder"):
        aspp = f"{branch}/_aspp"
        conv_bn(f"{branch}.aspp.branches.0", f"{aspp}/_conv_bn_act")
        for i in (1, 2, 3):
            conv_bn(f"{branch}.aspp.branches.{i}", f"{aspp}/_aspp_conv{i}/_conv_bn_act")
        km.add(f"{branch}.aspp.branches.4.conv.weight", f"{aspp}/_aspp_pool/_conv_bn_act/_conv/kernel", _conv_kernel)
        bn(f"{branch}.aspp.branches.4.bn", f"{aspp}/_aspp_pool/_conv_bn_act/_batch_norm")
        conv_bn(f"{branch}.aspp.project", f"{aspp}/_proj_conv_bn_act")
        for i in (0, 1):  # utils.get_low_level_conv_fusion_conv_current_names(i): 1-based names
            conv_bn(f"{branch}.project.{i}", f"{branch}/_low_level_conv{i + 1}")
            separable(f"{branch}.fuse.{i}", f"{branch}/_fusion_conv{i + 1}")

    # common.py CKPT_* names of PanopticDeepLab.checkpoint_items
    for ours, tower, last in (("semantic_head", "semantic_head_without_last_layer", "semantic_last_layer"),
                              ("center_head", "instance_center_head_without_last_layer",
                               "instance_center_head_last_layer"),
                              ("offset_head", "instance_regression_head_without_last_layer",
                               "instance_regression_head_last_layer")):
        separable(f"{ours}.tower", tower)
        km.add(f"{ours}.predictor.weight", f"{last}/kernel", _conv_kernel)
        km.add(f"{ours}.predictor.bias", f"{last}/bias")

    # DeepLab.call: x / 127.5 - 1 on 0..255 = (x - 0.5) / 0.5 on [0, 1].
    km.constants["pixel_mean"] = torch.full((3,), 0.5)
    km.constants["pixel_std"] = torch.full((3,), 0.5)
    return km


def _resnet_layer(ours: str, first_stage: int) -> str:
    """``stem.conv1_bn_act`` -> ``encoder/_stem/_conv1_bn_act``; ``stages.i.j.part`` -> ``encoder/_stage{i + first}/
    _block{j + 1}/_part`` (``AxialResNet``'s and ``BlockGroup``'s attribute names)."""
    parts = ours.split(".")
    if parts[0] == "stem":
        return "/".join(["encoder/_stem", *(f"_{p}" for p in parts[1:])])
    stage, block, part = parts[1:]
    return f"encoder/_stage{int(stage) + first_stage}/_block{int(block) + 1}/_{part}"


def architecture(state: dict[str, Tensor]) -> str:
    return f"deeplab2 {ENCODERS[_encoder(state)][1]}"

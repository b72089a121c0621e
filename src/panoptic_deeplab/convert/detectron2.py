"""detectron2's Panoptic-DeepLab (``projects/Panoptic-DeepLab``): model-zoo ``.pkl`` and training ``.pth`` files.

The architecture, from D2's sources (SPEC §1, §8.2, §9.9):

* backbone ``build_resnet_deeplab_backbone`` (``projects/DeepLab/deeplab/resnet.py``): R52 = ResNet-50 with
  the DeepLab stem (three 3x3 convs 64/64/128, ``DeepLabStem``), stride in the 3x3 conv (``STRIDE_IN_1X1 False``),
  res5 at dilation 2 with multi-grid (1, 2, 4), taps ``res2``, ``res3``, ``res5``;
* decoders ``DeepLabV3PlusHead.__init__`` (``projects/DeepLab/deeplab/semantic_seg.py``): ASPP
  (``detectron2/layers/aspp.py``) with depthwise-separable 3x3s in the DSConv models, an image-pooling
  branch of ``AvgPool2d(train crop / 16, stride 1)`` then a 1x1 conv **with bias and no norm**, bilinear
  ``align_corners=False``; per tap a 1x1 projection (res3 -> 64, res2 -> 32 in both branches:
  ``PROJECT_CHANNELS [32, 64]``), concatenation ``[projected, upsampled]`` (``layers``), fusion by one 5x5
  ``DepthwiseSeparableConv2d`` (DSConv models) or two 3x3 convs;
* heads (``panoptic_seg.py``): semantic and offset towers DSConv 5x5 or two 3x3 convs, the center tower always
  two 3x3 convs (``PanopticDeepLabInsEmbedHead.__init__``), 1x1 predictors with bias;
* outputs ``F.interpolate(scale_factor=4, align_corners=False)``, offsets x 4 (``forward``);
* input RGB, ``(x - PIXEL_MEAN) / PIXEL_STD`` on 0..255 (the configs' 123.675/116.28/103.53, 58.395/57.12/57.375),
  padded to ``SIZE_DIVISIBILITY`` (640 for COCO) by ``ImageList.from_tensors``.

``SyncBN`` layers are PyTorch batch norms (eps 1e-5). Names: ``detectron2/checkpoint/c2_model_loading.py`` is not
involved: Panoptic-DeepLab files carry the module names of the model itself.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from panoptic_deeplab.config import ModelConfig, PostProcessConfig

from .common import ConversionError, KeyMap, as_tensor_dict, read_reference_file, wrong_family_error

NAME = "d2"
TITLE = "detectron2"

# The configs of the published models (configs/*/panoptic_deeplab_R_52_os16_mg124_*.yaml).
PIXEL_MEAN = (123.675, 116.280, 103.530)
PIXEL_STD = (58.395, 57.120, 57.375)
COCO_NUM_CLASSES = 133
CITYSCAPES_TRAIN_CROP = (512, 1024)  # INPUT.CROP.SIZE of the Cityscapes R52 configs
COCO_TRAIN_CROP = (640, 640)
COCO_SIZE_DIVISIBILITY = 640  # MODEL.PANOPTIC_DEEPLAB.SIZE_DIVISIBILITY of the COCO config
ENCODER_STRIDE = 16


def read(path: Path) -> dict[str, Tensor]:
    """The model's tensors from a model-zoo ``.pkl`` (``{"model": arrays, "__author__": ...}``) or a training
    ``.pth`` (``{"model": tensors, "optimizer": ..., "iteration": ...}``): ``DetectionCheckpointer._load_file``."""
    data = read_reference_file(path, TITLE)
    state = data.get("model") if isinstance(data, dict) else None
    if not isinstance(state, dict):
        keys = list(data) if isinstance(data, dict) else []
        raise wrong_family_error(path, NAME, keys) if keys else ConversionError(
            f"{path} is not a detectron2 checkpoint: expected a dict with a 'model' entry"
        )
    state = as_tensor_dict(state, str(path))
    if "sem_seg_head.predictor.weight" not in state or "ins_embed_head.center_predictor.weight" not in state:
        raise wrong_family_error(path, NAME, state)
    return state


def is_dsconv(state: dict[str, Tensor]) -> bool:
    return "sem_seg_head.head.depthwise.weight" in state


def model_config(state: dict[str, Tensor], num_classes: int, train_crop: tuple[int, int] | None = None) -> ModelConfig:
    """The options that rebuild D2's network; ``train_crop`` sets the ASPP pooling window (default: the
    published recipe's crop for COCO (133 classes) or Cityscapes)."""
    dsconv = is_dsconv(state)
    if train_crop is None:
        train_crop = COCO_TRAIN_CROP if num_classes == COCO_NUM_CLASSES else CITYSCAPES_TRAIN_CROP
    if train_crop[0] % ENCODER_STRIDE or train_crop[1] % ENCODER_STRIDE:
        # DeepLabV3PlusHead.__init__: "Crop size need to be divisible by encoder stride."
        raise ConversionError(f"train crop {train_crop} is not divisible by the encoder stride {ENCODER_STRIDE}")
    head = "dsconv" if dsconv else "d2"
    return ModelConfig(
        backbone="resnet52_deeplab",
        pretrained=False,
        num_classes=num_classes,
        output_stride=ENCODER_STRIDE,
        multi_grid=(1, 2, 4),
        aspp_channels=_out_channels(state, "sem_seg_head.decoder.res5.project_conv.project.weight"),
        aspp_rates=(6, 12, 18),
        aspp_dropout=0.1,
        aspp_separable=dsconv,
        aspp_pool_kernel=(train_crop[0] // ENCODER_STRIDE, train_crop[1] // ENCODER_STRIDE),
        aspp_pool_conv="bias",
        low_level_strides=(8, 4),
        decoder_fusion=head,
        semantic_decoder_channels=_out_channels(state, _fuse_weight("sem_seg_head", "res2", dsconv)),
        semantic_low_level_channels=_projections(state, "sem_seg_head"),
        semantic_head_channels=_out_channels(state, "sem_seg_head.predictor.weight", dim=1),
        semantic_head=head,
        instance_decoder_channels=_out_channels(state, _fuse_weight("ins_embed_head", "res2", dsconv)),
        instance_low_level_channels=_projections(state, "ins_embed_head"),
        instance_head_channels=_out_channels(state, "ins_embed_head.center_predictor.weight", dim=1),
        center_head="d2",
        offset_head=head,
        concat_low_level_first=True,
        align_corners=False,
        size_divisibility=COCO_SIZE_DIVISIBILITY if num_classes == COCO_NUM_CLASSES else 0,
        bn_momentum=0.1,
        bn_eps=1e-5,
    )


def postprocess_config(model_cfg: ModelConfig) -> PostProcessConfig:
    """``MODEL.PANOPTIC_DEEPLAB`` of the published configs (SPEC §5): COCO NMS 41 / stuff 4096, else 7 / 2048."""
    if model_cfg.num_classes == COCO_NUM_CLASSES:
        return PostProcessConfig(center_threshold=0.1, nms_kernel=41, top_k=200, stuff_area=4096)
    return PostProcessConfig(center_threshold=0.1, nms_kernel=7, top_k=200, stuff_area=2048)


def configs(state: dict[str, Tensor], num_classes: int, train_crop: tuple[int, int] | None = None) -> tuple[ModelConfig, PostProcessConfig]:
    """The network's options and the published configs' post-processing."""
    model_cfg = model_config(state, num_classes, train_crop)
    return model_cfg, postprocess_config(model_cfg)


def num_classes_of(state: dict[str, Tensor]) -> int:
    return int(state["sem_seg_head.predictor.weight"].shape[0])


def key_map(model: nn.Module, state: dict[str, Tensor]) -> KeyMap:
    """Our names -> D2's, module by module (D2 ``Conv2d`` keeps its norm at ``<conv>.norm``)."""
    dsconv = is_dsconv(state)
    km = KeyMap()

    def conv_norm(ours: str, theirs: str) -> None:
        km.conv_bn(ours, theirs, f"{theirs}.norm")

    def separable(ours: str, theirs: str) -> None:  # D2 DepthwiseSeparableConv2d
        conv_norm(f"{ours}.depthwise", f"{theirs}.depthwise")
        conv_norm(f"{ours}.pointwise", f"{theirs}.pointwise")

    def two_convs(ours: str, theirs: str) -> None:  # nn.Sequential of two D2 Conv2d
        conv_norm(f"{ours}.0", f"{theirs}.0")
        conv_norm(f"{ours}.1", f"{theirs}.1")

    tower = separable if dsconv else two_convs

    # Backbone: DeepLabStem -> timm's deep stem, res{2..5}.{j} -> layer{1..4}.{j}.
    body = "backbone.body"
    for ours, theirs in (("conv1.0", "conv1"), ("conv1.3", "conv2"), ("conv1.6", "conv3")):
        km.conv(f"{body}.{ours}", f"backbone.stem.{theirs}")
    for ours, theirs in (("conv1.1", "conv1"), ("conv1.4", "conv2"), ("bn1", "conv3")):
        km.bn(f"{body}.{ours}", f"backbone.stem.{theirs}.norm")
    for stage in range(1, 5):
        for j, block in enumerate(getattr(model.backbone.body, f"layer{stage}")):
            ours, theirs = f"{body}.layer{stage}.{j}", f"backbone.res{stage + 1}.{j}"
            for i in (1, 2, 3):
                km.conv(f"{ours}.conv{i}", f"{theirs}.conv{i}")
                km.bn(f"{ours}.bn{i}", f"{theirs}.conv{i}.norm")
            if block.downsample is not None:
                km.conv(f"{ours}.downsample.0", f"{theirs}.shortcut")
                km.bn(f"{ours}.downsample.1", f"{theirs}.shortcut.norm")

    for ours_branch, theirs_head in (("semantic_decoder", "sem_seg_head"), ("instance_decoder", "ins_embed_head")):
        aspp, theirs_aspp = f"{ours_branch}.aspp", f"{theirs_head}.decoder.res5.project_conv"
        conv_norm(f"{aspp}.branches.0", f"{theirs_aspp}.convs.0")
        for i in (1, 2, 3):
            (separable if dsconv else conv_norm)(f"{aspp}.branches.{i}", f"{theirs_aspp}.convs.{i}")
        km.conv(f"{aspp}.branches.4.conv", f"{theirs_aspp}.convs.4.1", bias=True)
        conv_norm(f"{aspp}.project", f"{theirs_aspp}.project")
        for i, tap in enumerate(("res3", "res2")):  # our decoder order: stride 8 first
            conv_norm(f"{ours_branch}.project.{i}", f"{theirs_head}.decoder.{tap}.project_conv")
            tower(f"{ours_branch}.fuse.{i}", f"{theirs_head}.decoder.{tap}.fuse_conv")

    tower("semantic_head.tower", "sem_seg_head.head")
    km.conv("semantic_head.predictor", "sem_seg_head.predictor", bias=True)
    two_convs("center_head.tower", "ins_embed_head.center_head")
    km.conv("center_head.predictor", "ins_embed_head.center_predictor", bias=True)
    tower("offset_head.tower", "ins_embed_head.offset_head")
    km.conv("offset_head.predictor", "ins_embed_head.offset_predictor", bias=True)

    # Older D2 versions saved the normalisation buffers (on 0..255); the published configs' values otherwise.
    for name, default in (("pixel_mean", PIXEL_MEAN), ("pixel_std", PIXEL_STD)):
        if name in state:
            km.add(name, name, lambda t: t.reshape(1, 3, 1, 1) / 255.0)
        else:
            km.constants[name] = torch.tensor(default) / 255.0
    return km


def _out_channels(state: dict[str, Tensor], key: str, dim: int = 0) -> int:
    if key not in state:
        raise ConversionError(f"detectron2 checkpoint lacks {key}")
    return int(state[key].shape[dim])


def _fuse_weight(head: str, tap: str, dsconv: bool) -> str:
    return f"{head}.decoder.{tap}.fuse_conv." + ("pointwise.weight" if dsconv else "1.weight")


def _projections(state: dict[str, Tensor], head: str) -> tuple[int, ...]:
    return tuple(_out_channels(state, f"{head}.decoder.{tap}.project_conv.weight") for tap in ("res3", "res2"))


def architecture(state: dict[str, Tensor]) -> str:
    """A one-line name of the converted network, for messages and the checkpoint's record."""
    return "R52-DC5 " + ("DSConv" if is_dsconv(state) else "standard conv")

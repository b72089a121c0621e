"""The Panoptic-DeepLab network: shared encoder, dual ASPP, dual decoder, three heads (SPEC §1.1)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from timm.models._efficientnet_blocks import SqueezeExcite
from torch import nn

from ..config import ModelConfig
from .aspp import ASPPPooling, default_aspp_rates
from .backbone import LAST_KEY, Backbone, feature_key
from .decoder import FUSION_KINDS, PanopticDeepLabDecoder
from .heads import HEAD_KINDS, PredictionHead
from .layers import resize, resize_offset

# ImageNet statistics of RGB in [0, 1] (SPEC §1.7, BC; timm's ImageNet weights expect them too).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INIT_MODES = ("normal", "he")
MAX_CLASSES = 255  # class 255 is IGNORE_LABEL (docs/ARCHITECTURE.md)


def _input_replaced_by(mean: torch.Tensor) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], tuple[torch.Tensor]]:
    """A forward pre-hook giving its module ``mean`` (``[1, C, 1, 1]``) for each image of the batch."""
    return lambda _, args: (mean.to(args[0].dtype).expand(args[0].shape[0], -1, -1, -1),)


class PanopticDeepLab(nn.Module):
    """Panoptic-DeepLab.

    ``forward(images)`` takes RGB float images ``[N, 3, H, W]`` with values in ``[0, 1]`` (any H, W,
    even or odd), normalises them with :meth:`normalize` (the ``pixel_mean`` / ``pixel_std`` buffers),
    and returns a dict at input resolution:

    * ``semantic``: logits ``[N, num_classes, H, W]`` (``[N, 1 + num_classes, H, W]`` with
      ``semantic_void_channel``: channel 0 is void, channel ``1 + k`` class ``k``)
    * ``center``: raw center heatmap ``[N, 1, H, W]`` (linear, no sigmoid)
    * ``offset``: ``[N, 2, H, W]``, channels ``(dy, dx)`` in input pixels, from a pixel to its center.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        _validate(cfg)
        self.config = cfg
        self.num_classes = cfg.num_classes
        self.align_corners = cfg.align_corners
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

        self.backbone = Backbone(
            cfg.backbone,
            cfg.output_stride,
            pretrained=cfg.pretrained,
            weights_path=cfg.backbone_weights,
            low_level_strides=tuple(cfg.low_level_strides),
            multi_grid=None if cfg.multi_grid is None else tuple(cfg.multi_grid),
            bn_eps=cfg.bn_eps,
        )
        channels = self.backbone.channels
        rates = tuple(cfg.aspp_rates) if cfg.aspp_rates is not None else default_aspp_rates(cfg.output_stride)
        norm = dict(bn_momentum=cfg.bn_momentum, bn_eps=cfg.bn_eps)
        common = dict(
            low_level_strides=tuple(cfg.low_level_strides),
            aspp_rates=rates,
            aspp_dropout=cfg.aspp_dropout,
            aspp_separable=cfg.aspp_separable,
            aspp_pool_kernel=None if cfg.aspp_pool_kernel is None else tuple(cfg.aspp_pool_kernel),
            aspp_pool_conv=cfg.aspp_pool_conv,
            fusion=cfg.decoder_fusion,
            concat_low_level_first=cfg.concat_low_level_first,
            align_corners=cfg.align_corners,
            **norm,
        )
        low_in = tuple(channels[feature_key(s)] for s in cfg.low_level_strides)
        self.semantic_decoder = PanopticDeepLabDecoder(
            channels[LAST_KEY],
            low_in,
            tuple(cfg.semantic_low_level_channels),
            cfg.semantic_decoder_channels,
            aspp_channels=cfg.aspp_channels,
            **common,
        )
        self.instance_decoder = PanopticDeepLabDecoder(
            channels[LAST_KEY],
            low_in,
            tuple(cfg.instance_low_level_channels),
            cfg.instance_decoder_channels,
            aspp_channels=cfg.instance_aspp_channels or cfg.aspp_channels,
            **common,
        )
        self.semantic_head = PredictionHead(
            cfg.semantic_decoder_channels,
            cfg.semantic_head_channels,
            cfg.num_classes + int(cfg.semantic_void_channel),
            kind=cfg.semantic_head,
            **norm,
        )
        self.center_head = PredictionHead(
            cfg.instance_decoder_channels, cfg.instance_head_channels, 1, kind=cfg.center_head,
            float32_predictor=True, **norm
        )
        self.offset_head = PredictionHead(
            cfg.instance_decoder_channels, cfg.instance_head_channels, 2, kind=cfg.offset_head,
            float32_predictor=True, **norm
        )
        for module in (self.semantic_decoder, self.instance_decoder):
            _init_convs(module, cfg.init)
        for head in (self.semantic_head, self.center_head, self.offset_head):
            _init_convs(head.tower, cfg.init)
            _init_predictor(head.predictor, cfg.init)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """RGB in ``[0, 1]`` -> ``(x - pixel_mean) / pixel_std``."""
        return (images - self.pixel_mean) / self.pixel_std

    def _global_pooling_branches(self) -> list[ASPPPooling]:
        return [m for m in self.modules() if isinstance(m, ASPPPooling) and m.kernel is None]

    def _squeeze_excites(self) -> list[SqueezeExcite]:
        return [m for m in self.backbone.modules() if isinstance(m, SqueezeExcite)]

    @property
    def pools_globally(self) -> bool:
        """Whether the network averages over its whole input anywhere: an ASPP image-pooling branch
        (``aspp_pool_kernel`` None) or a squeeze-excite block of the backbone (MobileNetV3's)."""
        return bool(self._global_pooling_branches() or self._squeeze_excites())

    def global_average_inputs(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The maps the network averages over its whole input when it sees ``images``: each squeeze-excite block's
        input, in the backbone's order, then (with a global image-pooling branch) the backbone's last features,
        which both ASPPs' image-pooling branches average. Runs the backbone only."""
        inputs: list[torch.Tensor] = []
        hooks = [block.register_forward_pre_hook(lambda _, args: inputs.append(args[0]))
                 for block in self._squeeze_excites()]
        try:
            last = self.backbone(self.normalize(images))[LAST_KEY]
        finally:
            for hook in hooks:
                hook.remove()
        return inputs + [last] if self._global_pooling_branches() else inputs

    @contextmanager
    def image_averages(self, means: list[torch.Tensor]) -> Iterator[None]:
        """Within the block the network uses ``means`` (one ``[1, C, 1, 1]`` per map of
        :meth:`global_average_inputs`, in its order, each averaged over a whole image) instead of averaging its
        own input: a tile then sees the image's context (inference/tiling.py)."""
        blocks, branches = self._squeeze_excites(), self._global_pooling_branches()
        if len(means) != len(blocks) + bool(branches):
            pooling = ", then one for the image-pooling branches" if branches else ""
            raise ValueError(f"expected {len(blocks) + bool(branches)} averages (one per squeeze-excite block"
                             f"{pooling}), got {len(means)}")
        # timm's SqueezeExcite.forward (models/_efficientnet_blocks.py) averages its input and hands the average to
        # conv_reduce: replacing conv_reduce's input replaces the average.
        hooks = [block.conv_reduce.register_forward_pre_hook(_input_replaced_by(mean))
                 for block, mean in zip(blocks, means)]
        for branch in branches:
            branch.image_mean = means[-1]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()
            for branch in branches:
                branch.image_mean = None

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected RGB images [N, 3, H, W], got shape {tuple(images.shape)}")
        # not int(): under torch.export that would fix the size of an input computed from a dynamic one
        size = (images.shape[-2], images.shape[-1])
        features = self.backbone(self.normalize(images))
        semantic = self.semantic_head(self.semantic_decoder(features))
        instance = self.instance_decoder(features)
        center = self.center_head(instance)
        offset = self.offset_head(instance)
        if not self.training:
            # channels_last inference: the post-processing reads planes (NCHW); changing the layout of the
            # stride-4 maps here costs 1/16 of doing it after the upsampling (0.2 s at 1024x2048 on 2 cores).
            # The semantic logits leave autocast's bfloat16 before the upsampling, not after: upsampling float32
            # and skipping the full-size cast is 55 ms faster at 1024x2048, and more exact.
            semantic, center, offset = semantic.float().contiguous(), center.contiguous(), offset.contiguous()
        # SPEC §1.7: stride-4 outputs -> input size; offsets are rescaled per axis to input pixels.
        return {
            "semantic": resize(semantic, size, self.align_corners),
            "center": resize(center, size, self.align_corners),
            "offset": resize_offset(offset, size, self.align_corners),
        }


def _validate(cfg: ModelConfig) -> None:
    if not 1 <= cfg.num_classes <= MAX_CLASSES:
        raise ValueError(f"num_classes must lie in [1, {MAX_CLASSES}], got {cfg.num_classes}")
    for name in ("semantic_head", "center_head", "offset_head"):
        if getattr(cfg, name) not in HEAD_KINDS:
            raise ValueError(f"{name} must be one of {HEAD_KINDS}, got {getattr(cfg, name)!r}")
    if cfg.decoder_fusion not in FUSION_KINDS:
        raise ValueError(f"decoder_fusion must be one of {FUSION_KINDS}, got {cfg.decoder_fusion!r}")
    strides = tuple(cfg.low_level_strides)
    if not strides or list(strides) != sorted(set(strides), reverse=True) or strides[0] >= cfg.output_stride:
        raise ValueError(
            f"low_level_strides must be distinct strides below the output stride {cfg.output_stride}, deepest "
            f"first (e.g. (8, 4)), got {strides}"
        )
    for name in ("semantic_low_level_channels", "instance_low_level_channels"):
        if len(getattr(cfg, name)) != len(strides):
            raise ValueError(
                f"{name} needs one width per decoder tap {strides}, got {tuple(getattr(cfg, name))}"
            )
    if cfg.init not in INIT_MODES:
        raise ValueError(f"init must be one of {INIT_MODES}, got {cfg.init!r}")
    if cfg.instance_aspp_channels is not None and cfg.instance_aspp_channels < 1:
        raise ValueError(f"instance_aspp_channels must be positive or None, got {cfg.instance_aspp_channels}")
    for name in ("aspp_channels", "semantic_decoder_channels", "semantic_head_channels",
                 "instance_decoder_channels", "instance_head_channels"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be positive, got {getattr(cfg, name)}")


def _init_convs(module: nn.Module, mode: str) -> None:
    """SPEC §1.6: convs Normal(0, 0.001) (BC) or He normal (DL2); BN weight 1, bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            if mode == "normal":
                nn.init.normal_(m.weight, std=0.001)
            else:
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _init_predictor(conv: nn.Conv2d, mode: str) -> None:
    """SPEC §1.6: final 1x1 predictors Normal(0, 0.001) (BC, D2) or TruncatedNormal(0.01) (DL2), bias 0."""
    if mode == "normal":
        nn.init.normal_(conv.weight, std=0.001)
    else:
        std = 0.01
        nn.init.trunc_normal_(conv.weight, std=std, a=-2 * std, b=2 * std)
    nn.init.zeros_(conv.bias)


def build_model(cfg: ModelConfig) -> PanopticDeepLab:
    """Build Panoptic-DeepLab from its configuration (backbone weights per ``pretrained`` /
    ``backbone_weights``)."""
    return PanopticDeepLab(cfg)

"""Encoders: timm ``features_only`` models tapped at stride 4, stride 8 and the last stage (SPEC §1.2).

A preset name (``BACKBONE_PRESETS``) or any timm model name is accepted; the taps are picked from the
model's ``feature_info`` reductions, so any timm model that exposes stride-4 and stride-8 features and
supports ``output_stride`` works.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlparse

import timm
import torch
from timm.models import build_model_with_cfg, register_model
from timm.models.resnet import Bottleneck, ResNet
from torch import nn

from .bc_hrnet import bc_hrnet_w48
from .bc_xception import BCXception65
from .dl2_mobilenet import DeepLab2MobileNetV3
from .dl2_resnet import DeepLab2ResNet

# Feature keys returned by ``Backbone.forward`` (detectron2 naming: res2 = stride 4, res3 = stride 8,
# res4 = stride 16); the last stage is always res5, whatever its stride.
LAST_KEY = "res5"



class PretrainedWeightsUnavailable(OSError):
    """timm's pretrained weights could not be fetched or found in the cache (an OSError: a resource is missing,
    which the command line reports in one line)."""

def feature_key(stride: int) -> str:
    """Key of the low-level tap at ``stride`` (4 -> res2, 8 -> res3, 16 -> res4)."""
    return f"res{stride.bit_length() - 1}"


@register_model
def resnet52_deeplab(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-50 with the DeepLab stem (three 3x3 convs 64, 64, 128, then max-pool): detectron2's "R-52".

    SPEC §1.2 (D2 ``projects/DeepLab/deeplab/resnet.py``, ``DeepLabStem``): timm's "deep" stem of width 64
    is the same three convs; stride on the 3x3 conv (``STRIDE_IN_1X1 False``) as in timm's Bottleneck.
    timm publishes no ImageNet weights for it: detectron2's own R-52 checkpoints come in through ``convert``.
    """
    if pretrained:
        raise RuntimeError(
            "timm has no ImageNet weights for resnet52_deeplab; start from a converted detectron2 checkpoint "
            "(panoptic-deeplab convert --from d2) or pass pretrained=False"
        )
    args = dict(block=Bottleneck, layers=[3, 4, 6, 3], stem_width=64, stem_type="deep")
    kwargs["pretrained_cfg"] = kwargs.get("pretrained_cfg") or {"url": "", "num_classes": 1000, "classifier": "fc"}
    return build_model_with_cfg(ResNet, "resnet52_deeplab", False, **dict(args, **kwargs))


@dataclass(frozen=True)
class BackbonePreset:
    """A timm model and the extra arguments it needs."""

    timm_name: str
    timm_kwargs: dict[str, Any] = field(default_factory=dict)


BACKBONE_PRESETS: dict[str, BackbonePreset] = {
    # SPEC §1.2: the MobileNetV3 endpoints are the depthwise-conv outputs of the last block of each
    # stride level (72 ch at stride 4, 120 ch at stride 8). timm's ``feature_location="expansion"``
    # taps exactly there (the input of that block's projection conv, i.e. after squeeze-excite).
    "mobilenetv3_large": BackbonePreset("mobilenetv3_large_100", {"feature_location": "expansion"}),
    "resnet50": BackbonePreset("resnet50"),
    "resnet101": BackbonePreset("resnet101"),
    # timm's aligned (TF-DeepLab) Xceptions: the stride-4/8 taps are the ReLU outputs that enter the strided
    # third separable conv of entry blocks 2 and 3; BC taps just before that ReLU (SPEC §1.2: bc_xception65).
    "xception65": BackbonePreset("xception65"),
    "xception71": BackbonePreset("xception71"),
}


@dataclass(frozen=True)
class ReferenceEncoder:
    """An encoder that exists only to hold a reference implementation's converted weights."""

    build: Callable[[int, float], nn.Module]  # (output_stride, bn_eps) -> the features module
    reference: str  # whose checkpoints it takes
    source: str  # convert --from ...


# deeplab2's and bowenc0221's own encoders (not timm's: see dl2_mobilenet.py, dl2_resnet.py,
# bc_xception.py, bc_hrnet.py).
REFERENCE_ENCODERS: dict[str, ReferenceEncoder] = {
    "dl2_mobilenetv3_small": ReferenceEncoder(functools.partial(DeepLab2MobileNetV3, "small"), "deeplab2", "dl2"),
    "dl2_mobilenetv3_large": ReferenceEncoder(functools.partial(DeepLab2MobileNetV3, "large"), "deeplab2", "dl2"),
    "dl2_resnet50": ReferenceEncoder(functools.partial(DeepLab2ResNet, "resnet50"), "deeplab2", "dl2"),
    "dl2_resnet50_beta": ReferenceEncoder(functools.partial(DeepLab2ResNet, "resnet50_beta"), "deeplab2", "dl2"),
    "dl2_wide_resnet41": ReferenceEncoder(functools.partial(DeepLab2ResNet, "wide_resnet41"), "deeplab2", "dl2"),
    **{f"dl2_{name}": ReferenceEncoder(functools.partial(DeepLab2ResNet, name), "deeplab2", "dl2")
       for name in ("swidernet_sac_1_1_1", "swidernet_sac_1_1_3", "swidernet_sac_1_1_4.5")},
    "bc_xception65": ReferenceEncoder(BCXception65, "bowenc0221", "bc"),
    "bc_hrnet_w48": ReferenceEncoder(bc_hrnet_w48, "bowenc0221", "bc"),
}

SUPPORTED_OUTPUT_STRIDES = (8, 16, 32)


def resolve_backbone(name: str) -> BackbonePreset:
    """A preset name -> its preset; any other name is taken as a timm model name."""
    if name in BACKBONE_PRESETS:
        return BACKBONE_PRESETS[name]
    if not timm.is_model(name):
        raise ValueError(
            f"unknown backbone {name!r}: not a preset ({', '.join([*BACKBONE_PRESETS, *REFERENCE_ENCODERS])}) "
            "and not a timm model name"
        )
    return BackbonePreset(name)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hugging Face hub opens within ``timeout`` seconds.

    Behind a proxy a direct connection says nothing, so the hub is then assumed reachable.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError:
        return False
    return True


@contextlib.contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """Switch huggingface_hub to cache-only mode for the duration (read at call time by the hub).

    Without this, an unreachable hub costs about 50 s of retries before timm gives up.
    """
    if not offline:
        yield
        return
    from huggingface_hub import constants

    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def _hub_offline_requested() -> bool:
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.safetensors`` or torch (``.pth``/``.pt``/``.bin``) file.

    A torch file may wrap the tensors under ``state_dict`` or ``model`` (common training checkpoints).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{str(path)!r} does not hold a state dict (a mapping of names to tensors)")
    return obj


def summarize_names(items: list[str], limit: int = 10) -> str:
    """The first ``limit`` names, comma-separated, and how many there are in all when more."""
    return ", ".join(items[:limit]) + (f" ... ({len(items)} in all)" if len(items) > limit else "")


def _check_weights(path: str, preset: BackbonePreset, state_dict: dict[str, torch.Tensor]) -> None:
    """Compare a file's tensors with timm's classification model; raise listing every mismatch.

    Only the classifier may be absent (it is not part of the encoder).
    """
    model = timm.create_model(preset.timm_name, pretrained=False)
    reference = model.state_dict()
    classifier = model.pretrained_cfg.get("classifier") or ()
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    optional = {k for k in reference if any(k.startswith(c + ".") for c in classifier)}
    missing = sorted(set(reference) - set(state_dict) - optional)
    unexpected = sorted(set(state_dict) - set(reference))
    wrong_shape = sorted(
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(reference[k].shape)}"
        for k in set(reference) & set(state_dict)
        if state_dict[k].shape != reference[k].shape
    )
    if missing or unexpected or wrong_shape:
        problems = []
        if missing:
            problems.append(f"missing keys: {summarize_names(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {summarize_names(unexpected)}")
        if wrong_shape:
            problems.append(f"wrong shapes: {summarize_names(wrong_shape)}")
        raise ValueError(
            f"backbone weights {path!r} do not match timm model {preset.timm_name!r} "
            f"(expected the state dict of timm.create_model({preset.timm_name!r})): " + "; ".join(problems)
        )


def create_timm_features(
    name: str,
    output_stride: int = 16,
    pretrained: bool = False,
    weights_path: str | os.PathLike[str] | None = None,
) -> nn.Module:
    """Build the timm ``features_only`` model for ``name`` (preset or timm name).

    ``weights_path`` (a state dict of timm's classification model, e.g. the hub's ``model.safetensors``)
    takes precedence over ``pretrained``. ``pretrained=True`` without a file downloads timm's ImageNet
    weights, or uses the local Hugging Face cache when the hub cannot be reached; it fails at once
    with a clear message otherwise.
    """
    preset = resolve_backbone(name)
    if output_stride not in SUPPORTED_OUTPUT_STRIDES:
        raise ValueError(f"output_stride must be one of {SUPPORTED_OUTPUT_STRIDES}, got {output_stride}")
    kwargs: dict[str, Any] = dict(preset.timm_kwargs, features_only=True)
    if output_stride != 32:  # timm's default; models without dilation support still work at 32
        kwargs["output_stride"] = output_stride
    try:
        if weights_path is not None:
            path = str(weights_path)
            state_dict = read_state_dict(path)
            _check_weights(path, preset, state_dict)
            # timm loads the checked tensors into the classification model before cutting it down to
            # the features model (whose module names may differ); source "" selects the state_dict.
            overlay = {"state_dict": state_dict, "source": ""}
            return timm.create_model(preset.timm_name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
        if not pretrained:
            return timm.create_model(preset.timm_name, pretrained=False, **kwargs)
        published = timm.models.get_pretrained_cfg(preset.timm_name)
        if published is None or not (published.hf_hub_id or published.url or published.file):
            raise RuntimeError(
                f"timm has no ImageNet weights for {preset.timm_name}: pass backbone_weights=PATH, start from a "
                "converted checkpoint (model.init_checkpoint, see docs/MODEL_ZOO.md) or pretrained=False"
            )
        offline = _hub_offline_requested() or not _hub_reachable()
        try:
            with _hub_offline(offline):
                return timm.create_model(preset.timm_name, pretrained=True, **kwargs)
        except (OSError, RuntimeError) as exc:
            where = (
                "the Hugging Face hub is unreachable (or HF_HUB_OFFLINE is set) and they are not in the local cache"
                if offline
                else str(exc)
            )
            raise PretrainedWeightsUnavailable(
                f"cannot load timm's ImageNet weights for backbone {name!r} (timm model "
                f"{preset.timm_name!r}): {where}. Pass backbone_weights=PATH (a .pth or .safetensors state "
                f"dict of timm.create_model({preset.timm_name!r}); model.backbone_weights=PATH in a config), or "
                "pretrained=False (model.pretrained=false) to start from random weights."
            ) from exc
    except TypeError as exc:
        if "output_stride" in str(exc):
            raise ValueError(
                f"timm model {preset.timm_name!r} does not support output_stride={output_stride}; use 32"
            ) from exc
        raise


class Backbone(nn.Module):
    """Encoder returning the low-level taps (``res2`` = stride 4, ``res3`` = stride 8, ``res4`` = stride 16,
    as asked by ``low_level_strides``) and ``res5``, the last stage.

    Attributes ``channels`` and ``strides`` give each tap's channel count and stride. ``multi_grid``
    multiplies the dilation of each block of a ResNet's last stage (SPEC §1.2, D2's R52: 1, 2, 4).
    ``bn_eps`` is the batch-norm epsilon of the references' own encoders (``REFERENCE_ENCODERS``); timm's keep
    their own.
    """

    def __init__(
        self,
        name: str,
        output_stride: int = 16,
        pretrained: bool = False,
        weights_path: str | os.PathLike[str] | None = None,
        low_level_strides: tuple[int, ...] = (8, 4),
        multi_grid: tuple[int, ...] | None = None,
        bn_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.name = name
        if name in REFERENCE_ENCODERS:
            encoder = REFERENCE_ENCODERS[name]
            if pretrained or weights_path is not None:
                raise ValueError(
                    f"backbone {name!r} has no ImageNet weights of its own: start from a converted {encoder.reference} "
                    f"checkpoint (panoptic-deeplab convert --from {encoder.source}, then model.init_checkpoint) with "
                    "pretrained=False"
                )
            self.body: nn.Module = encoder.build(output_stride, bn_eps)
        else:
            self.body = create_timm_features(name, output_stride, pretrained, weights_path)
        info = self.body.feature_info
        reductions = list(info.reduction())
        channels = list(info.channels())
        taps: dict[str, int] = {}
        for stride in sorted(low_level_strides):
            # The first feature at that stride: with dilation, later stages keep the stride (os8: layer3
            # and layer4 at stride 8), but the tap is the stage that reached it by striding.
            found = [i for i, r in enumerate(reductions[:-1]) if r == stride][:1]
            if not found:
                raise ValueError(
                    f"backbone {name!r} at output stride {output_stride} has no stride-{stride} feature before "
                    f"its last stage (its feature strides are {reductions}); the decoder taps "
                    f"{tuple(low_level_strides)} need one each"
                )
            taps[feature_key(stride)] = found[-1]
        taps[LAST_KEY] = len(reductions) - 1
        if reductions[-1] != output_stride:
            raise ValueError(
                f"backbone {name!r} ends at stride {reductions[-1]}, not the requested output stride "
                f"{output_stride}"
            )
        self.tap_indices = taps
        self.channels = {k: channels[i] for k, i in taps.items()}
        self.strides = {k: reductions[i] for k, i in taps.items()}
        self.output_stride = output_stride
        if multi_grid is not None:
            _apply_multi_grid(self.body, name, output_stride, tuple(multi_grid))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.body(x)
        return {k: features[i] for k, i in self.tap_indices.items()}


def _apply_multi_grid(body: nn.Module, name: str, output_stride: int, multi_grid: tuple[int, ...]) -> None:
    """Set the 3x3 conv dilation of block ``i`` of the last stage to ``rate * multi_grid[i]``.

    ``rate`` is the stage's atrous rate (2 at output stride 16, 1 at 32): D2 ``build_resnet_deeplab_backbone``
    with ``RES5_DILATION`` and ``RES5_MULTI_GRID``. Only ResNet bottleneck stages (``layer4``) have it.
    """
    stage = getattr(body, "layer4", None)
    blocks = list(stage) if isinstance(stage, nn.Sequential) else []
    if not blocks or not all(isinstance(getattr(b, "conv2", None), nn.Conv2d) for b in blocks):
        raise ValueError(f"multi_grid needs a ResNet-style backbone (layer4 of bottleneck blocks); {name!r} is not one")
    if len(multi_grid) != len(blocks) or any(int(m) < 1 for m in multi_grid):
        raise ValueError(
            f"multi_grid needs one positive multiplier per block of the last stage ({len(blocks)} for {name!r}), "
            f"got {multi_grid}"
        )
    rate = 32 // output_stride
    for block, multiplier in zip(blocks, multi_grid):
        dilation = rate * int(multiplier)
        conv = block.conv2
        conv.dilation = (dilation, dilation)
        conv.padding = (dilation * (conv.kernel_size[0] // 2), dilation * (conv.kernel_size[1] // 2))

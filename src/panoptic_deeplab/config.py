"""Configuration: plain dataclasses, one per stage, composed into ``Config``.

Defaults are the project's choices of SPEC §0. YAML presets live in ``panoptic_deeplab/configs/``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

from panoptic_deeplab.atomic import write_text_atomic


@dataclass
class ModelConfig:
    """The network (SPEC §0, §1)."""

    backbone: str = "mobilenetv3_large"  # a preset name or any timm model name
    pretrained: bool = True  # timm ImageNet weights (needs the network or backbone_weights)
    backbone_weights: str | None = None  # local file with the backbone's ImageNet weights
    # Fine-tuning: start training from this checkpoint's weights (trained here or made by `convert`); tensors
    # whose shape differs (a semantic predictor for another number of classes) keep their initialisation.
    init_checkpoint: str | None = None
    num_classes: int = 19
    # One more semantic channel, first, for void: deeplab2's COCO models (134 channels, its ignore label 0 is a
    # channel). A pixel whose argmax is that channel is void, as in deeplab2; training targets shift by one.
    semantic_void_channel: bool = False
    output_stride: int = 16  # 16 or 32
    # Dilation multipliers of the last stage's blocks (ResNets only): D2's R52 uses (1, 2, 4) at os16.
    multi_grid: tuple[int, ...] | None = None
    aspp_channels: int = 256
    instance_aspp_channels: int | None = None  # None: aspp_channels (deeplab2 checkpoints may differ per branch)
    aspp_rates: tuple[int, int, int] | None = None  # None: (6, 12, 18) at os16, (3, 6, 9) at os32
    aspp_dropout: float = 0.1
    aspp_separable: bool = False  # D2 uses depthwise-separable ASPP convs
    # Image pooling (SPEC §1.3): None = global at every size; (h, w) = D2's average pool of the train crop's
    # feature size, sliding (stride 1) over larger test features.
    aspp_pool_kernel: tuple[int, int] | None = None
    aspp_pool_conv: str = "bn"  # 1x1 conv of the pooling branch: "bn" (DL2), "bias" (D2), "plain" (BC)
    # Decoder taps, deepest first, as strides: (8, 4) (paper); BC's os32 models fuse (16, 8, 4).
    low_level_strides: tuple[int, ...] = (8, 4)
    decoder_fusion: str = "dsconv"  # "dsconv" (one 5x5 DSConv) or "d2" (two 3x3 convs, D2 non-DSConv)
    semantic_decoder_channels: int = 256
    semantic_low_level_channels: tuple[int, ...] = (64, 32)  # projections of the taps, one per low_level_strides
    semantic_head_channels: int = 256
    semantic_head: str = "dsconv"  # "dsconv" (5x5 DSConv) or "d2" (two 3x3 convs)
    instance_decoder_channels: int = 128
    instance_low_level_channels: tuple[int, ...] = (32, 16)  # D2: (64, 32)
    instance_head_channels: int = 32
    center_head: str = "dsconv"  # "dsconv" (paper/DL2) or "d2" (two 3x3 convs)
    offset_head: str = "dsconv"
    concat_low_level_first: bool = False  # D2 concatenates [low-level, upsampled]
    align_corners: bool = True
    # Inference pads inputs to a multiple of this (0: of the output stride, +1 with align_corners);
    # D2's COCO model pads to 640 (SIZE_DIVISIBILITY).
    size_divisibility: int = 0
    # deeplab2's COCO evaluation (641x641): inference resizes each image to fit this (H, W) as deeplab2's
    # resize_to_range(min = max = it) does, long side 641, pads it to exactly this size, and resizes the outputs
    # back to the image. None: the image as it is, padded to a valid size.
    inference_size: tuple[int, int] | None = None
    bn_momentum: float = 0.01
    bn_eps: float = 1e-5
    init: str = "normal"  # "normal" (std 0.001, BC) or "he" (DL2)


@dataclass
class TargetConfig:
    """Training targets (SPEC §2)."""

    sigma: float = 8.0
    small_instance_area: int = 4096
    small_instance_weight: float = 3.0
    ignore_crowd_in_semantic: bool = False


@dataclass
class LossConfig:
    """Losses (SPEC §3)."""

    semantic_weight: float = 1.0
    center_weight: float = 200.0
    offset_weight: float = 0.01
    top_k_percent: float = 0.2


@dataclass
class PostProcessConfig:
    """Inference post-processing (SPEC §5)."""

    center_threshold: float = 0.1
    nms_kernel: int = 7
    top_k: int = 200
    stuff_area: int = 2048


@dataclass
class SplitConfig:
    """One split of a COCO-panoptic dataset on disk."""

    images: str = ""  # folder of images
    json: str = ""  # panoptic JSON
    panoptic: str = ""  # folder of panoptic PNGs


@dataclass
class DataConfig:
    """Datasets, augmentation (SPEC §4) and loading."""

    train: SplitConfig = field(default_factory=SplitConfig)
    val: SplitConfig = field(default_factory=SplitConfig)
    crop_size: tuple[int, int] = (1025, 2049)  # (H, W)
    min_scale: float = 0.5
    max_scale: float = 2.0
    scale_step: float = 0.1
    flip: bool = True
    batch_size: int = 8  # per process
    eval_batch_size: int = 1
    num_workers: int = 4


@dataclass
class SolverConfig:
    """Optimisation (SPEC §4.1)."""

    lr: float = 1e-3
    max_iter: int = 60000
    poly_power: float = 0.9
    warmup_iters: int = 0
    warmup_factor: float = 0.001
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_accum: int = 1
    clip_grad_norm: float | None = None
    amp: str = "none"  # "none", "bf16" or "fp16" (fp16 on CUDA only)


@dataclass
class TrainConfig:
    """Run bookkeeping."""

    output_dir: str = "runs/panoptic_deeplab"
    seed: int = 0
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    # Layout of the weights and batches in training. "auto": channels_last on the CPU (oneDNN's convs and their
    # backward, 1.5x faster on the demo) and on CUDA with solver.amp (tensor-core kernels are NHWC);
    # "contiguous" (NCHW) otherwise. Checkpoints do not depend on it.
    memory_format: str = "auto"
    log_period: int = 20
    checkpoint_period: int = 1000
    keep_last: int = 3
    eval_period: int = 5000  # 0 disables periodic evaluation


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    targets: TargetConfig = field(default_factory=TargetConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    postprocess: PostProcessConfig = field(default_factory=PostProcessConfig)
    data: DataConfig = field(default_factory=DataConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ---------------------------------------------------------------------------------------------------
# Loading, overriding and saving
# ---------------------------------------------------------------------------------------------------

BASE_KEY = "_base_"
_PRESET_PACKAGE = "panoptic_deeplab"
_PRESET_DIR = "configs"


class ConfigError(ValueError):
    """A bad configuration file, key or value; the message names the file/override and the key."""


def available_presets() -> list[str]:
    """Names of the YAML presets shipped in ``panoptic_deeplab/configs``."""
    folder = resources.files(_PRESET_PACKAGE) / _PRESET_DIR
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _preset_text(name: str) -> str:
    entry = resources.files(_PRESET_PACKAGE) / _PRESET_DIR / f"{name}.yaml"
    if not entry.is_file():
        hint = _did_you_mean(name, available_presets())
        raise ConfigError(
            f"unknown preset {name!r}{hint}; available presets: {', '.join(available_presets())} "
            "(or give the path of a .yaml file)"
        )
    return entry.read_text(encoding="utf-8")


def _looks_like_path(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml")) or os.sep in spec or "/" in spec or Path(spec).is_file()


def _did_you_mean(name: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _read_yaml(spec: str, relative_to: Path | None, chain: tuple[str, ...]) -> dict[str, Any]:
    """Read a preset or file, resolving ``_base_`` recursively; returns the merged raw mapping.

    Every leaf is wrapped as ``_Tagged(value, source)`` so that errors can name the file a key came from.
    """
    if _looks_like_path(spec):
        path = Path(spec)
        if relative_to is not None and not path.is_absolute():
            path = relative_to / path
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file {source} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read config file {source}: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {source} is not a UTF-8 text (YAML) file: {exc}") from None
        folder: Path | None = path.resolve().parent
    else:
        source = f"preset {spec!r}"
        text = _preset_text(spec)
        folder = None
    if source in chain:
        raise ConfigError(f"{BASE_KEY} cycle: {' -> '.join(chain + (source,))}")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source} is not valid YAML: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must hold a mapping of sections, got {type(data).__name__}")
    base = data.pop(BASE_KEY, None)
    tagged = _tag(data, source)
    if base is None:
        return tagged
    if not isinstance(base, str):
        raise ConfigError(f"{source}: {BASE_KEY} must be a preset name or a file path, got {base!r}")
    return _deep_merge(_read_yaml(base, folder, chain + (source,)), tagged)


@dataclass(frozen=True)
class _Tagged:
    value: Any
    source: str


def _tag(data: Any, source: str) -> Any:
    if isinstance(data, dict):
        return {k: _tag(v, source) for k, v in data.items()}
    return _Tagged(data, source)


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert (lists -> tuples, '5e-4' -> float)."""

    def fail(expected: str) -> ConfigError:
        return ConfigError(f"{where}: expected {expected}, got {value!r}")

    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None or (
            isinstance(value, str) and value.lower() in ("none", "null") and str not in options
        ):
            if type(None) in options:
                return None
            raise fail(_type_name(tp))
        for option in options:
            if option is type(None):
                continue
            with contextlib.suppress(ConfigError):
                return _coerce(value, option, where)
        raise fail(_type_name(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:  # tuple[int, ...]: any length
            if not isinstance(value, (list, tuple)):
                raise fail(f"a list ({_type_name(tp)})")
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise fail(f"a list of {len(args)} values ({_type_name(tp)})")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise fail("true or false")
    if tp is int:
        if isinstance(value, bool):
            raise fail("an integer")
        if isinstance(value, int):
            return value
        # YAML 1.1 reads '6e4' as a string and 60000.0 as a float; accept integral numbers.
        try:
            number = float(value) if isinstance(value, (str, float)) else None
        except ValueError:
            number = None
        if number is not None and math.isfinite(number) and number.is_integer():
            return int(number)
        raise fail("an integer")
    if tp is float:
        if isinstance(value, bool):
            raise fail("a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # PyYAML reads '5e-4' (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise fail("a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        raise fail("a string")
    raise TypeError(f"{where}: unsupported config annotation {tp!r}")  # a bug in this module


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _build(cls: type, raw: dict[str, Any], prefix: str, defaults: Any = None) -> Any:
    """Instantiate dataclass ``cls`` from ``raw`` (tagged leaves) on top of ``defaults``."""
    kinds = _field_types(cls)
    current = defaults if defaults is not None else cls()
    values: dict[str, Any] = {}
    for key, item in raw.items():
        dotted = f"{prefix}{key}"
        if key not in kinds:
            source = _first_source(item)
            hint = _did_you_mean(str(key), kinds)
            raise ConfigError(
                f"{source}: unknown key {dotted!r}{hint}; "
                f"known keys{' of ' + prefix[:-1] if prefix else ''}: {', '.join(kinds)}"
            )
        tp = kinds[key]
        if dataclasses.is_dataclass(tp):
            if isinstance(item, _Tagged):
                if item.value is None:  # an empty section, 'model:' with nothing under it
                    continue
                raise ConfigError(f"{item.source}: {dotted!r} is a section; expected a mapping, got {item.value!r}")
            values[key] = _build(tp, item, dotted + ".", getattr(current, key))
        else:
            if isinstance(item, dict):
                raise ConfigError(
                    f"{_first_source(item)}: {dotted!r} is a value ({_type_name(tp)}), not a section"
                )
            values[key] = _coerce(item.value, tp, f"{item.source}: {dotted}")
    return dataclasses.replace(current, **values)


def _first_source(item: Any) -> str:
    if isinstance(item, _Tagged):
        return item.source
    for value in item.values():
        return _first_source(value)
    return "<config>"


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> Config:
    """Build a ``Config`` from a (possibly partial) nested mapping onto the defaults."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a mapping of sections, got {type(data).__name__}")
    cfg = _build(Config, _tag(data, source), "")
    validate_config(cfg)
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'solver.lr=5e-4'`` -> ``(['solver', 'lr'], '5e-4')``; the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r} is not of the form section.key=value (e.g. solver.lr=5e-4)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: the value is not valid YAML: {exc}") from exc
    return key.split("."), value


def _apply_override(cfg: Config, text: str) -> Config:
    path, value = parse_override(text)
    source = f"override {text!r}"
    # Walk the dataclasses to check the path before building, for a precise message.
    cls: type = Config
    for depth, name in enumerate(path):
        kinds = _field_types(cls)
        if name not in kinds:
            prefix = ".".join(path[:depth])
            hint = _did_you_mean(name, kinds)
            raise ConfigError(
                f"{source}: unknown key {'.'.join(path[: depth + 1])!r}{hint}; "
                f"known keys{' of ' + prefix if prefix else ''}: {', '.join(kinds)}"
            )
        tp = kinds[name]
        last = depth == len(path) - 1
        if not last and not dataclasses.is_dataclass(tp):
            raise ConfigError(f"{source}: {'.'.join(path[: depth + 1])!r} is a value, not a section")
        if last and dataclasses.is_dataclass(tp) and not isinstance(value, dict):
            raise ConfigError(
                f"{source}: {'.'.join(path)!r} is a section; give one of its keys "
                f"({', '.join(_field_types(tp))}) or a YAML mapping"
            )
        if last and tp is str and not isinstance(value, str) and value is not None:
            # A string field keeps the text as written ('1.10' stays '1.10').
            value = text.partition("=")[2].strip()
        cls = tp if dataclasses.is_dataclass(tp) else cls
    nested: Any = value
    for name in reversed(path):
        nested = {name: nested}
    return _build(Config, _tag(nested, source), "", cfg)


def load_config(preset_or_path: str | None = None, overrides: Sequence[str] = ()) -> Config:
    """A ``Config`` from a preset name or YAML file (``None``: the defaults) plus ``key=value`` overrides.

    YAML files may name ``_base_: <preset or relative path>`` to inherit; keys are merged section by
    section onto the dataclass defaults. Unknown keys and ill-typed values raise ``ConfigError``
    naming the file (or override) and the key.
    """
    raw = _read_yaml(preset_or_path, None, ()) if preset_or_path else {}
    cfg = _build(Config, raw, "")
    for text in overrides:
        cfg = _apply_override(cfg, text)
    validate_config(cfg)
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain dict (tuples as lists) of a ``Config`` or any section: YAML/JSON-ready."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(cfg)


def save_config(cfg: Config, path: str | os.PathLike[str]) -> None:
    """Write ``cfg`` as YAML atomically (temporary file + rename); ``load_config(path) == cfg``."""
    write_text_atomic(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None))


_CHOICES: dict[str, tuple[Any, ...]] = {
    "model.output_stride": (8, 16, 32),
    "model.center_head": ("dsconv", "d2"),
    "model.semantic_head": ("dsconv", "d2"),
    "model.offset_head": ("dsconv", "d2"),
    "model.decoder_fusion": ("dsconv", "d2"),
    "model.aspp_pool_conv": ("bn", "bias", "plain"),
    "model.init": ("normal", "he"),
    "solver.amp": ("none", "bf16", "fp16"),
    "train.memory_format": ("auto", "channels_last", "contiguous"),
}


def validate_config(cfg: Config) -> None:
    """Value checks beyond types (ranges, choices); raises ``ConfigError`` naming the key."""
    for dotted, choices in _CHOICES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if value not in choices:
            raise ConfigError(f"{dotted} = {value!r} is not one of {', '.join(map(repr, choices))}")
    positive = {
        "model.num_classes": cfg.model.num_classes,
        "data.crop_size[0]": cfg.data.crop_size[0],
        "data.crop_size[1]": cfg.data.crop_size[1],
        "data.batch_size": cfg.data.batch_size,
        "data.eval_batch_size": cfg.data.eval_batch_size,
        "data.min_scale": cfg.data.min_scale,
        "solver.max_iter": cfg.solver.max_iter,
        "solver.grad_accum": cfg.solver.grad_accum,
        "targets.sigma": cfg.targets.sigma,
        "postprocess.nms_kernel": cfg.postprocess.nms_kernel,
        "postprocess.top_k": cfg.postprocess.top_k,
        "train.log_period": cfg.train.log_period,
        "train.checkpoint_period": cfg.train.checkpoint_period,
    }
    for dotted, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{dotted} must be positive, got {value}")
    non_negative = {
        "data.num_workers": cfg.data.num_workers,
        "data.scale_step": cfg.data.scale_step,
        "solver.lr": cfg.solver.lr,
        "solver.warmup_iters": cfg.solver.warmup_iters,
        "solver.weight_decay": cfg.solver.weight_decay,
        "train.eval_period": cfg.train.eval_period,
        "train.keep_last": cfg.train.keep_last,
        "postprocess.stuff_area": cfg.postprocess.stuff_area,
        "model.size_divisibility": cfg.model.size_divisibility,
    }
    for dotted, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{dotted} must be >= 0, got {value}")
    size = cfg.model.inference_size
    if size is not None and (len(size) != 2 or any(int(v) < 1 for v in size)):
        raise ConfigError(f"model.inference_size must be two positive sizes (H, W) or null, got {list(size)}")
    if cfg.data.max_scale < cfg.data.min_scale:
        raise ConfigError(
            f"data.max_scale ({cfg.data.max_scale}) is smaller than data.min_scale ({cfg.data.min_scale})"
        )
    if cfg.postprocess.nms_kernel % 2 != 1:
        raise ConfigError(f"postprocess.nms_kernel must be odd, got {cfg.postprocess.nms_kernel}")
    if not 0 < cfg.loss.top_k_percent <= 1:
        raise ConfigError(f"loss.top_k_percent must lie in (0, 1], got {cfg.loss.top_k_percent}")
    if not 1 <= cfg.model.num_classes < 255:
        raise ConfigError(f"model.num_classes must lie in 1..254 (255 means void), got {cfg.model.num_classes}")

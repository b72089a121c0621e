"""Configuration: plain dataclasses, one per stage, composed into ``Config``.

Defaults are the project's choices of SPEC §0. YAML presets live in ``panoptic_deeplab/configs/``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    """The network (SPEC §0, §1)."""

    backbone: str = "mobilenetv3_large"  # a preset name or any timm model name
    pretrained: bool = True  # timm ImageNet weights (needs the network or backbone_weights)
    backbone_weights: str | None = None  # local file with the backbone's ImageNet weights
    num_classes: int = 19
    output_stride: int = 16  # 16 or 32
    aspp_channels: int = 256
    aspp_rates: tuple[int, int, int] | None = None  # None: (6, 12, 18) at os16, (3, 6, 9) at os32
    aspp_dropout: float = 0.1
    aspp_separable: bool = False  # D2 uses depthwise-separable ASPP convs
    semantic_decoder_channels: int = 256
    semantic_low_level_channels: tuple[int, int] = (64, 32)  # projections of the os8, os4 taps
    semantic_head_channels: int = 256
    instance_decoder_channels: int = 128
    instance_low_level_channels: tuple[int, int] = (32, 16)  # D2: (64, 32)
    instance_head_channels: int = 32
    center_head: str = "dsconv"  # "dsconv" (paper/DL2) or "d2" (two 3x3 convs)
    concat_low_level_first: bool = False  # D2 concatenates [low-level, upsampled]
    align_corners: bool = True
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

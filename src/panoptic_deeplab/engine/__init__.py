"""engine stage of panoptic_deeplab: the trainer, checkpoints and torch.distributed helpers."""

from panoptic_deeplab.checkpoint import CheckpointError, load_checkpoint
from panoptic_deeplab.engine.trainer import (
    CheckpointWriteError,
    Trainer,
    TrainingDivergedError,
    TrainingPreempted,
    TrainResult,
    poly_lr_factor,
    train,
)

__all__ = [
    "CheckpointError",
    "CheckpointWriteError",
    "Trainer",
    "TrainResult",
    "TrainingDivergedError",
    "TrainingPreempted",
    "load_checkpoint",
    "poly_lr_factor",
    "train",
]

"""torch.distributed helpers: process-group setup, model wrapping, reductions.

One process per device. ``torchrun`` sets the environment variables (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) that ``init_distributed`` reads; without them (or with
``WORLD_SIZE=1``) training runs in a single process and every helper here is a no-op.

Single node, N processes (GPUs use NCCL, one GPU per ``LOCAL_RANK``; CPU uses gloo)::

    torchrun --nproc_per_node N -m panoptic_deeplab.cli train --config PRESET [key=value ...]

Multiple nodes: the same command on every node, with torchrun's rendezvous flags, e.g. 2 nodes x 8 GPUs::

    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d \\
        --rdzv_endpoint HOST_OF_NODE0:29500 --rdzv_id RUN_NAME \\
        -m panoptic_deeplab.cli train --config PRESET train.output_dir=/shared/run

(or the static form ``--nnodes 2 --node_rank K --master_addr HOST --master_port 29500``). The output
directory should be on a file system that every node sees, so that ``--resume auto`` finds the checkpoints
that rank 0 wrote; only rank 0 writes files.

``data.batch_size`` is per process: the effective batch is ``batch_size x world_size x grad_accum``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from panoptic_deeplab.device import resolve_device

PROCESS_GROUP_TIMEOUT = timedelta(hours=1)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None when not distributed

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(device_preference: str = "auto") -> DistInfo:
    """Join the process group described by torchrun's environment variables (if ``WORLD_SIZE > 1``).

    The backend is NCCL for CUDA devices and gloo for CPU. Each process uses the device of its
    ``LOCAL_RANK``.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    device = resolve_device(device_preference, local_rank)
    if world_size <= 1:
        return DistInfo(device=device)
    local_world_size = _env_int("LOCAL_WORLD_SIZE", 1)
    if device.type == "cuda" and local_world_size > 1 and device_preference not in ("auto", "cuda"):
        # NCCL would stop every process with "Duplicate GPU detected" from inside DDP's first collective.
        raise ValueError(
            f"device {device_preference!r} puts all {local_world_size} processes of this machine on one GPU, which "
            "NCCL refuses; use device 'cuda' (or 'auto'): each process then takes cuda:LOCAL_RANK"
        )
    if device.type == "cuda":
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        # Periodic evaluation runs on rank 0 while the others wait in a collective: allow it an hour
        # rather than the default 10 minutes.
        dist.init_process_group(
            backend=backend, init_method="env://", rank=rank, world_size=world_size, timeout=PROCESS_GROUP_TIMEOUT
        )
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device, backend=backend)


def rank_prefix() -> str:
    """``"rank R of N: "`` in a process that torchrun started for a job of several, else ``""``: error messages of a
    job arrive interleaved in one log, and the rank says which process each one is from."""
    world_size = _env_int("WORLD_SIZE", 1)
    return f"rank {_env_int('RANK', 0)} of {world_size}: " if world_size > 1 else ""


# What gloo and NCCL raise in a process whose peer has gone (gloo's TCP pair reports a plain RuntimeError).
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted")


def is_peer_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective failing because another process of the job stopped."""
    return isinstance(exc, dist.DistError) or (isinstance(exc, RuntimeError) and any(s in str(exc) for s in _PEER_GONE))


def cleanup_distributed() -> None:
    """Leave the process group (safe to call when none exists)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        if info.backend == "nccl":
            dist.barrier(device_ids=[info.device.index])
        else:
            dist.barrier()


def supports_sync_batchnorm(info: DistInfo) -> bool:
    """SyncBatchNorm needs CUDA tensors and a backend that reduces them (NCCL), not gloo on CPU."""
    return info.distributed and info.device.type == "cuda" and info.backend == "nccl"


def wrap_model(model: nn.Module, info: DistInfo) -> nn.Module:
    """Move ``model`` to the process's device; in a distributed job convert BN to SyncBatchNorm where
    supported (SPEC §9.15: small per-GPU batches) and wrap in DistributedDataParallel."""
    model = model.to(info.device)
    if not info.distributed:
        return model
    if supports_sync_batchnorm(info):
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    # DDP broadcasts rank 0's parameters and buffers at construction, so all ranks start identical.
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def unwrap_model(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def broadcast_buffers(model: nn.Module, info: DistInfo, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BN running statistics) to every rank.

    Without SyncBatchNorm each rank's last forward updates its running statistics from its own batch
    (DDP broadcasts rank 0's only at the start of the next forward), so the ranks' buffers differ at
    the end of training even though the parameters are identical.
    """
    if info.distributed:
        for buffer in unwrap_model(model).buffers():
            dist.broadcast(buffer.data, src=src)


def reduce_mean(values: dict[str, torch.Tensor], info: DistInfo) -> dict[str, float]:
    """Average scalar tensors over ranks (for logging); returns python floats on every rank."""
    keys = sorted(values)
    stacked = torch.stack([values[k].detach().float().reshape(()) for k in keys]).to(info.device)
    if info.distributed:
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        stacked /= info.world_size
    return dict(zip(keys, stacked.tolist()))


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank when ``flag`` is true on at least one (a collective: every rank must call it)."""
    if not info.distributed:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, info: DistInfo, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]

"""Which device a run uses: names, LOCAL_RANK, and clear refusals."""

from __future__ import annotations

import pytest
import torch

from panoptic_deeplab.device import resolve_device


def test_cpu_and_explicit_devices() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match=r"device 'gpu' is not a device \(use auto, cpu, cuda or cuda:K\)"):
        resolve_device("gpu")


def test_cuda_devices_follow_local_rank_and_must_exist(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("cuda:0", local_rank=1) == torch.device("cuda", 0)
    with pytest.raises(ValueError) as info:
        resolve_device("cuda", local_rank=2)
    assert str(info.value) == (
        "device cuda:2 was asked for (device 'cuda', LOCAL_RANK 2) but only 2 CUDA device(s) are visible; start at "
        "most that many processes per machine (torchrun --nproc_per_node) or check CUDA_VISIBLE_DEVICES"
    )
    with pytest.raises(ValueError, match=r"device cuda:5 was asked for \(device 'cuda:5', LOCAL_RANK 0\)"):
        resolve_device("cuda:5")


def test_cuda_refused_without_cuda(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="device 'cuda:0' was asked for but CUDA is not available"):
        resolve_device("cuda:0")


def test_torchrun_processes_may_not_share_one_gpu(monkeypatch) -> None:
    from panoptic_deeplab.engine.distributed import init_distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "1"), ("LOCAL_RANK", "1"), ("LOCAL_WORLD_SIZE", "2")):
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError) as info:
        init_distributed("cuda:0")
    assert str(info.value) == (
        "device 'cuda:0' puts all 2 processes of this machine on one GPU, which NCCL refuses; use device 'cuda' "
        "(or 'auto'): each process then takes cuda:LOCAL_RANK"
    )
    with pytest.raises(ValueError, match=r"device cuda:1 was asked for \(device 'cuda', LOCAL_RANK 1\) but only 1"):
        init_distributed("cuda")

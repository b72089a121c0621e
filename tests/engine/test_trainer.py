"""The training loop on the tiny synthetic dataset: learning, exact resume, failures, outputs."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from panoptic_deeplab import checkpoint as ckpt_io
from panoptic_deeplab.cli import main as cli_main
from panoptic_deeplab.config import load_config
from panoptic_deeplab.data.coco_panoptic import DatasetError
from panoptic_deeplab.inference.predictor import Predictor
from panoptic_deeplab.engine import CheckpointError, Trainer, TrainingDivergedError, load_checkpoint, poly_lr_factor, train
from panoptic_deeplab.engine.trainer import state_dict_digest
from panoptic_deeplab.modeling.losses import PanopticDeepLabLoss
from tiny_setup import synthetic_data_overrides


def test_poly_lr_factor() -> None:
    assert poly_lr_factor(0, 100) == 1.0
    assert poly_lr_factor(100, 100) == 0.0
    assert poly_lr_factor(50, 100, power=0.9) == pytest.approx(0.5**0.9)
    assert poly_lr_factor(150, 100) == 0.0  # clamped past the end
    # linear warm-up from warmup_factor, multiplied onto the poly decay (SPEC §4.1)
    assert poly_lr_factor(0, 100, warmup_iters=10, warmup_factor=0.001) == pytest.approx(0.001)
    assert poly_lr_factor(5, 100, warmup_iters=10, warmup_factor=0.0) == pytest.approx(0.5 * 0.95**0.9)
    assert poly_lr_factor(10, 100, warmup_iters=10) == pytest.approx(0.9**0.9)
    with pytest.raises(ValueError, match="max_iter"):
        poly_lr_factor(0, 0)


def test_loss_falls_and_run_outputs(make_cfg, tmp_path: Path) -> None:
    # No augmentation: the same 6 images over and over, which a working loop fits quickly.
    cfg = make_cfg(
        "data.min_scale=1.0", "data.max_scale=1.0", "data.flip=false", "solver.lr=0.003",
        "solver.max_iter=18", "train.checkpoint_period=9", "train.eval_period=18",
    )
    result = train(cfg)
    losses = [h["total"] for h in result.history]
    assert len(losses) == 18 and all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, losses

    out = Path(cfg.train.output_dir)
    assert load_config(str(out / "config.yaml")) == cfg
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "metrics.jsonl").read_text().count('"type": "train"') == 18
    assert (out / "eval" / "eval_0000018.json").is_file()
    # periodic evaluation: PQ and mIoU; the first evaluation is the best so far
    (evaluation,) = result.evaluations
    assert 0.0 <= evaluation["PQ"] <= 1.0 and 0.0 <= evaluation["mIoU"] <= 1.0
    assert result.best_iteration == 18 and result.best_metric == evaluation["PQ"]
    best = load_checkpoint(out / "best.pt")
    assert best["iteration"] == 18 and best["best_metric"] == evaluation["PQ"]
    # the final checkpoint holds the final weights and everything needed to resume
    final = load_checkpoint(out / "model_0000018.pt")
    assert state_dict_digest(final["model"]) == result.weights_digest
    assert final["iteration"] == 18 and final["config"]["solver"]["max_iter"] == 18
    assert {"optimizer", "scheduler", "scaler", "rng", "best_metric", "meta"} <= set(final)
    # the checkpoint alone is enough to predict: categories travel with it
    predictor = Predictor.from_checkpoint(out / "model_0000018.pt", device="cpu")
    assert predictor.meta.to_json() == final["meta"]
    assert sorted(p.name for p in out.glob("model_*.pt")) == ["model_0000009.pt", "model_0000018.pt"]


def test_resume_continues_exactly(make_cfg, tmp_path: Path) -> None:
    # Augmentation, dropout, gradient accumulation and clipping all on; 3 batches per epoch, so the
    # resume point (micro-batch 4) lies inside the second epoch.
    common = ("solver.max_iter=4", "solver.grad_accum=2", "solver.clip_grad_norm=1.0", "train.checkpoint_period=2")
    straight = train(make_cfg(*common, f"train.output_dir={tmp_path / 'straight'}"))

    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copy(tmp_path / "straight" / "model_0000002.pt", resumed_dir)
    resumed = train(make_cfg(*common, f"train.output_dir={resumed_dir}"), resume="auto")
    assert [h["iteration"] for h in resumed.history] == [3, 4]
    assert [h["total"] for h in resumed.history] == [h["total"] for h in straight.history[2:]]

    a = load_checkpoint(tmp_path / "straight" / "model_0000004.pt")
    b = load_checkpoint(resumed_dir / "model_0000004.pt")
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert straight.weights_digest == resumed.weights_digest


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(make_cfg, monkeypatch) -> None:
    original = PanopticDeepLabLoss.forward
    calls = {"n": 0}

    def nan_on_third_call(self, outputs, targets):
        losses = original(self, outputs, targets)
        calls["n"] += 1
        if calls["n"] == 3:
            losses["center"] = losses["center"] * float("nan")
            losses["total"] = losses["total"] + losses["center"]
        return losses

    monkeypatch.setattr(PanopticDeepLabLoss, "forward", nan_on_third_call)
    cfg = make_cfg("solver.max_iter=5", "train.checkpoint_period=2")
    with pytest.raises(TrainingDivergedError) as info:
        train(cfg)
    message = str(info.value)
    assert "iteration 3" in message and "['center', 'total']" in message
    assert re.search(r"image ids \['\d+', '\d+'\]", message), message
    out = Path(cfg.train.output_dir)
    assert sorted(p.name for p in out.glob("*.pt")) == ["model_0000002.pt"]
    good = load_checkpoint(out / "model_0000002.pt")
    assert good["iteration"] == 2
    assert all(torch.isfinite(t).all() for t in good["model"].values() if t.is_floating_point())


def test_corrupt_image_names_the_file(make_cfg, private_data: Path) -> None:
    images = sorted((private_data / "train" / "images").iterdir())
    for image in images:  # every image, so that the first batch hits one whatever the order
        image.write_bytes(b"this is not an image")
    cfg = make_cfg("data.num_workers=1", "solver.max_iter=1", data_root=private_data)
    with pytest.raises(DatasetError) as info:
        train(cfg)
    assert re.search(r"train/images/\S+\.png", str(info.value)), str(info.value)


def test_bf16_autocast_on_cpu_and_fp16_refused(make_cfg) -> None:
    result = train(make_cfg("solver.amp=bf16", "solver.max_iter=1"))
    assert math.isfinite(result.history[0]["total"])
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        Trainer(make_cfg("solver.amp=fp16"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
def test_cuda_training_resumes_and_its_checkpoint_predicts_on_the_cpu(make_cfg, tmp_path: Path, amp: str) -> None:
    """Steps on CUDA at each precision (fp16 with its loss scaler): finite losses; a resumed run takes the same
    data and RNG path (losses equal up to CUDA's non-deterministic reductions); the checkpoint runs on the CPU."""
    common = ("train.device=cuda", f"solver.amp={amp}", "solver.max_iter=4", "train.checkpoint_period=2")
    straight = train(make_cfg(*common, f"train.output_dir={tmp_path / 'straight'}"))
    assert all(math.isfinite(h["total"]) for h in straight.history)
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copy(tmp_path / "straight" / "model_0000002.pt", resumed_dir)
    resumed = train(make_cfg(*common, f"train.output_dir={resumed_dir}"), resume="auto")
    assert [h["iteration"] for h in resumed.history] == [3, 4]
    expected = [h["total"] for h in straight.history[2:]]
    assert [h["total"] for h in resumed.history] == pytest.approx(expected, rel=1e-2 if amp != "none" else 1e-4)
    final = load_checkpoint(resumed_dir / "model_0000004.pt")
    assert all(t.device.type == "cpu" for t in final["model"].values())
    assert (final["scaler"] is not None) == (amp == "fp16")
    predictor = Predictor.from_checkpoint(resumed_dir / "model_0000004.pt", device="cpu")
    assert predictor.predict(torch.zeros(3, 64, 128)).label_map.shape == (64, 128)


def test_cli_train_and_bad_resume(tiny_overrides: list[str], tmp_path: Path, capsys) -> None:
    args = ["train", "--config", "synthetic_mnv3", *tiny_overrides, "solver.max_iter=1"]
    assert cli_main([*args, "--output-dir", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "model_0000001.pt").is_file()
    assert cli_main([*args, "--output-dir", str(tmp_path / "bad"), "--resume", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt: no such checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # refused before the run directory was made


def test_torchrun_two_processes_gloo(tiny_overrides: list[str], tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "panoptic_deeplab.cli", "train", "--config", "synthetic_mnv3", "--output-dir", str(out),
        *tiny_overrides,
        "solver.max_iter=3", "train.checkpoint_period=3",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    match = re.search(r"final weights sha256 per rank: ([0-9a-f]{64}) ([0-9a-f]{64})", log)
    assert match, log[-4000:]
    assert match.group(1) == match.group(2)
    ckpt = load_checkpoint(out / "model_0000003.pt")
    assert state_dict_digest(ckpt["model"]) == match.group(1)
    assert len(ckpt["rng"]) == 2  # one RNG state per rank
    assert "4 images per step" in log  # 2 per process x 2 processes


def test_torchrun_rank_that_fails_stops_the_job_and_is_named(tiny_overrides, private_data, tmp_path) -> None:
    """One rank raises (a corrupt image only it reads) while the other waits in DDP's gradient all-reduce: the
    job ends soon, not at the process group's timeout, and the output names the failed rank and the file."""
    images = sorted((private_data / "train" / "images").iterdir())
    images[0].write_bytes(b"this is not an image")  # read by one rank in the first epoch, by the other not at all
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "panoptic_deeplab.cli", "train", "--config", "synthetic_mnv3", "--output-dir", str(tmp_path / "ddp"),
        *tiny_overrides, *synthetic_data_overrides(private_data), "solver.max_iter=6",
    ]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=300)
    elapsed = time.monotonic() - start
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log[-4000:]
    assert elapsed < 120, f"took {elapsed:.0f} s\n{log[-4000:]}"
    failed = re.search(rf"error: rank (\d) of 2: {re.escape(str(images[0]))}: unreadable or truncated image", log)
    assert failed, log[-4000:]
    other = 1 - int(failed.group(1))
    assert f"[rank{other}]: Traceback" not in log, log[-4000:]
    assert f"error: rank {other} of 2: stopped because another process of this job failed" in log, log[-4000:]


def test_torchrun_checkpoint_write_failure_on_rank_0_stops_every_rank(tiny_overrides, tmp_path) -> None:
    """Rank 0 cannot write the checkpoint (a real EFBIG under RLIMIT_FSIZE) while rank 1 goes on to the next step's
    collectives: rank 0 names the file and the fault, rank 1 stops within seconds saying another process failed,
    and no partial checkpoint is left."""
    import resource

    def limit_file_size() -> None:  # Python ignores SIGXFSZ, so the write fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, resource.RLIM_INFINITY))

    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "panoptic_deeplab.cli", "train", "--config", "synthetic_mnv3", "--output-dir", str(out),
        *tiny_overrides, "solver.max_iter=4", "train.checkpoint_period=2",
    ]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=300, preexec_fn=limit_file_size)
    elapsed, log = time.monotonic() - start, proc.stdout + proc.stderr
    assert proc.returncode != 0 and elapsed < 120, log[-4000:]
    assert (f"error: rank 0 of 2: training stopped at iteration 2: cannot write {out / 'model_0000002.pt'} (File too "
            "large)") in log, log[-4000:]
    assert "error: rank 1 of 2: stopped because another process of this job failed" in log, log[-4000:]
    assert not list(out.glob("*.pt")) and not list(out.glob(".*.pt*"))


def test_fine_tune_from_a_checkpoint(make_cfg, tmp_path: Path) -> None:
    """model.init_checkpoint: training starts from a checkpoint's weights; other-shaped tensors stay initialised."""
    first = make_cfg("solver.max_iter=1", "train.checkpoint_period=1", f"train.output_dir={tmp_path / 'first'}")
    train(first)
    source = load_checkpoint(tmp_path / "first" / "model_0000001.pt")["model"]

    from panoptic_deeplab.checkpoint import initialize_from
    from panoptic_deeplab.modeling import build_model

    other_classes = dataclasses.replace(first.model, num_classes=first.model.num_classes + 2, pretrained=False)
    model = build_model(other_classes)
    kept = initialize_from(model, tmp_path / "first" / "model_0000001.pt")
    assert kept == ["semantic_head.predictor.bias", "semantic_head.predictor.weight"]
    state = model.state_dict()
    assert all(torch.equal(state[k], source[k]) for k in source if k not in kept)

    tuned = train(make_cfg("solver.max_iter=1", f"model.init_checkpoint={tmp_path / 'first' / 'model_0000001.pt'}",
                           f"train.output_dir={tmp_path / 'tuned'}"))
    assert tuned.iteration == 1
    other = dataclasses.replace(first.model, backbone="resnet18", pretrained=False)
    with pytest.raises(CheckpointError, match="its weights belong to another architecture"):
        initialize_from(build_model(other), tmp_path / "first" / "model_0000001.pt")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_checkpoints_and_resume_continues_exactly(tiny_overrides, tmp_path, signum) -> None:
    """A real signal to a real `train` process: checkpoint at the current iteration, exit 75, then resume to the
    weights of an uninterrupted run."""
    common = [*tiny_overrides, "solver.max_iter=12", "train.checkpoint_period=100", "data.num_workers=1"]
    straight = train(load_config("synthetic_mnv3", [*common, f"train.output_dir={tmp_path / 'straight'}"]))
    out = tmp_path / "preempted"
    command = [sys.executable, "-m", "panoptic_deeplab.cli", "train", "--config", "synthetic_mnv3", *common,
               "--output-dir", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2) and process.poll() is None:
        assert time.monotonic() < deadline, "training never logged"
        time.sleep(0.05)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 75, stderr
    (stopped_at, saved), = ckpt_io.list_checkpoints(out)
    assert 2 <= stopped_at < 12
    name = signal.Signals(signum).name
    assert f"preempted: {name} received: stopped at iteration {stopped_at}, checkpoint {saved} written; " \
           "continue with --resume auto" in stderr
    resumed = subprocess.run([*command, "--resume", "auto"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    a = load_checkpoint(tmp_path / "straight" / "model_0000012.pt")["model"]
    b = load_checkpoint(out / "model_0000012.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert straight.weights_digest in resumed.stderr + resumed.stdout


def test_full_disk_stops_training_and_keeps_the_last_checkpoint(tiny_overrides, tmp_path) -> None:
    """A real failed write: the second checkpoint exceeds the process's file size limit (RLIMIT_FSIZE, EFBIG, as
    on a full disk ENOSPC). Training stops with exit 1 naming the file and the last good checkpoint, leaves no
    partial file, and --resume auto then finishes the run."""
    out = tmp_path / "run"
    common = [*tiny_overrides, "train.checkpoint_period=2", "--output-dir", str(out)]
    first = subprocess.run([sys.executable, "-m", "panoptic_deeplab.cli", "train", "--config", "synthetic_mnv3",
                            "solver.max_iter=2", *common], capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    good = out / "model_0000002.pt"
    size, digest = good.stat().st_size, state_dict_digest(load_checkpoint(good)["model"])
    limited = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({size // 2}, resource.RLIM_INFINITY))\n"
        "from panoptic_deeplab.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    command = ["train", "--config", "synthetic_mnv3", "solver.max_iter=4", *common, "--resume", "auto"]
    stopped = subprocess.run([sys.executable, "-c", limited, *command], capture_output=True, text=True)
    assert stopped.returncode == 1, stopped.stderr
    assert stopped.stderr.strip().splitlines()[-1] == (
        f"error: training stopped at iteration 4: cannot write {out / 'model_0000004.pt'} (File too large); the file "
        f"there before, if any, is unchanged; the last good checkpoint is {good}; free space and continue with "
        "--resume auto")
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["config.yaml", "metrics.jsonl", good.name]
    assert state_dict_digest(load_checkpoint(good)["model"]) == digest
    resumed = subprocess.run([sys.executable, "-m", "panoptic_deeplab.cli", *command], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert load_checkpoint(out / "model_0000004.pt")["iteration"] == 4


def test_training_memory_format_choices():
    """train.memory_format: auto = channels_last on the CPU and with AMP on CUDA, NCHW for fp32 on CUDA; an
    explicit choice wins; anything else is refused by name."""
    from panoptic_deeplab.config import ConfigError
    from panoptic_deeplab.engine.trainer import training_memory_format

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    auto = load_config("synthetic_mnv3")
    assert training_memory_format(auto, cpu) == torch.channels_last
    assert training_memory_format(auto, cuda) == torch.contiguous_format
    assert training_memory_format(load_config("synthetic_mnv3", ["solver.amp=bf16"]), cuda) == torch.channels_last
    contiguous = load_config("synthetic_mnv3", ["train.memory_format=contiguous"])
    assert training_memory_format(contiguous, cpu) == torch.contiguous_format
    channels_last = load_config("synthetic_mnv3", ["train.memory_format=channels_last"])
    assert training_memory_format(channels_last, cuda) == torch.channels_last
    with pytest.raises(ConfigError, match=re.escape(
            "train.memory_format = 'nhwc' is not one of 'auto', 'channels_last', 'contiguous'")):
        load_config("synthetic_mnv3", ["train.memory_format=nhwc"])

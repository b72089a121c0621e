"""The training loop (SPEC §4.1): Adam, poly learning rate, gradient accumulation, mixed precision,
periodic evaluation, checkpoints, TensorBoard, single process or torch.distributed (see ``distributed.py``).

Exact resumption: a checkpoint after ``it`` optimisation steps restores the model, optimizer, scheduler,
scaler and every rank's RNG states; the data stream is positioned at micro-batch ``m = it * grad_accum``
(epoch ``m // batches_per_epoch``, whose sampler skips the batches already seen without loading them:
``data.dataset.iterate_batches``). Since the dataset seeds its augmentation per sample from
``(seed, epoch, index)``, the resumed run sees the same batches, with the same augmentation, as an
uninterrupted one and ends with the same weights (with the same number of processes).
"""

from __future__ import annotations

import dataclasses

import hashlib
import json
import logging
import math
import random
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from panoptic_deeplab import checkpoint as ckpt_io
from panoptic_deeplab.config import Config, config_to_dict, save_config, validate_config
from panoptic_deeplab.engine.distributed import (
    DistInfo,
    any_rank,
    barrier,
    broadcast_buffers,
    broadcast_object,
    cleanup_distributed,
    gather_objects,
    init_distributed,
    reduce_mean,
    unwrap_model,
    wrap_model,
)

logger = logging.getLogger("panoptic_deeplab.train")

LOSS_TERMS = ("total", "semantic", "center", "offset")


# What schedulers send before they kill a job (SLURM: --signal=USR1@120 or its SIGTERM at the time limit).
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class TrainingPreempted(RuntimeError):
    """Training stopped on a preemption signal after writing a checkpoint at the current iteration."""

    def __init__(self, signal_name: str, iteration: int, checkpoint: Path | None) -> None:
        self.signal_name, self.iteration, self.checkpoint = signal_name, iteration, checkpoint
        where = f"checkpoint {checkpoint} written" if checkpoint is not None else "checkpoint written by rank 0"
        super().__init__(f"{signal_name} received: stopped at iteration {iteration}, {where}; continue with "
                         "--resume auto")


class _StopRequest:
    """Records a preemption signal while training runs (handlers only in the main thread, restored after)."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopRequest":
        if threading.current_thread() is threading.main_thread():
            for signum in PREEMPTION_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            logger.warning("%s received: saving a checkpoint after the current iteration", self.signal_name)

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class TrainingDivergedError(RuntimeError):
    """A loss became NaN or infinite; no optimizer step and no checkpoint were made with it."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (full disk, quota): training stopped, the files on disk are intact."""


def poly_lr_factor(it: int, max_iter: int, power: float = 0.9, warmup_iters: int = 0, warmup_factor: float = 0.001) -> float:
    """Multiplier of the base learning rate after ``it`` steps (SPEC §4.1).

    Poly decay ``(1 - it / max_iter) ** power`` to 0 at ``max_iter``; during the first ``warmup_iters``
    steps it is further multiplied by a linear ramp from ``warmup_factor`` to 1 (detectron2's WarmupPolyLR).
    """
    if max_iter <= 0:
        raise ValueError(f"solver.max_iter must be positive, got {max_iter}")
    it = min(max(it, 0), max_iter)
    factor = (1.0 - it / max_iter) ** power
    if it < warmup_iters:
        alpha = it / warmup_iters
        factor *= warmup_factor * (1.0 - alpha) + alpha
    return factor


def state_dict_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the names, dtypes, shapes and bytes of a state dict (to compare weights across ranks)."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class TrainResult:
    """What ``Trainer.train`` returns."""

    iteration: int
    # one entry per log line of this process (every train.log_period steps): iteration, lr, the losses
    # averaged over the steps since the previous entry, images_per_s
    history: list[dict[str, float]] = field(default_factory=list)
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    best_metric: float | None = None
    best_iteration: int | None = None
    last_checkpoint: Path | None = None
    weights_digest: str = ""


def training_memory_format(cfg: Config, device: torch.device) -> torch.memory_format:
    """The layout ``train.memory_format`` asks for on ``device`` (see :class:`TrainConfig`)."""
    choice = cfg.train.memory_format
    if choice == "auto":
        choice = "channels_last" if device.type == "cpu" or cfg.solver.amp != "none" else "contiguous"
    return torch.channels_last if choice == "channels_last" else torch.contiguous_format


def _autocast(amp: str, device: torch.device):
    if amp == "none":
        return nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


class Trainer:
    """Builds the model, loss, optimizer, scheduler and loaders from ``cfg`` and runs training.

    ``resume``: ``None`` (fresh run), ``"auto"`` (latest checkpoint in ``cfg.train.output_dir``, if any)
    or a checkpoint path. Call ``close()`` (or use the ``train`` function) to release the process group.
    """

    def __init__(self, cfg: Config, resume: str | None = None, progress: bool = True) -> None:
        from panoptic_deeplab.data.dataset import batches_per_epoch, build_train_loader
        from panoptic_deeplab.modeling import build_model
        from panoptic_deeplab.modeling.losses import PanopticDeepLabLoss

        validate_config(cfg)
        self.cfg = cfg
        self.progress = progress
        self.dist: DistInfo = init_distributed(cfg.train.device)
        self.device = self.dist.device
        self.output_dir = Path(cfg.train.output_dir)
        self.is_main = self.dist.is_main
        if cfg.solver.amp == "fp16" and self.device.type != "cuda":
            raise ValueError("solver.amp=fp16 needs a CUDA device; use solver.amp=bf16 on CPU")

        # Same seed on every rank for the initial weights (DDP also broadcasts rank 0's), then a
        # rank-specific one so that dropout differs between ranks.
        seed_everything(cfg.train.seed)
        if cfg.model.init_checkpoint:
            # The checkpoint's weights replace the ImageNet ones: do not fetch those.
            model = build_model(dataclasses.replace(cfg.model, pretrained=False, backbone_weights=None))
            kept = ckpt_io.initialize_from(model, cfg.model.init_checkpoint)
            logger.info("initialised from %s%s", cfg.model.init_checkpoint,
                        f"; kept the new initialisation of {', '.join(kept)} (other shapes)" if kept else "")
        else:
            model = build_model(cfg.model)
        seed_everything(cfg.train.seed + self.dist.rank)
        self.memory_format = training_memory_format(cfg, self.device)
        self.model = wrap_model(model.to(memory_format=self.memory_format), self.dist)
        self.criterion = PanopticDeepLabLoss(cfg.loss, void_channel=cfg.model.semantic_void_channel)
        s = cfg.solver
        self.optimizer = torch.optim.Adam(
            unwrap_model(self.model).parameters(),
            lr=s.lr,
            betas=tuple(s.betas),
            eps=s.eps,
            weight_decay=s.weight_decay,  # SPEC §4.1: 0 (no weight decay)
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            partial(
                poly_lr_factor,
                max_iter=s.max_iter,
                power=s.poly_power,
                warmup_iters=s.warmup_iters,
                warmup_factor=s.warmup_factor,
            ),
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=s.amp == "fp16")
        self.iteration = 0
        self.best_metric: float | None = None
        self.best_iteration: int | None = None
        self.last_checkpoint: Path | None = None
        self.evaluations: list[dict[str, Any]] = []

        resume_path = broadcast_object(  # before writing anything: a wrong --resume leaves no run directory
            ckpt_io.resolve_resume(resume, self.output_dir) if self.is_main else None, self.dist
        )
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.output_dir / "config.yaml")
        if resume_path is not None:
            self._load(Path(resume_path))

        self.train_loader = build_train_loader(
            cfg, distributed=self.dist.distributed, rank=self.dist.rank, world_size=self.dist.world_size, seed=cfg.train.seed
        )
        if self.is_main:
            logger.info("%d batches per epoch and process", batches_per_epoch(self.train_loader))
        self._writer = None

    # ------------------------------------------------------------------------------------ checkpoints

    def _load(self, path: Path) -> None:
        # On the CPU: RNG states must be CPU tensors (restore_rng_state), and load_state_dict copies weights and
        # optimizer state onto the model's device anyway.
        state = ckpt_io.load_checkpoint(path, map_location="cpu")
        try:
            unwrap_model(self.model).load_state_dict(state["model"])
        except RuntimeError as exc:
            raise ckpt_io.CheckpointError(f"{path}: the weights do not fit the configured model: {exc}") from exc
        for key in ("optimizer", "scheduler", "iteration"):
            if key not in state:
                raise ckpt_io.CheckpointError(f"{path} cannot resume training: it has no {key!r} entry")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.iteration = int(state["iteration"])
        self.best_metric = state.get("best_metric")
        self.best_iteration = state.get("best_iteration")
        rng = state.get("rng") or []
        if len(rng) == self.dist.world_size:
            ckpt_io.restore_rng_state(rng[self.dist.rank])
        else:
            logger.warning(
                "%s was written by %d process(es), this run has %d: RNG states are not restored, so the "
                "continuation is not bit-identical to an uninterrupted run",
                path,
                len(rng),
                self.dist.world_size,
            )
        self.last_checkpoint = path
        if self.is_main:
            logger.info("resumed from %s at iteration %d", path, self.iteration)

    def _checkpoint_state(self, rng: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "model": unwrap_model(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "iteration": self.iteration,
            "config": config_to_dict(self.cfg),
            # categories, so that a checkpoint alone is enough to predict (names, thing ids, colors)
            "meta": self.train_loader.dataset.meta.to_json(),
            "rng": rng,
            "best_metric": self.best_metric,
            "best_iteration": self.best_iteration,
        }

    def _assert_finite_weights(self) -> None:
        bad = [n for n, p in unwrap_model(self.model).state_dict().items() if p.is_floating_point() and not torch.isfinite(p).all()]
        if bad:
            raise TrainingDivergedError(
                f"iteration {self.iteration}: non-finite weights in {bad[:5]}{' ...' if len(bad) > 5 else ''}; "
                "no checkpoint written"
            )

    def save_checkpoint(self, best: bool = False) -> Path | None:
        """Write ``model_<iteration>.pt`` (or ``best.pt``) from rank 0; every rank must call it."""
        self._assert_finite_weights()  # identical weights on every rank: all raise together
        rng = gather_objects(ckpt_io.capture_rng_state(), self.dist)
        path = None
        if self.is_main:
            name = ckpt_io.BEST_NAME if best else ckpt_io.checkpoint_name(self.iteration)
            try:
                path = ckpt_io.atomic_torch_save(self._checkpoint_state(rng), self.output_dir / name)
            except OSError as exc:
                last = self.last_checkpoint or "none yet"
                raise CheckpointWriteError(
                    f"training stopped at iteration {self.iteration}: {exc}; the last good checkpoint is {last}; "
                    "free space and continue with --resume auto"
                ) from exc
            if not best:
                ckpt_io.prune_checkpoints(self.output_dir, self.cfg.train.keep_last)
                self.last_checkpoint = path
        barrier(self.dist)
        return path

    # ---------------------------------------------------------------------------------------- data

    def _to_device(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images = batch["image"].to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        targets = {k: v.to(self.device, non_blocking=True) for k, v in batch["targets"].items()}
        return images, targets

    # ---------------------------------------------------------------------------------------- steps

    def _step(self, stream: Iterator[dict[str, Any]]) -> dict[str, float]:
        """One optimisation step over ``grad_accum`` micro-batches; returns the rank-averaged losses."""
        s = self.cfg.solver
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        sums = {k: torch.zeros((), device=self.device) for k in LOSS_TERMS}
        micro: list[tuple[torch.Tensor, list[str]]] = []  # (loss terms, image ids): for the error message
        for k in range(s.grad_accum):
            batch = next(stream)
            images, targets = self._to_device(batch)
            sync = k == s.grad_accum - 1 or not isinstance(self.model, nn.parallel.DistributedDataParallel)
            with nullcontext() if sync else self.model.no_sync():
                with _autocast(s.amp, self.device):
                    outputs = self.model(images)
                losses = self.criterion({k_: v.float() for k_, v in outputs.items()}, targets)
                # Backward even on a non-finite loss: skipping it on one rank would leave the others
                # waiting in DDP's gradient all-reduce. The step is abandoned below, before the optimizer.
                self.scaler.scale(losses["total"] / s.grad_accum).backward()
            micro.append((torch.stack([losses[n].detach() for n in LOSS_TERMS]), [str(i) for i in batch["image_id"]]))
            for name in LOSS_TERMS:
                sums[name] += losses[name].detach() / s.grad_accum
        # One collective (and one device sync) per step: a non-finite loss on any rank makes the mean
        # non-finite on all ranks, so that they all stop together.
        mean_losses = reduce_mean(sums, self.dist)
        if not all(math.isfinite(v) for v in mean_losses.values()):
            bad = []
            for terms, ids in micro:
                finite = torch.isfinite(terms).tolist()
                if not all(finite):
                    bad.append(([n for n, ok in zip(LOSS_TERMS, finite) if not ok], ids))
            self._raise_diverged(bad)
        if s.clip_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), s.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.iteration += 1
        return mean_losses

    def _raise_diverged(self, bad: list[tuple[list[str], list[str]]]) -> None:
        reports = gather_objects(bad, self.dist)
        terms = sorted({t for rank_bad in reports for terms, _ in rank_bad for t in terms})
        ids = [i for rank_bad in reports for _, ids_ in rank_bad for i in ids_]
        last = f"; the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else ""
        raise TrainingDivergedError(
            f"training diverged at iteration {self.iteration + 1}: non-finite loss term(s) {terms} "
            f"on the batch with image ids {ids}; no optimizer step and no checkpoint were made{last}"
        )

    # ------------------------------------------------------------------------------------ evaluation

    def evaluate(self) -> dict[str, Any]:
        """PQ, mIoU and mask AP of the current weights on the val split; computed by rank 0 (which also writes
        the full report to ``output_dir/eval/eval_<iteration>.json``), the summary sent to every rank."""
        from panoptic_deeplab.evaluation.evaluator import evaluate_in_memory

        metrics = None
        if self.is_main:
            report = evaluate_in_memory(unwrap_model(self.model), self.cfg, self.train_loader.dataset.meta)
            report.save_json(self.output_dir / "eval" / f"eval_{self.iteration:07d}.json")
            metrics = {"iteration": self.iteration, **report.summary()}
        return broadcast_object(metrics, self.dist)

    def _run_evaluation(self) -> None:
        metrics = self.evaluate()
        self.evaluations.append(metrics)
        if self.is_main:
            logger.info(
                "iteration %d: PQ %.2f (things %.2f, stuff %.2f), mIoU %.2f",
                self.iteration,
                100 * metrics["PQ"],
                100 * metrics["PQ_things"],
                100 * metrics["PQ_stuff"],
                100 * metrics["mIoU"],
            )
            for key, value in metrics.items():
                if key != "iteration" and value is not None:  # AP is None without thing ground truth
                    self.writer.add_scalar(f"val/{key}", value, self.iteration)
            with open(self.output_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"type": "eval", **metrics}) + "\n")
        if self.best_metric is None or metrics["PQ"] > self.best_metric:
            self.best_metric, self.best_iteration = metrics["PQ"], self.iteration
            self.save_checkpoint(best=True)

    # ---------------------------------------------------------------------------------------- loop

    @property
    def writer(self):
        """TensorBoard writer of rank 0 (created on first use)."""
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.output_dir / "tensorboard"))
        return self._writer

    def train(self) -> TrainResult:
        """Run from the current iteration to ``solver.max_iter``."""
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        from panoptic_deeplab.data.dataset import iterate_batches

        s, t = self.cfg.solver, self.cfg.train
        images_per_step = self.cfg.data.batch_size * s.grad_accum * self.dist.world_size
        history: list[dict[str, float]] = []
        # Micro-batch b of the run is batch b % per_epoch of epoch b // per_epoch, whether the run started
        # at 0 or resumed: the sampler skips the batches already seen without loading them.
        stream = iterate_batches(self.train_loader, self.iteration * s.grad_accum)
        bar = tqdm(total=s.max_iter, initial=self.iteration, disable=not (self.is_main and self.progress), desc="train",
                   dynamic_ncols=True)
        window: dict[str, float] = {}  # sums of the losses since the last log line
        window_iters, window_start = 0, time.perf_counter()
        if self.is_main:
            logger.info(
                "training from iteration %d to %d on %s (%d process(es), %d images per step)",
                self.iteration, s.max_iter, self.device, self.dist.world_size, images_per_step,
            )
        try:
            with logging_redirect_tqdm(), _StopRequest() as stop:  # log lines above the progress bar
                while self.iteration < s.max_iter:
                    lr = self.optimizer.param_groups[0]["lr"]
                    losses = self._step(stream)
                    for name, value in losses.items():
                        window[name] = window.get(name, 0.0) + value
                    window_iters += 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{losses['total']:.4f}", lr=f"{lr:.2e}")
                    if self.iteration % t.log_period == 0 or self.iteration == s.max_iter:
                        elapsed = time.perf_counter() - window_start
                        record = {
                            "iteration": self.iteration,
                            "lr": lr,
                            **{name: total / window_iters for name, total in window.items()},
                            "images_per_s": window_iters * images_per_step / max(elapsed, 1e-9),
                        }
                        history.append(record)
                        if self.is_main:
                            self._log(record)
                        window, window_iters = {}, 0
                    # Evaluate before checkpointing, so that the checkpoint carries the updated best metric.
                    if t.eval_period > 0 and (self.iteration % t.eval_period == 0 or self.iteration == s.max_iter):
                        self._run_evaluation()
                    saved = self.iteration % t.checkpoint_period == 0 or self.iteration == s.max_iter
                    if saved:
                        self.save_checkpoint()
                    # Every rank stops at the same iteration when any of them was signalled.
                    if any_rank(stop.signal_name is not None, self.dist):
                        if not saved:
                            self.save_checkpoint()
                        raise TrainingPreempted(stop.signal_name or "a preemption signal on another rank",
                                                self.iteration, self.last_checkpoint if self.is_main else None)
                    if window_iters == 0:  # the throughput window starts after logging, evaluating, saving
                        window_start = time.perf_counter()
        finally:
            bar.close()
            if self._writer is not None:
                self._writer.close()
                self._writer = None
        digest = self._check_weights_in_sync()
        return TrainResult(
            iteration=self.iteration,
            history=history,
            evaluations=self.evaluations,
            best_metric=self.best_metric,
            best_iteration=self.best_iteration,
            last_checkpoint=self.last_checkpoint,
            weights_digest=digest,
        )

    def _log(self, record: dict[str, float]) -> None:
        it = int(record["iteration"])
        for name in LOSS_TERMS:
            self.writer.add_scalar(f"loss/{name}", record[name], it)
        self.writer.add_scalar("train/lr", record["lr"], it)
        self.writer.add_scalar("train/images_per_s", record["images_per_s"], it)
        with open(self.output_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"type": "train", **record}) + "\n")
        logger.info(
            "iteration %d/%d: loss %.4f (semantic %.4f, center %.5f, offset %.4f), lr %.3e, %.1f images/s",
            it, self.cfg.solver.max_iter, record["total"], record["semantic"], record["center"],
            record["offset"], record["lr"], record["images_per_s"],
        )

    def _check_weights_in_sync(self) -> str:
        """Digest of the final weights; in a distributed run, verify that every rank holds the same ones."""
        broadcast_buffers(self.model, self.dist)  # rank 0's BN statistics, as in its checkpoints
        digest = state_dict_digest(unwrap_model(self.model).state_dict())
        digests = gather_objects(digest, self.dist)
        if self.is_main:
            logger.info("final weights sha256 per rank: %s", " ".join(digests))
        if len(set(digests)) != 1:
            raise RuntimeError(f"the ranks ended with different weights (sha256 per rank: {digests})")
        return digest

    def close(self) -> None:
        """Release the TensorBoard writer and the process group."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        cleanup_distributed()


def train(cfg: Config, resume: str | None = None, progress: bool = True) -> TrainResult:
    """Train with ``cfg`` (see ``Trainer``); joins/leaves the torch.distributed group around the run.
    ``progress=False`` hides the progress bar (the log lines stay)."""
    trainer = None
    try:
        trainer = Trainer(cfg, resume=resume, progress=progress)
        return trainer.train()
    finally:
        if trainer is not None:
            trainer.close()
        else:
            cleanup_distributed()

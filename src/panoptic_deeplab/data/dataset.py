"""A PyTorch dataset over any COCO-panoptic dataset, and the train / eval DataLoaders.

Reproducibility (what the trainer relies on for exact resume): the train loader's sampler yields
``(index, sample_seed)`` pairs, ``sample_seed`` being a hash of ``(seed, epoch, index)``, and the
dataset seeds each sample's augmentation with it. The augmentation of a sample is therefore a pure
function of ``(seed, epoch, index)``: it does not depend on the number of workers, on which worker
loads it, or on what was loaded before. Resuming at batch ``b`` only needs the epoch's shuffled order
(seeded by ``seed + epoch``) and skipping its first ``b % batches_per_epoch`` batches *in the sampler*,
without loading them: see :func:`iterate_batches`.
"""

from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.util  # registers multiprocessing's exit hook before ours (see _stop_workers_left_at_exit)
import os
import random
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, default_collate

from panoptic_deeplab.config import Config, SplitConfig
from panoptic_deeplab.data.coco_panoptic import (
    VOID_LABEL,
    DatasetError,
    DatasetMeta,
    ImageInfo,
    PanopticAnnotation,
    Problem,
    load_annotation,
    load_image,
    load_panoptic_json,
)
from panoptic_deeplab.data.targets import TargetGenerator
from panoptic_deeplab.data.transforms import IMAGENET_MEAN, EvalTransform, TrainTransform, pad_to_size

# Sizes handed to the network are k * 32 (+ 1): valid at output strides 8, 16 and 32 alike.
EVAL_SIZE_STRIDE = 32
_IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg")


class JointTransform(Protocol):
    """``(image [3, H, W] uint8, label [H, W] int64, generator or None) -> (image, label)``."""

    def __call__(
        self, image: torch.Tensor, label: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of dataset item ``index`` in ``epoch`` of a run seeded ``seed``."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, index]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])  # < 2**63: a valid torch seed


class PanopticDataset(Dataset):
    """Images + COCO panoptic annotations -> training / evaluation samples.

    ``dataset[i]`` (or ``dataset[(i, seed)]``, as the train sampler asks) returns a dict:

    * ``image``: float32 ``[3, H, W]`` in [0, 1] (the model normalises);
    * ``label_map``: int64 ``[H, W]``, ``train_id * 1000 + instance``, void ``VOID_LABEL``;
    * ``targets``: the dict of ``target_generator(label_map)`` when a generator is given;
    * ``image_id`` (str), ``file_name`` (the annotation's PNG name), ``index`` (int64 scalar);
    * ``orig_size``: int64 ``[2]`` ``(H, W)`` of the image on disk, ``valid_size``: int64 ``[2]`` of
      the returned tensors (after eval padding, ``pred[..., :H, :W]`` recovers the original).

    Images are found by the JSON's ``images[].file_name`` below ``split.images`` (directly or in any
    subfolder, e.g. Cityscapes' city folders), else by the annotation's stem with a .jpg/.png suffix.
    Missing or unreadable files raise :class:`DatasetError` naming the file.
    """

    def __init__(
        self,
        split: SplitConfig,
        transform: JointTransform | None = None,
        target_generator: Callable[[torch.Tensor], dict[str, torch.Tensor]] | None = None,
        meta: DatasetMeta | None = None,
        *,
        name: str = "split",
    ) -> None:
        for key in ("images", "json", "panoptic"):
            if not getattr(split, key):
                raise ValueError(f"data.{name}.{key} is not set: give the dataset's paths in the config")
        self.split = split
        self.transform = transform
        self.target_generator = target_generator
        coco = load_panoptic_json(split.json)
        self.meta = meta if meta is not None else coco.meta
        self.annotations: list[PanopticAnnotation] = coco.annotations
        if not self.annotations:
            raise DatasetError(Problem(split.json, "no annotations"))
        # An image id that repeats would silently pair annotations with the wrong image (or one image twice).
        for what, ids in (("'images'", [im.id for im in coco.images]),
                          ("'annotations'", [a.image_id for a in self.annotations])):
            repeated = [(image_id, n) for image_id, n in Counter(ids).items() if n > 1]
            if repeated:
                image_id, count = repeated[0]
                raise DatasetError(Problem(split.json, f"image id {image_id!r} appears {count} times in {what} "
                                           f"({len(repeated)} repeated id(s)): each image needs one id and one "
                                           "annotation; panoptic-deeplab validate lists them all"))
        images = coco.image_by_id()
        self.image_infos: list[ImageInfo | None] = [images.get(a.image_id) for a in self.annotations]
        self.image_paths = self._resolve_images(Path(split.images))

    def _resolve_images(self, folder: Path) -> list[str]:
        if not folder.is_dir():
            raise DatasetError(Problem(str(folder), "image folder not found"))
        # One walk indexes every file by relative path and by name (Cityscapes: <city>/<name>).
        by_name: dict[str, str] = {}
        by_relpath: dict[str, str] = {}
        for root, _, files in os.walk(folder):
            for file in files:
                full = os.path.join(root, file)
                by_relpath[os.path.relpath(full, folder)] = full
                by_name.setdefault(file, full)

        def lookup(name: str) -> str | None:
            return by_relpath.get(os.path.normpath(name)) or by_name.get(os.path.basename(name))

        paths: list[str] = []
        for annotation, info in zip(self.annotations, self.image_infos):
            stem = Path(annotation.file_name).stem
            candidates = ([info.file_name] if info is not None else []) + [stem + s for s in _IMAGE_SUFFIXES]
            found = next((path for path in map(lookup, candidates) if path is not None), None)
            if found is None:
                raise DatasetError(Problem(
                    str(folder / candidates[0]),
                    f"image of annotation {annotation.file_name} (image id {annotation.image_id!r}) not found "
                    f"below {folder}",
                ))
            paths.append(found)
        return paths

    def __len__(self) -> int:
        return len(self.annotations)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, seed = (int(key[0]), int(key[1])) if isinstance(key, tuple) else (int(key), None)
        annotation = self.annotations[index]
        image = load_image(self.image_paths[index])  # DatasetError naming the file
        height, width = image.shape[:2]
        label = load_annotation(
            annotation, self.split.panoptic, self.meta, self.image_infos[index], (height, width)
        )
        image_t = torch.from_numpy(image.transpose(2, 0, 1).copy())  # CHW, writable
        label_t = torch.from_numpy(label.astype(np.int64))
        if self.transform is not None:
            generator = torch.Generator().manual_seed(seed) if seed is not None else None
            image_t, label_t = self.transform(image_t, label_t, generator)
        sample: dict[str, Any] = {
            "image": image_t.float().div_(255.0) if image_t.dtype == torch.uint8 else image_t.float(),
            "label_map": label_t.long(),
            "image_id": str(annotation.image_id),
            "file_name": annotation.file_name,
            "index": torch.tensor(index, dtype=torch.int64),
            "orig_size": torch.tensor([height, width], dtype=torch.int64),
            "valid_size": torch.tensor(list(image_t.shape[-2:]), dtype=torch.int64),
        }
        if self.target_generator is not None:
            sample["targets"] = self.target_generator(sample["label_map"])
        return sample


class TrainSampler(Sampler):
    """Epoch-shuffled, per-process shard of the indices, each paired with its augmentation seed.

    Wraps ``DistributedSampler`` (also with one process: its order is a pure function of
    ``seed + epoch``), drops the tail so every process gets the same count, and can start an epoch
    part-way (``set_start``) for resuming.
    """

    def __init__(self, dataset: Dataset, *, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True) -> None:
        self.seed = seed
        self.epoch = 0
        self.start = 0
        self.order = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=True
        )

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's order (and augmentation seeds); resets ``set_start`` to 0."""
        self.epoch = epoch
        self.start = 0
        self.order.set_epoch(epoch)

    def set_start(self, position: int) -> None:
        """Skip the first ``position`` samples of this process's share of the current epoch."""
        if not 0 <= position <= self.samples_per_epoch:
            raise ValueError(f"start position {position} outside 0..{self.samples_per_epoch}")
        self.start = position

    @property
    def samples_per_epoch(self) -> int:
        return len(self.order)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for position, index in enumerate(self.order):
            if position >= self.start:
                yield index, sample_seed(self.seed, self.epoch, index)

    def __len__(self) -> int:
        return self.samples_per_epoch - self.start


def _seed_worker(worker_id: int) -> None:
    # A scheduler's preemption signal reaches every process of the job: the trainer saves and stops on it, and
    # shuts its workers down itself; a worker dying of it first would end the run without that checkpoint.
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)
    # torch seeds each worker from the loader's generator; derive numpy's and random's from it so
    # any library randomness in a worker is reproducible too.
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


@atexit.register
def _stop_workers_left_at_exit(grace_s: float = 1.0) -> None:
    """Stop the daemonic children still alive when the interpreter exits, killing those that ignore SIGTERM.

    Our loader workers ignore SIGTERM (see ``_seed_worker``), and torch leaves the workers of a loader still
    alive at exit (persistent workers, an iterator kept by a traceback) to multiprocessing's exit hook, which
    sends SIGTERM to every daemonic child and then joins it without a timeout: the exit would hang forever.
    This hook does what that one does with a bounded wait, then SIGKILL. atexit runs hooks last in, first out:
    this one, registered after multiprocessing's, runs before it.
    """
    children = [process for process in multiprocessing.active_children() if process.daemon]
    for process in children:
        process.terminate()
    deadline = time.monotonic() + grace_s
    for process in children:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()


def _uses_cuda(device: str) -> bool:
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def _check_classes(cfg: Config, meta: DatasetMeta, json_path: str) -> None:
    if meta.num_classes != cfg.model.num_classes:
        raise ValueError(
            f"{json_path} has {meta.num_classes} categories but model.num_classes is "
            f"{cfg.model.num_classes}; set model.num_classes={meta.num_classes}"
        )


def build_train_loader(
    cfg: Config,
    *,
    distributed: bool = False,
    rank: int = 0,
    world_size: int = 1,
    seed: int | None = None,
) -> DataLoader:
    """The training DataLoader of ``cfg.data.train``: augmentation, targets, shuffled and sharded.

    ``seed`` defaults to ``cfg.train.seed``. ``loader.batch_sampler.sampler`` is a
    :class:`TrainSampler`; iterate with :func:`iterate_batches` to get endless, resumable batches.
    """
    if not distributed:
        rank, world_size = 0, 1
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
    seed = cfg.train.seed if seed is None else seed
    data = cfg.data
    transform = TrainTransform(
        crop_size=data.crop_size,
        min_scale=data.min_scale,
        max_scale=data.max_scale,
        scale_step=data.scale_step,
        flip_prob=0.5 if data.flip else 0.0,
    )
    dataset = PanopticDataset(data.train, transform, name="train")
    _check_classes(cfg, dataset.meta, data.train.json)
    dataset.target_generator = TargetGenerator(
        dataset.meta.thing_train_ids,
        cfg.targets,
        label_divisor=dataset.meta.label_divisor,
        ignore_label=dataset.meta.ignore_label,
    )
    sampler = TrainSampler(dataset, seed=seed, rank=rank, world_size=world_size)
    if sampler.samples_per_epoch < data.batch_size:
        raise ValueError(
            f"{data.train.json}: {sampler.samples_per_epoch} images per process is fewer than "
            f"data.batch_size={data.batch_size}"
        )
    workers = data.num_workers
    return DataLoader(
        dataset,
        batch_size=data.batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=workers,
        pin_memory=_uses_cuda(cfg.train.device),
        worker_init_fn=_seed_worker,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=workers > 0,
        prefetch_factor=2 if workers > 0 else None,
    )


def batches_per_epoch(loader: DataLoader) -> int:
    """Number of full batches in one epoch of a train loader (its sampler's whole epoch)."""
    sampler = _train_sampler(loader)
    return sampler.samples_per_epoch // loader.batch_size


def iterate_batches(loader: DataLoader, start_batch: int = 0) -> Iterator[dict[str, Any]]:
    """Endless batches of a train loader, starting with batch number ``start_batch`` of the run.

    Batch ``b`` is batch ``b % batches_per_epoch`` of epoch ``b // batches_per_epoch``, identical
    whether the run started at 0 or resumed at ``start_batch`` (skipped batches are not loaded).
    With gradient accumulation, pass ``iteration * grad_accum``.
    """
    sampler = _train_sampler(loader)
    per_epoch = batches_per_epoch(loader)
    epoch, skip = divmod(start_batch, per_epoch)
    while True:
        sampler.set_epoch(epoch)
        sampler.set_start(skip * loader.batch_size)
        yield from loader
        epoch, skip = epoch + 1, 0


def _train_sampler(loader: DataLoader) -> TrainSampler:
    sampler = getattr(loader.batch_sampler, "sampler", None)
    if not isinstance(sampler, TrainSampler):
        raise TypeError("expected a loader made by build_train_loader (its sampler is a TrainSampler)")
    return sampler


def eval_collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch eval samples of different sizes: pad images (mean) and labels (void) to the largest.

    Valid sizes are ``k * 32 (+ 1)``, so the largest of a batch is valid too. Strings stay lists.
    """
    height = max(int(s["image"].shape[-2]) for s in samples)
    width = max(int(s["image"].shape[-1]) for s in samples)
    padded = [
        {
            **s,
            "image": pad_to_size(s["image"], (height, width), IMAGENET_MEAN),
            "label_map": pad_to_size(s["label_map"], (height, width), VOID_LABEL),
        }
        for s in samples
    ]
    return default_collate(padded)


def build_eval_loader(cfg: Config, split: str = "val", *, batch_size: int | None = None) -> DataLoader:
    """Evaluation DataLoader over ``cfg.data.<split>``: no augmentation, padded to a valid size."""
    split_cfg = getattr(cfg.data, split, None)
    if not isinstance(split_cfg, SplitConfig):
        raise ValueError(f"unknown split {split!r}: expected 'train' or 'val'")
    transform = EvalTransform(output_stride=EVAL_SIZE_STRIDE, align_corners=cfg.model.align_corners)
    dataset = PanopticDataset(split_cfg, transform, name=split)
    _check_classes(cfg, dataset.meta, split_cfg.json)
    workers = cfg.data.num_workers
    return DataLoader(
        dataset,
        batch_size=batch_size or cfg.data.eval_batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=eval_collate,
        pin_memory=_uses_cuda(cfg.train.device),
        worker_init_fn=_seed_worker,
    )

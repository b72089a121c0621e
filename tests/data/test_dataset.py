import itertools
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from panoptic_deeplab.config import SplitConfig, load_config
from panoptic_deeplab.data.coco_panoptic import (
    VOID_LABEL,
    DatasetError,
    ids_to_label_map,
    load_panoptic_json,
    read_panoptic_png,
)
from panoptic_deeplab.data.dataset import (
    PanopticDataset,
    TrainSampler,
    batches_per_epoch,
    build_eval_loader,
    build_train_loader,
    eval_collate,
    iterate_batches,
)
from panoptic_deeplab.data.synthetic import make_synthetic_dataset, synthetic_meta
from panoptic_deeplab.data.targets import TargetGenerator
from panoptic_deeplab.data.transforms import EvalTransform, TrainTransform

TRAIN_IMAGES = 6


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    make_synthetic_dataset(out, "train", num_images=TRAIN_IMAGES, size=(48, 80), seed=3)
    make_synthetic_dataset(out, "val", num_images=2, size=(40, 72), seed=3)
    return out


def _split(root: Path, name: str) -> SplitConfig:
    return SplitConfig(
        images=str(root / name / "images"),
        json=str(root / name / f"panoptic_{name}.json"),
        panoptic=str(root / name / "panoptic"),
    )


def _cfg(root: Path, *overrides: str):
    paths = [f"data.{s}.{k}={getattr(_split(root, s), k)}" for s in ("train", "val") for k in ("images", "json", "panoptic")]
    return load_config(
        "synthetic_mnv3",
        [*paths, "data.crop_size=[33,49]", "data.batch_size=2", "data.num_workers=0", "train.device=cpu", *overrides],
    )


def test_untransformed_sample_matches_the_files(root):
    dataset = PanopticDataset(_split(root, "train"))
    assert len(dataset) == TRAIN_IMAGES
    sample = dataset[1]
    coco = load_panoptic_json(root / "train" / "panoptic_train.json")
    annotation = coco.annotations[1]
    expected_image = np.array(Image.open(root / "train" / "images" / coco.images[1].file_name))
    assert sample["image"].dtype == torch.float32 and sample["image"].shape == (3, 48, 80)
    assert torch.allclose(sample["image"], torch.from_numpy(expected_image).permute(2, 0, 1).float() / 255)
    ids = read_panoptic_png(root / "train" / "panoptic" / annotation.file_name)
    expected_label = ids_to_label_map(ids, annotation.segments_info, synthetic_meta())
    assert sample["label_map"].dtype == torch.int64
    assert torch.equal(sample["label_map"], torch.from_numpy(expected_label.astype(np.int64)))
    assert sample["image_id"] == str(annotation.image_id) and sample["file_name"] == annotation.file_name
    assert sample["orig_size"].tolist() == [48, 80] and sample["valid_size"].tolist() == [48, 80]
    assert "targets" not in sample
    assert dataset.meta.num_classes == 7


def test_train_sample_with_targets_is_consistent(root):
    meta = synthetic_meta()
    dataset = PanopticDataset(
        _split(root, "train"), TrainTransform(crop_size=(33, 49)), TargetGenerator(meta.thing_train_ids)
    )
    sample = dataset[(2, 1234)]
    again = dataset[(2, 1234)]
    assert torch.equal(sample["image"], again["image"]) and torch.equal(sample["label_map"], again["label_map"])
    assert sample["image"].shape == (3, 33, 49) and 0.0 <= float(sample["image"].min()) <= float(sample["image"].max()) <= 1.0
    assert sample["valid_size"].tolist() == [33, 49] and sample["orig_size"].tolist() == [48, 80]
    targets = sample["targets"]
    assert targets["semantic"].shape == (33, 49) and targets["center"].shape == (1, 33, 49)
    assert targets["offset"].shape == (2, 33, 49) and targets["offset_weights"].shape == (1, 33, 49)
    # Targets are generated on the augmented crop: the semantic target is the crop's classes.
    assert torch.equal(targets["semantic"], sample["label_map"] // 1000)


def test_eval_transform_sample_pads_and_remembers_the_size(root):
    dataset = PanopticDataset(_split(root, "val"), EvalTransform())
    sample = dataset[0]
    assert sample["image"].shape == (3, 65, 97) and sample["label_map"].shape == (65, 97)
    assert sample["orig_size"].tolist() == [40, 72] and sample["valid_size"].tolist() == [65, 97]
    assert (sample["label_map"][40:] == VOID_LABEL).all()


def test_images_found_in_subfolders_and_by_annotation_stem(root, tmp_path):
    shutil.copytree(root / "train", tmp_path / "train")
    images = tmp_path / "train" / "images"
    (images / "city").mkdir()
    first = sorted(images.glob("*.png"))[0]
    first.rename(images / "city" / first.name)  # Cityscapes: leftImg8bit/<split>/<city>/<name>
    dataset = PanopticDataset(_split(tmp_path, "train"))
    assert dataset.image_paths[0] == str(images / "city" / first.name)
    assert dataset[0]["image"].shape == (3, 48, 80)


def test_missing_image_and_corrupt_image_name_the_file(root, tmp_path):
    shutil.copytree(root / "train", tmp_path / "train")
    images = tmp_path / "train" / "images"
    names = sorted(p.name for p in images.glob("*.png"))
    (images / names[0]).unlink()
    with pytest.raises(DatasetError, match=names[0]):
        PanopticDataset(_split(tmp_path, "train"))
    shutil.copy(root / "train" / "images" / names[0], images / names[0])
    (images / names[1]).write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    dataset = PanopticDataset(_split(tmp_path, "train"))
    dataset[0]
    with pytest.raises(DatasetError, match=names[1]):
        dataset[1]


def test_unset_split_paths_are_a_clear_error():
    with pytest.raises(ValueError, match=r"data\.val\.json is not set"):
        PanopticDataset(SplitConfig(images="x", panoptic="y"), name="val")


def _batches(loader, count, start=0):
    return list(itertools.islice(iterate_batches(loader, start), count))


def _same(a, b):
    return (
        torch.equal(a["image"], b["image"])
        and torch.equal(a["label_map"], b["label_map"])
        and torch.equal(a["targets"]["center"], b["targets"]["center"])
        and a["image_id"] == b["image_id"]
    )


def test_train_loader_is_deterministic_and_independent_of_workers(root):
    cfg = _cfg(root)
    first = _batches(build_train_loader(cfg, seed=7), 4)
    assert first[0]["image"].shape == (2, 3, 33, 49) and first[0]["targets"]["semantic"].shape == (2, 33, 49)
    again = _batches(build_train_loader(cfg, seed=7), 4)
    assert all(_same(a, b) for a, b in zip(first, again))
    workers = _batches(build_train_loader(_cfg(root, "data.num_workers=2"), seed=7), 4)
    assert all(_same(a, b) for a, b in zip(first, workers))
    other = _batches(build_train_loader(cfg, seed=8), 4)
    assert not all(_same(a, b) for a, b in zip(first, other))


def test_train_loader_resumes_exactly_across_epochs(root):
    loader = build_train_loader(_cfg(root), seed=1)
    per_epoch = batches_per_epoch(loader)
    assert per_epoch == TRAIN_IMAGES // 2
    full = _batches(loader, 2 * per_epoch + 1)
    # Each epoch visits every image once, in a different order with different augmentation.
    epoch0 = sorted(sum((b["image_id"] for b in full[:per_epoch]), []))
    epoch1 = sorted(sum((b["image_id"] for b in full[per_epoch : 2 * per_epoch]), []))
    assert epoch0 == epoch1 == sorted(str(i) for i in range(TRAIN_IMAGES))
    assert not all(_same(a, b) for a, b in zip(full[:per_epoch], full[per_epoch:]))
    resumed = _batches(build_train_loader(_cfg(root), seed=1), 3, start=per_epoch - 1)
    assert all(_same(a, b) for a, b in zip(full[per_epoch - 1 :], resumed))


def test_distributed_shards_are_disjoint(root):
    cfg = _cfg(root, "data.batch_size=1")
    seen = []
    for rank in range(2):
        loader = build_train_loader(cfg, distributed=True, rank=rank, world_size=2, seed=0)
        assert batches_per_epoch(loader) == TRAIN_IMAGES // 2
        seen.append({b["image_id"][0] for b in _batches(loader, TRAIN_IMAGES // 2)})
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == TRAIN_IMAGES


def test_sampler_start_skips_without_loading():
    sampler = TrainSampler(list(range(10)), seed=0)
    sampler.set_epoch(3)
    full = list(sampler)
    sampler.set_start(4)
    assert list(sampler) == full[4:] and len(sampler) == 6
    sampler.set_epoch(4)
    assert len(sampler) == 10 and [i for i, _ in sampler] != [i for i, _ in full]
    with pytest.raises(ValueError, match="start position"):
        sampler.set_start(11)


def test_eval_loader_and_collate_pad_to_the_largest(root):
    loader = build_eval_loader(_cfg(root), batch_size=2)
    batch = next(iter(loader))
    assert batch["image"].shape == (2, 3, 65, 97) and batch["label_map"].shape == (2, 65, 97)
    assert batch["orig_size"].tolist() == [[40, 72], [40, 72]] and batch["image_id"] == ["0", "1"]
    small = {"image": torch.zeros(3, 33, 33), "label_map": torch.zeros(33, 33, dtype=torch.long),
             "image_id": "a", "orig_size": torch.tensor([30, 30])}
    large = {"image": torch.ones(3, 65, 33), "label_map": torch.ones(65, 33, dtype=torch.long),
             "image_id": "b", "orig_size": torch.tensor([60, 20])}
    mixed = eval_collate([small, large])
    assert mixed["image"].shape == (2, 3, 65, 33) and mixed["image_id"] == ["a", "b"]
    assert (mixed["label_map"][0, 33:] == VOID_LABEL).all() and (mixed["label_map"][1] == 1).all()


def test_loader_checks_the_number_of_classes(root):
    with pytest.raises(ValueError, match="model.num_classes=7"):
        build_train_loader(_cfg(root, "model.num_classes=19"))


def test_interpreter_exits_with_a_loader_and_its_workers_still_alive(root):
    # The workers ignore SIGTERM (preemption is the trainer's to handle), and multiprocessing's exit hook stops
    # them with SIGTERM and then waits without a timeout: the exit hung forever (CI ran into its time limit).
    paths = [f"data.{s}.{k}={getattr(_split(root, s), k)}" for s in ("train", "val") for k in ("images", "json", "panoptic")]
    script = (
        "import sys\n"
        "from panoptic_deeplab.config import load_config\n"
        "from panoptic_deeplab.data.dataset import build_train_loader\n"
        "cfg = load_config('synthetic_mnv3', sys.argv[1:])\n"
        "batches = iter(build_train_loader(cfg, seed=0))\n"
        "next(batches)\n"
        "print('one batch', flush=True)\n"
    )
    overrides = [*paths, "data.crop_size=[33,49]", "data.batch_size=2", "data.num_workers=2", "train.device=cpu"]
    done = subprocess.run([sys.executable, "-c", script, *overrides], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "one batch\n"

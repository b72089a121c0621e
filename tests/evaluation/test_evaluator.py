"""Evaluating a model over a split (evaluation/evaluator.py) and the model form of the `evaluate` verb."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from panoptic_deeplab.cli import main
from panoptic_deeplab.config import Config, config_to_dict, load_config
from panoptic_deeplab.data.coco_panoptic import DatasetMeta
from panoptic_deeplab.data.dataset import PanopticDataset, build_eval_loader
from panoptic_deeplab.data.synthetic import make_synthetic_dataset, synthetic_meta
from tiny_setup import TINY_MODEL_OVERRIDES, synthetic_data_overrides
from panoptic_deeplab.data.targets import generate_targets
from panoptic_deeplab.data.transforms import TrainTransform
from panoptic_deeplab.checkpoint import atomic_torch_save
from panoptic_deeplab.evaluation import evaluate_panoptic_files
from panoptic_deeplab.evaluation.evaluator import (
    PREDICTIONS_JSON,
    PREDICTIONS_PNG_DIR,
    EvaluationReport,
    evaluate_in_memory,
    evaluate_model,
    evaluation_config,
)
from panoptic_deeplab.inference.predictor import Predictor
from panoptic_deeplab.modeling import build_model

IMAGE_SIZE = (64, 128)
NUM_IMAGES = 3



@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("eval_synthetic")
    make_synthetic_dataset(root, "val", NUM_IMAGES, IMAGE_SIZE, seed=3)
    return root


@pytest.fixture(scope="module")
def cfg(data_root: Path) -> Config:
    return load_config("synthetic_mnv3", [*synthetic_data_overrides(data_root), *TINY_MODEL_OVERRIDES, "postprocess.stuff_area=0"])


@pytest.fixture(scope="module")
def dataset(cfg: Config) -> PanopticDataset:
    return PanopticDataset(cfg.data.val)


class OracleModel(nn.Module):
    """Returns the outputs a perfect network would give, computed from the ground truth of the known images.

    Each input image (or its mirror image) is recognised by its pixels (top-left corner, as the predictor pads
    bottom/right).
    Crowd regions get a center and offsets of their own, like an instance: the post-processing then predicts them
    as one instance of their class, which PQ ignores (more than half of it lies on a crowd region of its class)
    instead of gluing crowd pixels to a neighbouring instance. Void pixels are predicted as a stuff class: PQ
    leaves out the part of a prediction on void. ``corrupt`` turns the left third of every image into the
    next class, for a PQ strictly between 0 and 1.
    """

    def __init__(self, dataset: PanopticDataset, meta: DatasetMeta, corrupt: bool = False) -> None:
        super().__init__()
        self.images: list[torch.Tensor] = []
        self.outputs: list[dict[str, torch.Tensor]] = []
        div = meta.label_divisor
        is_thing = torch.zeros(meta.ignore_label + 1, dtype=torch.bool)
        is_thing[meta.thing_train_ids] = True
        for i in range(len(dataset)):
            sample = dataset[i]
            label = sample["label_map"].clone()
            crowd = is_thing[label // div] & (label % div == 0)
            label[crowd] += div - 1  # an instance number no real instance has
            t = generate_targets(label, meta.thing_train_ids, label_divisor=div, ignore_label=meta.ignore_label)
            semantic = t["semantic"].clone()
            semantic[semantic == meta.ignore_label] = meta.stuff_train_ids[0]
            if corrupt:
                third = semantic.shape[1] // 3
                semantic[:, :third] = (semantic[:, :third] + 1) % meta.num_classes
            logits = F.one_hot(semantic, meta.num_classes).permute(2, 0, 1).float() * 20.0
            self.images.append(sample["image"])
            self.outputs.append({"semantic": logits, "center": t["center"], "offset": t["offset"]})

    def forward(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        n, _, height, width = batch.shape
        out = {
            "semantic": batch.new_zeros(n, self.outputs[0]["semantic"].shape[0], height, width),
            "center": batch.new_zeros(n, 1, height, width),
            "offset": batch.new_zeros(n, 2, height, width),
        }
        for i in range(n):
            # a known image, or its mirror image (flip test-time augmentation)
            k, flipped = next((k, flip) for k, im in enumerate(self.images) for flip in (False, True)
                              if torch.equal(batch[i, :, : im.shape[1], : im.shape[2]], im.flip(-1) if flip else im))
            h, w = self.images[k].shape[1:]
            for key, value in self.outputs[k].items():
                if flipped:  # what a network sees in a mirror: mirrored maps, dx pointing the other way
                    value = value.flip(-1) * (torch.tensor([1.0, -1.0]).view(2, 1, 1) if key == "offset" else 1.0)
                out[key][i, :, :h, :w] = value
        return out


def files_report(data_root: Path, predictions: Path):
    return evaluate_panoptic_files(
        data_root / "val" / "panoptic_val.json", data_root / "val" / "panoptic",
        predictions / PREDICTIONS_JSON, predictions / PREDICTIONS_PNG_DIR, workers=1,
    )


def assert_same_pq(memory, files) -> None:
    for group in ("all", "things", "stuff"):
        a, b = getattr(memory, group), getattr(files, group)
        assert a.n == b.n
        for key in ("pq", "sq", "rq"):
            assert getattr(a, key) == pytest.approx(getattr(b, key), abs=1e-9)
    assert [(c.category_id, c.tp, c.fp, c.fn) for c in memory.per_class] == \
        [(c.category_id, c.tp, c.fp, c.fn) for c in files.per_class]
    assert memory.per_image.keys() == files.per_image.keys()


def test_untrained_model_report_structure(cfg: Config, dataset: PanopticDataset, data_root: Path, tmp_path: Path):
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    predictor = Predictor(model, cfg, dataset.meta, device="cpu", batch_size=2)  # 3 images: batches of 2 and 1
    model.train()  # as the trainer has it; evaluation must give it back in this mode
    report = evaluate_model(predictor, cfg.data.val, predictions_dir=tmp_path / "pred", progress=False)
    assert model.training

    assert isinstance(report, EvaluationReport)
    assert report.num_images == NUM_IMAGES == report.panoptic.num_images and report.seconds > 0
    assert [c.name for c in report.panoptic.per_class] == dataset.meta.class_names
    assert list(report.semantic.per_class_iou) == dataset.meta.class_names
    things = [dataset.meta.class_names[t] for t in dataset.meta.thing_train_ids]
    assert list(report.coco_ap.per_class_ap) == things == list(report.cityscapes_ap.per_class_ap)
    for value in (report.panoptic.all.pq, report.semantic.miou, report.semantic.pixel_accuracy):
        assert 0.0 <= value <= 1.0

    data = report.to_dict()
    assert set(data) == {"num_images", "seconds", "summary", "panoptic", "semantic", "coco_ap", "cityscapes_ap"}
    assert data["summary"]["PQ"] == report.panoptic.all.pq
    report.save_json(tmp_path / "report.json")
    assert json.loads((tmp_path / "report.json").read_text()) == json.loads(json.dumps(data))
    table = report.format_table()
    for word in ("All", "Things", "Stuff", "mIoU", "AP / AP50 COCO", "AP / AP50 Cityscapes", *dataset.meta.class_names):
        assert word in table

    # the written predictions, scored by the files form, give the in-memory PQ
    assert_same_pq(report.panoptic, files_report(data_root, tmp_path / "pred"))


def test_oracle_is_perfect(cfg: Config, dataset: PanopticDataset, data_root: Path, tmp_path: Path):
    # The data holds crowd regions, void pixels and touching same-class instances: all must come out right.
    labels = torch.stack([dataset[i]["label_map"] for i in range(len(dataset))])
    assert (labels == dataset.meta.void_label).any()
    assert any((labels // 1000 == t).logical_and(labels % 1000 == 0).any() for t in dataset.meta.thing_train_ids)

    model = OracleModel(dataset, dataset.meta)
    predictor = Predictor(model, cfg, dataset.meta, device="cpu", batch_size=2)
    report = evaluate_model(predictor, dataset, predictions_dir=tmp_path / "pred", progress=False)
    assert report.panoptic.all.pq == 1.0 and report.panoptic.all.n == dataset.meta.num_classes
    assert all(c.fp == 0 and c.fn == 0 for c in report.panoptic.per_class)
    assert report.semantic.miou == 1.0 and report.semantic.pixel_accuracy == 1.0
    # AP: every instance found with IoU 1; COCOeval interpolates precision on 101 recall points -> exactly 1
    assert report.coco_ap.ap == pytest.approx(1.0) and report.cityscapes_ap.ap == pytest.approx(1.0)
    assert_same_pq(report.panoptic, files_report(data_root, tmp_path / "pred"))


def test_corrupted_oracle_files_form_agrees(cfg: Config, dataset: PanopticDataset, data_root: Path, tmp_path: Path):
    model = OracleModel(dataset, dataset.meta, corrupt=True)
    predictor = Predictor(model, cfg, dataset.meta, device="cpu", tta_flip=True)
    report = evaluate_model(predictor, cfg.data.val, predictions_dir=tmp_path / "pred", progress=False)
    assert 0.0 < report.panoptic.all.pq < 1.0 and 0.0 < report.semantic.miou < 1.0
    assert_same_pq(report.panoptic, files_report(data_root, tmp_path / "pred"))

    # max_images keeps the first images only
    first = evaluate_model(predictor, dataset, max_images=1, progress=False)
    assert first.num_images == 1 and list(first.panoptic.per_image) == [next(iter(report.panoptic.per_image))]


def test_evaluate_in_memory_restores_mode(cfg: Config, dataset: PanopticDataset):
    model = OracleModel(dataset, dataset.meta)
    for mode in (True, False):
        model.train(mode)
        report = evaluate_in_memory(model, cfg, dataset.meta)
        assert model.training is mode
        assert report.panoptic.all.pq == 1.0


def test_evaluate_model_datasets(cfg: Config, dataset: PanopticDataset):
    model = OracleModel(dataset, dataset.meta)
    predictor = Predictor(model, cfg, dataset.meta, device="cpu")
    # the eval loader's dataset pads (EvalTransform): the padding is cropped off, images and labels alike
    padded = build_eval_loader(cfg, "val").dataset
    assert padded[0]["image"].shape[-2:] != dataset[0]["image"].shape[-2:]
    assert evaluate_model(predictor, padded, progress=False).panoptic.all.pq == 1.0
    augmented = PanopticDataset(cfg.data.val, TrainTransform(crop_size=(65, 129)))
    with pytest.raises(ValueError, match="needs the original images"):
        evaluate_model(predictor, augmented, progress=False)
    with pytest.raises(ValueError, match="max_images"):
        evaluate_model(predictor, dataset, max_images=0)

    meta = synthetic_meta()
    other = DatasetMeta([*meta.categories[:-1], type(meta.categories[-1])(99, "other", True)])
    with pytest.raises(ValueError, match="differ from the model's"):
        evaluate_model(Predictor(model, cfg, other, device="cpu"), dataset, progress=False)


@pytest.fixture(scope="module")
def checkpoint(cfg: Config, dataset: PanopticDataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = build_model(cfg.model)
    path = tmp_path_factory.mktemp("ckpt") / "model_0000010.pt"
    atomic_torch_save(
        {"model": model.state_dict(), "config": config_to_dict(cfg), "meta": dataset.meta.to_json(), "iteration": 10},
        path,
    )
    return path


def test_cli_checkpoint_form(checkpoint: Path, data_root: Path, tmp_path: Path, capsys):
    out, pred = tmp_path / "report.json", tmp_path / "pred"
    code = main(["evaluate", "--checkpoint", str(checkpoint), "--device", "cpu", "--output", str(out),
                 "--predictions-dir", str(pred), "--no-progress", "--batch-size", "2"])
    assert code == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["num_images"] == NUM_IMAGES
    assert "AP / AP50 Cityscapes" in printed and "triangle" in printed
    assert f"{100 * report['panoptic']['All']['pq']:6.2f}" in printed

    # the files form re-scores the written predictions to the same PQ
    files_out = tmp_path / "files.json"
    assert main(["evaluate", "--gt-json", str(data_root / "val" / "panoptic_val.json"),
                 "--gt-dir", str(data_root / "val" / "panoptic"), "--pred-json", str(pred / PREDICTIONS_JSON),
                 "--pred-dir", str(pred / PREDICTIONS_PNG_DIR), "--workers", "1", "--output", str(files_out)]) == 0
    files = json.loads(files_out.read_text())
    for group in ("All", "Things", "Stuff"):
        assert math.isclose(files[group]["pq"], report["panoptic"][group]["pq"], abs_tol=1e-9)


def test_cli_checkpoint_form_config_and_overrides(checkpoint: Path, data_root: Path, tmp_path: Path, capsys):
    out = tmp_path / "report.json"
    args = ["evaluate", "--checkpoint", str(checkpoint), "--config", "synthetic_mnv3", "--device", "cpu",
            "--max-images", "2", "--no-progress", "--output", str(out),
            *synthetic_data_overrides(data_root), *TINY_MODEL_OVERRIDES, "postprocess.stuff_area=16"]
    assert main(args) == 0
    assert json.loads(out.read_text())["num_images"] == 2


def test_evaluation_config(checkpoint: Path, data_root: Path):
    ckpt = torch.load(checkpoint, weights_only=True)
    cfg = evaluation_config(ckpt, str(checkpoint), overrides=["postprocess.stuff_area=77", "model.output_stride=8"])
    assert cfg.postprocess.stuff_area == 77 and cfg.model.output_stride == 8
    assert cfg.data.val.json == f"{data_root}/val/panoptic_val.json"
    with pytest.raises(ValueError, match="postprocess.stuf"):
        evaluation_config(ckpt, str(checkpoint), overrides=["postprocess.stuf=1"])
    with pytest.raises(ValueError, match="not a section"):
        evaluation_config(ckpt, str(checkpoint), overrides=["model.pretrained.x=1"])
    with pytest.raises(ValueError, match="no saved 'config'"):
        evaluation_config({"model": {}}, "c.pt")


def test_cli_checkpoint_form_errors(checkpoint: Path, data_root: Path, tmp_path: Path, capsys):
    assert main(["evaluate", "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt does not exist" in capsys.readouterr().err

    assert main(["evaluate", "--checkpoint", str(checkpoint), "--device", "cpu", "--no-progress",
                 f"data.val.json={tmp_path}/nope.json"]) == 2
    assert "nope.json" in capsys.readouterr().err

    assert main(["evaluate", "--checkpoint", str(checkpoint), "--split", "train", "--no-progress"]) == 2
    assert "panoptic_train.json: file not found" in capsys.readouterr().err

    assert main(["evaluate", "--checkpoint", str(checkpoint), "--gt-json", "x.json"]) == 2
    assert "--gt-json: only for the files form" in capsys.readouterr().err
    assert main(["evaluate", "--pred-json", "p.json", "--pred-dir", "p", "--gt-dir", "g"]) == 2
    assert "--pred-json needs --gt-json" in capsys.readouterr().err
    assert main(["evaluate", "--pred-json", "p.json", "--max-images", "2"]) == 2
    assert "--max-images: only for the model form" in capsys.readouterr().err

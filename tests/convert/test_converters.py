"""Converters of published checkpoints: exact outputs against independent re-computations, strictness, errors."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from panoptic_deeplab.convert import ConversionError, convert_checkpoint
from panoptic_deeplab.convert.common import fetch
from panoptic_deeplab.inference.predictor import Predictor

from reference_nets import bc_forward, bc_shapes, d2_forward, d2_shapes, random_state

# float32 rounding over ~60 layers, relative to the largest output value
RELATIVE_TOLERANCE = 1e-4


def _save_d2_pkl(state: dict[str, torch.Tensor], path: Path, drop_counters: bool = True) -> None:
    """The model-zoo layout: ``{"model": {name: numpy array}, "__author__": ...}`` (no num_batches_tracked)."""
    arrays = {k: v.numpy() for k, v in state.items() if not (drop_counters and k.endswith("num_batches_tracked"))}
    with open(path, "wb") as f:
        pickle.dump({"model": arrays, "__author__": "Detectron2 Model Zoo"}, f)


def _assert_close(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    for key in ("semantic", "center", "offset"):
        assert ours[key].shape == theirs[key].shape, key
        scale = theirs[key].abs().max().item()
        diff = (ours[key] - theirs[key]).abs().max().item()
        assert diff <= RELATIVE_TOLERANCE * max(scale, 1.0), (key, diff, scale)


@pytest.fixture(scope="module")
def d2_files(tmp_path_factory) -> dict[str, tuple[Path, dict[str, torch.Tensor]]]:
    folder = tmp_path_factory.mktemp("d2")
    files = {}
    for name, num_classes, dsconv in (("cityscapes_dsconv", 19, True), ("cityscapes_standard", 19, False),
                                      ("coco_dsconv", 133, True)):
        state = random_state(d2_shapes(num_classes, dsconv), seed=len(files))
        path = folder / f"{name}.pkl"
        _save_d2_pkl(state, path)
        files[name] = (path, state)
    return files


@pytest.mark.parametrize(
    "name, size, train_crop",
    [
        # a train crop of the test image's size: the pooling window is the whole feature, as in D2 at 1024x2048
        # with its 1024x2048 crop (the default crops are checked in test_d2_default_pooling_windows)
        ("cityscapes_dsconv", (128, 256), (128, 256)),
        ("cityscapes_standard", (128, 256), (128, 256)),
        ("coco_dsconv", (100, 150), None),  # padded to 640x640 like D2: its 40x40 kernel covers the feature
    ],
)
def test_d2_outputs_equal_reference(d2_files, tmp_path, name, size, train_crop) -> None:
    path, state = d2_files[name]
    converted = convert_checkpoint("d2", path, tmp_path / "out.pt", train_crop=train_crop, progress=False)
    pool_kernel = converted.config.model.aspp_pool_kernel
    image = torch.randint(0, 256, (3, *size), generator=torch.Generator().manual_seed(3)).float()
    predictor = Predictor.from_checkpoint(converted.path, device="cpu")
    ours = predictor.raw_outputs([image / 255.0])[0]
    divisibility = 640 if name.startswith("coco") else 0
    theirs = d2_forward(state, image, dsconv=name.endswith("dsconv"), pool_kernel=pool_kernel,
                        size_divisibility=divisibility)
    _assert_close(ours, theirs)


def test_d2_default_pooling_windows(d2_files, tmp_path) -> None:
    """INPUT.CROP.SIZE / 16 of the published configs: 512x1024 (Cityscapes), 640x640 (COCO)."""
    for name, kernel, divisibility in (("cityscapes_dsconv", (32, 64), 0), ("coco_dsconv", (40, 40), 640)):
        converted = convert_checkpoint("d2", d2_files[name][0], tmp_path / f"{name}.pt", progress=False)
        assert converted.config.model.aspp_pool_kernel == kernel
        assert converted.config.model.size_divisibility == divisibility


def test_d2_sliding_aspp_pooling_equals_reference(d2_files, tmp_path) -> None:
    """A train crop smaller than the test feature: D2's AvgPool2d(kernel, stride 1) slides (SPEC §9.4)."""
    path, state = d2_files["cityscapes_dsconv"]
    converted = convert_checkpoint("d2", path, tmp_path / "out.pt", train_crop=(64, 128), progress=False)
    assert converted.config.model.aspp_pool_kernel == (4, 8)
    image = torch.randint(0, 256, (3, 128, 256), generator=torch.Generator().manual_seed(4)).float()
    ours = Predictor.from_checkpoint(converted.path, device="cpu").raw_outputs([image / 255.0])[0]
    _assert_close(ours, d2_forward(state, image, dsconv=True, pool_kernel=(4, 8)))


def test_d2_training_pth_and_categories(d2_files, tmp_path) -> None:
    """A D2 training output (.pth with optimizer state) converts too; the COCO model gets COCO's 133 ids."""
    path, state = d2_files["coco_dsconv"]
    pth = tmp_path / "model_final.pth"
    torch.save({"model": state, "optimizer": {}, "scheduler": {}, "iteration": 200000}, pth)
    converted = convert_checkpoint("d2", pth, tmp_path / "out.pt", progress=False)
    assert converted.meta.num_classes == 133 and len(converted.meta.thing_train_ids) == 80
    assert converted.meta.categories[0].name == "person" and converted.meta.categories[-1].id == 200
    assert converted.config.postprocess.nms_kernel == 41 and converted.config.postprocess.stuff_area == 4096


def test_bc_outputs_equal_reference(tmp_path) -> None:
    state = random_state(bc_shapes("resnet50", 19), seed=7)
    path = tmp_path / "final_state.pth"
    torch.save(state, path)
    converted = convert_checkpoint("bc", path, tmp_path / "out.pt", progress=False)
    model_cfg = converted.config.model
    assert (model_cfg.backbone, model_cfg.output_stride, model_cfg.low_level_strides) == ("resnet50", 32, (16, 8, 4))
    image = torch.rand(3, 129, 161, generator=torch.Generator().manual_seed(5))  # k*32+1 as BC's test crops
    ours = Predictor.from_checkpoint(converted.path, device="cpu").raw_outputs([image])[0]
    _assert_close(ours, bc_forward(state, image, "resnet50"))


def test_bc_resumable_checkpoint_and_depth(tmp_path) -> None:
    """checkpoint.pth.tar: the state dict under 'state_dict' beside the optimizer; ResNet-101 told by its blocks."""
    state = random_state(bc_shapes("resnet101", 19), seed=8)
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"start_iter": 10, "state_dict": state, "optimizer": {}, "lr_scheduler": {}}, path)
    converted = convert_checkpoint("bc", path, tmp_path / "out.pt", progress=False)
    assert converted.config.model.backbone == "resnet101"
    assert converted.meta.categories[11].name == "person" and converted.meta.categories[11].id == 24


def test_predict_and_evaluate_run_on_converted_checkpoints(d2_files, tmp_path) -> None:
    """The CLI verbs take a converted checkpoint like a trained one (Cityscapes from D2, COCO from D2)."""
    from PIL import Image

    from panoptic_deeplab.data.coco_panoptic import DatasetMeta, id2rgb
    from panoptic_deeplab.data.metadata import published_categories

    for name, dataset in (("cityscapes_standard", "cityscapes"), ("coco_dsconv", "coco")):
        out = tmp_path / f"{name}.pt"
        assert _cli("convert", "--from", "d2", "--input", str(d2_files[name][0]), "--output", str(out)).returncode == 0
        folder = tmp_path / name
        (folder / "images").mkdir(parents=True)
        (folder / "panoptic").mkdir()
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(folder / "images" / "a.png")
        meta = DatasetMeta.from_json(published_categories(dataset))
        stuff = meta.categories[meta.stuff_train_ids[0]]
        Image.fromarray(id2rgb(np.ones((64, 96), np.int64))).save(folder / "panoptic" / "a.png")
        gt = {"categories": meta.to_json(), "images": [{"id": "a", "file_name": "a.png", "height": 64, "width": 96}],
              "annotations": [{"image_id": "a", "file_name": "a.png", "segments_info": [
                  {"id": 1, "category_id": stuff.id, "area": 64 * 96, "bbox": [0, 0, 96, 64], "iscrowd": 0}]}]}
        (folder / "gt.json").write_text(json.dumps(gt))
        predicted = _cli("predict", "--checkpoint", str(out), "--input", str(folder / "images"),
                         "--output", str(folder / "pred"), "--device", "cpu")
        assert predicted.returncode == 0, predicted.stderr
        written = json.loads((folder / "pred" / "predictions.json").read_text())
        assert {c["id"] for c in written["categories"]} == {c.id for c in meta.categories}
        evaluated = _cli("evaluate", "--checkpoint", str(out), "--device", "cpu", "--no-progress",
                         f"data.val.images={folder / 'images'}", f"data.val.json={folder / 'gt.json'}",
                         f"data.val.panoptic={folder / 'panoptic'}", "data.num_workers=0")
        assert evaluated.returncode == 0, evaluated.stderr
        assert "PQ" in evaluated.stdout


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "panoptic_deeplab.cli", *args], capture_output=True, text=True)


# ---------------------------------------------------------------------------------------------------
# Strictness and wrong input
# ---------------------------------------------------------------------------------------------------


def test_missing_and_unexpected_tensors_are_listed(d2_files, tmp_path) -> None:
    _, state = d2_files["cityscapes_dsconv"]
    broken = dict(state)
    del broken["ins_embed_head.offset_head.pointwise.norm.running_var"]
    broken["sem_seg_head.extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pkl"
    _save_d2_pkl(broken, path)
    out = tmp_path / "out.pt"
    with pytest.raises(ConversionError) as err:
        convert_checkpoint("d2", path, out, progress=False)
    message = str(err.value)
    assert "missing in the file: ins_embed_head.offset_head.pointwise.norm.running_var" in message
    assert "unexpected in the file (not part of this architecture): sem_seg_head.extra.weight" in message
    assert not out.exists()  # never a half-initialised model


def test_wrong_shape_is_reported(tmp_path) -> None:
    state = random_state(bc_shapes("resnet50", 19), seed=9)
    state["decoder.instance_head.classifier.offset.1.weight"] = torch.zeros(3, 32, 1, 1)
    path = tmp_path / "final_state.pth"
    torch.save(state, path)
    with pytest.raises(ConversionError, match=r"wrong shapes: decoder.instance_head.classifier.offset.1.weight "
                                              r"\(3, 32, 1, 1\) -> offset_head.predictor.weight \(2, 32, 1, 1\)"):
        convert_checkpoint("bc", path, tmp_path / "out.pt", progress=False)


def test_wrong_family_and_bad_files(d2_files, tmp_path) -> None:
    d2_path = d2_files["cityscapes_dsconv"][0]
    with pytest.raises(ConversionError, match=r"is not a bowenc0221/panoptic-deeplab checkpoint: it looks like a "
                                              r"detectron2 Panoptic-DeepLab \(--from d2\)"):
        convert_checkpoint("bc", d2_path, tmp_path / "out.pt", progress=False)
    bc_path = tmp_path / "final_state.pth"
    torch.save(random_state(bc_shapes("resnet50", 19), seed=1), bc_path)
    with pytest.raises(ConversionError, match=r"is not a detectron2 Panoptic-DeepLab checkpoint: it looks like a "
                                              r"bowenc0221/panoptic-deeplab \(--from bc\)"):
        convert_checkpoint("d2", bc_path, tmp_path / "out.pt", progress=False)
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(d2_path.read_bytes()[:5000])
    with pytest.raises(ConversionError, match="truncated or not a checkpoint"):
        convert_checkpoint("d2", truncated, tmp_path / "out.pt", progress=False)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ConversionError, match=r"notes.txt is not a detectron2 checkpoint: it is neither a torch "
                                              r"file nor a pickle"):
        convert_checkpoint("d2", text, tmp_path / "out.pt", progress=False)
    with pytest.raises(ConversionError, match="is a directory"):
        convert_checkpoint("d2", tmp_path, tmp_path / "out.pt", progress=False)


def test_pickle_that_runs_code_is_refused(tmp_path) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"x": Evil()}}, f)
    with pytest.raises(ConversionError, match="refusing to load builtins.print"):
        convert_checkpoint("d2", path, tmp_path / "out.pt", progress=False)


def test_dataset_must_match_the_classes(d2_files, tmp_path) -> None:
    with pytest.raises(ConversionError, match="predicts 19 classes but dataset 'coco' has 133 categories"):
        convert_checkpoint("d2", d2_files["cityscapes_dsconv"][0], tmp_path / "o.pt", "coco", progress=False)


def test_cli_errors_are_one_line(d2_files, tmp_path) -> None:
    result = _cli("convert", "--from", "bc", "--input", str(d2_files["cityscapes_dsconv"][0]),
                  "--output", str(tmp_path / "o.pt"))
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr


def test_download_to_cache_with_progress_and_hash(tmp_path, monkeypatch) -> None:
    """URLs are fetched once into the cache (up to the network call: the opener is a stand-in)."""
    payload = b"x" * 3000
    calls = []

    class Response:
        headers = {"Content-Length": str(len(payload))}

        def __init__(self) -> None:
            self.data = [payload[:1000], payload[1000:], b""]

        def read(self, n: int) -> bytes:
            return self.data.pop(0)

        def close(self) -> None:
            pass

    def opener(url: str) -> Response:
        calls.append(url)
        return Response()

    monkeypatch.setenv("PANOPTIC_DEEPLAB_CACHE", str(tmp_path / "cache"))
    url = "https://dl.example.org/models/model_final_abc.pkl"
    import hashlib

    digest = hashlib.sha256(payload).hexdigest()
    path = fetch(url, sha256=digest[:6], progress=False, opener=opener)
    assert path.read_bytes() == payload and path.name == "model_final_abc.pkl"
    assert fetch(url, sha256=digest, progress=False, opener=opener) == path and len(calls) == 1
    with pytest.raises(ConversionError, match="not the published 000000"):
        fetch(url, sha256="000000", progress=False, opener=opener)

    class Short(Response):
        headers = {"Content-Length": "5000"}

    with pytest.raises(ConversionError, match="stopped after 3000 of 5000 bytes"):
        fetch(url + "2", progress=False, opener=lambda u: Short())
    assert not list((tmp_path / "cache").rglob("*.part"))

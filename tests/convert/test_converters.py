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

from panoptic_compare import rename_like
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


def _without(prefix: str):  # noqa: ANN202
    return lambda state: {k: v for k, v in state.items() if not k.startswith(prefix)}


def _wider_last_branch(state):  # noqa: ANN001, ANN202
    return {**state, "backbone.stage4.0.branches.3.0.conv1.weight": torch.zeros(256, 256, 3, 3)}


# The model zoo's configs: (BC backbone, ours, MODEL.BN_MOMENTUM, a damage, the error it gets).
BC_CASES = [
    # panoptic_deeplab_R50_os32_cityscapes: TorchVision's ResNet-50
    ("resnet50", "resnet50", 0.01, None, None),
    # panoptic_deeplab_MBNV2_100_os32_cityscapes: MobileNetV2 (ReLU6, no last 1x1 conv) taps layer_14, 7, 4
    ("mobilenet_v2", "mobilenetv2_100", 0.01, _without("backbone.features.17."),
     r"a MobileNet backbone with 17 feature blocks, not MobileNetV2 width 1.0"),
    # panoptic_deeplab_X65_os32_cityscapes_lr_x10: its own Xception-65 taps (before the ReLUs timm taps after, the
    # middle flow's output), BN epsilon 1e-5, its normalisation mean = std = 0.5
    ("xception65", "bc_xception65", 0.001, _without("backbone.block21."),
     r"an Xception backbone with 20 blocks, not Xception-65"),
    # panoptic_deeplab_H48_os4_cityscapes: HRNet-W48's stage-4 branches, fused with bilinear aligned-corner
    # upsampling to each branch's size (odd sizes, as its 1025x2049 crops), ASPP on the stride-32 branch
    ("hrnet48", "bc_hrnet_w48", 0.01, _wider_last_branch,
     r"an HRNet backbone with branch widths \(48, 96, 192, 256\), not HRNet-W48"),
]


@pytest.mark.parametrize("backbone, ours_name, momentum, damage, error", BC_CASES)
def test_bc_outputs_equal_reference(tmp_path, backbone, ours_name, momentum, damage, error) -> None:
    state = random_state(bc_shapes(backbone, 19), seed=7)
    path = tmp_path / "final_state.pth"
    torch.save(state, path)
    converted = convert_checkpoint("bc", path, tmp_path / "out.pt", progress=False)
    model_cfg = converted.config.model
    assert (model_cfg.backbone, model_cfg.output_stride, model_cfg.low_level_strides, model_cfg.bn_momentum) == \
        (ours_name, 32, (16, 8, 4), momentum)
    assert converted.architecture == f"{ours_name} with 3 decoder stages"
    image = torch.rand(3, 129, 161, generator=torch.Generator().manual_seed(5))  # k*32+1 as BC's test crops
    ours = Predictor.from_checkpoint(converted.path, device="cpu").raw_outputs([image])[0]
    _assert_close(ours, bc_forward(state, image, backbone))
    if damage is not None:  # the same family with other widths or depths is refused by name
        torch.save(damage(state), path)
        with pytest.raises(ConversionError, match=error):
            convert_checkpoint("bc", path, tmp_path / "o.pt", progress=False)


def test_bc_encoders_exist_for_converted_weights_only() -> None:
    from panoptic_deeplab.modeling.backbone import Backbone

    with pytest.raises(ValueError, match=r"backbone 'bc_xception65' has no ImageNet weights of its own: start from a "
                                         r"converted bowenc0221 checkpoint \(panoptic-deeplab convert --from bc"):
        Backbone("bc_xception65", 32, pretrained=True)
    with pytest.raises(ValueError, match=r"Xception-65 is built at output stride 32 \(its config\), not 16"):
        Backbone("bc_xception65", 16)
    with pytest.raises(ValueError, match=r"HRNet-W48 ends at stride 32 \(its branches never dilate\), not 16"):
        Backbone("bc_hrnet_w48", 16)


def test_bc_legacy_torch_file(tmp_path) -> None:
    """A .pth of torch < 1.6 (no zip container: a pickle whose first object is torch's magic number)."""
    state = random_state(bc_shapes("resnet50", 19), seed=7)
    path = tmp_path / "final_state.pth"
    torch.save(state, path, _use_new_zipfile_serialization=False)
    assert not path.read_bytes().startswith(b"PK")
    converted = convert_checkpoint("bc", path, tmp_path / "out.pt", progress=False)
    weights = torch.load(converted.path, weights_only=True)["model"]
    assert torch.equal(weights["semantic_head.predictor.weight"], state["decoder.semantic_head.classifier.semantic.1.weight"])


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


def _fragile_pixels(raw: dict[str, torch.Tensor], centers: torch.Tensor, logit_tolerance: float,
                    distance_tolerance: float) -> np.ndarray:
    """Pixels whose post-processing decision the float32 noise in the raw outputs could flip: the two best
    semantic logits closer than ``logit_tolerance``, or the distances to the two nearest centers (float64, all
    centers) closer than ``distance_tolerance``."""
    top2 = raw["semantic"][0].double().topk(2, dim=0).values
    fragile = (top2[0] - top2[1]) < logit_tolerance
    height, width = fragile.shape
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    py = (ys + raw["offset"][0, 0].double()).reshape(-1)
    px = (xs + raw["offset"][0, 1].double()).reshape(-1)
    cy, cx = centers[:, 0].double(), centers[:, 1].double()
    margins = []
    for start in range(0, py.numel(), 1 << 16):
        d = ((py[start:start + (1 << 16), None] - cy).square() + (px[start:start + (1 << 16), None] - cx).square()).sqrt()
        best = d.topk(2, dim=1, largest=False).values
        margins.append(best[:, 1] - best[:, 0])
    fragile |= torch.cat(margins).view(height, width) < distance_tolerance
    return fragile.numpy()


def test_converted_d2_model_predicts_like_postprocessing_of_reference_outputs(tmp_path) -> None:
    """Issue 23, end to end: convert a D2 file, predict a 512x1024 image whose offsets reach hundreds of pixels
    (many grouping chunks, points far off the image), and compare with post-processing applied to the outputs
    of the independent D2 forward pass."""
    from panoptic_deeplab.data.coco_panoptic import LABEL_DIVISOR
    from panoptic_deeplab.inference.postprocess import panoptic_postprocess

    state = random_state(d2_shapes(19, dsconv=True), seed=11)
    image = torch.randint(0, 256, (3, 512, 1024), generator=torch.Generator().manual_seed(12)).to(torch.uint8)
    pool_kernel = (32, 64)  # the default train crop 512x1024 / 16
    # Random deep nets give flat outputs; rescale the three 1x1 predictors (exactly linear) so that the heatmap
    # has ~5% of pixels over the threshold, every class wins somewhere and offsets reach hundreds of pixels.
    raw = d2_forward(state, image.float(), dsconv=True, pool_kernel=pool_kernel)
    center = raw["center"].flatten()
    scale, level = center.std(), torch.quantile(center[::7], 0.95)
    state["ins_embed_head.center_predictor.weight"] /= scale
    state["ins_embed_head.center_predictor.bias"] = (state["ins_embed_head.center_predictor.bias"] - level) / scale + 0.1
    logits = raw["semantic"][0].flatten(1)
    spread = (logits - logits.mean(1, keepdim=True)).std()
    state["sem_seg_head.predictor.weight"] *= 3 / spread
    state["sem_seg_head.predictor.bias"] = (state["sem_seg_head.predictor.bias"] - logits.mean(1)) * 3 / spread
    offset = raw["offset"][0].flatten(1)  # D2 multiplies the predictor's output by 4
    gain = 150 / (offset - offset.mean(1, keepdim=True)).std()
    state["ins_embed_head.offset_predictor.weight"] *= gain
    state["ins_embed_head.offset_predictor.bias"] = (state["ins_embed_head.offset_predictor.bias"] - offset.mean(1) / 4) * gain
    path = tmp_path / "model_final.pkl"
    _save_d2_pkl(state, path)

    converted = convert_checkpoint("d2", path, tmp_path / "converted.pt", progress=False)
    assert converted.config.model.aspp_pool_kernel == pool_kernel
    result = Predictor.from_checkpoint(converted.path, device="cpu").predict(image.permute(1, 2, 0).numpy())

    reference_raw = d2_forward(state, image.float(), dsconv=True, pool_kernel=pool_kernel)
    reference_offset = reference_raw["offset"][0]
    assert reference_offset.abs().mean() > 50 and reference_offset.abs().max() > 1000
    assert (reference_offset[0] + torch.arange(512)[:, None] < -64).float().mean() > 0.01  # off the candidate grid
    expected = panoptic_postprocess(reference_raw["semantic"], reference_raw["center"], reference_raw["offset"],
                                    converted.meta.thing_train_ids, converted.config.postprocess)[0]
    assert expected.centers.shape[0] == converted.config.postprocess.top_k  # 200 centers
    # Two centers whose scores tie to float precision may swap places (and numbers) between the two runs: the
    # same centers, and the same segments once ours are renamed after the reference segment they overlap most.
    assert sorted(map(tuple, result.centers.tolist())) == sorted(map(tuple, expected.centers.tolist()))
    renamed = rename_like(result.label_map, expected.label_map.numpy(), LABEL_DIVISOR)
    differ = renamed != expected.label_map.numpy()
    # A point moved by e changes each center distance by <= e, so their difference by <= 2 e.
    offset_noise = float(np.abs(result.offset - reference_raw["offset"][0].numpy()).max())
    assert offset_noise < 0.1
    fragile = _fragile_pixels(reference_raw, expected.centers, logit_tolerance=1e-3,
                              distance_tolerance=2 * np.sqrt(2) * offset_noise)
    assert not (differ & ~fragile).any(), f"{int((differ & ~fragile).sum())} pixels differ with a clear decision"
    assert differ.mean() < 1e-4


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


# ---------------------------------------------------------------------------------------------------
# Issue 23: output paths, warnings before errors, non-finite weights
# ---------------------------------------------------------------------------------------------------


def test_output_directory_receives_the_input_name(d2_files, tmp_path) -> None:
    """`--output DIR` ended with a rename error naming a temporary file; now DIR/<input stem>.pt is written."""
    folder = tmp_path / "converted"
    folder.mkdir()
    result = _cli("convert", "--from", "d2", "--input", str(d2_files["cityscapes_dsconv"][0]), "--output", str(folder))
    assert result.returncode == 0, result.stderr
    assert (folder / "cityscapes_dsconv.pt").is_file() and not list(folder.glob(".*.tmp"))
    (folder / "cityscapes_dsconv.pt").unlink()
    (folder / "cityscapes_dsconv.pt").mkdir()  # even the file name taken by a directory: said plainly
    with pytest.raises(ConversionError, match=r"--output .*cityscapes_dsconv.pt is a directory"):
        convert_checkpoint("d2", d2_files["cityscapes_dsconv"][0], folder, progress=False)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ConversionError, match=r"a_file is a file, not a directory"):
        convert_checkpoint("d2", d2_files["cityscapes_dsconv"][0], blocker / "out.pt", progress=False)


def test_truncated_file_prints_the_error_only(d2_files, tmp_path) -> None:
    """torch's "Detected pickle protocol 4" warning came before the error."""
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(d2_files["cityscapes_dsconv"][0].read_bytes()[:5000])
    for verb in (["convert", "--from", "d2", "--input", str(truncated), "--output", str(tmp_path / "o.pt")],
                 ["predict", "--checkpoint", str(truncated), "--input", str(truncated), "--output", str(tmp_path)]):
        result = _cli(*verb)
        assert result.returncode == 2
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr


def test_nonfinite_weights_are_refused_by_convert_and_predict(d2_files, tmp_path) -> None:
    _, state = d2_files["cityscapes_dsconv"]
    broken = {k: v.clone() for k, v in state.items()}
    names = sorted(k for k in broken if k.endswith(".weight"))[:7]
    for i, name in enumerate(names):
        broken[name].view(-1)[0] = float("nan") if i % 2 else float("inf")
    path = tmp_path / "diverged.pkl"
    _save_d2_pkl(broken, path)
    out = tmp_path / "out.pt"
    with pytest.raises(ValueError, match=r"holds NaN or Inf in 7 tensor\(s\): .* and 2 more") as err:
        convert_checkpoint("d2", path, out, progress=False)
    assert sum(name in str(err.value) for name in names) == 5 and not out.exists()  # the first five, a count
    result = _cli("convert", "--from", "d2", "--input", str(path), "--output", str(out), "--allow-nonfinite")
    assert result.returncode == 0, result.stderr
    image = tmp_path / "image.png"
    from PIL import Image

    Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(image)
    predicted = _cli("predict", "--checkpoint", str(out), "--input", str(image), "--output", str(tmp_path / "pred"))
    assert predicted.returncode == 2
    assert predicted.stderr.startswith(f"error: checkpoint {out} holds NaN or Inf in 7 tensor(s)"), predicted.stderr

"""The whole pipeline in one ONNX graph (export's default): parity with the PyTorch predictor pixel for pixel, and
the graph's post-processing against panoptic_postprocess on random maps (ties, no centers, tiny images, batches)."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from panoptic_deeplab.config import ModelConfig, PostProcessConfig
from panoptic_deeplab.data.coco_panoptic import load_image
from panoptic_deeplab.export import ExportError, export_onnx, onnx_predictor, read_onnx_metadata
from panoptic_deeplab.export.graph import GRAPH_OUTPUT_NAMES, PanopticGraph, sym_stride_translation
from panoptic_deeplab.export.runtime import OnnxPanopticPredictor
from panoptic_deeplab.inference.postprocess import panoptic_postprocess
from panoptic_deeplab.inference.predictor import Predictor

ort = pytest.importorskip("onnxruntime", reason="the 'export' extra is not installed")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "panoptic_deeplab.cli", *args], capture_output=True, text=True)


def _assert_same_results(a, b) -> None:
    np.testing.assert_array_equal(a.label_map, b.label_map)
    np.testing.assert_array_equal(a.semantic, b.semantic)
    np.testing.assert_array_equal(a.segment_ids, b.segment_ids)
    assert a.segments_info == b.segments_info
    np.testing.assert_array_equal(a.centers, b.centers)
    np.testing.assert_allclose(a.center_scores, b.center_scores, rtol=1e-4, atol=1e-5)
    assert [(i.label, i.category_id, i.area, i.box) for i in a.instances] == \
        [(i.label, i.category_id, i.area, i.box) for i in b.instances]
    assert [i.score for i in a.instances] == pytest.approx([i.score for i in b.instances], rel=1e-4, abs=1e-6)
    np.testing.assert_allclose(a.offset, b.offset, atol=1e-3 * max(1.0, float(np.abs(b.offset).max())))


def test_pipeline_equals_pytorch_pixel_for_pixel(pipeline) -> None:
    metadata = read_onnx_metadata(pipeline["onnx"])
    assert metadata["postprocess"] is True and metadata["input_size"] is None
    ours = onnx_predictor(pipeline["onnx"], batch_size=2)
    assert isinstance(ours, OnnxPanopticPredictor)
    # PyTorch one at a time: a PyTorch batch pads its images to one size, the graph batches images of one size only
    theirs = Predictor.from_checkpoint(pipeline["checkpoint"], device="cpu")
    images = [load_image(p) for p in sorted(pipeline["images"].iterdir())]
    images += [images[0][:71, :133].copy(), images[1][5:, 7:].copy()]  # sizes the network pads differently
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        onnx_results = ours.predict_batch(images)
    results = list(zip(onnx_results, theirs.predict_batch(images)))
    assert sum(len(b.instances) for _, b in results) >= 10  # the comparison covers instances of several classes
    # The graph keeps top_k = 8 centers: images that reach it say so, and how to keep more.
    reached = sum(len(a.centers) == 8 for a in onnx_results)
    assert reached >= 1 and [str(w.message) for w in caught] == reached * [
        f"an image reached top_k=8 instance centers: any further objects were merged into their neighbours; "
        f"{pipeline['onnx']} keeps the top_k it was exported with: export with --no-postprocess and predict with "
        "--top-k"]
    for a, b in results:
        _assert_same_results(a, b)
    # a float tensor image is the same image (k / 255 steps)
    tensor = torch.from_numpy(images[0]).permute(2, 0, 1).float() / 255
    _assert_same_results(ours.predict(tensor), theirs.predict(tensor))


def test_predict_onnx_pipeline_writes_what_predict_checkpoint_writes(pipeline, tmp_path) -> None:
    for kind, flag, path in (("onnx", "--onnx", pipeline["onnx"]), ("pt", "--checkpoint", pipeline["checkpoint"])):
        result = _cli("predict", flag, str(path), "--input", str(pipeline["images"]), "--output",
                      str(tmp_path / kind), "--no-progress")
        assert result.returncode == 0, result.stderr
    onnx_json, pt_json = (json.loads((tmp_path / k / "predictions.json").read_text()) for k in ("onnx", "pt"))
    assert onnx_json["annotations"] == pt_json["annotations"]
    for png in (tmp_path / "pt" / "panoptic").iterdir():
        assert (tmp_path / "onnx" / "panoptic" / png.name).read_bytes() == png.read_bytes()
    assert sorted(p.name for p in (tmp_path / "onnx" / "pictures").iterdir()) == \
        sorted(p.name for p in (tmp_path / "pt" / "pictures").iterdir())
    result = _cli("predict", "--onnx", str(pipeline["onnx"]), "--input", str(pipeline["images"]), "--output",
                  str(tmp_path / "tta"), "--tta-flip")
    assert result.returncode == 2
    assert "holds the whole pipeline (post-processing inside): test-time augmentation" in result.stderr


def test_fixed_size_pipeline_takes_that_size_only(pipeline, tmp_path) -> None:
    fixed = export_onnx(pipeline["checkpoint"], tmp_path / "fixed.onnx", size=(96, 160))
    assert fixed.input_size == (96, 160) and fixed.postprocess and fixed.label_pixels_differ == 0
    ours, theirs = onnx_predictor(fixed.path), Predictor.from_checkpoint(pipeline["checkpoint"], device="cpu")
    image = load_image(sorted(pipeline["images"].iterdir())[0])
    _assert_same_results(ours.predict(image), theirs.predict(image))
    with pytest.raises(ValueError, match=r"fixed.onnx was exported for 96x160 images, this one is 95x160: export "
                                         r"again with --size 95x160, or without --size"):
        ours.predict(image[:95])


def test_models_that_resize_before_the_network_are_refused() -> None:
    with pytest.raises(ValueError, match=r"resizes images to its inference_size .* export it with --no-postprocess"):
        PanopticGraph(nn.Identity(), ModelConfig(num_classes=3, inference_size=(641, 641)), PostProcessConfig(),
                      [1], 1000, 255000)


class _PostprocessOnly(nn.Module):
    def __init__(self, pipeline: PanopticGraph) -> None:
        super().__init__()
        self.pipeline = pipeline  # not "graph": torch.export's graph module has one

    def forward(self, semantic: Tensor, center: Tensor, offset: Tensor) -> tuple[Tensor, ...]:
        return self.pipeline.postprocess(semantic, center, offset)


THING_IDS = [2, 3, 4]


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "void_channel"])
def postprocess_session(request, tmp_path_factory) -> tuple[ort.InferenceSession, PostProcessConfig, bool]:
    """The graph's post-processing alone, exported with dynamic batch and size (top_k 8, threshold 0.3)."""
    void_channel = request.param
    post = PostProcessConfig(top_k=8, center_threshold=0.3, nms_kernel=3, stuff_area=6)
    graph = PanopticGraph(nn.Identity(), ModelConfig(num_classes=6, semantic_void_channel=void_channel), post,
                          THING_IDS, 1000, 255000)
    channels = 6 + int(void_channel)
    example = (torch.randn(2, channels, 17, 23), torch.rand(2, 1, 17, 23), torch.randn(2, 2, 17, 23))
    dims = {0: torch.export.Dim.DYNAMIC, 2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC}
    path = tmp_path_factory.mktemp("pp") / "postprocess.onnx"
    torch.onnx.export(_PostprocessOnly(graph), example, str(path), dynamo=True, dynamic_shapes=(dims, dims, dims),
                      input_names=["logits", "heatmap", "offsets"], output_names=list(GRAPH_OUTPUT_NAMES),
                      custom_translation_table={torch.ops.aten.sym_stride.int: sym_stride_translation}, verbose=False)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]), post, void_channel


def _random_maps(seed: int, batch: int, height: int, width: int, channels: int) -> tuple[Tensor, Tensor, Tensor]:
    """Maps with plateaus and equal peaks (heat in steps of 0.25, logits in integer steps: ties everywhere), and
    offsets that point near a few centers or far outside the image."""
    g = torch.Generator().manual_seed(seed)
    semantic = torch.randint(-2, 3, (batch, channels, height, width), generator=g).float()
    center = torch.randint(0, 5, (batch, 1, height, width), generator=g).float() / 4
    offset = torch.randint(-6, 7, (batch, 2, height, width), generator=g).float()
    offset[:, :, :2] *= 40  # wild offsets, off the grid
    return semantic, center, offset


@pytest.mark.parametrize("seed, batch, height, width", [(0, 1, 17, 23), (1, 2, 33, 9), (2, 3, 2, 3), (3, 1, 1, 1),
                                                         (4, 2, 40, 41)])
def test_graph_postprocess_equals_panoptic_postprocess(postprocess_session, seed, batch, height, width) -> None:
    session, post, void_channel = postprocess_session
    semantic, center, offset = _random_maps(seed, batch, height, width, 6 + int(void_channel))
    if seed == 3:
        center.zero_()  # no center at all: every thing pixel is void
    outputs = dict(zip(GRAPH_OUTPUT_NAMES, session.run(list(GRAPH_OUTPUT_NAMES), {
        "logits": semantic.numpy(), "heatmap": center.numpy(), "offsets": offset.numpy()})))
    references = panoptic_postprocess(semantic, center, offset, THING_IDS, post, void_channel=void_channel)
    for i, ref in enumerate(references):
        np.testing.assert_array_equal(outputs["panoptic"][i], ref.label_map.numpy())
        np.testing.assert_array_equal(outputs["semantic"][i], ref.semantic.numpy())
        count = int(outputs["num_centers"][i])
        np.testing.assert_array_equal(outputs["centers"][i][:count], ref.centers.numpy())
        assert (outputs["centers"][i][count:] == -1).all()
        np.testing.assert_array_equal(outputs["center_scores"][i][:count], ref.center_scores.numpy())
        kept = outputs["instance_areas"][i] > 0
        inst = ref.instances
        np.testing.assert_array_equal(np.flatnonzero(kept), inst.center_index.numpy())
        np.testing.assert_array_equal(outputs["instance_ids"][i][kept], inst.ids.numpy())
        np.testing.assert_array_equal(outputs["instance_classes"][i][kept], inst.classes.numpy())
        np.testing.assert_array_equal(outputs["instance_areas"][i][kept], inst.areas.numpy())
        np.testing.assert_array_equal(outputs["instance_boxes"][i][kept], inst.boxes.numpy())
        np.testing.assert_allclose(outputs["instance_scores"][i][kept], inst.scores.numpy(), rtol=1e-5)
        assert (outputs["instance_ids"][i][~kept] == 255000).all()
        assert (outputs["instance_classes"][i][~kept] == -1).all()


def test_pipeline_file_refuses_tta_through_the_api(pipeline) -> None:
    with pytest.raises(ExportError, match=r"holds the whole pipeline"):
        onnx_predictor(pipeline["onnx"], tta_scales=(0.5, 1.0))


def test_pipeline_file_refuses_sequences_and_videos(pipeline, tmp_path) -> None:
    """Tracking renumbers instances between the network and the result: a whole-pipeline file cannot do it."""
    result = _cli("predict", "--onnx", str(pipeline["onnx"]), "--input", str(pipeline["images"]), "--output",
                  str(tmp_path / "out"), "--sequence", "--no-progress")
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: videos and --sequence need the network only: {pipeline['onnx']} holds "
                                     "the whole pipeline (export with --no-postprocess)")
    assert not (tmp_path / "out" / "predictions.json").exists()
    for option in (["--tile", "64x64"], ["--top-k", "400"]):
        refused = _cli("predict", "--onnx", str(pipeline["onnx"]), "--input", str(pipeline["images"]), "--output",
                       str(tmp_path / option[0][2:]), *option, "--no-progress")
        assert refused.returncode == 2
        assert refused.stderr.strip() == (
            f"error: {pipeline['onnx']} holds the whole pipeline (post-processing inside): test-time augmentation "
            "and other post-processing settings need the network only; export with --no-postprocess for them")

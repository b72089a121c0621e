"""ONNX export of the network and ONNX Runtime inference through the ordinary predictor (extra 'export')."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from panoptic_deeplab.data.coco_panoptic import load_image
from panoptic_deeplab.data.synthetic import synthetic_meta
from panoptic_deeplab.export import (
    ExportError,
    export_onnx,
    onnx_predictor,
    read_onnx_metadata,
)
from panoptic_deeplab.inference.predictor import Predictor

pytest.importorskip("onnxruntime", reason="the 'export' extra is not installed")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "panoptic_deeplab.cli", *args], capture_output=True, text=True)


def test_graph_takes_any_size_and_equals_pytorch(exported) -> None:
    metadata = read_onnx_metadata(exported["onnx"])
    assert metadata["input_size"] is None and metadata["meta"] == synthetic_meta().to_json()
    ours, theirs = onnx_predictor(exported["onnx"]), Predictor.from_checkpoint(exported["checkpoint"], device="cpu")
    for size in ((65, 97), (130, 250)):  # padded by the predictor to 65x97 and 161x257
        image = torch.rand(3, *size, generator=torch.Generator().manual_seed(size[0]))
        a, b = ours.raw_outputs([image])[0], theirs.raw_outputs([image])[0]
        for key in ("semantic", "center", "offset"):
            assert float((a[key] - b[key]).abs().max() / b[key].std()) < 1e-4, (size, key)


def test_predictions_equal_pytorch_pixel_for_pixel(exported) -> None:
    """On the synthetic val images, with flip TTA too: the same label maps, segments and instances."""
    for tta in (False, True):
        ours = onnx_predictor(exported["onnx"], tta_flip=tta, batch_size=2)
        theirs = Predictor.from_checkpoint(exported["checkpoint"], device="cpu", tta_flip=tta, batch_size=2)
        images = [load_image(p) for p in sorted(exported["images"].iterdir())]
        for a, b in zip(ours.predict_batch(images), theirs.predict_batch(images)):
            np.testing.assert_array_equal(a.label_map, b.label_map)
            np.testing.assert_array_equal(a.semantic, b.semantic)
            assert [i.label for i in a.instances] == [i.label for i in b.instances]
            assert [i.score for i in a.instances] == pytest.approx([i.score for i in b.instances], rel=1e-4)


def test_predict_onnx_writes_what_predict_checkpoint_writes(exported, tmp_path) -> None:
    for kind, flag, path in (("onnx", "--onnx", exported["onnx"]), ("pt", "--checkpoint", exported["checkpoint"])):
        result = _cli("predict", flag, str(path), "--input", str(exported["images"]), "--output", str(tmp_path / kind),
                      "--no-progress", "--no-pictures")
        assert result.returncode == 0, result.stderr
    onnx_json, pt_json = (json.loads((tmp_path / k / "predictions.json").read_text()) for k in ("onnx", "pt"))
    assert onnx_json["annotations"] == pt_json["annotations"]
    for png in (tmp_path / "pt" / "panoptic").iterdir():
        assert (tmp_path / "onnx" / "panoptic" / png.name).read_bytes() == png.read_bytes()
    result = _cli("predict", "--onnx", str(exported["onnx"]), "--input", str(exported["images"]), "--output",
                  str(tmp_path / "x"), "--device", "cuda")
    assert result.returncode == 2 and "--onnx takes neither --categories" in result.stderr


def test_fixed_size_graph_pads_smaller_images_and_refuses_larger(exported, tmp_path) -> None:
    fixed = export_onnx(exported["checkpoint"], tmp_path / "fixed.onnx", size=(129, 161), postprocess=False)
    assert fixed.input_size == (129, 161) and all(v < 1e-4 for v in fixed.max_error.values())
    ours, theirs = onnx_predictor(fixed.path), Predictor.from_checkpoint(exported["checkpoint"], device="cpu")
    # A 96x160 image runs padded to 129x161 (global pooling sees the padding): PyTorch on the same padded input.
    image = torch.from_numpy(load_image(sorted(exported["images"].iterdir())[0])).permute(2, 0, 1).float() / 255
    padded = theirs.model.pixel_mean[0].expand(3, 129, 161).clone()
    padded[:, :96, :160] = image
    a, b = ours.raw_outputs([image])[0], theirs.raw_outputs([padded])[0]
    for key in ("semantic", "center", "offset"):
        reference = b[key][..., :96, :160]
        assert float((a[key] - reference).abs().max() / reference.std()) < 1e-4, key
    assert ours.predict(image).label_map.shape == (96, 160)
    with pytest.raises(ValueError, match=r"fixed.onnx was exported for inputs of 129x161, this one needs 161x177: "
                                         r"export again with a larger --size"):
        ours.predict(np.zeros((150, 170, 3), np.uint8))


def test_export_refusals(exported, tmp_path, monkeypatch) -> None:
    with pytest.raises(ExportError, match=r"--size 100x100 is not a size this network resamples exactly \(output "
                                          r"stride 16\): use 113x113"):
        export_onnx(exported["checkpoint"], tmp_path / "x.onnx", size=(100, 100), postprocess=False)
    assert not (tmp_path / "x.onnx").exists()


def test_files_that_are_not_exported_models(tmp_path) -> None:
    import onnx
    from onnx import TensorProto, helper

    text = tmp_path / "notes.onnx"
    text.write_text("not a model")
    with pytest.raises(ExportError, match=r"notes.onnx is not an ONNX model"):
        read_onnx_metadata(text)
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    other = tmp_path / "other.onnx"
    onnx.save(helper.make_model(graph), str(other))
    with pytest.raises(ExportError, match=r"other.onnx is an ONNX model but not one exported by panoptic-deeplab"):
        onnx_predictor(other)
    with pytest.raises(ExportError, match=r"is a directory: expected an .onnx file"):
        read_onnx_metadata(tmp_path)


def test_missing_extra_is_named(monkeypatch) -> None:
    import importlib

    from panoptic_deeplab.export import runtime

    real = importlib.import_module

    def refuse(name: str, *args, **kwargs):  # noqa: ANN202
        if name == "onnxruntime":
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(runtime.importlib, "import_module", refuse)
    with pytest.raises(ExportError, match=r"need the 'export' extra \(onnxruntime is not installed\): pip install "
                                          r"'panoptic-deeplab\[export\]'"):
        runtime.require("onnxruntime")


def test_readme_deploy_block_runs(exported, tmp_path, monkeypatch) -> None:
    import re

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Deploy"):]
    (block,) = re.findall(r"```python\n(.*?)```", section[: section.index("\n## ", 1)], flags=re.S)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.onnx").symlink_to(exported["onnx"])
    (tmp_path / "image.png").symlink_to(sorted(exported["images"].iterdir())[0])
    namespace: dict = {}
    exec(compile(block, "README.md (Deploy)", "exec"), namespace)
    assert namespace["result"].label_map.shape == (96, 160) and (tmp_path / "out" / "image.png").is_file()

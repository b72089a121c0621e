"""int8 static quantization of exported files (export/quantize.py, the quantize verb)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from panoptic_deeplab.data.coco_panoptic import load_image
from panoptic_deeplab.export import ExportError, onnx_predictor, quantize_onnx, read_onnx_metadata

onnx = pytest.importorskip("onnx", reason="the 'export' extra is not installed")
pytest.importorskip("onnxruntime", reason="the 'export' extra is not installed")


def _images(folder: Path) -> list[Path]:
    return sorted(folder.iterdir())


def _int8_convolutions(path: Path) -> tuple[int, int]:
    """(convolutions whose weights come out of a DequantizeLinear, all convolutions) of an ONNX file."""
    graph = onnx.load(str(path)).graph
    dequantized = {out for node in graph.node if node.op_type == "DequantizeLinear" for out in node.output}
    convs = [node for node in graph.node if node.op_type == "Conv"]
    return sum(1 for node in convs if node.input[1] in dequantized), len(convs)


@pytest.mark.parametrize("kind", ["exported", "pipeline"])
def test_quantized_file_runs_like_the_float_file(kind, request, tmp_path) -> None:
    files = request.getfixturevalue(kind)
    images = _images(files["images"])
    result = quantize_onnx(files["onnx"], tmp_path / "int8.onnx", images)
    assert result.calibration_images == len(images) == 3
    int8, total = _int8_convolutions(result.path)
    assert int8 == total == result.quantized_nodes > 20  # every convolution of the network
    assert _int8_convolutions(files["onnx"])[0] == 0
    metadata, source = read_onnx_metadata(result.path), read_onnx_metadata(files["onnx"])
    assert metadata.pop("precision") == "int8" and metadata.pop("calibration_images") == 3
    assert metadata.pop("source") == files["onnx"].name
    assert metadata == source  # config, categories, padding and kind carry over
    float_predictor, int8_predictor = onnx_predictor(files["onnx"]), onnx_predictor(result.path)
    for path in images:
        image = load_image(path)
        a, b = int8_predictor.predict(image), float_predictor.predict(image)
        assert a.label_map.shape == b.label_map.shape
        # int8 rounding moves the raw outputs a little (random weights amplify it: measured semantic agreement
        # >= 99.5%, output correlations >= 0.96, label maps >= 98.8%); a broken quantization gives noise.
        assert (a.semantic == b.semantic).mean() > 0.98
        assert (a.label_map == b.label_map).mean() > 0.95
        for key in ("center", "offset"):
            assert np.corrcoef(getattr(a, key).ravel(), getattr(b, key).ravel())[0, 1] > 0.9, key


def test_quantize_verb_and_predict_on_its_file(exported, tmp_path) -> None:
    output = tmp_path / "network_int8.onnx"
    command = [sys.executable, "-m", "panoptic_deeplab.cli"]
    done = subprocess.run([*command, "quantize", "--onnx", str(exported["onnx"]), "--calibration",
                           str(exported["images"]), "--max-images", "2", "--output", str(output)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    int8, _ = _int8_convolutions(output)
    assert done.stdout.splitlines()[0] == f"wrote {output}: {int8} convolutions in int8, calibrated on 2 image(s)"
    predicted = subprocess.run([*command, "predict", "--onnx", str(output), "--input", str(exported["images"]),
                                "--output", str(tmp_path / "out"), "--no-progress", "--no-pictures"],
                               capture_output=True, text=True)
    assert predicted.returncode == 0, predicted.stderr
    written = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert len(written["annotations"]) == 3
    refused = subprocess.run([*command, "quantize", "--onnx", str(output), "--calibration", str(exported["images"]),
                              "--output", str(tmp_path / "again.onnx")], capture_output=True, text=True)
    assert refused.returncode == 2
    assert refused.stderr == (f"error: {output} is already quantized (int8): quantize the float file export "
                              "wrote\n")


def test_quantize_refusals(exported, tmp_path) -> None:
    images = _images(exported["images"])
    with pytest.raises(ExportError, match="quantization needs at least one calibration image"):
        quantize_onnx(exported["onnx"], tmp_path / "a.onnx", [])
    with pytest.raises(ExportError, match="is the input file: write the int8 model to another file"):
        quantize_onnx(exported["onnx"], exported["onnx"], images)
    text = tmp_path / "notes.onnx"
    text.write_text("not a model")
    with pytest.raises(ExportError, match=f"{text} is not an ONNX model"):
        quantize_onnx(text, tmp_path / "b.onnx", images)
    empty = tmp_path / "empty"
    empty.mkdir()
    done = subprocess.run([sys.executable, "-m", "panoptic_deeplab.cli", "quantize", "--onnx", str(exported["onnx"]),
                           "--calibration", str(empty), "--output", str(tmp_path / "c.onnx")],
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith(f"error: folder {empty} contains no images")
    assert not (tmp_path / "a.onnx").exists() and not (tmp_path / "c.onnx").exists()

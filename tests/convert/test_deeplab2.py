"""deeplab2 checkpoints: the TF2 reader and the converter, on the checkpoint deeplab2's own code wrote (shared/refdata).

``dl2_mnv3s_os32_narrow`` (see ``shared/refdata/README.md``): MobileNetV3-Small os32 with decoder and head widths
unlike any published model, random weights with real BN statistics, Adam slots beside the model, and deeplab2's raw
outputs and post-processing on a real photo. Skipped where shared/ is absent.
"""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from panoptic_compare import rename_like
from panoptic_deeplab.convert import ConversionError, convert_checkpoint
from panoptic_deeplab.convert.deeplab2 import is_model_tensor
from panoptic_deeplab.convert.tf_checkpoint import TFCheckpointError, read_index, read_tf_checkpoint
from panoptic_deeplab.data.coco_panoptic import LABEL_DIVISOR
from panoptic_deeplab.inference.postprocess import panoptic_postprocess
from panoptic_deeplab.inference.predictor import Predictor

REFDATA = Path(__file__).resolve().parents[3] / "shared" / "refdata"
NAME = "dl2_mnv3s_os32_narrow"
ARCHIVE = REFDATA / f"{NAME}.tar.gz"
pytestmark = pytest.mark.skipif(not ARCHIVE.is_file(), reason=f"{ARCHIVE} is absent (shared/refdata)")
# shared/refdata/README.md: the bar for a converter.
RELATIVE_TO_STD = 1e-3


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    with np.load(REFDATA / f"{NAME}.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("dl2") / "converted.pt"
    return convert_checkpoint("dl2", ARCHIVE, out, output_stride=32, progress=False)


@pytest.fixture(scope="module")
def checkpoint_folder(tmp_path_factory) -> Path:
    """The archive's folder (ckpt-30000.index + .data-00000-of-00001), to damage copies of."""
    root = tmp_path_factory.mktemp("dl2_folder")
    with tarfile.open(ARCHIVE) as tar:
        tar.extractall(root, filter="data")
    return root / NAME


def _reference_raw(reference: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {
        "semantic": torch.from_numpy(reference["semantic"]).permute(0, 3, 1, 2),
        "center": torch.from_numpy(reference["center"])[:, None],
        "offset": torch.from_numpy(reference["offset"]).permute(0, 3, 1, 2),
    }


def test_reader_skips_optimizer_and_keeps_every_model_tensor(checkpoint_folder) -> None:
    num_shards, entries = read_index(checkpoint_folder / "ckpt-30000.index")
    assert num_shards == 1 and len(entries) == 837  # README: 837 tensors, Adam slots and bookkeeping included
    model = read_tf_checkpoint(checkpoint_folder, is_model_tensor)
    assert len(model) == 362  # the 363 model items of the README less global_step
    assert all(name.endswith("/.ATTRIBUTES/VARIABLE_VALUE") for name in model)
    kernel = model["encoder/_blocks/0/_conv/kernel/.ATTRIBUTES/VARIABLE_VALUE"]
    assert kernel.dtype == torch.float32 and tuple(kernel.shape) == (3, 3, 3, 16)
    # the folder, the prefix and the .index name the same checkpoint; the archive too (same bytes)
    prefix = checkpoint_folder / "ckpt-30000"
    for path in (prefix, prefix.with_suffix(".index"), ARCHIVE):
        again = read_tf_checkpoint(path, lambda n: n.startswith("encoder/_blocks/0/"))
        assert torch.equal(again["encoder/_blocks/0/_conv/kernel/.ATTRIBUTES/VARIABLE_VALUE"], kernel)


def test_converted_outputs_equal_deeplab2(converted, reference) -> None:
    """Raw outputs on deeplab2's own photo: max |ours - deeplab2| < 1e-3 of each output's standard deviation."""
    model_cfg = converted.config.model
    assert (model_cfg.backbone, model_cfg.output_stride, model_cfg.bn_eps) == ("dl2_mobilenetv3_small", 32, 1e-3)
    # every width read from the shapes (README: 40/48 semantic, 20/24 instance, projections 24/12 and 20/8)
    assert (model_cfg.aspp_channels, model_cfg.semantic_decoder_channels, model_cfg.instance_aspp_channels,
            model_cfg.instance_decoder_channels) == (40, 48, 20, 24)
    assert tuple(model_cfg.semantic_low_level_channels) == (24, 12)
    assert tuple(model_cfg.instance_low_level_channels) == (20, 8)
    assert (model_cfg.semantic_head_channels, model_cfg.instance_head_channels) == (56, 16)
    post = converted.config.postprocess
    assert (post.nms_kernel, post.top_k, post.stuff_area) == (13, 400, 2048)  # the os32 config's

    predictor = Predictor.from_checkpoint(converted.path, device="cpu")
    image = torch.from_numpy(reference["image"]).permute(2, 0, 1).float() / 255
    ours = predictor.raw_outputs([image])[0]
    for key, theirs in _reference_raw(reference).items():
        assert ours[key].shape == theirs.shape, key
        error = float((ours[key] - theirs).abs().max() / theirs.std())
        assert error < RELATIVE_TO_STD, (key, error)


def test_postprocessing_equals_deeplab2_with_its_number_of_centers(converted, reference) -> None:
    """deeplab2 keeps the centers above ``top_k(heatmap, 400, sorted=False)[-1]``: with ``sorted=False`` the last
    of the k values is not the smallest, so it kept fewer than 400 here (the largest id of its instance map).
    With that many centers our post-processing gives deeplab2's panoptic map exactly, up to instance numbers."""
    raw = _reference_raw(reference)
    kept = int(reference["instance_pred"].max())
    assert kept < converted.config.postprocess.top_k
    post = converted.config.postprocess
    post = type(post)(post.center_threshold, post.nms_kernel, kept, post.stuff_area)
    ours = panoptic_postprocess(raw["semantic"], raw["center"], raw["offset"], converted.meta.thing_train_ids,
                                post)[0]
    theirs = reference["panoptic"][0].astype(np.int64)
    np.testing.assert_array_equal(ours.semantic.numpy(), reference["semantic_pred"][0])
    renamed = rename_like(ours.label_map.numpy(), theirs, LABEL_DIVISOR)
    np.testing.assert_array_equal(renamed, theirs)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "panoptic_deeplab.cli", *args], capture_output=True, text=True)


def test_predict_and_evaluate_on_the_converted_checkpoint(converted, reference, tmp_path) -> None:
    """The CLI on the converted file; evaluated against deeplab2's own prediction as ground truth, PQ is ~100
    with deeplab2's number of centers."""
    from panoptic_deeplab.inference.results import PanopticResult

    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(reference["image"]).save(images / "photo.png")
    predicted = _cli("predict", "--checkpoint", str(converted.path), "--input", str(images), "--output",
                     str(tmp_path / "pred"), "--device", "cpu")
    assert predicted.returncode == 0, predicted.stderr
    assert (tmp_path / "pred" / "panoptic" / "photo.png").is_file()

    theirs = reference["panoptic"][0].astype(np.int64)
    gt = PanopticResult(label_map=theirs, semantic=theirs // LABEL_DIVISOR, instances=[],
                        centers=np.zeros((0, 2), np.int64), center_scores=np.zeros(0, np.float32),
                        center=np.zeros(theirs.shape, np.float32), offset=np.zeros((2, *theirs.shape), np.float32), meta=converted.meta)
    gt.save(tmp_path / "gt", "photo", image_file_name="photo.png")
    kept = int(reference["instance_pred"].max())
    report = tmp_path / "report.json"
    evaluated = _cli("evaluate", "--checkpoint", str(converted.path), "--device", "cpu", "--no-progress",
                     "--output", str(report), f"data.val.images={images}", f"data.val.json={tmp_path / 'gt/photo.json'}",
                     f"data.val.panoptic={tmp_path / 'gt'}", "data.num_workers=0", f"postprocess.top_k={kept}")
    assert evaluated.returncode == 0, evaluated.stderr
    # our network's outputs differ from deeplab2's by float32 rounding (1e-4 of their spread): a few pixels move
    assert json.loads(report.read_text())["panoptic"]["All"]["pq"] > 0.999


# ---------------------------------------------------------------------------------------------------
# Malformed inputs: each a clear error naming the file, nothing written
# ---------------------------------------------------------------------------------------------------


def _damaged_copy(checkpoint_folder: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoint_folder, folder)
    return folder


def _refused(path: Path, tmp_path: Path, match: str, source: str = "dl2") -> None:
    out = tmp_path / "out.pt"
    with pytest.raises(ConversionError, match=match):
        convert_checkpoint(source, path, out, output_stride=32 if source == "dl2" else None, progress=False)
    assert not out.exists()


def test_truncated_index(checkpoint_folder, tmp_path) -> None:
    folder = _damaged_copy(checkpoint_folder, tmp_path)
    index = folder / "ckpt-30000.index"
    index.write_bytes(index.read_bytes()[:-100])
    _refused(folder, tmp_path, r"ckpt-30000.index is not a readable TensorFlow checkpoint index: no table magic")


def test_missing_data_shard(checkpoint_folder, tmp_path) -> None:
    folder = _damaged_copy(checkpoint_folder, tmp_path)
    (folder / "ckpt-30000.data-00000-of-00001").unlink()
    _refused(folder, tmp_path, r"ckpt-30000.data-00000-of-00001 is missing: the data shard 0 of 1")


def test_crc_mismatch_in_a_tensor_and_in_the_index(checkpoint_folder, tmp_path) -> None:
    folder = _damaged_copy(checkpoint_folder, tmp_path)
    _, entries = read_index(folder / "ckpt-30000.index")
    entry = entries["semantic_last_layer/kernel/.ATTRIBUTES/VARIABLE_VALUE"]
    data = folder / "ckpt-30000.data-00000-of-00001"
    raw = bytearray(data.read_bytes())
    raw[entry.offset + 5] ^= 0x40
    data.write_bytes(bytes(raw))
    _refused(folder, tmp_path, r"tensor semantic_last_layer/kernel/.ATTRIBUTES/VARIABLE_VALUE fails its CRC-32C check")
    index = folder / "ckpt-30000.index"
    raw = bytearray(index.read_bytes())
    raw[40] ^= 0x01  # inside the first data block
    index.write_bytes(bytes(raw))
    with pytest.raises(TFCheckpointError, match=r"fails its CRC-32C check"):
        read_index(index)


def test_archive_without_a_checkpoint(tmp_path) -> None:
    readme = tmp_path / "README.txt"
    readme.write_text("no checkpoint here")
    archive = tmp_path / "empty.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(readme, arcname="model/README.txt")
    _refused(archive, tmp_path, r"empty.tar.gz holds no TensorFlow checkpoint")


def test_other_references_files_are_told_apart(tmp_path) -> None:
    """A detectron2 .pkl given to --from dl2, and the deeplab2 archive given to --from d2 or bc."""
    pkl = tmp_path / "model_final.pkl"
    with open(pkl, "wb") as f:
        pickle.dump({"model": {"sem_seg_head.predictor.weight": np.zeros((19, 256, 1, 1), np.float32)}}, f)
    _refused(pkl, tmp_path, r"model_final.pkl is not a deeplab2 TF checkpoint .*looks like a detectron2 checkpoint "
                            r"\(--from d2\)")
    for source in ("d2", "bc"):
        _refused(ARCHIVE, tmp_path, r"looks like a deeplab2 TF checkpoint: use --from dl2", source=source)


def test_output_stride_is_needed_for_unpublished_files(tmp_path) -> None:
    with pytest.raises(ConversionError, match=r"dl2_mnv3s_os32_narrow.tar.gz is not a published deeplab2 file.*give "
                                              r"--config \(its .textproto\) or --output-stride 16 or 32"):
        convert_checkpoint("dl2", ARCHIVE, tmp_path / "out.pt", progress=False)

"""Checkpoint files: atomic writes, rotation, safe loading, RNG state round trip."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from panoptic_deeplab.checkpoint import (
    CheckpointError,
    atomic_torch_save,
    capture_rng_state,
    checkpoint_name,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    resolve_resume,
    restore_rng_state,
)


def _pwned(marker: str) -> None:
    """What a malicious checkpoint would run on load; here it only leaves a marker file."""
    Path(marker).write_text("code ran")


class _Malicious:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (_pwned, (self.marker,))


def test_round_trip_and_no_temporary_files(tmp_path: Path) -> None:
    state = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "iteration": 7, "config": {"a": [1, 2]}, "best_metric": None}
    path = atomic_torch_save(state, tmp_path / "run" / checkpoint_name(7))
    assert path.name == "model_0000007.pt"
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert loaded["iteration"] == 7 and loaded["config"] == {"a": [1, 2]} and loaded["best_metric"] is None
    assert sorted(p.name for p in path.parent.iterdir()) == ["model_0000007.pt"]


def test_failed_write_keeps_the_previous_file(tmp_path: Path) -> None:
    path = atomic_torch_save({"model": {"w": torch.ones(2)}}, tmp_path / "best.pt")
    with pytest.raises(Exception):
        atomic_torch_save({"model": {"w": lambda: 0}}, path)  # a lambda cannot be pickled
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]


def test_malicious_pickle_is_refused_without_running_code(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": _Malicious(marker)}, path)
    with pytest.raises(CheckpointError, match="refusing to load .*evil.pt.*may run code"):
        load_checkpoint(path)
    assert not marker.exists()


def test_missing_and_foreign_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a panoptic-deeplab checkpoint"):
        load_checkpoint(tmp_path / "list.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a zip file at all")
    with pytest.raises(CheckpointError, match="garbage.pt"):
        load_checkpoint(tmp_path / "garbage.pt")


def test_rotation_latest_and_resume_resolution(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None
    assert resolve_resume("auto", tmp_path) is None  # fresh run
    assert resolve_resume(None, tmp_path) is None
    for it in (10, 20, 30, 40):
        atomic_torch_save({"model": {}, "iteration": it}, tmp_path / checkpoint_name(it))
    atomic_torch_save({"model": {}}, tmp_path / "best.pt")
    removed = prune_checkpoints(tmp_path, keep_last=2)
    assert [p.name for p in removed] == ["model_0000010.pt", "model_0000020.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "model_0000030.pt", "model_0000040.pt"]
    assert latest_checkpoint(tmp_path) == tmp_path / "model_0000040.pt"
    assert resolve_resume("auto", tmp_path) == tmp_path / "model_0000040.pt"
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        resolve_resume(str(tmp_path / "missing.pt"), tmp_path)


def test_rng_state_round_trip_through_a_safe_checkpoint(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    np.random.normal()  # leaves a cached gaussian in numpy's state
    torch.manual_seed(3)
    path = atomic_torch_save({"model": {}, "rng": [capture_rng_state()]}, tmp_path / "rng.pt")
    expected = (random.random(), np.random.normal(), np.random.rand(), torch.rand(3))
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    restore_rng_state(load_checkpoint(path)["rng"][0])
    got = (random.random(), np.random.normal(), np.random.rand(), torch.rand(3))
    assert got[:3] == expected[:3]
    assert torch.equal(got[3], expected[3])


def test_nonfinite_weights_are_named(tmp_path) -> None:
    """Issue 23: NaN/Inf weights (a corrupted file, a diverged run) are refused with their names and a count."""
    from panoptic_deeplab.checkpoint import NonFiniteWeightsError, check_finite, initialize_from

    state = {f"layer{i}.weight": torch.ones(3) for i in range(8)}
    state["step"] = torch.tensor(3)  # integer tensors are never non-finite
    check_finite(state, "x.pt")
    state["layer1.weight"][0] = float("nan")
    state["layer6.weight"][2] = float("-inf")
    with pytest.raises(NonFiniteWeightsError, match=r"^x.pt holds NaN or Inf in 2 tensor\(s\): layer1.weight, layer6.weight;"):
        check_finite(state, "x.pt")
    for i in range(8):
        state[f"layer{i}.weight"][1] = float("inf")
    with pytest.raises(NonFiniteWeightsError, match=r"in 8 tensor\(s\): layer0.weight, .*, layer4.weight and 3 more"):
        check_finite(state, "x.pt")
    path = tmp_path / "diverged.pt"
    torch.save({"model": state}, path)
    with pytest.raises(NonFiniteWeightsError, match=r"model.init_checkpoint .*diverged.pt holds NaN or Inf"):
        initialize_from(torch.nn.Linear(1, 1), path)


def _file_of_kind(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / {"text": "notes.txt", "yaml": "config.pt", "png": "image.png", "onnx": "model.onnx",
                       "tf": "ckpt-1.index", "empty": "empty.pt", "binary": "random.bin", "dir": "run"}[kind]
    if kind == "text":
        path.write_text("my notes about the experiment\n")
    elif kind == "yaml":
        path.write_text("model:\n  backbone: resnet50\n")
    elif kind == "png":
        from PIL import Image

        Image.new("RGB", (4, 4)).save(path)
    elif kind == "onnx":
        path.write_bytes(b"\x08\x08\x12\x07pytorch")
    elif kind in ("tf", "binary"):
        path.write_bytes(bytes(range(200, 256)) * 4)
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        path.mkdir()
        atomic_torch_save({"model": {}}, path / checkpoint_name(5))
    return path


@pytest.mark.parametrize("kind, message", [
    ("text", r"notes.txt is a text file, not a panoptic-deeplab checkpoint"),
    ("yaml", r"config.pt is a YAML or text file, not a panoptic-deeplab checkpoint"),
    ("png", r"image.png is a PNG image, not a panoptic-deeplab checkpoint"),
    ("onnx", r"model.onnx is an ONNX model, not a panoptic-deeplab checkpoint: predict --onnx runs it"),
    ("tf", r"ckpt-1.index is part of a TensorFlow checkpoint, not a panoptic-deeplab checkpoint: deeplab2 "
           r"checkpoints go through convert --from dl2"),
    ("empty", r"empty.pt is an empty file, not a panoptic-deeplab checkpoint"),
    ("binary", r"random.bin is a binary file of an unknown format, not a panoptic-deeplab checkpoint"),
    ("dir", r"checkpoint .*run is a directory, not a checkpoint file \(it holds checkpoints: give one of them\)"),
])
def test_files_that_are_not_checkpoints_are_named(tmp_path: Path, kind: str, message: str) -> None:
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(_file_of_kind(tmp_path, kind))


def test_every_verb_names_the_wrong_file(tmp_path: Path) -> None:
    """predict, evaluate, train --resume and model.init_checkpoint: one line naming the file, exit status 2."""
    import subprocess
    import sys

    notes = _file_of_kind(tmp_path, "text")
    commands = [
        ["predict", "--checkpoint", str(notes), "--input", str(notes), "--output", str(tmp_path / "p")],
        ["evaluate", "--checkpoint", str(notes), "--output", str(tmp_path / "r.json")],
        ["train", "--config", "synthetic_mnv3", "--resume", str(notes), f"train.output_dir={tmp_path / 't'}"],
        ["train", "--config", "synthetic_mnv3", f"model.init_checkpoint={notes}", "model.pretrained=false",
         f"train.output_dir={tmp_path / 'i'}"],
    ]
    for command in commands:
        result = subprocess.run([sys.executable, "-m", "panoptic_deeplab.cli", *command], capture_output=True,
                                text=True)
        assert result.returncode == 2, (command, result.stderr[-2000:])
        assert "notes.txt is a text file, not a panoptic-deeplab checkpoint" in result.stderr, command[0]
        assert "Traceback" not in result.stderr, command


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=600), prefix=st.sampled_from([b"", b"PK\x03\x04", b"\x80\x02", b"\x80\x04\x95"]))
def test_load_checkpoint_fuzz_gives_a_clear_error(tmp_path_factory, data: bytes, prefix: bytes) -> None:
    """Random bytes, also behind the zip and pickle magic numbers torch files start with: CheckpointError only."""
    path = tmp_path_factory.mktemp("fuzz") / "model.pt"
    path.write_bytes(prefix + data)
    with pytest.raises(CheckpointError, match=r"model.pt"):
        load_checkpoint(path)


def test_truncated_checkpoints_give_a_clear_error(tmp_path: Path) -> None:
    whole = atomic_torch_save({"model": {"w": torch.arange(1000.0)}}, tmp_path / "whole.pt").read_bytes()
    for cut in (10, len(whole) // 3, len(whole) - 30):
        path = tmp_path / f"cut{cut}.pt"
        path.write_bytes(whole[:cut])
        with pytest.raises(CheckpointError, match=rf"cut{cut}.pt"):
            load_checkpoint(path)

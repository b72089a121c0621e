"""Video files (inference/video.py, predict --input VIDEO): PyAV round trip, tracked predictions, the overlay video,
and refusals."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from panoptic_deeplab.data.coco_panoptic import LABEL_DIVISOR, load_panoptic_json, read_panoptic_png
from panoptic_deeplab.data.synthetic import synthetic_meta
from panoptic_deeplab.data.synthetic_video import MovingObject, synthetic_sequence

pytest.importorskip("av", reason="the 'video' extra (PyAV)")

from panoptic_deeplab.inference.video import VideoWriter, predict_video, read_frames, video_info  # noqa: E402

OBJECTS = [MovingObject(20, 9, (45, 20), (0.0, 4.0)), MovingObject(24, 8, (78, 170), (0.0, -3.0))]  # they pass apart


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """30 frames of moving objects as an MP4, with their ground truth."""
    folder = tmp_path_factory.mktemp("video")
    frames = list(synthetic_sequence(30, (96, 192), OBJECTS))
    with VideoWriter(folder / "clip.mp4", 10) as writer:
        for image, _ in frames:
            writer.write(image)
    return folder / "clip.mp4", frames


def test_round_trip(clip):
    path, frames = clip
    assert video_info(path) == (30, 10)
    decoded = list(read_frames(path))
    assert len(decoded) == 30 and decoded[0].shape == (96, 192, 3) and decoded[0].dtype == np.uint8
    assert np.abs(decoded[5].astype(int) - frames[5][0]).mean() < 6  # lossy, but the same picture
    assert not list(path.parent.glob(".clip*"))  # no temporary file left


def test_odd_sizes_are_padded_and_failed_writes_leave_nothing(tmp_path):
    with VideoWriter(tmp_path / "odd.mp4", 5) as writer:
        writer.write(np.zeros((31, 45, 3), np.uint8))
    assert next(read_frames(tmp_path / "odd.mp4")).shape == (32, 46, 3)
    with pytest.raises(RuntimeError, match="stop"):
        with VideoWriter(tmp_path / "broken.mp4", 5) as writer:
            writer.write(np.zeros((32, 32, 3), np.uint8))
            raise RuntimeError("stop")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd.mp4"]


def test_predict_video_keeps_ids(clip, tmp_path):
    """A model that reads the colours: on the decoded (lossy) frames the label covering most of each object is the
    same in every frame, and the prediction set names the frames <stem>_<index>."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_tracking import colour_predictor

    path, frames = clip
    main_labels: dict[int, set[int]] = {}
    predicted = list(predict_video(colour_predictor(), path, tmp_path / "p.json", tmp_path / "png"))
    assert len(predicted) == len(frames)
    for (_, truth), (_, _, result) in zip(frames, predicted):
        for label in np.unique(truth).tolist():
            if label % LABEL_DIVISOR:
                values, counts = np.unique(result.label_map[truth == label], return_counts=True)
                main_labels.setdefault(label, set()).add(int(values[counts.argmax()]))
    assert len(main_labels) == 2 and all(len(ids) == 1 for ids in main_labels.values()), main_labels
    assert len(set().union(*main_labels.values())) == 2
    dataset = load_panoptic_json(tmp_path / "p.json")
    assert [im.file_name for im in dataset.images][:2] == ["clip_000000.png", "clip_000001.png"]
    assert len(dataset.images) == 30


def test_cli_predict_video_and_refusals(clip, tmp_path, capsys, monkeypatch):
    from panoptic_deeplab.checkpoint import atomic_torch_save
    from panoptic_deeplab.cli import main
    from panoptic_deeplab.config import Config, ModelConfig, config_to_dict
    from panoptic_deeplab.modeling import build_model

    cfg = Config()
    cfg.model = ModelConfig(backbone="mobilenetv3_small_050", pretrained=False, num_classes=7, aspp_channels=16,
                            semantic_decoder_channels=16, semantic_head_channels=16, instance_decoder_channels=16,
                            instance_head_channels=16)
    torch.manual_seed(0)
    checkpoint = atomic_torch_save({"model": build_model(cfg.model).state_dict(), "config": config_to_dict(cfg),
                                    "meta": [c.to_json() for c in synthetic_meta().categories]}, tmp_path / "m.pt")
    path, _ = clip
    argv = ["predict", "--checkpoint", str(checkpoint), "--device", "cpu", "--no-progress"]
    assert main([*argv, "--input", str(path), "--output", str(tmp_path / "out")]) == 0
    out = tmp_path / "out"
    assert f"predicted 30 frame(s) of {path}" in capsys.readouterr().out
    assert video_info(out / "clip_overlay.mp4") == (30, 10)
    dataset = load_panoptic_json(out / "predictions.json")
    assert len(dataset.images) == 30
    for annotation in dataset.annotations[:3]:
        ids = read_panoptic_png(out / "panoptic" / annotation.file_name)
        assert all(s.id // LABEL_DIVISOR == s.category_id for s in annotation.segments_info)
        assert {s.id for s in annotation.segments_info} == set(np.unique(ids).tolist()) - {0}

    fake = tmp_path / "notes.mp4"
    fake.write_text("not a video")
    assert main([*argv, "--input", str(fake), "--output", str(tmp_path / "x")]) == 2
    assert f"error: {fake}: not a readable video" in capsys.readouterr().err
    assert main([*argv, "--input", str(tmp_path / "missing.mp4"), "--output", str(tmp_path / "y")]) == 2
    assert f"--input {tmp_path / 'missing.mp4'}: no such video file" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "av", None)  # as if PyAV were not installed
    assert main([*argv, "--input", str(path), "--output", str(tmp_path / "z")]) == 2
    assert ("reading and writing videos needs the 'video' extra (PyAV is not installed): pip install "
            "'panoptic-deeplab[video]'") in capsys.readouterr().err


def test_a_long_video_streams_one_frame_at_a_time(tmp_path, monkeypatch):
    """300 frames written, read back and predicted: the decoder is never more than one frame ahead of the results
    (memory stays constant whatever the length; benchmarks/bench_video.py measures it) and every frame has its
    prediction in the committed set."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_tracking import colour_predictor

    import panoptic_deeplab.inference.video as video_module

    path = tmp_path / "long.mp4"
    with VideoWriter(path, 25) as writer:
        for image, _ in synthetic_sequence(300, (96, 192), OBJECTS):
            writer.write(image)
    decoded = []

    def counted(video):
        for frame in read_frames(video):
            decoded.append(len(decoded))
            yield frame

    monkeypatch.setattr(video_module, "read_frames", counted)
    ahead = []
    for index, (name, frame, result) in enumerate(predict_video(colour_predictor(), path, tmp_path / "p.json",
                                                                  tmp_path / "png")):
        ahead.append(len(decoded) - index)
        assert name == f"long_{index:06d}" and result.label_map.shape == frame.shape[:2] == (96, 192)
    assert len(ahead) == 300 and max(ahead) == 1
    assert len(load_panoptic_json(tmp_path / "p.json").images) == 300
    assert len(list((tmp_path / "png").iterdir())) == 300

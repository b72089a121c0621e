"""The tracker (inference/tracking.py) on synthetic sequences: ids that follow objects, occlusions, new objects,
and the Predictor's sequence API end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from panoptic_deeplab.data.coco_panoptic import LABEL_DIVISOR
from panoptic_deeplab.data.synthetic import synthetic_meta
from panoptic_deeplab.data.synthetic_video import MovingObject, synthetic_sequence
from panoptic_deeplab.inference.tracking import InstanceTracker, renumber_labels

THINGS = synthetic_meta().thing_train_ids


def _per_frame_numbers(label_map: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """What a per-frame model gives: the same segments, instance numbers 1..n per class in a random order."""
    out = label_map.copy()
    for cls in THINGS:
        labels = [v for v in np.unique(label_map).tolist() if v // LABEL_DIVISOR == cls and v % LABEL_DIVISOR]
        for number, label in zip(rng.permutation(len(labels)) + 1, labels):
            out[label_map == label] = cls * LABEL_DIVISOR + number
    return out


def _track(frames, **options) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ground truth, tracked labels) per frame, from per-frame numbers."""
    tracker = InstanceTracker(LABEL_DIVISOR, THINGS, **options)
    rng = np.random.default_rng(0)
    pairs = []
    for _, truth in frames:
        predicted = _per_frame_numbers(truth, rng)
        renumber = tracker.update(predicted)
        tracked = renumber_labels(predicted, renumber)
        pairs.append((truth, tracked))
    return pairs


def _correspondence(pairs) -> dict[int, set[int]]:
    """Ground-truth label -> every tracked label its pixels got over the sequence."""
    seen: dict[int, set[int]] = {}
    for truth, tracked in pairs:
        for label in np.unique(truth).tolist():
            if label % LABEL_DIVISOR:
                seen.setdefault(label, set()).update(np.unique(tracked[truth == label]).tolist())
    return seen


def test_random_moving_objects_keep_their_ids():
    """Five objects crossing, occluding, entering and leaving over 40 frames: each keeps one id, ids distinct."""
    pairs = _track(synthetic_sequence(40, (96, 192), seed=3))
    seen = _correspondence(pairs)
    assert len(seen) == 5 and all(len(ids) == 1 for ids in seen.values()), seen
    assert len({next(iter(ids)) for ids in seen.values()}) == 5
    for truth, tracked in pairs:  # stuff passes through
        stuff = truth % LABEL_DIVISOR == 0
        assert (tracked[stuff] == truth[stuff]).all()


def test_occluded_object_keeps_its_id_within_the_memory():
    # A still disc, hidden for 5 frames (about frames 9..13) by a square passing in front; and a second disc
    # moving right that the tracker must follow through its own gap-free path.
    objects = [
        MovingObject(20, 6, (50, 60), (0.0, 0.0), depth=0),
        MovingObject(24, 14, (50, 10), (5.0 * 0, 5.0), depth=1),
        MovingObject(20, 5, (20 + 40, 150), (0.0, -1.0), depth=0),
    ]
    frames = list(synthetic_sequence(24, (96, 192), objects))
    hidden = [t for t, (_, truth) in enumerate(frames) if not (truth == 4 * LABEL_DIVISOR + 1).any()]
    assert len(hidden) >= 3 and hidden[-1] < 23
    seen = _correspondence(_track(frames, memory=10))
    assert all(len(ids) == 1 for ids in seen.values()), seen
    # With a memory shorter than the occlusion the disc comes back as a new object, with a number never used.
    short = _correspondence(_track(frames, memory=2))
    assert len(short[4 * LABEL_DIVISOR + 1]) == 2
    assert len(set().union(*short.values())) == 4


def test_tracker_refusals_and_relabel():
    with pytest.raises(ValueError, match=r"^min_iou must be in \(0, 1\], got 0"):
        InstanceTracker(LABEL_DIVISOR, THINGS, min_iou=0)
    with pytest.raises(ValueError, match="^memory must be at least 1 frame, got 0"):
        InstanceTracker(LABEL_DIVISOR, THINGS, memory=0)
    tracker = InstanceTracker(10, [1])  # label divisor 10: instance numbers 1..9
    row = np.zeros((1, 40), dtype=np.int64)
    row[0, :9] = np.arange(11, 20)  # nine one-pixel instances of class 1
    assert tracker.update(row) == {label: label for label in range(11, 20)}
    with pytest.raises(ValueError, match="^class 1 has more than 9 tracks in this sequence"):
        tracker.update(np.roll(row, 30, axis=1))  # far away: new objects, numbers 10.. do not fit


def colour_predictor():
    """A Predictor around a model that reads the synthetic video's scene off the colours: semantic logits from the
    distance to each class colour, the center heatmap a blur of thing pixels (peaking at object centers), offsets
    zero (pixels go to the nearest center)."""
    from torch import nn

    from panoptic_deeplab.config import ModelConfig, PostProcessConfig
    from panoptic_deeplab.inference.predictor import Predictor

    meta = synthetic_meta()
    colours = torch.tensor([c.color for c in meta.categories], dtype=torch.float32) / 255

    class ColourModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("pixel_mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
            self.weight = nn.Parameter(torch.zeros(1))

        def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
            distance = ((images[:, None] - colours[None, :, :, None, None]) ** 2).sum(dim=2)
            semantic = -30.0 * distance
            thing = semantic.argmax(dim=1, keepdim=True)
            thing = ((thing == 4) | (thing == 5)).float()
            kernel = torch.ones(1, 1, 9, 9) / 81
            center = torch.nn.functional.conv2d(torch.nn.functional.conv2d(thing, kernel, padding=4), kernel,
                                                padding=4)
            return {"semantic": semantic, "center": center, "offset": torch.zeros_like(images[:, :2])}

    post = PostProcessConfig(center_threshold=0.3, nms_kernel=11, stuff_area=16)
    return Predictor(ColourModel(), (ModelConfig(num_classes=7, output_stride=16), post), meta, device="cpu")


def test_predict_sequence_end_to_end():
    """Predictor.predict_sequence with the colour model: each moving object keeps one label and one COCO segment
    id over the frames (stable ids: category_id * 1000 + number)."""
    meta = synthetic_meta()
    objects = [MovingObject(20, 9, (60, 20), (0.0, 4.0)), MovingObject(24, 8, (70, 170), (0.0, -3.0)),
               MovingObject(20, 7, (40, 100), (1.0, 0.0))]
    frames = list(synthetic_sequence(12, (96, 192), objects))
    results = list(colour_predictor().predict_sequence(image for image, _ in frames))
    seen = _correspondence([(truth, result.label_map) for (_, truth), result in zip(frames, results)])
    assert len(seen) == 3 and all(len(ids) == 1 for ids in seen.values()), seen
    for result in results:
        for segment in result.segments_info:
            mask = result.segment_ids == segment.id
            label = int(np.unique(result.label_map[mask])[0])
            assert segment.id == meta.category_id(label // LABEL_DIVISOR) * LABEL_DIVISOR + label % LABEL_DIVISOR


def test_cli_predict_sequence_of_frames(tmp_path):
    """predict --sequence on a folder of frames: every object keeps one PNG segment id across the frames."""
    from PIL import Image

    from panoptic_deeplab.checkpoint import atomic_torch_save
    from panoptic_deeplab.cli import main
    from panoptic_deeplab.config import Config, ModelConfig, config_to_dict
    from panoptic_deeplab.data.coco_panoptic import load_panoptic_json, read_panoptic_png
    from panoptic_deeplab.modeling import build_model

    cfg = Config()
    cfg.model = ModelConfig(backbone="mobilenetv3_small_050", pretrained=False, num_classes=7, aspp_channels=16,
                            semantic_decoder_channels=16, semantic_head_channels=16, instance_decoder_channels=16,
                            instance_head_channels=16)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    path = atomic_torch_save({"model": model.state_dict(), "config": config_to_dict(cfg),
                              "meta": [c.to_json() for c in synthetic_meta().categories]}, tmp_path / "model.pt")
    frames = tmp_path / "frames"
    frames.mkdir()
    for index, (image, _) in enumerate(synthetic_sequence(6, (64, 128), seed=1)):
        Image.fromarray(image).save(frames / f"frame_{index:04d}.png")
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(path), "--input", str(frames), "--output", str(out), "--device",
                 "cpu", "--sequence", "--no-progress"]) == 0
    dataset = load_panoptic_json(out / "predictions.json")
    assert [im.file_name for im in dataset.images] == [f"frame_{i:04d}.png" for i in range(6)]
    for annotation in dataset.annotations:
        ids = read_panoptic_png(out / "panoptic" / annotation.file_name)
        assert {s.id for s in annotation.segments_info} == set(np.unique(ids).tolist()) - {0}
        for segment in annotation.segments_info:  # stable ids: category_id * 1000 + instance
            assert segment.id // LABEL_DIVISOR == segment.category_id
    assert sorted(p.name for p in (out / "pictures").iterdir())[:3] == [
        "frame_0000_center.png", "frame_0000_offset.png", "frame_0000_overlay.png"]

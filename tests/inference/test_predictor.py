"""Predictor: inputs, sizes, test-time augmentation, batching and COCO panoptic output."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from panoptic_deeplab.config import ModelConfig, PostProcessConfig
from panoptic_deeplab.data.coco_panoptic import (
    CategoryInfo,
    DatasetMeta,
    load_panoptic_json,
    read_panoptic_png,
)
from panoptic_deeplab.data.transforms import IMAGENET_MEAN, pad_to_size
from panoptic_deeplab.inference.predictor import Predictor, image_to_tensor, list_images
from panoptic_deeplab.inference.results import PanopticPredictionWriter

META = DatasetMeta(
    [
        CategoryInfo(3, "ground", False, (0, 160, 0)),
        CategoryInfo(5, "sky", False, (70, 130, 180)),
        CategoryInfo(9, "car", True, (0, 0, 142)),
    ]
)
POST = PostProcessConfig(stuff_area=16)


class _Normalising(nn.Module):
    """Holds the mean/std buffers like the real model, so the predictor pads with the mean pixel."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))


class BlobModel(_Normalising):
    """Reads the scene off the colors, so its outputs follow the image under padding, flips and scales.

    Dominant green -> ground, blue -> sky, red -> car. The center heatmap is a Gaussian blur of the
    car mask (peaks at each disk's center); offsets point to the local center of mass of car pixels
    inside a wide box, which is the disk center for isolated disks.
    """

    def __init__(self, sigma: float = 3.0, box: int = 41) -> None:
        super().__init__()
        self.sigma, self.box = sigma, box
        self.calls: list[tuple[int, ...]] = []

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        self.calls.append(tuple(images.shape))
        rgb = images
        semantic = 20.0 * rgb[:, [1, 2, 0]]
        car = ((rgb[:, 0] > rgb[:, 1] + 0.2) & (rgb[:, 0] > rgb[:, 2] + 0.2)).float()[:, None]
        radius = int(3 * self.sigma)
        g = torch.exp(-torch.arange(-radius, radius + 1, dtype=torch.float32, device=images.device) ** 2
                      / (2 * self.sigma**2))
        g = g / g.sum()
        blur = F.conv2d(car, g.view(1, 1, 1, -1), padding=(0, radius))
        blur = F.conv2d(blur, g.view(1, 1, -1, 1), padding=(radius, 0))
        center = blur  # ~1 at the center of a disk of radius >= 2 sigma
        n, _, h, w = images.shape
        ys = torch.arange(h, dtype=torch.float32, device=images.device).view(1, 1, h, 1).expand(n, 1, h, w)
        xs = torch.arange(w, dtype=torch.float32, device=images.device).view(1, 1, 1, w).expand(n, 1, h, w)
        pad = self.box // 2
        mass = F.avg_pool2d(car, self.box, 1, pad, count_include_pad=False)
        com_y = F.avg_pool2d(car * ys, self.box, 1, pad, count_include_pad=False) / mass.clamp_min(1e-6)
        com_x = F.avg_pool2d(car * xs, self.box, 1, pad, count_include_pad=False) / mass.clamp_min(1e-6)
        offset = torch.cat([com_y - ys, com_x - xs], dim=1) * (mass > 0)
        return {"semantic": semantic, "center": center, "offset": offset}


class PositionModel(_Normalising):
    """Outputs that depend on pixel position only: ``offset = (a_y - y, a_x - x)``, center ``x / 100``,
    semantic logits ``(x / 10, 0, y / 10)``. Makes the TTA arithmetic checkable exactly."""

    def __init__(self, anchor: tuple[float, float] = (0.0, 0.0)) -> None:
        super().__init__()
        self.anchor = anchor

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        n, _, h, w = images.shape
        ys = torch.arange(h, dtype=torch.float32, device=images.device).view(1, 1, h, 1).expand(n, 1, h, w)
        xs = torch.arange(w, dtype=torch.float32, device=images.device).view(1, 1, 1, w).expand(n, 1, h, w)
        semantic = torch.cat([xs / 10, torch.zeros_like(xs), ys / 10], dim=1)
        offset = torch.cat([self.anchor[0] - ys, self.anchor[1] - xs], dim=1)
        return {"semantic": semantic, "center": xs / 100, "offset": offset}


def _scene(height: int, width: int, disks: list[tuple[int, int, int]]) -> np.ndarray:
    """Blue sky on top, green ground below, red disks (cy, cx, r)."""
    image = np.zeros((height, width, 3), np.uint8)
    image[: height // 3] = (20, 40, 230)
    image[height // 3 :] = (30, 200, 40)
    yy, xx = np.mgrid[:height, :width]
    for cy, cx, r in disks:
        image[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = (230, 30, 30)
    return image


def _grid(height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column index maps ``[H, W]`` (float)."""
    ys = torch.arange(height, dtype=torch.float32).view(-1, 1).expand(height, width)
    xs = torch.arange(width, dtype=torch.float32).view(1, -1).expand(height, width)
    return ys, xs


def _predictor(model: nn.Module, align_corners: bool = True, **kwargs) -> Predictor:
    cfg = ModelConfig(num_classes=3, output_stride=16, align_corners=align_corners)
    return Predictor(model, (cfg, POST), META, device="cpu", **kwargs)


DISKS = [(30, 25, 9), (40, 70, 10)]


def test_input_kinds_give_the_same_result(tmp_path):
    image = _scene(61, 97, DISKS)
    path = tmp_path / "scene.png"
    Image.fromarray(image).save(path)
    predictor = _predictor(BlobModel())
    inputs = [
        str(path),
        path,
        Image.fromarray(image),
        image,
        torch.from_numpy(image).permute(2, 0, 1).float() / 255,
    ]
    results = [predictor.predict(x) for x in inputs]
    for other in results[1:]:
        np.testing.assert_array_equal(other.label_map, results[0].label_map)
        np.testing.assert_allclose(other.offset, results[0].offset, atol=1e-5)
    # the prediction recovers the scene: two cars numbered 1 and 2, sky and ground as stuff
    labels = set(np.unique(results[0].label_map).tolist())
    assert labels == {0, 1000, 2001, 2002}
    assert len(results[0].instances) == 2
    car = results[0].instances[0]
    assert car.name == "car" and car.category_id == 9 and 0.9 < car.score <= 1.0
    assert car.mask.sum() == car.area


@pytest.mark.parametrize("size", [(61, 97), (64, 128), (1, 1), (17, 16)])
@pytest.mark.parametrize("align_corners", [True, False])
def test_any_size_gives_maps_of_the_input_size(size, align_corners):
    model = BlobModel()
    predictor = _predictor(model, align_corners=align_corners)
    result = predictor.predict(_scene(*size, []))
    assert result.label_map.shape == size
    assert result.semantic.shape == size and result.segment_ids.shape == size
    assert result.center.shape == size and result.offset.shape == (2, *size)
    h, w = model.calls[-1][2:]
    # padded to a size the network resamples exactly (SPEC §1.7)
    assert (h - int(align_corners)) % 16 == 0 and (w - int(align_corners)) % 16 == 0
    assert h >= size[0] and w >= size[1]


def test_padding_uses_the_mean_pixel():
    class Recorder(_Normalising):
        def forward(self, images):
            self.seen = images.clone()
            n, _, h, w = images.shape
            return {
                "semantic": torch.zeros(n, 3, h, w),
                "center": torch.zeros(n, 1, h, w),
                "offset": torch.zeros(n, 2, h, w),
            }

    model = Recorder()
    _predictor(model).predict(np.zeros((20, 30, 3), np.uint8))
    assert model.seen.shape[-2:] == (33, 33)
    normalised = (model.seen - model.pixel_mean) / model.pixel_std
    assert torch.all(normalised[..., 20:, :].abs() < 1e-6) and torch.all(normalised[..., 30:].abs() < 1e-6)


def test_flip_tta_flips_back_and_negates_dx():
    height, width = 61, 90  # padded to 65x97: flipping after padding would shift everything by 7 px
    predictor = _predictor(PositionModel(), tta_flip=True)
    out = predictor.raw_outputs([torch.rand(3, height, width)])[0]
    ys, xs = _grid(height, width)
    mirrored = (width - 1) - xs
    # the flipped view predicts dx = -x' at x' = W-1-x; flipped back and negated it is W-1-x
    torch.testing.assert_close(out["offset"][0, 0], -ys)
    torch.testing.assert_close(out["offset"][0, 1], ((-xs) + mirrored) / 2)
    torch.testing.assert_close(out["center"][0, 0], (xs + mirrored) / 200)
    direct = torch.stack([xs / 10, torch.zeros_like(xs), ys / 10]).softmax(0)
    flipped = torch.stack([mirrored / 10, torch.zeros_like(xs), ys / 10]).softmax(0)
    # semantic: log of the mean softmax probability of the two views
    torch.testing.assert_close(out["semantic"][0].exp(), (direct + flipped) / 2)


def test_single_view_passes_logits_through():
    predictor = _predictor(PositionModel())
    out = predictor.raw_outputs([torch.rand(3, 20, 30)])[0]
    xs = torch.arange(30, dtype=torch.float32).expand(20, 30)
    torch.testing.assert_close(out["semantic"][0, 0], xs / 10)


@pytest.mark.parametrize("flip", [False, True])
def test_multi_scale_offsets_are_rescaled_to_input_pixels(flip):
    # The model points every pixel at the input's pixel (0, 0). Seen at any scale, the offsets brought
    # back to the original size must still point at (0, 0) there: -y, -x exactly (align_corners=True).
    height, width = 61, 90
    predictor = _predictor(PositionModel(), tta_scales=(0.5, 1.0, 1.37))
    out = predictor.raw_outputs([torch.rand(3, height, width)])[0]
    ys, xs = _grid(height, width)
    torch.testing.assert_close(out["offset"][0, 0], -ys, atol=1e-4, rtol=0)
    torch.testing.assert_close(out["offset"][0, 1], -xs, atol=1e-4, rtol=0)
    if flip:
        predictor = _predictor(PositionModel(), tta_scales=(0.5, 1.37), tta_flip=True)
        out = predictor.raw_outputs([torch.rand(3, height, width)])[0]
        # flipped views point at the top-right pixel (0, W-1): the average points halfway
        torch.testing.assert_close(out["offset"][0, 1], (-xs + (width - 1 - xs)) / 2, atol=1e-4, rtol=0)


def test_multi_scale_offsets_half_pixel_convention():
    # With align_corners=False the fixed point of resizing is the corner (-0.5, -0.5): a model pointing
    # there is seen pointing there at every scale (away from the clamped border rows).
    height, width = 64, 96
    predictor = _predictor(PositionModel(anchor=(-0.5, -0.5)), align_corners=False, tta_scales=(0.5, 1.5))
    out = predictor.raw_outputs([torch.rand(3, height, width)])[0]
    ys, xs = _grid(height, width)
    inner = (slice(2, -2), slice(2, -2))
    torch.testing.assert_close(out["offset"][0, 0][inner], (-0.5 - ys)[inner], atol=1e-4, rtol=0)
    torch.testing.assert_close(out["offset"][0, 1][inner], (-0.5 - xs)[inner], atol=1e-4, rtol=0)


def test_tta_keeps_the_scene():
    image = _scene(61, 97, DISKS)
    plain = _predictor(BlobModel()).predict(image)
    tta = _predictor(BlobModel(), tta_flip=True, tta_scales=(0.75, 1.0, 1.25)).predict(image)
    assert len(tta.instances) == 2
    agreement = (plain.label_map == tta.label_map).mean()
    assert agreement > 0.98


def test_batch_equals_single():
    images = [_scene(61, 97, DISKS), _scene(64, 128, [(20, 100, 8)]), _scene(33, 40, [(15, 15, 6)])]
    model = BlobModel()
    predictor = _predictor(model, batch_size=3)
    batched = predictor.predict_batch(images)
    assert model.calls[-1][0] == 3  # one forward pass for the three images
    assert model.calls[-1][2:] == (65, 129)
    for image, result in zip(images, batched):
        single = predictor.predict(image)
        np.testing.assert_array_equal(result.label_map, single.label_map)
        np.testing.assert_allclose(result.center, single.center, atol=1e-5)
        assert [s.to_json() for s in result.segments_info] == [s.to_json() for s in single.segments_info]


def test_input_errors_are_clear(tmp_path):
    predictor = _predictor(BlobModel())
    with pytest.raises(ValueError, match="missing.png"):
        predictor.predict(tmp_path / "missing.png")
    bad = tmp_path / "notanimage.jpg"
    bad.write_bytes(b"hello")
    with pytest.raises(ValueError, match="notanimage.jpg"):
        predictor.predict(bad)
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        predictor.predict(np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        predictor.predict(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        predictor.predict(torch.zeros(10, 10, 3))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        predictor.predict(torch.full((3, 10, 10), 255.0))
    with pytest.raises(ValueError, match="floating"):
        predictor.predict(torch.zeros(3, 10, 10, dtype=torch.uint8))
    with pytest.raises(TypeError, match="list"):
        image_to_tensor([1, 2, 3])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        predictor.predict(np.zeros((0, 5, 3), np.uint8))
    with pytest.raises(ValueError, match="tta_scales"):
        _predictor(BlobModel(), tta_scales=(0.0,))
    with pytest.raises(ValueError, match="4 classes"):
        Predictor(BlobModel(), (ModelConfig(num_classes=4), POST), META, device="cpu")


def test_save_writes_coco_panoptic(tmp_path):
    result = _predictor(BlobModel()).predict(_scene(61, 97, DISKS))
    annotation = result.save(tmp_path / "out", "scene", image_file_name="scene.jpg")
    ids = read_panoptic_png(tmp_path / "out" / "scene.png")
    assert ids.shape == (61, 97)
    dataset = load_panoptic_json(tmp_path / "out" / "scene.json")
    assert [c.id for c in dataset.meta.categories] == [3, 5, 9]
    (entry,) = dataset.annotations
    assert entry.file_name == "scene.png" and entry.to_json() == annotation.to_json()
    assert (dataset.images[0].file_name, dataset.images[0].height, dataset.images[0].width) == ("scene.jpg", 61, 97)
    segments = {s.id: s for s in entry.segments_info}
    assert set(segments) == set(np.unique(ids).tolist()) - {0}
    assert sorted(s.category_id for s in segments.values()) == [3, 5, 9, 9]
    for seg in segments.values():
        mask = ids == seg.id
        ys, xs = np.nonzero(mask)
        assert seg.area == mask.sum() and not seg.iscrowd
        assert list(seg.bbox) == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]


def test_writer_is_atomic_and_replaces(tmp_path):
    predictor = _predictor(BlobModel())
    results = predictor.predict_batch([_scene(40, 50, [(20, 20, 8)]), _scene(30, 30, [])])
    json_path, png_dir = tmp_path / "pred.json", tmp_path / "pred"
    with pytest.raises(RuntimeError):
        with PanopticPredictionWriter(json_path, png_dir, META) as writer:
            writer.add(results[0], "a.jpg")
            raise RuntimeError("boom")
    assert not json_path.exists() and not png_dir.exists()
    assert list(tmp_path.iterdir()) == []  # temporary folder removed too
    for _ in range(2):  # the second run replaces the first
        with PanopticPredictionWriter(json_path, png_dir, META) as writer:
            writer.add(results[0], "a.jpg", image_id=7)
            writer.add(results[1], "b.png")
            with pytest.raises(ValueError, match="stem 'a'"):
                writer.add(results[1], "a.png")
    dataset = load_panoptic_json(json_path)
    assert [im.id for im in dataset.images] == [7, "b"]
    assert sorted(p.name for p in png_dir.iterdir()) == ["a.png", "b.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred", "pred.json"]


def test_list_images(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing"):
        list_images(tmp_path / "nothing")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="no images"):
        list_images(tmp_path)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "b.PNG")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "a.jpg")
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.PNG"]
    assert list_images(tmp_path / "a.jpg") == [tmp_path / "a.jpg"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    image = _scene(61, 97, DISKS)
    cpu = _predictor(BlobModel()).predict(image)
    cfg = ModelConfig(num_classes=3, output_stride=16)
    cuda = Predictor(BlobModel(), (cfg, POST), META, device="cuda").predict(image)
    np.testing.assert_array_equal(cpu.label_map, cuda.label_map)
    assert math.isclose(cpu.instances[0].score, cuda.instances[0].score, rel_tol=1e-4)


# ---------------------------------------------------------------------------------------------
# A real (tiny, random) network through its checkpoint and the command line


def _tiny_config():
    from panoptic_deeplab.config import Config

    cfg = Config()
    cfg.model = ModelConfig(
        backbone="mobilenetv3_large", pretrained=False, num_classes=3, aspp_channels=16,
        semantic_decoder_channels=16, semantic_head_channels=16, instance_decoder_channels=16,
        instance_head_channels=16,
    )
    cfg.postprocess = POST
    return cfg


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from panoptic_deeplab.config import config_to_dict
    from panoptic_deeplab.checkpoint import atomic_torch_save
    from panoptic_deeplab.modeling import build_model

    torch.manual_seed(0)
    cfg = _tiny_config()
    model = build_model(cfg.model)
    with torch.no_grad():  # a center head that fires somewhere, so instances exist
        for p in model.parameters():
            p.mul_(3.0)
    folder = tmp_path_factory.mktemp("ckpt")
    state = {"model": model.state_dict(), "config": config_to_dict(cfg), "meta": META.to_json()}
    path = atomic_torch_save(state, folder / "model.pt")
    no_meta = atomic_torch_save({k: v for k, v in state.items() if k != "meta"}, folder / "no_meta.pt")
    return path, no_meta


def test_from_checkpoint_real_model(checkpoint):
    path, no_meta = checkpoint
    predictor = Predictor.from_checkpoint(path, device="cpu", batch_size=2)
    assert predictor.meta.class_names == ["ground", "sky", "car"]
    assert predictor.postprocess_cfg.stuff_area == POST.stuff_area
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (50, 70, 3), dtype=np.uint8) for _ in range(2)]
    batched = predictor.predict_batch(images)
    for image, result in zip(images, batched):
        single = predictor.predict(image)
        assert result.label_map.shape == (50, 70)
        np.testing.assert_allclose(result.center, single.center, atol=1e-4)
        np.testing.assert_allclose(result.offset, single.offset, atol=1e-3)
    with pytest.raises(ValueError, match="no 'meta' entry"):
        Predictor.from_checkpoint(no_meta, device="cpu")
    assert Predictor.from_checkpoint(no_meta, device="cpu", meta=META).meta is META


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_checkpoint_with_tta_and_bf16(checkpoint):
    """A real network on CUDA with flip + multi-scale TTA gives the CPU's results (float noise aside); bf16
    runs and keeps the output size."""
    path, _ = checkpoint
    image = _scene(61, 97, DISKS)
    options = dict(tta_flip=True, tta_scales=(0.75, 1.0))
    cpu = Predictor.from_checkpoint(path, device="cpu", **options).predict(image)
    cuda = Predictor.from_checkpoint(path, device="cuda", **options).predict(image)
    assert float((cpu.label_map == cuda.label_map).mean()) > 0.99
    np.testing.assert_allclose(cuda.center, cpu.center, atol=1e-3)
    bf16 = Predictor.from_checkpoint(path, device="cuda", precision="bf16").predict(image)
    assert bf16.label_map.shape == (61, 97)


def test_cli_predict_folder(checkpoint, tmp_path, capsys):
    from panoptic_deeplab.cli import main

    path, no_meta = checkpoint
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(_scene(61, 97, DISKS)).save(images / "first.png")
    Image.fromarray(_scene(40, 64, [(20, 30, 8)])).save(images / "second.jpg")
    (images / "readme.txt").write_text("not an image")
    out = tmp_path / "out"
    argv = ["predict", "--checkpoint", str(path), "--input", str(images), "--output", str(out),
            "--device", "cpu", "--tta-flip", "--tta-scales", "0.75,1", "--no-progress"]
    assert main(argv) == 0
    dataset = load_panoptic_json(out / "predictions.json")
    assert [im.file_name for im in dataset.images] == ["first.png", "second.jpg"]
    assert [(im.height, im.width) for im in dataset.images] == [(61, 97), (40, 64)]
    for annotation, image in zip(dataset.annotations, dataset.images):
        ids = read_panoptic_png(out / "panoptic" / annotation.file_name)
        assert ids.shape == (image.height, image.width)
        assert {s.id for s in annotation.segments_info} == set(np.unique(ids).tolist()) - {0}
    for stem, size in (("first", (97, 61)), ("second", (64, 40))):
        assert Image.open(out / "pictures" / f"{stem}_center.png").size == size
        assert Image.open(out / "pictures" / f"{stem}_offset.png").size == size
        overlay = Image.open(out / "pictures" / f"{stem}_overlay.png")
        assert overlay.width == size[0] and overlay.height >= size[1]

    # a checkpoint without categories needs --categories
    assert main(argv[:2] + [str(no_meta)] + argv[3:]) == 2
    assert "no 'meta' entry" in capsys.readouterr().err
    categories = ["--categories", str(out / "predictions.json"), "--no-pictures"]
    assert main(argv[:2] + [str(no_meta)] + argv[3:] + categories) == 0
    # clear errors for missing or empty inputs and a missing checkpoint
    def run(ckpt, source):
        return main(["predict", "--checkpoint", str(ckpt), "--input", str(source), "--output", str(out)])

    assert run(path, tmp_path / "nope") == 2
    assert "nope does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run(path, empty) == 2
    assert "contains no images" in capsys.readouterr().err
    assert run(tmp_path / "x.pt", images) == 2
    assert "x.pt does not exist" in capsys.readouterr().err


def test_cli_predict_skips_unreadable_images(checkpoint, tmp_path, capsys):
    """A corrupt image among good ones is skipped with a warning naming it (exit 1), the rest are written; when
    nothing can be read, nothing is committed and an earlier prediction set stays as it was (exit 2)."""
    from panoptic_deeplab.cli import main

    path, _ = checkpoint
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(_scene(40, 64, [(20, 30, 8)])).save(images / "good.png")
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8 not really a JPEG")
    out = tmp_path / "out"
    argv = ["predict", "--checkpoint", str(path), "--device", "cpu", "--output", str(out), "--no-progress"]
    assert main([*argv, "--input", str(images)]) == 1
    err = capsys.readouterr().err
    assert "warning: skipped" in err and "corrupt.jpg: unreadable or truncated image" in err
    assert "skipped 1 unreadable image(s): corrupt.jpg" in err
    assert [im.file_name for im in load_panoptic_json(out / "predictions.json").images] == ["good.png"]
    assert (out / "pictures" / "good_overlay.png").is_file()

    before = (out / "predictions.json").read_bytes()
    assert main([*argv, "--input", str(images / "corrupt.jpg")]) == 2
    assert "none of the 1 image(s) could be read" in capsys.readouterr().err
    assert (out / "predictions.json").read_bytes() == before
    assert sorted(p.name for p in (out / "panoptic").iterdir()) == ["good.png"]
    assert sorted(p.name for p in out.iterdir()) == ["panoptic", "pictures", "predictions.json"]  # no temp folder


def test_package_exports_predictor():
    import panoptic_deeplab

    assert panoptic_deeplab.Predictor is Predictor


def test_checkpoint_predictor_runs_channels_last(tmp_path) -> None:
    """A predictor built from a checkpoint owns its model and runs it channels_last (faster on CPU), with the
    same result as the contiguous model up to float rounding."""
    from panoptic_deeplab.config import Config, ModelConfig, config_to_dict
    from panoptic_deeplab.checkpoint import atomic_torch_save
    from panoptic_deeplab.modeling import build_model

    cfg = Config(model=ModelConfig(backbone="mobilenetv3_small_050", pretrained=False, num_classes=3,
                                   aspp_channels=16, semantic_decoder_channels=16, semantic_head_channels=16,
                                   instance_decoder_channels=8, instance_head_channels=8))
    model = build_model(cfg.model).eval()
    path = atomic_torch_save({"model": model.state_dict(), "config": config_to_dict(cfg), "meta": META.to_json()},
                             tmp_path / "c.pt")
    predictor = Predictor.from_checkpoint(path, device="cpu")
    conv = next(p for p in predictor.model.parameters() if p.dim() == 4 and p.shape[-1] > 1)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    image = torch.rand(3, 40, 60)
    with torch.no_grad():  # the predictor pads to 49x65 (k*16+1) with the mean pixel
        expected = model(pad_to_size(image, (49, 65), list(IMAGENET_MEAN))[None])
    got = predictor.raw_outputs([image])[0]
    for key in ("semantic", "center", "offset"):
        want = expected[key][..., :40, :60]
        assert want.abs().max() > 0
        assert torch.allclose(got[key], want, rtol=1e-4, atol=1e-4 * want.abs().max().item()), key


def test_fp32_turns_cuda_tf32_off_for_the_network_and_tf32_on() -> None:
    """CUDA's TF32 switches as the network sees them (global flags, readable without a GPU), and after the call."""

    class FlagProbe(_Normalising):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(1))  # a PyTorch model, as tf32 asks
            self.seen: list[tuple[bool, bool]] = []

        def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
            self.seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
            return PositionModel().forward(images)

    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    cfg = ModelConfig(num_classes=3, output_stride=16)
    for precision, expected in (("fp32", (False, False)), ("tf32", (True, True))):
        probe = FlagProbe()
        Predictor(probe, (cfg, POST), META, device="cpu", precision=precision).predict(_scene(20, 30, []))
        assert probe.seen == [expected], precision
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == before


def test_bf16_precision_runs_the_network_in_bfloat16(tmp_path, monkeypatch) -> None:
    from panoptic_deeplab.checkpoint import atomic_torch_save
    from panoptic_deeplab.cli import main
    from panoptic_deeplab.config import config_to_dict
    from panoptic_deeplab.modeling import build_model
    from panoptic_deeplab.modeling.random_weights import randomize_weights

    cfg = _tiny_config()
    model = randomize_weights(build_model(cfg.model))
    path = atomic_torch_save({"model": model.state_dict(), "config": config_to_dict(cfg), "meta": META.to_json()},
                             tmp_path / "model.pt")
    fp32 = Predictor.from_checkpoint(path, device="cpu")
    bf16 = Predictor.from_checkpoint(path, device="cpu", precision="bf16")
    # bf16 folds the batch norms into the convolutions (modeling/fusion.py); fp32 stays the exact network.
    assert not any(isinstance(m, nn.BatchNorm2d) for m in bf16.model.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in fp32.model.modules())
    seen: list[torch.dtype] = []
    conv = next(m for m in bf16.model.modules() if isinstance(m, nn.Conv2d))
    conv.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    for head in (bf16.model.center_head, bf16.model.offset_head, bf16.model.semantic_head):
        head.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    image = _scene(61, 97, DISKS)
    a, b = bf16.predict(image), fp32.predict(image)
    # (hooks in call order: a backbone conv, the semantic head, the center and offset heads) the instance heads
    # stay float32: grouping reads their peaks and pixel-scale offsets
    assert seen == [torch.bfloat16, torch.bfloat16, torch.float32, torch.float32]
    assert a.label_map.shape == (61, 97) and a.center.dtype == np.float32
    # bfloat16 keeps 8 bits of mantissa: the same field, not the same numbers (random deep weights amplify it)
    assert not np.array_equal(a.center, b.center)
    assert np.corrcoef(a.center.ravel(), b.center.ravel())[0, 1] > 0.8
    with pytest.raises(ValueError, match=r"precision must be one of fp32, tf32, bf16, got 'fp16'"):
        Predictor.from_checkpoint(path, device="cpu", precision="fp16")
    with pytest.raises(ValueError, match=r"precision bf16 needs a PyTorch model"):
        Predictor(nn.Identity(), (fp32.model_cfg, fp32.postprocess_cfg), fp32.meta, device="cpu", precision="bf16")
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(image).save(images / "a.png")
    argv = ["predict", "--checkpoint", str(path), "--input", str(images), "--output", str(tmp_path / "out"),
            "--precision", "bf16", "--no-pictures", "--no-progress"]
    assert main(argv) == 0 and (tmp_path / "out" / "panoptic" / "a.png").is_file()

    # A network the folding does not reproduce runs unfolded, with a warning saying why.
    from panoptic_deeplab.modeling import fusion

    def refuse(model: nn.Module, example: torch.Tensor) -> tuple[nn.Module, int]:
        raise fusion.FoldingError("folding 3 batch norms changed the model's 'center' output by 1")

    monkeypatch.setattr(fusion, "fold_batch_norms", refuse)
    with pytest.warns(UserWarning, match=r"^bf16: batch norms left unfolded: folding 3 batch norms changed"):
        unfolded = Predictor.from_checkpoint(path, device="cpu", precision="bf16")
    assert any(isinstance(m, nn.BatchNorm2d) for m in unfolded.model.modules())


# ---------------------------------------------------------------------------------------------
# Large images by tiles


class PointwiseModel(_Normalising):
    """Outputs that depend on each pixel's own colour only, so tiles see what the whole image sees; with
    :func:`_cone_scene`, the center heatmap peaks once per disk."""

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        red = images[:, :1]
        return {"semantic": 20.0 * images[:, [1, 2, 0]], "center": (2.0 * red - 1.0).clamp_min(0.0),
                "offset": torch.cat([3.0 * red - 1.5, 1.0 - 2.0 * red], dim=1)}


def _cone_scene(height: int, width: int, disks: list[tuple[int, int, int]]) -> np.ndarray:
    """:func:`_scene` whose disks are cones of red, brightest at their centers."""
    image = _scene(height, width, [])
    yy, xx = np.mgrid[:height, :width]
    for cy, cx, r in disks:
        distance = np.hypot(yy - cy, xx - cx)
        inside = distance <= r
        image[inside] = np.stack([255 - 100 * distance[inside] / r, np.full(inside.sum(), 20),
                                  np.full(inside.sum(), 20)], axis=1).astype(np.uint8)
    return image


def test_tile_grid_and_refusals():
    from panoptic_deeplab.inference.tiling import check_tiling, tile_starts

    assert tile_starts(100, 100, 10) == [0] and tile_starts(60, 100, 10) == [0]
    assert tile_starts(100, 40, 10) == [0, 30, 60]
    assert tile_starts(101, 40, 10) == [0, 30, 60, 61]  # the last tile ends at the border
    # On a network's 16-pixel grid: steps rounded down, the last tile starts on the grid and ends at the border.
    assert tile_starts(101, 40, 10, align=16) == [0, 16, 32, 48, 64]
    assert tile_starts(100, 40, 8, align=16) == [0, 32, 64]  # the last overlap exactly 8
    rng = np.random.default_rng(0)
    for _ in range(500):
        align = int(rng.choice([1, 8, 16, 32]))
        tile = int(rng.integers(align, 300))
        overlap, length = int(rng.integers(0, tile - align + 1)), int(rng.integers(1, 1000))
        starts = tile_starts(length, tile, overlap, align)
        ends = [min(start + tile, length) for start in starts]
        assert all(start % align == 0 for start in starts) and ends[-1] == length
        assert all(end - following >= min(overlap, length) for end, following in zip(ends, starts[1:]))
    with pytest.raises(ValueError, match=r"^tile overlap must be at least 0 and at most 16: the tile \(32x48\) less "
                                         r"the network's stride \(16\), got 24"):
        check_tiling((32, 48), 24, align=16)
    assert check_tiling((32, 48), 0) == (32, 48)
    with pytest.raises(ValueError, match=r"^tile overlap must be at least 0 and smaller than the tile \(32x48\), got 32"):
        check_tiling((32, 48), 32)
    with pytest.raises(ValueError, match=r"^tile size must be two positive numbers \(height, width\), got \[0, 5\]"):
        check_tiling((0, 5), 0)
    assert _predictor(BlobModel(), tile=(64, 96)).tile_overlap == 16  # a quarter of the smaller side


def test_tiles_stitch_to_the_whole_image_outputs():
    """A pointwise model: the stitched maps equal the whole image's (blending equal values), and so do the
    results. A model with context (blurs, box filters): instances crossing tile borders stay whole."""
    cones = _cone_scene(61, 97, DISKS)
    whole = _predictor(PointwiseModel()).predict(cones)
    tiled = _predictor(PointwiseModel(), tile=(24, 40), tile_overlap=8).predict(cones)
    np.testing.assert_allclose(tiled.center, whole.center, atol=1e-6)
    np.testing.assert_allclose(tiled.offset, whole.offset, atol=1e-5)
    np.testing.assert_array_equal(tiled.semantic, whole.semantic)
    np.testing.assert_array_equal(tiled.label_map, whole.label_map)
    assert len(whole.instances) == 2

    image = _scene(61, 97, DISKS)

    # Disk 1 spans rows 21..39 and columns 16..34; 40x64 tiles with 24 px overlap start on the model's 16-pixel
    # grid at rows 0, 16, 32 and columns 0, 32, 48: it crosses tile borders both ways. The overlap covers the
    # model's context (its offsets look 20 px around), so the disks come out whole and as in the whole image.
    whole = _predictor(BlobModel()).predict(image)
    tiled = _predictor(BlobModel(), tile=(40, 64), tile_overlap=24).predict(image)
    assert [(i.label, i.area) for i in tiled.instances] == [(i.label, i.area) for i in whole.instances]
    assert len(whole.instances) == 2 and float((tiled.label_map == whole.label_map).mean()) > 0.999
    # Without overlap, tiles meeting at row 32 (less than the model's context from disk 1's pixels) split it in two.
    narrow = _predictor(BlobModel(), tile=(32, 48), tile_overlap=0).predict(image)
    assert len(narrow.instances) == 3


class GlobalContextModel(PointwiseModel):
    """:class:`PointwiseModel` whose semantic logits also read the image's average colour, as a network with a
    global image-pooling branch does: a tile alone sees its own average, not the image's."""

    pools_globally = True

    def __init__(self) -> None:
        super().__init__()
        self.image_mean: torch.Tensor | None = None

    def global_average_inputs(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [(images - self.pixel_mean) / self.pixel_std]

    @contextlib.contextmanager
    def image_averages(self, means: list[torch.Tensor]):
        (self.image_mean,) = means
        try:
            yield
        finally:
            self.image_mean = None

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = super().forward(images)
        (features,) = self.global_average_inputs(images)
        mean = features.mean(dim=(2, 3), keepdim=True) if self.image_mean is None else self.image_mean
        return {**outputs, "semantic": outputs["semantic"] + 10.0 * mean[:, [2, 0, 1]]}


def test_tiles_of_a_globally_pooling_network_see_the_whole_images_average():
    """The predictor averages the pooling features over all tiles (each pixel once; padding not at all) and
    runs every tile with that average: the stitched maps equal the whole image's. With TTA, one average per view."""
    image = image_to_tensor(_cone_scene(65, 97, DISKS))  # a valid input size: the whole image has no padding
    whole = _predictor(GlobalContextModel()).raw_outputs([image])[0]
    tiled = _predictor(GlobalContextModel(), tile=(24, 40), tile_overlap=8)
    stitched = tiled.raw_outputs([image])[0]
    expected = whole["semantic"].softmax(dim=1)  # stitching blends probabilities (and returns their log)
    torch.testing.assert_close(stitched["semantic"].exp(), expected, rtol=0, atol=1e-5)
    tiled.model.pools_globally = False  # each tile alone: its own average differs from the image's
    alone = tiled.raw_outputs([image])[0]
    assert (alone["semantic"].exp() - expected).abs().max() > 0.1

    tta = _predictor(GlobalContextModel(), tile=(24, 40), tile_overlap=8, tta_flip=True, tta_scales=(0.5, 1.0))
    means = tta._image_averages(image)
    half = F.interpolate(image[None], size=(33, 49), mode="bilinear", align_corners=True)  # 0.5x, also valid
    for (view,), (scale, flip) in zip(means, tta._view_list()):
        seen = half if scale == 0.5 else image[None]
        (features,) = tta.model.global_average_inputs(seen.flip(-1) if flip else seen)
        expected_mean = features.mean(dim=(2, 3), keepdim=True)
        # Tiles are resized one by one: their borders interpolate differently from the whole image's.
        torch.testing.assert_close(view, expected_mean, rtol=0, atol=5e-2 if scale == 0.5 else 1e-5)


def test_further_context_passes_refine_the_squeeze_excite_averages_block_by_block():
    """MobileNetV3's squeeze-excite blocks average their input: in the first pass over the tiles each block still sees
    the tiles' own averages upstream. Each further pass runs with the previous pass's averages, which fixes one more
    block's upstream: the first block's average never changes, the second's is settled from pass 2 on and closer to
    the whole image's."""
    from panoptic_deeplab.modeling import build_model
    from panoptic_deeplab.modeling.random_weights import randomize_weights

    cfg = _tiny_config()
    model = randomize_weights(build_model(cfg.model)).eval()
    torch.manual_seed(0)
    image = torch.rand(3, 129, 161)
    image[:, :64] *= 0.3  # tiles of the darker top see other averages than the image's
    with torch.no_grad():
        whole = [m.mean(dim=(2, 3), keepdim=True) for m in model.global_average_inputs(image[None])]
        passes = [Predictor(model, (cfg.model, POST), META, device="cpu", tile=(64, 96), tile_overlap=32,
                            tile_context_passes=n)._image_averages(image)[0] for n in (1, 2, 3)]
    assert len(whole) == 9 and all(len(averages) == 9 for averages in passes)
    assert torch.equal(passes[0][0], passes[1][0]) and torch.equal(passes[1][0], passes[2][0])
    assert torch.equal(passes[1][1], passes[2][1]) and not torch.equal(passes[0][1], passes[1][1])
    assert (passes[1][1] - whole[1]).abs().mean() < 0.7 * (passes[0][1] - whole[1]).abs().mean()
    with pytest.raises(ValueError, match=r"^tile_context_passes must be a whole number of at least 1, got 0$"):
        Predictor(model, (cfg.model, POST), META, device="cpu", tile=(64, 96), tile_context_passes=0)


def _same_results(actual, expected) -> None:
    np.testing.assert_array_equal(actual.label_map, expected.label_map)
    np.testing.assert_array_equal(actual.semantic, expected.semantic)
    np.testing.assert_array_equal(actual.center, expected.center)
    np.testing.assert_array_equal(actual.offset, expected.offset)
    np.testing.assert_array_equal(actual.centers, expected.centers)
    assert [(i.label, i.box, i.area) for i in actual.instances] == [(i.label, i.box, i.area) for i in expected.instances]
    np.testing.assert_allclose([i.score for i in actual.instances], [i.score for i in expected.instances], rtol=1e-6)


@pytest.mark.parametrize("model", [BlobModel, GlobalContextModel], ids=["context", "global-pooling"])
def test_low_memory_tiles_post_process_in_bands_to_the_same_result(model, monkeypatch):
    """``low_memory``: the stitched maps come band by band (one row of tiles held) and are post-processed so;
    the result is the one of the stitched whole maps. Images within the tile run whole either way."""
    from panoptic_deeplab.inference import predictor as predictor_module

    band_counts = []

    def counting(bands, *args, **kwargs):
        band_counts.append(len(list(bands())))
        return postprocess_bands(bands, *args, **kwargs)

    postprocess_bands = predictor_module.postprocess_bands
    monkeypatch.setattr(predictor_module, "postprocess_bands", counting)
    image = _scene(61, 97, DISKS)
    options = {"tile": (24, 40), "tile_overlap": 8}
    expected = _predictor(model(), **options).predict(image)
    low = _predictor(model(), low_memory=True, **options)
    _same_results(low.predict(image), expected)
    assert band_counts == [4]  # tiles start at rows 0, 16, 32, 37
    assert len(expected.instances) >= 2
    small = image[:20, :30]
    _same_results(low.predict_batch([small, image])[0], _predictor(model()).predict(small))
    with pytest.raises(ValueError, match=r"^low_memory post-processes tiled predictions in bands: it needs a tile"):
        _predictor(model(), low_memory=True)


def test_bands_of_stitched_maps_follow_the_rows_of_tiles():
    from panoptic_deeplab.inference.tiling import stitch_bands, stitch_tiles, tile_shares

    image = torch.rand(3, 70, 50)
    runs = []

    def run(crop):
        runs.append(crop.shape)
        return {"semantic": crop[None], "center": crop[None, :1], "offset": crop[None, 1:]}

    bands = list(stitch_bands(image, (32, 24), 8, run))
    # Tiles start at rows 0, 24, 38: rows 0..23 are done when the second row of tiles starts, 24..37 at the third.
    assert [(top, band["center"].shape[-2]) for top, band in bands] == [(0, 24), (24, 14), (38, 32)]
    whole = stitch_tiles(image, (32, 24), 8, run)
    for key in whole:
        torch.testing.assert_close(torch.cat([band[key] for _, band in bands], dim=-2), whole[key], rtol=0, atol=0)
    torch.testing.assert_close(whole["center"][0], image[:1], rtol=0, atol=1e-6)  # shares add up to 1
    shares = torch.zeros(70, 50)
    for (top, left, bottom, right), share in tile_shares(70, 50, (32, 24), 8):
        shares[top:bottom, left:right] += share
    torch.testing.assert_close(shares, torch.ones(70, 50))


def test_cli_predict_with_tiles(tmp_path, capsys, monkeypatch):
    import dataclasses

    from panoptic_deeplab.checkpoint import atomic_torch_save
    from panoptic_deeplab.cli import main
    from panoptic_deeplab.config import config_to_dict
    from panoptic_deeplab.modeling import build_model

    cfg = _tiny_config()
    path = atomic_torch_save({"model": build_model(cfg.model).state_dict(), "config": config_to_dict(cfg),
                              "meta": META.to_json()}, tmp_path / "model.pt")
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(_scene(61, 97, DISKS)).save(images / "scene.png")
    argv = ["predict", "--checkpoint", str(path), "--input", str(images), "--device", "cpu", "--no-progress",
            "--no-pictures"]
    assert main([*argv, "--output", str(tmp_path / "out"), "--tile", "40x64", "--tile-overlap", "12"]) == 0
    assert read_panoptic_png(tmp_path / "out" / "panoptic" / "scene.png").shape == (61, 97)
    assert main([*argv, "--output", str(tmp_path / "low"), "--tile", "40x64", "--tile-overlap", "12",
                 "--low-memory"]) == 0
    np.testing.assert_array_equal(read_panoptic_png(tmp_path / "low" / "panoptic" / "scene.png"),
                                  read_panoptic_png(tmp_path / "out" / "panoptic" / "scene.png"))
    assert main([*argv, "--output", str(tmp_path / "z"), "--low-memory"]) == 2
    assert "error: --low-memory needs --tile" in capsys.readouterr().err
    assert main([*argv, "--output", str(tmp_path / "x"), "--tile-overlap", "12"]) == 2
    assert "error: --tile-overlap needs --tile" in capsys.readouterr().err
    assert main([*argv, "--output", str(tmp_path / "p"), "--tile-context-passes", "2"]) == 2
    assert "error: --tile-context-passes needs --tile" in capsys.readouterr().err
    assert main([*argv, "--output", str(tmp_path / "two"), "--tile", "40x64", "--tile-overlap", "12",
                 "--tile-context-passes", "2"]) == 0
    assert read_panoptic_png(tmp_path / "two" / "panoptic" / "scene.png").shape == (61, 97)
    assert main([*argv, "--output", str(tmp_path / "y"), "--tile", "40x64", "--tile-overlap", "40"]) == 2
    assert ("tile overlap must be at least 0 and at most 24: the tile (40x64) less the network's stride (16), got 40"
            in capsys.readouterr().err)
    assert main([*argv, "--output", str(tmp_path / "k"), "--top-k", "1000"]) == 2
    assert "error: top_k must be at least 1 and below the label divisor 1000" in capsys.readouterr().err
    used = []
    monkeypatch.setattr(Predictor, "_warn_if_centers_dropped", lambda self, _: used.append(self.postprocess_cfg))
    assert main([*argv, "--output", str(tmp_path / "k1"), "--top-k", "1"]) == 0
    assert used == [dataclasses.replace(cfg.postprocess, top_k=1)]  # the checkpoint's settings, top_k replaced


@pytest.mark.parametrize("tiles", [{}, {"tile": (48, 64), "tile_overlap": 16, "low_memory": True}])
def test_reaching_top_k_centers_warns_that_objects_were_merged(tiles):
    """Large images hold more objects than top_k = 200 was chosen for: the centers past it are dropped silently by
    the references; here the predictor says so."""
    import dataclasses
    import warnings

    image = _scene(61, 97, DISKS)  # two cars
    cfg = ModelConfig(num_classes=3, output_stride=16)
    for top_k, kept in ((1, 1), (2, 2), (3, 2)):
        predictor = Predictor(BlobModel(), (cfg, dataclasses.replace(POST, top_k=top_k)), META, device="cpu",
                              **tiles)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = predictor.predict(image)
        assert len(result.instances) == kept
        messages = [str(w.message) for w in caught]
        if top_k <= 2:
            assert messages == [f"an image reached top_k={top_k} instance centers: any further objects were merged "
                                "into their neighbours; raise top_k (predict --top-k, at most 999)"]
        else:
            assert messages == []
    with pytest.raises(ValueError, match=r"^top_k must be at least 1 and below the label divisor 1000 \(instance "
                       r"numbers must fit under it\), got 1000$"):
        Predictor(BlobModel(), (cfg, dataclasses.replace(POST, top_k=1000)), META, device="cpu")

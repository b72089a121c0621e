import pytest
import torch

from panoptic_deeplab.data.coco_panoptic import VOID_LABEL
from panoptic_deeplab.data.transforms import (
    IMAGENET_MEAN,
    EvalTransform,
    TrainTransform,
    pad_to_size,
    scale_choices,
    valid_input_size,
)

MEAN_U8 = [int(m * 255) for m in IMAGENET_MEAN]


def _block_pair(height: int, width: int, block: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """An image and a label map made of the same ``block``-sized tiles, each with its own id.

    Labels use the full range of the contract (train ids up to 18, instances, void 255000) and the
    image's three channels encode the tile's row and column, so alignment can be checked after any
    geometric transform.
    """
    rows = torch.arange(height) // block
    cols = torch.arange(width) // block
    r, c = torch.meshgrid(rows, cols, indexing="ij")
    label = (r * 7 + c) % 19 * 1000 + (r * 3 + c) % 5
    label[(r + c) % 11 == 0] = VOID_LABEL
    image = torch.stack([r * 20 % 256, c * 20 % 256, torch.full_like(r, 200)]).to(torch.uint8)
    return image, label.long()


def _interior(label: torch.Tensor) -> torch.Tensor:
    """Pixels whose 7x7 neighbourhood holds one label: far enough from tile borders (for scales
    0.5..2) that the bilinear / antialiased image there is exactly the tile's colour. The crop's
    border counts as a label change: the image there may have blended a tile cut off by the crop."""
    padded = torch.nn.functional.pad(label[None, None].double(), (3, 3, 3, 3), value=-1.0)
    hi = torch.nn.functional.max_pool2d(padded, 7, 1)
    lo = -torch.nn.functional.max_pool2d(-padded, 7, 1)
    return (hi == lo)[0, 0]


@pytest.mark.parametrize(
    "size, stride, align, expected",
    [
        ((1024, 2048), 32, True, (1025, 2049)),
        ((1025, 2049), 32, True, (1025, 2049)),
        ((257, 300), 32, True, (257, 321)),
        ((640, 480), 32, True, (641, 481)),
        ((1, 1), 32, True, (33, 33)),
        ((1024, 2048), 32, False, (1024, 2048)),
        ((1025, 600), 16, False, (1040, 608)),
        ((1024, 2048), 16, True, (1025, 2049)),
    ],
)
def test_valid_input_size(size, stride, align, expected):
    assert valid_input_size(*size, output_stride=stride, align_corners=align) == expected


def test_valid_input_size_rejects_bad_sizes():
    with pytest.raises(ValueError, match="positive"):
        valid_input_size(0, 10)


def test_pad_to_size_bottom_right_with_scalar_and_per_channel_fill():
    image = torch.ones(3, 2, 3)
    out = pad_to_size(image, (4, 5), fill=(0.1, 0.2, 0.3))
    assert out.shape == (3, 4, 5)
    assert torch.equal(out[:, :2, :3], image)
    assert torch.allclose(out[:, 3, 4], torch.tensor([0.1, 0.2, 0.3]))
    assert torch.allclose(out[:, :2, 3:], torch.tensor([0.1, 0.2, 0.3]).view(3, 1, 1).expand(3, 2, 2))
    label = torch.full((2, 2, 3), 7, dtype=torch.int64)  # batched [N, H, W] as well
    padded = pad_to_size(label, (3, 3), VOID_LABEL)
    assert padded.dtype == torch.int64
    assert (padded[:, 2] == VOID_LABEL).all() and (padded[:, :2, :3] == 7).all()
    with pytest.raises(ValueError, match="smaller"):
        pad_to_size(image, (1, 5))
    with pytest.raises(ValueError, match="one per channel"):
        pad_to_size(image, (4, 5), fill=(0.0, 0.0))


def test_scale_choices_are_the_papers_grid():
    scales = scale_choices(0.5, 2.0, 0.1)
    assert len(scales) == 16 and scales[0] == 0.5 and scales[-1] == 2.0 and 1.0 in scales
    assert scale_choices(1.0, 1.0, 0.0) == [1.0]


@pytest.mark.parametrize("size", [(40, 56), (200, 300)])  # smaller and larger than the crop
def test_train_transform_crop_size_alignment_and_exact_labels(size):
    image, label = _block_pair(*size)
    valid_ids = set(label.unique().tolist()) | {VOID_LABEL}
    transform = TrainTransform(crop_size=(65, 97))
    checked = 0
    for seed in range(12):
        out_image, out_label = transform(image, label, torch.Generator().manual_seed(seed))
        assert out_image.shape == (3, 65, 97) and out_label.shape == (65, 97)
        assert out_image.dtype == torch.uint8 and out_label.dtype == torch.int64
        assert type(out_image) is torch.Tensor and type(out_label) is torch.Tensor  # not tv_tensors
        # Nearest-neighbour: every output id existed in the input (no interpolated ids).
        assert set(out_label.unique().tolist()) <= valid_ids
        # Alignment: inside each tile the image still encodes the tile of the label. The colour of a
        # tile is a function of its label here, so compare via a lookup built on the input.
        colour_of = {}
        for lab, col in zip(label.flatten().tolist(), image.reshape(3, -1).t().tolist()):
            colour_of.setdefault(lab, set()).add(tuple(col))
        inside = _interior(out_label) & (out_label != VOID_LABEL)
        ys, xs = torch.nonzero(inside, as_tuple=True)
        for y, x in zip(ys[::7].tolist(), xs[::7].tolist()):
            assert tuple(out_image[:, y, x].tolist()) in colour_of[int(out_label[y, x])]
            checked += 1
    assert checked > 100


def test_train_transform_padding_values_and_random_placement():
    image = torch.full((3, 10, 12), 9, dtype=torch.uint8)
    label = torch.full((10, 12), 5003, dtype=torch.int64)
    transform = TrainTransform(crop_size=(33, 41), min_scale=1.0, max_scale=1.0, scale_step=0.1, flip_prob=0.0)
    offsets = set()
    for seed in range(10):
        out_image, out_label = transform(image, label, torch.Generator().manual_seed(seed))
        content = out_label == 5003
        assert int(content.sum()) == 10 * 12  # the whole image, unscaled, placed somewhere
        ys, xs = torch.nonzero(content, as_tuple=True)
        top, left = int(ys.min()), int(xs.min())
        offsets.add((top, left))
        assert (out_image[:, content] == 9).all()
        assert (out_label[~content] == VOID_LABEL).all()
        pad = out_image[:, ~content]
        assert (pad == torch.tensor(MEAN_U8, dtype=torch.uint8).view(3, 1)).all()
    assert len(offsets) > 3  # random placement, not always top-left


def test_train_transform_float_image_padded_with_mean():
    transform = TrainTransform(crop_size=(9, 9), min_scale=1.0, max_scale=1.0, scale_step=0.1)
    out_image, _ = transform(torch.zeros(3, 4, 4), torch.zeros(4, 4, dtype=torch.long), torch.Generator())
    corner_values = {tuple(round(v, 6) for v in out_image[:, y, x].tolist()) for y in (0, 8) for x in (0, 8)}
    assert any(v == tuple(round(m, 6) for m in IMAGENET_MEAN) for v in corner_values)


def test_train_transform_flip_flips_both():
    image, label = _block_pair(16, 24, block=4)
    transform = TrainTransform(crop_size=(16, 24), min_scale=1.0, max_scale=1.0, scale_step=0.1, flip_prob=1.0)
    out_image, out_label = transform(image, label, torch.Generator().manual_seed(0))
    assert torch.equal(out_image, image.flip(-1))
    assert torch.equal(out_label, label.flip(-1))


def test_train_transform_exact_large_labels_after_scaling():
    # Instances near the top of the range: 254 * 1000 + 999 must survive resizing exactly.
    label = torch.tensor([[254999, 18005], [VOID_LABEL, 3]], dtype=torch.int64).repeat_interleave(8, 0)
    label = label.repeat_interleave(8, 1)
    image = torch.zeros(3, 16, 16, dtype=torch.uint8)
    for scale in (0.5, 1.7):
        transform = TrainTransform(crop_size=(40, 40), min_scale=scale, max_scale=scale, scale_step=0.1)
        _, out = transform(image, label, torch.Generator().manual_seed(1))
        assert set(out.unique().tolist()) == {254999, 18005, VOID_LABEL, 3}


def test_train_transform_is_seeded_by_the_generator():
    image, label = _block_pair(50, 70)
    transform = TrainTransform(crop_size=(33, 33))
    a = transform(image, label, torch.Generator().manual_seed(5))
    b = transform(image, label, torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    results = {transform(image, label, torch.Generator().manual_seed(s))[1].sum().item() for s in range(8)}
    assert len(results) > 1


def test_train_transform_rejects_mismatched_inputs():
    transform = TrainTransform(crop_size=(8, 8))
    with pytest.raises(ValueError, match="does not match"):
        transform(torch.zeros(3, 4, 4, dtype=torch.uint8), torch.zeros(4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        transform(torch.zeros(3, 4, 4, dtype=torch.uint8), torch.zeros(4, 4))
    with pytest.raises(ValueError, match="crop_size"):
        TrainTransform(crop_size=(0, 8))


def test_eval_transform_pads_to_valid_size_and_keeps_content():
    image, label = _block_pair(40, 70)
    out_image, out_label = EvalTransform()(image, label)
    assert out_image.shape == (3, 65, 97) and out_label.shape == (65, 97)
    assert torch.equal(out_image[:, :40, :70], image) and torch.equal(out_label[:40, :70], label)
    assert (out_label[40:] == VOID_LABEL).all() and (out_label[:, 70:] == VOID_LABEL).all()
    assert (out_image[:, 40:, :] == torch.tensor(MEAN_U8, dtype=torch.uint8).view(3, 1, 1)).all()
    even_image, _ = EvalTransform(align_corners=False)(image, label)
    assert even_image.shape == (3, 64, 96)

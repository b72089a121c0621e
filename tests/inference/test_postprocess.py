"""Post-processing against deliberately simple numpy/loop references (SPEC §5)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from panoptic_deeplab.config import PostProcessConfig
from panoptic_deeplab.data.coco_panoptic import VOID_LABEL
from panoptic_deeplab.inference import postprocess
from panoptic_deeplab.inference.postprocess import (
    _nearest_center,
    find_instance_centers,
    group_pixels,
    merge_semantic_and_instance,
    panoptic_postprocess,
)

DIV = 1000


# ----------------------------------------------------------------------------- references


def ref_centers(heat: np.ndarray, threshold: float, kernel: int, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Loops: a pixel is a center if > threshold and the max of its window (clipped = -inf padding)."""
    height, width = heat.shape
    r = kernel // 2
    found = []
    for y in range(height):
        for x in range(width):
            window = heat[max(0, y - r) : y + r + 1, max(0, x - r) : x + r + 1]
            if heat[y, x] > threshold and heat[y, x] == window.max():
                found.append((-float(heat[y, x]), y, x))
    found.sort()  # by score descending, then row-major position
    found = found[:top_k]
    centers = np.array([(y, x) for _, y, x in found], dtype=np.int64).reshape(-1, 2)
    return centers, np.array([heat[y, x] for _, y, x in found], dtype=heat.dtype)


def ref_group(thing: np.ndarray, centers: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Full pixels x centers distances in float64, first minimum."""
    height, width = thing.shape
    out = np.zeros((height, width), dtype=np.int64)
    if len(centers) == 0:
        return out
    for y in range(height):
        for x in range(width):
            if not thing[y, x]:
                continue
            py = np.float64(y) + np.float64(offset[0, y, x])
            px = np.float64(x) + np.float64(offset[1, y, x])
            dy = py - centers[:, 0].astype(np.float64)
            dx = px - centers[:, 1].astype(np.float64)
            out[y, x] = int(np.argmin(dy * dy + dx * dx)) + 1
    return out


def ref_merge(semantic: np.ndarray, instance: np.ndarray, thing_ids, stuff_area: int) -> np.ndarray:
    """Per-instance mode with an explicit tie rule, per-class stuff areas."""
    thing = np.isin(semantic, list(thing_ids))
    out = np.full(semantic.shape, VOID_LABEL, dtype=np.int64)
    counters: dict[int, int] = {}
    for k in sorted(set(instance[thing].tolist()) - {0}):
        pixels = thing & (instance == k)
        counts: dict[int, int] = {}
        for c in semantic[pixels].tolist():
            counts[c] = counts.get(c, 0) + 1
        best = max(counts.values())
        cls = min(c for c, n in counts.items() if n == best)
        counters[cls] = counters.get(cls, 0) + 1
        out[pixels] = cls * DIV + counters[cls]
    for cls in set(semantic[~thing].tolist()):
        pixels = semantic == cls
        if pixels.sum() >= stuff_area:
            out[pixels] = cls * DIV
    return out


def ref_postprocess(logits: np.ndarray, heat: np.ndarray, offset: np.ndarray, thing_ids, cfg: PostProcessConfig):
    """One image: (label map, semantic, centers, scores, {instance id: (class, score, box, area)})."""
    semantic = np.argmax(logits, axis=0)
    centers, scores = ref_centers(heat, cfg.center_threshold, cfg.nms_kernel, cfg.top_k)
    instance = ref_group(np.isin(semantic, list(thing_ids)), centers, offset)
    label = ref_merge(semantic, instance, thing_ids, cfg.stuff_area)
    x = logits.astype(np.float64)
    probs = np.exp(x - x.max(axis=0)) / np.exp(x - x.max(axis=0)).sum(axis=0)
    instances = {}
    for k in range(len(centers)):
        mask = (instance == k + 1) & np.isin(semantic, list(thing_ids))
        if not mask.any():
            continue
        pid = int(label[mask][0])
        cls = pid // DIV
        ys, xs = np.nonzero(mask)
        score = float(heat[centers[k][0], centers[k][1]]) * probs[cls][mask].mean()
        instances[pid] = (cls, score, (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1), int(mask.sum()), k)
    return label, semantic, centers, scores, instances


def assert_matches_reference(logits, heat, offset, thing_ids, cfg):
    """Our batch output, with each backend, equals the reference image by image, pixel for pixel."""
    for backend in ("torch", "compiled"):
        preds = _assert_backend_matches_reference(logits, heat, offset, thing_ids, cfg, backend)
    return preds


def _assert_backend_matches_reference(logits, heat, offset, thing_ids, cfg, backend):
    preds = panoptic_postprocess(
        torch.from_numpy(logits), torch.from_numpy(heat), torch.from_numpy(offset), thing_ids, cfg, backend=backend
    )
    assert len(preds) == logits.shape[0]
    for n, pred in enumerate(preds):
        label, semantic, centers, scores, instances = ref_postprocess(
            logits[n], heat[n, 0], offset[n], thing_ids, cfg
        )
        np.testing.assert_array_equal(pred.semantic.numpy(), semantic)
        np.testing.assert_array_equal(pred.centers.numpy(), centers)
        np.testing.assert_array_equal(pred.center_scores.numpy(), scores)
        np.testing.assert_array_equal(pred.label_map.numpy(), label)
        assert pred.label_map.dtype == torch.int64
        inst = pred.instances
        assert sorted(inst.ids.tolist()) == sorted(instances)
        assert inst.center_index.tolist() == sorted(inst.center_index.tolist())  # center order
        for i, pid in enumerate(inst.ids.tolist()):
            cls, score, box, area, k = instances[pid]
            assert inst.classes[i] == cls and inst.areas[i] == area and inst.center_index[i] == k
            assert inst.scores[i].item() == pytest.approx(score, rel=1e-5, abs=1e-7)
            assert inst.boxes[i].tolist() == [float(v) for v in box]
        masks = inst.masks()
        assert masks.shape == (len(inst), *label.shape)
        for i, pid in enumerate(inst.ids.tolist()):
            np.testing.assert_array_equal(masks[i].numpy(), label == pid)
    return preds


# ----------------------------------------------------------------------------- centers


@pytest.mark.parametrize("backend", ["torch", "compiled"])
def test_centers_plateau_and_threshold(backend):
    heat = np.zeros((1, 1, 12, 14), dtype=np.float32)
    heat[0, 0, 3:5, 3:5] = 0.6  # 2x2 plateau: all four survive NMS
    heat[0, 0, 9, 10] = np.float32(0.1)  # exactly the threshold: dropped (keep > 0.1)
    heat[0, 0, 9, 2] = 0.3
    heat[0, 0, 5, 6] = 0.5  # within 3 px of the plateau: suppressed by the 0.6 values
    centers, scores = find_instance_centers(torch.from_numpy(heat), 0.1, 7, 200, backend=backend)
    assert centers[0].tolist() == [[3, 3], [3, 4], [4, 3], [4, 4], [9, 2]]
    assert scores[0].tolist() == pytest.approx([0.6] * 4 + [0.3])
    ref, _ = ref_centers(heat[0, 0], 0.1, 7, 200)
    np.testing.assert_array_equal(centers[0].numpy(), ref)


@pytest.mark.parametrize("backend", ["torch", "compiled"])
def test_centers_top_k_ties_exact_k(backend):
    heat = np.zeros((1, 1, 30, 30), dtype=np.float32)
    for y, x in [(5, 20), (5, 2), (20, 1), (20, 25)]:
        heat[0, 0, y, x] = 0.5
    heat[0, 0, 27, 12] = 0.9
    centers, scores = find_instance_centers(torch.from_numpy(heat), 0.1, 7, 3, backend=backend)
    # Exactly k = 3 (not "strictly above the k-th score"), ties by row-major position.
    assert centers[0].tolist() == [[27, 12], [5, 2], [5, 20]]
    assert scores[0].tolist() == pytest.approx([0.9, 0.5, 0.5])


@pytest.mark.parametrize("backend", ["torch", "compiled"])
@pytest.mark.parametrize("kernel", [1, 3, 7, 13])
def test_centers_random_match_reference(kernel, backend):
    gen = torch.Generator().manual_seed(kernel)
    heat = torch.rand(2, 1, 23, 29, generator=gen)
    heat = torch.round(heat * 8) / 8  # coarse values: many ties and plateaus
    centers, scores = find_instance_centers(heat, 0.3, kernel, 10, backend=backend)
    for n in range(2):
        ref, ref_scores = ref_centers(heat[n, 0].numpy(), 0.3, kernel, 10)
        np.testing.assert_array_equal(centers[n].numpy(), ref)
        np.testing.assert_array_equal(scores[n].numpy(), ref_scores)


def test_centers_bad_input():
    with pytest.raises(ValueError, match="N, 1, H, W"):
        find_instance_centers(torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match="odd"):
        find_instance_centers(torch.zeros(1, 1, 4, 4), nms_kernel=4)
    with pytest.raises(ValueError, match="top_k"):
        find_instance_centers(torch.zeros(1, 1, 4, 4), top_k=0)
    with pytest.raises(ValueError, match="backend must be one of auto, torch, compiled, got 'numba'"):
        find_instance_centers(torch.zeros(1, 1, 4, 4), backend="numba")


@settings(max_examples=80, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 2**32 - 1),
    batch=st.integers(1, 2),
    height=st.integers(1, 40),
    width=st.integers(1, 40),
    kernel=st.sampled_from([1, 3, 5, 7, 9]),
    levels=st.integers(1, 16),
    specials=st.booleans(),
)
def test_centers_compiled_equals_torch(seed, batch, height, width, kernel, levels, specials):
    """The numba peak finder keeps the torch version's set: plateaus, a threshold equal to heat values (in
    float32), NaNs (suppress their window), +-inf, image borders."""
    rng = np.random.default_rng(seed)
    heat = np.round(rng.random((batch, 1, height, width)) * levels) / levels  # ties and plateaus
    if specials:
        heat[rng.random(heat.shape) < 0.03] = np.nan
        heat[rng.random(heat.shape) < 0.02] = np.inf
        heat[rng.random(heat.shape) < 0.02] = -np.inf
    threshold = float(np.float32(rng.integers(0, levels + 1) / levels))  # often a value of the heatmap
    heat_tensor = torch.from_numpy(heat.astype(np.float32))
    expected = find_instance_centers(heat_tensor, threshold, kernel, 1000, backend="torch")
    actual = find_instance_centers(heat_tensor, threshold, kernel, 1000, backend="compiled")
    for got, want in zip(actual, expected):
        for a, b in zip(got, want):
            assert torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.nan_to_num(), b.nan_to_num()))


# ----------------------------------------------------------------------------- grouping


def test_group_touching_instances_and_distance_tie():
    thing = torch.zeros(5, 11, dtype=torch.bool)
    thing[1:4, 1:10] = True
    centers = torch.tensor([[2, 8], [2, 2]])  # index 0 on the right
    offset = torch.zeros(2, 5, 11)
    offset[1, :, :5] = 2 - torch.arange(5.0)  # left half points at x = 2
    offset[1, :, 6:] = 8 - torch.arange(6.0, 11.0)  # right half points at x = 8
    # Column 5 keeps a zero offset: equidistant from both centers -> the smaller index 0.
    instance = group_pixels(thing, centers, offset)
    expected = torch.zeros(5, 11, dtype=torch.long)
    expected[1:4, 1:5] = 2
    expected[1:4, 5:10] = 1
    assert torch.equal(instance, expected)


def test_group_no_center():
    thing = torch.ones(3, 4, dtype=torch.bool)
    instance = group_pixels(thing, torch.zeros(0, 2, dtype=torch.long), torch.zeros(2, 3, 4))
    assert torch.equal(instance, torch.zeros(3, 4, dtype=torch.long))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_group_many_centers_matches_full_distance(seed):
    """Pruned search == full float64 pixels x centers argmin, incl. exact ties and offsets out of the image."""
    gen = torch.Generator().manual_seed(seed)
    height, width, k = 90, 130, [1, 40, 150][seed]
    centers = torch.stack(
        [torch.randint(0, height, (k,), generator=gen), torch.randint(0, width, (k,), generator=gen)], dim=1
    )
    thing = torch.rand(height, width, generator=gen) < 0.7
    offset = torch.randn(2, height, width, generator=gen) * 30
    offset[:, : height // 2] = torch.round(offset[:, : height // 2])  # integer predictions: exact ties
    offset[:, -5:] *= 20  # far outside the image
    instance = group_pixels(thing, centers, offset)
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    py = ys.double().numpy() + offset[0].double().numpy()
    px = xs.double().numpy() + offset[1].double().numpy()
    dy = py[..., None] - centers[:, 0].double().numpy()
    dx = px[..., None] - centers[:, 1].double().numpy()
    expected = np.where(thing.numpy(), np.argmin(dy * dy + dx * dx, axis=-1) + 1, 0)
    np.testing.assert_array_equal(instance.numpy(), expected)


@pytest.mark.parametrize("cell", [4, 16, 64])
def test_nearest_center_pruning_keeps_boundary_ties(cell):
    """A center whose distance to a cell equals the pruning bound can still tie at the cell's corner."""
    # Cell [cell, 2 cell]^2; the point (cell, cell) is its corner, at squared distance 2 cell^2 from both
    # (0, 0) (index 0, excluded by a strict bound) and (2 cell, 2 cell), which bounds the cell.
    centers = torch.tensor([[0, 0], [2 * cell, 2 * cell]])
    point = torch.tensor([float(cell)], dtype=torch.float64)
    labels = _nearest_center(point, point, centers, 4 * cell, 4 * cell, cell_size=cell)
    assert labels.tolist() == [0]


def test_group_batched_and_errors():
    gen = torch.Generator().manual_seed(3)
    thing = torch.rand(2, 6, 7, generator=gen) < 0.5
    offset = torch.randn(2, 2, 6, 7, generator=gen)
    centers = [torch.tensor([[1, 1], [4, 5]]), torch.tensor([[3, 3]])]
    batched = group_pixels(thing, centers, offset)
    for n in range(2):
        expected = ref_group(thing[n].numpy(), centers[n].numpy(), offset[n].numpy())
        np.testing.assert_array_equal(batched[n].numpy(), expected)
    bad = offset[0].clone()
    bad[0, thing[0]] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        group_pixels(thing[0], centers[0], bad)
    with pytest.raises(ValueError, match="offset"):
        group_pixels(thing[0], centers[0], offset)


# ----------------------------------------------------------------------------- merge


def test_merge_vote_ties_void_and_stuff_area():
    things = [3, 4]
    semantic = torch.zeros(6, 8, dtype=torch.long)  # class 0: 48 - rest
    semantic[0, :5] = 1  # class 1: 5 px, just under stuff_area=6 -> void
    semantic[1, :6] = 2  # class 2: 6 px, exactly at the threshold -> kept
    semantic[3, :2] = 4  # instance 1: two of class 4 first in raster order...
    semantic[3, 2:4] = 3  # ... and two of class 3: a tie -> smaller class id 3
    semantic[4, :3] = 4  # instance 2: class 4
    semantic[5, 5:] = 3  # thing pixels with instance 0 (no center) -> void
    instance = torch.zeros(6, 8, dtype=torch.long)
    instance[3, :4] = 1
    instance[4, :3] = 2
    instance[4, 5] = 3  # instance on a stuff pixel: ignored (not a thing pixel)
    label = merge_semantic_and_instance(semantic, instance, things, stuff_area=6)
    expected = np.zeros((6, 8), dtype=np.int64)
    expected[0, :5] = VOID_LABEL
    expected[1, :6] = 2 * DIV
    expected[3, :4] = 3 * DIV + 1
    expected[4, :3] = 4 * DIV + 1
    expected[5, 5:] = VOID_LABEL
    np.testing.assert_array_equal(label.numpy(), expected)
    np.testing.assert_array_equal(label.numpy(), ref_merge(semantic.numpy(), instance.numpy(), things, 6))


def test_merge_per_class_numbering_follows_center_order():
    semantic = torch.full((1, 6), 5, dtype=torch.long)
    semantic[0, 2:4] = 6
    instance = torch.tensor([[4, 4, 2, 2, 1, 7]])
    label = merge_semantic_and_instance(semantic, instance, [5, 6], stuff_area=1)
    assert label.tolist() == [[5002, 5002, 6001, 6001, 5001, 5003]]


@pytest.mark.parametrize("seed", [0, 1])
def test_merge_random_batch_matches_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    semantic = torch.randint(0, 6, (2, 15, 17), generator=gen)
    instance = torch.randint(0, 9, (2, 15, 17), generator=gen)
    label = merge_semantic_and_instance(semantic, instance, [2, 4, 5], stuff_area=40)
    for n in range(2):
        expected = ref_merge(semantic[n].numpy(), instance[n].numpy(), [2, 4, 5], 40)
        np.testing.assert_array_equal(label[n].numpy(), expected)


def test_merge_errors():
    s = torch.zeros(3, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="void_label"):
        merge_semantic_and_instance(s, s, [0], void_label=0)
    with pytest.raises(ValueError, match="shape|\\[H, W\\]"):
        merge_semantic_and_instance(s, s[0], [0])
    with pytest.raises(ValueError, match="thing_ids"):
        merge_semantic_and_instance(s, s, [-1])


# ----------------------------------------------------------------------------- full pipeline


def _blobs_case(seed: int, batch: int = 2, height: int = 24, width: int = 31, classes: int = 6):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, classes, height, width, generator=gen)
    logits = torch.nn.functional.avg_pool2d(logits, 5, 1, 2) * 3  # spatially coherent classes
    heat = torch.nn.functional.avg_pool2d(torch.rand(batch, 1, height, width, generator=gen), 3, 1, 1)
    offset = torch.randn(batch, 2, height, width, generator=gen) * 6
    return logits.numpy(), heat.numpy(), offset.numpy()


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_pipeline_random_matches_reference(seed):
    logits, heat, offset = _blobs_case(seed)
    kernel, top_k, stuff_area = [(3, 8, 30), (7, 200, 150), (5, 3, 100), (1, 12, 60)][seed]
    cfg = PostProcessConfig(center_threshold=0.5, nms_kernel=kernel, top_k=top_k, stuff_area=stuff_area)
    assert_matches_reference(logits, heat, offset, [3, 4, 5], cfg)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_void_channel_is_deeplab2s_void_stuff_class(seed):
    """deeplab2's COCO heads: channel 0 is its ignore label 0, which its merge (``_merge_semantic_and_instance_maps``)
    treats as a stuff class whose panoptic label is the void label at any area: no pixel of it joins an instance
    or another class's stuff area. Reference: the void channel moved last as an ordinary stuff class, its label
    then voided."""
    logits, heat, offset = _blobs_case(seed, classes=7)  # channel 0 = void, channels 1..6 = train ids 0..5
    logits[:, 0] += 0.6  # void wins on a sizeable part, inside thing and stuff regions
    logits[:, 0, :3, :3] = logits[:, 1:, :3, :3].max(axis=1)  # exact ties: argmax takes channel 0 (void)
    cfg = PostProcessConfig(center_threshold=0.5, nms_kernel=3, top_k=20, stuff_area=40)
    thing_ids = [3, 4, 5]
    backend = ("torch", "compiled")[seed % 2]
    preds = panoptic_postprocess(torch.from_numpy(logits), torch.from_numpy(heat), torch.from_numpy(offset),
                                 thing_ids, cfg, void_channel=True, backend=backend)
    void_last = np.concatenate([logits[:, 1:], logits[:, :1]], axis=1)
    void_last[:, 6, :3, :3] += 1e-3  # the reference's argmax would give the ties to the real class
    for n, pred in enumerate(preds):
        label, semantic, centers, _, instances = ref_postprocess(void_last[n], heat[n, 0], offset[n], thing_ids, cfg)
        void = semantic == 6
        assert void.mean() > 0.1 and void[:3, :3].all()
        label[void] = VOID_LABEL
        np.testing.assert_array_equal(pred.label_map.numpy(), label)
        np.testing.assert_array_equal(pred.semantic.numpy(), np.where(void, 255, semantic))
        inst = pred.instances
        assert sorted(inst.ids.tolist()) == sorted(instances)
        for i, pid in enumerate(inst.ids.tolist()):
            cls, score, box, area, _ = instances[pid]  # score: softmax over every channel, void's included
            assert inst.classes[i] == cls and inst.areas[i] == area
            assert inst.scores[i].item() == pytest.approx(score, rel=1e-5, abs=1e-7)
    with pytest.raises(ValueError, match=r"semantic_logits has 1 channel\(s\): no class besides the void channel"):
        panoptic_postprocess(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4), torch.zeros(1, 2, 4, 4), [],
                             void_channel=True)


def test_pipeline_no_center_all_stuff_and_semantic_ties():
    logits, heat, offset = _blobs_case(7, batch=1)
    logits[0, :, :4, :4] = 1.0  # exact logit ties: argmax takes the first class
    # No center: thing pixels become void.
    preds = assert_matches_reference(logits, np.zeros_like(heat), offset, [3, 4, 5], PostProcessConfig(stuff_area=10))
    thing = np.isin(preds[0].semantic.numpy(), [3, 4, 5])
    assert thing.any() and (preds[0].label_map.numpy()[thing] == VOID_LABEL).all()
    assert len(preds[0].instances) == 0 and preds[0].instances.masks().shape == (0, 24, 31)
    # Every pixel stuff: centers are found but no instance is formed.
    preds = assert_matches_reference(logits, heat, offset, [], PostProcessConfig(center_threshold=0.3, stuff_area=10))
    assert preds[0].centers.shape[0] > 0 and len(preds[0].instances) == 0
    assert (preds[0].label_map.numpy() % DIV == 0).all()


def test_instance_scores_and_boxes_by_hand():
    # 2 classes: 0 stuff, 1 thing. Thing pixels at rows 1-2, cols 1-2 of a 4x5 image.
    logits = torch.zeros(1, 2, 4, 5)
    logits[0, 1, 1, 1:3] = math.log(3.0)  # p(thing) = 3 / 4
    logits[0, 1, 2, 1:3] = math.log(9.0)  # p(thing) = 9 / 10
    heat = torch.zeros(1, 1, 4, 5)
    heat[0, 0, 2, 2] = 0.8
    offset = torch.zeros(1, 2, 4, 5)
    pred = panoptic_postprocess(logits, heat, offset, [1], PostProcessConfig(stuff_area=1))[0]
    inst = pred.instances
    assert inst.ids.tolist() == [1001] and inst.classes.tolist() == [1] and inst.areas.tolist() == [4]
    assert inst.scores.tolist() == pytest.approx([0.8 * (0.75 + 0.9) / 2])
    assert inst.boxes.tolist() == [[1.0, 1.0, 3.0, 3.0]]  # x0, y0, x1, y1 (exclusive)
    assert pred.centers.tolist() == [[2, 2]] and pred.center_scores.tolist() == pytest.approx([0.8])
    expected = torch.zeros(4, 5, dtype=torch.long)
    expected[1:3, 1:3] = 1001
    assert torch.equal(pred.label_map, expected)


def test_pipeline_bad_input():
    with pytest.raises(ValueError, match="center must be"):
        panoptic_postprocess(torch.zeros(1, 3, 4, 4), torch.zeros(1, 1, 4, 5), torch.zeros(1, 2, 4, 4), [1])
    with pytest.raises(ValueError, match="thing_ids"):
        panoptic_postprocess(torch.zeros(1, 3, 4, 4), torch.zeros(1, 1, 4, 4), torch.zeros(1, 2, 4, 4), [3])
    with pytest.raises(ValueError, match="label_divisor"):
        panoptic_postprocess(
            torch.zeros(1, 3, 4, 4), torch.zeros(1, 1, 4, 4), torch.zeros(1, 2, 4, 4), [1], label_divisor=100
        )


def test_group_every_pixel_pointing_off_the_image():
    """Issue 23: a chunk whose points all lie off the candidate grid crashed in argmin over no candidates."""
    thing = torch.ones(8, 10, dtype=torch.bool)
    centers = torch.tensor([[1, 1], [6, 8]])
    offset = torch.full((2, 8, 10), 1e6)
    offset[1, :, :5] = -1e6  # left half far to the left: nearer to (1, 1) in x, both far in y
    instance = group_pixels(thing, centers, offset)
    expected = ref_group(thing.numpy(), centers.numpy(), offset.numpy())
    np.testing.assert_array_equal(instance.numpy(), expected)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 2**32 - 1),
    height=st.integers(1, 40),
    width=st.integers(1, 40),
    num_centers=st.integers(1, 30),
    log_magnitude=st.floats(-2, 30),
    off_fraction=st.sampled_from([0.0, 0.3, 1.0]),
    integer_offsets=st.booleans(),
    chunk_elements=st.sampled_from([1, 7, 64, 1 << 19]),
)
def test_group_property_equals_brute_force(
    seed, height, width, num_centers, log_magnitude, off_fraction, integer_offsets, chunk_elements
):
    """Grouping == float64 nearest center over all centers (ties to the smaller index), for offsets of any
    magnitude, with chunks as small as one point so that whole chunks lie off the grid or on it."""
    rng = np.random.default_rng(seed)
    centers = np.stack([rng.integers(0, height, num_centers), rng.integers(0, width, num_centers)], axis=1)
    offset = rng.standard_normal((2, height, width)) * 10.0**log_magnitude
    far = rng.random((height, width)) < off_fraction
    offset[:, far] = rng.choice([-1.0, 1.0], size=(2, int(far.sum()))) * 1e6 * (1 + rng.random((2, int(far.sum()))))
    if integer_offsets:
        offset = np.round(offset)  # exact ties between centers
    offset = offset.astype(np.float32)
    thing = rng.random((height, width)) < 0.8
    expected = ref_group(thing, centers, offset)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(postprocess, "_CHUNK_ELEMENTS", chunk_elements)
        patch.setattr(postprocess, "_MIN_CHUNK_POINTS", 1)
        instance = group_pixels(torch.from_numpy(thing), torch.from_numpy(centers), torch.from_numpy(offset))
    np.testing.assert_array_equal(instance.numpy(), expected)


def _assert_same_predictions(a, b) -> None:
    """Equal predictions (``a`` may live on another device than ``b``; scores to float rounding)."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x.label_map.cpu(), y.label_map) and torch.equal(x.semantic.cpu(), y.semantic)
        assert torch.equal(x.centers.cpu(), y.centers) and torch.equal(x.center_scores.cpu(), y.center_scores)
        for field in ("ids", "classes", "boxes", "areas", "center_index"):
            assert torch.equal(getattr(x.instances, field).cpu(), getattr(y.instances, field)), field
        torch.testing.assert_close(x.instances.scores.cpu(), y.instances.scores, rtol=1e-5, atol=1e-7,
                                   equal_nan=True)


_RANDOM_MAPS = given(
    seed=st.integers(0, 2**32 - 1),
    batch=st.integers(1, 2),
    height=st.integers(1, 48),
    width=st.integers(1, 48),
    classes=st.integers(2, 8),
    top_k=st.integers(1, 40),
    log_magnitude=st.floats(-1, 8),
    integer_offsets=st.booleans(),
    void_channel=st.booleans(),
    nan_logits=st.booleans(),
)


def _random_maps(
    seed, batch, height, width, classes, top_k, log_magnitude, integer_offsets, void_channel, nan_logits
) -> tuple[list[torch.Tensor], list[int], PostProcessConfig]:
    """Random maps with logit ties and NaNs (argmax), exact distance ties, offsets far off the image, a void
    channel, images with no center: (logits, heatmap, offsets), thing ids, settings."""
    rng = np.random.default_rng(seed)
    logits = np.round(rng.standard_normal((batch, classes, height, width)) * 2) / 2  # many ties
    if nan_logits:
        logits[rng.random(logits.shape) < 0.05] = np.nan
    heat = rng.random((batch, 1, height, width)) * rng.choice([0.0, 1.0], size=(batch, 1, 1, 1))
    offset = rng.standard_normal((batch, 2, height, width)) * 10.0**log_magnitude
    if integer_offsets:
        offset = np.round(offset)
    thing_ids = sorted(rng.choice(classes - int(void_channel), size=rng.integers(0, classes - int(void_channel)) + 1,
                                  replace=False).tolist())
    cfg = PostProcessConfig(center_threshold=0.5, nms_kernel=3, top_k=top_k, stuff_area=int(rng.integers(1, 50)))
    return [torch.from_numpy(a.astype(np.float32)) for a in (logits, heat, offset)], thing_ids, cfg


@settings(max_examples=60, deadline=None, derandomize=True)
@_RANDOM_MAPS
def test_compiled_backend_equals_torch_backend(void_channel, **case):
    """The numba kernels give the torch version's maps and instances on random maps."""
    inputs, thing_ids, cfg = _random_maps(void_channel=void_channel, **case)
    expected = panoptic_postprocess(*inputs, thing_ids, cfg, void_channel=void_channel, backend="torch")
    actual = panoptic_postprocess(*inputs, thing_ids, cfg, void_channel=void_channel, backend="compiled")
    _assert_same_predictions(actual, expected)


@settings(max_examples=60, deadline=None, derandomize=True)
@_RANDOM_MAPS
def test_invariants_on_random_maps(void_channel, batch, **case):
    """Whatever the maps: labels decode to a known class; a thing-class pixel is void or an instance (number >= 1),
    a stuff-class pixel void or its class (number 0); instances of a class are numbered 1..n; the instance
    table matches the map (ids, classes, areas, boxes); a batch gives what each image alone gives."""
    inputs, thing_ids, cfg = _random_maps(void_channel=void_channel, batch=batch, **case)
    divisor, void = 1000, -1
    results = panoptic_postprocess(*inputs, thing_ids, cfg, label_divisor=divisor, void_label=void,
                                   void_channel=void_channel)
    num_classes = inputs[0].shape[1] - int(void_channel)
    for index, result in enumerate(results):
        labels, semantic = result.label_map.numpy(), result.semantic.numpy()
        assigned = labels != void
        classes, numbers = labels[assigned] // divisor, labels[assigned] % divisor
        assert ((classes >= 0) & (classes < num_classes)).all()
        thing_class = np.isin(classes, thing_ids)
        assert (numbers[thing_class] >= 1).all() and (numbers[~thing_class] == 0).all()
        on_thing = np.isin(semantic, thing_ids)
        assert np.isin(labels[on_thing], [void, *result.instances.ids.tolist()]).all()
        stuff_pixels = assigned & ~on_thing
        assert (labels[stuff_pixels] == semantic[stuff_pixels] * divisor).all()
        ids = result.instances.ids.numpy()
        assert sorted(ids.tolist()) == sorted(set(labels[assigned][thing_class].tolist()))
        for cls in set((ids // divisor).tolist()):
            numbered = sorted((ids[ids // divisor == cls] % divisor).tolist())
            assert numbered == list(range(1, len(numbered) + 1))
        for label, cls, area, box in zip(ids, result.instances.classes.tolist(), result.instances.areas.tolist(),
                                         result.instances.boxes.tolist()):
            ys, xs = np.nonzero(labels == label)
            assert cls == label // divisor and area == len(ys)
            assert box == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        alone = panoptic_postprocess(*(t[index : index + 1] for t in inputs), thing_ids, cfg, label_divisor=divisor,
                                     void_label=void, void_channel=void_channel)
        _assert_same_predictions(alone, [result])


@settings(max_examples=60, deadline=None, derandomize=True)
@_RANDOM_MAPS
def test_post_processing_in_bands_equals_the_whole_map(void_channel, batch, seed, **case):
    """Maps that arrive in bands of rows (large tiled images, :mod:`.banded`) give the whole map's result."""
    from panoptic_deeplab.inference.banded import postprocess_bands

    (logits, heat, offset), thing_ids, cfg = _random_maps(void_channel=void_channel, batch=1, seed=seed, **case)
    expected = panoptic_postprocess(logits, heat, offset, thing_ids, cfg, void_channel=void_channel)
    height, width = heat.shape[-2:]
    rng = np.random.default_rng(seed)
    cuts = [0, *sorted(rng.choice(np.arange(1, height), size=min(height - 1, 3), replace=False).tolist()), height]
    calls = []

    def bands():
        calls.append(1)
        for top, bottom in zip(cuts, cuts[1:]):
            yield top, {"semantic": logits[..., top:bottom, :], "center": heat[..., top:bottom, :],
                        "offset": offset[..., top:bottom, :]}

    actual, center, offset_out = postprocess_bands(bands, (height, width), thing_ids, cfg, void_channel=void_channel)
    _assert_same_predictions([actual], expected)
    assert torch.equal(center, heat[0]) and torch.equal(offset_out, offset[0])
    assert len(calls) == (2 if len(expected[0].instances) else 1)


def test_post_processing_in_bands_refuses_gaps():
    from panoptic_deeplab.inference.banded import postprocess_bands

    maps = {"semantic": torch.zeros(1, 3, 4, 5), "center": torch.zeros(1, 1, 4, 5), "offset": torch.zeros(1, 2, 4, 5)}
    with pytest.raises(ValueError, match=r"^bands must follow each other down the image: expected rows from 4, got 5"):
        postprocess_bands(lambda: [(0, maps), (5, maps)], (9, 5), [1])
    with pytest.raises(ValueError, match=r"^the bands cover 4 of the image's 9 rows"):
        postprocess_bands(lambda: [(0, maps)], (9, 5), [1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@settings(max_examples=40, deadline=None, derandomize=True)
@_RANDOM_MAPS
def test_cuda_equals_cpu(void_channel, **case):
    """Post-processing on CUDA (torch operations) gives the CPU default's (numba kernels) maps and instances."""
    inputs, thing_ids, cfg = _random_maps(void_channel=void_channel, **case)
    expected = panoptic_postprocess(*inputs, thing_ids, cfg, void_channel=void_channel)
    on_cuda = panoptic_postprocess(*(t.cuda() for t in inputs), thing_ids, cfg, void_channel=void_channel)
    assert on_cuda[0].label_map.is_cuda
    _assert_same_predictions(on_cuda, expected)


def test_compiled_backend_reads_crops_of_padded_maps_in_place():
    """The predictor crops the network's padded outputs: the kernels read such views where they lie (rows
    ``row_stride`` apart), with the results of contiguous copies; other layouts are copied first."""
    from panoptic_deeplab.inference.postprocess import _rows_in_place

    logits, heat, offset = (torch.from_numpy(a) for a in _blobs_case(4))
    cfg = PostProcessConfig(center_threshold=0.5, stuff_area=30)
    height, width = logits.shape[-2:]
    expected = panoptic_postprocess(logits, heat, offset, [3, 4, 5], cfg, backend="compiled")

    def padded(maps: torch.Tensor, extra: int) -> torch.Tensor:  # ``maps`` cropped from the end of a larger batch
        big = torch.randn(1 + maps.shape[0], maps.shape[1], height + extra, width + extra)
        big[1:, :, :height, :width] = maps
        return big[1:, :, :height, :width]

    crops = [padded(logits, 3), padded(heat, 3), padded(offset, 3)]
    view, row_stride = _rows_in_place(crops[0][0])
    assert row_stride == width + 3 and view.flags["C_CONTIGUOUS"]
    assert np.shares_memory(view, crops[0].numpy())  # read in place, not copied
    _assert_same_predictions(panoptic_postprocess(*crops, [3, 4, 5], cfg, backend="compiled"), expected)
    # Offsets padded differently from the logits, or maps stored column by column: copies, the same results.
    for mixed in ([crops[0], crops[1], padded(offset, 5)],
                  [logits.transpose(-1, -2).contiguous().transpose(-1, -2), heat, offset]):
        _assert_same_predictions(panoptic_postprocess(*mixed, [3, 4, 5], cfg, backend="compiled"), expected)


def test_compiled_backend_threads_and_errors():
    logits, heat, offset = (torch.from_numpy(a) for a in _blobs_case(4))
    cfg = PostProcessConfig(center_threshold=0.5, stuff_area=30)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = panoptic_postprocess(logits, heat, offset, [3, 4, 5], cfg, backend="compiled")
    finally:
        torch.set_num_threads(threads)
    assert len(one_thread[0].instances) > 0
    _assert_same_predictions(panoptic_postprocess(logits, heat, offset, [3, 4, 5], cfg, backend="compiled"), one_thread)
    # bfloat16 outputs (bf16 inference) are read exactly as float32.
    _assert_same_predictions(
        panoptic_postprocess(logits.bfloat16(), heat, offset.bfloat16(), [3, 4, 5], cfg, backend="compiled"),
        panoptic_postprocess(logits.bfloat16(), heat, offset.bfloat16(), [3, 4, 5], cfg, backend="torch"),
    )
    bad = offset.clone()
    bad[0, :, 5, 5] = float("nan")
    thing = np.isin(panoptic_postprocess(logits, heat, offset, [3, 4, 5], cfg)[0].semantic.numpy(), [3, 4, 5])
    bad[0, :, thing] = float("nan")
    for backend in ("torch", "compiled"):
        with pytest.raises(ValueError, match=r"offset contains non-finite values \(nan/inf\) at thing pixels"):
            panoptic_postprocess(logits, heat, bad, [3, 4, 5], cfg, backend=backend)
    with pytest.raises(ValueError, match="backend must be one of auto, torch, compiled, got 'numba'"):
        panoptic_postprocess(logits, heat, offset, [3, 4, 5], cfg, backend="numba")
    with pytest.raises(ValueError, match="the compiled backend runs float32/16 tensors on the CPU, got torch.float64"):
        panoptic_postprocess(logits.double(), heat, offset, [3, 4, 5], cfg, backend="compiled")

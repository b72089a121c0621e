"""Loss values computed by hand on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch

from panoptic_deeplab.config import LossConfig
from panoptic_deeplab.data.targets import generate_targets
from panoptic_deeplab.modeling.losses import (
    PanopticDeepLabLoss,
    bootstrapped_cross_entropy,
    center_mse_loss,
    offset_l1_loss,
)

LN3 = math.log(3.0)
# logits [0, ln 3] -> probabilities [1/4, 3/4]: CE is ln 4 for class 0 and ln(4/3) for class 1
HARD, EASY = math.log(4.0), math.log(4.0 / 3.0)


def _logits(width: int, batch: int = 1) -> torch.Tensor:
    return torch.tensor([0.0, LN3]).view(1, 2, 1, 1).expand(batch, 2, 1, width).clone()


def test_cross_entropy_top_k_by_hand():
    logits = _logits(4)
    target = torch.tensor([[[0, 1, 1, 0]]])
    plain_mean = (2 * HARD + 2 * EASY) / 4
    assert bootstrapped_cross_entropy(logits, target, top_k_percent=1.0).item() == pytest.approx(plain_mean)
    # k = int(0.5 * 4) = 2: the two hard pixels
    assert bootstrapped_cross_entropy(logits, target, top_k_percent=0.5).item() == pytest.approx(HARD)
    # k = int(0.75 * 4) = 3
    assert bootstrapped_cross_entropy(logits, target, top_k_percent=0.75).item() == pytest.approx((2 * HARD + EASY) / 3)
    # k = int(0.2 * 4) = 0 -> at least one pixel
    assert bootstrapped_cross_entropy(logits, target, top_k_percent=0.2).item() == pytest.approx(HARD)


def test_weights_apply_before_selection():
    logits = _logits(2)
    target = torch.tensor([[[0, 1]]])  # CE: ln 4 = 1.386, ln(4/3) = 0.288
    weights = torch.tensor([[[1.0, 6.0]]])  # weighted: 1.386, 1.726 -> the easy pixel is now the hardest
    loss = bootstrapped_cross_entropy(logits, target, weights, top_k_percent=0.5)
    assert loss.item() == pytest.approx(6 * EASY)
    assert bootstrapped_cross_entropy(logits, target, top_k_percent=0.5).item() == pytest.approx(HARD)
    assert bootstrapped_cross_entropy(logits, target, weights, top_k_percent=1.0).item() == pytest.approx(
        (HARD + 6 * EASY) / 2
    )


def test_ignored_pixels_count_in_k_and_contribute_zero():
    logits = _logits(4)
    target = torch.tensor([[[0, 255, 255, 1]]])
    # k = int(0.5 * 4) = 2 counts the ignored pixels: both valid pixels are selected
    assert bootstrapped_cross_entropy(logits, target, top_k_percent=0.5).item() == pytest.approx((HARD + EASY) / 2)
    # plain mean over all 4 pixels, ignored ones as zeros
    assert bootstrapped_cross_entropy(logits, target, top_k_percent=1.0).item() == pytest.approx((HARD + EASY) / 4)
    everything_ignored = torch.full((1, 1, 4), 255)
    logits.requires_grad_(True)
    loss = bootstrapped_cross_entropy(logits, everything_ignored, top_k_percent=0.5)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()


def test_top_k_is_over_the_whole_batch():
    logits = _logits(2, batch=2)
    target = torch.tensor([[[0, 0]], [[1, 1]]])  # image 0 hard, image 1 easy
    # k = int(0.5 * 4) = 2: both from image 0 (per-image selection would average HARD and EASY)
    assert bootstrapped_cross_entropy(logits, target, top_k_percent=0.5).item() == pytest.approx(HARD)


def test_center_mse_by_hand():
    pred = torch.tensor([1.0, 0.5, 0.0, 2.0]).view(1, 1, 2, 2)
    target = torch.tensor([0.0, 1.0, 0.0, 0.0]).view(1, 1, 2, 2)
    weights = torch.tensor([1.0, 1.0, 1.0, 0.0]).view(1, 1, 2, 2)
    assert center_mse_loss(pred, target, weights).item() == pytest.approx((1 + 0.25 + 0) / 3)


def test_offset_l1_divides_by_weights_expanded_to_two_channels():
    pred = torch.tensor([[1.0, 2.0], [3.0, -1.0]]).view(1, 2, 1, 2)  # channel 0: (1, 2); channel 1: (3, -1)
    target = torch.zeros(1, 2, 1, 2)
    weights = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    # only pixel 0: |1| + |3| = 4 over 2 * 1 weights
    assert offset_l1_loss(pred, target, weights).item() == pytest.approx(2.0)


@pytest.mark.parametrize("loss_fn, channels", [(center_mse_loss, 1), (offset_l1_loss, 2)])
def test_empty_weights_give_zero_with_finite_gradient(loss_fn, channels):
    pred = torch.randn(2, channels, 3, 3, requires_grad=True)
    loss = loss_fn(pred, torch.randn(2, channels, 3, 3), torch.zeros(2, 1, 3, 3))
    loss.backward()
    assert loss.item() == 0.0
    assert pred.grad is not None and torch.isfinite(pred.grad).all() and (pred.grad == 0).all()


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="center"):
        center_mse_loss(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5), torch.ones(1, 1, 4, 4))
    with pytest.raises(ValueError, match="broadcast"):
        offset_l1_loss(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 4), torch.ones(1, 1, 4, 3))
    with pytest.raises(ValueError, match="semantic"):
        bootstrapped_cross_entropy(torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="top_k_percent"):
        bootstrapped_cross_entropy(torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long), top_k_percent=0)


def _batch(num_classes=4, size=(24, 32), seed=0):
    gen = torch.Generator().manual_seed(seed)
    labels = []
    for i in range(2):
        label = torch.full(size, 1000, dtype=torch.int64)
        label[3 + i : 12 + i, 4:14] = 2001
        label[14:22, 18:30] = 2002 + i
        label[0:2, :] = 255000
        labels.append(label)
    targets = [generate_targets(label, [2], sigma=2) for label in labels]
    batched = {k: torch.stack([t[k] for t in targets]) for k in targets[0]}
    outputs = {
        "semantic": torch.randn(2, num_classes, *size, generator=gen),
        "center": torch.randn(2, 1, *size, generator=gen),
        "offset": torch.randn(2, 2, *size, generator=gen),
    }
    return outputs, batched


def test_panoptic_loss_combines_unweighted_terms():
    outputs, targets = _batch()
    cfg = LossConfig(semantic_weight=2.0, center_weight=50.0, offset_weight=0.5, top_k_percent=0.3)
    losses = PanopticDeepLabLoss(cfg)(outputs, targets)
    semantic = bootstrapped_cross_entropy(
        outputs["semantic"], targets["semantic"], targets["semantic_weights"], top_k_percent=0.3
    )
    center = center_mse_loss(outputs["center"], targets["center"], targets["center_weights"])
    offset = offset_l1_loss(outputs["offset"], targets["offset"], targets["offset_weights"])
    assert set(losses) == {"total", "semantic", "center", "offset"}
    torch.testing.assert_close(losses["semantic"], semantic)
    torch.testing.assert_close(losses["center"], center)
    torch.testing.assert_close(losses["offset"], offset)
    torch.testing.assert_close(losses["total"], 2.0 * semantic + 50.0 * center + 0.5 * offset)
    default = PanopticDeepLabLoss()(outputs, targets)
    expected = default["semantic"] + 200 * default["center"] + 0.01 * default["offset"]
    torch.testing.assert_close(default["total"], expected)


def test_void_channel_shifts_the_semantic_targets():
    """``semantic_void_channel`` (deeplab2's COCO heads): train id k is channel k + 1, ignored pixels stay ignored,
    no pixel targets channel 0, which still takes part in the softmax."""
    outputs, targets = _batch(num_classes=4)
    losses = PanopticDeepLabLoss(LossConfig(top_k_percent=1.0), void_channel=True)(outputs, targets)
    target, weights = targets["semantic"], targets["semantic_weights"]
    log_probs = outputs["semantic"].log_softmax(dim=1)
    kept = target != 255
    picked = log_probs.gather(1, (target.clamp(max=2) + 1)[:, None])[:, 0]
    expected = -(picked * weights)[kept].sum() / target.numel()
    torch.testing.assert_close(losses["semantic"], expected)
    assert kept.sum() < target.numel() and int(target[kept].max()) == 2  # ids 0..2 here, void rows ignored


def test_perfect_center_and_offset_predictions_give_zero():
    outputs, targets = _batch()
    outputs["center"] = targets["center"] + 5 * (1 - targets["center_weights"])  # errors only where unweighted
    outputs["offset"] = targets["offset"].clone()
    losses = PanopticDeepLabLoss()(outputs, targets)
    assert losses["center"].item() == 0.0 and losses["offset"].item() == 0.0


def test_gradients_reach_every_output():
    outputs, targets = _batch()
    outputs = {k: v.requires_grad_(True) for k, v in outputs.items()}
    PanopticDeepLabLoss()(outputs, targets)["total"].backward()
    for key, value in outputs.items():
        assert torch.isfinite(value.grad).all() and value.grad.abs().sum() > 0, key


def test_bf16_autocast_outputs_give_float32_losses():
    outputs, targets = _batch()
    reference = PanopticDeepLabLoss()(outputs, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = {k: v.to(torch.bfloat16) for k, v in outputs.items()}
        losses = PanopticDeepLabLoss()(low, targets)
    for key in reference:
        assert losses[key].dtype == torch.float32, key
        torch.testing.assert_close(losses[key], reference[key], rtol=2e-2, atol=1e-3)


def test_missing_keys_are_named():
    outputs, targets = _batch()
    del outputs["offset"], targets["center_weights"]
    with pytest.raises(KeyError, match=r"outputs\['offset'\].*targets\['center_weights'\]"):
        PanopticDeepLabLoss()(outputs, targets)
    with pytest.raises(ValueError, match="top_k_percent"):
        PanopticDeepLabLoss(LossConfig(top_k_percent=1.5))

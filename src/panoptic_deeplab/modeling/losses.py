"""Losses of Panoptic-DeepLab (SPEC §3): bootstrapped cross-entropy, center MSE, offset L1.

All three are computed in float32 whatever the autocast dtype of the predictions, and give 0 (with a
finite, zero gradient) when their weight map is empty, never NaN.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from panoptic_deeplab.config import LossConfig
from panoptic_deeplab.data.coco_panoptic import IGNORE_LABEL
from panoptic_deeplab.data.targets import TARGET_KEYS


def _check_same_shape(name: str, pred: Tensor, target: Tensor, weights: Tensor) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"{name}: prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    if weights.dim() != pred.dim() or any(w not in (1, p) for w, p in zip(weights.shape, pred.shape)):
        raise ValueError(
            f"{name}: weights {tuple(weights.shape)} do not broadcast to the prediction {tuple(pred.shape)}"
        )


def _safe_ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    """``numerator / denominator``, and ``numerator`` itself (0 when the weights are empty) if the denominator is 0.

    Replacing the denominator (rather than the result) keeps the gradient finite: a ``torch.where`` on the
    quotient would back-propagate ``0 * inf = NaN``. No host synchronisation.
    """
    return numerator / torch.where(denominator > 0, denominator, torch.ones_like(denominator))


def bootstrapped_cross_entropy(
    logits: Tensor,
    target: Tensor,
    weights: Tensor | None = None,
    *,
    top_k_percent: float = 0.2,
    ignore_label: int = IGNORE_LABEL,
) -> Tensor:
    """Weighted bootstrapped cross-entropy (SPEC §3.1, the BC/D2 variant this project follows).

    ``logits [N, C, H, W]``, ``target [N, H, W]`` int64 (``ignore_label`` contributes 0), ``weights [N, H, W]``.
    The per-pixel CE is multiplied by the weights BEFORE the selection (SPEC §9.6); then the
    ``k = int(top_k_percent * N * H * W)`` largest values of the whole batch (ignored pixels included in the
    count) are averaged. ``top_k_percent = 1`` gives the plain weighted mean over all pixels.
    """
    if logits.dim() != 4 or target.shape != (logits.shape[0],) + tuple(logits.shape[2:]):
        raise ValueError(
            f"semantic: logits must be [N, C, H, W] and target [N, H, W], got {tuple(logits.shape)} and "
            f"{tuple(target.shape)}"
        )
    if not 0.0 < top_k_percent <= 1.0:
        raise ValueError(f"top_k_percent must lie in (0, 1], got {top_k_percent}")
    pixel_losses = F.cross_entropy(logits.float(), target.long(), ignore_index=ignore_label, reduction="none")
    if weights is not None:
        if weights.shape != target.shape:
            raise ValueError(f"semantic: weights {tuple(weights.shape)} differ from target {tuple(target.shape)}")
        pixel_losses = pixel_losses * weights.float()
    pixel_losses = pixel_losses.reshape(-1)
    if top_k_percent >= 1.0:
        return pixel_losses.mean()
    # At least one pixel, so that tiny inputs give the single hardest pixel rather than the NaN mean of nothing.
    top_k = max(int(top_k_percent * pixel_losses.numel()), 1)
    return torch.topk(pixel_losses, top_k, sorted=False).values.mean()


def center_mse_loss(pred: Tensor, target: Tensor, weights: Tensor) -> Tensor:
    """``sum(w * (pred - target)^2) / sum(w)`` over the batch (SPEC §3.2, BC/D2); 0 for empty weights."""
    _check_same_shape("center", pred, target, weights)
    w = weights.float()
    numerator = (w * (pred.float() - target.float()) ** 2).sum()
    return _safe_ratio(numerator, w.expand_as(pred).sum())


def offset_l1_loss(pred: Tensor, target: Tensor, weights: Tensor) -> Tensor:
    """``sum(w * |pred - target|) / sum(w expanded to the 2 channels)`` (SPEC §3.3, BC); 0 for empty weights.

    ``pred``/``target`` ``[N, 2, H, W]``, ``weights`` ``[N, 1, H, W]``: the mean absolute error per coordinate,
    half of D2's value (which divides by the un-expanded weight sum).
    """
    _check_same_shape("offset", pred, target, weights)
    w = weights.float()
    numerator = (w * (pred.float() - target.float()).abs()).sum()
    return _safe_ratio(numerator, w.expand_as(pred).sum())


class PanopticDeepLabLoss(nn.Module):
    """Total loss ``w_sem * L_sem + w_center * L_center + w_offset * L_offset`` (SPEC §3; 1 / 200 / 0.01).

    ``forward(outputs, targets)`` takes the model's output dict (``semantic``, ``center``, ``offset``) and the
    batched targets of ``data.targets.generate_targets``, all at the same resolution, and returns ``total``
    plus the UNWEIGHTED terms ``semantic``, ``center``, ``offset`` (scalars, float32).
    ``void_channel``: the semantic logits have a void channel first (``ModelConfig.semantic_void_channel``),
    so train id ``k`` is channel ``k + 1``; as in deeplab2's COCO training, no pixel targets the void channel.
    """

    OUTPUT_KEYS = ("semantic", "center", "offset")

    def __init__(self, cfg: LossConfig | None = None, *, ignore_label: int = IGNORE_LABEL,
                 void_channel: bool = False) -> None:
        super().__init__()
        self.cfg = cfg if cfg is not None else LossConfig()
        self.ignore_label = ignore_label
        self.void_channel = void_channel
        if not 0.0 < self.cfg.top_k_percent <= 1.0:
            raise ValueError(f"loss.top_k_percent must lie in (0, 1], got {self.cfg.top_k_percent}")

    def forward(self, outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> dict[str, Tensor]:
        missing = [f"outputs[{k!r}]" for k in self.OUTPUT_KEYS if k not in outputs]
        missing += [f"targets[{k!r}]" for k in TARGET_KEYS if k not in targets]
        if missing:
            raise KeyError(f"PanopticDeepLabLoss: missing {', '.join(missing)}")
        semantic_target = targets["semantic"]
        if self.void_channel:
            semantic_target = torch.where(semantic_target == self.ignore_label, semantic_target, semantic_target + 1)
        semantic = bootstrapped_cross_entropy(
            outputs["semantic"],
            semantic_target,
            targets["semantic_weights"],
            top_k_percent=self.cfg.top_k_percent,
            ignore_label=self.ignore_label,
        )
        center = center_mse_loss(outputs["center"], targets["center"], targets["center_weights"])
        offset = offset_l1_loss(outputs["offset"], targets["offset"], targets["offset_weights"])
        total = (
            self.cfg.semantic_weight * semantic + self.cfg.center_weight * center + self.cfg.offset_weight * offset
        )
        return {"total": total, "semantic": semantic, "center": center, "offset": offset}

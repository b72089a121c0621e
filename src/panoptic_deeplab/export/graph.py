"""The whole pipeline as one traceable module: uint8 image -> network -> post-processing -> label map + instances.

:class:`PanopticGraph` is what ``export`` writes by default. Every step has static shapes (``top_k`` center slots,
padded), so ``torch.export`` traces it and any ONNX runtime runs it, and every step reproduces
:func:`panoptic_deeplab.inference.postprocess.panoptic_postprocess` exactly (SPEC §5): the same argmax, the same
NMS (a max pool with -inf padding), the same top-k order (ties to the smaller row-major position: ONNX TopK's
tie rule), the same float64 distances ``(py - cy)^2 + (px - cx)^2`` and first-minimum argmin, the same majority
vote, per-class numbering and stuff area rule. Only the instance scores are sums in another order (float
tolerance).

Memory: grouping compares every pixel with :data:`CENTERS_PER_STEP` centers at a time (the eager code's candidate
table has data-dependent shapes, which a static graph cannot hold), so its temporaries are a few
``[N, CENTERS_PER_STEP, H, W]`` float64 tensors whatever ``top_k`` is, instead of the references'
``[top_k, H * W, 2]``.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from panoptic_deeplab.config import ModelConfig, PostProcessConfig
from panoptic_deeplab.data.coco_panoptic import IGNORE_LABEL

# Centers compared with every pixel per grouping step: temporaries of 4 x 8 bytes per pixel and image.
CENTERS_PER_STEP = 4

GRAPH_OUTPUT_NAMES = (
    "panoptic",  # [N, H, W] int64 train_id * label_divisor + number, void = void_label
    "semantic",  # [N, H, W] int64 argmax train id (IGNORE_LABEL where a void channel wins)
    "center",  # [N, 1, H, W] float32 raw center heatmap
    "offset",  # [N, 2, H, W] float32 (dy, dx) in pixels
    "centers",  # [N, K, 2] int64 (y, x) detected centers by decreasing score; rows past num_centers are -1
    "center_scores",  # [N, K] float32 heatmap values at the centers; 0 past num_centers
    "num_centers",  # [N] int64
    "instance_ids",  # [N, K] int64 panoptic label of the instance formed by center k (void_label: none)
    "instance_classes",  # [N, K] int64 train id (-1: none)
    "instance_scores",  # [N, K] float32 center value x mean softmax probability of its class (0: none)
    "instance_boxes",  # [N, K, 4] float32 (x0, y0, x1, y1), x1/y1 exclusive (0: none)
    "instance_areas",  # [N, K] int64 pixel counts (0: no instance)
)


def _padded_side(size: Tensor | int, output_stride: int, align_corners: bool, size_divisibility: int) -> int:
    """:func:`panoptic_deeplab.data.transforms.valid_input_size` of one side, in integer arithmetic that
    ``torch.export`` keeps symbolic."""
    if align_corners:
        side = ((torch.sym_max(size, 2) - 2) // output_stride + 1) * output_stride + 1
    else:
        side = ((torch.sym_max(size, 1) - 1) // output_stride + 1) * output_stride
    if size_divisibility:
        side = ((side - 1) // size_divisibility + 1) * size_divisibility
    return side


def _grouping_step(best: Tensor, nearest: Tensor, point_y: Tensor, point_x: Tensor, center_y: Tensor,
                   center_x: Tensor, start: int) -> tuple[Tensor, Tensor]:
    """Points ``[N, 1, H, W]`` against centers ``start ..`` (``[N, S]``): the running minimum and its index."""
    dy = point_y - center_y.unsqueeze(2).unsqueeze(3)
    dx = point_x - center_x.unsqueeze(2).unsqueeze(3)
    distance = dy * dy + dx * dx  # [N, S, H, W]
    step_best = distance.amin(dim=1)
    closer = step_best < best  # strict: an earlier center keeps a tie
    return torch.where(closer, step_best, best), torch.where(closer, distance.argmin(dim=1) + start, nearest)


def _skip_step(best: Tensor, nearest: Tensor, *unused: Tensor) -> tuple[Tensor, Tensor]:
    # New tensors (cond's branches may not alias their inputs); + 0, not clone(), whose decomposition has strides
    # the ONNX exporter cannot translate.
    return best + 0, nearest + 0


def sym_stride_translation(self: object, dim: int) -> object:
    """ONNX translation of ``aten.sym_stride``, which ``torch.export`` leaves in ``torch.cond`` branches only as
    dead stride checks (ONNX tensors have no strides): any value will do, and the torchlib registry has none."""
    from onnxscript import opset18 as op

    return op.Constant(value_int=1)


class PanopticGraph(nn.Module):
    """``forward(images)``: uint8 RGB ``[N, H, W, 3]`` -> the tuple of :data:`GRAPH_OUTPUT_NAMES`.

    The images are padded inside (bottom/right, the model's mean pixel) to the size the network resamples exactly,
    as :class:`~panoptic_deeplab.inference.predictor.Predictor` pads, and the outputs cropped back before
    post-processing, so any image size gives the predictor's result.
    """

    def __init__(
        self,
        model: nn.Module,
        model_cfg: ModelConfig,
        post_cfg: PostProcessConfig,
        thing_ids: Sequence[int],
        label_divisor: int,
        void_label: int,
    ) -> None:
        super().__init__()
        if model_cfg.inference_size is not None:
            raise ValueError(
                "this model resizes images to its inference_size before the network (deeplab2's COCO eval): the "
                "graph with post-processing does not hold that resize yet; export it with --no-postprocess"
            )
        if post_cfg.top_k >= label_divisor:
            raise ValueError(
                f"top_k={post_cfg.top_k} centers could number instances past label_divisor={label_divisor}"
            )
        self.model = model
        self.output_stride = model_cfg.output_stride
        self.align_corners = model_cfg.align_corners
        self.size_divisibility = model_cfg.size_divisibility
        self.void_channel = bool(model_cfg.semantic_void_channel)
        self.num_classes = model_cfg.num_classes
        self.post = post_cfg
        self.label_divisor = int(label_divisor)
        self.void_label = int(void_label)
        classes = self.num_classes + int(self.void_channel)  # a void channel becomes the stuff class num_classes
        is_thing = torch.zeros(classes, dtype=torch.bool)
        is_thing[torch.as_tensor(list(thing_ids), dtype=torch.long)] = True
        stuff_label = torch.arange(classes) * self.label_divisor
        if self.void_channel:
            stuff_label[self.num_classes] = self.void_label
        self.register_buffer("is_thing", is_thing, persistent=False)
        self.register_buffer("stuff_label", stuff_label, persistent=False)

    def _network(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """uint8 NHWC -> the network's outputs at the images' size, float32 (the predictor's padding and crop)."""
        height, width = images.shape[1], images.shape[2]
        x = images.permute(0, 3, 1, 2).float().div(255.0)
        padded_h = _padded_side(height, self.output_stride, self.align_corners, self.size_divisibility)
        padded_w = _padded_side(width, self.output_stride, self.align_corners, self.size_divisibility)
        mean = self.model.pixel_mean.to(torch.float32)
        batch = x.shape[0]
        x = torch.cat([x, mean.expand(batch, 3, height, padded_w - width)], dim=3)
        x = torch.cat([x, mean.expand(batch, 3, padded_h - height, padded_w)], dim=2)
        out = self.model(x)
        return tuple(out[k][:, :, :height, :width].float() for k in ("semantic", "center", "offset"))  # type: ignore

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        logits, heat, offset = self._network(images)
        return self.postprocess(logits, heat, offset)

    def postprocess(self, logits: Tensor, heat: Tensor, offset: Tensor) -> tuple[Tensor, ...]:
        """``panoptic_postprocess`` with static shapes on a batch (see the module docstring)."""
        batch, _, height, width = logits.shape
        top_k, classes = self.post.top_k, self.is_thing.shape[0]
        semantic = logits.argmax(dim=1)  # [N, H, W], first maximum
        if self.void_channel:
            semantic = torch.where(semantic == 0, self.num_classes, semantic - 1)
        thing = self.is_thing[semantic]

        # Centers: window maxima above the threshold, the top_k highest; slots past the detected ones are -inf.
        kernel = self.post.nms_kernel
        pooled = F.max_pool2d(heat, kernel, stride=1, padding=kernel // 2)
        keep = (heat == pooled) & (heat > self.post.center_threshold)
        minus_inf = torch.tensor(float("-inf"), dtype=heat.dtype, device=heat.device)
        candidates = torch.where(keep, heat, minus_inf).reshape(batch, -1)
        # top_k slots even when the image has fewer pixels than top_k
        candidates = torch.cat([candidates, minus_inf.expand(batch, top_k)], dim=1)
        center_scores, flat_index = candidates.topk(top_k, dim=1)
        valid = center_scores > minus_inf
        num_centers = valid.sum(dim=1)
        inf = torch.tensor(float("inf"), dtype=torch.float64, device=heat.device)
        index_y = flat_index // width
        index_x = flat_index - index_y * width  # not %: the exporter has no remainder by a symbolic size
        center_y = torch.where(valid, index_y.double(), inf)
        center_x = torch.where(valid, index_x.double(), inf)

        # Grouping: nearest center of pixel + offset in float64, first minimum (ties to the smaller index).
        rows = torch.arange(height, device=heat.device).double().view(1, 1, height, 1)
        cols = torch.arange(width, device=heat.device).double().view(1, 1, 1, width)
        point_y = rows + offset[:, 0:1].double()  # [N, 1, H, W]
        point_x = cols + offset[:, 1:2].double()
        best = torch.full((batch, height, width), float("inf"), dtype=torch.float64, device=heat.device)
        nearest = torch.full((batch, height, width), -1, dtype=torch.long, device=heat.device)
        most_centers = num_centers.max()
        for start in range(0, top_k, CENTERS_PER_STEP):
            stop = min(start + CENTERS_PER_STEP, top_k)
            operands = (best, nearest, point_y, point_x, center_y[:, start:stop], center_x[:, start:stop])
            # Slots past every image's detected centers hold no center: their step is skipped at run time.
            best, nearest = torch.cond(most_centers > start, functools.partial(_grouping_step, start=start),
                                       _skip_step, operands)
        # Instance 0: not a thing pixel, or no center at all (nearest stays -1).
        instance = torch.where(thing, nearest + 1, 0).reshape(batch, -1)

        # Majority vote per instance, (instance, class) pairs counted with one scatter-add per batch.
        semantic_flat = semantic.reshape(batch, -1)
        image_offset = torch.arange(batch, device=heat.device).view(batch, 1)
        pair = ((image_offset * (top_k + 1) + instance) * classes + semantic_flat).reshape(-1)
        ones = torch.ones_like(pair, dtype=torch.float64)
        votes = torch.zeros(batch * (top_k + 1) * classes, dtype=torch.float64, device=heat.device)
        votes = votes.scatter_add(0, pair, ones).view(batch, top_k + 1, classes)[:, 1:]
        areas = votes.sum(dim=2).long()  # [N, K]
        majority = votes.argmax(dim=2)  # first maximum: ties to the smaller class id
        kept = areas > 0
        counts = (F.one_hot(majority, classes) * kept.unsqueeze(2).long()).cumsum(dim=1)
        numbers = counts.gather(2, majority.unsqueeze(2)).squeeze(2)
        void = torch.tensor(self.void_label, dtype=torch.long, device=heat.device)
        instance_ids = torch.where(kept, majority * self.label_divisor + numbers, void)
        instance_lut = torch.cat([void.expand(batch, 1), instance_ids], dim=1)  # row 0: no instance
        thing_label = instance_lut.gather(1, instance)

        class_pair = (image_offset * classes + semantic_flat).reshape(-1)
        class_areas = torch.zeros(batch * classes, dtype=torch.float64, device=heat.device)
        class_areas = class_areas.scatter_add(0, class_pair, ones).view(batch, classes)
        # SPEC §9.12: a stuff class is kept when its area >= stuff_area.
        stuff_lut = torch.where(class_areas >= self.post.stuff_area, self.stuff_label, void)
        stuff = stuff_lut.gather(1, semantic_flat)
        panoptic = torch.where(thing.reshape(batch, -1), thing_label, stuff).view(batch, height, width)

        # Scores: center value x mean over the mask of the softmax probability of the instance's class.
        pixel_class = torch.cat([torch.zeros_like(majority[:, :1]), majority], dim=1).gather(1, instance)
        own = logits.reshape(batch, logits.shape[1], -1).gather(1, (pixel_class + int(self.void_channel)).unsqueeze(1))
        prob = (logits.reshape(batch, logits.shape[1], -1) - own).exp().sum(dim=1).reciprocal()
        instance_pair = (image_offset * (top_k + 1) + instance).reshape(-1)
        prob_sums = torch.zeros(batch * (top_k + 1), dtype=torch.float64, device=heat.device)
        prob_sums = prob_sums.scatter_add(0, instance_pair, prob.double().reshape(-1)).view(batch, top_k + 1)[:, 1:]
        mean_prob = prob_sums / areas.clamp(min=1).double()
        instance_scores = torch.where(kept, (center_scores.double() * mean_prob).float(), 0.0)

        # Boxes: min / max pixel coordinates per instance (rows of instance 0 are dropped).
        ys = torch.arange(height, device=heat.device).view(1, height, 1).expand(batch, height, width).reshape(batch, -1)
        xs = torch.arange(width, device=heat.device).view(1, 1, width).expand(batch, height, width).reshape(batch, -1)
        big = torch.tensor(height + width, dtype=torch.long, device=heat.device)
        box_parts = []
        for coord, reduce in ((xs, "amin"), (ys, "amin"), (xs, "amax"), (ys, "amax")):
            init = big if reduce == "amin" else torch.tensor(-1, dtype=torch.long, device=heat.device)
            target = init.expand(batch * (top_k + 1)).clone()
            target = target.scatter_reduce(0, instance_pair, coord.reshape(-1), reduce=reduce)
            box_parts.append(target.view(batch, top_k + 1)[:, 1:])
        boxes = torch.stack(box_parts, dim=2).float() + torch.tensor([0.0, 0.0, 1.0, 1.0], device=heat.device)
        instance_boxes = torch.where(kept.unsqueeze(2), boxes, 0.0)

        if self.void_channel:
            semantic = torch.where(semantic == self.num_classes, IGNORE_LABEL, semantic)
        centers = torch.stack([index_y, index_x], dim=2)
        centers = torch.where(valid.unsqueeze(2), centers, -1)
        return (
            panoptic,
            semantic,
            heat,
            offset,
            centers,
            torch.where(valid, center_scores, 0.0),
            num_centers,
            instance_ids,
            torch.where(kept, majority, -1),
            instance_scores,
            instance_boxes,
            areas,
        )

"""Inference-only rewrite of a network: batch norms folded into the convolutions that feed them.

In eval mode a BatchNorm is a per-channel affine map, ``y = (x - mean) / sqrt(var + eps) * gamma + beta``; after
a convolution it is the same as that convolution with its filters scaled by ``gamma / sqrt(var + eps)`` and a
bias ``beta - mean * gamma / sqrt(var + eps)`` (plus its own bias, scaled). Folding removes one pass over every
activation map (76 batch norms in MobileNetV3-L Panoptic-DeepLab: 0.17-0.25 s of a 1024x2048 bf16 predict on 2
CPU cores, benchmarks/bench_inference.py). The result equals the unfolded network up to float rounding, which
is why the predictor folds only for its approximate ``bf16`` precision.

Pairs are found by running the network once: a BatchNorm folds into a Conv2d when its input is that conv's
output tensor itself (module order in ``__init__`` need not be execution order, timm's blocks included). timm's
``BatchNormAct2d`` (BN + dropout + activation) keeps its dropout and activation (:class:`FoldedNorm`).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


class FoldingError(RuntimeError):
    """The folded network does not reproduce the original's outputs."""


def _conv_bn_pairs(
    model: nn.Module, example: Tensor
) -> tuple[list[tuple[nn.Conv2d, nn.BatchNorm2d]], dict[str, Tensor]]:
    """(conv, bn) pairs where the bn's input is the conv's output, and the model's outputs, from one forward pass
    on ``example``."""
    outputs: dict[int, tuple[nn.Conv2d, Tensor]] = {}  # the tensors are held so that their ids stay unique
    pairs: list[tuple[nn.Conv2d, nn.BatchNorm2d]] = []

    def after_conv(conv: nn.Module, _inputs: tuple, output: Tensor) -> None:
        outputs[id(output)] = (conv, output)  # type: ignore[assignment]

    def before_bn(bn: nn.Module, inputs: tuple) -> None:
        found = outputs.get(id(inputs[0]))
        if found is not None and found[1] is inputs[0]:
            pairs.append((found[0], bn))  # type: ignore[arg-type]

    handles = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(after_conv))
        elif type(module) is nn.BatchNorm2d or _has_activation(module):
            handles.append(module.register_forward_pre_hook(before_bn))
    try:
        with torch.no_grad():
            result = model(example)
    finally:
        for handle in handles:
            handle.remove()
    # A conv shared by two batch norms, or a bn run twice, cannot fold into one set of weights.
    convs = [conv for conv, _ in pairs]
    bns = [bn for _, bn in pairs]
    return [(c, b) for c, b in pairs if convs.count(c) == 1 and bns.count(b) == 1], result


def _has_activation(module: nn.Module) -> bool:
    """timm's BatchNormAct2d: a BatchNorm2d followed by its ``drop`` and ``act`` modules."""
    parts = (getattr(module, "act", None), getattr(module, "drop", None))
    return isinstance(module, nn.BatchNorm2d) and all(isinstance(part, nn.Module) for part in parts)


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    assert bn.running_mean is not None and bn.running_var is not None
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    with torch.no_grad():
        conv.weight.mul_(scale.to(conv.weight.dtype).view(-1, 1, 1, 1))  # in place: keeps channels_last
        if conv.bias is None:
            conv.bias = nn.Parameter(shift.to(conv.weight.dtype).clone())
        else:
            conv.bias.mul_(scale).add_(shift)


class FoldedNorm(nn.Module):
    """A batch norm folded into the convolution before it: nothing is left of it but the dropout and activation
    of timm's ``BatchNormAct2d``, if it had them."""

    def forward(self, x: Tensor) -> Tensor:
        if "act" in self._modules:
            x = self.act(self.drop(x))
        return x


def _become_folded(bn: nn.BatchNorm2d) -> None:
    """Turn ``bn`` itself into a :class:`FoldedNorm` (no weights, no statistics). The module object stays, so
    the hooks on it stay valid: timm's feature extractors read some stages' outputs through forward hooks, and
    a replaced module would leave their handles pointing at a dead one (a copy of the model then fails)."""
    for name in list(bn._parameters):
        del bn._parameters[name]
    for name in list(bn._buffers):
        del bn._buffers[name]
    bn.__class__ = FoldedNorm  # type: ignore[assignment]


def fold_batch_norms(model: nn.Module, example: Tensor, rtol: float = 1e-3) -> tuple[nn.Module, int]:
    """A copy of the eval-mode ``model`` (returning a dict of tensors) with every batch norm that directly
    follows a convolution folded into it (module doc), and how many were folded; ``model`` is unchanged.
    ``example`` is an input the model accepts (a small image batch): the outputs on it are compared before and
    after, and :class:`FoldingError` is raised when they differ by more than ``rtol`` of their range (a conv
    whose output is also read elsewhere than by its batch norm would do that)."""
    if model.training:
        raise ValueError("fold_batch_norms needs a model in eval mode (batch norms fold with their running statistics)")
    folded = copy.deepcopy(model)
    found, before = _conv_bn_pairs(folded, example)
    pairs = [(conv, bn) for conv, bn in found if bn.track_running_stats and bn.running_mean is not None]
    for conv, bn in pairs:
        _fold(conv, bn)
        _become_folded(bn)
    with torch.no_grad():
        after = folded(example)
    for key in before:
        expected, got = before[key].float(), after[key].float()
        tolerance = rtol * max(float(expected.abs().max()), 1e-6)
        if not torch.allclose(got, expected, rtol=0, atol=tolerance):
            raise FoldingError(f"folding {len(pairs)} batch norms changed the model's {key!r} output by "
                               f"{float((got - expected).abs().max()):.3g} (tolerance {tolerance:.3g})")
    return folded, len(pairs)

"""Batch norms folded into convolutions for inference (modeling/fusion.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from panoptic_deeplab import build_model
from panoptic_deeplab.modeling.backbone import BACKBONE_PRESETS
from panoptic_deeplab.modeling.fusion import FoldingError, fold_batch_norms
from panoptic_deeplab.modeling.random_weights import randomize_weights


def _batch_norms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


# timm's presets, and the references' own encoders that the converters build.
ENCODERS = [(name, {}) for name in sorted(BACKBONE_PRESETS)] + [
    ("dl2_mobilenetv3_large", {}), ("dl2_resnet50", {}), ("bc_xception65", {"output_stride": 32})]


@pytest.mark.parametrize(("backbone", "overrides"), ENCODERS, ids=[name for name, _ in ENCODERS])
def test_every_encoder_folds_every_batch_norm_and_computes_the_same(tiny_config, backbone: str, overrides) -> None:
    torch.manual_seed(0)
    model = randomize_weights(build_model(tiny_config(backbone=backbone, **overrides))).eval()
    count = _batch_norms(model)
    folded, folded_count = fold_batch_norms(model, torch.rand(1, 3, 65, 65))
    # Every batch norm follows a convolution: none is left; the original keeps its own.
    assert folded_count == count > 0 and _batch_norms(folded) == 0 and _batch_norms(model) == count
    # A folded model copies and saves like any other; its batch norms are gone from the state dict.
    folded = copy.deepcopy(folded)
    assert not any(key.endswith("running_mean") for key in folded.state_dict())
    images = torch.rand(2, 3, 97, 129)
    with torch.no_grad():
        expected, got = model(images), folded(images)
    for key in expected:
        # Float rounding only, amplified by random deep weights.
        torch.testing.assert_close(got[key], expected[key], rtol=1e-3, atol=1e-3 * float(expected[key].abs().max()))


class _ConvReadTwice(nn.Module):
    """A conv whose output feeds its batch norm and also the result: folding would change the second use."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        with torch.no_grad():
            self.bn.running_var.fill_(4.0)
            self.bn.running_mean.fill_(0.5)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        y = self.conv(x)
        return {"semantic": self.bn(y) + y}


def test_a_conv_read_elsewhere_is_refused_and_the_model_kept() -> None:
    model = _ConvReadTwice().eval()
    weight = model.conv.weight.clone()
    with pytest.raises(FoldingError, match=r"^folding 1 batch norms changed the model's 'semantic' output by "):
        fold_batch_norms(model, torch.rand(1, 3, 8, 8))
    assert torch.equal(model.conv.weight, weight) and isinstance(model.bn, nn.BatchNorm2d)
    with pytest.raises(ValueError, match=r"^fold_batch_norms needs a model in eval mode"):
        fold_batch_norms(model.train(), torch.rand(1, 3, 8, 8))

"""The protobuf text-format reader used for deeplab2 configs (``--config``)."""

from __future__ import annotations

import pytest

from panoptic_deeplab.convert.deeplab2 import facts_from_textproto
from panoptic_deeplab.convert.textproto import TextprotoError, field, read_textproto

# The shape of deeplab2's configs: nested messages, repeated scalars and messages, comments, quoted strings.
CONFIG = """
# comment line
experiment_name: "${EXPERIMENT_NAME}"
model_options {
  backbone {
    name: "mobilenet_v3_small"   # trailing comment
    use_squeeze_and_excite: true
    output_stride: 32
  }
  decoder { atrous_rates: 3 atrous_rates: 6 atrous_rates: 9 }
  panoptic_deeplab {
    low_level { feature_key: "res3" channels_project: 64 }
    low_level: { feature_key: 'res2', channels_project: 32 }
  }
}
trainer_options { solver_options { base_learning_rate: 4e-4 batchnorm_epsilon: 0.0001 } }
evaluator_options { nms_kernel: 11 stuff_area_limit: 4096 center_score_threshold: -0.5 }
"""


def test_nested_repeated_and_scalars(tmp_path) -> None:
    path = tmp_path / "c.textproto"
    path.write_text(CONFIG)
    fields = read_textproto(path)
    assert field(fields, "experiment_name") == "${EXPERIMENT_NAME}"
    assert field(fields, "model_options.backbone.use_squeeze_and_excite") is True
    assert field(fields, "model_options.decoder")["atrous_rates"] == [3, 6, 9]
    low = field(fields, "model_options.panoptic_deeplab")["low_level"]
    assert [(m["feature_key"], m["channels_project"]) for m in low] == [(["res3"], [64]), (["res2"], [32])]
    assert field(fields, "trainer_options.solver_options.base_learning_rate") == pytest.approx(4e-4)
    assert field(fields, "evaluator_options.center_score_threshold") == -0.5
    assert field(fields, "model_options.missing.part", "default") == "default"

    facts = facts_from_textproto(path)
    assert (facts.output_stride, facts.bn_eps, facts.aspp_rates) == (32, 1e-4, (3, 6, 9))
    # set fields win, the .proto defaults fill the rest (keep_k_centers 400)
    assert (facts.nms_kernel, facts.stuff_area, facts.top_k, facts.center_threshold) == (11, 4096, 400, -0.5)


@pytest.mark.parametrize("text, match", [
    ("model_options { backbone { name: 'x' }", r"is not closed with '\}'"),
    ("a: 1 }", r"expected a field name, found '\}'"),
    ("a: 1\nb: @", r"c.textproto:2: cannot parse"),
    ("a:", r"field a has no value"),
])
def test_syntax_errors_name_the_file(tmp_path, text, match) -> None:
    path = tmp_path / "c.textproto"
    path.write_text(text)
    with pytest.raises(TextprotoError, match=match):
        read_textproto(path)


def test_unsupported_backbone_and_missing_file(tmp_path) -> None:
    path = tmp_path / "sac.textproto"
    path.write_text('model_options { backbone { name: "axial_deeplab_l" } decoder { atrous_rates: 3 } }')
    with pytest.raises(ValueError, match=r"backbone 'axial_deeplab_l' is not supported \(MobileNetV3-Small, "
                                         r"MobileNetV3-Large, ResNet-50, ResNet-50-Beta, Wide-ResNet-41, "
                                         r"SWideRNet-SAC-\(1, 1, 1\)"):
        facts_from_textproto(path)
    path.write_text('model_options { backbone { name: "resnet50" } decoder { atrous_rates: 3 } }')
    with pytest.raises(ValueError, match=r"sac.textproto: model_options.decoder needs three atrous_rates, found \[3\]"):
        facts_from_textproto(path)
    path.write_text('model_options { backbone { name: "resnet50_beta" } decoder { atrous_rates: 3 atrous_rates: 6 '
                    'atrous_rates: 9 } }')
    facts = facts_from_textproto(path)  # model.proto's default output stride 32, trainer.proto's epsilon 1e-3
    assert (facts.backbone, facts.output_stride, facts.bn_eps, facts.aspp_rates) == ("resnet50_beta", 32, 1e-3, (3, 6, 9))
    with pytest.raises(ValueError, match=r"config .*nothing.textproto does not exist"):
        facts_from_textproto(tmp_path / "nothing.textproto")

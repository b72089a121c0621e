"""deeplab2 converter on checkpoints in deeplab2's layout with random weights, against an independent forward pass.

The checkpoints are written by ``tf_bundle.py`` (the tensor-bundle format; the reader is checked on TensorFlow's
own files in ``test_deeplab2.py``), with Adam slots and bookkeeping beside the model as ``train_lib.py`` saves
them, and packed as deeplab2 publishes them (a ``.tar.gz`` of one folder).
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from panoptic_deeplab.convert import convert_checkpoint
from panoptic_deeplab.inference.predictor import Predictor

from reference_dl2 import dl2_forward, dl2_tensors
from tf_bundle import write_tf_checkpoint

PUBLISHED_WIDTHS = dict(semantic_aspp=256, semantic_decoder=256, semantic_low=(64, 32), semantic_head=256,
                        instance_aspp=256, instance_decoder=128, instance_low=(32, 16), instance_head=32)
NARROW_WIDTHS = dict(semantic_aspp=24, semantic_decoder=40, semantic_low=(16, 8), semantic_head=32,
                     instance_aspp=16, instance_decoder=24, instance_low=(12, 8), instance_head=8)


def _archive(folder: Path, name: str, tensors: dict[str, np.ndarray]) -> Path:
    """``name``: a .tar.gz of ``ckpt/ckpt-1000.{index,data-*}`` with optimizer state beside the model."""
    extra = {"global_step/.ATTRIBUTES/VARIABLE_VALUE": np.array(1000, np.int64),
             "save_counter/.ATTRIBUTES/VARIABLE_VALUE": np.array(1, np.int64),
             "optimizer/iter/.ATTRIBUTES/VARIABLE_VALUE": np.array(1000, np.int64)}
    for key in list(tensors)[:20]:
        path = key.removesuffix("/.ATTRIBUTES/VARIABLE_VALUE")
        extra[f"{path}/.OPTIMIZER_SLOT/optimizer/m/.ATTRIBUTES/VARIABLE_VALUE"] = np.zeros_like(tensors[key])
    write_tf_checkpoint(folder / "ckpt" / "ckpt-1000", {**tensors, **extra})
    archive = folder / name
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder / "ckpt", arcname="ckpt")
    return archive


@pytest.mark.parametrize(
    "variant, output_stride, widths, name",
    [
        # the published file name tells the config (os16, BN epsilon 1e-5, rates 6/12/18)
        ("large", 16, PUBLISHED_WIDTHS, "mobilenet_v3_large_os16_panoptic_deeplab_cityscapes_dwo.tar.gz"),
        ("small", 16, NARROW_WIDTHS, "my_mnv3s_os16.tar.gz"),
        ("large", 32, NARROW_WIDTHS, "my_mnv3l_os32.tar.gz"),
    ],
)
def test_dl2_outputs_equal_reference(tmp_path, variant, output_stride, widths, name) -> None:
    tensors = dl2_tensors(variant, output_stride, 19, widths, seed=output_stride + len(variant))
    archive = _archive(tmp_path, name, tensors)
    published = name.startswith("mobilenet_v3_")
    converted = convert_checkpoint("dl2", archive, tmp_path / "out.pt", progress=False,
                                   output_stride=None if published else output_stride)
    model_cfg = converted.config.model
    assert model_cfg.backbone == f"dl2_mobilenetv3_{variant}" and model_cfg.output_stride == output_stride
    eps = 1e-5 if output_stride == 16 else 1e-3
    rates = (6, 12, 18) if output_stride == 16 else (3, 6, 9)
    assert model_cfg.bn_eps == eps and tuple(model_cfg.aspp_rates) == rates

    image = np.random.default_rng(1).integers(0, 256, (129, 161, 3), dtype=np.uint8)
    ours = Predictor.from_checkpoint(converted.path, device="cpu").raw_outputs(
        [torch.from_numpy(image).permute(2, 0, 1).float() / 255])[0]
    theirs = dl2_forward(tensors, image.astype(np.float64), variant, output_stride, rates, eps)
    for key in ("semantic", "center", "offset"):
        assert ours[key].shape == theirs[key].shape, key
        error = float((ours[key] - theirs[key]).abs().max() / theirs[key].std())
        assert error < 1e-4, (key, error)


def test_config_textproto_sets_what_the_checkpoint_does_not_record(tmp_path) -> None:
    """``convert --config`` (the CLI): output stride, BN epsilon, rates and post-processing from the .textproto."""
    import subprocess
    import sys

    tensors = dl2_tensors("small", 16, 19, NARROW_WIDTHS, seed=3)
    archive = _archive(tmp_path, "ckpt.tar.gz", tensors)
    config = tmp_path / "my.textproto"
    config.write_text('model_options { backbone { name: "mobilenet_v3_small" output_stride: 16 }\n'
                      '  decoder { atrous_rates: 2 atrous_rates: 4 atrous_rates: 6 } }\n'
                      'trainer_options { solver_options { batchnorm_epsilon: 0.0001 } }\n'
                      'evaluator_options { nms_kernel: 9 keep_k_centers: 100 stuff_area_limit: 512 }\n')
    out = tmp_path / "out.pt"
    result = subprocess.run([sys.executable, "-m", "panoptic_deeplab.cli", "convert", "--from", "dl2", "--input",
                             str(archive), "--config", str(config), "--output", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    saved = torch.load(out, weights_only=True)["config"]
    assert saved["model"]["output_stride"] == 16 and saved["model"]["bn_eps"] == pytest.approx(1e-4)
    assert list(saved["model"]["aspp_rates"]) == [2, 4, 6]
    assert (saved["postprocess"]["nms_kernel"], saved["postprocess"]["top_k"], saved["postprocess"]["stuff_area"]) \
        == (9, 100, 512)
    image = np.random.default_rng(2).integers(0, 256, (65, 97, 3), dtype=np.uint8)
    ours = Predictor.from_checkpoint(out, device="cpu").raw_outputs(
        [torch.from_numpy(image).permute(2, 0, 1).float() / 255])[0]
    theirs = dl2_forward(tensors, image.astype(np.float64), "small", 16, (2, 4, 6), 1e-4)
    assert float((ours["semantic"] - theirs["semantic"]).abs().max() / theirs["semantic"].std()) < 1e-4


def _prefix_of(tmp_path: Path, tensors: dict[str, np.ndarray]) -> Path:
    write_tf_checkpoint(tmp_path / "ckpt" / "ckpt-7", tensors)
    return tmp_path / "ckpt" / "ckpt-7"


@pytest.mark.parametrize("damage, match", [
    ("drop_semantic", r"is not a deeplab2 Panoptic-DeepLab checkpoint \(no semantic_last_layer\)"),
    ("drop_instance", r"is a deeplab2 checkpoint without instance heads \(a semantic-only DeepLab\)"),
    ("drop_block", r"unsupported encoder \(12 MobileNet blocks, parts \['_blocks'\]\); supported: MobileNetV3-Small"),
    ("head_widths", r"center head 8 and offset head 12 channels differ"),
])
def test_dl2_checkpoints_that_do_not_fit(tmp_path, damage, match) -> None:
    from panoptic_deeplab.convert import ConversionError

    tensors = dl2_tensors("small", 32, 19, NARROW_WIDTHS, seed=5)
    if damage == "drop_semantic":
        tensors = {k: v for k, v in tensors.items() if not k.startswith("semantic_last_layer/")}
    elif damage == "drop_instance":
        tensors = {k: v for k, v in tensors.items() if not k.startswith("instance_center_head_last_layer/")}
    elif damage == "drop_block":
        tensors = {k: v for k, v in tensors.items() if not k.startswith("encoder/_blocks/12/")}
    else:
        name = "instance_regression_head_without_last_layer/_conv1_bn_act/_pointwise/_conv/kernel/.ATTRIBUTES/VARIABLE_VALUE"
        tensors[name] = np.zeros((1, 1, 24, 12), np.float32)
    out = tmp_path / "out.pt"
    with pytest.raises(ConversionError, match=match):
        convert_checkpoint("dl2", _prefix_of(tmp_path, tensors), out, output_stride=32, progress=False)
    assert not out.exists()


def test_dl2_truncated_data_shard(tmp_path) -> None:
    from panoptic_deeplab.convert import ConversionError

    prefix = _prefix_of(tmp_path, dl2_tensors("small", 32, 19, NARROW_WIDTHS, seed=6))
    data = prefix.with_name("ckpt-7.data-00000-of-00001")
    data.write_bytes(data.read_bytes()[:-1000])
    with pytest.raises(ConversionError, match=r"ckpt-7.data-00000-of-00001: tensor .* needs \d+ bytes at offset \d+, "
                                              r"found \d+ \(truncated file\?\)"):
        convert_checkpoint("dl2", prefix, tmp_path / "out.pt", output_stride=32, progress=False)


def test_dl2_options_that_contradict(tmp_path) -> None:
    from panoptic_deeplab.convert import ConversionError

    prefix = _prefix_of(tmp_path, dl2_tensors("small", 32, 19, NARROW_WIDTHS, seed=7))
    config = tmp_path / "c.textproto"
    config.write_text('model_options { backbone { name: "mobilenet_v3_small" output_stride: 32 }\n'
                      '  decoder { atrous_rates: 3 atrous_rates: 6 atrous_rates: 9 } }\n')
    with pytest.raises(ConversionError, match=r"--output-stride 16 contradicts .*c.textproto \(32\)"):
        convert_checkpoint("dl2", prefix, tmp_path / "o.pt", output_stride=16, config=config, progress=False)
    with pytest.raises(ConversionError, match=r"deeplab2's MobileNetV3 configs use output stride 16 or 32, not 8"):
        convert_checkpoint("dl2", prefix, tmp_path / "o.pt", output_stride=8, progress=False)
    with pytest.raises(ConversionError, match=r"config \(a .textproto\) applies to --from dl2 only"):
        convert_checkpoint("bc", prefix, tmp_path / "o.pt", config=config, progress=False)
    with pytest.raises(ConversionError, match=r"ckpt is a directory, not a detectron2 checkpoint file: it holds a "
                                              r"TensorFlow checkpoint \(\*.index\), use --from dl2"):
        convert_checkpoint("d2", prefix.parent, tmp_path / "o.pt", progress=False)


def test_dl2_backbone_has_no_imagenet_weights() -> None:
    from panoptic_deeplab.modeling.backbone import Backbone

    with pytest.raises(ValueError, match=r"backbone 'dl2_mobilenetv3_small' has no ImageNet weights of its own: start "
                                         r"from a converted deeplab2 checkpoint"):
        Backbone("dl2_mobilenetv3_small", 32, pretrained=True)

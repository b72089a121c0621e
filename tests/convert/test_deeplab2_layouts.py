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
    """``name``: a .tar.gz of ``ckpt/ckpt-1000.{index,data-*}`` with optimizer state beside the model; a name
    without the suffix: the folder itself (as the archive unpacks; faster for big models)."""
    extra = {"global_step/.ATTRIBUTES/VARIABLE_VALUE": np.array(1000, np.int64),
             "save_counter/.ATTRIBUTES/VARIABLE_VALUE": np.array(1, np.int64),
             "optimizer/iter/.ATTRIBUTES/VARIABLE_VALUE": np.array(1000, np.int64)}
    for key in list(tensors)[:20]:
        path = key.removesuffix("/.ATTRIBUTES/VARIABLE_VALUE")
        extra[f"{path}/.OPTIMIZER_SLOT/optimizer/m/.ATTRIBUTES/VARIABLE_VALUE"] = np.zeros_like(tensors[key])
    if not name.endswith(".tar.gz"):
        write_tf_checkpoint(folder / name / "ckpt-1000", {**tensors, **extra})
        return folder / name
    write_tf_checkpoint(folder / "ckpt" / "ckpt-1000", {**tensors, **extra})
    archive = folder / name
    with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
        tar.add(folder / "ckpt", arcname="ckpt")
    return archive


@pytest.mark.parametrize(
    "variant, output_stride, widths, name",
    [
        # the published file name tells the config (os16, BN epsilon 1e-5, rates 6/12/18)
        ("large", 16, PUBLISHED_WIDTHS, "mobilenet_v3_large_os16_panoptic_deeplab_cityscapes_dwo.tar.gz"),
        ("small", 16, NARROW_WIDTHS, "my_mnv3s_os16.tar.gz"),
        ("large", 32, NARROW_WIDTHS, "my_mnv3l_os32.tar.gz"),
        # deeplab2's residual encoders: 7x7 stem, Inception stem, Wide-ResNet's basic blocks; no max-pool. Folders
        # named as the published archives tell the config as the archives do.
        ("resnet50", 32, NARROW_WIDTHS, "resnet50_os32_panoptic_deeplab_cityscapes_trainfine"),
        ("resnet50_beta", 16, NARROW_WIDTHS, "my_r50beta_os16"),
        ("wide_resnet41", 16, NARROW_WIDTHS, "wide_resnet41_os16_panoptic_deeplab_cityscapes_trainfine"),
        ("swidernet_sac_1_1_1", 16, NARROW_WIDTHS, "swidernet_sac_1_1_1_os16_panoptic_deeplab_cityscapes_trainfine"),
    ],
)
def test_dl2_outputs_equal_reference(tmp_path, variant, output_stride, widths, name) -> None:
    tensors = dl2_tensors(variant, output_stride, 19, widths, seed=output_stride + len(variant))
    archive = _archive(tmp_path, name, tensors)
    published = not name.startswith("my_")
    rates = (6, 12, 18) if output_stride == 16 else (3, 6, 9)
    converted = convert_checkpoint("dl2", archive, tmp_path / "out.pt", progress=False,
                                   output_stride=None if published else output_stride)
    model_cfg = converted.config.model
    ours_name = f"dl2_mobilenetv3_{variant}" if variant in ("small", "large") else f"dl2_{variant}"
    assert model_cfg.backbone == ours_name and model_cfg.output_stride == output_stride
    eps = 1e-5 if output_stride == 16 and variant in ("small", "large") else 1e-3
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
    ("drop_block", r"unsupported encoder \(12 MobileNet blocks\); supported: MobileNetV3-Small, MobileNetV3-Large, "
                   r"ResNet-50, ResNet-50-Beta, Wide-ResNet-41, SWideRNet-SAC-\(1, 1, 1\)"),
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


@pytest.fixture(scope="module")
def resnet50_tensors() -> dict[str, np.ndarray]:
    return dl2_tensors("resnet50", 32, 19, NARROW_WIDTHS, seed=8)


@pytest.mark.parametrize("damage, match", [
    # use_squeeze_and_excite: true adds a SimplifiedSqueezeAndExcite to every block
    ("squeeze_excite", r"its residual encoder has layers \['_squeeze_and_excite'\] \(squeeze-and-excite or axial "
                       r"attention\), which are not rebuilt"),
    # backbone_layer_multiplier != 1 changes the number of blocks
    ("fewer_blocks", r"a ResNet-50-like encoder with \(3, 4, 5, 3\) blocks per stage, not \(3, 4, 6, 3\)"),
    ("other_config", r"other.textproto is a config of backbone 'mobilenet_v3_small', but the checkpoint holds a "
                     r"ResNet-50 \('resnet50'\)"),
    ("output_stride_8", r"deeplab2's residual configs use output stride 16 or 32, not 8: give --config"),
])
def test_dl2_residual_checkpoints_that_do_not_fit(tmp_path, resnet50_tensors, damage, match) -> None:
    from panoptic_deeplab.convert import ConversionError

    tensors, options = dict(resnet50_tensors), dict(output_stride=32)
    if damage == "squeeze_excite":
        se = "encoder/_stage2/_block1/_squeeze_and_excite/_se_conv/"  # SimplifiedSqueezeAndExcite
        tensors[se + "kernel/.ATTRIBUTES/VARIABLE_VALUE"] = np.zeros((1, 1, 256, 256), np.float32)
        tensors[se + "bias/.ATTRIBUTES/VARIABLE_VALUE"] = np.zeros(256, np.float32)
    elif damage == "fewer_blocks":
        tensors = {k: v for k, v in tensors.items() if not k.startswith("encoder/_stage4/_block6/")}
    elif damage == "other_config":
        config = tmp_path / "other.textproto"
        config.write_text('model_options { backbone { name: "mobilenet_v3_small" output_stride: 32 }\n'
                          '  decoder { atrous_rates: 3 atrous_rates: 6 atrous_rates: 9 } }\n')
        options = dict(config=config)
    else:
        options = dict(output_stride=8)
    out = tmp_path / "out.pt"
    with pytest.raises(ConversionError, match=match):
        convert_checkpoint("dl2", _prefix_of(tmp_path, tensors), out, progress=False, **options)
    assert not out.exists()


@pytest.mark.parametrize("variant", ["resnet50", "resnet50_beta", "wide_resnet41", "swidernet_sac_1_1_1"])
def test_dl2_residual_encoders_at_output_stride_8(variant) -> None:
    """No published config uses os8, but its atrous rule is deeplab2's (a basic block's second conv already at the
    stage's final rate): the encoder's endpoints against the reference's."""
    from panoptic_deeplab.convert.deeplab2 import key_map
    from panoptic_deeplab.modeling.dl2_resnet import DeepLab2ResNet

    from reference_dl2 import VALUE, reference_endpoints

    tensors = {k: v for k, v in dl2_tensors(variant, 8, 19, NARROW_WIDTHS, seed=9).items() if k.startswith("encoder/")}
    encoder = DeepLab2ResNet(variant, output_stride=8, bn_eps=1e-3).eval()
    holder = torch.nn.Module()
    holder.backbone = torch.nn.Module()
    holder.backbone.body = encoder
    entries = key_map(holder, {}).entries
    state = {ours.removeprefix("backbone.body."): torch.from_numpy(tensors[theirs + VALUE]) if transform is None
             else transform(torch.from_numpy(tensors[theirs + VALUE])) for ours, (theirs, transform) in entries.items()
             if ours.startswith("backbone.body.")}
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith(".num_batches_tracked") for k in missing)
    image = np.random.default_rng(3).integers(0, 256, (49, 67, 3), dtype=np.uint8)
    with torch.no_grad():
        ours = encoder(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1)
    theirs = reference_endpoints(tensors, image.astype(np.float64), variant, 8, 1e-3)
    for key, mine in zip(("res2", "res3", "res4", "res5"), ours):
        reference = theirs[key].permute(0, 3, 1, 2).float()
        assert mine.shape == reference.shape, key
        assert float((mine - reference).abs().max() / reference.std()) < 1e-4, key


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


def test_dl2_published_name_of_another_model(tmp_path) -> None:
    """A ckpt-N prefix in a folder named as a published archive takes that archive's facts, checked against the
    encoder found."""
    from panoptic_deeplab.convert import ConversionError

    folder = tmp_path / "resnet50_os32_panoptic_deeplab_cityscapes_trainfine"
    write_tf_checkpoint(folder / "ckpt-7", dl2_tensors("small", 32, 19, NARROW_WIDTHS, seed=10))
    with pytest.raises(ConversionError, match=r"resnet50_os32_panoptic_deeplab_cityscapes_trainfine is named as "
                                              r"deeplab2's published resnet50 checkpoint, but it holds a "
                                              r"MobileNetV3-Small: give --config or --output-stride"):
        convert_checkpoint("dl2", folder / "ckpt-7", tmp_path / "o.pt", progress=False)


def _fit(height: int, width: int, size: int) -> tuple[int, int]:
    """deeplab2's resize_to_range with min = max = size: up until both sides reach it, then down to fit; sides
    floored in float32 (preprocess_utils._scale_dim)."""
    def scale(h: int, w: int, factor: float) -> tuple[int, int]:
        f = np.float32(factor)
        return int(np.floor(np.float32(h) * f)), int(np.floor(np.float32(w) * f))

    h, w = scale(height, width, max(size / height, size / width))
    return scale(h, w, min(np.float32(min(size / h, size / w)), np.float32(1.0)))


def test_dl2_coco_head_void_channel_and_eval_resizing(tmp_path) -> None:
    """A COCO model (134 channels, void first) with a config that resizes eval images as deeplab2's COCO configs do
    (crop 161 here, 641 there): the image is resized to fit, padded with the mean pixel to the crop, run, cropped
    and resized back; against the reference run on deeplab2's padded input."""
    from reference_dl2 import VALUE, _resize

    tensors = dl2_tensors("resnet50", 16, 134, NARROW_WIDTHS, seed=11)
    height, width = 97, 130
    image = np.random.default_rng(4).integers(0, 256, (height, width, 3), dtype=np.uint8)
    fitted = _fit(height, width, 161)
    assert fitted == (120, 161)
    resized = _resize(torch.from_numpy(image).double()[None], *fitted)[0].numpy()
    padded = np.full((161, 161, 3), 127.5)  # _pad_image_and_label: the mean pixel, 0 after x / 127.5 - 1
    padded[: fitted[0], : fitted[1]] = resized
    # A constant void logit at the median of the best class logit: void wins on about half the image.
    tensors["semantic_last_layer/kernel" + VALUE][..., 0] = 0
    theirs = dl2_forward(tensors, padded, "resnet50", 16, (6, 12, 18), 1e-3)
    void_logit = float(theirs["semantic"][:, 1:, : fitted[0], : fitted[1]].max(dim=1).values.median())
    tensors["semantic_last_layer/bias" + VALUE][0] = void_logit
    theirs["semantic"][:, 0] = void_logit
    folder = _archive(tmp_path, "my_coco_r50_os16", tensors)
    config = tmp_path / "coco.textproto"
    config.write_text('model_options { backbone { name: "resnet50" output_stride: 16 }\n'
                      '  decoder { atrous_rates: 6 atrous_rates: 12 atrous_rates: 18 } }\n'
                      'eval_dataset_options { crop_size: 161 crop_size: 161 min_resize_value: 161\n'
                      '  max_resize_value: 161 }\n'
                      'evaluator_options { nms_kernel: 41 stuff_area_limit: 4096 }\n')
    converted = convert_checkpoint("dl2", folder, tmp_path / "out.pt", config=config, progress=False)
    model_cfg = converted.config.model
    assert converted.meta.num_classes == 133 and model_cfg.num_classes == 133 and model_cfg.semantic_void_channel
    assert tuple(model_cfg.inference_size) == (161, 161)
    assert (converted.config.postprocess.nms_kernel, converted.config.postprocess.stuff_area) == (41, 4096)

    predictor = Predictor.from_checkpoint(converted.path, device="cpu")
    ours = predictor.raw_outputs([torch.from_numpy(image).permute(2, 0, 1).float() / 255])[0]
    for key in ("semantic", "center", "offset"):
        cropped = theirs[key][:, :, : fitted[0], : fitted[1]].permute(0, 2, 3, 1).double()
        if key == "offset":  # resize_outputs: back to the image's pixels
            cropped = cropped * torch.tensor([(height - 1) / (fitted[0] - 1), (width - 1) / (fitted[1] - 1)])
        reference = _resize(cropped, height, width).permute(0, 3, 1, 2).float()
        assert ours[key].shape == reference.shape, key
        error = float((ours[key] - reference).abs().max() / reference.std())
        assert error < 1e-4, (key, error)
    assert ours["semantic"].shape[1] == 134
    result = predictor.predict(image)
    void = ours["semantic"][0].argmax(0).numpy() == 0
    assert 0.2 < void.mean() < 0.8 and (result.semantic[void] == 255).all() and (result.semantic[~void] < 133).all()
    assert (result.label_map[void] == converted.meta.void_label).all()


def test_dl2_published_coco_names_tell_its_config(tmp_path) -> None:
    tensors = dl2_tensors("resnet50_beta", 32, 134, NARROW_WIDTHS, seed=12)
    folder = _archive(tmp_path, "resnet50beta_os32_panoptic_deeplab_coco_train", tensors)
    converted = convert_checkpoint("dl2", folder, tmp_path / "out.pt", progress=False)
    model_cfg, post = converted.config.model, converted.config.postprocess
    assert converted.architecture == "deeplab2 ResNet-50-Beta" and model_cfg.output_stride == 32
    assert model_cfg.semantic_void_channel and tuple(model_cfg.inference_size) == (641, 641)
    assert (post.nms_kernel, post.stuff_area, post.top_k, tuple(model_cfg.aspp_rates)) == (41, 4096, 400, (3, 6, 9))
    from panoptic_deeplab.convert import ConversionError

    renamed = folder.rename(tmp_path / "resnet50_beta_os32_panoptic_deeplab_cityscapes_trainfine")
    with pytest.raises(ConversionError, match=r"named as a deeplab2 Cityscapes checkpoint, but its semantic head is "
                                              r"COCO: give --config or --output-stride"):
        convert_checkpoint("dl2", renamed, tmp_path / "o.pt", progress=False)
    assert convert_checkpoint("dl2", renamed, tmp_path / "o.pt", output_stride=32, progress=False) \
        .config.model.inference_size == (641, 641)


@pytest.mark.parametrize("layers, blocks", [("1", (3, 3, 6, 3, 3)), ("3", (3, 9, 18, 9, 9)), ("4.5", (3, 13, 27, 13, 13))])
def test_dl2_swidernet_variants_told_by_their_blocks(layers, blocks) -> None:
    """SWideRNet-SAC-(1, 1, l): int(n * l) blocks per stage after _stage1 (utils.scale_int_list), SAC in _stage5."""
    import torch as t

    from panoptic_deeplab.convert.deeplab2 import ConversionError, _encoder
    from panoptic_deeplab.modeling.dl2_resnet import DL2_RESNET_SPECS

    assert DL2_RESNET_SPECS[f"swidernet_sac_1_1_{layers}"].num_blocks == blocks
    state = {"encoder/_stem/_conv/kernel": t.zeros(3, 3, 3, 64)}
    for stage, count in enumerate(blocks, start=1):
        for block in range(1, count + 1):
            state[f"encoder/_stage{stage}/_block{block}/_conv1_bn_act/_conv/kernel"] = t.zeros(1)
    state["encoder/_stage5/_block2/_conv2_bn_act/_conv/_switch/kernel"] = t.zeros(1)
    assert _encoder(state) == f"dl2_swidernet_sac_1_1_{layers}"
    state["encoder/_stage4/_block1/_conv1_bn_act/_pre_global_context/convolution/kernel"] = t.zeros(1)
    with pytest.raises(ConversionError, match=r"switchable atrous convolution in \['_stage4', '_stage5'\]; the "
                                              r"SWideRNet-SAC configs \(use_sac_beyond_stride 32\) have it in _stage5"):
        _encoder(state)

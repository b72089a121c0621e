import dataclasses

import pytest
import yaml

from panoptic_deeplab.config import (
    BASE_KEY,
    Config,
    ConfigError,
    available_presets,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)
from panoptic_deeplab.data.metadata import dataset_meta
from panoptic_deeplab.data.synthetic import synthetic_meta


def test_defaults_without_a_file():
    assert load_config(None) == Config()


@pytest.mark.parametrize("name", ["synthetic_mnv3", "cityscapes_r50", "cityscapes_x71", "cityscapes_mnv3", "coco_r50"])
def test_every_required_preset_loads(name):
    assert name in available_presets()
    cfg = load_config(name)
    assert isinstance(cfg.data.crop_size, tuple) and all(isinstance(v, int) for v in cfg.data.crop_size)
    assert cfg.data.train.json and cfg.data.val.json


def test_all_presets_load():
    for name in available_presets():
        load_config(name)


def test_preset_values_follow_the_recipes():
    synthetic = load_config("synthetic_mnv3")
    assert synthetic.model.num_classes == synthetic_meta().num_classes
    assert synthetic.model.pretrained is False and synthetic.model.backbone == "mobilenetv3_large"
    assert synthetic.data.train.json == "data/synthetic/train/panoptic_train.json"
    city = load_config("cityscapes_x71")  # inherits cityscapes_r50 through _base_
    assert city.model.backbone == "xception71" and city.model.num_classes == 19
    assert city.data.crop_size == (1025, 2049) and city.solver.max_iter == 60000 and city.solver.lr == 1e-3
    assert city.postprocess.stuff_area == 2048
    assert city.data.train.json == "data/cityscapes/gtFine/cityscapes_panoptic_train_trainId.json"
    coco = load_config("coco_r50")
    assert coco.data.crop_size == (641, 641) and coco.model.num_classes == 133 and coco.solver.lr == 5e-4
    assert coco.solver.max_iter == 200000 and coco.postprocess.nms_kernel == 41 and coco.postprocess.stuff_area == 4096
    mapillary = load_config("mapillary_r50")
    assert mapillary.model.num_classes == dataset_meta("mapillary_vistas").num_classes == 65
    assert mapillary.data.crop_size == (1025, 1025) and mapillary.model.backbone == "resnet50"


def test_overrides_are_parsed_and_coerced():
    cfg = load_config(
        "synthetic_mnv3",
        [
            "solver.lr=5e-4",  # PyYAML reads this as a string: coerced to float
            "data.crop_size=[129, 257]",
            "model.pretrained=false",
            "solver.max_iter=6e4",
            "solver.clip_grad_norm=1",
            "model.aspp_rates=[3, 6, 9]",
            "train.output_dir=1.10",
            "data.train={json: a.json, images: imgs}",
        ],
    )
    assert cfg.solver.lr == 5e-4 and isinstance(cfg.solver.lr, float)
    assert cfg.data.crop_size == (129, 257)
    assert cfg.model.pretrained is False
    assert cfg.solver.max_iter == 60000 and isinstance(cfg.solver.max_iter, int)
    assert cfg.solver.clip_grad_norm == 1.0 and isinstance(cfg.solver.clip_grad_norm, float)
    assert cfg.model.aspp_rates == (3, 6, 9)
    assert cfg.train.output_dir == "1.10"
    assert cfg.data.train.json == "a.json" and cfg.data.train.images == "imgs"
    assert cfg.data.train.panoptic == "data/synthetic/train/panoptic"  # the rest of the section is kept
    assert load_config("synthetic_mnv3", ["solver.clip_grad_norm=null"]).solver.clip_grad_norm is None
    assert load_config(None, ["model.aspp_rates=none"]).model.aspp_rates is None


@pytest.mark.parametrize(
    "override, message",
    [
        ("solver.lrr=1", r"unknown key 'solver\.lrr' \(did you mean 'lr'\?\)"),
        ("sovler.lr=1", r"unknown key 'sovler' \(did you mean 'solver'\?\)"),
        ("solver.lr", "not of the form"),
        ("solver.lr=fast", r"solver\.lr: expected a number, got 'fast'"),
        ("data.crop_size=[1, 2, 3]", "a list of 2 values"),
        ("model.pretrained=1", "true or false"),
        ("solver.max_iter=1.5", "an integer"),
        ("solver.lr.x=1", "is a value, not a section"),
        ("solver=1", "is a section"),
        ("solver.amp=fp32", "solver.amp = 'fp32' is not one of"),
        ("data.max_scale=0.25", "smaller than data.min_scale"),
        ("postprocess.nms_kernel=8", "must be odd"),
    ],
)
def test_bad_overrides_are_clear_errors(override, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config("synthetic_mnv3", [override])
    if "unknown" in message or "expected" in message:
        assert repr(override) in str(info.value)  # names where it came from


def test_config_files_that_are_not_yaml_text(tmp_path):
    binary = tmp_path / "weights.yaml"
    binary.write_bytes(b"\x00\x01binary\xff")
    with pytest.raises(ValueError, match=rf"^config file {binary} is not a UTF-8 text \(YAML\) file: 'utf-8' codec"):
        load_config(str(binary))
    broken = tmp_path / "broken.yaml"
    broken.write_text("foo: [1, 2")
    with pytest.raises(ValueError, match=rf"^{broken} is not valid YAML: while parsing a flow sequence"):
        load_config(str(broken))
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match=rf"^{listed} must hold a mapping of sections, got list"):
        load_config(str(listed))


def test_yaml_file_with_base_and_unknown_key_errors(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("_base_: cityscapes_r50\nsolver:\n  lr: 2.5e-4\nmodel:\n  output_stride: 32\n")
    cfg = load_config(str(child))
    assert cfg.solver.lr == 2.5e-4 and cfg.model.output_stride == 32 and cfg.model.backbone == "resnet50"
    grandchild = tmp_path / "sub" / "grand.yml"
    grandchild.parent.mkdir()
    grandchild.write_text("_base_: ../child.yaml\ntrain:\n  seed: 5\n")
    cfg = load_config(str(grandchild))
    assert cfg.train.seed == 5 and cfg.solver.lr == 2.5e-4
    bad = tmp_path / "bad.yaml"
    bad.write_text("_base_: synthetic_mnv3\ndata:\n  crop_sise: [5, 5]\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key 'data\.crop_sise' \(did you mean 'crop_size'\?\)"):
        load_config(str(bad))
    bad.write_text("modle:\n  backbone: resnet50\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key 'modle' \(did you mean 'model'\?\)"):
        load_config(str(bad))
    bad.write_text("model: [1, 2]\n")
    with pytest.raises(ConfigError, match="is a section"):
        load_config(str(bad))
    bad.write_text("model:\n  num_classes: [3\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    bad.write_text("_base_: bad.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match=r"unknown preset 'cityscape_r50' \(did you mean 'cityscapes_r50'\?\)"):
        load_config("cityscape_r50")


def test_save_load_round_trip_is_exact(tmp_path):
    cfg = load_config(
        "coco_r50", ["solver.eps=1e-7", "model.aspp_rates=[6, 12, 18]", "solver.clip_grad_norm=0.1", "train.device=cuda:1"]
    )
    path = tmp_path / "out" / "config.yaml"
    save_config(cfg, path)
    assert load_config(str(path)) == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]  # no temporary file left
    data = yaml.safe_load(path.read_text())
    assert data["data"]["crop_size"] == [641, 641] and BASE_KEY not in data


def test_config_to_dict_is_plain():
    data = config_to_dict(Config())
    assert data["data"]["crop_size"] == [1025, 2049] and data["data"]["train"] == {"images": "", "json": "", "panoptic": ""}
    assert set(data) == {f.name for f in dataclasses.fields(Config)}

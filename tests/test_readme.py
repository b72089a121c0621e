"""Every command and code block of the README is exercised here, so the README cannot drift from the code.

Commands that need a real dataset or several GPUs (Cityscapes, torchrun on 8 GPUs) are parsed by the
real argument parser and their configs loaded; the walk-through "Train on your own data" and the Python
API run for real on a tiny synthetic dataset with a tiny model (extra ``key=value`` overrides appended).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_setup import TINY_MODEL_OVERRIDES

from panoptic_deeplab import cli
from panoptic_deeplab.config import load_config
from panoptic_deeplab.data.synthetic import make_synthetic_dataset, render_synthetic_image

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")

TINY_TRAINING = [
    *TINY_MODEL_OVERRIDES,
    "model.num_classes=7",  # the synthetic dataset's 7 categories stand in for the README's 2
    "data.crop_size=[65,129]",
    "data.batch_size=2",
    "solver.max_iter=2",
    "train.eval_period=2",
    "train.checkpoint_period=2",
    "postprocess.stuff_area=32",
]


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def _section(title: str) -> str:
    start = README.index(f"## {title}")
    end = README.find("\n## ", start + 1)
    return README[start : end if end != -1 else None]


def _commands(text: str) -> list[list[str]]:
    """Shell commands of the ```bash blocks in ``text``, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    return commands


def _cli_args(words: list[str]) -> list[str] | None:
    """The arguments handed to panoptic-deeplab's CLI by a README command, or None for other programs."""
    if words[0] == "panoptic-deeplab":
        return words[1:]
    if words[0] == "torchrun":
        return words[words.index("panoptic_deeplab.cli") + 1 :]
    if words[0] == "srun":  # SLURM's launcher in front of a command
        return _cli_args(words[1:])
    return None


def test_every_readme_command_is_known_and_parses() -> None:
    commands = _commands(README)
    assert commands[:2] == [["make", "demo"], ["make", "test"]], "the README must start with the two commands"
    makefile = (ROOT / "Makefile").read_text()
    parser = cli.build_parser()
    seen_verbs = set()
    for words in commands:
        args = _cli_args(words)
        if words[0] == "make":
            assert re.search(rf"^{words[1]}:", makefile, flags=re.M), words
        elif args is not None:
            parsed = parser.parse_args(args)
            seen_verbs.add(args[0])
            config = getattr(parsed, "config", None)
            if args[0] == "train" and not config.endswith(".yaml"):
                load_config(config, parsed.overrides)  # a preset: it must exist and accept the overrides
        else:
            # other programs the README names: torchrun's and cityscapesscripts' own entry points, a shell test
            # of train's exit status in the SLURM script
            assert words[0] in {"tensorboard", "pip", "["} or words[0].startswith("CITYSCAPES_DATASET="), words
    # commands quoted inline (`panoptic-deeplab ...`) parse too
    for inline in re.findall(r"`(panoptic-deeplab [^`]+)`", README):
        args = shlex.split(inline)[1:]
        if args[0] != "VERB":  # the generic `panoptic-deeplab VERB --help`
            parser.parse_args(args)
            seen_verbs.add(args[0])
    assert seen_verbs >= {"validate", "train", "evaluate", "predict", "make-synthetic"}
    # the command-line table lists exactly the verbs the CLI has
    table_verbs = set(re.findall(r"^\| `([a-z-]+)` \|", _section("Command line"), flags=re.M))
    assert table_verbs == {verb for verb, _, _ in cli.COMMANDS}


def test_readme_dataset_presets_exist() -> None:
    presets = set(re.findall(r"`((?:cityscapes|coco|synthetic|mapillary)_[a-z0-9]+)`", README))
    assert presets >= {"cityscapes_r50", "cityscapes_x71", "cityscapes_mnv3", "coco_r50", "synthetic_mnv3",
                       "mapillary_r50"}
    for preset in presets:
        load_config(preset)


def _raw_labels(root: Path, split: str, count: int, form: str) -> None:
    """``root/<split>``: synthetic images and their labels as the README's road / car maps in ``form``."""
    (root / split / "images").mkdir(parents=True)
    folders = ("semantic", "instance") if form == "semantic-instance" else ("labels",)
    for folder in folders:
        (root / split / folder).mkdir()
    for index in range(count):
        image, ids, segments = render_synthetic_image(index, split, 3, (64, 128))
        Image.fromarray(image).save(root / split / "images" / f"{index}.png")
        classes = np.full(ids.shape, 255)
        instances = np.zeros(ids.shape, dtype=np.int64)
        for number, segment in enumerate(segments, start=1):
            thing = segment.category_id in (20, 24, 31)
            classes[ids == segment.id] = 26 if thing else 7  # every shape a car, all stuff road
            instances[ids == segment.id] = number if thing and not segment.iscrowd else 0
        if form == "semantic-instance":
            Image.fromarray(classes.astype(np.uint8)).save(root / split / "semantic" / f"{index}.png")
            Image.fromarray(instances.astype(np.uint16)).save(root / split / "instance" / f"{index}.png")
        else:
            np.save(root / split / "labels" / f"{index}.npy", classes * 1000 + instances)


def test_own_data_walkthrough_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    _raw_labels(tmp_path / "raw", "train", 4, "semantic-instance")
    _raw_labels(tmp_path / "raw", "val", 2, "label-map")
    (categories,) = [b for b in _blocks("yaml") if "isthing" in b]
    Path("categories.yaml").write_text(categories)
    (yaml_block,) = [b for b in _blocks("yaml") if "_base_" in b]
    Path("my_dataset.yaml").write_text(yaml_block)

    commands = [_cli_args(words) for words in _commands(_section("Train on your own data"))]
    verbs = ["convert-dataset", "convert-dataset", "validate", "train", "train", "evaluate", "predict"]
    assert [args[0] for args in commands] == verbs
    for args in commands:
        if args[0] == "convert-dataset":
            args = [*args, "--no-progress"]
        elif args[0] == "train":
            args = [*args, *TINY_TRAINING, "model.num_classes=2"]
        elif args[0] in ("evaluate", "predict"):
            args = [*args, "--device", "cpu"]
        assert cli.main(args) == cli.EXIT_OK, args
    out = capsys.readouterr().out
    assert out.count("validate: no problems found") == 3 and "PQ" in out
    assert Path("report.json").is_file() and Path("preds/predictions.json").is_file()
    assert list(Path("predictions/pictures").glob("*_overlay.png"))


def test_python_api_blocks_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from panoptic_deeplab import config as config_module

    monkeypatch.chdir(tmp_path)
    for split, count in (("train", 4), ("val", 2)):
        make_synthetic_dataset(tmp_path / "demo_output" / "data", split, count, (64, 128), seed=0)
    data = [
        f"data.{split}.{key}=demo_output/data/{split}/{leaf}"
        for split in ("train", "val")
        for key, leaf in (("images", "images"), ("json", f"panoptic_{split}.json"), ("panoptic", "panoptic"))
    ]
    tiny = [*data, *TINY_TRAINING, "train.eval_period=0"]

    # The README's configs, made tiny: the user's overrides first, then the tiny ones.
    real_load_config = config_module.load_config
    monkeypatch.setattr(config_module, "load_config", lambda preset, overrides=(): real_load_config(
        preset, [*overrides, *tiny]))

    first, second = re.findall(r"```python\n(.*?)```", _section("Python API"), flags=re.S)
    checkpoint = re.search(r'"(demo_output/run/model_\d+\.pt)"', first).group(1)
    # the checkpoint the demo leaves, made by a tiny run under the README's name
    from panoptic_deeplab.engine import train

    result = train(config_module.load_config("synthetic_mnv3", ["train.output_dir=demo_output/run"]))
    Path(checkpoint).write_bytes(result.last_checkpoint.read_bytes())

    namespace: dict = {}
    exec(compile(first, "README.md (first python block)", "exec"), namespace)
    assert Path("out/val_000000.png").is_file() and Path("out/val_000000.json").is_file()
    assert namespace["result"].label_map.shape == (64, 128)
    exec(compile(second, "README.md (second python block)", "exec"), namespace)
    assert isinstance(namespace["model"], torch.nn.Module)
    assert 0.0 <= namespace["report"].summary()["PQ"] <= 1.0

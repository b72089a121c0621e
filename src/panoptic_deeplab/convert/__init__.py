"""Published Panoptic-DeepLab checkpoints of the reference implementations -> checkpoints of this project.

One module per reference: :mod:`.bowenc0221` (``bc``), :mod:`.detectron2` (``d2``), :mod:`.deeplab2` (``dl2``, TF2
checkpoints read by :mod:`.tf_checkpoint` without TensorFlow). Each reads its reference's
file format, sets the architecture options that reproduce that reference's network exactly, and maps the names.
The output is an ordinary checkpoint (``model`` + ``config`` + ``meta``): ``predict``, ``evaluate`` and
fine-tuning (``model.init_checkpoint``) take it as they take one written by ``train``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from panoptic_deeplab.config import Config, DataConfig, SplitConfig, config_to_dict, load_config
from panoptic_deeplab.data.coco_panoptic import DatasetMeta
from panoptic_deeplab.data.metadata import dataset_meta

from . import bowenc0221, deeplab2, detectron2
from .common import ConversionError, fetch, file_name_of, load_strict

SOURCES: dict[str, ModuleType] = {bowenc0221.NAME: bowenc0221, detectron2.NAME: detectron2, deeplab2.NAME: deeplab2}
# The dataset a published model was trained on, told by its number of classes.
DATASET_BY_NUM_CLASSES = {19: "cityscapes", 133: "coco"}


@dataclass(frozen=True)
class ConvertedCheckpoint:
    """What :func:`convert_checkpoint` wrote."""

    path: Path
    source: str
    input: str
    config: Config
    meta: DatasetMeta
    architecture: str


def convert_checkpoint(
    source: str,
    input: str | os.PathLike[str],
    output: str | os.PathLike[str],
    dataset: str | None = None,
    *,
    output_stride: int | None = None,
    train_crop: tuple[int, int] | None = None,
    config: str | os.PathLike[str] | None = None,
    allow_nonfinite: bool = False,
    progress: bool = True,
) -> ConvertedCheckpoint:
    """Convert a reference checkpoint (a path, or a URL downloaded once into the cache) into ``output``.

    ``source``: ``"bc"``, ``"d2"`` or ``"dl2"``. ``output``: a file, or an existing directory that receives
    ``<input stem>.pt``. ``dataset``: ``cityscapes``, ``coco`` or a JSON with the categories
    (default: told by the number of classes: 19 Cityscapes, 133 COCO). ``output_stride``: BC (default
    its configs': 32 with three decoder stages) and deeplab2 (default: the published file's config). ``train_crop``: D2 only, the training crop that sized its ASPP
    pooling (default the published recipe's). ``config``: deeplab2 only, the checkpoint's ``.textproto`` (its output
    stride, BN epsilon, atrous rates and post-processing). A file whose tensors hold NaN or Inf is refused unless
    ``allow_nonfinite``. Nothing is written unless every tensor fits.
    """
    from panoptic_deeplab.checkpoint import atomic_torch_save, check_finite
    from panoptic_deeplab.modeling import build_model

    if source not in SOURCES:
        raise ConversionError(f"unknown reference {source!r}: expected one of {', '.join(SOURCES)}")
    module = SOURCES[source]
    if output_stride is not None and source == detectron2.NAME:
        raise ConversionError("output_stride applies to --from bc and dl2 only (detectron2's models are os16)")
    if train_crop is not None and source != detectron2.NAME:
        raise ConversionError("train_crop applies to --from d2 only (its ASPP pooling window)")
    if config is not None and source != deeplab2.NAME:
        raise ConversionError("config (a .textproto) applies to --from dl2 only")
    output = output_path(input, output)
    path = fetch(str(input), progress=progress)
    state = module.read(path)
    if not allow_nonfinite:
        check_finite(state, str(path))
    num_classes = module.num_classes_of(state)
    dataset = dataset or DATASET_BY_NUM_CLASSES.get(num_classes)
    if dataset is None:
        raise ConversionError(
            f"{path} predicts {num_classes} classes, which is no published dataset: give --dataset JSON "
            "(a COCO panoptic JSON or a list of categories)"
        )
    meta = dataset_meta(dataset)
    if meta.num_classes != num_classes:
        raise ConversionError(
            f"{path} predicts {num_classes} classes but dataset {dataset!r} has {meta.num_classes} categories"
        )
    options: dict[str, Any] = {}
    if output_stride is not None:
        options["output_stride"] = output_stride
    if train_crop is not None:
        options["train_crop"] = train_crop
    if config is not None:
        options["config"] = config
    if source == deeplab2.NAME:  # the published file name tells the config (output stride, BN epsilon)
        options["input_name"] = str(input)
    model_cfg, post_cfg = module.configs(state, num_classes, **options)
    model = build_model(model_cfg)
    load_strict(model, state, module.key_map(model, state), what=f"{path} ({module.TITLE})")
    cfg = Config(model=model_cfg, postprocess=post_cfg, data=_data_config(dataset))
    architecture = module.architecture(state)
    checkpoint = {
        "model": model.state_dict(),
        "config": config_to_dict(cfg),
        "meta": meta.to_json(),
        "converted_from": {"reference": module.TITLE, "input": str(input), "architecture": architecture},
    }
    out = atomic_torch_save(checkpoint, output)
    return ConvertedCheckpoint(out, source, str(input), cfg, meta, architecture)


def output_path(input: str | os.PathLike[str], output: str | os.PathLike[str]) -> Path:
    """The file ``convert`` writes: ``output``, or ``output/<input stem>.pt`` when ``output`` is a directory.

    Checked before any download or conversion, so that a wrong ``--output`` costs nothing.
    """
    output = Path(output)
    if output.is_dir():
        stem = Path(file_name_of(str(input))).stem or "converted"
        output = output / f"{stem}.pt"
        if output.is_dir():
            raise ConversionError(f"--output {output} is a directory: give the file to write, e.g. {output}.pt")
    for parent in output.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConversionError(f"cannot write {output}: {parent} is a file, not a directory")
            break
    return output


def _data_config(dataset: str) -> DataConfig:
    """The dataset's paths from its preset, so ``evaluate --checkpoint`` finds the split; Cityscapes with label
    ids (``cityscapes_panoptic_val.json``), the category ids of the converted checkpoint."""
    preset = {"cityscapes": "cityscapes_r50", "coco": "coco_r50"}.get(dataset)
    if preset is None:
        return DataConfig()
    data = load_config(preset).data
    if dataset == "cityscapes":
        def label_ids(split: SplitConfig) -> SplitConfig:
            return dataclasses.replace(split, json=split.json.replace("_trainId", ""),
                                       panoptic=split.panoptic.replace("_trainId", ""))

        data = dataclasses.replace(data, train=label_ids(data.train), val=label_ids(data.val))
    return data


__all__ = ["SOURCES", "ConversionError", "ConvertedCheckpoint", "convert_checkpoint", "output_path"]

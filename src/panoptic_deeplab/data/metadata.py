"""Categories of the published datasets, so converted checkpoints predict named classes with the dataset's ids.

* ``cityscapes``: the 19 evaluated classes (8 things) with Cityscapes **label ids** as category ids, as in
  cityscapesscripts' ``createPanopticImgs`` JSON (``cityscapes_panoptic_{split}.json``); train ids 0..18 are
  their order (SPEC §6). Ground truth written with ``--use-train-id`` uses the train ids instead: pass that
  JSON as the categories then.
* ``coco``: the 133 COCO panoptic classes (80 things) with their COCO ids (1..200), as in
  ``panoptic_{split}2017.json``.
* ``mapillary_vistas``: the 65 Mapillary Vistas v1.2 classes (37 things) with their ids 1..65, as in its
  ``panoptic_2018.json`` (v2.0's 124 classes come with its own JSON).

Any other dataset: a COCO panoptic JSON (its ``categories``) or a JSON list of category entries.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

from panoptic_deeplab.data.coco_panoptic import DatasetMeta

PUBLISHED_DATASETS = ("cityscapes", "coco", "mapillary_vistas")


def published_categories(name: str) -> list[dict[str, Any]]:
    """The COCO-style category entries of a published dataset (one of :data:`PUBLISHED_DATASETS`)."""
    if name not in PUBLISHED_DATASETS:
        raise ValueError(f"unknown dataset {name!r}: expected one of {', '.join(PUBLISHED_DATASETS)} or a JSON file")
    text = (resources.files("panoptic_deeplab") / "data" / "categories" / f"{name}.json").read_text("utf-8")
    return json.loads(text)


def dataset_meta(name_or_json: str | os.PathLike[str]) -> DatasetMeta:
    """Categories of a published dataset (``cityscapes``, ``coco``, ``mapillary_vistas``), or those of a JSON file
    (COCO panoptic, or a list of categories)."""
    spec = str(name_or_json)
    if spec in PUBLISHED_DATASETS:
        return DatasetMeta.from_json(published_categories(spec))
    path = Path(spec)
    if not path.is_file():
        raise ValueError(
            f"dataset {spec!r} is neither one of {', '.join(PUBLISHED_DATASETS)} nor an existing JSON file"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read categories from {spec}: {exc}") from None
    categories = data.get("categories") if isinstance(data, dict) else data
    if not isinstance(categories, list) or not categories:
        raise ValueError(f"{spec} holds no categories: expected a COCO panoptic JSON or a list of category entries")
    try:
        return DatasetMeta.from_json(categories)
    except (ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"{spec}: bad category list: {exc}") from None

"""``convert-dataset --from label-map``: one map per image whose values are ``class * divisor + instance``, the
deeplab2 / detectron2 panoptic label convention (class: the category id of the categories file), plus a categories
file.

Each image ``IMAGES/<stem>.<ext>`` is paired with ``LABELS/<stem>.png`` (16-bit grayscale), ``.tif`` (32-bit) or
``.npy``. A class equal to the ignore label (default 255) is void; instance 0 on a thing class is its crowd region
(rules: :mod:`.common`).
"""

from __future__ import annotations

import os
from pathlib import Path

from tqdm import tqdm

from panoptic_deeplab.data.coco_panoptic import DatasetError, Problem, list_images

from .common import ConvertedSplit, SplitWriter, existing_folder, find_label_map, read_categories, read_label_map


def convert_label_maps(
    images: str | os.PathLike[str],
    labels: str | os.PathLike[str],
    categories: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    split: str = "train",
    label_divisor: int = 1000,
    ignore_label: int = 255,
    copy_images: bool = False,
    progress: bool = False,
) -> ConvertedSplit:
    """Write ``out_dir/<split>`` (COCO panoptic) from the image and label-map folders and the categories file."""
    if label_divisor < 1:
        raise ValueError(f"--label-divisor must be at least 1, got {label_divisor}")
    meta = read_categories(categories)
    labels = existing_folder(labels, "--labels")
    writer = SplitWriter(out_dir, split, meta, copy_images)
    for image_path in tqdm(list_images(images), desc=f"convert {split}", unit="image", disable=not progress):
        label_path = find_label_map(labels, image_path.stem, "label map")
        label = read_label_map(label_path)
        if label.size and int(label.min()) < 0:
            raise DatasetError(Problem(str(label_path), f"negative label {int(label.min())}"))
        classes, instances = label // label_divisor, label % label_divisor
        writer.add(image_path, classes, instances, ignore_label, str(label_path))
    return writer.finish({"description": "converted by panoptic-deeplab convert-dataset --from label-map",
                          "source": str(Path(images).resolve()), "label_divisor": label_divisor})

"""``convert-dataset --from semantic-instance``: a semantic PNG (category id per pixel) and an instance PNG (instance
id per pixel) per image, the form most labelling tools export, plus a categories file.

Each image ``IMAGES/<stem>.<ext>`` is paired with ``SEMANTIC/<stem>.png`` and ``INSTANCE/<stem>.png`` (or
``.tif`` / ``.npy``). Instance ids need only be distinct within an image (a tool that numbers instances per class
works too: a thing segment is a (class, instance) pair). Instance id 0 on a thing class marks a crowd region;
stuff classes ignore the instance map (rules: :mod:`.common`).
"""

from __future__ import annotations

import os
from pathlib import Path

from tqdm import tqdm

from panoptic_deeplab.data.coco_panoptic import list_images

from .common import ConvertedSplit, SplitWriter, existing_folder, find_label_map, read_categories, read_label_map


def convert_semantic_instance(
    images: str | os.PathLike[str],
    semantic: str | os.PathLike[str],
    instance: str | os.PathLike[str],
    categories: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    split: str = "train",
    ignore_label: int = 255,
    copy_images: bool = False,
    progress: bool = False,
) -> ConvertedSplit:
    """Write ``out_dir/<split>`` (COCO panoptic) from the three folders and the categories file."""
    meta = read_categories(categories)
    semantic, instance = existing_folder(semantic, "--semantic"), existing_folder(instance, "--instance")
    writer = SplitWriter(out_dir, split, meta, copy_images)
    for image_path in tqdm(list_images(images), desc=f"convert {split}", unit="image", disable=not progress):
        semantic_path = find_label_map(semantic, image_path.stem, "semantic map")
        instance_path = find_label_map(instance, image_path.stem, "instance map")
        writer.add(image_path, read_label_map(semantic_path), read_label_map(instance_path), ignore_label,
                   f"{semantic_path} + {instance_path.name}")
    return writer.finish({"description": "converted by panoptic-deeplab convert-dataset --from semantic-instance",
                          "source": str(Path(images).resolve())})

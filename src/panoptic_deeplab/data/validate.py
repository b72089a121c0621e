"""Whole-dataset validation of COCO panoptic annotations: collects every problem, not only the first.

Per annotation it reports: an unreadable or truncated PNG or image, a missing file, sizes that differ
between the image, the PNG and the JSON entry, PNG ids missing from ``segments_info``, ``segments_info``
ids absent from the PNG, wrong ``area`` or ``bbox``, unknown category ids and duplicate segment ids
(see :func:`panoptic_deeplab.data.coco_panoptic.annotation_problems`). Across the file: duplicate image
ids, annotations without an image entry, images without an annotation, and an empty image or annotation list.
"""

from __future__ import annotations

import os
from collections import Counter

from tqdm import tqdm

from panoptic_deeplab.data.coco_panoptic import (
    DatasetError,
    PanopticDataset,
    Problem,
    annotation_problems,
    load_image,
    load_panoptic_json,
    read_panoptic_png,
)


def _cross_reference_problems(dataset: PanopticDataset, json_path: str) -> list[Problem]:
    problems = []
    if not dataset.images:
        problems.append(Problem(json_path, "'images' is empty: the split has nothing to train or evaluate on"))
    if not dataset.annotations:
        problems.append(Problem(json_path, "'annotations' is empty: no image has panoptic labels"))
    image_ids = Counter(im.id for im in dataset.images)
    for image_id, count in image_ids.items():
        if count > 1:
            problems.append(Problem(json_path, f"image id {image_id!r} appears {count} times in 'images'"))
    annotated = Counter(a.image_id for a in dataset.annotations)
    for image_id, count in annotated.items():
        if count > 1:
            problems.append(Problem(json_path, f"image id {image_id!r} has {count} annotations"))
    for ann in dataset.annotations:
        if ann.image_id not in image_ids:
            problems.append(Problem(json_path, f"annotation {ann.file_name} refers to image id "
                                    f"{ann.image_id!r}, which is not in 'images'"))
    for im in dataset.images:
        if im.id not in annotated:
            problems.append(Problem(json_path, f"image {im.file_name} (id {im.id!r}) has no annotation"))
    return problems


def validate_dataset(
    json_path: str | os.PathLike[str],
    png_dir: str | os.PathLike[str],
    image_dir: str | os.PathLike[str],
    progress: bool = True,
) -> list[Problem]:
    """Check a COCO panoptic dataset (JSON, panoptic PNGs, images) and return every problem found.

    Every image is decoded in full, which is what detects truncated files. Raises FileNotFoundError
    when ``json_path`` or a directory does not exist (nothing can be checked); a JSON file that exists
    but cannot be parsed is reported as a problem.
    """
    json_path, png_dir, image_dir = os.fspath(json_path), os.fspath(png_dir), os.fspath(image_dir)
    if not os.path.isfile(json_path):
        raise FileNotFoundError(f"annotation JSON {json_path} not found")
    for name, folder in (("panoptic PNG directory", png_dir), ("image directory", image_dir)):
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{name} {folder} not found")
    try:
        dataset = load_panoptic_json(json_path)
    except DatasetError as exc:
        return [exc.problem or Problem(json_path, str(exc))]

    problems = _cross_reference_problems(dataset, json_path)
    images = dataset.image_by_id()
    for ann in tqdm(dataset.annotations, desc="validate", unit="image", disable=not progress):
        png_path = os.path.join(png_dir, ann.file_name)
        info = images.get(ann.image_id)
        try:
            ids = read_panoptic_png(png_path)
        except DatasetError as exc:
            problems.append(exc.problem or Problem(png_path, str(exc)))
            ids = None
        if ids is not None:
            problems.extend(annotation_problems(ids, ann, dataset.meta, png_path, info))
        if info is None:
            continue
        image_path = os.path.join(image_dir, info.file_name)
        try:
            image = load_image(image_path)
        except DatasetError as exc:
            problems.append(exc.problem or Problem(image_path, str(exc)))
            continue
        if image.shape[:2] != (info.height, info.width):
            problems.append(Problem(image_path, f"image is {image.shape[0]}x{image.shape[1]} (HxW) but its "
                                    f"JSON entry says {info.height}x{info.width}"))
        if ids is not None and image.shape[:2] != ids.shape:
            problems.append(Problem(image_path, f"image is {image.shape[0]}x{image.shape[1]} (HxW) but its "
                                    f"panoptic PNG {png_path} is {ids.shape[0]}x{ids.shape[1]}"))
    return problems


def summarize(problems: list[Problem]) -> str:
    """One line: how many problems in how many files."""
    if not problems:
        return "no problems found"
    files = len({p.file for p in problems})
    return f"{len(problems)} problem(s) in {files} file(s)"

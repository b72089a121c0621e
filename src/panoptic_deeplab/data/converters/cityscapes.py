"""``convert-dataset --from cityscapes``: a Cityscapes root (``gtFine/<split>/<city>/*_gtFine_instanceIds.png``,
``leftImg8bit/<split>/<city>/*_leftImg8bit.png``) -> a COCO panoptic split, without environment variables.

The result equals what cityscapesscripts' ``createPanopticImgs`` (``preparation/createPanopticImgs.py``,
``convert2panoptic``) writes, image for image (tested against it): its rules, read from that function, are

* an instanceIds value ``v < 1000`` is label id ``v``: a stuff region, or for a class with instances the crowd
  region of that class (``iscrowd: 1``); ``v >= 1000`` is instance ``v % 1000`` of label id ``v // 1000``;
* the segment id is ``v`` itself; labels that are ignored in evaluation (``ignoreInEval``) are void (0);
* image ids are the file stems without ``_gtFine_instanceIds``, PNGs are named ``*_gtFine_panoptic.png``,
  files in sorted path order;
* categories: the 19 evaluated classes with label ids, or with train ids (``--train-ids``, its
  ``useTrainId``).

One deliberate difference: ``createPanopticImgs`` names each image ``*_gtFine_leftImg8bit.png`` (it edits the label
file's name), a file that does not exist; here ``file_name`` is the real ``*_leftImg8bit.png``, linked or copied
into the split's image folder (the city is part of the name), so the split passes ``validate`` as written.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from panoptic_deeplab.data.coco_panoptic import DatasetError, DatasetMeta, Problem, SegmentInfo, segment_areas_bboxes
from panoptic_deeplab.data.metadata import published_categories

from .common import ConvertedSplit, SplitWriter, read_label_map

# Cityscapes label ids run 0..33 (cityscapesscripts' helpers/labels.py; license plate, -1, is not in instanceIds).
LAST_LABEL_ID = 33
INSTANCE_SUFFIX = "_gtFine_instanceIds.png"


def cityscapes_meta(train_ids: bool = False) -> DatasetMeta:
    """The 19 evaluated classes, with label ids (createPanopticImgs' default) or train ids 0..18."""
    categories = published_categories("cityscapes")  # ascending label ids: train ids are their order
    if train_ids:
        categories = [{**c, "id": train_id} for train_id, c in enumerate(categories)]
    return DatasetMeta.from_json(categories)


def cityscapes_segments(
    instance_ids: np.ndarray, train_ids: bool, context: str
) -> tuple[np.ndarray, list[SegmentInfo]]:
    """Panoptic id map (the instanceIds values, void 0) and segments of one ``*_instanceIds.png`` (module doc)."""
    label_meta = cityscapes_meta(train_ids=False)
    evaluated = {c.id: (train_id, c.isthing) for train_id, c in enumerate(label_meta.categories)}
    values, areas, boxes = segment_areas_bboxes(instance_ids)
    labels = np.where(values < 1000, values, values // 1000)
    if int(values.min()) < 0 or int(labels.max()) > LAST_LABEL_ID:
        bad = int(values[(values < 0) | (labels > LAST_LABEL_ID)][0])
        raise DatasetError(Problem(context, f"value {bad} is not a Cityscapes instance id (label ids run 0.."
                                   f"{LAST_LABEL_ID}, instances are label * 1000 + k)"))
    segments = []
    for value, label, area, box in zip(values.tolist(), labels.tolist(), areas, boxes):
        if label not in evaluated:
            continue
        train_id, isthing = evaluated[label]
        segments.append(SegmentInfo(value, train_id if train_ids else label, int(area), tuple(int(v) for v in box),
                                    iscrowd=isthing and value < 1000))
    kept = np.isin(instance_ids, [s.id for s in segments])
    return np.where(kept, instance_ids, 0), segments


def convert_cityscapes(
    root: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    split: str = "val",
    train_ids: bool = False,
    copy_images: bool = False,
    progress: bool = False,
) -> ConvertedSplit:
    """Write ``out_dir/<split>`` (COCO panoptic) from the Cityscapes root's ``gtFine`` and ``leftImg8bit``."""
    root = Path(root)
    gt_dir = root / "gtFine" / split
    files = sorted(gt_dir.glob(f"*/*{INSTANCE_SUFFIX}"))
    if not files:
        raise FileNotFoundError(f"no {gt_dir}/<city>/*{INSTANCE_SUFFIX} files: is {root} a Cityscapes root "
                                f"(with gtFine/ and leftImg8bit/) and {split!r} one of its splits?")
    writer = SplitWriter(out_dir, split, cityscapes_meta(train_ids), copy_images)
    for label_path in tqdm(files, desc=f"convert {split}", unit="image", disable=not progress):
        image_id = label_path.name[: -len(INSTANCE_SUFFIX)]
        image_path = root / "leftImg8bit" / split / label_path.parent.name / f"{image_id}_leftImg8bit.png"
        if not image_path.is_file():
            raise DatasetError(Problem(str(label_path), f"its image {image_path} does not exist"))
        ids, segments = cityscapes_segments(read_label_map(label_path), train_ids, str(label_path))
        writer.add_segments(image_path, ids, segments, image_id, f"{image_id}_gtFine_panoptic.png", str(label_path))
    return writer.finish({"description": "converted by panoptic-deeplab convert-dataset --from cityscapes",
                          "source": str(root.resolve()), "train_ids": train_ids})

"""``convert-dataset --from mapillary``: a Mapillary Vistas split (v1.2 or v2.0) -> a COCO panoptic split at the
paper's scale.

Mapillary's own panoptic labels are COCO panoptic already (``panoptic_2018.json`` for v1.2, ``panoptic_2020.json``
for v2.0, with PNGs beside it; its categories in the JSON), found under ``ROOT/<split>/``:

* v1.2 release: ``images/*.jpg``, ``panoptic/panoptic_*.json`` and ``panoptic/*.png``;
* v2.0 release (which also carries v1.2): ``images/*.jpg``, ``v1.2/panoptic/...`` and ``v2.0/panoptic/...``.

What the conversion adds is the paper's scale (SPEC §4.2: "images resized to 2177 px on the longest side"): each
image is resized (bilinear) so that its long side is ``long_side`` and its label map by nearest neighbour;
segments are measured again (area, bbox), and a segment that the resizing leaves without pixels is dropped. The
photos vary from 0.5 to 20 megapixels, so without this the random scale 0.5..2 of training would see very
different object sizes per image. ``long_side=0`` keeps the original sizes (images linked, PNGs copied).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from panoptic_deeplab.data.coco_panoptic import (
    DatasetError,
    Problem,
    load_image,
    load_panoptic_json,
    read_panoptic_png,
)

from .common import ConvertedSplit, SplitWriter, existing_folder, measure_segments

VERSIONS = ("v1.2", "v2.0")
# This project's split names -> Mapillary's folders (its own names work too).
MAPILLARY_SPLITS = {"train": "training", "val": "validation"}
PAPER_LONG_SIDE = 2177


def panoptic_folder(root: Path, split: str, version: str) -> Path:
    """The folder of ``panoptic_*.json`` and the PNGs of ``version`` in either release's layout (module doc)."""
    if version not in VERSIONS:
        raise ValueError(f"Mapillary Vistas version must be one of {', '.join(VERSIONS)}, got {version!r}")
    candidates = [root / split / version / "panoptic"] + ([root / split / "panoptic"] if version == "v1.2" else [])
    for folder in candidates:
        if folder.is_dir():
            return folder
    raise FileNotFoundError(f"{root} is not a Mapillary Vistas {version} root: none of "
                            f"{', '.join(str(c) for c in candidates)} exists")


def resized_size(height: int, width: int, long_side: int) -> tuple[int, int]:
    """(height, width) with the long side ``long_side`` and the aspect ratio kept (rounded)."""
    scale = long_side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def convert_mapillary(
    root: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    split: str = "train",
    version: str = "v1.2",
    long_side: int = PAPER_LONG_SIDE,
    copy_images: bool = False,
    progress: bool = False,
) -> ConvertedSplit:
    """Write ``out_dir/<split>`` (COCO panoptic) from a Mapillary Vistas root's split (``train`` or ``training``
    reads ``ROOT/training``, ``val`` or ``validation`` ``ROOT/validation``; rules: module doc)."""
    root = existing_folder(root, "--mapillary")
    if long_side < 0:
        raise ValueError(f"--long-side must be 0 (keep the sizes) or a positive number of pixels, got {long_side}")
    source_split = MAPILLARY_SPLITS.get(split, split)
    folder = panoptic_folder(root, source_split, version)
    jsons = sorted(folder.glob("panoptic_*.json"))
    if len(jsons) != 1:
        raise FileNotFoundError(f"{folder} holds {len(jsons)} panoptic_*.json files, expected one")
    dataset = load_panoptic_json(jsons[0])
    image_dir = existing_folder(root / source_split / "images", "images")
    annotations = {a.image_id: a for a in dataset.annotations}
    writer = SplitWriter(out_dir, split, dataset.meta, copy_images)
    dropped = 0
    for info in tqdm(dataset.images, desc=f"convert {split}", unit="image", disable=not progress):
        annotation = annotations.get(info.id)
        if annotation is None:
            raise DatasetError(Problem(str(jsons[0]), f"image {info.id!r} ({info.file_name}) has no annotation"))
        image_path, png_path = image_dir / info.file_name, folder / annotation.file_name
        if long_side == 0:
            writer.add_segments(image_path, read_panoptic_png(png_path), list(annotation.segments_info), info.id,
                                annotation.file_name, str(png_path))
            continue
        image, ids = load_image(image_path), read_panoptic_png(png_path)
        if image.shape[:2] != ids.shape:
            raise DatasetError(Problem(str(png_path), f"is {ids.shape[0]}x{ids.shape[1]} (HxW) but its image "
                                       f"{image_path} is {image.shape[0]}x{image.shape[1]}"))
        size = resized_size(*ids.shape, long_side)
        # antialias: a 4000 px photo shrunk to 2177 px without it aliases fine texture
        image = F.interpolate(torch.tensor(image).permute(2, 0, 1)[None].float(), size=size, mode="bilinear",
                              align_corners=False, antialias=True)
        image = image[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
        ids = F.interpolate(torch.from_numpy(ids)[None, None].double(), size=size, mode="nearest")[0, 0].long().numpy()
        measured = measure_segments(ids)
        segments = [dataclasses.replace(s, area=measured[s.id][0], bbox=measured[s.id][1])
                    for s in annotation.segments_info if s.id in measured]
        dropped += len(annotation.segments_info) - len(segments)
        writer.add_image_array(info.file_name, image, ids, segments, info.id, annotation.file_name)
    written = writer.finish({"description": f"converted by panoptic-deeplab convert-dataset --from mapillary "
                             f"({version}, long side {long_side or 'as is'})", "source": str(root.resolve())})
    return dataclasses.replace(written, dropped_segments=dropped)

"""Dataset converters: labelled data in other forms -> a COCO panoptic split that ``validate`` and ``train`` read.

One module per source form (``convert-dataset --from NAME``); :mod:`.common` holds the categories file, the rules
that turn class and instance maps into segments, and the split writer they share.
"""

from .cityscapes import convert_cityscapes
from .coco_instances import convert_coco_instances
from .common import ConvertedSplit, read_categories, segments_from_maps
from .label_map import convert_label_maps
from .mapillary import convert_mapillary
from .semantic_instance import convert_semantic_instance

__all__ = [
    "ConvertedSplit",
    "convert_cityscapes",
    "convert_coco_instances",
    "convert_label_maps",
    "convert_mapillary",
    "convert_semantic_instance",
    "read_categories",
    "segments_from_maps",
]

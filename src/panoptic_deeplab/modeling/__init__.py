"""modeling stage of panoptic_deeplab: the network (backbone, ASPP, decoders, heads) and its cost."""

from .backbone import BACKBONE_PRESETS, Backbone, BackbonePreset
from .panoptic_deeplab import PanopticDeepLab, build_model

__all__ = ["BACKBONE_PRESETS", "Backbone", "BackbonePreset", "PanopticDeepLab", "build_model"]

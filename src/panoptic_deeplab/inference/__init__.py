"""inference stage of panoptic_deeplab."""

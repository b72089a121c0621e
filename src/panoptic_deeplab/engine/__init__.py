"""engine stage of panoptic_deeplab."""

"""export stage of panoptic_deeplab."""

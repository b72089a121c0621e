"""evaluation stage of panoptic_deeplab."""

"""data stage of panoptic_deeplab."""

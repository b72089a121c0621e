"""modeling stage of panoptic_deeplab."""

"""Panoptic-DeepLab."""

"""Kept for plugins written before the dataset engine moved to `mvit.datasets`, which imported the
image-file helpers from here; new code imports them from `mvit.registry`. (The engine's records
are `mvit.datasets.records`.)"""

from mvit.registry.image_paths import IMAGE_SUFFIXES, image_files, is_image

__all__ = ["IMAGE_SUFFIXES", "image_files", "is_image"]

"""The plugin contract: the only part of mvit a dataset plugin imports. It never imports torch.

Everything a plugin may use is named here: the specs it registers, the hook marker, the diagnosis
vocabulary's `other_than`, which files are images, and the reader of an image,label[,group] CSV.
"""

from mvit.errors import DatasetError
from mvit.registry.diagnoses import other_than
from mvit.registry.hookspecs import hookimpl
from mvit.registry.image_paths import IMAGE_SUFFIXES, image_files, is_image
from mvit.registry.labels_file import read_labels_file
from mvit.registry.specs import DatasetSpec, HeadConfig, HeadSpec, Sample

__all__ = ["DatasetError", "DatasetSpec", "HeadConfig", "HeadSpec", "IMAGE_SUFFIXES", "Sample", "hookimpl",
           "image_files", "is_image", "other_than", "read_labels_file"]

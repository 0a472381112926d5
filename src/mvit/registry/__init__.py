"""The plugin contract: the only part of mvit a dataset plugin imports. It never imports torch."""

from mvit.errors import DatasetError
from mvit.registry.diagnoses import other_than
from mvit.registry.hookspecs import hookimpl
from mvit.registry.specs import DatasetSpec, HeadConfig, HeadSpec, Sample

__all__ = ["DatasetError", "DatasetSpec", "HeadConfig", "HeadSpec", "Sample", "hookimpl", "other_than"]

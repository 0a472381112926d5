"""Turns a dataset folder into validated records, through the dataset's plugin.

Plugins are third-party code: here their output is checked once (labels they declared, images that
exist) so the rest of mvit can trust a `Sample`, and a plugin's own bug surfaces as one sentence
naming the plugin instead of a traceback from deep inside training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

from mvit.errors import DatasetError, PluginError
from mvit.registry import manager
from mvit.registry.image_paths import image_files
from mvit.registry.words import count
from mvit.registry.specs import DatasetSpec, HeadSpec, Sample

def read_dataset(spec: DatasetSpec, root: Path | str) -> list[Sample]:
    """The plugin's records for `root`, as loaded (rows without images included), labels checked."""
    root = Path(root).expanduser()
    if spec.root_may_be_file and not root.exists():
        raise DatasetError(f"there is no folder or file at {root} for {spec.name}; give {spec.layout or 'the dataset'}")
    if not root.is_dir() and not (spec.root_may_be_file and root.is_file()):
        raise DatasetError(
            f"the {spec.name} folder {root} does not exist or is not a folder; the dataset folder must hold "
            f"{spec.layout or 'the dataset'}"
        )
    provider = _provider(spec.name)
    try:
        if spec.check_layout is not None:
            spec.check_layout(root)
        samples = spec.load(root)
    except DatasetError:
        raise
    except OSError as error:
        raise DatasetError(f"cannot read the {spec.name} folder {root}: {error}") from error
    except Exception as error:  # noqa: BLE001 - a bug in the plugin, reported as such
        raise PluginError(
            f"the {spec.name} loader of plugin {provider} failed on {root} with {type(error).__name__}: "
            f"{error}; report this to the plugin's author (MVIT_DEBUG=1 shows its traceback)"
        ) from error
    _check_records(spec.name, provider, samples)
    if not samples:
        raise DatasetError(f"the {spec.name} folder {root} holds no labelled images; expected {spec.layout}")
    for sample in samples:
        if sample.label not in spec.labels:
            raise DatasetError(
                f"{sample.path} has the label {sample.label!r}, which dataset {spec.name} does not know "
                f"(its labels: {', '.join(spec.labels)}); fix the label or remove the image"
            )
    return samples


def _check_records(dataset: str, provider: str, samples) -> None:
    """A loader's answer must be a list of `Sample`s: anything else (dicts, tuples, None) is the
    plugin's bug, named here rather than as an AttributeError deep inside splitting or training."""
    if not isinstance(samples, (list, tuple)):
        raise PluginError(f"the {dataset} loader of plugin {provider} returned {type(samples).__name__}, not a list of "
                          f"mvit.registry.Sample; report this to the plugin's author")
    wrong = next((item for item in samples if not isinstance(item, Sample)), None)
    if wrong is not None:
        raise PluginError(f"the {dataset} loader of plugin {provider} returned a {type(wrong).__name__} where a "
                          f"mvit.registry.Sample belongs (Sample(path=..., label=...)); report this to the plugin's author")


def load_samples(dataset: str, root: Path | str) -> list[Sample]:
    """The records of dataset `dataset` under `root`, every one with its image on disk."""
    spec = manager.get_dataset(dataset)
    samples = read_dataset(spec, root)
    missing = [sample for sample in samples if not sample.path.is_file()]
    if missing:
        raise DatasetError(
            f"{count(len(missing), spec.name + ' label row')} without an image (the first: {missing[0].path}); "
            f"run `mvit data check {spec.name} --root {root}` for the full list"
        )
    return samples


def find_images(spec: DatasetSpec, root: Path) -> list[Path]:
    return spec.find_images(root) if spec.find_images is not None else image_files(root)


def class_indices(head: HeadSpec, samples: Iterable[Sample]) -> list[Optional[int]]:
    """Each sample's class index for `head`, None where the head leaves its label out on purpose
    (mapped to None). A label the head does not know at all is an error: dropping those images
    silently would hide a typo in the head's label map."""
    indices: list[Optional[int]] = []
    for sample in samples:
        if sample.label not in head.label_map and sample.label not in head.classes:
            raise DatasetError(
                f"{sample.path} has the label {sample.label!r}, which head {head.name} does not know "
                f"(its classes: {', '.join(head.classes)})"
            )
        cls = head.class_of(sample.label)
        indices.append(None if cls is None else head.classes.index(cls))
    return indices


def _provider(dataset: str) -> str:
    try:
        info = manager.registry().plugin_of("dataset", dataset)
    except KeyError:
        return "(unregistered)"
    return f"{info.name!r} ({' '.join(filter(None, (info.distribution, info.version)))})"


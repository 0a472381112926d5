"""Your own images as a dataset without writing a plugin: a folder of class sub-folders
(ROOT/CLASS/*.jpg, torchvision's ImageFolder habit) or a CSV labels file of `image,label[,group]`
rows, the very file `mvit adapt --labels` reads, by the same function (`read_labels_file`).

It becomes one dataset and one head (named as the dataset) through an in-process plugin, so splits,
`mvit data check`, training and `mvit evaluate` treat it as any plugin's dataset. A training config
names it with a `[datasets.folder]` section, `mvit data check` and `mvit evaluate` with `--folder`.
A plugin package stays the way to share a dataset with others.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

from pydantic import ValidationError

from mvit.errors import ConfigError, DatasetError, MvitError
from mvit.registry import labels_file, manager
from mvit.registry.hookspecs import hookimpl
from mvit.registry.image_paths import image_files, is_image
from mvit.registry.specs import DatasetSpec, HeadSpec, Sample, is_valid_name

DEFAULT_NAME = "folder"  # what `mvit data check --folder` calls your dataset unless told
LAYOUT = "a folder of class sub-folders (ROOT/CLASS/*.jpg) or a CSV file with the columns image,label[,group]"


def class_folders(root: Path) -> dict[str, list[Path]]:
    """Each sub-folder of `root` that holds images (its name, a label) -> those images, sorted by
    name. Hidden sub-folders (.git, .ipynb_checkpoints) are no classes."""
    found = {sub.name: image_files(sub) for sub in sorted(_subfolders(root))}
    return {label: images for label, images in found.items() if images}


def read_folder(root: Path) -> list[Sample]:
    """The labelled images at `root`: a CSV file's rows (`read_labels_file`, the reader of `mvit adapt
    --labels`), or every image of each class sub-folder, labelled by the sub-folder's name."""
    root = Path(root).expanduser()
    if root.is_file():
        return labels_file.read_labels_file(root)  # looked up on the module: one reader, wherever it is called from
    check_layout(root)
    # group: the image itself (a folder says nothing of lesions; a CSV's group column does), named
    # relative to the root so that the split is the same however the root is spelled
    return [Sample(path=path, label=label, group=labels_file.own_group(path, root))
            for label, images in class_folders(root).items() for path in images]


def check_layout(root: Path) -> None:
    """One sentence for a root that is not your own dataset: no such path, or a folder without a
    sub-folder of images. Quick: it stops at the first image found."""
    root = Path(root).expanduser()
    if root.is_file():
        return  # the labels file's reader says what is wrong with it, row by row
    if not root.is_dir():
        raise DatasetError(f"there is no folder or CSV file at {root}; your own dataset is {LAYOUT}")
    if not any(_holds_image(sub) for sub in _subfolders(root)):
        loose = "its images are not in class sub-folders" if _holds_image(root) else "it holds no images"
        raise DatasetError(f"{root} has no sub-folder of images ({loose}); your own dataset is {LAYOUT}")


def find_images(root: Path) -> list[Path]:
    """Every image the dataset holds, labelled or not: under a folder, all of them (an image outside
    the class sub-folders is reported as unlabelled); for a CSV, those it lists (the folder beside a
    CSV may hold anything)."""
    root = Path(root).expanduser()
    return [sample.path for sample in read_folder(root)] if root.is_file() else image_files(root)


class OwnDataset:
    """An in-process plugin offering one dataset and its one head, built before registration so a
    wrong folder is one sentence of its own, not a plugin skipped with a warning."""

    def __init__(self, dataset: DatasetSpec, head: HeadSpec):
        self.dataset, self.head = dataset, head
        self.__name__ = f"folder:{dataset.name}"  # its plugin name: one per dataset, so adding it again replaces it

    @hookimpl
    def register_datasets(self, register):
        register(self.dataset)

    @hookimpl
    def register_heads(self, register):
        register(self.head)


def own_dataset(
    name: str,
    root: Union[str, Path],
    *,
    classes: Optional[Sequence[str]] = None,
    positive: Optional[str] = None,
    diagnoses: Optional[Mapping[str, Union[str, Sequence[str]]]] = None,
    head: Optional[str] = None,
) -> OwnDataset:
    """Dataset `name` at `root` (a folder of class sub-folders or a CSV labels file) and its head
    (`head`, default `name`): its classes are `classes` in that order, else the labels found,
    sorted; `positive` is the class a two-class head screens for; `diagnoses` maps labels to terms of
    mvit's diagnosis vocabulary, so the head can be scored on other datasets and theirs on this one."""
    if not is_valid_name(name):
        raise ConfigError(f"{name!r} cannot name a dataset: lower-case letters, digits, - and _, starting with a letter")
    root = Path(root).expanduser()
    labels = tuple(classes) if classes else tuple(sorted({sample.label for sample in read_folder(root)}))
    if not classes and len(labels) < 2:
        raise DatasetError(f"{root} holds one label only ({labels[0]!r}); a head needs two classes or more")
    try:
        dataset = DatasetSpec(name=name, title=f"your own images at {root}", labels=labels, layout=LAYOUT,
                              diagnoses=dict(diagnoses or {}), load=read_folder, check_layout=check_layout,
                              find_images=find_images, root_may_be_file=True)
        spec = HeadSpec(name=head or name, dataset=name, classes=labels, positive=positive,
                        description=f"{', '.join(labels)}: your own images")
    except ValidationError as error:
        raise ConfigError(_sentence(error)) from None
    return OwnDataset(dataset, spec)


def recorded(name: str, root: Union[str, Path], heads: Iterable) -> Optional[OwnDataset]:
    """Your own folder or CSV at `root` as dataset `name` of a model that was trained on it, with the
    classes and positive class its head (among `heads`, the model's HeadInfo) records; None where no
    head of the model was trained on a dataset of that name."""
    info = next((info for info in heads if info.dataset == name), None)
    if info is None:
        return None
    return own_dataset(name, root, classes=info.classes, positive=info.positive, head=info.name)


def _name_problem(plugin: OwnDataset) -> Optional[str]:
    """Why `plugin` cannot join this process's registry (an installed plugin holds its dataset or head
    name, which it would lose to the installed one), or None when it can."""
    registry = manager.registry()
    for kind, spec in (("dataset", plugin.dataset), ("head", plugin.head)):
        other = registry.provider.get(f"{kind}:{spec.name}")
        if other is not None and other.name != plugin.__name__:
            return (f"the {kind} name {spec.name!r} is taken by the installed plugin {other.name!r}; "
                    f"give your own dataset another name")
    return None


def register(*plugins: OwnDataset) -> None:
    """Add `plugins` to this process's registry: a name already taken is one sentence."""
    for plugin in plugins:
        problem = _name_problem(plugin)
        if problem:
            raise ConfigError(problem)
    manager.add_plugins(*plugins)


def own_root(name: Optional[str], root: Optional[Path], folder: Optional[Path]) -> tuple[str, Path]:
    """The dataset and root `mvit data check` checks: `name` at `root`, an installed plugin's; or with
    `folder`, your own folder or CSV, added to this process's registry (as `name`, default "folder")."""
    if folder is None:
        if name is None or root is None:
            raise MvitError("give a dataset name and its --root DIR (`mvit data check ph2 --root DIR`), "
                              "or --folder PATH for your own folder of class sub-folders or CSV")
        return name, root
    if root is not None:
        raise MvitError("--folder is the dataset checked, in place of --root: leave out --root")
    name = name or DEFAULT_NAME
    register(own_dataset(name, folder))
    return name, folder


def _subfolders(root: Path) -> list[Path]:
    return [sub for sub in root.iterdir() if sub.is_dir() and not sub.name.startswith(".")]


def _holds_image(folder: Path) -> bool:
    return any(path.is_file() and is_image(path) for path in folder.rglob("*"))


def _sentence(error: ValidationError) -> str:
    """A spec's validation error as the one sentence its validator wrote (pydantic's prefix off)."""
    first = error.errors()[0]
    return str(first["msg"]).removeprefix("Value error, ")

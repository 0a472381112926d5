"""The training config: a TOML file validated by pydantic, with dotted command-line overrides.

Every field has a default from the recipe docs/training.md explains (heads on a frozen backbone,
then gradual unfreezing), so a config names only its datasets and what it changes. An invalid config is one sentence naming the field.
"""

from __future__ import annotations

import importlib.util
import os
import tomllib
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from mvit.core import model_file
from mvit.core import gate
from mvit.core.preprocessing import Preprocessing
from mvit.data.transforms import Augmentation
from mvit.errors import ConfigError, MvitError
from mvit.runtime.precision import TrainingPrecision, device_problem


# settings of this machine that configs written before the [runtime] section kept in [training]
# (and so do the config.json files of run folders started then, which --resume reads): still read there
MOVED_TO_RUNTIME = ("device", "precision", "workers", "bad_images", "feature_cache")

BUNDLED = "bundled"  # backbone.init: the model file that comes with mvit (mvit.load())
NAMED_INITS = ("random", "timm", BUNDLED)  # every other value of backbone.init is a path


def _false_is_off(value):
    """`false` turns a setting off, the one spelling of "off" for every switch (TOML has no null;
    booleans switch with true and false already); `true` names no value, so it is refused."""
    if value is True:
        raise ValueError("true is not a value for this setting: give a number, or false to turn it off")
    return None if value is False else value


# a setting that is a number or off (`false`; None in Python and in a run folder's config.json)
OrOff = BeforeValidator(_false_is_off)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FolderConfig(_Strict):
    """`[datasets.folder]`: the dataset's root is your own folder of class sub-folders or CSV of
    image,label[,group] rows, a dataset with one head named as it, no plugin (`mvit.datasets.folder`)."""

    classes: Optional[list[str]] = None  # the head's classes in output order; default: the labels found, sorted
    positive: Optional[str] = None  # the class a two-class head screens for (its threshold is calibrated for it)
    # label -> a term (or terms) of mvit's diagnosis vocabulary, so the head can be scored on other datasets
    diagnoses: dict[str, Union[str, list[str]]] = Field(default_factory=dict)


class DatasetConfig(_Strict):
    name: str
    root: Path  # a folder; with `folder`, a folder or a CSV file
    heads: list[str] = Field(default_factory=list)  # empty: every head the dataset's plugin offers
    split_seed: int = 0
    fold: Optional[int] = None  # k-fold cross-validation: which fold is the test split
    folds: int = Field(default=5, ge=2)
    fractions: Optional[dict[str, float]] = None  # train/valid/test fractions where there is no official split
    # heads fitted in closed form only: this dataset's heads also learn from the training images of
    # these other datasets of the run, wherever their labels fall into one of the head's classes in
    # the diagnosis vocabulary (each image once); validation stays this dataset's own
    borrow_from: list[str] = Field(default_factory=list)
    folder: Optional[FolderConfig] = None  # set: `root` is your own folder or CSV, no plugin's dataset


class BackboneConfig(_Strict):
    name: str = "deit_small_patch16_224"
    # "random", "timm" (pretrained DeiT through timm), "bundled" (the model that comes with mvit), or a
    # path: a timm/DeiT checkpoint or an mvit model
    init: str = "timm"
    image_size: Optional[int] = None  # default: the named configuration's
    patch_size: Optional[int] = None
    width: Optional[int] = None
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    dropout: float = 0.0
    attention_dropout: float = 0.0
    drop_path: float = 0.1

    def overrides(self) -> dict:
        names = ("image_size", "patch_size", "width", "depth", "num_heads")
        values = {name: getattr(self, name) for name in names if getattr(self, name) is not None}
        return {**values, "dropout": self.dropout, "attention_dropout": self.attention_dropout, "drop_path": self.drop_path}


class OptimizerConfig(_Strict):
    head_lr: float = Field(default=1e-3, gt=0)
    backbone_lr: float = Field(default=1e-4, gt=0)
    # each block further from the output gets this factor more of backbone_lr (1.0: no decay)
    layer_decay: float = Field(default=0.75, gt=0, le=1)
    weight_decay: float = Field(default=0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: Annotated[Optional[float], OrOff] = Field(default=1.0, gt=0)  # false: no clipping
    warmup_epochs: float = Field(default=1.0, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_fraction: float = Field(default=0.01, ge=0, le=1)


class UnfreezeConfig(_Strict):
    """Train heads on a frozen backbone, then unfreeze one group at a time: a small dataset cannot
    move a pretrained backbone far without overfitting, so it is moved last and gradually."""

    # gradual: frozen, then groups unfrozen from the output side; all: train everything from the
    # start (right for a random backbone); none: the backbone stays frozen (linear probing)
    mode: Literal["gradual", "all", "none"] = "gradual"
    frozen_epochs: int = Field(default=2, ge=0)
    every: int = Field(default=1, ge=1)  # epochs between unfreezing steps
    groups_per_step: int = Field(default=1, ge=1)
    # default order: final_norm, block.<last>, ..., block.0, position, patch_embed
    order: Optional[list[str]] = None


class TrainingConfig(_Strict):
    epochs: int = Field(default=30, ge=1)
    batch_size: int = Field(default=32, ge=2)
    balanced: bool = True  # class-balanced batches for every dataset
    # batches per epoch from each dataset: in proportion to its size, to its square root, or equal
    dataset_weighting: Literal["size", "sqrt", "equal"] = "sqrt"
    label_smoothing: float = Field(default=0.1, ge=0, lt=1)
    # an exponential moving average of the weights with this decay per step (e.g. 0.998), validated
    # every epoch beside the trained weights and kept as the best model when it scores higher
    ema_decay: Annotated[Optional[float], OrOff] = Field(default=None, ge=0, lt=1)  # false: off (0, as configs wrote it before, too)
    best_metric: Literal["balanced_accuracy", "roc_auc", "accuracy", "loss"] = "balanced_accuracy"
    early_stopping: Annotated[Optional[int], OrOff] = Field(default=10, ge=1)  # epochs without improvement; false: never stop
    seed: int = 0
    # how heads are fitted on a frozen backbone with no augmentation: "auto" in closed form (L2 logistic
    # regression by L-BFGS, its strength chosen on validation loss; see train/linear_heads.py) where the
    # heads are linear, else by epochs; "epochs" always by epochs of the optimiser
    head_fit: Literal["auto", "closed_form", "epochs"] = "auto"
    # how the run's model files store their weights: "init" as the init model file does (the bundled
    # model: float16, half the size), float32 where the init is no mvit model; or as named
    save_precision: Literal["init", "float32", "float16"] = "init"


class RuntimeConfig(_Strict):
    """How this machine runs the recipe: none of it changes what the model learns, so it is not
    recorded with the model's recipe, and a resumed run may change it (another device, more workers)."""

    device: str = "auto"  # auto, cpu, cuda, cuda:1, mps
    precision: TrainingPrecision = "auto"  # not int8: that is for prediction only
    workers: Union[int, Literal["auto"]] = "auto"
    # an image that does not decode: "stop" the run with one sentence naming it, or "skip" it (left
    # out of its batch, of validation and of the feature cache; the count is reported each epoch)
    bad_images: Literal["stop", "skip"] = "stop"
    # frozen backbone and no augmentation: read backbone features from this HDF5 cache (default: the
    # run folder's features.h5)
    feature_cache: Optional[Path] = None

    @field_validator("device")
    @classmethod
    def _runs_here(cls, device: str) -> str:
        """Checked when the config is read, as `--device` is for predict: not by a traceback mid-run."""
        problem = device_problem(device)
        if problem is not None:
            raise ValueError(problem)
        return device

    @field_validator("workers")
    @classmethod
    def _workers(cls, workers: Union[int, str]) -> Union[int, str]:
        if isinstance(workers, int) and workers < 0:
            raise ValueError(f"workers is the number of decoding processes, 0 (decode in the training process) or more, "
                             f"or \"auto\"; got {workers}")
        return workers


class LoggingConfig(_Strict):
    """Where a run's progress goes besides the console and metrics.jsonl: not part of the recipe."""

    # RUN/tensorboard: per-epoch scalars and the best model's confusion matrices (the tensorboard extra)
    tensorboard: bool = False

    @field_validator("tensorboard")
    @classmethod
    def _installed(cls, wanted: bool) -> bool:
        """Checked when the config is read, not when the first epoch ends."""
        if wanted and importlib.util.find_spec("tensorboard") is None:
            raise ValueError("TensorBoard is not installed; install mvit's tensorboard extra "
                             "(pip install 'mvit[tensorboard]'), or set logging.tensorboard = false")
        return wanted


class GateConfig(_Strict):
    """The out-of-distribution gate fitted at the end of a run (`mvit.core.gate`, fitted by `mvit.evaluate.gate`)."""

    # true: fit one, or keep the init model's where the backbone stayed frozen (it still fits); false: none
    enabled: bool = True
    method: Literal["mahalanobis", "knn"] = gate.DEFAULT_METHOD
    layer: Union[int, Literal["middle", "pooled"]] = gate.DEFAULT_LAYER  # which backbone feature is scored
    accept: float = Field(default=gate.DEFAULT_ACCEPT, gt=0, le=1)  # share of in-distribution validation images accepted


class CalibrationConfig(_Strict):
    target_sensitivity: float = Field(default=0.9, gt=0, le=1)  # binary heads' operating point, on valid
    temperature: bool = True
    ood_gate: GateConfig = Field(default_factory=GateConfig)


class TrainConfig(_Strict):
    output: Path
    datasets: list[DatasetConfig] = Field(min_length=1)
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    preprocessing: Preprocessing = Field(default_factory=Preprocessing)
    augmentation: Augmentation = Field(default_factory=Augmentation)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    unfreeze: UnfreezeConfig = Field(default_factory=UnfreezeConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    def recipe(self) -> dict:
        """What a model file records of this run: everything but the machine's settings and the logs."""
        return self.model_dump(mode="json", exclude={"runtime", "logging"})

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        names = [d.name for d in self.datasets]
        if len(set(names)) != len(names):
            raise ValueError(f"a dataset is listed twice: {names}")
        for d in self.datasets:
            unknown = [name for name in d.borrow_from if name not in names or name == d.name]
            if unknown:
                raise ValueError(f"dataset {d.name} borrows from {', '.join(unknown)}, which {'is' if len(unknown) == 1 else 'are'} "
                                 f"not another dataset of this run (its datasets: {', '.join(names)})")
        if self.backbone.image_size is not None and "image_size" not in self.preprocessing.model_fields_set:
            # one image size for both, said once: the backbone's (an init model's may still fill the rest)
            self.preprocessing = self.preprocessing.model_copy(update={"image_size": self.backbone.image_size})
        if self.backbone.image_size is not None and self.backbone.image_size != self.preprocessing.image_size:
            raise ValueError(
                f"backbone.image_size {self.backbone.image_size} differs from preprocessing.image_size "
                f"{self.preprocessing.image_size}; set one image size for both"
            )
        return self


def load_config(path: Union[str, Path], overrides: Optional[list[str]] = None) -> TrainConfig:
    """Read a TOML config, with `overrides` applied (`dotted.key=value` strings, values parsed as
    TOML, else taken as text: `training.epochs=5`, `output=runs/try`).

    One rule for relative paths: those written in the config resolve against the config's folder (so
    a config works from any folder); those given on the command line, against the working directory
    (as in any shell command)."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))  # TOML is UTF-8, whatever the locale says
    except FileNotFoundError:
        raise ConfigError(f"no config file at {path}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path} is not UTF-8 text (byte {error.start} cannot be read); a config is a TOML file: "
                          f"save it as UTF-8") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path} is not valid TOML: {error}") from None
    _anchor_paths(raw, path.resolve().parent)
    overridden = apply_overrides(raw, overrides or [])
    return validate_config(raw, source=str(path), overridden=overridden)


# the paths of a config outside its datasets (each dataset's root is one too); training.feature_cache:
# where configs before [runtime] kept it
PATH_FIELDS = (("output",), ("backbone", "init"), ("runtime", "feature_cache"), ("training", "feature_cache"))


def _is_path(key: tuple[str, ...]) -> bool:
    """Whether the dotted key (split) names a path of the config."""
    return key in PATH_FIELDS or (len(key) == 3 and key[0] == "datasets" and key[2] == "root")


def _anchored(key: tuple[str, ...], value, base: Path):
    """`value` of the field `key`, a relative path made absolute against `base`; anything else as it is."""
    if not _is_path(key) or not isinstance(value, str) or not value or (key == ("backbone", "init") and value in NAMED_INITS):
        return value
    return os.path.normpath(base / Path(value).expanduser())


def _anchor_paths(raw: dict, base: Path) -> None:
    """Every relative path of the raw config made absolute against `base`, in place."""
    for key in PATH_FIELDS:
        *parents, leaf = key
        section = raw.get(parents[0]) if parents else raw
        if isinstance(section, dict) and leaf in section:
            section[leaf] = _anchored(key, section[leaf], base)
    for index, dataset in enumerate(raw.get("datasets", [])):
        if isinstance(dataset, dict) and "root" in dataset:
            dataset["root"] = _anchored(("datasets", str(index), "root"), dataset["root"], base)


def apply_overrides(raw: dict, overrides: list[str]) -> dict[tuple[str, ...], str]:
    """`overrides` set in the raw config, in place (a relative path against the working directory);
    returns each one's dotted key (split) -> the item, for `validate_config`'s messages."""
    for item in overrides:
        _apply_override(raw, item)
    return {_override_key(item): item for item in overrides}


def validate_config(raw: dict, source: str = "the config", overridden: Optional[dict[tuple[str, ...], str]] = None) -> TrainConfig:
    """`overridden`: dotted key (split) -> the `--set` item that set it, so an error in a value given
    on the command line is attributed to that option, not to the config file."""
    moved = _move_to_runtime(raw)
    try:
        config = TrainConfig.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        loc = tuple(str(part) for part in first["loc"])
        loc = moved.get(loc[:2], loc[:2]) + loc[2:]  # named as the config (or --set) wrote it
        where = ".".join(loc) or "(top level)"
        message = first["msg"].removeprefix("Value error, ")  # pydantic's prefix for our own sentences
        for key, item in (overridden or {}).items():
            if key and loc and (loc[: len(key)] == key or key[: len(loc)] == loc):  # the value set, or a field within it
                raise ConfigError(f"--set {item}: {where}: {message}") from None
        raise ConfigError(f"{source}: {where}: {message}") from None
    return _with_init_preprocessing(config)


def _move_to_runtime(raw: dict) -> dict[tuple[str, str], tuple[str, str]]:
    """Moves the machine's settings an older config wrote in [training] to [runtime], in place;
    returns where each moved one was written (runtime.X -> training.X), for error messages."""
    training, runtime = raw.get("training"), raw.setdefault("runtime", {})
    if not isinstance(training, dict) or not isinstance(runtime, dict):
        return {}  # not a section: validation says so
    moved = {}
    for key in MOVED_TO_RUNTIME:
        if key not in training:
            continue
        if key in runtime:
            raise ConfigError(f"{key} is set both in [training] and in [runtime]; it belongs in [runtime] (runtime.{key}): remove training.{key}")
        runtime[key] = training.pop(key)
        moved[("runtime", key)] = ("training", key)
    return moved


def init_model_file(init: str) -> Optional[Path]:
    """The mvit model file `backbone.init` names ("bundled": the one that comes with mvit), or None
    where it names no mvit model (random, timm, a DeiT checkpoint, a missing file)."""
    if init == BUNDLED:
        try:
            return model_file.bundled_model_path()
        except MvitError:
            raise ConfigError(f'backbone.init = "{BUNDLED}", but this installation of mvit has no bundled model; '
                              f"set backbone.init to a model file") from None
    path = Path(init)
    if init in NAMED_INITS or path.suffix != ".safetensors" or not path.is_file():
        return None
    try:
        model_file.read_metadata(path)
    except MvitError:
        return None  # not an mvit model file (a DeiT checkpoint in safetensors, say)
    return path


def saves_half(config: TrainConfig) -> bool:
    """Whether the run's model files store float16 weights (`training.save_precision`)."""
    if config.training.save_precision != "init":
        return config.training.save_precision == "float16"
    path = init_model_file(config.backbone.init)
    return path is not None and model_file.stored_as_half(path)


def _with_init_preprocessing(config: TrainConfig) -> TrainConfig:
    """An mvit init model's preprocessing for every `[preprocessing]` field the config leaves unset:
    the backbone learned from images prepared that way (the bundled model: 128 px)."""
    path = init_model_file(config.backbone.init)
    explicit = config.preprocessing.model_fields_set
    if path is None or explicit >= set(Preprocessing.model_fields):
        return config
    inherited = model_file.read_metadata(path).preprocessing.model_dump()
    values = {**inherited, **{name: getattr(config.preprocessing, name) for name in explicit}}
    config.preprocessing = Preprocessing(**values)  # what differs from the init model's, model_setup warns about
    return config


def _override_key(item: str) -> tuple[str, ...]:
    """The dotted key an override sets, split; a machine setting given the way configs before
    [runtime] wrote it (training.device=cpu) sets runtime's, so it overrides what the config says."""
    key = tuple(item.split("=", 1)[0].strip().split("."))
    return ("runtime", key[1]) if len(key) == 2 and key[0] == "training" and key[1] in MOVED_TO_RUNTIME else key


def _apply_override(raw: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"--set {item}: an override must look like section.key=value")
    text = item.split("=", 1)[1]
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    *parents, leaf = _override_key(item)
    node = raw
    for part in parents:  # sections by name, list entries by index: datasets.0.root
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict):
            node = node.setdefault(part, {})
        else:
            raise ConfigError(f"--set {item}: there is no {part!r} to set")
    if not isinstance(node, dict):
        raise ConfigError(f"--set {item}: {'.'.join(parents)} is not a section")
    node[leaf] = _anchored(tuple(parents) + (leaf,), value, Path.cwd())

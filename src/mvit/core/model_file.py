"""The model file: one `.safetensors` file with the backbone, every head and JSON metadata.

safetensors holds tensors and a string-to-string header only, so loading a model file can never
run code. `model_opener.read` is the one place a model file is opened: every failure becomes one
`ModelFileError` sentence naming the file, and a pickle is recognised (to say so) only after the
file failed to open as safetensors. `load` refuses metadata and tensors that do not fit each
other, and non-finite weights, rather than give a wrong answer.
"""

from __future__ import annotations

import functools
import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, TypeVar, Union

import torch
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from torch.overrides import TorchFunctionMode

from mvit.core.gate import TENSOR_PREFIX as OOD_PREFIX
from mvit.core.gate import GateInfo, OODGate
from mvit.core.heads import HeadInfo
from mvit.core.model import Model
from mvit.core.model_opener import read as read_model_file
from mvit.core.preprocessing import Preprocessing
from mvit.core.reference import TENSOR_PREFIX as REFERENCE_PREFIX
from mvit.core.reference import ReferenceFeatures, ReferenceInfo
from mvit.core.sites import TENSOR_PREFIX as SITE_PREFIX
from mvit.core.sites import Site, SiteInfo, check_site_heads
from mvit.core.training_images import TrainingImages
from mvit.core.vit import VisionTransformer, ViTConfig
from mvit.errors import ModelFileError
from mvit.runtime.files import written_aside

M = TypeVar("M", bound=Model)  # the kind of model a file is opened as (`load`'s model_class)

FORMAT = "mvit-model"
FORMAT_VERSION = 1
METADATA_KEY = "mvit"
BUNDLED_MODEL = Path(__file__).resolve().parents[1] / "assets" / "default.safetensors"
# the identities of the images the model trained on (`provenance["training_images"]` in memory, a
# summary of it in the JSON metadata): content hashes (int64) and ISIC numbers (int32), sorted
TRAINING_IMAGES = "training_images"
TRAINING_TENSORS = {"content": f"{TRAINING_IMAGES}.content", "isic": f"{TRAINING_IMAGES}.isic"}



class ModelMetadata(BaseModel):
    """Everything about a model that is not a tensor."""

    model_config = ConfigDict(extra="forbid")

    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    backbone: ViTConfig
    preprocessing: Preprocessing
    heads: dict[str, HeadInfo]
    provenance: dict[str, Any] = {}  # mvit version, creation time, training runs, training images (a summary)
    # the out-of-distribution gate, its tensors stored as `ood.*`; None (and absent in older files): no gate
    ood_gate: Optional[GateInfo] = None
    # the features the heads were fitted on, its tensors stored as `reference.*`; None: not recorded
    reference: Optional[ReferenceInfo] = None
    sites: dict[str, SiteInfo] = {}  # site profiles (`mvit adapt`), their heads' tensors stored as `site.<name>.*`

    @model_validator(mode="after")
    def _consistent(self) -> "ModelMetadata":
        """What would otherwise crash predict mid-output or silently skew every answer."""
        for key, info in self.heads.items():
            if key != info.name:
                raise ValueError(f"the head stored as {key!r} calls itself {info.name!r}")
        for key, site in self.sites.items():
            problem = f"the site stored as {key!r} calls itself {site.name!r}" if key != site.name else check_site_heads(site, self.heads)
            if problem:
                raise ValueError(problem)
        p = self.preprocessing
        if not all(math.isfinite(v) for v in (*p.mean, *p.std)) or min(p.std) <= 0:
            raise ValueError(f"preprocessing needs finite means and positive standard deviations, got mean {p.mean}, std {p.std}")
        if p.image_size != self.backbone.image_size:
            raise ValueError(f"preprocessing makes {p.image_size} px images, but the backbone takes {self.backbone.image_size} px")
        if self.backbone.in_channels != 3:
            raise ValueError(f"the backbone takes {self.backbone.in_channels} channels, but images have 3 (RGB)")
        return self


def save(model: Model, path: Union[str, Path], *, half: bool = False, provenance: Optional[dict] = None) -> Path:
    """Write `model` to `path` (atomically: a crash never leaves a half-written model file).

    `half=True` stores tensors as float16 (half the size; they are widened to float32 on load).
    The out-of-distribution gate, if any, is saved too (its bank always as float16, its
    Mahalanobis statistics always as float32, whatever `half` says).
    """
    from safetensors.torch import save_file

    from mvit import __version__

    path = Path(path)
    provenance = {
        **model.provenance,
        "mvit_version": __version__,
        "torch_version": torch.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **(provenance or {}),
    }
    # the training images, if recorded, go into tensors; the metadata keeps a summary of them
    training_images = provenance.pop(TRAINING_IMAGES, None)
    if isinstance(training_images, TrainingImages):
        provenance[TRAINING_IMAGES] = training_images.summary()
    metadata = ModelMetadata(
        backbone=model.backbone.config,
        preprocessing=model.preprocessing,
        heads=dict(model.heads),
        provenance=provenance,
        ood_gate=None if model.ood_gate is None else model.ood_gate.info,
        reference=None if model.reference is None else model.reference.info,
        sites={name: site.info for name, site in model.sites.items()},
    )
    tensors = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu")
        tensors[name] = (tensor.half() if half and tensor.is_floating_point() else tensor).contiguous()
    if model.ood_gate is not None:
        tensors.update(model.ood_gate.tensors_to_save())  # `ood.*`: never a state_dict name
    if model.reference is not None:
        tensors.update(model.reference.tensors_to_save())  # `reference.*`
    for site in model.sites.values():
        tensors.update(site.tensors_to_save())  # `site.<name>.*`
    if isinstance(training_images, TrainingImages):
        tensors[TRAINING_TENSORS["content"]] = torch.tensor(sorted(training_images.content), dtype=torch.int64)
        tensors[TRAINING_TENSORS["isic"]] = torch.tensor(sorted(training_images.isic), dtype=torch.int32)
    with written_aside(path) as partial:  # shared as any file the user writes, though safetensors writes 0600
        save_file(tensors, str(partial), metadata={METADATA_KEY: metadata.model_dump_json()})
    return path


def read_metadata(path: Union[str, Path]) -> ModelMetadata:
    """The metadata of a model file, without reading its tensors."""
    path = Path(path)
    return _metadata(path, read_model_file(path).header)


def _one_thread(function):
    """Runs `function` with one intra-op thread (restored after). Loading is a few hundred small,
    memory-bound operations: on a busy machine each multi-threaded one waits until all its threads
    are scheduled (seconds in all on two busy cores), and one thread is as fast on an idle one."""

    @functools.wraps(function)
    def run(*args, **kwargs):
        threads = torch.get_num_threads()
        if threads == 1:
            return function(*args, **kwargs)
        torch.set_num_threads(1)
        try:
            return function(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return run


@_one_thread
def load(path: Union[str, Path, None] = None, *, device: Union[str, torch.device] = "cpu",
         model_class: type[M] = Model) -> M:
    """A model ready for inference (eval mode, float32), as `model_class` (`mvit.load` opens it as
    `mvit.infer.model.Model`, which predicts). No path: the model bundled with mvit.

    Every way a file can be wrong (unreadable, not a model file, metadata or tensors that do not
    fit each other, non-finite weights) raises `ModelFileError` with one sentence naming the file.
    """
    path = bundled_model_path() if path is None else Path(path)
    contents = read_model_file(path, tensors=True)
    metadata = _metadata(path, contents.header)
    tensors = contents.tensors
    _check_tensors(path, tensors)
    with _ParametersOnMeta():  # every value comes from the file: no memory, no random initialisation
        model = model_class(VisionTransformer(metadata.backbone), metadata.preprocessing)
    model.provenance = dict(metadata.provenance)
    training_images = _training_images(path, metadata, tensors)  # takes its tensors out of `tensors`
    if training_images is not None:
        model.provenance[TRAINING_IMAGES] = training_images
    with _ParametersOnMeta():
        for info in metadata.heads.values():
            model.add_head(info)
    if metadata.ood_gate is not None:
        gate_tensors = {name[len(OOD_PREFIX):]: tensors.pop(name) for name in list(tensors) if name.startswith(OOD_PREFIX)}
        try:
            if not math.isfinite(metadata.ood_gate.threshold):
                raise ValueError(f"its threshold is {metadata.ood_gate.threshold}")
            model.ood_gate = OODGate(metadata.ood_gate, gate_tensors)
            if model.ood_gate.dim != model.backbone.width:
                raise ValueError(f"it scores {model.ood_gate.dim}-wide features, the backbone gives {model.backbone.width}")
            if metadata.ood_gate.layer is not None and metadata.ood_gate.layer >= metadata.backbone.depth:
                raise ValueError(f"it reads block {metadata.ood_gate.layer}, but a tap goes after block 1 to {metadata.backbone.depth - 1}")
        except ValueError as error:
            raise ModelFileError(f"{path} has a damaged out-of-distribution gate: {error}") from None
    _load_reference_and_sites(path, model, metadata, tensors)  # takes their tensors out of `tensors`
    expected = model.state_dict()
    problems = _head_problems(metadata, tensors)
    problems += [f"missing {name}" for name in expected if name not in tensors]
    problems += [f"unexpected {name}" for name in tensors if name not in expected]
    problems += [
        f"{name} is {tuple(tensor.shape)} but the model needs {tuple(expected[name].shape)}"
        for name, tensor in tensors.items()
        if name in expected and tensor.shape != expected[name].shape
    ]
    problems += [
        f"{name} holds {str(tensor.dtype).removeprefix('torch.')} values, not floating-point weights"
        for name, tensor in tensors.items()
        if name in expected and expected[name].is_floating_point() and not tensor.is_floating_point()
    ]
    if problems:
        raise ModelFileError(f"{path} does not fit the model its metadata describes: " + "; ".join(problems[:5]))
    stray = [name for name, _ in model.named_buffers() if name not in expected]
    if stray:  # a bug in mvit, not in the file: such a buffer would stay uninitialised memory
        raise RuntimeError(f"load cannot fill the non-persistent buffers {', '.join(stray)}; compute them after to_empty")
    # real (uninitialised) memory, filled by the copy, which also widens float16 files to float32
    model.to_empty(device="cpu").load_state_dict(tensors)
    return model.to(device).eval()


def _load_reference_and_sites(path: Path, model: Model, metadata: ModelMetadata, tensors: dict[str, torch.Tensor]) -> None:
    """The reference bank and the site profiles, their tensors taken out of `tensors`; damage is one sentence."""
    def take(prefix: str) -> dict[str, torch.Tensor]:
        return {name[len(prefix):]: tensors.pop(name) for name in list(tensors) if name.startswith(prefix)}

    reference = take(REFERENCE_PREFIX)
    if metadata.reference is not None:
        try:
            model.reference = ReferenceFeatures.from_tensors(metadata.reference, reference)
        except ValueError as error:
            raise ModelFileError(f"{path} has a damaged record of the features its heads were fitted on: {error}") from None
    elif reference:
        raise ModelFileError(f"{path} holds reference tensors its metadata does not describe")
    for name, info in metadata.sites.items():
        try:
            model.sites[name] = Site.from_tensors(info, take(f"{SITE_PREFIX}{name}."), model.backbone.width)
        except (ValueError, RuntimeError) as error:
            raise ModelFileError(f"{path} has a damaged site profile {name!r}: {error}") from None
        gate = model.sites[name].gate
        if gate is not None and (model.ood_gate is None or gate.dim != model.ood_gate.dim or gate.info.layer != model.ood_gate.info.layer):
            raise ModelFileError(f"{path} has a site profile {name!r} whose gate does not read the model's gate's feature")
    stray = sorted({name.split(".")[1] for name in tensors if name.startswith(SITE_PREFIX)})
    if stray:
        raise ModelFileError(f"{path} holds tensors of site {', '.join(stray)}, which its metadata does not describe")


def read_training_images(path: Union[str, Path]) -> Optional[TrainingImages]:
    """The images the model in a file trained on, as its file records them (without reading the
    weights); None for a file that does not record them (written before mvit recorded them)."""
    path = Path(path)
    contents = read_model_file(path, tensors=True, only=f"{TRAINING_IMAGES}.")
    return _training_images(path, _metadata(path, contents.header), contents.tensors)


def stored_as_half(path: Union[str, Path]) -> bool:
    """Whether the model file holds its backbone as float16 (written with `save(..., half=True)`)."""
    dtypes = read_model_file(Path(path)).dtypes
    name = next((name for name in dtypes if name.startswith("backbone.")), None)
    return name is not None and dtypes[name] == "F16"


def bundled_model_path() -> Path:
    if not BUNDLED_MODEL.is_file():
        raise ModelFileError(
            "mvit has no bundled model in this installation; pass a model file with --model (or mvit.load(PATH))"
        )
    return BUNDLED_MODEL


def _metadata(path: Path, header: dict[str, str]) -> ModelMetadata:
    """The validated mvit metadata of a safetensors header."""
    if METADATA_KEY not in header:
        raise ModelFileError(
            f"{path} is a safetensors file but not an mvit model (it has no mvit metadata); "
            "to start from DeiT weights use mvit.create_backbone(weights=PATH)"
        )
    try:
        raw = json.loads(header[METADATA_KEY])
    except (json.JSONDecodeError, RecursionError):
        raise ModelFileError(f"{path} has damaged mvit metadata (not valid JSON)") from None
    if not isinstance(raw, dict):
        raise ModelFileError(f"{path} has damaged mvit metadata (not a JSON object)")
    if raw.get("format") != FORMAT:
        raise ModelFileError(f"{path} is not an mvit model file (format {raw.get('format')!r})")
    if raw.get("format_version") != FORMAT_VERSION:
        raise ModelFileError(
            f"{path} has model-file format version {raw.get('format_version')!r}, but this mvit reads "
            f"version {FORMAT_VERSION}; install the mvit version that wrote it"
        )
    try:
        return ModelMetadata.model_validate(raw)
    except ValidationError as error:
        raise ModelFileError(f"{path} has invalid mvit metadata: {_first_error(error)}") from None


def _training_images(path: Path, metadata: ModelMetadata, tensors: dict[str, torch.Tensor]) -> Optional[TrainingImages]:
    """The recorded training images, their tensors taken out of `tensors`; None where the file has no record."""
    stored = {key: tensors.pop(name) for key, name in TRAINING_TENSORS.items() if name in tensors}
    summary = metadata.provenance.get(TRAINING_IMAGES)
    if not stored and summary is None:
        return None
    problem = None
    if not isinstance(summary, dict) or set(stored) != set(TRAINING_TENSORS):
        problem = "its metadata and tensors disagree on whether it records them"
    elif any(t.ndim != 1 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool for t in stored.values()):
        problem = "they are not lists of integers"
    elif len(stored["content"]) != summary.get("images"):
        problem = f"the metadata counts {summary.get('images')!r} images, the tensor holds {len(stored['content'])}"
    if problem:
        raise ModelFileError(f"{path} has a damaged record of its training images: {problem}")
    return TrainingImages(frozenset(stored["content"].tolist()), frozenset(stored["isic"].tolist()), bool(summary.get("complete", True)))


def _check_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse weights that would turn every answer into NaN: any non-finite value in any tensor."""
    bad = [name for name, tensor in tensors.items() if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise ModelFileError(f"{path} is damaged: tensor {', '.join(bad[:3])}{more} holds NaN or infinite values")


class _ParametersOnMeta(TorchFunctionMode):
    """Builds modules with their parameters on the meta device, so the random initialisation of
    each (values the file's tensors replace; most of the time `load` took) costs nothing. Only the
    constructors parameters are made with are redirected; a tensor computed in a constructor (the
    drop-path rates' linspace) is made as usual. `to_empty` then gives the parameters real memory."""

    _CONSTRUCTORS = frozenset({torch.empty, torch.zeros, torch.ones})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in self._CONSTRUCTORS and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def _head_problems(metadata: ModelMetadata, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Heads whose output layer gives a different number of classes than the head lists."""
    problems = []
    for name, info in metadata.heads.items():
        last = f"classifiers.{name}.layers.{3 * len(info.config.hidden) + 1}.weight"  # see ClassifierHead
        if last in tensors and tensors[last].ndim == 2 and tensors[last].shape[0] != len(info.classes):
            problems.append(f"head {name!r} lists {len(info.classes)} classes but its weights give {tensors[last].shape[0]}")
    return problems


def _first_error(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    return f"{where}: {message}" if where else message

"""The model file: one `.safetensors` file with the backbone, every head and JSON metadata.

safetensors holds tensors and a string-to-string header only, so loading a model file can never
run code. A pickle file is refused before it is opened as anything else.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Union

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from mvit.infer.model import Model
from mvit.nn.heads import HeadInfo
from mvit.infer.ood import TENSOR_PREFIX as OOD_PREFIX
from mvit.infer.ood import GateInfo, OODGate
from mvit.data.transforms import Preprocessing
from mvit.nn.vit import VisionTransformer, ViTConfig
from mvit.errors import ModelFileError

FORMAT = "mvit-model"
FORMAT_VERSION = 1
METADATA_KEY = "mvit"
BUNDLED_MODEL = Path(__file__).resolve().parents[1] / "assets" / "default.safetensors"

# first bytes of files that are pickles: torch.save's zip archive, and a bare pickle stream
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


class ModelMetadata(BaseModel):
    """Everything about a model that is not a tensor."""

    model_config = ConfigDict(extra="forbid")

    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    backbone: ViTConfig
    preprocessing: Preprocessing
    heads: dict[str, HeadInfo]
    provenance: dict[str, Any] = {}  # mvit version, creation time, training run
    # the out-of-distribution gate, its tensors stored as `ood.*`; None (and absent in older files): no gate
    ood_gate: Optional[GateInfo] = None


def save(model: Model, path: Union[str, Path], *, half: bool = False, provenance: Optional[dict] = None) -> Path:
    """Write `model` to `path` (atomically: a crash never leaves a half-written model file).

    `half=True` stores tensors as float16 (half the size; they are widened to float32 on load).
    The out-of-distribution gate, if any, is saved too (its bank always as float16, its
    Mahalanobis statistics always as float32, whatever `half` says).
    """
    from safetensors.torch import save_file

    from mvit import __version__

    path = Path(path)
    metadata = ModelMetadata(
        backbone=model.backbone.config,
        preprocessing=model.preprocessing,
        heads=dict(model.heads),
        provenance={
            **model.provenance,
            "mvit_version": __version__,
            "torch_version": torch.__version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **(provenance or {}),
        },
        ood_gate=None if model.ood_gate is None else model.ood_gate.info,
    )
    tensors = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu")
        tensors[name] = (tensor.half() if half and tensor.is_floating_point() else tensor).contiguous()
    if model.ood_gate is not None:
        tensors.update(model.ood_gate.tensors_to_save())  # `ood.*`: never a state_dict name
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    save_file(tensors, str(partial), metadata={METADATA_KEY: metadata.model_dump_json()})
    # safetensors writes owner-only (0600) files; a model file is meant to be shared, as any file the user writes
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(partial, 0o666 & ~umask)
    os.replace(partial, path)
    return path


def read_metadata(path: Union[str, Path]) -> ModelMetadata:
    """The metadata of a model file, without reading its tensors."""
    from safetensors import safe_open

    path = _existing(path)
    try:
        with safe_open(str(path), framework="pt") as file:
            header = file.metadata() or {}
    except Exception as error:  # safetensors reports every malformed header as its own error type
        raise ModelFileError(
            f"{path} is not a readable safetensors model file ({_first_line(error)}); it may be truncated or of another format"
        ) from None
    if METADATA_KEY not in header:
        raise ModelFileError(
            f"{path} is a safetensors file but not an mvit model (it has no mvit metadata); "
            "to start from DeiT weights use mvit.create_backbone(weights=PATH)"
        )
    try:
        raw = json.loads(header[METADATA_KEY])
    except json.JSONDecodeError:
        raise ModelFileError(f"{path} has damaged mvit metadata (not valid JSON)") from None
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


def load(path: Union[str, Path, None] = None, *, device: Union[str, torch.device] = "cpu") -> Model:
    """A model ready for inference (eval mode, float32). No path: the model bundled with mvit."""
    from safetensors.torch import load_file

    if path is None:
        path = bundled_model_path()
    metadata = read_metadata(path)
    model = Model(VisionTransformer(metadata.backbone), metadata.preprocessing)
    model.provenance = dict(metadata.provenance)
    for info in metadata.heads.values():
        model.add_head(info)
    try:
        tensors = load_file(str(path))
    except Exception as error:
        raise ModelFileError(f"{path} is damaged: its tensors cannot be read ({_first_line(error)})") from None
    if metadata.ood_gate is not None:
        gate_tensors = {name[len(OOD_PREFIX):]: tensors.pop(name) for name in list(tensors) if name.startswith(OOD_PREFIX)}
        try:
            model.ood_gate = OODGate(metadata.ood_gate, gate_tensors)
            if model.ood_gate.dim != model.backbone.width:
                raise ValueError(f"it scores {model.ood_gate.dim}-wide features, the backbone gives {model.backbone.width}")
            if metadata.ood_gate.layer is not None and metadata.ood_gate.layer >= metadata.backbone.depth:
                raise ValueError(f"it reads block {metadata.ood_gate.layer}, but a tap goes after block 1 to {metadata.backbone.depth - 1}")
        except ValueError as error:
            raise ModelFileError(f"{path} has a damaged out-of-distribution gate: {error}") from None
    expected = model.state_dict()
    problems = [f"missing {name}" for name in expected if name not in tensors]
    problems += [f"unexpected {name}" for name in tensors if name not in expected]
    problems += [
        f"{name} is {tuple(tensor.shape)} but the model needs {tuple(expected[name].shape)}"
        for name, tensor in tensors.items()
        if name in expected and tensor.shape != expected[name].shape
    ]
    if problems:
        raise ModelFileError(f"{path} does not fit the model its metadata describes: " + "; ".join(problems[:5]))
    model.load_state_dict({name: tensor.to(expected[name].dtype) for name, tensor in tensors.items()})
    return model.to(device).eval()


def stored_as_half(path: Union[str, Path]) -> bool:
    """Whether the model file holds its backbone as float16 (written with `save(..., half=True)`)."""
    from safetensors import safe_open

    with safe_open(str(_existing(path)), framework="pt") as file:
        name = next((name for name in file.keys() if name.startswith("backbone.")), None)
        return name is not None and file.get_slice(name).get_dtype() == "F16"


def bundled_model_path() -> Path:
    if not BUNDLED_MODEL.is_file():
        raise ModelFileError(
            "mvit has no bundled model in this installation; pass a model file with --model (or mvit.load(PATH))"
        )
    return BUNDLED_MODEL


def _existing(path: Union[str, Path]) -> Path:
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"no model file at {path}")
    with open(path, "rb") as file:
        start = file.read(4)
    if start.startswith(_PICKLE_MAGIC) or start[:2] in _PICKLE_MAGIC:
        raise ModelFileError(
            f"{path} is a pickle file (PyTorch .pt/.pth); mvit never unpickles model files. "
            "DeiT weights in such a file load with mvit.create_backbone(weights=PATH), which reads tensors only"
        )
    return path


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _first_error(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    return f"{where}: {first['msg']}"

"""What the commands that run a model share: the --precision and --device choices and the --model option,
and turning those into a loaded model.

torch and the inference modules are imported inside `load_model` only, so importing this stays cheap.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from mvit.errors import MvitError
from mvit.runtime.precision import PRECISIONS
from mvit.runtime.startup import model_loaded

PrecisionChoice = Enum("PrecisionChoice", {name: name for name in PRECISIONS}, type=str)

PRECISION_HELP = (
    "auto: bfloat16 where the hardware runs it fast (CUDA, CPUs with AMX), else fp32; fp32; bf16; "
    "int8 (CPU only: the backbone's linear layers quantised)"
)

DEVICE_HELP = "auto (a CUDA GPU when there is one, else the CPU), cpu, cuda or cuda:N"


def device_option():
    return typer.Option("auto", "--device", help=DEVICE_HELP)


def model_option():
    return typer.Option(None, "--model", "-m", help="model file (default: the model bundled with mvit)")


def site_option():
    return typer.Option(None, "--site", help="answer with this site's heads (fitted by `mvit adapt`; `mvit info` lists a model's sites)")


def load_model(model_file: Optional[Path], device: str, site: Optional[str] = None):
    """The model file given, else the bundled one (a clear error until it exists), on `device`; as
    site `site` sees it where one is named."""
    import torch

    from mvit.core import model_file as model_files
    from mvit.runtime.precision import resolve_device

    try:
        chosen = resolve_device(device)
    except RuntimeError:
        raise MvitError(f"unknown device {device!r}; use {DEVICE_HELP}") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise MvitError(f"device {device!r} asked for, but PyTorch sees no CUDA GPU here; use --device cpu")
    model = model_files.load(model_file, device=chosen).with_site(site)  # None: the bundled model
    model_loaded()  # the collector was off since the command started (runtime.startup.fast_start)
    return model


def check_writable(path: Path, option: str, *, folder: bool) -> None:
    """Fail before any work, in one sentence, when `path` (a folder to create or fill, or a file to
    write) cannot be written: a regular file stands where a folder must be, a folder where the file
    goes, or the nearest existing folder is not writable (permissions, a read-only file system)."""
    import os

    path = Path(path).expanduser()
    if path.exists():
        if folder and not path.is_dir():
            raise MvitError(f"{path} is a file, not a folder; choose another {option}")
        if not folder and path.is_dir():
            raise MvitError(f"{path} is a folder, and a file is written there; choose another {option}")
        if not os.access(path if folder else path.parent, os.W_OK):
            raise MvitError(f"cannot write {path}: permission denied or a read-only file system; choose another {option}")
        return
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise MvitError(f"cannot create {path}: {parent} is a file, not a folder; choose another {option}")
    if not os.access(parent, os.W_OK):
        raise MvitError(f"cannot create {path}: {parent} is not writable (permission denied or a read-only file system); choose another {option}")

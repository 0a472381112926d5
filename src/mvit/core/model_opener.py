"""The one place a model file is opened.

Every failure, from the filesystem or from safetensors, becomes one `ModelFileError` sentence naming
the file. The file is opened as safetensors first; its first bytes are looked at only to word the
error when that fails, since a valid file's 8-byte header length may well begin like a pickle.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from mvit.errors import ModelFileError

# first bytes of files that are pickles: torch.save's zip archive, and a bare pickle stream
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


@dataclass
class Contents:
    header: dict[str, str]  # the safetensors header's string metadata
    dtypes: dict[str, str]  # tensor name -> safetensors dtype ("F32", "F16", ...)
    tensors: dict[str, torch.Tensor]  # empty unless asked for


def read(path: Path, *, tensors: bool = False, only: Optional[str] = None) -> Contents:
    """The one place a model file is opened. Every failure, from the filesystem or from safetensors,
    becomes one `ModelFileError` sentence naming the file. `tensors`: read them too (`only`: just
    those whose names start with it).

    The file is opened as safetensors first: its first bytes are looked at only to word the error
    when that fails (a valid file's 8-byte header length may well begin like a pickle).
    """
    from safetensors import safe_open

    try:
        kind = path.stat().st_mode
    except (OSError, ValueError) as error:
        raise ModelFileError(_os_problem(path, error)) from None
    if stat.S_ISDIR(kind):
        inside = next((p for p in (path / "best.safetensors", path / "model.safetensors") if p.is_file()), None)
        hint = f"; did you mean {inside}?" if inside else "; pass the .safetensors file itself"
        raise ModelFileError(f"{path} is a folder, not a model file{hint}")
    if not stat.S_ISREG(kind):
        raise ModelFileError(f"{path} is not a regular file (a model file is a .safetensors file on disk)")
    try:
        with safe_open(str(path), framework="pt") as file:
            header = dict(file.metadata() or {})
            names = list(file.keys())
            dtypes = {name: file.get_slice(name).get_dtype() for name in names}
            data = {name: file.get_tensor(name) for name in names if only is None or name.startswith(only)} if tensors else {}
    except MemoryError:
        raise
    except Exception as error:  # safetensors reports malformed files, and some OS errors, in its own types
        raise ModelFileError(_why_unreadable(path, error)) from None
    return Contents(header, dtypes, data)


def _os_problem(path: Path, error: Exception) -> str:
    """One sentence for a file the operating system will not give us."""
    if isinstance(error, FileNotFoundError):
        return f"no model file at {path}"
    if isinstance(error, NotADirectoryError):
        return f"no model file at {path} (a part of that path is a file, not a folder)"
    if isinstance(error, IsADirectoryError):
        return f"{path} is a folder, not a model file; pass the .safetensors file itself"
    if isinstance(error, PermissionError):
        return f"cannot read the model file {path}: permission denied"
    if isinstance(error, OSError) and error.strerror:
        return f"cannot read the model file {path}: {error.strerror}"
    return f"cannot read the model file {path}: {first_line(error)}"


def _why_unreadable(path: Path, error: Exception) -> str:
    """Why safetensors could not open a file, worded from what a plain open and its first bytes say
    (safetensors reports a permission problem as FileNotFoundError, and without an errno)."""
    try:
        with open(path, "rb") as file:
            start = file.read(9)
    except OSError as os_error:
        return _os_problem(path, os_error)
    # a safetensors file's JSON header follows its 8-byte length: such a file is damaged, not a pickle
    if start.startswith(_PICKLE_MAGIC) and start[8:9] != b"{":
        return (
            f"{path} is a pickle file (PyTorch .pt/.pth); mvit never unpickles model files. "
            "DeiT weights in such a file load with mvit.create_backbone(weights=PATH), which reads tensors only"
        )
    if isinstance(error, OSError) and not isinstance(error, FileNotFoundError):
        return _os_problem(path, error)
    return f"{path} is not a readable safetensors model file ({first_line(error)}); it may be truncated or of another format"


def first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__

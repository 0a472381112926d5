"""Where and in which number format to compute: the device, and bfloat16 autocast where the
hardware runs it fast, else float32. The one list of precision choices (`PRECISIONS`) that the
config, the CLI and the API accept.

bfloat16 matrix work is fast on CUDA GPUs and on CPUs with AMX (Intel Sapphire Rapids and later). On
other CPUs it is emulated and several times slower than float32, so `auto` must not pick it there.

`int8` (prediction on the CPU only, never training: `TRAINING_PRECISIONS`) runs the backbone's linear
layers in int8 (`mvit.infer.quantize`) and everything else in float32; no autocast. `auto` never
picks it: it moves probabilities by up to a few hundredths (docs/prediction.md).

torch is imported inside the functions: the CLI reads `PRECISIONS` to build its options, and
`mvit --help` must not pay for importing torch.
"""

from __future__ import annotations

import contextlib
from functools import lru_cache
from typing import TYPE_CHECKING, Literal, Optional, get_args

from mvit.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import torch

Precision = Literal["auto", "fp32", "bf16", "int8"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
TrainingPrecision = Literal["auto", "fp32", "bf16"]  # int8 is for prediction only
TRAINING_PRECISIONS: tuple[str, ...] = get_args(TrainingPrecision)


@lru_cache(maxsize=1)
def cpu_has_fast_bfloat16() -> bool:
    import torch

    get_capabilities = getattr(torch.cpu, "get_capabilities", None)
    return bool(get_capabilities and get_capabilities().get("amx_bf16"))


def autocast_dtype(precision: Precision, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for `precision` on `device`; None means plain float32."""
    import torch

    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return None
    if precision == "int8":  # float32 around the int8 linears of mvit.infer.quantize
        check_int8_device(device)
        return None
    if precision == "bf16":
        return torch.bfloat16
    fast = device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bfloat16())
    return torch.bfloat16 if fast else None


def check_int8_device(device: torch.device) -> None:
    """int8 quantised linears have CPU kernels only: one sentence for any other device."""
    if device.type != "cpu":
        raise ConfigError(
            f"--precision int8 runs on the CPU only, and the model is on {device}; "
            "use --device cpu with int8, or --precision auto (or bf16) on the GPU"
        )


def autocast(device: torch.device, dtype: Optional[torch.dtype]) -> contextlib.AbstractContextManager:
    import torch

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """`auto`: this process's CUDA GPU (its torchrun local rank), else Apple's MPS, else the CPU."""
    import torch

    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def device_problem(name: str) -> Optional[str]:
    """Why the device `name` cannot run here, in words; None when it can (`auto` always can)."""
    import torch

    usable = "use auto, cpu, cuda, cuda:N or mps"
    try:
        device = resolve_device(name)
    except (RuntimeError, ValueError):  # torch.device("tpu"): "Expected one of cpu, cuda, ..."
        return f"{name!r} is not a device mvit runs on; {usable}"
    if device.type not in ("cpu", "cuda", "mps"):
        return f"{name!r} is not a device mvit runs on; {usable}"
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"{name!r} asks for a CUDA GPU, and PyTorch sees none here; use cpu (or auto, which takes a GPU where there is one)"
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        return f"{name!r} asks for GPU {device.index}, and this machine has {torch.cuda.device_count()} (cuda:0 to cuda:{torch.cuda.device_count() - 1})"
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        return f"{name!r} asks for Apple's MPS, which is not available here; use cpu or auto"
    return None

"""int8 prediction on the CPU: a copy of the backbone whose linear layers compute in int8.

Dynamic quantisation (PyTorch's own `quantize_dynamic`, no hand-written kernels): each `nn.Linear`
of the backbone (the attention's qkv and output projections, the MLP's two layers) stores its
weights as int8, one scale per output channel, and quantises its input activations to uint8 per
batch at run time, so no calibration images are needed. Everything else stays float32: the patch
embedding, LayerNorm, GELU, the attention matmuls (softmax(QK^T)V), the residual adds, and the heads
with their temperatures and thresholds (they read the float32 pooled feature). The
out-of-distribution gate reads its feature from the same int8 backbone pass.

One linear stays float32: the last block's qkv, whose weight `Attention.forward(..., class_only=True)` slices
(query for the class token only, keys and values for every token) and so must be a plain tensor.

The quantised copy is made once per backbone and kept here, beside the model rather than on it (a
weak map from backbone to copy: it goes with its backbone, a site's view of the model shares it,
and the model never carries state it did not load); it is made again when a backbone parameter
has changed since (a new tensor, or an in-place update such as an optimizer step or
`load_state_dict`).

torch's eager quantisation API (`torch.ao.quantization`) warns that it is deprecated in favour of
torchao; torchao is a separate package, and the API still ships with torch and works, so the warning
is silenced here.
"""

from __future__ import annotations

import copy
import warnings
import weakref

import torch
from torch import nn

from mvit.errors import ConfigError
from mvit.runtime.precision import check_int8_device
from mvit.core.model import Model

# backbone -> (its fingerprint when quantised, the int8 copy)
_int8_copies: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, nn.Module]]" = weakref.WeakKeyDictionary()


def quantization_engine() -> str:
    """fbgemm on x86 CPUs (x86 and onednn ran the same within noise on the development machine:
    docs/results.md), qnnpack on ARM."""
    engines = torch.backends.quantized.supported_engines
    for engine in ("fbgemm", "x86", "qnnpack"):
        if engine in engines:
            return engine
    raise ConfigError("this PyTorch build has no int8 CPU kernels (no quantized engine); use --precision fp32")


def quantizable_linears(backbone: nn.Module) -> list[str]:
    """Names of the backbone's `nn.Linear` modules that are called as modules (all but the last
    block's qkv, whose weight is sliced)."""
    last_qkv = f"blocks.{len(backbone.blocks) - 1}.attention.qkv"
    return [name for name, module in backbone.named_modules() if isinstance(module, nn.Linear) and name != last_qkv]


def quantize_backbone(backbone: nn.Module) -> nn.Module:
    """A copy of `backbone` (in eval mode) with its linear layers dynamically quantised to int8."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    check_int8_device(next(backbone.parameters()).device)
    names = quantizable_linears(backbone)
    engine, before = quantization_engine(), torch.backends.quantized.engine
    quantized = copy.deepcopy(backbone).eval()
    try:
        # the engine packs the weights; the packed weights keep their kernels after it is restored
        torch.backends.quantized.engine = engine
        with warnings.catch_warnings():
            # see the module docstring; torch also warns (UserWarning) that quantized tensors are deprecated
            warnings.filterwarnings("ignore", message=".*deprecated.*")
            quantize_dynamic(quantized, {name: per_channel_dynamic_qconfig for name in names}, dtype=torch.qint8, inplace=True)
    finally:
        torch.backends.quantized.engine = before
    for parameter in quantized.parameters():
        parameter.requires_grad_(False)
    return quantized


def _fingerprint(backbone: nn.Module) -> tuple:
    """Changes when any backbone tensor is replaced or updated in place."""
    return tuple((id(p), p.data_ptr(), p._version) for p in backbone.parameters())


def int8_backbone(model: Model) -> nn.Module:
    """The model's int8 backbone: made on first use, then reused while the backbone is unchanged."""
    fingerprint = _fingerprint(model.backbone)
    cached = _int8_copies.get(model.backbone)
    if cached is not None and cached[0] == fingerprint:
        return cached[1]
    quantized = quantize_backbone(model.backbone)
    _int8_copies[model.backbone] = (fingerprint, quantized)
    return quantized


def is_quantized_linear(module: nn.Module) -> bool:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

    return isinstance(module, DynamicQuantizedLinear)

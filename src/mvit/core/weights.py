"""DeiT/timm weights in and out of mvit's backbone, with every tensor accounted for.

timm names and mvit names differ, so a loader that matched names loosely would silently keep random
weights. Here each checkpoint tensor is either renamed to exactly one backbone tensor or is on the
short list of tensors a backbone has no use for (the ImageNet classifier); anything else, and any
backbone tensor left without a value, is an error that names it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
from torch import Tensor

from mvit.core.vit import NAMED_CONFIGS, VisionTransformer, ViTConfig, named_config, resample_position_embedding
from mvit.errors import WeightsError

# (timm name, mvit name) of each module or parameter; '#' stands for a block index
_NAME_PAIRS = [
    ("cls_token", "class_token"),
    ("pos_embed", "position_embedding"),
    ("patch_embed.proj", "patch_embed.projection"),
    ("blocks.#.norm1", "blocks.#.attention_norm"),
    ("blocks.#.attn.qkv", "blocks.#.attention.qkv"),
    ("blocks.#.attn.proj", "blocks.#.attention.out"),
    ("blocks.#.norm2", "blocks.#.mlp_norm"),
    ("blocks.#.mlp.fc1", "blocks.#.mlp.fc_in"),
    ("blocks.#.mlp.fc2", "blocks.#.mlp.fc_out"),
    ("norm", "final_norm"),
]
# timm tensors that are not part of a backbone: the ImageNet classifier
_NOT_BACKBONE = re.compile(r"^head\.(weight|bias)$")
# wrappers DeiT's release files and training scripts put around the state dict
_WRAPPER_KEYS = ("model", "state_dict", "model_state_dict")
HUB_HOST = "huggingface.co"  # where timm finds DeiT weights


def _rename_rules(source: int) -> list[tuple[re.Pattern, str]]:
    """Regexes from one naming to the other; group 1 is the block index where there is one."""
    rules = []
    for pair in _NAME_PAIRS:
        has_index = "#" in pair[source]
        pattern = re.escape(pair[source]).replace("\\#", r"(\d+)")
        suffix_group = 2 if has_index else 1
        replacement = pair[1 - source].replace("#", r"\1") + rf"\g<{suffix_group}>"
        rules.append((re.compile(rf"^{pattern}(\.weight|\.bias)?$"), replacement))
    return rules


_TIMM_TO_MVIT = _rename_rules(source=0)
_MVIT_TO_TIMM = _rename_rules(source=1)


def _rename(name: str, rules: list[tuple[re.Pattern, str]]) -> Optional[str]:
    for pattern, replacement in rules:
        if pattern.match(name):
            return pattern.sub(replacement, name)
    return None


def timm_name(mvit_name: str) -> str:
    renamed = _rename(mvit_name, _MVIT_TO_TIMM)
    if renamed is None:
        raise KeyError(f"no timm name for backbone tensor {mvit_name}")
    return renamed


def load_timm_state_dict(backbone: VisionTransformer, state_dict: Mapping[str, Tensor]) -> int:
    """Copy a timm/DeiT state dict into `backbone`; returns how many tensors were loaded.

    Position embeddings made for another image size are resampled to the backbone's patch grid.
    """
    expected = backbone.state_dict()
    converted: dict[str, Tensor] = {}
    unexpected, wrong_shape, misfits = [], [], set()
    for name, tensor in state_dict.items():
        if _NOT_BACKBONE.match(name):
            continue
        ours = _rename(name, _TIMM_TO_MVIT)
        if ours is None or ours not in expected:
            unexpected.append(name)
            continue
        if ours == "position_embedding" and tensor.shape != expected[ours].shape and tensor.ndim == 3:
            grid = backbone.config.grid_size
            tensor = resample_position_embedding(tensor, (grid, grid))
        if tensor.shape != expected[ours].shape:
            wrong_shape.append(f"{name} is {tuple(tensor.shape)}, the backbone needs {tuple(expected[ours].shape)}")
            misfits.add(ours)
            continue
        converted[ours] = tensor
    missing = [timm_name(name) for name in expected if name not in converted and name not in misfits]
    problems = []
    if missing:
        problems.append("missing " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected " + ", ".join(unexpected))
    if wrong_shape:
        problems.append("wrong shape: " + "; ".join(wrong_shape))
    if problems:
        raise WeightsError(f"the checkpoint does not fit the backbone ({_describe(backbone.config)}): " + "; ".join(problems))
    backbone.load_state_dict(converted, strict=True)
    return len(converted)


def export_timm_state_dict(backbone: VisionTransformer) -> dict[str, Tensor]:
    """The backbone's tensors under timm's names; loads into `timm.create_model(name, num_classes=0)`."""
    return {timm_name(name): tensor for name, tensor in backbone.state_dict().items()}


def read_checkpoint(path: Union[str, Path]) -> dict[str, Tensor]:
    """Tensors of a `.safetensors` file, or of a `.pth`/`.bin`/`.pt` file read without unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"no weights file at {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # safetensors, zip and unpickler errors come in many types
        raise WeightsError(
            f"could not read weights from {path}: {str(error).splitlines()[0]} "
            "(mvit reads .safetensors, or .pth/.bin files that hold tensors only)"
        ) from None
    for key in _WRAPPER_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    return state


def download_timm_state_dict(name: str) -> dict[str, Tensor]:
    """Pretrained DeiT weights through timm (needs the internet, or timm's local cache)."""
    if name not in NAMED_CONFIGS:
        raise WeightsError(f"timm has no pretrained weights under mvit's name {name!r}; use one of {', '.join(NAMED_CONFIGS)}")
    if not os.environ.get("HF_HUB_OFFLINE"):
        _check_hub_reachable(name)
    import timm

    try:
        return timm.create_model(name, pretrained=True, num_classes=0).state_dict()
    except Exception as error:  # network and hub failures arrive as many exception types
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise WeightsError(
            f"could not download pretrained {name} weights through timm ({reason}); "
            "connect to the internet, or download the DeiT checkpoint elsewhere and pass its path as weights"
        ) from None


def _check_hub_reachable(name: str) -> None:
    """Fail in a second, not after a minute of retries, when the Hugging Face Hub cannot be resolved."""
    import socket

    try:
        socket.getaddrinfo(HUB_HOST, 443)
    except OSError:
        raise WeightsError(
            f"could not download pretrained {name} weights: {HUB_HOST} cannot be reached (offline?); "
            "connect to the internet, set HF_HUB_OFFLINE=1 to use weights already in the Hugging Face cache, "
            "or download the DeiT checkpoint elsewhere and pass its path as weights"
        ) from None


def create_backbone(
    name: Union[str, ViTConfig] = "deit_base_patch16_224",
    weights: Union[None, str, Path] = None,
    **overrides,
) -> VisionTransformer:
    """A backbone by name (or config), with random weights, timm's pretrained DeiT, or a file.

    `weights=None`: random initialisation. `weights="timm"`: download through timm.
    Otherwise a path to a timm/DeiT checkpoint. `overrides` change the named configuration,
    e.g. `image_size=384` (position embeddings are then resampled) or `drop_path=0.1`.
    """
    config = named_config(name, **overrides)
    backbone = VisionTransformer(config)
    if weights is None:
        return backbone
    if weights == "timm":
        if not isinstance(name, str):
            raise WeightsError("weights='timm' needs a named backbone such as deit_small_patch16_224")
        state = download_timm_state_dict(name)
    else:
        state = read_checkpoint(weights)
    load_timm_state_dict(backbone, state)
    return backbone


def _describe(config: ViTConfig) -> str:
    return f"width {config.width}, depth {config.depth}, {config.num_heads} heads, patch {config.patch_size}"

"""Preprocessing (stored with every model) and training augmentation.

Inference: shorter side to `image_size / crop_fraction`, centre crop to `image_size`, ImageNet
normalisation, as DeiT was trained. Dermoscopic images put the lesion in the middle, so the crop
keeps it. Training: random crops, flips and right-angle turns (a lesion has no "up"), colour jitter.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Preprocessing(BaseModel):
    """How an image becomes the (3, S, S) tensor the backbone expects."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    image_size: int = Field(default=224, gt=0)
    resize: Literal["crop", "squash"] = "crop"  # crop: keep aspect, centre crop; squash: stretch to square
    crop_fraction: float = Field(default=0.9, gt=0, le=1)  # DeiT's crop_pct
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


class Augmentation(BaseModel):
    """Training-time augmentation; all of it keeps the lesion's diagnosis unchanged."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    crop_scale: tuple[float, float] = (0.35, 1.0)  # fraction of the image area each random crop keeps
    flips: bool = True  # horizontal and vertical flips and right-angle rotations
    rotation_degrees: float = Field(default=0.0, ge=0, le=180)
    color_jitter: float = Field(default=0.2, ge=0, le=1)  # brightness, contrast, saturation
    hue_jitter: float = Field(default=0.02, ge=0, le=0.5)


def _interpolation(pre: Preprocessing) -> InterpolationMode:
    return InterpolationMode.BICUBIC if pre.interpolation == "bicubic" else InterpolationMode.BILINEAR


def _to_normalised_tensor(pre: Preprocessing) -> list:
    return [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(pre.mean, pre.std)]


def eval_transform(pre: Preprocessing) -> T.Compose:
    """PIL RGB image -> normalised (3, S, S) float tensor."""
    mode = _interpolation(pre)
    if pre.resize == "squash":
        resize = [T.Resize((pre.image_size, pre.image_size), interpolation=mode, antialias=True)]
    else:
        shorter = round(pre.image_size / pre.crop_fraction)
        resize = [T.Resize(shorter, interpolation=mode, antialias=True), T.CenterCrop(pre.image_size)]
    return T.Compose(resize + _to_normalised_tensor(pre))


def train_transform(pre: Preprocessing, aug: Augmentation) -> T.Compose:
    """PIL RGB image -> randomly augmented, normalised (3, S, S) float tensor."""
    if not aug.enabled:
        return eval_transform(pre)
    steps: list = [T.RandomResizedCrop(pre.image_size, scale=aug.crop_scale, interpolation=_interpolation(pre), antialias=True)]
    if aug.flips:
        steps += [T.RandomHorizontalFlip(), T.RandomVerticalFlip(), RandomRightAngle()]
    if aug.rotation_degrees:
        steps.append(T.RandomRotation(aug.rotation_degrees, interpolation=InterpolationMode.BILINEAR))
    if aug.color_jitter or aug.hue_jitter:
        j = aug.color_jitter
        steps.append(T.ColorJitter(brightness=j, contrast=j, saturation=j, hue=aug.hue_jitter))
    return T.Compose(steps + _to_normalised_tensor(pre))


class RandomRightAngle(torch.nn.Module):
    """Rotate by 0, 90, 180 or 270 degrees: exact, no interpolation, no corners lost."""

    def forward(self, image):
        turns = int(torch.randint(4, ()).item())
        return T.functional.rotate(image, 90 * turns) if turns else image


def normalise(images: Tensor, pre: Preprocessing) -> Tensor:
    """(B, 3, H, W) floats in [0, 1] -> normalised like `eval_transform` does."""
    mean = torch.tensor(pre.mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std

"""The transforms of Preprocessing (the value stored with every model, `mvit.core.preprocessing`) and
training augmentation.

Inference: optional colour constancy, shorter side to `image_size / crop_fraction`, centre crop to
`image_size`, ImageNet normalisation, as DeiT was trained. Dermoscopic images put the lesion in the
middle, so the crop keeps it. Training: random crops, flips and right-angle turns (a lesion has no
"up"), colour jitter, and optionally torchvision's automatic policies, random erasing and the
acquisition shifts that separate one clinic's dermatoscope from another's (resolution, JPEG,
blur, exposure, vignetting).

Colour constancy is the first step on the decoded image (after the acquisition shifts in
training), so it sees the same pixels at training, evaluation and prediction.
"""

from __future__ import annotations

from typing import Literal

import math

import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from mvit.core.preprocessing import Preprocessing

class AcquisitionShift(BaseModel):
    """How often each imitation of another clinic's camera is applied to a training image (0: never).

    Applied to the whole decoded image before colour constancy, as a real camera's would be.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    resample: float = Field(default=0.0, ge=0, le=1)  # shrink to 25-100 % and enlarge back: a lower-resolution sensor
    jpeg: float = Field(default=0.0, ge=0, le=1)  # re-compress at quality 30-95
    blur: float = Field(default=0.0, ge=0, le=1)  # Gaussian blur, sigma 0.3-2 px: focus and optics
    exposure: float = Field(default=0.0, ge=0, le=1)  # brightness and contrast +-30 %, gamma 0.7-1.5
    vignette: float = Field(default=0.0, ge=0, le=1)  # dark corners outside a circle, as a dermatoscope's lens leaves


class Mixing(BaseModel):
    """Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) of the images in a batch, with the
    targets of every head mixed in the same proportion. Applied by the trainer, batch by batch."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mixup_alpha: float = Field(default=0.0, ge=0)  # Beta(alpha, alpha) mixing weights; 0: no mixup
    cutmix_alpha: float = Field(default=0.0, ge=0)  # Beta(alpha, alpha) pasted-box areas; 0: no cutmix
    probability: float = Field(default=1.0, ge=0, le=1)  # share of batches that are mixed
    cutmix_share: float = Field(default=0.5, ge=0, le=1)  # with both on: share of mixed batches that use cutmix
    off_epochs: int = Field(default=0, ge=0)  # the last epochs train on unmixed images

    @property
    def enabled(self) -> bool:
        return self.probability > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)


class Augmentation(BaseModel):
    """Training-time augmentation; all of it keeps the lesion's diagnosis unchanged."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    crop_scale: tuple[float, float] = (0.35, 1.0)  # fraction of the image area each random crop keeps
    flips: bool = True  # horizontal and vertical flips and right-angle rotations
    rotation_degrees: float = Field(default=0.0, ge=0, le=180)
    color_jitter: float = Field(default=0.2, ge=0, le=1)  # brightness, contrast, saturation
    hue_jitter: float = Field(default=0.02, ge=0, le=0.5)
    # torchvision's automatic augmentation: TrivialAugmentWide or RandAugment (2 ops, magnitude 9)
    policy: Literal["none", "trivial_augment", "rand_augment"] = "none"
    random_erasing: float = Field(default=0.0, ge=0, le=1)  # probability of erasing a random box
    shift: AcquisitionShift = Field(default_factory=AcquisitionShift)
    mixing: Mixing = Field(default_factory=Mixing)


def _interpolation(pre: Preprocessing) -> InterpolationMode:
    return InterpolationMode.BICUBIC if pre.interpolation == "bicubic" else InterpolationMode.BILINEAR


def _colour_constancy(pre: Preprocessing) -> list:
    return [ShadesOfGray(pre.color_constancy_power)] if pre.color_constancy == "shades_of_gray" else []


def _to_normalised_tensor(pre: Preprocessing) -> list:
    return [T.ToDtype(torch.float32, scale=True), T.Normalize(pre.mean, pre.std)]


def eval_transform(pre: Preprocessing) -> T.Compose:
    """PIL RGB image -> normalised (3, S, S) float tensor."""
    mode = _interpolation(pre)
    if pre.resize == "squash":
        resize = [T.Resize((pre.image_size, pre.image_size), interpolation=mode, antialias=True)]
    else:
        shorter = round(pre.image_size / pre.crop_fraction)
        resize = [T.Resize(shorter, interpolation=mode, antialias=True), T.CenterCrop(pre.image_size)]
    # PIL resizing, as every model before colour constancy was evaluated: their numbers stay the same
    return T.Compose([*_colour_constancy(pre), *resize, T.ToImage(), *_to_normalised_tensor(pre)])


def train_transform(pre: Preprocessing, aug: Augmentation) -> T.Compose:
    """PIL RGB image -> randomly augmented, normalised (3, S, S) float tensor."""
    if not aug.enabled:
        return eval_transform(pre)
    steps: list = [T.ToImage(), *_acquisition_shift(aug.shift), *_colour_constancy(pre)]
    steps.append(T.RandomResizedCrop(pre.image_size, scale=aug.crop_scale, interpolation=_interpolation(pre), antialias=True))
    if aug.flips:
        steps += [T.RandomHorizontalFlip(), T.RandomVerticalFlip(), RandomRightAngle()]
    if aug.rotation_degrees:
        steps.append(T.RandomRotation(aug.rotation_degrees, interpolation=InterpolationMode.BILINEAR))
    if aug.color_jitter or aug.hue_jitter:
        j = aug.color_jitter
        steps.append(T.ColorJitter(brightness=j, contrast=j, saturation=j, hue=aug.hue_jitter))
    if aug.policy == "trivial_augment":
        steps.append(T.TrivialAugmentWide(interpolation=InterpolationMode.BILINEAR))
    elif aug.policy == "rand_augment":
        steps.append(T.RandAugment(interpolation=InterpolationMode.BILINEAR))
    steps += _to_normalised_tensor(pre)
    if aug.random_erasing:
        steps.append(T.RandomErasing(p=aug.random_erasing, value=0))  # 0 is the mean colour after normalising
    return T.Compose(steps)


def _acquisition_shift(shift: AcquisitionShift) -> list:
    """uint8 image (3, H, W) -> the same image as another clinic's camera might have taken it."""
    steps = [
        (shift.resample, RandomResample((0.25, 1.0))),
        (shift.blur, T.GaussianBlur(kernel_size=9, sigma=(0.3, 2.0))),
        (shift.exposure, T.Compose([T.ColorJitter(brightness=0.3, contrast=0.3), RandomGamma((0.7, 1.5))])),
        (shift.vignette, RandomVignette()),
        (shift.jpeg, T.JPEG((30, 95))),  # last, as a camera or an archive compresses the final image
    ]
    return [T.RandomApply([step], p=p) for p, step in steps if p > 0]


class ShadesOfGray(torch.nn.Module):
    """Colour constancy: uint8 image (3, H, W) or PIL image -> the image under a neutral illuminant.

    The illuminant is each channel's Minkowski p-norm mean, (mean x^p)^(1/p); each channel is
    scaled so the illuminant becomes grey of the same length. p = 1 is grey world, p -> inf is
    max-RGB; p = 6 (Finlayson & Trezzi 2004) is the compromise the ISIC 2019 winners used.
    """

    def __init__(self, power: float = 6.0):
        super().__init__()
        self.power = power

    def forward(self, image):
        if isinstance(image, Image.Image):  # evaluation resizes PIL images; the pixels are the same
            return T.functional.to_pil_image(self(T.functional.pil_to_tensor(image)))
        pixels = image.float() / 255.0  # (3, H, W)
        illuminant = pixels.pow(self.power).mean(dim=(-2, -1)).pow(1.0 / self.power).clamp_min(1e-6)  # (3,)
        gain = illuminant.norm() / (illuminant * math.sqrt(3.0))  # (3,); a grey illuminant gives 1, 1, 1
        balanced = (pixels * gain[:, None, None]).clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)
        return tv_tensors.wrap(balanced, like=image) if isinstance(image, tv_tensors.Image) else balanced


class RandomResample(torch.nn.Module):
    """Shrink by a random factor and enlarge back: the detail a lower-resolution camera loses."""

    def __init__(self, scale: tuple[float, float]):
        super().__init__()
        self.scale = scale

    def forward(self, image: Tensor) -> Tensor:
        height, width = image.shape[-2:]
        factor = float(torch.empty(()).uniform_(*self.scale))
        small = (max(8, round(height * factor)), max(8, round(width * factor)))
        down = T.functional.resize(image, list(small), interpolation=InterpolationMode.BILINEAR, antialias=True)
        return T.functional.resize(down, [height, width], interpolation=InterpolationMode.BILINEAR, antialias=False)


class RandomGamma(torch.nn.Module):
    """A random gamma curve: a sensor's or a raw converter's different tone response."""

    def __init__(self, gamma: tuple[float, float]):
        super().__init__()
        self.gamma = gamma

    def forward(self, image: Tensor) -> Tensor:
        return T.functional.adjust_gamma(image, float(torch.empty(()).uniform_(*self.gamma)))


class RandomVignette(torch.nn.Module):
    """Dark corners: outside a random circle the image fades to black, as a dermatoscope's round
    field of view leaves in a rectangular photo."""

    def forward(self, image: Tensor) -> Tensor:
        height, width = image.shape[-2:]
        radius = float(torch.empty(()).uniform_(0.6, 1.0))  # in units of the half-diagonal
        softness = float(torch.empty(()).uniform_(0.05, 0.3))
        strength = float(torch.empty(()).uniform_(0.5, 1.0))
        y = torch.linspace(-height / 2, height / 2, height).view(-1, 1)
        x = torch.linspace(-width / 2, width / 2, width).view(1, -1)
        distance = (x.square() + y.square()).sqrt() / (0.5 * math.hypot(height, width))  # (H, W), 1 at the corners
        darkness = ((distance - radius) / softness).clamp(0.0, 1.0) * strength  # (H, W)
        shaded = image.float() * (1.0 - darkness)
        return tv_tensors.wrap(shaded.round().to(image.dtype), like=image) if isinstance(image, tv_tensors.Image) else shaded.round().to(image.dtype)


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

"""How an image becomes the tensor the backbone expects: a value stored in every model file, applied
by `mvit.data.transforms`."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

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
    # "shades_of_gray": divide out the illuminant estimated by the Minkowski p-norm of each channel
    # (Finlayson & Trezzi 2004), so one clinic's warm lamp and another's cold LED look alike
    color_constancy: Literal["none", "shades_of_gray"] = "none"
    color_constancy_power: float = Field(default=6.0, ge=1)  # p = 6, as the ISIC 2019 winners used

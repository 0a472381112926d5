"""Soft targets for every head of a batch, with mixup and cutmix of the images.

A dataset can feed several heads (HAM10000: 7 diagnoses and melanoma-or-not), and a head may leave
some of its samples out (target IGNORE). Mixing pairs each image with another image of the same
batch, so every head's target becomes the same blend of the two images' one-hot classes; a head
that leaves out either image of a pair leaves out the mixed image too. Balanced batches stay
balanced: the partner comes from the same batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mvit.data.transforms import Mixing

IGNORE = -100  # target of a sample that a head leaves out


@dataclass(frozen=True)
class Mix:
    """How a batch was mixed: image i is `weight` of image i and 1 - weight of image partner[i]."""

    partner: Tensor  # (B,) indices into the batch
    weight: float  # the share of each image's own pixels, after cutmix's box is clipped to the image

    @classmethod
    def none(cls, batch: int, device=None) -> "Mix":
        return cls(torch.arange(batch, device=device), 1.0)


def mix_images(images: Tensor, mixing: Mixing) -> tuple[Tensor, Mix]:
    """Images (B, 3, S, S) -> mixed images (B, 3, S, S) and how they were mixed.

    Randomness comes from torch's global generator, which the trainer seeds per epoch.
    """
    B = images.shape[0]
    if not mixing.enabled or float(torch.rand(())) >= mixing.probability:
        return images, Mix.none(B, images.device)
    partner = torch.randperm(B, device=images.device)
    use_cutmix = mixing.cutmix_alpha > 0 and (mixing.mixup_alpha == 0 or float(torch.rand(())) < mixing.cutmix_share)
    alpha = mixing.cutmix_alpha if use_cutmix else mixing.mixup_alpha
    weight = float(torch.distributions.Beta(alpha, alpha).sample())
    if not use_cutmix:
        return weight * images + (1.0 - weight) * images[partner], Mix(partner, weight)
    # cutmix: paste a box of the partner covering about 1 - weight of the area
    height, width = images.shape[-2:]
    cut = (1.0 - weight) ** 0.5
    box_h, box_w = round(height * cut), round(width * cut)
    cy, cx = int(torch.randint(height, ())), int(torch.randint(width, ()))
    top, bottom = max(0, cy - box_h // 2), min(height, cy + box_h - box_h // 2)
    left, right = max(0, cx - box_w // 2), min(width, cx + box_w - box_w // 2)
    mixed = images.clone()
    mixed[..., top:bottom, left:right] = images[partner][..., top:bottom, left:right]
    kept = 1.0 - (bottom - top) * (right - left) / (height * width)  # the box may have been clipped at an edge
    return mixed, Mix(partner, kept)


def soft_targets(targets: Tensor, classes: int, mix: Mix, label_smoothing: float = 0.0) -> tuple[Tensor, Tensor]:
    """One head's class indices (B,) (IGNORE where it leaves a sample out) -> (soft targets (b, K)
    summing to one, which rows of the batch they belong to (B,) bool)."""
    keep = (targets != IGNORE) & (targets[mix.partner] != IGNORE)  # (B,)
    own = F.one_hot(targets.clamp_min(0), classes).float()  # (B, K); IGNORE rows are dropped by `keep`
    smoothed = own * (1.0 - label_smoothing) + label_smoothing / classes
    blended = mix.weight * smoothed + (1.0 - mix.weight) * smoothed[mix.partner]
    return blended[keep], keep


def mixing_active(mixing: Mixing, epoch: int, epochs: int) -> bool:
    """Mixing is switched off for the last `off_epochs` epochs, so the model ends on real images."""
    return mixing.enabled and epoch < epochs - mixing.off_epochs

"""Where the backbone looked: attention maps for a batch of images, at each image's own size.

Four views, all from one pass of the backbone that keeps its attention probabilities
(`VisionTransformer.forward_intermediates(..., attention=True)`):

- last layer: the class token's attention to each patch in the last block, averaged over heads
  (the usual first look), and the same per attention head and per layer;
- rollout (Abnar & Zuidema, 2020): attention multiplied through the layers, with the residual
  connection counted as half of each layer's mixing;
- class-specific (Chefer et al., 2021, "Generic attention-model explainability"): each layer's
  attention weighted by the gradient of the chosen head's class logit, positive part, rolled out.
  Plain attention is the same whatever class is asked about; this one is not.

Maps are placed on the original image where the model saw it: the preprocessing's centre crop is a
box inside the image, and outside that box a map is 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from mvit.data.dataset import ImageInput
from mvit.data.images import as_rgb_image
from mvit.core.preprocessing import Preprocessing
from mvit.data.transforms import eval_transform
from mvit.errors import ConfigError, ImageError
from mvit.infer.predict import image_id, image_list
from mvit.infer.prediction import calibrated, decide, thresholds_for
from mvit.core.model import Model


DEFAULT_BATCH_SIZE = 8  # each image keeps depth x (h, T, T) attention and its gradient alive


@dataclass(frozen=True)
class AttentionMaps:
    """Attention maps for one image, each (H, W) float32 at the size of `rgb` (the original, or
    scaled down to `max_size`). Raw attention weights: stretch them for display (`figures.overlay`)."""

    image: Union[str, int]  # the path as given, or the position in the input list
    rgb: np.ndarray  # (H, W, 3) uint8, the image the maps lie on
    crop_box: tuple[int, int, int, int]  # (left, top, right, bottom): the part of `rgb` the model saw
    last_layer: np.ndarray  # (H, W): class-token attention in the last layer, mean over heads
    rollout: np.ndarray  # (H, W)
    per_head: np.ndarray  # (h, H, W): last layer, each attention head
    per_layer: np.ndarray  # (L, H, W): each layer, mean over heads
    head: Optional[str] = None  # the classifier head the class-specific map explains
    target: Optional[str] = None  # the class it explains (by default the head's prediction)
    class_specific: Optional[np.ndarray] = None  # (H, W), when a head was given


def crop_box(width: int, height: int, pre: Preprocessing) -> tuple[float, float, float, float]:
    """The part of a width x height image that `eval_transform(pre)` keeps, in its own pixels."""
    if pre.resize == "squash":
        return 0.0, 0.0, float(width), float(height)
    shorter = round(pre.image_size / pre.crop_fraction)  # eval_transform resizes the shorter side to this
    side = pre.image_size * min(width, height) / shorter
    return (width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2


def _rollout(attentions: list[Tensor]) -> Tensor:
    """depth x (B, h, T, T) -> (B, T, T): head-averaged attention, half residual, multiplied through."""
    B, _, T, _ = attentions[0].shape
    identity = torch.eye(T, device=attentions[0].device).expand(B, T, T)
    result = identity
    for probabilities in attentions:
        mixing = 0.5 * probabilities.mean(dim=1) + 0.5 * identity  # (B, T, T), rows still sum to 1
        result = mixing @ result
    return result


def _gradient_weighted(attentions: list[Tensor], gradients: list[Tensor]) -> Tensor:
    """Chefer et al.'s rule: R <- R + mean_h((dy/dA * A)^+) R, from R = I. depth x (B, h, T, T) -> (B, T, T)."""
    B, _, T, _ = attentions[0].shape
    result = torch.eye(T, device=attentions[0].device).expand(B, T, T)
    for probabilities, gradient in zip(attentions, gradients):
        result = result + (gradient * probabilities).clamp(min=0).mean(dim=1) @ result
    return result


def _grid_maps(model: Model, images: Tensor, head: Optional[str], pick: Optional[Callable[[Tensor], Tensor]]) -> tuple[dict[str, Tensor], Optional[Tensor]]:
    """Images (B, 3, S, S) -> maps on the patch grid, name -> (B, M, g, g) with M = 1, h or L, and
    the class each class-specific map explains, `pick(logits (B, K))` -> (B,), when a head is given."""
    grid = images.shape[-1] // model.backbone.config.patch_size
    targets = None
    with torch.enable_grad() if head else torch.no_grad():
        tokens, attentions = model.backbone.forward_with_attention(images)  # (B, T, D), depth x (B, h, T, T)
        if head:
            logits = model.head_logits(tokens[:, 0], head)[head]  # (B, K)
            targets = pick(logits.detach())
            # images do not interact in a batch, so the gradient of the sum is each image's own gradient
            score = logits.gather(1, targets[:, None]).sum()
            gradients = torch.autograd.grad(score, attentions)
    with torch.no_grad():
        class_row = [probabilities[:, :, 0, 1:] for probabilities in attentions]  # depth x (B, h, N)
        maps = {
            "per_head": class_row[-1],
            "last_layer": class_row[-1].mean(dim=1, keepdim=True),
            "per_layer": torch.stack([row.mean(dim=1) for row in class_row], dim=1),  # (B, L, N)
            "rollout": _rollout(attentions)[:, None, 0, 1:],
        }
        if head:
            maps["class_specific"] = _gradient_weighted(attentions, gradients)[:, None, 0, 1:]
    grids = {name: value.detach().float().reshape(*value.shape[:2], grid, grid).cpu() for name, value in maps.items()}
    return grids, targets


def _place(maps: Tensor, size: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    """(M, g, g) -> (M, H, W): bilinearly upsampled into the crop box of an H x W canvas of zeros."""
    width, height = size
    left, top, right, bottom = box
    canvas = torch.zeros(maps.shape[0], height, width)
    inside = F.interpolate(maps[None], size=(bottom - top, right - left), mode="bilinear", align_corners=False)[0]
    canvas[:, top:bottom, left:right] = inside
    return canvas.numpy()


def _scaled(image: Image.Image, max_size: Optional[int]) -> Image.Image:
    if max_size is None or max(image.size) <= max_size:
        return image
    factor = max_size / max(image.size)
    return image.resize((max(1, round(image.width * factor)), max(1, round(image.height * factor))), Image.BICUBIC)


def _class_picker(model: Model, head: Optional[str], target: Optional[str],
                  threshold: Optional[float]) -> Optional[Callable[[Tensor], Tensor]]:
    """Which class each image's class-specific map explains: logits (B, K) -> class indices (B,).
    `target` for every image, else the head's own decision as `predict` makes it; None without a head."""
    if head is None:
        if target is not None:
            raise ConfigError("a target class needs a head to take it from; pass head=NAME")
        return None
    model.select_heads(head)
    info = model.heads[head]
    if target is not None:
        if target not in info.classes:
            raise ConfigError(f"head {head} has no class {target!r}; its classes are {', '.join(info.classes)}")
        chosen = info.classes.index(target)
        return lambda logits: torch.full((len(logits),), chosen, device=logits.device)
    positive = info.positive_index
    decision_threshold = thresholds_for(model.heads, [head], threshold if info.is_binary else None)[head]

    def decision(logits: Tensor) -> Tensor:
        probabilities = calibrated(logits.float(), info).cpu().numpy()  # (B, K)
        return torch.as_tensor(decide(probabilities, positive, decision_threshold), device=logits.device)

    return decision


def attention_maps(
    model: Model,
    images: ImageInput,
    head: Optional[str] = None,
    *,
    target: Optional[str] = None,
    threshold: Optional[float] = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_size: Optional[int] = None,
) -> list[AttentionMaps]:
    """Attention maps for one image or many (the inputs `predict` takes), in input order.

    head: also compute the class-specific map for this head, for class `target` (default: the
    head's own decision, using `threshold` or the stored one). max_size: scale maps and image down
    so the longer side is at most this many pixels (default: the original size).
    Raises `ImageError` naming the first input that cannot be read.
    """
    items = image_list(images)
    pick = _class_picker(model, head, target, threshold)
    info = model.heads[head] if head is not None else None
    model.eval()
    device = model.device
    transform = eval_transform(model.preprocessing)
    results: list[AttentionMaps] = []
    for start in range(0, len(items), batch_size):
        originals = [_decode(items[i], i) for i in range(start, min(start + batch_size, len(items)))]
        batch = torch.stack([transform(image) for image in originals]).to(device)  # (B, 3, S, S)
        grids, targets = _grid_maps(model, batch, head, pick)
        for row, original in enumerate(originals):
            index = start + row
            shown = _scaled(original, max_size)
            box = tuple(round(edge) for edge in crop_box(*shown.size, model.preprocessing))
            placed = {name: _place(value[row], shown.size, box) for name, value in grids.items()}
            results.append(
                AttentionMaps(
                    image=image_id(items[index], index),
                    rgb=np.asarray(shown),
                    crop_box=box,
                    last_layer=placed["last_layer"][0],
                    rollout=placed["rollout"][0],
                    per_head=placed["per_head"],
                    per_layer=placed["per_layer"],
                    head=head,
                    target=None if targets is None else info.classes[int(targets[row])],
                    class_specific=placed["class_specific"][0] if head else None,
                )
            )
    return results


def _decode(item, index: int) -> Image.Image:
    """Decode an input; one that fails is named by its path, or by its position in the list."""
    try:
        return as_rgb_image(item)
    except ImageError as error:
        if isinstance(image_id(item, index), str):
            raise
        raise ImageError(f"image {index}: {error}") from None

"""Predictions for images: decode (in worker processes, overlapped with the model), one backbone pass,
any number of heads, calibrated probabilities and each binary head's operating threshold.

`predict` is the API (`model.predict`); `predict_stream` is what the CLI runs over any number of
files: it yields one result per input in input order, a failure included, with memory bounded by
the batch size and the loader's prefetch, never by the number of files.

A model with an out-of-distribution gate (`model.ood_gate`, see `ood.py`) also scores every image's
backbone feature, from the same backbone pass, and can abstain: label `unknown` on every head.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from mvit.data.dataset import ImageBatch, ImageInput, SingleImage, image_loader
from mvit.data.transforms import eval_transform
from mvit.errors import ConfigError, ImageError, MvitError
from mvit.infer.prediction import UNKNOWN, ImageResult, Prediction, calibrated, decide, thresholds_for
from mvit.infer.quantize import int8_backbone
from mvit.runtime.options import RunOptions
from mvit.runtime.precision import Precision, autocast, autocast_dtype
from mvit.core.model import Model


HeadSelection = Union[None, str, Iterable[str]]

DEFAULT_BATCH_SIZE = 32


def image_id(item: SingleImage, index: int) -> Union[str, int]:
    return str(item) if isinstance(item, (str, Path)) else index


def image_list(images: ImageInput) -> list[SingleImage]:
    if isinstance(images, (str, Path, Image.Image)):
        return [images]
    if isinstance(images, np.ndarray):
        return [images] if images.ndim in (2, 3) else list(images)  # (N, H, W, C) is a batch
    if isinstance(images, Tensor):
        return [images] if images.ndim == 3 else list(images)  # (N, C, H, W) is a batch
    return list(images)


@dataclass(frozen=True)
class LogitsBatch:
    """Raw logits for the inputs of one batch that decoded, and errors for those that did not."""

    indices: list[int]  # positions in the input list, one per logits row
    logits: dict[str, Tensor]  # head -> (b, K) float32 on the CPU
    errors: dict[int, str]  # input position -> what is wrong with it
    ood_scores: Optional[Tensor] = None  # (b,) float32 on the CPU, when the model has a gate


# ---- the model side -----------------------------------------------------------------------------------


def forward_images(
    model: Model, images: Tensor, heads: list[str], *, tta: bool, dtype: Optional[torch.dtype],
    backbone: Optional[torch.nn.Module] = None,
) -> tuple[dict[str, Tensor], Optional[Tensor]]:
    """Normalised images (B, 3, S, S) -> ({head: float32 logits (B, K)}, gate scores (B,) or None),
    both on the CPU, from one backbone pass (`backbone_pass`, then `head_logits`)."""
    features, scores = backbone_pass(model, images, tta=tta, dtype=dtype, backbone=backbone)
    return head_logits(model, features, heads, len(images), dtype), scores


def backbone_pass(
    model: Model, images: Tensor, *, tta: bool, dtype: Optional[torch.dtype], backbone: Optional[torch.nn.Module] = None,
) -> tuple[Tensor, Optional[Tensor]]:
    """Normalised images (B, 3, S, S) -> (pooled features (B or 4B, D) on the images' device, gate
    scores (B,) on the CPU or None).

    Flip test-time augmentation runs the four flips of each image (a lesion has no "up" or "left")
    in the same pass; `head_logits` averages their logits. The gate scores the un-flipped image's
    feature only: its threshold was chosen on un-flipped features, and a mean of four flipped
    features is pulled towards the centre of the feature cloud, so it would be scored against the
    wrong threshold. The score is then the same with and without `tta`. `backbone`: run this one
    instead of the model's (the int8 copy of `mvit.infer.quantize`).
    """
    B = images.shape[0]
    backbone = model.backbone if backbone is None else backbone
    if tta:
        # (4B, 3, S, S): original, left-right, up-down, both
        images = torch.cat([images, images.flip(-1), images.flip(-2), images.flip(-1, -2)])
    gate = model.ood_gate
    with torch.inference_mode():
        with autocast(images.device, dtype):
            if gate is None:
                features = backbone(images)  # (B or 4B, D)
            else:  # the same pass, also yielding the feature the gate reads (B or 4B, D)
                features, looked_at = gate.features(backbone, images)
        # float32, outside autocast: a bfloat16 distance would blur scores near the threshold
        scores = None if gate is None else gate.score(looked_at[:B].float()).cpu()
    return features, scores


def head_logits(model: Model, features: Tensor, heads: list[str], count: int, dtype: Optional[torch.dtype]) -> dict[str, Tensor]:
    """Pooled features of `count` images (or of their four flips, 4 x count rows) -> {head: float32
    logits (count, K)} on the CPU, the flips' logits averaged. `model` may be a site's view of the
    model (`Model.with_site`): the same features, that site's heads."""
    with torch.inference_mode(), autocast(features.device, dtype):
        logits = model.head_logits(features, heads)
    return {name: value.float().reshape(-1, count, value.shape[-1]).mean(0).cpu() for name, value in logits.items()}


def image_batches(
    model: Model,
    items: Sequence[SingleImage],
    *,
    precision: Precision = "auto",
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int = 0,
) -> Iterator[tuple[ImageBatch, Optional[torch.dtype]]]:
    """Decoded batches in input order, decoding in `workers` processes ahead of the model, with the
    images moved to the model's device; and the autocast dtype to run them in."""
    device = model.device
    dtype = autocast_dtype(precision, device)
    model.eval()
    for batch in image_loader(items, eval_transform(model.preprocessing), batch_size=batch_size, workers=workers, device=device):
        if batch.images is not None:
            batch.images = batch.images.to(device, non_blocking=True)
        yield batch, dtype


def logits_stream(
    model: Model,
    items: Sequence[SingleImage],
    heads: HeadSelection = None,
    *,
    tta: bool = False,
    precision: Precision = "auto",
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int = 0,
) -> Iterator[LogitsBatch]:
    """Raw logits (and gate scores) batch by batch, in input order."""
    names = model.select_heads(heads)
    backbone = None  # the model's own; int8: its quantised copy, made once per model (after the device check)
    for batch, dtype in image_batches(model, items, precision=precision, batch_size=batch_size, workers=workers):
        if precision == "int8" and backbone is None:
            backbone = int8_backbone(model)
        logits, scores = ({}, None) if batch.images is None else forward_images(
            model, batch.images, names, tta=tta, dtype=dtype, backbone=backbone
        )
        yield LogitsBatch(batch.positions, logits, batch.errors, scores)


def batch_predictions(
    model: Model, batch: LogitsBatch, ids: Sequence[Union[str, int]], thresholds: dict[str, Optional[float]], abstain: bool = False
) -> dict[int, list[Prediction]]:
    """Input position -> its predictions, one per head, for the decoded inputs of a batch."""
    found: dict[int, list[Prediction]] = {index: [] for index in batch.indices}
    scores: list[Optional[float]] = [None] * len(batch.indices)
    accepted: list[Optional[bool]] = [None] * len(batch.indices)
    reasons: list[Optional[str]] = [None] * len(batch.indices)
    if batch.ood_scores is not None:
        scores = batch.ood_scores.tolist()
        accepted = model.ood_gate.accepts(batch.ood_scores).tolist()
        explain = getattr(model.ood_gate, "reason", None)  # a site's view: which checks an image failed
        if explain is not None:
            reasons = [explain(score) for score in scores]
    for name, logits in batch.logits.items():
        info = model.heads[name]
        probabilities = calibrated(logits, info).numpy()  # (b, K)
        positive = info.positive_index
        decided = decide(probabilities, positive, thresholds[name])  # (b,)
        for row, index in enumerate(batch.indices):
            found[index].append(
                Prediction(
                    image=ids[index],
                    head=name,
                    label=UNKNOWN if abstain and accepted[row] is False else info.classes[decided[row]],
                    probabilities=dict(zip(info.classes, probabilities[row].tolist())),
                    threshold=thresholds[name],
                    ood_score=scores[row],
                    in_distribution=accepted[row],
                    site=model.site,
                    ood_reason=reasons[row],
                )
            )
    return found


# ---- the API --------------------------------------------------------------------------------------------


IN_PROCESS = RunOptions(workers=0)  # the API's default: images decoded in this process, no workers to start


def predict_stream(
    model: Model,
    items: Sequence[SingleImage],
    head: HeadSelection = None,
    *,
    threshold: Optional[float] = None,
    tta: bool = False,
    abstain: bool = False,
    run: RunOptions = IN_PROCESS,
) -> Iterator[ImageResult]:
    """One `ImageResult` per input, in input order; a file that fails is reported and the rest go on.

    abstain: an image the model's out-of-distribution gate flags gets the label `unknown` on every
    head (its probabilities are still reported); needs a model with a gate. run: precision, batch
    size and decoding processes (`workers=None`: by image count and CPUs). A wrong head, threshold
    or option raises here, before any image is read.
    """
    names = model.select_heads(head)
    thresholds = thresholds_for(model.heads, names, threshold)
    if abstain and model.ood_gate is None:
        raise ConfigError(
            "abstaining needs a model with an out-of-distribution gate, and this one has none; "
            "fit one with `mvit calibrate`, or leave out --abstain"
        )
    ids = [image_id(item, index) for index, item in enumerate(items)]
    workers = run.workers_for(len(items), model.device)
    stream = logits_stream(model, items, names, tta=tta, precision=run.precision, batch_size=run.batch_size, workers=workers)
    return _results(model, stream, ids, thresholds, abstain)


def _results(model: Model, stream: Iterator[LogitsBatch], ids: list, thresholds: dict, abstain: bool) -> Iterator[ImageResult]:
    for batch in stream:
        found = batch_predictions(model, batch, ids, thresholds, abstain)
        for index in sorted([*found, *batch.errors]):
            if index in batch.errors:
                yield ImageResult(ids[index], error=batch.errors[index])
            else:
                yield ImageResult(ids[index], tuple(found[index]))


def predict(
    model: Model,
    images: ImageInput,
    head: HeadSelection = None,
    *,
    threshold: Optional[float] = None,
    tta: bool = False,
    device: Union[None, str, torch.device] = None,
    abstain: bool = False,
    run: RunOptions = IN_PROCESS,
) -> list[Prediction]:
    """Predictions for one image or many, image by image and, within an image, head by head.

    images: a path, PIL image, (H, W[, C]) array, (C, H, W) tensor, or a list of them (an
    (N, H, W, C) array or (N, C, H, W) tensor is N images). head: a name, a list of names (one
    backbone pass for all), or None / "all" for every head. threshold: overrides the stored
    threshold of the binary heads. device: moves the model there (default: where it is). run:
    precision, batch size and decoding processes (default: in this process). abstain: label `unknown` on every head for an image the model's out-of-distribution gate flags.
    Raises `ImageError` naming the first input that cannot be read.
    """
    if device is not None:
        model.to(device)
    items = image_list(images)
    if not items:
        raise MvitError("no images to predict; pass a path, PIL image, array or tensor, or a list of them")
    predictions: list[Prediction] = []
    for result in predict_stream(model, items, head, threshold=threshold, tta=tta, abstain=abstain, run=run):
        if result.error is not None:
            raise ImageError(result.error if isinstance(result.image, str) else f"image {result.image}: {result.error}")
        predictions.extend(result.predictions)
    return predictions

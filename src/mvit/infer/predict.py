"""Predictions for images: decode (in worker processes, overlapped with the model), one backbone pass,
any number of heads, calibrated probabilities and each binary head's operating threshold.

`predict` is the API (`model.predict`); `predict_stream` is what the CLI runs over any number of
files: it yields one result per input in input order, a failure included, with memory bounded by
the batch size and the loader's prefetch, never by the number of files.

A model with an out-of-distribution gate (`model.ood_gate`, see `ood.py`) also scores every image's
backbone feature, from the same backbone pass, and can abstain: label `unknown` on every head.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from mvit.data.images import as_rgb_image
from mvit.infer.model import HeadInfo, Model
from mvit.nn.precision import Precision, autocast, autocast_dtype
from mvit.data.transforms import eval_transform
from mvit.errors import ConfigError, ImageError, MvitError

SingleImage = Union[str, Path, Image.Image, np.ndarray, Tensor]
ImageInput = Union[SingleImage, Sequence[SingleImage]]
HeadSelection = Union[None, str, Iterable[str]]

DEFAULT_BATCH_SIZE = 32
PRECISIONS = ("auto", "fp32", "bf16")
UNKNOWN = "unknown"  # the label of every head for an image the gate flags, when abstaining


@dataclass(frozen=True)
class Prediction:
    """One head's answer for one image."""

    image: Union[str, int]  # the path as given, or the position in the input list for in-memory images
    head: str
    label: str  # the decided class: thresholded for a binary head, the most probable class otherwise
    probabilities: Mapping[str, float]  # class name -> probability, calibrated by the head's temperature
    threshold: Optional[float]  # binary heads: the positive-class probability needed to predict it
    # the out-of-distribution gate's verdict on the image (the same on every head); None without a gate
    ood_score: Optional[float] = None  # higher = less like the training images
    in_distribution: Optional[bool] = None  # ood_score <= the gate's threshold

    @property
    def probability(self) -> Optional[float]:
        """The probability of the decided label; None when the label is `unknown` (abstained)."""
        return self.probabilities.get(self.label)

    def as_dict(self) -> dict:
        return {**asdict(self), "probabilities": dict(self.probabilities)}


@dataclass(frozen=True)
class ImageResult:
    """One input's outcome: a prediction per selected head, or the one sentence saying why it failed."""

    image: Union[str, int]
    predictions: tuple[Prediction, ...] = ()
    error: Optional[str] = None


@dataclass(frozen=True)
class LogitsBatch:
    """Raw logits for the inputs of one batch that decoded, and errors for those that did not."""

    indices: list[int]  # positions in the input list, one per logits row
    logits: dict[str, Tensor]  # head -> (b, K) float32 on the CPU
    errors: dict[int, str]  # input position -> what is wrong with it
    ood_scores: Optional[Tensor] = None  # (b,) float32 on the CPU, when the model has a gate


# ---- decoding ---------------------------------------------------------------------------------------


class _DecodedImages(Dataset):
    """Input i -> (i, normalised image (3, S, S) or None, error sentence or None).

    A bad image is returned as its error instead of raised, so one bad file in a batch never takes
    the batch (or a worker process) down with it.
    """

    def __init__(self, items: Sequence[SingleImage], transform):
        self.items = items
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        try:
            return index, self.transform(as_rgb_image(self.items[index])), None
        except ImageError as error:
            return index, None, str(error)


def _collate(batch):
    """[(i, image (3, S, S) | None, error | None)] -> (decoded positions, images (b, 3, S, S) | None, errors)."""
    decoded = [(index, image) for index, image, _ in batch if image is not None]
    images = torch.stack([image for _, image in decoded]) if decoded else None
    errors = {index: error for index, _, error in batch if error is not None}
    return [index for index, _ in decoded], images, errors


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


# ---- the model side -----------------------------------------------------------------------------------


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")


def forward_images(
    model: Model, images: Tensor, heads: list[str], *, tta: bool, dtype: Optional[torch.dtype]
) -> tuple[dict[str, Tensor], Optional[Tensor]]:
    """Normalised images (B, 3, S, S) -> ({head: float32 logits (B, K)}, gate scores (B,) or None),
    both on the CPU, from one backbone pass.

    Flip test-time augmentation runs the four flips of each image (a lesion has no "up" or "left")
    in the same pass and averages their logits. The gate scores the un-flipped image's feature only:
    its threshold was chosen on un-flipped features, and a mean of four flipped features is pulled
    towards the centre of the feature cloud, so it would be scored against the wrong threshold.
    The score is then the same with and without `tta`.
    """
    B = images.shape[0]
    if tta:
        # (4B, 3, S, S): original, left-right, up-down, both
        images = torch.cat([images, images.flip(-1), images.flip(-2), images.flip(-1, -2)])
    gate = model.ood_gate
    with torch.inference_mode():
        with autocast(images.device, dtype):
            if gate is None:
                features = model.backbone(images)  # (B or 4B, D)
            else:  # the same pass, also yielding the feature the gate reads (B or 4B, D)
                features, looked_at = gate.features(model.backbone, images)
            logits = model.head_logits(features, heads)
        # float32, outside autocast: a bfloat16 distance would blur scores near the threshold
        scores = None if gate is None else gate.score(looked_at[:B].float()).cpu()
    return {name: value.float().reshape(-1, B, value.shape[-1]).mean(0).cpu() for name, value in logits.items()}, scores


def image_batches(
    model: Model,
    items: Sequence[SingleImage],
    *,
    precision: Precision = "auto",
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int = 0,
) -> Iterator[tuple[list[int], Optional[Tensor], dict[int, str], Optional[torch.dtype]]]:
    """Decoded batches in input order, decoding in `workers` processes ahead of the model: (positions,
    normalised images (b, 3, S, S) on the model's device or None, errors, autocast dtype)."""
    _check_precision(precision)
    device = next(model.parameters()).device
    dtype = autocast_dtype(precision, device)
    model.eval()
    loader = DataLoader(
        _DecodedImages(items, eval_transform(model.preprocessing)),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
        prefetch_factor=2 if workers else None,  # bounded read-ahead: memory does not grow with the file count
    )
    for indices, images, errors in loader:
        yield indices, None if images is None else images.to(device, non_blocking=True), errors, dtype


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
    for indices, images, errors, dtype in image_batches(model, items, precision=precision, batch_size=batch_size, workers=workers):
        logits, scores = ({}, None) if images is None else forward_images(model, images, names, tta=tta, dtype=dtype)
        yield LogitsBatch(indices, logits, errors, scores)


# ---- decisions ------------------------------------------------------------------------------------------


def decide(probabilities: np.ndarray, positive_index: Optional[int], threshold: Optional[float]) -> np.ndarray:
    """Probabilities (N, K) -> class indices (N,): a binary head predicts its positive class when that
    class's probability is at least the threshold; any other head predicts its most probable class."""
    if positive_index is None or threshold is None:
        return probabilities.argmax(axis=1)
    return np.where(probabilities[:, positive_index] >= threshold, positive_index, 1 - positive_index)


def calibrated(logits: Tensor, info: HeadInfo) -> Tensor:
    """Logits (N, K) -> probabilities (N, K) after the head's temperature scaling."""
    return (logits / info.temperature).softmax(dim=-1)


def thresholds_for(model: Model, heads: list[str], override: Optional[float]) -> dict[str, Optional[float]]:
    """Each head's decision threshold: `override`, else the stored one, else 0.5; None for multi-class."""
    if override is not None:
        if not 0.0 <= override <= 1.0:
            raise ConfigError(f"a threshold is a probability between 0 and 1, got {override}")
        if not any(model.heads[name].is_binary for name in heads):
            raise ConfigError(
                f"a threshold applies to binary heads only, and {', '.join(heads)} "
                f"{'is' if len(heads) == 1 else 'are'} not binary; leave out --threshold"
            )
    chosen = {}
    for name in heads:
        info = model.heads[name]
        stored = info.threshold if info.threshold is not None else 0.5
        chosen[name] = (override if override is not None else stored) if info.is_binary else None
    return chosen


def _predictions(
    model: Model, batch: LogitsBatch, ids: Sequence[Union[str, int]], thresholds: dict[str, Optional[float]], abstain: bool = False
) -> dict[int, list[Prediction]]:
    """Input position -> its predictions, one per head, for the decoded inputs of a batch."""
    found: dict[int, list[Prediction]] = {index: [] for index in batch.indices}
    scores: list[Optional[float]] = [None] * len(batch.indices)
    accepted: list[Optional[bool]] = [None] * len(batch.indices)
    if batch.ood_scores is not None:
        scores = batch.ood_scores.tolist()
        accepted = model.ood_gate.accepts(batch.ood_scores).tolist()
    for name, logits in batch.logits.items():
        info = model.heads[name]
        probabilities = calibrated(logits, info).numpy()  # (b, K)
        positive = info.classes.index(info.positive) if info.is_binary else None
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
                )
            )
    return found


# ---- the API --------------------------------------------------------------------------------------------


def predict_stream(
    model: Model,
    items: Sequence[SingleImage],
    head: HeadSelection = None,
    *,
    threshold: Optional[float] = None,
    tta: bool = False,
    precision: Precision = "auto",
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int = 0,
    abstain: bool = False,
) -> Iterator[ImageResult]:
    """One `ImageResult` per input, in input order; a file that fails is reported and the rest go on.

    abstain: an image the model's out-of-distribution gate flags gets the label `unknown` on every
    head (its probabilities are still reported); needs a model with a gate. A wrong head, threshold
    or option raises here, before any image is read.
    """
    names = model.select_heads(head)
    thresholds = thresholds_for(model, names, threshold)
    if abstain and model.ood_gate is None:
        raise ConfigError(
            "abstaining needs a model with an out-of-distribution gate, and this one has none; "
            "fit one with `mvit calibrate`, or leave out --abstain"
        )
    ids = [image_id(item, index) for index, item in enumerate(items)]
    stream = logits_stream(model, items, names, tta=tta, precision=precision, batch_size=batch_size, workers=workers)
    return _results(model, stream, ids, thresholds, abstain)


def _results(model: Model, stream: Iterator[LogitsBatch], ids: list, thresholds: dict, abstain: bool) -> Iterator[ImageResult]:
    for batch in stream:
        found = _predictions(model, batch, ids, thresholds, abstain)
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
    precision: Precision = "auto",
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: Union[None, str, torch.device] = None,
    workers: int = 0,
    abstain: bool = False,
) -> list[Prediction]:
    """Predictions for one image or many, image by image and, within an image, head by head.

    images: a path, PIL image, (H, W[, C]) array, (C, H, W) tensor, or a list of them (an
    (N, H, W, C) array or (N, C, H, W) tensor is N images). head: a name, a list of names (one
    backbone pass for all), or None / "all" for every head. threshold: overrides the stored
    threshold of the binary heads. device: moves the model there (default: where it is).
    abstain: label `unknown` on every head for an image the model's out-of-distribution gate flags.
    Raises `ImageError` naming the first input that cannot be read.
    """
    if device is not None:
        model.to(device)
    items = image_list(images)
    if not items:
        raise MvitError("no images to predict; pass a path, PIL image, array or tensor, or a list of them")
    predictions: list[Prediction] = []
    for result in predict_stream(
        model, items, head, threshold=threshold, tta=tta, precision=precision, batch_size=batch_size, workers=workers,
        abstain=abstain,
    ):
        if result.error is not None:
            raise ImageError(result.error if isinstance(result.image, str) else f"image {result.image}: {result.error}")
        predictions.extend(result.predictions)
    return predictions


def default_workers(count: int, batch_size: int = DEFAULT_BATCH_SIZE, device: Union[str, torch.device] = "cpu") -> int:
    """Decoding processes for `count` files: none for a single batch (starting them costs more than
    it saves). On a GPU up to 8, since decoding is then the bottleneck. On a CPU one per 8 cores:
    the model's threads use every core, each decoding process takes one from them, and one process
    decodes about 230 lesion JPEGs/s, more than a CPU forward of a DeiT model needs."""
    if count <= batch_size:
        return 0
    import os

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    most = min(8, cpus) if torch.device(device).type == "cuda" else max(1, cpus // 8)
    return max(1, min(most, math.ceil(count / batch_size)))

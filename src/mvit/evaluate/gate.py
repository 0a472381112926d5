"""Fitting the out-of-distribution gate (`mvit.core.gate`): on features, and from a model's own images.

The gate learns the training images' backbone features and chooses its threshold on the
validation images, split exactly as the model was trained (the settings its file recorded), so
`mvit calibrate` can fit a gate onto any model, and training ends by fitting one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mvit.data.features import FeatureCache
from mvit.core.gate import (
    DEFAULT_ACCEPT,
    DEFAULT_K,
    DEFAULT_METHOD,
    METHODS,
    GateInfo,
    GateRecipe,
    OODGate,
    backbone_pass,
    resolve_layer,
)
from mvit.errors import ConfigError, MvitError
from mvit.evaluate.evaluation_set import split_settings
from mvit.infer.predict import image_batches
from mvit.runtime.options import RunOptions
from mvit.runtime.precision import autocast, autocast_dtype
from mvit.datasets import leakage, splits
from mvit.registry import manager


def fit_tensors(train_features: Tensor, method: str) -> dict[str, Tensor]:
    """Training features (N, D) -> the tensors of a `method` gate."""
    if method == "knn":
        # rounded to float16 now, so the threshold is chosen with exactly the bank the file will hold
        return {"bank": F.normalize(train_features.float(), dim=1).half().float()}  # (N, D)
    from sklearn.covariance import LedoitWolf

    estimate = LedoitWolf().fit(train_features.double().numpy())  # shrinkage keeps a D > N covariance invertible
    return {
        "mean": torch.from_numpy(estimate.location_).float(),  # (D,)
        "precision": torch.from_numpy(estimate.precision_).float(),  # (D, D)
    }


def fit_gate_on_features(
    train_features: Tensor,
    valid_features: Tensor,
    *,
    method: str = DEFAULT_METHOD,
    accept: float = DEFAULT_ACCEPT,
    k: int = DEFAULT_K,
    datasets: Sequence[str] = (),
    layer: Optional[int] = None,
) -> OODGate:
    """A gate from training features (N, D) and a threshold that accepts `accept` of validation features (M, D).

    layer: which feature these are (None: pooled; N: mean patch token after block N), recorded so
    prediction computes the same one."""
    check_options(method, accept, k)
    if len(train_features) < 2 or len(valid_features) == 0:
        raise MvitError(
            f"an out-of-distribution gate needs at least 2 training and 1 validation image, "
            f"got {len(train_features)} and {len(valid_features)}"
        )
    info = GateInfo(method=method, threshold=0.0, quantile=accept, k=k if method == "knn" else None, layer=layer,
                    train_images=len(train_features), valid_images=len(valid_features), datasets=list(datasets))
    gate = OODGate(info, fit_tensors(train_features.cpu(), method))
    scores = gate.score(valid_features.cpu()).numpy()  # (M,)
    # "higher": the threshold is one of the scores, and at least `accept` of them are <= it
    threshold = float(np.quantile(scores, accept, method="higher"))
    gate.info = info.model_copy(update={"threshold": threshold})
    return gate


def check_options(method: str, accept: float, k: int) -> None:
    if method not in METHODS:
        raise ConfigError(f"unknown out-of-distribution method {method!r}; choose one of {', '.join(METHODS)}")
    if not 0 < accept <= 1:
        raise ConfigError(f"--accept is the fraction of validation images to accept, between 0 and 1; got {accept}")
    if k < 1:
        raise ConfigError(f"k must be at least 1, got {k}")


def pooled_features(
    model,
    items: Sequence,
    *,
    layer: Optional[int] = None,
    precision: str = "auto",
    batch_size: int = 32,
    workers: Optional[int] = None,
) -> tuple[Tensor, list[int], dict[int, str]]:
    """Backbone features of images (paths or anything `predict` takes), with predict's pipeline:
    the pooled class token (layer None) or the mean patch token after block `layer`.

    Returns features (n, D) float32 on the CPU for the inputs that decoded, their positions in
    `items`, and position -> error sentence for those that did not.
    """
    device = model.device
    if workers is None:
        workers = RunOptions(batch_size=batch_size).workers_for(len(items), device)
    rows, kept, errors = [], [], {}
    for batch, dtype in image_batches(model, items, precision=precision, batch_size=batch_size, workers=workers):
        errors.update(batch.errors)
        if batch.images is not None:
            with torch.inference_mode(), autocast(device, dtype):
                rows.append(backbone_pass(model.backbone, batch.images, layer)[1].float().cpu())  # (b, D)
            kept += batch.positions
    features = torch.cat(rows) if rows else torch.empty(0, model.backbone.width)
    return features, kept, errors


def fit_gate(
    model,
    train_paths: Sequence[Union[str, Path]],
    valid_paths: Sequence[Union[str, Path]],
    recipe: GateRecipe = GateRecipe(),
    *,
    datasets: Sequence[str] = (),
    cache: Union[None, str, Path] = None,
    run: RunOptions = RunOptions(),
) -> OODGate:
    """Fit a gate for `model` on its training images and choose its threshold on validation images.

    Does not attach it: `model.ood_gate = fit_gate(...)`, then `model_file.save(model, ...)`.
    recipe.layer: "middle" (the block halfway up), "pooled" / None (the heads' feature) or a block
    number. Images (paths, PIL images, arrays) are read as `predict` reads them; unreadable ones are
    left out and reported through `run.say`. cache: an HDF5 feature cache (`features.FeatureCache`,
    paths only) that keeps the features, so fitting again (another method or `accept`) costs no
    backbone pass.
    """
    check_options(recipe.method, recipe.accept, recipe.k)
    if run.precision == "int8":  # the gate's reference features are the exact ones; int8 is for prediction
        raise ConfigError("the gate is fitted in fp32 or bf16, not int8; use --precision auto, fp32 or bf16 to fit it "
                          "(a model with a gate still predicts with --precision int8)")
    layer = resolve_layer(model.backbone, recipe.layer)
    features = {}
    for split, items in (("training", train_paths), ("validation", valid_paths)):
        run.say(f"backbone features of {len(items)} {split} images")
        if cache is None:
            features[split], _, errors = pooled_features(
                model, list(items), layer=layer, precision=run.precision, batch_size=run.batch_size, workers=run.workers
            )
            for message in errors.values():
                run.say(f"warning: left out: {message}")
        else:
            features[split] = gate_features(model, [Path(item) for item in items], layer, cache, run)
    return fit_gate_on_features(features["training"], features["validation"], method=recipe.method, accept=recipe.accept,
                                k=recipe.k, datasets=datasets, layer=layer)


class _Tapped(torch.nn.Module):
    """The backbone as a layer gate sees it, for the feature cache: images -> mean patch token after
    block `layer` (B, D). Its state_dict (the backbone's under `backbone.`, and the layer) gives its
    features a cache key of their own, apart from the pooled features training caches."""

    def __init__(self, backbone, layer: int):
        super().__init__()
        self.backbone, self.config, self.width = backbone, backbone.config, backbone.width
        self.register_buffer("layer", torch.tensor(layer))

    def forward(self, images: Tensor) -> Tensor:
        return self.backbone.forward_with_tap(images, int(self.layer))[1]


def gate_features(model, paths: list[Path], layer: Optional[int], cache, run: RunOptions = RunOptions()) -> Tensor:
    """The features (N, D) a gate reads (`layer`: None pooled, N the mean patch token after block N)
    of `paths`, through the HDF5 cache, which computes only those it lacks."""
    device = model.device
    workers = run.workers_for(len(paths), device)
    backbone = model.backbone if layer is None else _Tapped(model.backbone, layer)
    return FeatureCache(Path(cache), warn=run.say).load(
        backbone, model.preprocessing, paths, device=device, dtype=autocast_dtype(run.precision, device),
        batch_size=run.batch_size, workers=workers,
    ).float()


def calibration_paths(model, roots: Mapping[str, Union[str, Path]]) -> tuple[list[Path], list[Path]]:
    """Training and validation image paths of datasets (name -> root), split as the model was trained.

    Each dataset is split with the settings its model file recorded (as `mvit evaluate` does), and
    a training image that also sits in an evaluation split of any of these datasets is left out, as
    training leaves it out, so no validation image finds itself in the bank. Augmented copies are
    left out too: the gate should learn what real images look like.
    """
    per_dataset, roles = {}, {}
    for name, root in roots.items():
        spec = manager.get_dataset(name)
        validation = splits.validation_split(spec)
        if validation is None:
            raise ConfigError(f"{name} has no validation split to choose the gate's threshold on (its splits: {', '.join(spec.splits)})")
        roles[name] = (splits.training_split(spec), validation)
        per_dataset[name] = splits.split_dataset(name, root, **split_settings(model.provenance, name))
    cleaned, _ = leakage.exclude_shared(per_dataset)  # each dataset's training split is its first
    train, valid = [], []
    for name, per_split in cleaned.items():
        training, validation = roles[name]
        train += [s.path for s in per_split.get(training, []) if not s.meta.get("augmented")]
        valid += [s.path for s in per_split.get(validation, [])]
    return list(dict.fromkeys(train)), list(dict.fromkeys(valid))

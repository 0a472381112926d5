"""The out-of-distribution gate: does an image look like the dermoscopy the model was trained on?

A head's softmax is confident about anything, a photograph of a cat included. The gate scores how
unusual an image's backbone feature is against the training images' features, and flags the image
when the score is above a threshold chosen on the validation split, so that `accept` (default 0.95)
of in-distribution validation images pass. Higher score = more unusual.

Which feature (`layer`): None reads the pooled class token the heads read; N reads the mean patch
token after block N, tapped from the same backbone pass. Lower layers describe colour and texture,
which is what tells a photograph or a screenshot from dermoscopy; the pooled token describes the
lesion, and a weak backbone maps a temple photograph close to a naevus there (docs/prediction.md
has the measurements). Two scores, picked by `method`:

- `knn` (Sun et al., 2022, "Out-of-distribution detection with deep nearest neighbors"): the cosine
  distance from the L2-normalised feature to its k-th nearest L2-normalised training feature. The
  bank of normalised training features is stored, float16, in the model file.
- `mahalanobis` (after Lee et al., 2018, class-agnostic): the Mahalanobis distance of the feature
  from the training features' mean, under their Ledoit-Wolf shrunk covariance.

The gate is a plain object, not an `nn.Module`, so its tensors stay out of `Model.state_dict()` (the
training checkpoints, the feature cache's fingerprint); `model_file.save` writes them under `ood.`
and its description (`GateInfo`) in the metadata. Fitting a gate (on features, or from a model's
images, which needs the datasets and the splits the model was trained on) is `mvit.evaluate.gate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from mvit.errors import ConfigError

METHODS = ("knn", "mahalanobis")
# chosen by measurement: see docs/prediction.md, "Out-of-distribution gate"
DEFAULT_METHOD = "mahalanobis"
DEFAULT_LAYER = "middle"  # the block halfway up the backbone; "pooled" (None) is the heads' feature
DEFAULT_ACCEPT = 0.95
DEFAULT_K = 10  # knn: the neighbour whose distance is the score


@dataclass(frozen=True)
class GateRecipe:
    """How a gate is fitted (`mvit.evaluate.gate.fit_gate`): its scoring method, the share of
    in-distribution validation images it accepts, k for knn, and the backbone feature it reads
    ("middle", "pooled" / None, or a block number)."""

    method: str = DEFAULT_METHOD
    accept: float = DEFAULT_ACCEPT
    k: int = DEFAULT_K
    layer: Union[None, int, str] = DEFAULT_LAYER


TENSOR_PREFIX = "ood."
_TENSORS = {"knn": ("bank",), "mahalanobis": ("mean", "precision")}
_CHUNK = 1024  # feature rows scored at once: keeps the (rows, bank) similarity matrix small


class GateInfo(BaseModel):
    """What the gate is and what it was fitted on. Stored in the model file's metadata."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["knn", "mahalanobis"]
    threshold: float  # an image is in distribution when its score is at most this
    quantile: float = Field(gt=0, le=1)  # the fraction of validation images the threshold accepts
    k: Optional[int] = Field(default=None, ge=1)  # knn: which nearest neighbour's distance is the score
    layer: Optional[int] = Field(default=None, ge=1)  # None: the pooled class token; N: mean patch token after block N
    train_images: int  # images whose features fitted the bank or the mean and covariance
    valid_images: int  # images whose scores chose the threshold
    datasets: list[str] = Field(default_factory=list)


class OODGate:
    """A fitted gate: `score` features, `accepts` scores."""

    def __init__(self, info: GateInfo, tensors: Mapping[str, Tensor]):
        wanted = _TENSORS[info.method]
        if sorted(tensors) != sorted(wanted):
            raise ValueError(f"a {info.method} gate needs tensors {', '.join(wanted)}, got {', '.join(tensors) or 'none'}")
        self.info = info
        # float32 in memory; the knn bank holds float16 values, so saving it as float16 loses nothing
        self.tensors = {name: tensor.detach().float() for name, tensor in tensors.items()}
        if info.method == "knn" and (self.tensors["bank"].ndim != 2 or len(self.tensors["bank"]) == 0):
            raise ValueError(f"the knn bank must be (N, D) with N > 0, got {tuple(self.tensors['bank'].shape)}")
        if info.method == "mahalanobis":
            (D,) = self.tensors["mean"].shape
            if self.tensors["precision"].shape != (D, D):
                raise ValueError(f"the precision matrix must be ({D}, {D}), got {tuple(self.tensors['precision'].shape)}")

    @property
    def method(self) -> str:
        return self.info.method

    @property
    def threshold(self) -> float:
        return self.info.threshold

    @property
    def dim(self) -> int:
        return self.tensors["bank" if self.method == "knn" else "mean"].shape[-1]

    def score(self, features: Tensor) -> Tensor:
        """The gate's features (B, D) (see `features`) -> scores (B,) float32 on the features' device;
        higher = more unusual."""
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"the gate scores features (B, {self.dim}), got {tuple(features.shape)}")
        features = features.float()
        if self.method == "knn":
            return knn_scores(features, self._on("bank", features.device), self.info.k or DEFAULT_K)
        return mahalanobis_scores(features, self._on("mean", features.device), self._on("precision", features.device))

    def features(self, backbone, images: Tensor) -> tuple[Tensor, Tensor]:
        """Normalised images (B, 3, S, S) -> (pooled features (B, D) for the heads, the gate's features
        (B, D)), from one backbone pass."""
        return backbone_pass(backbone, images, self.info.layer)

    def accepts(self, scores: Tensor) -> Tensor:
        """Scores (B,) -> (B,) bool: True for an image that looks in distribution."""
        return scores <= self.threshold

    def tensors_to_save(self) -> dict[str, Tensor]:
        """The tensors for the model file, named `ood.<name>` (the knn bank as float16)."""
        return {
            TENSOR_PREFIX + name: (tensor.half() if name == "bank" else tensor).to("cpu").contiguous()
            for name, tensor in self.tensors.items()
        }

    def _on(self, name: str, device: torch.device) -> Tensor:
        """A stored tensor on `device`, moved there once (the gate follows the features, not `model.to`)."""
        if self.tensors[name].device != device:
            self.tensors[name] = self.tensors[name].to(device)
        return self.tensors[name]

    def __repr__(self) -> str:
        return f"OODGate({self.info!r})"


# ---- the features and the scores -----------------------------------------------------------------


def backbone_pass(backbone, images: Tensor, layer: Optional[int]) -> tuple[Tensor, Tensor]:
    """Images (B, 3, S, S) -> (pooled class token (B, D), the feature `layer` names (B, D)), one pass."""
    if layer is None:
        pooled = backbone(images)
        return pooled, pooled
    return backbone.forward_with_tap(images, layer)


def resolve_layer(backbone, layer: Union[None, int, str]) -> Optional[int]:
    """"pooled" or None -> None; "middle" -> the block halfway up; a number (or its text) -> that block."""
    depth = len(backbone.blocks)
    if layer is None or layer == "pooled":
        return None
    if layer == "middle":
        return depth // 2 if depth >= 2 else None  # a one-block backbone has nothing in the middle
    try:
        block = int(layer)
    except ValueError:
        raise ConfigError(f"the gate's layer is pooled, middle or a block number, not {layer!r}") from None
    if not 1 <= block < depth:
        raise ConfigError(f"the gate's layer must be a block from 1 to {depth - 1} of this {depth}-block backbone, got {block}")
    return block


def knn_scores(features: Tensor, bank: Tensor, k: int) -> Tensor:
    """Features (B, D), L2-normalised bank (N, D) -> cosine distance to the k-th nearest neighbour (B,)."""
    k = min(k, len(bank))
    scores = []
    for chunk in features.split(_CHUNK):
        similarity = F.normalize(chunk, dim=1) @ bank.T  # (b, N): cosine similarity, one matmul
        kth = similarity.topk(k, dim=1).values[:, -1]  # (b,)
        scores.append(1.0 - kth)
    return torch.cat(scores) if scores else features.new_empty(0)


def mahalanobis_scores(features: Tensor, mean: Tensor, precision: Tensor) -> Tensor:
    """Features (B, D), mean (D,), precision (D, D) -> Mahalanobis distance (B,)."""
    centred = features - mean  # (B, D)
    squared = ((centred @ precision) * centred).sum(dim=1)  # (B,)
    return squared.clamp_min(0).sqrt()

"""Linear heads fitted in closed form on pooled backbone features: class-balanced, L2-regularised
logistic regression solved by L-BFGS, its strength chosen on held-out data.

This is how `mvit train` fits heads on a frozen backbone (`unfreeze.mode = "none"`, no augmentation)
and how `mvit adapt` fits a clinic's own heads: one engine for both. Why not epochs of AdamW on
cached features: the problem is convex and small (D = 192 features, at most a few thousand
images), so L-BFGS reaches its optimum in a second, and the only real choice left, how strongly to
regularise, is then made on held-out loss over a grid instead of by stopping an optimiser early.
Strong regularisation is what carries a head across clinics: on the bundled backbone a head fitted
this way ranks PH2's melanomas better than the jointly trained head it replaces (docs/results.md).

Features are standardised with the training set's (weighted) mean and spread before fitting, so
one strength grid suits any backbone; the result is folded back into one `nn.Linear` on the raw
features. An `anchor` (another head's weights) makes the penalty pull towards that head instead of
towards zero: what a site head does when its base head's training features are not available.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# penalty strengths tried, weakest last; per unit of (weighted) mean loss, on standardised features
STRENGTHS: tuple[float, ...] = tuple(float(s) for s in np.logspace(-4, 0.5, 10))


@dataclass(frozen=True)
class LinearHead:
    """A fitted linear head on raw features: logits = features @ weight.T + bias."""

    weight: Tensor  # (K, D)
    bias: Tensor  # (K,)
    strength: float  # the L2 strength it was fitted with
    held_out_loss: Optional[float] = None  # the class-balanced loss that chose the strength, where one did

    def logits(self, features: Tensor) -> Tensor:
        return features.float() @ self.weight.T + self.bias  # (N, D) -> (N, K)


def balanced_weights(targets: Tensor, classes: int) -> Tensor:
    """(N,) sample weights that give every present class the same total weight, summing to N."""
    counts = torch.bincount(targets, minlength=classes).float()
    present = int((counts > 0).sum())
    per_class = torch.where(counts > 0, len(targets) / (present * counts.clamp(min=1)), torch.zeros_like(counts))
    return per_class[targets]


def weighted_loss(logits: Tensor, targets: Tensor, weights: Tensor) -> float:
    """The weighted mean cross-entropy of logits (N, K) against targets (N,)."""
    losses = F.cross_entropy(logits.float(), targets, reduction="none")
    return float((losses * weights).sum() / weights.sum())


def fit(features: Tensor, targets: Tensor, classes: int, *, strength: float, weights: Optional[Tensor] = None,
        anchor: Optional[tuple[Tensor, Tensor]] = None) -> LinearHead:
    """Minimise mean weighted cross-entropy + strength / 2 * |W - anchor|^2 on standardised features.

    features (N, D) float, targets (N,) class indices in [0, classes), weights (N,) (default: class-
    balanced), anchor: (weight (K, D), bias (K,)) on raw features, the head the penalty pulls towards.
    """
    X = features.detach().float().cpu()
    y = targets.detach().long().cpu()
    w = balanced_weights(y, classes) if weights is None else weights.detach().float().cpu()
    w = w / w.sum()
    mean = (w[:, None] * X).sum(0)  # (D,)
    spread = ((w[:, None] * (X - mean) ** 2).sum(0)).sqrt().clamp(min=1e-6)  # (D,)
    Z = (X - mean) / spread  # (N, D) standardised
    if anchor is None:
        centre = torch.zeros(classes, X.shape[1])
        W = torch.zeros(classes, X.shape[1], requires_grad=True)
        b = torch.zeros(classes, requires_grad=True)
    else:  # the anchor in standardised coordinates: W_z = W * spread, b_z = b + W @ mean
        centre = anchor[0].detach().float().cpu() * spread
        W = centre.clone().requires_grad_(True)
        b = (anchor[1].detach().float().cpu() + anchor[0].detach().float().cpu() @ mean).requires_grad_(True)
    optimiser = torch.optim.LBFGS([W, b], lr=1.0, max_iter=500, tolerance_grad=1e-6, tolerance_change=1e-10,
                                  history_size=20, line_search_fn="strong_wolfe")

    def objective() -> Tensor:
        optimiser.zero_grad()
        losses = F.cross_entropy(Z @ W.T + b, y, reduction="none")  # (N,)
        loss = (losses * w).sum() + strength / 2 * ((W - centre) ** 2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():  # callers may run inside torch.no_grad()
        optimiser.step(objective)
    W, b = W.detach(), b.detach()
    # fold the standardisation into the layer: W_raw = W_z / spread, b_raw = b_z - W_raw @ mean
    weight = W / spread
    return LinearHead(weight, b - weight @ mean, strength)


def choose_and_fit(train: tuple[Tensor, Tensor], held_out: tuple[Tensor, Tensor], classes: int, *,
                   strengths: Sequence[float] = STRENGTHS, weights: Optional[Tensor] = None,
                   anchor: Optional[tuple[Tensor, Tensor]] = None) -> LinearHead:
    """The head fitted on `train` (features (N, D), targets (N,)) with the strength whose head has the
    lowest class-balanced loss on `held_out`; ties go to the stronger penalty (the simpler head)."""
    (X, y), (Xv, yv) = train, held_out
    wv = balanced_weights(yv.long(), classes)
    best: Optional[LinearHead] = None
    for strength in sorted(strengths, reverse=True):
        head = fit(X, y, classes, strength=strength, weights=weights, anchor=anchor)
        loss = weighted_loss(head.logits(Xv.float()), yv.long(), wv)
        if best is None or loss < best.held_out_loss - 1e-9:
            best = LinearHead(head.weight, head.bias, strength, loss)
    assert best is not None, "at least one strength is tried"
    return best

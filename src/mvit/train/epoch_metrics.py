"""An epoch's numbers: each head's running loss and predictions, the record written to
metrics.jsonl, the model-selection score, and the line printed for the epoch."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from mvit.evaluate.metrics import classification_metrics
from mvit.core.heads import HeadInfo


class HeadStats:
    """Running loss and predictions of one head over an epoch.

    Kept on the model's device and read once in `summary`: a `.item()` or `.cpu()` per step would
    make the CPU wait for the GPU at every step."""

    def __init__(self):
        self.losses, self.probabilities, self.targets = [], [], []

    def add(self, loss: Tensor, logits: Tensor, targets: Tensor) -> None:
        """loss: the batch's mean loss (a 0-d tensor); logits (b, K); targets (b,)."""
        self.losses.append(loss.detach() * len(targets))
        self.probabilities.append(torch.softmax(logits.detach().float(), dim=1))
        self.targets.append(targets.detach())

    def summary(self, info: HeadInfo) -> dict:
        if not self.targets:
            return {"loss": float("nan")}
        probabilities = torch.cat(self.probabilities).cpu().numpy()  # (N, K)
        targets = torch.cat(self.targets).cpu().numpy()  # (N,)
        loss = float(torch.stack(self.losses).sum()) / len(targets)
        metrics = classification_metrics(probabilities, targets, info.classes)
        keep = ("accuracy", "balanced_accuracy", "roc_auc")
        return {"loss": loss, **{k: metrics[k] for k in keep if k in metrics}}


def epoch_record(epoch: int, unfrozen: list[str], lr: dict[str, float], train: dict, valid: dict,
                 ema_valid: Optional[dict], seconds: float, best_metric: str) -> dict:
    """One line of metrics.jsonl for the 0-based `epoch` (numbered from 1 there, as on the console
    and in the model file); `train`, `valid` and `ema_valid` map each head to its summary."""
    heads = {name: {"train": train[name], "valid": valid.get(name, {})} for name in train}
    record = {
        "epoch": epoch + 1,
        "unfrozen": len(unfrozen),
        "unfrozen_groups": unfrozen,
        "lr": lr,
        "heads": heads,
        "score": selection_score(valid, best_metric),
        "valid_loss": mean_loss(valid),
        "seconds": round(seconds, 2),
    }
    if ema_valid is not None:  # the averaged weights, validated on the same images
        record["ema"] = {"heads": {name: {"valid": v} for name, v in ema_valid.items()},
                         "score": selection_score(ema_valid, best_metric), "valid_loss": mean_loss(ema_valid)}
    return record


def mean_loss(valid: dict) -> float:
    """The validation loss averaged over heads (NaN where none has one)."""
    losses = [v["loss"] for v in valid.values() if isinstance(v.get("loss"), float) and math.isfinite(v["loss"])]
    return sum(losses) / len(losses) if losses else float("nan")


def selection_key(scored: dict) -> tuple[float, float]:
    """What picks the best epoch, higher is better: the selection score, then (a tie is common on a
    small validation split, where balanced accuracy moves in steps of one image) the lower
    validation loss. `scored`: an epoch's record, or its "ema" part."""
    loss = scored.get("valid_loss", float("nan"))
    return scored["score"], (-loss if math.isfinite(loss) else -math.inf)


def selection_score(valid: dict, metric: str) -> float:
    """The model-selection score: `metric` averaged over heads (higher is better)."""
    scores = [(-v["loss"] if metric == "loss" else v.get(metric, float("nan"))) for v in valid.values()]
    finite = [s for s in scores if s is not None and math.isfinite(s)]
    return sum(finite) / len(finite) if finite else float("nan")


def epoch_line(record: dict, epochs: int, improved: bool, use_ema: bool) -> str:
    """What the console shows for an epoch: losses, balanced accuracy, score, and whether it is the best yet."""
    summary = "  ".join(
        f"{name}: loss {h['train']['loss']:.3f}/{h['valid']['loss']:.3f} "
        f"bal.acc {h['valid'].get('balanced_accuracy', float('nan')):.3f}"
        for name, h in record["heads"].items()
    )
    ema = f"  EMA score {record['ema']['score']:.3f}" if "ema" in record else ""
    return (f"epoch {record['epoch']}/{epochs} [{record['unfrozen']} groups unfrozen] "
            f"{summary}  score {record['score']:.3f}{ema}"
            f"{('  *best (EMA)*' if use_ema else '  *best*') if improved else ''}  ({record['seconds']:.0f} s)")

"""Training logs where people look for them: TensorBoard (`[logging] tensorboard = true`).

RUN/tensorboard gets, per epoch, the numbers metrics.jsonl records (each head's train and validation
loss and metrics, the selection score, each group's learning rate) as scalars, and at the end each
head's validation confusion matrix of the calibrated best model as a figure. metrics.jsonl stays the
record; this is a view of it for those who watch runs in TensorBoard (timm, Lightning and the
Hugging Face Trainer log there too).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from mvit.core.model import Model
from mvit.evaluate.metrics import classification_metrics

FOLDER = "tensorboard"


class TensorBoardLog:
    def __init__(self, run: Path, done: int):
        """The log of the run folder `run`, which has `done` epochs behind it (0 for a new run)."""
        from torch.utils.tensorboard import SummaryWriter  # the extra is checked when the config is read

        # a resumed run logs on from its next epoch; what an interrupted epoch logged is dropped
        self.writer = SummaryWriter(str(Path(run) / FOLDER), purge_step=done + 1 if done else None)

    def epoch(self, record: dict) -> None:
        """One epoch's record (a line of metrics.jsonl; its epochs are numbered from 1)."""
        step = record["epoch"]
        for head, parts in record["heads"].items():
            for part in ("train", "valid"):
                for metric, value in parts.get(part, {}).items():
                    self._scalar(f"{head}/{part}_{metric}", value, step)
        self._scalar("score", record["score"], step)
        self._scalar("valid_loss", record.get("valid_loss"), step)
        for group, rate in record["lr"].items():
            self._scalar(f"lr/{group}", rate, step)
        self.writer.flush()

    def confusion_matrices(self, model: Model, valid_logits: dict[str, tuple[Tensor, Tensor]], step: int) -> None:
        """Each head's validation confusion matrix at its calibrated temperature and threshold
        (`valid_logits`: head -> logits (N, K), targets (N,)), for the best epoch `step`."""
        from mvit.plots import confusion_matrix_plot  # matplotlib, only for runs that log here

        for name, (logits, targets) in valid_logits.items():
            info = model.heads[name]
            probabilities = torch.softmax(logits.float() / info.temperature, dim=1).cpu().numpy()  # (N, K)
            metrics = classification_metrics(probabilities, targets.cpu().numpy(), info.classes, info.positive, info.threshold)
            self.writer.add_figure(f"{name}/confusion_matrix", confusion_matrix_plot(metrics["confusion_matrix"], info.classes), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

    def _scalar(self, tag: str, value, step: int) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            self.writer.add_scalar(tag, value, step)

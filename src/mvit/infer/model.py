"""The model that answers for images: `mvit.core.model.Model` with `predict` and `attention`, and
`load`, which opens a model file as one (the public `mvit.load`)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional, Union

import torch

from mvit.core import model, model_file
from mvit.data.dataset import ImageInput
from mvit.infer.attention import AttentionMaps, attention_maps
from mvit.infer.predict import predict
from mvit.infer.prediction import Prediction
from mvit.runtime.options import RunOptions


class Model(model.Model):
    """A backbone with named classifier heads and the preprocessing they were trained with, able to
    predict and draw attention maps (thin delegates to `mvit.infer.predict` and `mvit.infer.attention`)."""

    def predict(self, images: ImageInput, head: Union[None, str, Iterable[str]] = None, *, site: Optional[str] = None,
                precision: str = "auto", batch_size: int = 32, workers: int = 0, **options) -> list[Prediction]:
        """Predictions for paths, PIL images, arrays or tensors (`site`: answer with that site's heads;
        `workers`: decoding processes, 0: this one); see `mvit.infer.predict.predict` for the rest."""
        run = RunOptions(precision=precision, batch_size=batch_size, workers=workers)
        return predict(self.with_site(site), images, head=head, run=run, **options)

    def attention(self, images: ImageInput, head: Optional[str] = None, *, site: Optional[str] = None,
                  **options) -> list[AttentionMaps]:
        """Attention maps for images (`site`: of that site's head); see `mvit.infer.attention.attention_maps`."""
        return attention_maps(self.with_site(site), images, head=head, **options)


def load(path: Union[str, Path, None] = None, *, device: Union[str, torch.device] = "cpu") -> Model:
    """A model ready for inference (eval mode, float32). No path: the model bundled with mvit.

    Every way a file can be wrong (unreadable, not a model file, metadata or tensors that do not
    fit each other, non-finite weights) raises `ModelFileError` with one sentence naming the file.
    """
    return model_file.load(path, device=device, model_class=Model)

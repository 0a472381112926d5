"""Weight averaging: an exponential moving average of the model's weights, updated after each
step, and a way to validate or save the model with the averaged weights in place."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from mvit.core.model import Model


def make_ema(model: Model, decay: Optional[float]) -> Optional[AveragedModel]:
    """An exponential moving average of the model's weights (PyTorch's own), or None (off: decay
    None, or 0 as configs wrote it before `false`)."""
    if not decay:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


@contextmanager
def averaged_weights(model: Model, ema: AveragedModel) -> Iterator[None]:
    """The averaged weights in `model` for the duration, then its own weights back."""
    own = {name: value.detach().clone() for name, value in model.state_dict().items()}
    model.load_state_dict(ema.module.state_dict())
    try:
        yield
    finally:
        model.load_state_dict(own)

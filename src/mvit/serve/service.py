"""The model behind the HTTP API: uploads in, the same records `mvit predict --format json` writes out.

Images are decoded in a small thread pool (off the event loop, and bounding how many full-size images
are in memory at once), batched with other requests' images by the `Batcher`, and turned into
`Prediction` records by the code `mvit predict` uses, so a served answer equals the command's.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from mvit.data.images import EncodedImage, decode_image
from mvit.data.transforms import eval_transform
from mvit.errors import ImageError, ImageTooLarge, UnknownHeadError
from mvit.infer.attention import attention_maps
from mvit.core.model import Model
from mvit.infer.predict import LogitsBatch, backbone_pass, batch_predictions, head_logits
from mvit.infer.prediction import thresholds_for
from mvit.infer.quantize import int8_backbone
from mvit.runtime.precision import autocast_dtype, check_int8_device
from mvit.serve.batcher import Batcher, Overloaded
from mvit.serve.settings import ServeSettings
from mvit.serve.uploads import ApiError, Upload

ATTENTION_MAPS = ("class_specific", "rollout", "last_layer")
OVERLAY_SIZE = 512  # the longer side of an attention overlay, in pixels


@dataclass(frozen=True)
class Overlay:
    png: bytes
    head: str
    explains: str  # the class the map explains


class Service:
    def __init__(self, model: Model, settings: ServeSettings):
        self.model, self.settings = model, settings
        model.eval()
        device = model.device
        if settings.precision == "int8":
            check_int8_device(device)
        dtype = autocast_dtype(settings.precision, device)
        backbone = int8_backbone(model) if settings.precision == "int8" else None
        every_head = list(model.heads)

        def run_batch(images: Tensor):  # (B, 3, S, S) -> every head's logits (and every site's) and the gate's scores
            features, scores = backbone_pass(model, images.to(device), tta=False, dtype=dtype, backbone=backbone)
            logits = head_logits(model, features, every_head, len(images), dtype)
            for site, profile in model.sites.items():  # the same backbone pass serves every site's heads
                for name, value in head_logits(model.with_site(site), features, list(profile.info.heads), len(images), dtype).items():
                    logits[site_key(site, name)] = value
            return logits, scores

        threads = model_threads(settings.model_threads, device)
        cores = max(1, torch.get_num_threads() // threads)

        def on_start() -> None:  # each model thread its share of torch's cores (OpenMP's count is per thread)
            torch.set_num_threads(cores)

        self._transform = eval_transform(model.preprocessing)
        self.batcher = Batcher(run_batch, max_batch=settings.max_batch, max_wait=settings.max_wait_ms / 1000,
                               max_queue=settings.max_queue, threads=threads, on_start=on_start if threads > 1 else None)
        self._decoders = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="mvit-decode")

    def start(self) -> None:
        self.batcher.start()

    def close(self) -> None:
        self.batcher.close()
        self._decoders.shutdown(wait=True)

    # ---- what the routes call ----------------------------------------------------------------------

    def heads(self, requested: list[str]) -> list[str]:
        """The head names a request selects (none or `all`: every head), or a 422 naming those there are."""
        try:
            return self.model.select_heads(requested or None)
        except UnknownHeadError:
            unknown = next(name for name in requested if name not in self.model.heads and name != "all")
            raise ApiError(422, f"this model has no head {unknown!r}; its heads are {', '.join(self.model.heads)}") from None

    def site(self, name: Optional[str]) -> Model:
        """The model as site `name` sees it (None or empty: the base heads), or a 422 naming the sites there are."""
        try:
            return self.model.with_site(name or None)
        except UnknownHeadError:
            raise ApiError(422, f"this model has no site {name!r}; its sites are {', '.join(self.model.sites) or 'none'}") from None

    async def predict(self, uploads: list[Upload], heads: list[str], *, abstain: bool = False, site: Optional[str] = None) -> list[dict]:
        """Each upload's records, image by image and head by head, as `mvit predict --format json`
        (inside an `admitted` block holding room for the uploads); `site`: with that site's heads."""
        view = self.site(site)
        if abstain and self.model.ood_gate is None:
            raise ApiError(422, "abstaining needs a model with an out-of-distribution gate, and this one has none; leave out `abstain`")
        images = await self._decoded(uploads, self._prepare)  # n x (3, S, S)
        answer = await asyncio.wrap_future(self.batcher.submit(images))
        adapted = self.model.sites[view.site].info.heads if view.site else {}
        logits = {name: answer.logits[site_key(view.site, name) if name in adapted else name] for name in heads}
        batch = LogitsBatch(list(range(len(uploads))), logits, {}, answer.ood_scores)
        found = batch_predictions(view, batch, [upload.name for upload in uploads], thresholds_for(view.heads, heads, None), abstain)
        return [prediction.as_dict() for index in range(len(uploads)) for prediction in found[index]]

    async def attention(self, upload: Upload, head: str, *, target: Optional[str], view: str, site: Optional[str] = None) -> Overlay:
        """The chosen attention map over the image, as a PNG (`site`: of that site's head)."""
        model = self.site(site)
        if view not in ATTENTION_MAPS:
            raise ApiError(422, f"`map` is one of {', '.join(ATTENTION_MAPS)}, got {view!r}")
        [head] = self.heads([head])
        classes = self.model.heads[head].classes
        if target is not None and target not in classes:
            raise ApiError(422, f"head {head} has no class {target!r}; its classes are {', '.join(classes)}")
        [image] = await self._decoded([upload], self._decode)
        work = lambda: attention_maps(model, [image], head, target=target, max_size=OVERLAY_SIZE)[0]  # noqa: E731
        maps = await asyncio.wrap_future(self.batcher.call(work))
        png = await asyncio.get_running_loop().run_in_executor(self._decoders, _overlay_png, maps, view)
        return Overlay(png, head, maps.target)

    # ---- decoding ----------------------------------------------------------------------------------

    def _decode(self, upload: Upload) -> Image.Image:
        return decode_image(EncodedImage(upload.data, upload.name), max_pixels=self.settings.max_pixels)

    def _prepare(self, upload: Upload) -> Tensor:
        return self._transform(self._decode(upload))  # (3, S, S)

    async def _decoded(self, uploads: list[Upload], decode) -> list:
        """Each upload decoded in the pool; the first that fails (in the order sent) refuses the request."""
        loop = asyncio.get_running_loop()
        done = await asyncio.gather(*(loop.run_in_executor(self._decoders, decode, upload) for upload in uploads),
                                    return_exceptions=True)
        for result in done:
            if isinstance(result, ImageTooLarge):
                raise ApiError(413, str(result))
            if isinstance(result, ImageError):
                raise ApiError(422, str(result))
            if isinstance(result, BaseException):
                raise result
        return done


def site_key(site: str, head: str) -> str:
    """The batch answer's key for a site's version of a head (head names hold no "/")."""
    return f"{site}/{head}"


@contextlib.contextmanager
def admitted(batcher: Batcher, count: int):
    """Room in the queue for a request's images while it is answered (`grow` it as it turns out
    larger), or a 503 with Retry-After: a request's body counts from before it is read, so the
    requests being read are bounded too."""
    try:
        with batcher.admit(count) as admission:
            yield admission
    except Overloaded as busy:
        raise ApiError(503, str(busy), {"Retry-After": str(busy.retry_after)}) from None


def model_threads(setting: int, device: torch.device) -> int:
    """The model threads to run: the setting, or by default two on a CPU with two cores or more (each
    with half the cores) and one on a GPU, which one thread keeps busy."""
    if setting:
        return setting
    return 2 if device.type == "cpu" and torch.get_num_threads() >= 2 else 1


def _overlay_png(maps, view: str) -> bytes:
    """The map over the image, encoded as PNG: (H, W, 3) uint8 -> bytes."""
    from mvit import plots

    buffer = io.BytesIO()  # every request names a head, so the class-specific map is there too
    Image.fromarray(np.ascontiguousarray(plots.overlay(maps.rgb, getattr(maps, view), maps.crop_box))).save(buffer, format="PNG")
    return buffer.getvalue()


"""An HDF5 cache of pooled backbone features, so heads on a frozen backbone train in seconds.

Layout: one group per fingerprint (a hash of the backbone's weights and of the preprocessing), so a
changed backbone or preprocessing never reads a stale feature. In each group, `keys` (N,) holds the
sha256 of each image file's bytes and `features` (N, D) its pooled feature; the attribute `rows`
counts the rows fully written. Rows are committed in chunks: an interrupted extraction keeps every
committed chunk and resumes with the images still missing. Writers take an exclusive lock on a side
file, and re-check what is present under it, so two processes filling one cache neither corrupt it
nor duplicate rows. A file HDF5 cannot read is moved aside and rebuilt.

An image that does not decode follows the cache's `BadImages` policy: "stop" with its sentence, or
"skip": it is left out of the cache (and `load` gives it a row of NaN, for the caller to leave out).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import time
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import h5py
import numpy as np
import torch

from mvit.data.dataset import BadImages, image_loader
from mvit.errors import MvitError
from mvit.nn.precision import autocast
from mvit.data.transforms import Preprocessing, eval_transform
from mvit.nn.vit import VisionTransformer
from mvit.registry.leakage import content_hash

CACHE_FORMAT = 1
CHUNK = 256  # images per committed chunk


def fingerprint(backbone: VisionTransformer, preprocessing: Preprocessing) -> str:
    """sha256 over the backbone's config and every weight, and the preprocessing."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"format": CACHE_FORMAT, "backbone": backbone.config.model_dump(),
                              "preprocessing": preprocessing.model_dump()}, sort_keys=True).encode())
    for name, tensor in sorted(backbone.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


class FeatureCache:
    def __init__(self, path: Path, warn: Callable[[str], None] = print, bad_images: Optional[BadImages] = None):
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.warn = warn
        self.bad_images = bad_images or BadImages("stop")

    def prepare(self) -> None:
        """Make sure the cache can be written (its folder and lock file), before any work that would
        be lost: an output under a regular file, or on a read-only disk, is one sentence."""
        try:
            self.lock_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.lock_path, "a"):
                pass
        except OSError as error:
            raise MvitError(f"cannot write the feature cache {self.path}: {_reason(error)}; choose another place "
                            f"for it (--cache, training.feature_cache or the run's output folder)") from None

    # ---- reading ------------------------------------------------------------------------------

    def lookup(self, key: str, image_keys: Sequence[str]) -> dict[str, np.ndarray]:
        """The cached features (D,) of whichever of `image_keys` are present under fingerprint `key`."""
        if not self.path.exists():
            return {}
        with self._locked(shared=True), self._open("r") as file:
            if file is None or key not in file:
                return {}
            group = file[key]
            rows = int(group.attrs["rows"])
            stored = group["keys"][:rows].astype(str)
            wanted = set(image_keys)
            found = [i for i, k in enumerate(stored) if k in wanted]
            features = group["features"][sorted(found)] if found else np.empty((0, group["features"].shape[1]))
            return {stored[i]: features[n] for n, i in enumerate(sorted(found))}

    # ---- writing ------------------------------------------------------------------------------

    def _commit(self, key: str, image_keys: list[str], features: np.ndarray, meta: dict) -> None:
        """Append rows under the lock; the committed row count is written last."""
        try:
            self._append(key, image_keys, features, meta)
        except OSError as error:  # the rows already committed stay readable: `rows` was not moved on
            raise MvitError(f"cannot write the feature cache {self.path}: {_reason(error)}") from None

    def _append(self, key: str, image_keys: list[str], features: np.ndarray, meta: dict) -> None:
        with self._locked(shared=False), self._open("a") as file:
            group = file.get(key)
            if group is None:
                D = features.shape[1]
                group = file.create_group(key)
                group.create_dataset("keys", shape=(0,), maxshape=(None,), dtype="S64", chunks=(1024,))
                group.create_dataset("features", shape=(0, D), maxshape=(None, D), dtype="float32", chunks=(CHUNK, D))
                group.attrs["rows"] = 0
                group.attrs["meta"] = json.dumps(meta)
            rows = int(group.attrs["rows"])
            present = set(group["keys"][:rows].astype(str))  # another process may have written them meanwhile
            new = [i for i, k in enumerate(image_keys) if k not in present]
            if not new:
                return
            for name in ("keys", "features"):
                group[name].resize(rows + len(new), axis=0)
            group["keys"][rows:] = np.array([image_keys[i] for i in new], dtype="S64")
            group["features"][rows:] = features[new]
            group.attrs["rows"] = rows + len(new)  # written last: rows beyond it are never read
            file.flush()

    def extract(self, backbone: VisionTransformer, preprocessing: Preprocessing, paths: Sequence[Path], **options) -> int:
        """Compute and commit the features of `paths` not cached yet; returns how many this process computed.

        Options: `device`, `dtype`, `batch_size`, `workers`, `progress`, and `shard=(rank, world)`:
        this process takes every world-th image, so several processes (torchrun ranks) extract one
        cache together.
        """
        image_keys = [content_hash(Path(p)) for p in paths]
        return self._fill(fingerprint(backbone, preprocessing), image_keys, backbone, preprocessing, paths, **options)

    def load(self, backbone: VisionTransformer, preprocessing: Preprocessing, paths: Sequence[Path], **options) -> torch.Tensor:
        """Pooled features (N, D) of `paths`, extracting whatever the cache lacks."""
        if not paths:
            return torch.empty(0, backbone.width)
        key, image_keys = fingerprint(backbone, preprocessing), [content_hash(Path(p)) for p in paths]
        self._fill(key, image_keys, backbone, preprocessing, paths, **options)
        cached = self.lookup(key, image_keys)
        if len(cached) < len(set(image_keys)) and self.bad_images.policy == "skip":
            width = next(iter(cached.values())).shape[0] if cached else backbone.width
            missing = np.full(width, np.nan, dtype=np.float32)  # an image skipped as unreadable
            return torch.from_numpy(np.stack([cached.get(k, missing) for k in image_keys]))
        return torch.from_numpy(np.stack([cached[k] for k in image_keys]))

    def _fill(
        self,
        key: str,
        image_keys: list[str],
        backbone: VisionTransformer,
        preprocessing: Preprocessing,
        paths: Sequence[Path],
        *,
        device: torch.device,
        dtype: Optional[torch.dtype] = None,
        batch_size: int = 64,
        workers: int = 0,
        shard: tuple[int, int] = (0, 1),
        progress: Optional[Callable[[int], None]] = None,
    ) -> int:
        present = self._present(key)
        rank, world = shard
        # each image belongs to one rank by its position, whatever the others have committed so far
        first = {k: i for i, k in reversed(list(enumerate(image_keys)))}
        mine = [i for i, k in enumerate(image_keys) if first[k] == i and k not in present and i % world == rank]
        if progress:
            progress(len(paths) - len(mine))
        meta = {"backbone": backbone.config.model_dump(), "preprocessing": preprocessing.model_dump()}
        was_training = backbone.training
        backbone.eval()
        try:
            for start in range(0, len(mine), CHUNK):
                chunk = mine[start : start + CHUNK]
                decoded, features = self._compute(backbone, preprocessing, [paths[i] for i in chunk], device, dtype,
                                                  batch_size, workers, progress)
                if decoded:  # (the images of the chunk that decoded, under the "skip" policy)
                    self._commit(key, [image_keys[chunk[j]] for j in decoded], features, meta)
        finally:
            backbone.train(was_training)
        return len(mine)

    def _present(self, key: str) -> set[str]:
        """The image keys cached under fingerprint `key` (their features are not read)."""
        if not self.path.exists():
            return set()
        with self._locked(shared=True), self._open("r") as file:
            if file is None or key not in file:
                return set()
            return set(file[key]["keys"][: int(file[key].attrs["rows"])].astype(str))

    def _compute(self, backbone, preprocessing, paths, device, dtype, batch_size, workers, progress) -> tuple[list[int], np.ndarray]:
        """The positions in `paths` of the images that decoded, and their features (n, D)."""
        loader = image_loader(paths, eval_transform(preprocessing), batch_size=batch_size, workers=workers, device=device)
        out, decoded = [], []
        with torch.inference_mode(), autocast(device, dtype):
            for batch in self.bad_images.apply(loader, paths):  # (B, 3, S, S) -> (B, D)
                if batch.images is not None:
                    out.append(backbone(batch.images.to(device)).float().cpu().numpy())
                    decoded += batch.positions
                if progress:
                    progress(len(batch.positions) + len(batch.errors))
        return decoded, (np.concatenate(out) if out else np.empty((0, 0), dtype=np.float32))

    # ---- file handling --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self, shared: bool) -> Iterator[None]:
        if not self.lock_path.exists():
            self.prepare()
        with open(self.lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def _open(self, mode: str) -> Iterator[Optional[h5py.File]]:
        """The HDF5 file; a damaged one is moved aside first (then "r" yields None, "a" a new file)."""
        if mode == "r" and not self.path.exists():
            yield None
            return
        file = None
        try:
            file = h5py.File(self.path, mode)
            self._validate(file)
        except (OSError, KeyError, ValueError) as error:
            if file is not None:
                file.close()
            damaged = self.path.with_name(f"{self.path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
            if self.path.exists():
                self.path.rename(damaged)
            self.warn(f"feature cache {self.path} was damaged ({error}); moved it to {damaged.name} and rebuilding it")
            if mode == "r":
                yield None
                return
            file = h5py.File(self.path, mode)
        try:
            yield file
        finally:
            file.close()

    @staticmethod
    def _validate(file: h5py.File) -> None:
        for key, group in file.items():
            rows = int(group.attrs["rows"])
            if group["keys"].shape[0] < rows or group["features"].shape[0] < rows:
                raise ValueError(f"group {key} claims {rows} rows but holds fewer")


def _reason(error: OSError) -> str:
    """Why a file could not be written, in words."""
    if error.errno == errno.ENOSPC:
        return "the disk is full"
    if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return "the folder is read-only or not writable"
    if error.errno in (errno.ENOTDIR, errno.EEXIST):
        return "a file stands where a folder should be"
    return error.strerror or str(error)

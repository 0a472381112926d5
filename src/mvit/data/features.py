"""An HDF5 cache of pooled backbone features, so heads on a frozen backbone train in seconds.

Layout: one group per fingerprint (a hash of the backbone's weights and of the preprocessing), so a
changed backbone or preprocessing never reads a stale feature. In each group, `keys` (N,) holds the
sha256 of each image file's bytes, `features` (N, D) its pooled feature and `checksums` (N,) a
crc32 of the key and the feature's bytes; the attribute `rows` counts the rows fully written.
Rows are committed in chunks: an interrupted extraction keeps every committed chunk and resumes
with the images still missing. Writers take an exclusive lock on a side file, and re-check what is
present under it, so two processes filling one cache neither corrupt it nor duplicate rows.

Nothing read is trusted: a row whose checksum fails or whose feature is not finite (flipped bytes,
rows moved, a chunk a full disk never wrote) counts as missing, so it is computed again and
written over, with one warning. A file HDF5 cannot read, or one from before the checksums, is
moved aside and rebuilt. A full disk is found before HDF5 writes anything (the space a commit
needs is claimed first), because HDF5 itself fails badly there: half-written chunks, then a crash.

An image that does not decode follows the cache's `BadImages` policy: "stop" with its sentence, or
"skip": it is left out of the cache (and `load` gives it a row of NaN, for the caller to leave out).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import time
import zlib
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import h5py
import numpy as np
import torch

from mvit.data.dataset import BadImages, image_loader
from mvit.runtime.distributed import Processes
from mvit.errors import DiskFull, MvitError
from mvit.runtime.precision import autocast
from mvit.core.preprocessing import Preprocessing
from mvit.data.transforms import eval_transform
from mvit.core.vit import VisionTransformer
from mvit.core.training_images import content_hash

# in every fingerprint, which model files also record (their reference bank), so kept at 1: a file
# from before the checksums is told by its layout (no `checksums`), and moved aside and rebuilt
CACHE_FORMAT = 1
CHUNK = 256  # images per committed chunk
KEY_CHUNK = 1024  # rows per HDF5 chunk of `keys` and `checksums`
METADATA_ROOM = 64 * 1024  # bytes claimed beyond the rows' own, for HDF5's index and headers


def fingerprint(backbone: VisionTransformer, preprocessing: Preprocessing) -> str:
    """sha256 over the backbone's config and every weight, and the preprocessing."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"format": CACHE_FORMAT, "backbone": backbone.config.model_dump(),
                              "preprocessing": preprocessing.model_dump()}, sort_keys=True).encode())
    for name, tensor in sorted(backbone.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


def checksums(keys: np.ndarray, features: np.ndarray) -> np.ndarray:
    """crc32 of each row's key (n,) "S64" and float32 feature bytes (n, D) -> (n,) uint32: the key
    is included so that features moved to another image's row fail too."""
    features = np.ascontiguousarray(features, dtype=np.float32)
    return np.array([zlib.crc32(features[i].tobytes(), zlib.crc32(bytes(keys[i]))) for i in range(len(keys))],
                    dtype=np.uint32)


class OlderFormat(ValueError):
    """A cache file written before rows carried checksums."""


class FeatureCache:
    def __init__(self, path: Path, warn: Callable[[str], None] = print, bad_images: Optional[BadImages] = None):
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.warn = warn
        self.bad_images = bad_images or BadImages("stop")
        self._reported: set[tuple[str, int]] = set()  # failing rows already warned about

    def prepare(self) -> None:
        """Make sure the cache can be written (its folder and lock file), before any work that would
        be lost: an output under a regular file, or on a read-only disk, is one sentence."""
        try:
            self.lock_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.lock_path, "a"):
                pass
        except OSError as error:
            raise MvitError(f"cannot write the feature cache {self.path}: {_reason(error)}; choose another place "
                            f"for it (--cache, runtime.feature_cache or the run's output folder)") from None

    # ---- reading ------------------------------------------------------------------------------

    def lookup(self, key: str, image_keys: Sequence[str]) -> dict[str, np.ndarray]:
        """The cached features (D,) of whichever of `image_keys` are present, and sound, under fingerprint `key`."""
        if not self.path.exists():
            return {}
        with self._locked(shared=True), self._open("r") as file:
            if file is None or key not in file:
                return {}
            good, bad = self._rows(file[key], set(image_keys))
        self._report(key, bad)
        return good

    def _present(self, key: str, image_keys: Sequence[str]) -> set[str]:
        """Which of `image_keys` are cached, and sound, under fingerprint `key`."""
        return set(self.lookup(key, image_keys))

    @staticmethod
    def _rows(group: h5py.Group, wanted: set[str], rows: Optional[int] = None) -> tuple[dict[str, np.ndarray], dict[str, int]]:
        """The features (D,) of the `wanted` keys whose rows are sound (checksum and finite values),
        and the row of each wanted key whose row is not; among the first `rows` (default: those committed)."""
        rows = int(group.attrs["rows"]) if rows is None else rows
        stored = group["keys"][:rows]
        where = {k: i for i, k in enumerate(stored.astype(str)) if k in wanted}  # a key's last row
        if not where:
            return {}, {}
        index = np.array(sorted(where.values()))
        low, high = int(index[0]), int(index[-1]) + 1  # one slice: h5py reads a list of rows one by one
        features = group["features"][low:high][index - low]
        sound = (checksums(stored[index], features) == group["checksums"][low:high][index - low]) \
            & np.isfinite(features).all(axis=1)
        good, bad = {}, {}
        for n, (k, i) in enumerate(sorted(where.items(), key=lambda item: item[1])):
            if sound[n]:
                good[k] = features[n]
            else:
                bad[k] = i
        return good, bad

    def _report(self, key: str, bad: dict[str, int]) -> None:
        """One warning per damaged row, however often it is read before it is written again."""
        new = {(key, row) for row in bad.values()} - self._reported
        if new:
            self._reported |= new
            count = len(new)
            self.warn(f"{count} row{'s' if count != 1 else ''} of the feature cache {self.path} failed "
                      f"{'their' if count != 1 else 'its'} checksum or held values that are not finite; "
                      f"computing {'those images' if count != 1 else 'that image'} again")

    # ---- writing ------------------------------------------------------------------------------

    def _commit(self, key: str, image_keys: list[str], features: np.ndarray, meta: dict) -> None:
        """Append (or write over damaged) rows under the lock; the committed row count is written last."""
        try:
            with self._locked(shared=False):
                self._reserve(len(image_keys), features.shape[1])
                with self._open("a") as file:
                    self._append(file, key, image_keys, features, meta)
        except (OSError, RuntimeError) as error:  # the rows already committed stay readable: `rows` was not moved on
            if isinstance(error, RuntimeError) and _errno_of(error) is None:
                raise  # not the disk: a bug, with its traceback
            full = _errno_of(error) in (errno.ENOSPC, errno.EDQUOT)
            raise (DiskFull if full else MvitError)(
                f"cannot write the feature cache {self.path}: {_reason(error)}"
                + ("; free some space and run again (the images cached so far are kept)" if full else "")) from None

    def _reserve(self, rows: int, width: int) -> None:
        """Claim the disk space a commit of `rows` features of `width` can take, before HDF5 writes
        any of it: on a full disk HDF5 leaves chunks unwritten under a row count it has written, and
        then crashes in its own flush. Claimed past the end of the file, which HDF5 cuts back to
        what it used at its next flush."""
        if not self.path.exists():
            try:
                with self._open("a"):  # a new, empty cache file: a few hundred bytes
                    pass
            except BaseException:
                with contextlib.suppress(OSError):  # never a file HDF5 began and did not finish
                    self.path.unlink()
                raise
        chunks = rows // CHUNK + 2  # a commit can start and end inside a chunk
        need = chunks * CHUNK * width * 4 + 2 * KEY_CHUNK * (64 + 4) + METADATA_ROOM
        descriptor = os.open(self.path, os.O_WRONLY)
        try:
            os.posix_fallocate(descriptor, os.fstat(descriptor).st_size, need)
        except (OSError, AttributeError) as error:  # (AttributeError: a system without posix_fallocate)
            if getattr(error, "errno", errno.ENOSYS) not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
            if _free_bytes(self.path) < need:  # space that cannot be claimed can at least be looked at
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path)) from None
        finally:
            os.close(descriptor)

    def _append(self, file: h5py.File, key: str, image_keys: list[str], features: np.ndarray, meta: dict) -> None:
        group = file.get(key)
        if group is None:
            group = _new_group(file, key, features.shape[1], meta)
        rows = int(group.attrs["rows"])
        # another process may have written them meanwhile; a damaged row is written over in place
        good, bad = self._rows(group, set(image_keys))
        todo = {k: i for i, k in enumerate(image_keys) if k not in good}  # key -> its row of `features`
        if not todo:
            return
        repair, fresh = [k for k in todo if k in bad], [k for k in todo if k not in bad]
        for k in repair:
            _write_rows(group, bad[k], [k], features[[todo[k]]])
        if fresh:
            for name in ("keys", "features", "checksums"):
                group[name].resize(rows + len(fresh), axis=0)
            _write_rows(group, rows, fresh, features[[todo[k] for k in fresh]])
        file.flush()  # the rows' data on disk, and read back, before the count that makes them read
        written, _ = self._rows(group, set(todo), rows + len(fresh))
        if len(written) < len(todo):  # HDF5 reports some failed writes only as a warning
            raise OSError(errno.EIO, f"{len(todo) - len(written)} of the rows just written did not read back")
        group.attrs["rows"] = rows + len(fresh)
        file.flush()

    def extract(self, backbone: VisionTransformer, preprocessing: Preprocessing, paths: Sequence[Path], **options) -> int:
        """Compute and commit the features of `paths` not cached yet; returns how many this process computed.

        Options: `device`, `dtype`, `batch_size`, `workers`, `progress`, and `processes` (torchrun's
        ranks, `Processes.shard`): this process takes every world-th batch of images, so several
        processes extract one cache together.
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
        processes: Processes = Processes(),
        progress: Optional[Callable[[int], None]] = None,
    ) -> int:
        present = self._present(key, image_keys)
        # each image belongs to one rank by its position, whatever the others have committed so far
        first = {k: i for i, k in reversed(list(enumerate(image_keys)))}
        mine = [i for i in processes.shard(len(image_keys), batch_size) if first[image_keys[i]] == i and image_keys[i] not in present]
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
                    _check_finite(features, [paths[chunk[j]] for j in decoded])
                    self._commit(key, [image_keys[chunk[j]] for j in decoded], features, meta)
        finally:
            backbone.train(was_training)
        return len(mine)

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
        """The HDF5 file; a damaged one is moved aside first (then "r" yields None, "a" a new file).
        The system refusing (a full disk, no permission) is not damage: it is raised as it is."""
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
            if isinstance(error, OSError) and error.errno is not None:
                raise
            damaged = self.path.with_name(f"{self.path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
            if self.path.exists():
                self.path.rename(damaged)
            if isinstance(error, OlderFormat):
                self.warn(f"feature cache {self.path} was written by an older mvit, without checksums; "
                          f"moved it to {damaged.name} and rebuilding it")
            else:
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
            if "checksums" not in group:
                raise OlderFormat(f"group {key} has no checksums")
            rows = int(group.attrs["rows"])
            if any(group[name].shape[0] < rows for name in ("keys", "features", "checksums")):
                raise ValueError(f"group {key} claims {rows} rows but holds fewer")


def _new_group(file: h5py.File, key: str, width: int, meta: dict) -> h5py.Group:
    group = file.create_group(key)
    group.create_dataset("keys", shape=(0,), maxshape=(None,), dtype="S64", chunks=(KEY_CHUNK,))
    group.create_dataset("features", shape=(0, width), maxshape=(None, width), dtype="float32", chunks=(CHUNK, width))
    group.create_dataset("checksums", shape=(0,), maxshape=(None,), dtype="uint32", chunks=(KEY_CHUNK,))
    group.attrs["rows"] = 0
    group.attrs["meta"] = json.dumps(meta)
    return group


def _write_rows(group: h5py.Group, start: int, keys: list[str], features: np.ndarray) -> None:
    """Rows `start`, `start` + 1, ... of `keys`, `features` (n, D) and their checksums."""
    keys, features = np.array(keys, dtype="S64"), np.ascontiguousarray(features, dtype=np.float32)
    group["keys"][start : start + len(keys)] = keys
    group["features"][start : start + len(keys)] = features
    group["checksums"][start : start + len(keys)] = checksums(keys, features)


def _check_finite(features: np.ndarray, paths: Sequence[Path]) -> None:
    """A feature that is not finite is never cached: read back, it would count as missing forever."""
    finite = np.isfinite(features).all(axis=1)
    if not finite.all():
        raise MvitError(f"the backbone's feature of {paths[int(np.argmin(finite))]} is not finite (NaN or infinite), "
                        f"so it cannot be cached or trained on; the backbone's weights are damaged: check backbone.init")


def _free_bytes(path: Path) -> int:
    stats = os.statvfs(path.parent)
    return stats.f_bavail * stats.f_frsize


def _errno_of(error: BaseException) -> Optional[int]:
    """The errno of a refusal by the system; HDF5's own errors carry it only in their text."""
    number = getattr(error, "errno", None)
    if number is not None:
        return number
    text = str(error)
    if "No space left" in text or "errno = 28" in text:
        return errno.ENOSPC
    return None


def _reason(error: BaseException) -> str:
    """Why a file could not be written, in words."""
    number = _errno_of(error)
    if number in (errno.ENOSPC, errno.EDQUOT):
        return "the disk is full"
    if number in (errno.EROFS, errno.EACCES, errno.EPERM):
        return "the folder is read-only or not writable"
    if number in (errno.ENOTDIR, errno.EEXIST):
        return "a file stands where a folder should be"
    return getattr(error, "strerror", None) or str(error)

"""The identity of an image file (its content hash, the ISIC id in its name) and the record of the
images a model trained on, which its model file keeps.

A model file keeps the identities of every image the model (its backbone or any head) trained on,
over all its training runs, so an evaluation can say when it scores images the model learned from.
Each image is kept as the first 64 bits of its sha256 (a signed big-endian int64: two different
images of 17,000 collide with a chance of about 1e-11) and, where its name has one, the seven
digits of its ISIC id (which catches resized or re-encoded copies).
"""

from __future__ import annotations

import hashlib
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional

ISIC_ID = re.compile(r"ISIC_\d{7}")

_hash_cache: dict[tuple[str, int, int], str] = {}  # (path, size, mtime) -> sha256, so a changed file is re-read


def content_hash(path: Path) -> str:
    """sha256 of the file's bytes."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _hash_cache:
        _hash_cache[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return _hash_cache[key]


def content_hashes(paths: Iterable[Path]) -> dict[Path, str]:
    """Path -> sha256 for many files; threads, since reading and hashing release the GIL."""
    unique = list(dict.fromkeys(paths))
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return dict(zip(unique, pool.map(content_hash, unique)))


def isic_id(path: Path) -> Optional[str]:
    match = ISIC_ID.search(path.name)
    return match.group(0) if match else None


def hash64(digest: str) -> int:
    """The first 64 bits of a sha256 hex digest, as the signed int64 a model file stores."""
    return int.from_bytes(bytes.fromhex(digest[:16]), "big", signed=True)


def isic_number(path: Path) -> Optional[int]:
    """The seven digits of the ISIC id in a file's name (`ISIC_0024306.jpg` -> 24306), or None."""
    found = isic_id(Path(path))
    return int(found[len("ISIC_"):]) if found else None


@dataclass(frozen=True)
class TrainingImages:
    """The identities of the images a model trained on: content hashes (`hash64`) and ISIC numbers.

    `complete` is False when a training run of the model did not record its images (it started
    from a model file written before mvit recorded them), so a count of matches may be too low.
    """

    content: frozenset[int]
    isic: frozenset[int] = frozenset()
    complete: bool = True

    @classmethod
    def of(cls, paths: Iterable[Path], *, complete: bool = True) -> "TrainingImages":
        """The identities of these files (hashed once per process: `content_hash` remembers)."""
        paths = [Path(p) for p in paths]
        hashes = content_hashes(paths)
        numbers = (isic_number(p) for p in paths)
        return cls(frozenset(hash64(hashes[p]) for p in paths), frozenset(n for n in numbers if n is not None), complete)

    def __len__(self) -> int:
        """How many distinct training images (by content)."""
        return len(self.content)

    def union(self, other: Optional["TrainingImages"]) -> "TrainingImages":
        if other is None:
            return self
        return TrainingImages(self.content | other.content, self.isic | other.isic, self.complete and other.complete)

    def matches(self, paths: Iterable[Path]) -> dict[Path, tuple[str, ...]]:
        """The files among `paths` that were training images: path -> how they match ("content", "isic_id")."""
        paths = list(dict.fromkeys(Path(p) for p in paths))
        hashes = content_hashes(paths)
        found = {}
        for path in paths:
            by = (("content",) if hash64(hashes[path]) in self.content else ()) + (
                ("isic_id",) if isic_number(path) in self.isic else ())
            if by:
                found[path] = by
        return found

    def summary(self) -> dict:
        """What the model file's JSON metadata says about the record (the identities are tensors)."""
        return {"images": len(self.content), "isic_ids": len(self.isic), "complete": self.complete,
                "identity": "sha256 of the file's bytes, first 64 bits as a signed big-endian int64; ISIC id digits"}


def recorded_training_images(provenance: Mapping) -> Optional[TrainingImages]:
    """The training images a loaded model records (in its provenance), or None for a model file without them."""
    record = provenance.get("training_images")
    return record if isinstance(record, TrainingImages) else None

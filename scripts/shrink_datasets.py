"""Copy dataset folders with every image scaled down, keeping their layout, names and label files.

For moving datasets to a training machine that cannot read ../shared/data (the GPU machine gets at
most 64 MiB), and for faster loading when training at a small image size. Identical input files
give identical output files, so mvit's content-hash leak detection still finds shared images; a
file identical to one already written becomes a relative symbolic link to it, so shared images
travel once.

    python scripts/shrink_datasets.py SRC DST --shorter-side 144 [--quality 88]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
from pathlib import Path

from PIL import Image

IMAGE_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".png": "PNG"}


def shrink(source: Path, target: Path, shorter_side: int, quality: int) -> None:
    written: dict[str, Path] = {}  # sha256 of a source file -> where its shrunken copy is
    for path in sorted(source.rglob("*")):
        if not path.is_file():
            continue
        out = target / path.relative_to(source)
        out.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest in written:
            out.symlink_to(os.path.relpath(written[digest], out.parent))
            continue
        fmt = IMAGE_FORMATS.get(path.suffix.lower())
        if fmt is None:
            shutil.copyfile(path, out)
        else:
            with Image.open(path) as image:
                image = image.convert("RGB")
                scale = shorter_side / min(image.size)
                if scale < 1:
                    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS)
                image.save(out, fmt, **({"quality": quality} if fmt == "JPEG" else {}))
        written[digest] = out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    parser.add_argument("--shorter-side", type=int, default=144)
    parser.add_argument("--quality", type=int, default=88)
    args = parser.parse_args()
    shrink(args.source, args.target, args.shorter_side, args.quality)


if __name__ == "__main__":
    main()

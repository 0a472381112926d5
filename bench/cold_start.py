"""Cold start of `mvit predict` on one image against the bare `import torch, torchvision`, paired runs.

Each round starts two fresh processes, in alternating order (so a busy neighbour or clock drift hits
both alike): the command a new user runs,

    mvit predict --head all --format json --device cpu ONE_IMAGE        (the bundled model)

and `python -c "import torch, torchvision"`, the start-up no torch program avoids. It prints each
pair's wall times, then the medians side by side, and ends with `ratio: <median mvit / median bare>`:
1.0 would mean mvit adds nothing over importing torch.

One unrecorded warm-up pair comes first (the files into the page cache). Every round's JSON must be
byte-identical to the first, so a run also checks that the output does not change from run to run.

    .venv/bin/python bench/cold_start.py [--rounds 5] [--image lesion.jpg] [--model model.safetensors]

The mvit that runs is the one the interpreter imports: set PYTHONPATH=/other/checkout/src to time
another checkout with the same interpreter. Without --image it takes the first JPEG of
../shared/data (the real datasets), else writes a synthetic one.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def find_image(folder: Path) -> Path | None:
    for sub in ("dermmel", "ham10000", "ph2"):
        found = next(iter(sorted((folder / sub).rglob("*.jpg"))[:1]), None) if (folder / sub).is_dir() else None
        if found is not None:
            return found
    return None


def synthetic_image(folder: Path) -> Path:
    """A smooth lesion-like JPEG, 300 x 225 px (as most HAM10000 images here; some are 600 x 450)."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:225, 0:300].astype(np.float32)
    lesion = np.exp(-(((x - 150) ** 2 + (y - 112) ** 2) / (2 * 60**2)))[..., None]
    pixels = np.array([225, 180, 160], np.float32) * (1 - lesion) + np.array([90, 50, 30], np.float32) * lesion
    path = folder / "lesion.jpg"
    Image.fromarray(pixels.astype(np.uint8)).save(path, quality=90)
    return path


def timed(command: list[str]) -> tuple[float, bytes]:
    """Wall seconds of one fresh process, and its stdout; a failure stops the bench."""
    start = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr.decode(errors='replace')}")
    return seconds, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="paired rounds (the medians count)")
    parser.add_argument("--image", type=Path, default=None, help="the one image (default: one of ../shared/data)")
    parser.add_argument("--model", type=Path, default=None, help="model file (default: the bundled model)")
    parser.add_argument("--python", default=sys.executable, help="the interpreter both commands run in")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        image = args.image or find_image(DATA) or synthetic_image(Path(folder))
        mvit = [args.python, "-m", "mvit", "predict", "--head", "all", "--format", "json", "--device", "cpu", str(image)]
        if args.model is not None:
            mvit[5:5] = ["--model", str(args.model)]
        bare = [args.python, "-c", "import torch, torchvision"]
        where = subprocess.run([args.python, "-c", "import mvit, torch; print(mvit.__file__, torch.__version__, torch.get_num_threads())"],
                               capture_output=True, text=True, check=True).stdout.split()
        print(f"mvit from {where[0]}, torch {where[1]} ({where[2]} threads), {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.2f}")
        print(f"image {image}")

        timed(bare), timed(mvit)  # warm-up: the page cache, not counted
        expected = None
        times: dict[str, list[float]] = {"mvit": [], "bare": []}
        print(f"\n{'round':<7}{'mvit s':>9}{'bare s':>9}{'mvit/bare':>11}  order")
        for round_ in range(args.rounds):
            order = ("mvit", "bare") if round_ % 2 == 0 else ("bare", "mvit")
            for name in order:
                seconds, out = timed(mvit if name == "mvit" else bare)
                times[name].append(seconds)
                if name == "mvit":
                    expected = out if expected is None else expected
                    if out != expected:
                        sys.exit(f"round {round_ + 1}: the JSON differs from the first round's")
            print(f"{round_ + 1:<7}{times['mvit'][-1]:>9.2f}{times['bare'][-1]:>9.2f}"
                  f"{times['mvit'][-1] / times['bare'][-1]:>11.3f}  {' then '.join(order)}")

    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"\n{'median':<7}{median['mvit']:>9.2f}{median['bare']:>9.2f}")
    print(f"mvit's own start-up over the bare import: {median['mvit'] - median['bare']:.2f} s "
          f"(output sha256 {hashlib.sha256(expected or b'').hexdigest()[:16]})")
    print(f"ratio: {median['mvit'] / median['bare']:.3f}")


if __name__ == "__main__":
    main()

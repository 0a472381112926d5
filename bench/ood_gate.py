"""What the out-of-distribution gate flags: pictures that are not dermoscopy, and real dermoscopy.

Fits nothing: it measures the gates already in model files (fit one with `mvit calibrate`). For
each model it counts the images its gate flags in

- non-dermoscopic pictures: the photographs that ship with installed packages (scikit-learn's
  `load_sample_images`, matplotlib's sample data), random crops of them, matplotlib's logo and MRI
  slice, and generated screenshots, text pages and charts (Pillow ImageDraw). The goal: flag >= 95 %.
- the HAM10000 test split, as the model file recorded its split (as `mvit evaluate` does). The goal:
  flag <= 7 %. DermMel's test split and all of PH2 (another dermoscope and clinic) are shown too,
  where present.

    mvit calibrate -d ham10000 --root ../shared/data/ham10000 -d dermmel --root ../shared/data/dermmel \\
        --method mahalanobis -o /tmp/mahalanobis.safetensors          # and --method knn, --layer pooled ...
    .venv/bin/python bench/ood_gate.py --model /tmp/mahalanobis.safetensors --model /tmp/knn.safetensors \\
        [--data ../shared/data] [--device cpu]

Models with the same backbone and gate feature share one backbone pass. Ends with `ratio: <fraction of the
non-dermoscopic pictures the first model's gate flags>`.
"""

from __future__ import annotations

import argparse
import gzip
import random
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from mvit.core import model_file
from mvit.evaluate.evaluation_set import split_settings
from mvit.evaluate.gate import pooled_features
from mvit.datasets.records import load_samples
from mvit.datasets.splits import samples_for

SEED = 0
CROPS_PER_PHOTO = 10


# ---- pictures that are not dermoscopy -----------------------------------------------------------------


def sample_photos() -> dict[str, Image.Image]:
    """The real photographs installed packages ship (no download)."""
    import matplotlib
    from sklearn.datasets import load_sample_images

    photos = {}
    bunch = load_sample_images()
    for name, array in zip(bunch.filenames, bunch.images):
        photos[Path(name).name] = Image.fromarray(array)
    folder = Path(matplotlib.get_data_path()) / "sample_data"
    for name in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png"):
        if (folder / name).is_file():
            photos[name] = Image.open(folder / name).convert("RGB")
    return photos


def other_pictures() -> dict[str, Image.Image]:
    """matplotlib's logo and its MRI slice (a medical image, but no dermoscopy)."""
    import matplotlib

    folder = Path(matplotlib.get_data_path()) / "sample_data"
    found = {}
    if (folder / "logo2.png").is_file():
        found["logo2.png"] = Image.open(folder / "logo2.png").convert("RGB")
    if (folder / "s1045.ima.gz").is_file():
        with gzip.open(folder / "s1045.ima.gz") as file:
            mri = np.frombuffer(file.read(), np.uint16).reshape(256, 256).astype(np.float64)
        found["mri s1045"] = Image.fromarray((255 * mri / mri.max()).astype(np.uint8)).convert("RGB")
    return found


def random_crops(photos: dict[str, Image.Image], per_photo: int, rng: random.Random) -> dict[str, Image.Image]:
    """Square-ish crops of 20 to 70 % of each photo's shorter side, anywhere in it."""
    crops = {}
    for name, photo in photos.items():
        w, h = photo.size
        for k in range(per_photo):
            side = int(min(w, h) * rng.uniform(0.2, 0.7))
            aspect = rng.uniform(0.75, 1.33)
            cw, ch = min(w, int(side * aspect)), side
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            crops[f"{name} crop {k}"] = photo.crop((x, y, x + cw, y + ch))
    return crops


def generated_pictures(rng: random.Random) -> dict[str, Image.Image]:
    """Screenshots (title bar, buttons, text), text pages and charts, in light and dark themes."""
    words = "the quick brown fox jumps over lazy dog lesion model file predict image error settings".split()
    pictures = {}
    for k in range(8):  # application windows
        dark = k % 2 == 1
        bg, fg = ((30, 30, 35), (220, 220, 220)) if dark else ((245, 245, 245), (20, 20, 20))
        w, h = rng.choice([(800, 600), (1024, 768), (640, 480)])
        image = Image.new("RGB", (w, h), bg)
        draw = ImageDraw.Draw(image)
        draw.rectangle([0, 0, w, 28], fill=(60, 90, 160) if k % 3 else (200, 200, 200))
        for x in range(w - 80, w, 25):
            draw.ellipse([x, 8, x + 12, 20], fill=rng.choice([(230, 80, 80), (230, 190, 60), (80, 190, 90)]))
        draw.rectangle([0, 28, 160, h], fill=tuple(max(0, c - 15) for c in bg))
        for y in range(50, h - 20, 22):
            draw.text((170 + rng.randint(0, 20), y), " ".join(rng.choice(words) for _ in range(rng.randint(3, 12))), fill=fg)
        for _ in range(3):
            x, y = rng.randint(180, w - 120), rng.randint(60, h - 40)
            draw.rectangle([x, y, x + 100, y + 28], fill=(70, 130, 220), outline=fg)
            draw.text((x + 10, y + 8), rng.choice(words).upper(), fill=(255, 255, 255))
        pictures[f"screenshot {k}"] = image
    for k in range(8):  # text pages
        w, h = 600, 800
        image = Image.new("RGB", (w, h), (255, 255, 250) if k % 2 == 0 else (255, 255, 255))
        draw = ImageDraw.Draw(image)
        for y in range(40, h - 40, rng.choice([14, 18, 24])):
            draw.text((40, y), " ".join(rng.choice(words) for _ in range(rng.randint(6, 14))), fill=(0, 0, 0))
        pictures[f"text page {k}"] = image
    for k in range(8):  # bar and line charts
        w, h = 640, 480
        image = Image.new("RGB", (w, h), (255, 255, 255))
        draw = ImageDraw.Draw(image)
        draw.line([60, 420, 600, 420], fill=(0, 0, 0), width=2)
        draw.line([60, 40, 60, 420], fill=(0, 0, 0), width=2)
        if k % 2 == 0:
            for i in range(8):
                top = rng.randint(60, 400)
                draw.rectangle([80 + i * 62, top, 120 + i * 62, 420], fill=rng.choice([(31, 119, 180), (255, 127, 14), (44, 160, 44)]))
        else:
            points = [(60 + i * 27, rng.randint(80, 400)) for i in range(21)]
            draw.line(points, fill=(214, 39, 40), width=3)
        draw.text((250, 440), "time (s)", fill=(0, 0, 0))
        pictures[f"chart {k}"] = image
    return pictures


# ---- dermoscopy ----------------------------------------------------------------------------------------


def dermoscopy_sets(model, data: Path) -> dict[str, list[Path]]:
    """Set name -> image paths, for the datasets present under `data`."""
    sets = {}
    if (data / "ham10000").is_dir():
        settings = split_settings(model.provenance, "ham10000")
        sets["HAM10000 test split"] = [s.path for s in samples_for("ham10000", data / "ham10000", "test", **settings)]
    if (data / "dermmel").is_dir():
        sets["DermMel test split"] = [s.path for s in samples_for("dermmel", data / "dermmel", "test")]
    if (data / "ph2").is_dir():
        sets["PH2, all (another clinic; its training split is in a gate fitted on ph2)"] = [s.path for s in load_samples("ph2", data / "ph2")]
    return sets


# ---- measuring -----------------------------------------------------------------------------------------


def describe(info) -> str:
    where = "pooled" if info.layer is None else f"block {info.layer}"
    return f"{info.method}{'' if info.k is None else f' k={info.k}'}, {where}"


def same_backbone(a, b) -> bool:
    if a.backbone.config != b.backbone.config or a.preprocessing != b.preprocessing:
        return False
    other = b.backbone.state_dict()
    return all(torch.equal(tensor, other[name]) for name, tensor in a.backbone.state_dict().items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=None, help="model file with a gate; repeat for several (default: the bundled model)")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1] / ".." / "shared" / "data")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()

    files = args.model or [str(model_file.bundled_model_path())]
    models = [model_file.load(path, device=args.device) for path in files]
    for path, model in zip(files, models):
        if model.ood_gate is None:
            raise SystemExit(f"{path} has no out-of-distribution gate; fit one with `mvit calibrate` first")

    rng = random.Random(SEED)
    photos = sample_photos()
    groups: dict[str, list] = {
        "photographs": list(photos.values()),
        f"random crops of them ({CROPS_PER_PHOTO} each)": list(random_crops(photos, CROPS_PER_PHOTO, rng).values()),
        "logo, MRI slice": list(other_pictures().values()),
        "screenshots, text pages, charts": list(generated_pictures(rng).values()),
    }
    non_dermoscopic = list(groups)
    groups.update(dermoscopy_sets(models[0], args.data.resolve()))

    # scores[model index][group] -> (N,) scores; one backbone pass per distinct backbone
    scores: list[dict[str, np.ndarray]] = [{} for _ in models]
    seconds = 0.0
    for i, model in enumerate(models):
        layer = model.ood_gate.info.layer
        twin = next((j for j in range(i) if models[j].ood_gate.info.layer == layer and same_backbone(models[j], model)), None)
        for name, items in groups.items():
            if twin is None:
                start = time.perf_counter()
                features, _, errors = pooled_features(model, items, layer=layer, batch_size=args.batch_size,
                                                      workers=args.workers if len(items) > args.batch_size else 0)
                seconds += time.perf_counter() - start
                if errors:
                    print(f"{len(errors)} images of {name} could not be read, e.g. {next(iter(errors.values()))}")
                cached = features
            else:
                cached = scores[twin][name + " features"]
            scores[i][name + " features"] = cached
            scores[i][name] = model.ood_gate.score(cached).numpy()

    columns = [chr(ord("A") + i) for i in range(len(models))]
    print("fraction of images each gate flags; the gates:")
    for column, path, m in zip(columns, files, models):
        info = m.ood_gate.info
        print(f"  {column}: {path} ({describe(info)}), threshold {info.threshold:.4g}, fitted on {info.train_images} "
              f"training and {info.valid_images} validation images of {', '.join(info.datasets)}")
    print(f"backbone passes: {seconds:.0f} s on {args.device}\n")
    width = max(len(name) for name in groups) + 2
    print(f"{'images':<{width}}{'n':>6}" + "".join(f"{column:>9}" for column in columns))
    rows = [*non_dermoscopic, "all non-dermoscopic", *[name for name in groups if name not in non_dermoscopic]]
    flagged_all = []
    for name in rows:
        if name == "all non-dermoscopic":
            per_model = [np.concatenate([scores[i][g] for g in non_dermoscopic]) for i in range(len(models))]
        else:
            per_model = [scores[i][name] for i in range(len(models))]
        fractions = [float(np.mean(~m.ood_gate.accepts(torch.from_numpy(s)).numpy())) for m, s in zip(models, per_model)]
        if name == "all non-dermoscopic":
            flagged_all = fractions
        print(f"{name:<{width}}{len(per_model[0]):>6}" + "".join(f"{f'{fraction:.1%}':>9}" for fraction in fractions))
    print("\ngoals: flag >= 95 % of the non-dermoscopic pictures and <= 7 % of the HAM10000 test split")
    print(f"ratio: {flagged_all[0]:.4f}")


if __name__ == "__main__":
    main()

"""Record, in a copy of a model file written before mvit recorded them, the images it trained on.

Each training run the model file's provenance lists is rebuilt as training built it (its datasets,
heads and split settings; leakage exclusion by `mvit.train.tasks.build_tasks`) from the dataset
folders given here, and the identities of every run's training images (content hashes and ISIC ids,
`mvit.core.training_images.TrainingImages`) are written into a copy of the model file. Its tensors,
heads, gate and the rest of its provenance are left as they were, and checked to be.

    python scripts/record_training_images.py src/mvit/assets/default.safetensors \
        --data ../shared/data --output /tmp/default-recorded.safetensors [--root ham10000=DIR ...]

A dataset's folder is --root NAME=DIR where given, else DATA/NAME. The content hashes are those of
these files: a run that trained on scaled-down copies (scripts/shrink_datasets.py) is recorded with
the hashes of the originals (which users have), and matches by ISIC id either way.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

from mvit.core import model_file
from mvit.core.training_images import TrainingImages
from mvit.train.config import TrainConfig
from mvit.train.tasks import TRAIN, build_tasks


def run_training_images(run: dict, roots: dict[str, Path], data: Path) -> dict[str, list[Path]]:
    """Each dataset's training images in one recorded run, rebuilt as `build_tasks` built them."""
    datasets = []
    for entry in run["config"]["datasets"]:
        root = roots.get(entry["name"], data / entry["name"])
        datasets.append({**entry, "root": str(root)})
    # only the datasets matter to build_tasks; the rest of an old config may not fit today's schema
    config = TrainConfig.model_validate({"output": tempfile.gettempdir(), "datasets": datasets})
    return {task.dataset: task.paths(TRAIN) for task in build_tasks(config, lambda message: print(f"  {message}"))}


def raw_tensors(path: Path) -> dict[str, tuple[str, bytes]]:
    """Name -> (dtype, bytes) of every tensor in a safetensors file, exactly as stored."""
    with safe_open(str(path), framework="pt") as file:
        return {name: (file.get_slice(name).get_dtype(), file.get_tensor(name).numpy().tobytes()) for name in file.keys()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--data", type=Path, required=True, help="folder holding one folder per dataset, by name")
    parser.add_argument("--root", action="append", default=[], help="NAME=DIR for a dataset elsewhere")
    parser.add_argument("--output", "-o", type=Path, required=True)
    parser.add_argument("--force", action="store_true", help="replace a record the model file already has")
    args = parser.parse_args()
    roots = {name: Path(folder) for name, _, folder in (item.partition("=") for item in args.root)}

    model = model_file.load(args.model)
    if model_file.read_training_images(args.model) is not None and not args.force:
        print(f"{args.model} already records its training images; --force to rebuild the record", file=sys.stderr)
        return 1
    provenance = dict(model.provenance)
    runs = [dict(run) for run in provenance.get("training", [])]
    if not runs:
        print(f"{args.model} records no training run", file=sys.stderr)
        return 1
    record = TrainingImages(frozenset())
    for i, run in enumerate(runs):
        print(f"run {i + 1} of {len(runs)}: {', '.join(d['name'] for d in run['config']['datasets'])}")
        per_dataset = run_training_images(run, roots, args.data)
        run["training_images"] = {name: len(set(paths)) for name, paths in per_dataset.items()}
        images = TrainingImages.of([path for paths in per_dataset.values() for path in paths])
        print(f"  training images: {run['training_images']} ({len(images)} distinct by content, {len(images.isic)} ISIC ids)")
        record = record.union(images)
    used = {d["name"]: str(roots.get(d["name"], args.data / d["name"])) for run in runs for d in run["config"]["datasets"]}
    kept = {key: provenance[key] for key in ("created", "mvit_version", "torch_version") if key in provenance}
    model_file.save(model, args.output, half=model_file.stored_as_half(args.model), provenance={
        **kept, "training": runs, "training_images": record,
        "training_images_recorded": f"afterwards, by scripts/record_training_images.py, from the dataset folders "
                                    f"{json.dumps(used)} (the content hashes are of those files), each run's training split "
                                    f"rebuilt from its recorded settings as training builds it",
    })

    # the copy must be the same model: every tensor byte for byte, the same heads, gate and preprocessing
    before, after = raw_tensors(args.model), raw_tensors(args.output)
    added = sorted(set(after) - set(before))
    assert set(before) <= set(after) and all(name.startswith("training_images.") for name in added), added
    assert all(before[name] == after[name] for name in before), "a tensor changed"
    old, new = model_file.read_metadata(args.model), model_file.read_metadata(args.output)
    assert old.heads == new.heads and old.ood_gate == new.ood_gate
    assert old.backbone == new.backbone and old.preprocessing == new.preprocessing
    reloaded = model_file.load(args.output)
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in model.state_dict().items())
    assert model_file.read_training_images(args.output) == record
    grown = args.output.stat().st_size - args.model.stat().st_size
    print(f"recorded {len(record)} training images ({len(record.isic)} ISIC ids) in {args.output}; "
          f"tensors, heads, gate and preprocessing unchanged; the file grew by {grown} bytes "
          f"({args.model.stat().st_size} -> {args.output.stat().st_size})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

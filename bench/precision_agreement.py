"""How much bfloat16 moves predictions: fp32 against bf16 on one split of a real dataset.

Runs a head over the images of a split twice, in float32 and in bfloat16 autocast, and counts the
images whose decided label changes, with the largest and mean change in calibrated probability.
Ends with `ratio: <images whose label changed / images>`.

    .venv/bin/python bench/precision_agreement.py --model runs/x/best.safetensors --head dermmel \\
        --root ../shared/data/dermmel [--split test] [--device cpu]

Without --model it builds a random-weight deit_tiny with the head: that only checks the script, since
an untrained head's probabilities sit near 1/K, where any rounding can flip a label.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from mvit.infer import model_file
from mvit.evaluate.evaluation_set import split_settings
from mvit.infer.model import HeadInfo, Model
from mvit.data.dataset import loader_workers
from mvit.infer.predict import predict_stream
from mvit.data.transforms import Preprocessing
from mvit.nn.vit import VisionTransformer, named_config
from mvit.registry import manager
from mvit.registry.records import head_targets
from mvit.registry.splits import samples_for


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model file (default: a random-weight deit_tiny, a smoke test only)")
    parser.add_argument("--head", required=True)
    parser.add_argument("--root", required=True, help="the head's dataset folder")
    parser.add_argument("--split", default="test")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    spec = manager.get_head(args.head)
    if args.model:
        model = model_file.load(args.model, device=args.device)
        settings = split_settings(model_file.read_metadata(args.model).provenance, spec.dataset)
    else:
        torch.manual_seed(0)
        model = Model(VisionTransformer(named_config("deit_tiny_patch16_224")), Preprocessing()).to(args.device)
        model.add_head(HeadInfo.from_spec(spec))
        settings = split_settings({}, spec.dataset)
    paths = [s.path for s, _ in head_targets(spec, samples_for(spec.dataset, args.root, args.split, **settings))]
    workers = loader_workers(len(paths), args.batch_size, args.device)

    results, seconds = {}, {}
    for precision in ("fp32", "bf16"):
        start = time.perf_counter()
        results[precision] = [
            r.predictions[0] for r in predict_stream(model, paths, [args.head], precision=precision,
                                                     batch_size=args.batch_size, workers=workers) if r.error is None
        ]
        seconds[precision] = time.perf_counter() - start
    fp32, bf16 = results["fp32"], results["bf16"]
    classes = model.heads[args.head].classes
    moved = np.array([[abs(a.probabilities[c] - b.probabilities[c]) for c in classes] for a, b in zip(fp32, bf16)])
    flips = [a.image for a, b in zip(fp32, bf16) if a.label != b.label]
    print(f"{args.head} on the {args.split} split of {spec.dataset}: {len(fp32)} images, device {args.device}, "
          f"model {args.model or 'random deit_tiny (smoke test)'}")
    print(f"fp32 {len(fp32) / seconds['fp32']:.1f} images/s, bf16 {len(bf16) / seconds['bf16']:.1f} images/s")
    print(f"probability change: max {moved.max():.4f}, mean {moved.mean():.5f}; labels changed: {len(flips)}")
    for image in flips:
        print(f"  changed: {image}")
    print(f"ratio: {len(flips) / len(fp32):.4f}")


if __name__ == "__main__":
    main()

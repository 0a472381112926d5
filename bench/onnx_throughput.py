"""The exported ONNX graph against mvit's fp32 PyTorch path, on the same real images in one run.

Exports the model (default: the bundled one; every head and the out-of-distribution gate) with
`mvit.infer.export.export_onnx`, then on the test splits of real datasets (default DermMel,
HAM10000 and PH2 in ../shared/data, the splits the model file records):

1. Agreement: every image through `mvit predict`'s loop (`predict_stream`, fp32, all heads) and
   through the graph with onnxruntime, preprocessed by the Python code of docs/prediction.md
   ("Export to ONNX", run as it is written): max |p_onnx - p_torch| of every head's probabilities,
   labels that differ, and the gate score's largest relative difference. Goal: <= 1e-4 per head.
2. Throughput, alternating the two sides, best of --repeats:
   - model only, on the same pre-decoded, pre-transformed batches: mvit's fp32 forward (backbone,
     every head, calibrated probabilities, gate score: `forward_images`) against onnxruntime's
     `session.run`, both with torch's thread count;
   - end to end from the files: `predict_stream` (decoding in worker processes as `mvit predict`
     does) against the documented Python code (decoding in the one process, as a user would copy it).

Ends with `ratio: <onnxruntime / mvit fp32 images/s, model only>`.

    .venv/bin/python bench/onnx_throughput.py [--model M.safetensors] [--data ../shared/data] [--images 512]
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from mvit.runtime.options import loader_workers
from mvit.data.transforms import eval_transform
from mvit.evaluate.evaluation_set import split_settings
from mvit.core import model_file
from mvit.infer.export import GATE_OUTPUT, INPUT_NAME, export_onnx
from mvit.infer.predict import forward_images, predict_stream
from mvit.runtime.options import RunOptions
from mvit.infer.prediction import calibrated
from mvit.datasets.splits import samples_for

ROOT = Path(__file__).resolve().parents[1]


def documented_code() -> dict:
    """The Python block of docs/prediction.md's "Export to ONNX" section: what a user runs without mvit."""
    section = (ROOT / "docs" / "prediction.md").read_text().split("## Export to ONNX", 1)[1]
    namespace = {"__name__": "documented"}
    exec(compile(re.search(r"```python\n(.*?)```", section, re.S).group(1), "docs/prediction.md", "exec"), namespace)
    return namespace


def mvit_model_only(model, batches, heads) -> None:
    for batch in batches:
        logits, _ = forward_images(model, batch, heads, tta=False, dtype=None)
        [calibrated(value, model.heads[name]) for name, value in logits.items()]


def onnx_model_only(session, batches) -> None:
    for batch in batches:
        session.run(None, {INPUT_NAME: batch})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model file (default: the bundled model)")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--datasets", nargs="+", default=["dermmel", "ham10000", "ph2"])
    parser.add_argument("--images", type=int, default=512, help="images timed (from the agreement set)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import onnxruntime

    model = model_file.load(args.model)
    provenance = model_file.read_metadata(args.model or model_file.bundled_model_path()).provenance
    heads = list(model.heads)
    paths: list[Path] = []
    for dataset in args.datasets:
        found = samples_for(dataset, Path(args.data) / dataset, "test", **split_settings(provenance, dataset))
        print(f"{dataset} test split: {len(found)} images")
        paths += [sample.path for sample in found]
    doc = documented_code()
    threads = torch.get_num_threads()
    workers = loader_workers(len(paths), args.batch_size, torch.device("cpu"))
    print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, {threads} threads on both sides, "
          f"{os.cpu_count()} CPUs, CPU capability {torch.backends.cpu.get_cpu_capability()}; "
          f"{model.backbone.config.image_size} px, {len(heads)} heads, gate: {model.ood_gate is not None}; "
          f"batch {args.batch_size}, {workers} decoding workers for mvit")

    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        exported = export_onnx(model, Path(folder) / "model.onnx")
        print(f"exported in {time.perf_counter() - start:.1f} s: {os.path.getsize(exported.path) / 1e6:.1f} MB, outputs {', '.join(exported.outputs)}")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        session = onnxruntime.InferenceSession(str(exported.path), options, providers=["CPUExecutionProvider"])
        meta = doc["load"](str(exported.path))[1]

        # ---- agreement on every image -------------------------------------------------------------
        torch_results = list(predict_stream(model, paths, heads, run=RunOptions("fp32", args.batch_size, workers)))
        onnx_results = []
        for first in range(0, len(paths), args.batch_size):
            onnx_results += doc["predict"](session, meta, [str(p) for p in paths[first : first + args.batch_size]])
        worst = {name: 0.0 for name in heads}
        flips = {name: 0 for name in heads}
        gate_relative, gate_flips = 0.0, 0
        for mine, theirs in zip(torch_results, onnx_results):
            assert mine.error is None, mine.error
            for prediction in mine.predictions:
                got = theirs[prediction.head]
                worst[prediction.head] = max(worst[prediction.head], *(abs(got["probabilities"][c] - p) for c, p in prediction.probabilities.items()))
                flips[prediction.head] += got["label"] != prediction.label
            if prediction.ood_score is not None:
                gate_relative = max(gate_relative, abs(theirs[GATE_OUTPUT] - prediction.ood_score) / abs(prediction.ood_score))
                gate_flips += theirs["in_distribution"] != prediction.in_distribution
        print(f"\nagreement on {len(paths)} real images (documented preprocessing + onnxruntime against `mvit predict` fp32):")
        print(f"{'head':<16}{'max |p_onnx - p_torch|':>24}{'labels differing':>18}")
        for name in heads:
            print(f"{name:<16}{worst[name]:>24.2e}{flips[name]:>18}")
        if model.ood_gate is not None:
            print(f"gate score: largest relative difference {gate_relative:.2e}; in/out-of-distribution verdicts differing: {gate_flips}")
        print(f"goal max <= 1e-4 per head: {'met' if max(worst.values()) <= 1e-4 else 'NOT met'} (worst {max(worst.values()):.2e})")

        # ---- throughput on the same images ----------------------------------------------------------
        timed = paths[: args.images]
        transform = eval_transform(model.preprocessing)
        decoded = torch.stack([transform(Image.open(p).convert("RGB")) for p in timed])
        torch_batches = list(decoded.split(args.batch_size))
        onnx_batches = [batch.numpy() for batch in torch_batches]
        mvit_model_only(model, torch_batches[:1], heads)  # warm-up
        onnx_model_only(session, onnx_batches[:1])
        times: dict[str, list[float]] = {"mvit model": [], "onnx model": [], "mvit end": [], "onnx end": []}
        for _ in range(args.repeats):  # alternate, so a busy neighbour hits both alike
            for name, run in (
                ("mvit model", lambda: mvit_model_only(model, torch_batches, heads)),
                ("onnx model", lambda: onnx_model_only(session, onnx_batches)),
                ("mvit end", lambda: list(predict_stream(model, timed, heads, run=RunOptions("fp32", args.batch_size, workers)))),
                ("onnx end", lambda: [doc["predict"](session, meta, [str(p) for p in timed[i : i + args.batch_size]])
                                      for i in range(0, len(timed), args.batch_size)]),
            ):
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)

    rate = {name: len(timed) / min(values) for name, values in times.items()}
    print(f"\nthroughput on {len(timed)} of these images, all {len(heads)} heads{' and the gate' if model.ood_gate else ''}, best of {args.repeats}:")
    print(f"{'measurement':<58}{'images/s':>10}")
    print(f"{'mvit fp32, model only (pre-decoded tensors)':<58}{rate['mvit model']:>10.1f}")
    print(f"{'onnxruntime, model only (the same arrays)':<58}{rate['onnx model']:>10.1f}")
    print(f"{'mvit fp32, end to end (predict_stream over the files)':<58}{rate['mvit end']:>10.1f}")
    print(f"{'onnxruntime, end to end (the documented Python code)':<58}{rate['onnx end']:>10.1f}")
    print(f"run times: " + ", ".join(f"{name} {min(v):.2f}-{max(v):.2f} s" for name, v in times.items()))
    print(f"end to end, onnxruntime / mvit fp32: {rate['onnx end'] / rate['mvit end']:.3f}")
    print(f"ratio: {rate['onnx model'] / rate['mvit model']:.3f}")


if __name__ == "__main__":
    main()

"""`mvit predict` end to end against the bare backbone forward, side by side in one run.

Generates JPEGs in a temporary folder (lesion-like: a dark blob on skin tones, 300 x 225 px like most of the
HAM10000 images in ../shared/data, JPEG quality 90), builds a random-weight model with every head
the installed plugins declare, and measures images/s for:

- the bare backbone forward on pre-decoded, pre-transformed tensors (no decoding at all);
- timm's fp32 forward of the same backbone on the same tensors;
- prediction end to end over the files (decode in worker processes, transform, backbone, heads,
  calibrated Prediction objects): the loop `mvit predict` runs, without process start-up;
- the same with every head, and with `--precision bf16` on a subset;
- the heads alone on pooled features, which bounds what every head costs over one without the
  noise of decoding;
- `--precision int8` against fp32 end to end (`--int8-images` real JPEGs from --data, the bundled
  model, every head, its gate, the bench's batch size), alternating, best of `--int8-repeats`; and the
  one-time cost of making the int8 copy of the backbone.

Ends with `ratio: <end-to-end images/s / bare forward images/s>` (one head, `--precision auto`); with
`--int8-only` (the int8 rows alone) with `ratio: <int8 images/s / fp32 images/s>`.

    .venv/bin/python bench/predict_throughput.py [--images 1000] [--backbone deit_tiny_patch16_224] [--device cuda]
    .venv/bin/python bench/predict_throughput.py --int8-only [--int8-images 128] [--int8-repeats 6]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mvit.core.heads import HeadInfo
from mvit.infer.model import Model
from mvit.runtime.precision import autocast, autocast_dtype, cpu_has_fast_bfloat16
from mvit.runtime.options import loader_workers
from mvit.infer.predict import predict_stream
from mvit.runtime.options import RunOptions
from mvit.core.preprocessing import Preprocessing
from mvit.data.transforms import eval_transform
from mvit.core.vit import VisionTransformer, named_config
from mvit.registry import manager
from mvit.registry.image_files import image_files


def write_jpegs(folder: Path, count: int, size: tuple[int, int] = (300, 225)) -> list[Path]:
    """Smooth synthetic lesions: JPEG decoding cost depends on content, and noise would overstate it."""
    rng = np.random.default_rng(0)
    width, height = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    paths = []
    for k in range(count):
        cx, cy, r = rng.uniform(0.3, 0.7) * width, rng.uniform(0.3, 0.7) * height, rng.uniform(30, 90)
        lesion = np.exp(-(((x - cx) ** 2 + (y - cy) ** 2) / (2 * r**2)))[..., None]  # (H, W, 1)
        skin = np.array([225, 180, 160], np.float32) * rng.uniform(0.8, 1.0)
        brown = np.array([90, 50, 30], np.float32) * rng.uniform(0.6, 1.2)
        texture = rng.normal(0, 6, (height, width, 1))
        pixels = np.clip(skin * (1 - lesion) + brown * lesion + texture, 0, 255).astype(np.uint8)
        path = folder / f"lesion_{k:05d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def build_model(backbone: str) -> Model:
    torch.manual_seed(0)
    model = Model(VisionTransformer(named_config(backbone)), Preprocessing(image_size=224))
    for spec in manager.list_heads():
        model.add_head(HeadInfo.from_spec(spec))
    return model.eval()


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_only(network: torch.nn.Module, batches: list[torch.Tensor], total: int, dtype) -> float:
    """Seconds for `total` images through `network` alone, cycling over pre-decoded batches on its device."""
    device = batches[0].device
    done, start = 0, time.perf_counter()
    with torch.inference_mode(), autocast(device, dtype):
        while done < total:
            batch = batches[(done // len(batches[0])) % len(batches)]
            network(batch)
            done += len(batch)
    _synchronise(device)
    return time.perf_counter() - start


def heads_only(model: Model, features: torch.Tensor, heads: list[str], repeats: int = 20) -> float:
    """Best seconds for the heads alone on pooled features (N, D): what asking for more heads adds."""
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            model.head_logits(features, heads)
            _synchronise(features.device)
            best = min(best, time.perf_counter() - start)
    return best


def end_to_end(model: Model, files: list[Path], heads, batch_size: int, workers: int, precision: str) -> float:
    start = time.perf_counter()
    results = predict_stream(model, files, heads, run=RunOptions(precision, batch_size, workers))
    assert all(r.error is None for r in results)  # results are moved to the CPU, so the GPU is done too
    return time.perf_counter() - start


def int8_against_fp32(data: Path, count: int, batch_size: int, workers, repeats: int) -> tuple[list, float]:
    """Rows for int8 against fp32 end to end with the bundled model on real images; and int8 / fp32."""
    import mvit
    from mvit.infer.quantize import int8_backbone

    model = mvit.load(device="cpu")
    files = sorted(image_files(data))[:count]
    if not files:
        raise SystemExit(f"no images under {data}; pass --data")
    workers = loader_workers(len(files), batch_size, torch.device("cpu")) if workers is None else workers
    start = time.perf_counter()
    int8_backbone(model)  # the one-time copy, kept on the model
    quantizing = time.perf_counter() - start
    end_to_end(model, files[:batch_size], None, batch_size, workers, "fp32")  # warm-up
    end_to_end(model, files[:batch_size], None, batch_size, workers, "int8")
    times: dict[str, list[float]] = {"fp32": [], "int8": []}
    for _ in range(repeats):  # alternate, so a busy neighbour hits both alike
        for precision in times:
            times[precision].append(end_to_end(model, files, None, batch_size, workers, precision))
    rate = {precision: len(files) / min(values) for precision, values in times.items()}
    where = f"{len(files)} real images from {data}, bundled model, all {len(model.heads)} heads + gate, {workers} workers"
    print(f"int8 rows: {where}; run times {', '.join(f'{p} ' + '/'.join(f'{t:.1f}' for t in v) + ' s' for p, v in times.items())}")
    rows = [
        ("end to end, fp32, bundled model, real images", rate["fp32"], ""),
        ("end to end, int8, bundled model, real images", rate["int8"], f"{rate['int8'] / rate['fp32']:.2f}x fp32"),
        ("making the int8 backbone (once per model)", float("nan"), f"{quantizing:.2f} s"),
    ]
    return rows, rate["int8"] / rate["fp32"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--backbone", default="deit_tiny_patch16_224")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: as `mvit predict` chooses)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each measurement, alternating; the best counts")
    parser.add_argument("--bf16-images", type=int, default=128, help="images for the bf16 rows (slow on CPUs without AMX)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--int8-images", type=int, default=128, help="real images for the int8 rows (CPU only; 0: none)")
    parser.add_argument("--int8-repeats", type=int, default=6,
                        help="timed runs of fp32 and int8, alternating; the best of each counts (short runs catch quiet spells on a shared machine)")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "ham10000",
                        help="folder of real images for the int8 rows")
    parser.add_argument("--int8-only", action="store_true", help="only the int8 rows")
    args = parser.parse_args()

    if args.int8_only:
        rows, speedup = int8_against_fp32(args.data, args.int8_images, args.batch_size, args.workers, args.int8_repeats)
        print(f"\n{'measurement':<48}{'images/s':>10}  note")
        for name, value, note in rows:
            print(f"{name:<48}{'' if value != value else f'{value:.1f}':>10}  {note}")  # nan: no rate
        print(f"ratio: {speedup:.3f}")
        return

    import timm

    device = torch.device(args.device)
    model = build_model(args.backbone).to(device)
    one_head, all_heads = [next(iter(model.heads))], list(model.heads)
    workers = loader_workers(args.images, args.batch_size, device) if args.workers is None else args.workers
    auto = autocast_dtype("auto", device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU capability {torch.backends.cpu.get_cpu_capability()}"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, {where}, "
          f"fast bfloat16 on the CPU (AMX): {cpu_has_fast_bfloat16()}; --precision auto -> {'bf16' if auto else 'fp32'}")
    print(f"{args.backbone}, {len(all_heads)} heads, batch {args.batch_size}, {workers} decoding workers")

    reference = timm.create_model(args.backbone, pretrained=False, num_classes=0).eval().to(device)
    with tempfile.TemporaryDirectory() as folder:
        files = write_jpegs(Path(folder), args.images)
        transform = eval_transform(model.preprocessing)
        decoded = torch.stack([transform(Image.open(f).convert("RGB")) for f in files[: 8 * args.batch_size]])
        batches = list(decoded.to(device).split(args.batch_size))  # pre-decoded (B, 3, 224, 224), cycled over
        for dtype in {auto, None}:  # warm-up
            forward_only(model.backbone, batches[:1], args.batch_size, dtype)
            forward_only(reference, batches[:1], args.batch_size, dtype)

        times: dict[str, list[float]] = {"bare": [], "timm": [], "one": [], "all": []}
        for _ in range(args.repeats):  # alternate, so clock drift and a busy neighbour hit all alike
            times["bare"].append(forward_only(model.backbone, batches, args.images, auto))
            times["timm"].append(forward_only(reference, batches, args.images, None))
            times["one"].append(end_to_end(model, files, one_head, args.batch_size, workers, "auto"))
            times["all"].append(end_to_end(model, files, all_heads, args.batch_size, workers, "auto"))
        small = files[: args.bf16_images]
        bf16_bare = forward_only(model.backbone, batches, args.bf16_images, torch.bfloat16)
        bf16_end = end_to_end(model, small, one_head, args.batch_size, workers, "bf16")

        features = torch.randn(args.images, model.backbone.width, device=device)  # (N, D) pooled features
        head_seconds = {len(h): heads_only(model, features, h) for h in (one_head, all_heads)}

    rate = {name: args.images / min(values) for name, values in times.items()}
    rows = [
        ("bare backbone forward, pre-decoded (auto)", rate["bare"], ""),
        ("timm forward, pre-decoded (fp32)", rate["timm"], ""),
        (f"end to end, 1 head (auto)", rate["one"], f"{rate['one'] / rate['bare']:.3f} of bare"),
        (f"end to end, all {len(all_heads)} heads (auto)", rate["all"], f"{rate['one'] / rate['all']:.3f}x the time of 1 head"),
        (f"bare backbone forward, bf16 ({args.bf16_images} images)", args.bf16_images / bf16_bare, ""),
        (f"end to end, 1 head, bf16 ({args.bf16_images} images)", args.bf16_images / bf16_end, ""),
    ]
    if device.type == "cpu" and args.int8_images > 0:
        rows += int8_against_fp32(args.data, args.int8_images, args.batch_size, args.workers, args.int8_repeats)[0]
    print(f"\n{'measurement':<48}{'images/s':>10}  note")
    for name, value, note in rows:
        print(f"{name:<48}{'' if value != value else f'{value:.1f}':>10}  {note}")  # nan: no rate
    spread = {name: f"{min(v):.2f}-{max(v):.2f} s" for name, v in times.items()}
    print(f"\nrun times over {args.repeats} repeats (best counts): {spread}")
    bound = (min(times["bare"]) + head_seconds[len(all_heads)]) / (min(times["bare"]) + head_seconds[1])
    print(f"heads alone on {args.images} pooled features: 1 head {1000 * head_seconds[1]:.2f} ms, all {len(all_heads)} "
          f"{1000 * head_seconds[len(all_heads)]:.2f} ms, so all heads take at most {bound:.4f}x the time of one "
          "(the end-to-end rows differ by noise)")
    print(f"end to end (auto) against timm fp32: {rate['one'] / rate['timm']:.2f}x")
    print(f"ratio: {rate['one'] / rate['bare']:.3f}")


if __name__ == "__main__":
    main()

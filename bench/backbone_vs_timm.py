"""mvit's backbone against timm's DeiT: same configuration, same weights, alternating runs.

Prints images/s for each backbone size and batch size, the ratio mvit/timm (above 1 means mvit is
faster; the median over groups of timm, mvit, mvit, timm runs), then bfloat16 autocast against float32 for mvit's backbone with the largest difference in
pooled features. Ends with `ratio: <lowest fp32 ratio>`.

    .venv/bin/python bench/backbone_vs_timm.py [--sizes tiny small base] [--batches 1 8 32]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import timm
import torch

from mvit.runtime.precision import cpu_has_fast_bfloat16
from mvit.core.weights import create_backbone, load_timm_state_dict


def seconds_per_batch(model: torch.nn.Module, images: torch.Tensor, bf16: bool = False, calls: int = 1) -> float:
    """Mean seconds of one forward, over `calls` forwards timed together."""
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        start = time.perf_counter()
        for _ in range(calls):
            model(images)
        return (time.perf_counter() - start) / calls


def calls_for(seconds: float, at_least: float = 0.5) -> int:
    """Forwards per timed sample, so that a fast forward is not timed alone (timer and scheduler noise)."""
    return max(1, math.ceil(at_least / seconds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small", "base"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=5, help="groups of timed samples (timm, mvit, mvit, timm)")
    parser.add_argument("--bf16-batch", type=int, default=8)
    args = parser.parse_args()

    torch.manual_seed(0)
    print(f"torch {torch.__version__}, timm {timm.__version__}, {torch.get_num_threads()} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, fast bfloat16: {cpu_has_fast_bfloat16()}")
    print(f"{'backbone':<24}{'batch':>6}{'timm img/s':>12}{'mvit img/s':>12}{'ratio':>8}")
    ratios, pairs = [], {}
    for size in args.sizes:
        name = f"deit_{size}_patch16_224"
        reference = timm.create_model(name, pretrained=False, num_classes=0).eval()
        ours = create_backbone(name).eval()
        load_timm_state_dict(ours, reference.state_dict())
        pairs[name] = (reference, ours)
        for batch in args.batches:
            images = torch.randn(batch, 3, 224, 224)
            seconds_per_batch(reference, images)  # warm-up
            calls = calls_for(seconds_per_batch(ours, images))
            timm_times, our_times, pair_ratios = [], [], []
            for _ in range(args.repeats):
                # timm, mvit, mvit, timm: a drift in clock speed or a noisy neighbour within the
                # group hits both alike, so each group's ratio is fair even when groups differ
                t1 = seconds_per_batch(reference, images, calls=calls)
                o1 = seconds_per_batch(ours, images, calls=calls)
                o2 = seconds_per_batch(ours, images, calls=calls)
                t2 = seconds_per_batch(reference, images, calls=calls)
                timm_times += [t1, t2]
                our_times += [o1, o2]
                pair_ratios.append((t1 + t2) / (o1 + o2))
            timm_rate = batch / statistics.median(timm_times)
            our_rate = batch / statistics.median(our_times)
            ratios.append(statistics.median(pair_ratios))
            print(f"{name:<24}{batch:>6}{timm_rate:>12.2f}{our_rate:>12.2f}{ratios[-1]:>8.3f}", flush=True)

    print(f"\nbfloat16 autocast against float32 (mvit backbone, batch {args.bf16_batch})")
    print(f"{'backbone':<24}{'fp32 img/s':>12}{'bf16 img/s':>12}{'speed-up':>10}{'max |diff|':>12}{'max |feature|':>15}")
    for name, (_, ours) in pairs.items():
        images = torch.randn(args.bf16_batch, 3, 224, 224)
        with torch.inference_mode():
            full = ours(images)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                half = ours(images).float()
        fp32 = [seconds_per_batch(ours, images) for _ in range(2)]
        bf16 = [seconds_per_batch(ours, images, bf16=True) for _ in range(2)]
        fp32_rate, bf16_rate = args.bf16_batch / min(fp32), args.bf16_batch / min(bf16)
        print(f"{name:<24}{fp32_rate:>12.2f}{bf16_rate:>12.2f}{bf16_rate / fp32_rate:>10.2f}"
              f"{(full - half).abs().max().item():>12.4f}{full.abs().max().item():>15.3f}", flush=True)

    print(f"\nratio: {min(ratios):.3f}")


if __name__ == "__main__":
    main()

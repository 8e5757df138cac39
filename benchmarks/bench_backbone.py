"""Images per second through the features extractor (CCT-14 cut to --trunc_te blocks, GeM), as eval.py runs it:
fp32, inference mode, random weights. It is r_img of docs/benchmarks.md's arithmetic for large databases.

    python -m benchmarks.bench_backbone                              # CPU, 384 x 384, 8 images a batch
    python -m benchmarks.bench_backbone --device cuda --batch_size 32 64

Each batch size: one warm-up batch, then the best of --rounds timed batches (synchronised on CUDA).
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.machine import cpu_name
from commons import ModelConfig, build_models, resolve_device


def images_per_second(features_extractor: torch.nn.Module, images: torch.Tensor, rounds: int) -> float:
    """Best rate over `rounds` passes of the batch `images` (B, 3, H, W), after one warm-up pass."""
    synchronize = torch.cuda.synchronize if images.device.type == "cuda" else (lambda: None)
    best = float("inf")
    with torch.inference_mode():
        for round_index in range(rounds + 1):
            synchronize()
            start = time.perf_counter()
            features_extractor(images)
            synchronize()
            if round_index:  # the first pass warms up
                best = min(best, time.perf_counter() - start)
    return len(images) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--resize", type=int, nargs=2, default=[384, 384], help="H W, multiples of 16")
    parser.add_argument("--trunc_te", type=int, default=8, help="CCT blocks kept")
    parser.add_argument("--batch_size", type=int, nargs="+", default=[8], help="images a batch (several: each)")
    parser.add_argument("--rounds", type=int, default=3, help="timed batches per batch size")
    args = parser.parse_args()
    device = resolve_device(args.device)
    torch.manual_seed(0)
    features_extractor, _ = build_models(
        ModelConfig(tuple(args.resize), args.trunc_te), device, on_random_weights=lambda flag, part: None
    )
    features_extractor.eval()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(f"{where}; torch {torch.__version__}, {torch.get_num_threads()} threads; fp32, {args.resize[0]} x "
          f"{args.resize[1]}, {args.trunc_te} blocks")  # fmt: skip
    for batch_size in args.batch_size:
        images = torch.rand(batch_size, 3, *args.resize, device=device)
        rate = images_per_second(features_extractor, images, args.rounds)
        print(f"batch {batch_size:4d}: {rate:8.2f} images/s", flush=True)


if __name__ == "__main__":
    main()

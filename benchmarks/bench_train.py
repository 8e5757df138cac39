"""Training step time and peak memory, with and without --amp, for train_dhe.py and finetune.py.

    python -m benchmarks.bench_train                       # 384 x 384, the scripts' default batches, --device auto
    python -m benchmarks.bench_train --device cpu --steps 3 --resize 192 192

Each configuration runs in its own process (so that peak memory is its own): models at the defaults (CCT-14 cut to
--trunc_te blocks, the DHE head), random images, the scripts' own loss functions (`training.dhe_init.head_loss`,
`training.finetuning.joint_losses`), backward and an Adam step, timed after --warmup steps. Peak memory is the CUDA
allocator's peak on a GPU, the process's peak resident set on CPU. Prints one line per configuration.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def one(script: str, amp: bool, options: argparse.Namespace) -> dict:
    """Time `options.steps` training steps of `script`; returns seconds per step and peak memory in MB."""
    import torch

    from commons import resolve_device
    from model import FeaturesExtractor, HomographyRegression
    from model.precision import amp_autocast, amp_dtype
    from training.task import grad_scaler

    device = resolve_device(options.device)
    torch.manual_seed(0)
    resize = tuple(options.resize)
    features_extractor = FeaturesExtractor(resize, trunc_te=options.trunc_te, freeze_te=5).to(device)
    head = HomographyRegression(resize).to(device)
    scaler = grad_scaler(device, amp)

    if script == "train_dhe":
        from training.dhe_init import head_loss

        features_extractor.eval().requires_grad_(False)
        batch = options.batch_size or 16
        query, positive = torch.randn(2, batch, 3, *resize, device=device)
        parameters = list(head.parameters())

        def loss():
            return head_loss(features_extractor, head, query, positive, device)

    else:
        from training.finetuning import joint_losses

        negatives = 2
        batch = options.batch_size or 4
        images = torch.randn(batch * (2 + negatives), 3, *resize, device=device)
        starts = torch.arange(batch) * (2 + negatives)
        triplets = torch.stack([torch.stack([s, s + 1, s + 2 + n]) for s in starts for n in range(negatives)]).to(
            device
        )
        loss_options = {"criterion": "triplet", "margin": 0.1, "rei_weight": 100.0, "rei_inliers": "minimal"}
        features_extractor.train()
        head.train()
        parameters = [p for m in (features_extractor, head) for p in m.parameters() if p.requires_grad]

        def loss():
            return joint_losses(features_extractor, head, images, triplets, negatives, **loss_options)["loss"]

    optimizer = torch.optim.Adam(parameters, lr=1e-5)

    def step():
        with amp_autocast(device, amp):
            value = loss()
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(value).backward()
        scaler.step(optimizer)
        scaler.update()

    for _ in range(options.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(options.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux
    seconds = (time.perf_counter() - start) / options.steps
    dtype = str(amp_dtype(device)).removeprefix("torch.") if amp else "float32"
    result = {"script": script, "amp": dtype, "batch": batch, "seconds": seconds, "peak_mb": peak_mb}
    return result | {"device": device.type}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--resize", type=int, nargs=2, default=[384, 384])
    parser.add_argument("--trunc_te", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=None, help="default: 16 pairs (train_dhe), 4 (finetune)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--scripts", nargs="+", default=["train_dhe", "finetune"], choices=["train_dhe", "finetune"])
    parser.add_argument("--_one", nargs=2, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options._one:
        print(json.dumps(one(options._one[0], options._one[1] == "amp", options)))
        return
    passthrough = sys.argv[1:]
    print(f"{'script':<10} {'precision':<10} {'batch':>5} {'s/step':>9} {'peak MB':>9}  device")
    for script in options.scripts:
        for precision in ("fp32", "amp"):
            output = subprocess.run(
                [sys.executable, "-m", "benchmarks.bench_train", *passthrough, "--_one", script, precision],
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            r = json.loads(output.strip().splitlines()[-1])
            line = f"{r['script']:<10} {r['amp']:<10} {r['batch']:>5} {r['seconds']:>9.3f} {r['peak_mb']:>9.0f}"
            print(f"{line}  {r['device']}")


if __name__ == "__main__":
    main()

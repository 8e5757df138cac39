"""CPU speed of the ONNX export (onnxruntime) against torch: the features extractor and the correlation + DHE head.

Random seeded weights (speed does not depend on them) at ``--resize`` (384 x 384 by default, ``--trunc_te 8`` as
the released models); both parts are exported with ``deploy.onnx_export`` into a temporary folder and run by
onnxruntime's CPU provider with as many threads as torch uses. Reported: images/s of the features extractor on
batches of ``--batch_size`` images, pairs/s of the head on passes of ``--pairs`` (query, candidate) pairs, and the
pairs/s of what stays outside the graph (``rerank_from_points``: DLT, inlier counts, order). Each variant runs
``--rounds`` times, interleaved (torch, onnxruntime, torch, ...) so that load from other processes hits them alike;
the best round counts, the median is printed too. The outputs of each pair of runs are compared as well.

    python -m benchmarks.bench_onnx --quick     # 128 x 128, under a minute on 2 CPUs
    python -m benchmarks.bench_onnx             # 384 x 384, ~8 minutes on a loaded 2-CPU machine
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks.machine import cpu_name
from deploy import onnx_export
from model import FeaturesExtractor, HomographyRegression, compute_similarity
from model.dhe import cpu_kernels


def time_rounds(variants: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Seconds of each call of each variant, `rounds` times, interleaved; one untimed warm-up call each first."""
    for run in variants.values():
        run()
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def report(what: str, unit: str, count: int, seconds: dict[str, list[float]]) -> None:
    baseline = count / min(seconds["torch"])
    for name, values in seconds.items():
        best, median = count / min(values), count / statistics.median(values)
        print(f"  {what:<18} {name:<12} {best:8.1f} {unit}/s (median {median:8.1f})  x{best / baseline:.2f} of torch")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resize", type=int, nargs=2, default=[384, 384], metavar=("H", "W"))
    parser.add_argument("--trunc_te", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=8, help="Images per run of the features extractor.")
    parser.add_argument("--pairs", type=int, default=32, help="Pairs per pass of the head (eval.py's CPU default).")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="128 x 128, 3 rounds.")
    args = parser.parse_args(argv)
    if args.quick:
        args.resize, args.rounds = [128, 128], 3
    resize = tuple(args.resize)
    onnx_export.require_onnx()
    import onnxruntime

    threads = torch.get_num_threads()
    print(f"CPU: {cpu_name()}; torch {torch.__version__} ({threads} threads, head kernels {cpu_kernels()}), "
          f"onnxruntime {onnxruntime.__version__} ({threads} threads)")  # fmt: skip
    print(f"resize {resize[0]} x {resize[1]}, trunc_te {args.trunc_te}, random seeded weights, fp32")

    torch.manual_seed(0)
    features_extractor = FeaturesExtractor(resize=resize, trunc_te=args.trunc_te).eval()
    head = HomographyRegression(resize=resize).eval()
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch_size, 3, *resize, generator=generator)
    shape = (args.pairs, features_extractor.features_dim, *head.grid_size)
    local_q, local_c = (F.normalize(torch.rand(shape, generator=generator), dim=1) for _ in range(2))

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    with tempfile.TemporaryDirectory() as folder:
        paths = onnx_export.export_models(features_extractor, head, folder)
        sessions = {
            name: onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            for name, path in paths.items()
        }

    def torch_extractor():
        with torch.inference_mode():
            return features_extractor(images)

    def torch_head():
        with torch.inference_mode():
            return head(compute_similarity(local_q, local_c))

    feeds = {"local_q": local_q.numpy(), "local_c": local_c.numpy()}
    (points,) = sessions["head"].run(None, feeds)
    extractor = time_rounds(
        {
            "torch": torch_extractor,
            "onnxruntime": lambda: sessions["features_extractor"].run(None, {"images": images.numpy()}),
        },
        args.rounds,
    )
    pairs = time_rounds(
        {
            "torch": torch_head,
            "onnxruntime": lambda: sessions["head"].run(None, feeds),
            "outside": lambda: onnx_export.rerank_from_points(points, local_q, local_c),
        },
        args.rounds,
    )
    report("features extractor", "images", args.batch_size, extractor)
    outside = pairs.pop("outside")
    report("correlation + head", "pairs", args.pairs, pairs)
    print(f"  {'outside the graph':<18} {'DLT+inliers':<12} {args.pairs / min(outside):8.1f} pairs/s")
    global_descriptors, local_features = torch_extractor()
    onnx_global, onnx_local = sessions["features_extractor"].run(None, {"images": images.numpy()})
    difference = {
        "global_descriptors": onnx_export.relative_difference(onnx_global, global_descriptors.numpy()),
        "local_features": onnx_export.relative_difference(onnx_local, local_features.numpy()),
        "points": onnx_export.relative_difference(points, torch_head().numpy()),
    }
    print("max relative difference onnxruntime vs torch: " + ", ".join(f"{k} {v:.1e}" for k, v in difference.items()))


if __name__ == "__main__":
    main()

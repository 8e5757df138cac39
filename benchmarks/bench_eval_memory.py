"""Peak resident memory of `eval.py` for two database sizes, against holding every fp32 local map in RAM.

    python -m benchmarks.bench_eval_memory                    # 250 and 1000 database images at --resize 192 192
    python -m benchmarks.bench_eval_memory --in_memory_mb 32  # also with 32 MB of local features kept in RAM

Each size is a synthetic world (synthetic.py) evaluated by `eval.py` in a fresh process, whose peak RSS
(ru_maxrss) is read at its end. The growth per database image between the two sizes is what the database costs;
the original kept a (384, h, w) fp32 local map per image in RAM, 0.88 MB an image at 384 x 384. With
`--in_memory_mb`, each size runs again with `--local_features_in_memory_mb` at that budget: the peak may grow by the
budget at most, whatever the database size.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tools.synthetic.world import generate_world

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import resource, runpy, sys
sys.argv = ["eval.py", *sys.argv[1:]]
runpy.run_path({script!r}, run_name="__main__")  # eval.py as a script, in this process
print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_rss_kb(
    world: Path, resize: tuple[int, int], num_reranked: int, workdir: Path, in_memory_mb: int | None = None
) -> int:
    argv = ["--datasets_folder", str(world.parent), "--dataset_name", world.name, "--resize", *map(str, resize)]
    if in_memory_mb is not None:
        argv += ["--local_features_in_memory_mb", str(in_memory_mb)]
    argv += ["--device", "cpu", "--num_workers", "0", "--num_reranked_preds", str(num_reranked), "--exp_name", "mem"]
    completed = subprocess.run(
        [sys.executable, "-c", CHILD.format(script=str(ROOT / "eval.py")), *argv],
        cwd=workdir,
        env={**os.environ, "PYTHONPATH": str(ROOT)},  # the project's modules, for eval.py run from workdir
        capture_output=True,
        text=True,
        check=True,
    )
    line = next(line for line in completed.stdout.splitlines() if line.startswith("PEAK_RSS_KB"))
    return int(line.split()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs=2, default=[250, 1000], help="Two database sizes.")
    parser.add_argument("--queries", type=int, default=10, help="Test queries of each world.")
    parser.add_argument("--resize", type=int, nargs=2, default=[192, 192], help="Image size of worlds and eval.")
    parser.add_argument("--num_reranked_preds", type=int, default=4, help="Candidates re-ranked per query.")
    parser.add_argument(
        "--in_memory_mb", type=int, default=None, help="Also run with this --local_features_in_memory_mb budget."
    )
    args = parser.parse_args()
    small, large = sorted(args.sizes)
    height, width = args.resize
    channels, grid = 384, (height // 16) * (width // 16)
    fp32_map_kb = channels * grid * 4 / 1024
    with tempfile.TemporaryDirectory() as temporary:
        temporary = Path(temporary)
        peaks = {}
        for size in (small, large):
            world = generate_world(
                temporary / "worlds",
                f"db{size}",
                image_size=(height, width),
                database_per_split=(2, 2, size),
                queries_per_split=(1, 1, args.queries),
            )
            peaks[size] = peak_rss_kb(world, (height, width), args.num_reranked_preds, temporary)
            print(f"database {size:5d} images: peak RSS {peaks[size] / 1024:8.1f} MB", flush=True)
            if args.in_memory_mb is not None:
                budget_peak = peak_rss_kb(world, (height, width), args.num_reranked_preds, temporary, args.in_memory_mb)
                record_mb = channels * grid * 2 / 2**20
                held_mb = min(args.in_memory_mb // record_mb, size + args.queries) * record_mb
                print(
                    f"      with --local_features_in_memory_mb {args.in_memory_mb}: peak RSS {budget_peak / 1024:8.1f} "
                    f"MB, +{(budget_peak - peaks[size]) / 1024:.1f} MB for {held_mb:.1f} MB of features in RAM",
                    flush=True,
                )
    growth_kb = (peaks[large] - peaks[small]) / (large - small)
    descriptor_kb = channels * 4 / 1024
    print(f"growth per database image: {growth_kb:.2f} KB (of which the global descriptor: {descriptor_kb:.2f} KB)")
    print(f"growth beyond descriptors: {growth_kb - descriptor_kb:.2f} KB per image (target: <= ~4 KB)")
    print(
        f"holding every fp32 local map instead: {fp32_map_kb:.0f} KB per image at {height}x{width} "
        f"({channels * 576 * 4 / 1024:.0f} KB at 384x384), i.e. +{fp32_map_kb * large / 1024:.0f} MB for {large} images"
    )


if __name__ == "__main__":
    main()

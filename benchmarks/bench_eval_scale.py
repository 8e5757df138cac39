"""`eval.py` on a large synthetic database: local features of every image against those of the candidates only, and
one process against two (torchrun).

    python -m benchmarks.bench_eval_scale                        # 20,000 database images, 200 queries, 48 x 48
    python -m benchmarks.bench_eval_scale --database 2000 --queries 50 --workdir /tmp/scale   # quicker; keeps the world

Each run is `eval.py` in fresh processes on the same world (synthetic.py, made once into --workdir and reused when
it is already there), with random weights (the cost does not depend on them), --save_predictions and
--local_features_in_memory_mb 0 (every local feature goes to the temporary file, as on CPU by default). It prints
per run the peak RSS of the largest process (ru_maxrss), the local features written (results.json's "stats", the
peak of the temporary files, summed over processes), the seconds of each stage, and whether predictions.csv equals
the first run's. On a machine with fewer cores than processes x threads the processes share the cores: the
2-process run then shows that the work splits and the results agree, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.machine import cpu_name
from tools.synthetic.world import generate_world

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import resource, runpy, sys
sys.argv = [{name!r}, *sys.argv[1:]]
try:
    {run}
finally:  # the largest of this process and of those it waited for (torchrun's workers)
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print("PEAK_RSS_KB", max(own, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss), flush=True)
"""


def run_eval(world: Path, workdir: Path, name: str, flags: list[str], processes: int, threads: int) -> dict:
    """One `eval.py` run (under torchrun when `processes` > 1): its stats, seconds, peak RSS and predictions."""
    argv = ["--datasets_folder", str(world.parent), "--dataset_name", world.name, *flags, "--exp_name", name]
    script = str(ROOT / "eval.py")
    if processes > 1:
        run = 'runpy.run_module("torch.distributed.run", run_name="__main__")'
        command = [sys.executable, "-c", CHILD.format(name="torchrun", run=run)]
        command += ["--standalone", "--nproc_per_node", str(processes), script]
    else:
        run = f"runpy.run_path({script!r}, run_name='__main__')"
        command = [sys.executable, "-c", CHILD.format(name=script, run=run)]
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    completed = subprocess.run(command + argv, cwd=workdir, env=environment, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if completed.returncode:
        sys.exit(f"{name} failed:\n{completed.stderr[-4000:]}")
    line = next(line for line in completed.stdout.splitlines() if line.startswith("PEAK_RSS_KB"))
    (folder,) = (workdir / "logs" / name).iterdir()
    results = json.loads((folder / "results.json").read_text())
    return {
        "stats": results["stats"],
        "recalls": results["reranked"],
        "peak_rss_mb": int(line.split()[1]) / 1024,
        "wall_seconds": wall,
        "predictions": (folder / "predictions.csv").read_text(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database", type=int, default=20000, help="Database images of the test split.")
    parser.add_argument("--queries", type=int, default=200, help="Test queries.")
    parser.add_argument("--resize", type=int, nargs=2, default=[48, 48], help="Image size of the world and eval.")
    parser.add_argument("--num_reranked_preds", type=int, default=32, help="Candidates re-ranked per query.")
    parser.add_argument("--workdir", type=Path, default=None, help="Keeps the world and the runs (default: temp).")
    args = parser.parse_args()
    temporary = tempfile.TemporaryDirectory() if args.workdir is None else None
    workdir = Path(temporary.name) if temporary else args.workdir
    height, width = args.resize
    world = workdir / "worlds" / f"scale{args.database}_{args.queries}_{height}x{width}"
    if not (world / "images" / "test").is_dir():
        start = time.perf_counter()
        generate_world(
            world.parent,
            world.name,
            image_size=(height, width),
            database_per_split=(2, 2, args.database),
            queries_per_split=(1, 1, args.queries),
        )
        print(f"world of {args.database} database images and {args.queries} queries made in "
              f"{time.perf_counter() - start:.0f} s", flush=True)  # fmt: skip
    threads = torch.get_num_threads()
    common = ["--resize", str(height), str(width), "--device", "cpu", "--num_workers", "0", "--save_predictions"]
    common += ["--num_reranked_preds", str(args.num_reranked_preds), "--local_features_in_memory_mb", "0"]
    runs = [
        ("all", ["--local_features", "all"], 1, threads),
        ("candidates", ["--local_features", "candidates"], 1, threads),
        ("candidates_2proc", ["--local_features", "candidates"], 2, max(threads // 2, 1)),
    ]
    print(f"CPU: {cpu_name()}, {threads} torch threads; {args.database} database images, {args.queries} "
          f"queries, --resize {height} {width}, top {args.num_reranked_preds} re-ranked", flush=True)  # fmt: skip
    header = (
        f"{'run':18s} {'procs':>5s} {'peak RSS':>9s} {'local feats':>11s} {'records':>8s} {'descr. s':>8s} "
        f"{'search s':>8s} {'local s':>8s} {'rerank s':>8s} {'pairs/s':>8s} {'wall s':>7s}  same as 'all'"
    )
    print(header, flush=True)
    first = None
    for name, flags, processes, run_threads in runs:
        run = run_eval(world, workdir, name, common + flags, processes, run_threads)
        stats, seconds = run["stats"], run["stats"]["seconds"]
        first = first or run
        same = run["predictions"] == first["predictions"]
        print(
            f"{name:18s} {processes:5d} {run['peak_rss_mb']:7.0f}MB {stats['local_feature_file_bytes'] / 2**20:9.1f}MB "
            f"{stats['local_feature_records']:8d} {seconds['descriptors']:8.1f} {seconds['search']:8.2f} "
            f"{seconds['local_features']:8.1f} {seconds['reranking']:8.1f} {stats['reranking_pairs_per_second']:8.0f} "
            f"{run['wall_seconds']:7.0f}  {'yes' if same else 'NO'} (R@1 {run['recalls']['R@1']:.1f})",
            flush=True,
        )
    if temporary:
        temporary.cleanup()


if __name__ == "__main__":
    main()

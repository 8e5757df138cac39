"""`make demo`: a small DHE-VPR trained and evaluated from scratch on a synthetic world of repeated facades.

    python demo.py [--device cpu] [--num_workers 2] [--seed 0]

Four stages, each by the project's own script: `synthetic.py` writes the world (once: a later run reuses it),
`train_dhe.py` initialises the DHE head on the frozen (randomly initialised) backbone, `finetune.py` trains backbone
and head together, `eval.py` tests the finetuned checkpoints on the test split. Then a table of the test recalls
before and after re-ranking, read from the runs' `results.json`, with the time of each stage.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import eval as evaluation
import finetune
import train_dhe
from tools import outputs
from tools.synthetic import cli as synthetic_cli
from tools.synthetic import world as synthetic_world

DATASET_NAME = "synthetic_demo"
# Every street a sequence of the same dozen facades: a pooled global descriptor can hardly tell places apart, a
# homography between the local features can. 192 x 192 images (the pictures stay legible), models at 192 x 192 too:
# a 12 x 12 grid of local features for the matches and the inlier count (at 128 x 128, 8 x 8, re-ranking gained less).
WORLD_FLAGS = "--image_size 192 192 --shared_fraction 1.0 --shared_buildings 12".split()
MODEL_FLAGS = "--resize 192 192 --trunc_te 2 --freeze_te 0 --num_reranked_preds 20".split()
DHE_EPOCHS, FINETUNE_EPOCHS = 6, 1
TRAIN_DHE_FLAGS = f"--qp_mode gt --n_epochs {DHE_EPOCHS} --iterations_per_epoch 50 --batch_size 8 --lr 0.003".split()
FINETUNE_FLAGS = f"--epochs_num {FINETUNE_EPOCHS} --queries_per_epoch 100 --cache_refresh_rate 100".split()
FINETUNE_FLAGS += "--train_batch_size 4 --lr 0.0001 --rerank_val_from_epoch 0 --neg_samples_num 200".split()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--datasets_folder",
        default="datasets_vg/datasets",
        help=f"Folder of the world {DATASET_NAME}/ (made there when missing, else reused) (default: %(default)s).",
    )
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="Where to run.")
    parser.add_argument(
        "--num_workers", type=int, default=0, help="Data loader workers of each script, 0 to 64 (default: 0)."
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of every stage; the same seed, the same numbers.")
    parser.add_argument(
        "--exp_name",
        default="demo",
        help="Runs go to logs/<exp_name>_{train_dhe,finetune,eval}/<date_time>/ (default: %(default)s).",
    )
    return parser


def parse_arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 <= args.num_workers <= 64:
        parser.error(f"--num_workers must be between 0 and 64, got {args.num_workers}")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    if not args.exp_name or "/" in args.exp_name:
        parser.error(f"--exp_name must be a plain folder name, got {args.exp_name!r}")
    return args


def ensure_world(datasets_folder: Path, seed: int) -> bool:
    """Write the demo world into `datasets_folder / DATASET_NAME` unless it is there; True when it was reused.

    Only a world that synthetic.py wrote with the demo's settings (`WORLD_FLAGS`, any seed: the world stays while
    --seed changes the training) is reused; any other non-empty folder of that name stops the demo (SystemExit)
    with what is there, rather than training on it.
    """
    world = datasets_folder / DATASET_NAME
    flags = ["--out", str(datasets_folder), "--name", DATASET_NAME, "--seed", str(seed), *WORLD_FLAGS]
    if world.is_dir() and any(world.iterdir()):
        marker = outputs.read_marker(world)
        if marker is None or marker["tool"] != synthetic_world.TOOL:
            raise SystemExit(
                f"demo.py: {world} is not a world that synthetic.py wrote (it has no {outputs.MARKER} of "
                f"synthetic.py; worlds written before that marker existed have none); if it holds nothing you need, "
                f"delete it by hand (rm -r {world}), or pass another --datasets_folder"
            )
        settings = dict(marker.get("settings") or {})
        world_seed = settings.pop("seed", None)
        expected = synthetic_cli.settings_of_flags(flags)
        expected.pop("seed")
        if settings != expected:
            raise SystemExit(
                f"demo.py: {world} was generated with other settings ({settings}) than this demo's "
                f"({' '.join(WORLD_FLAGS)}); delete it by hand (rm -r {world}) to generate it again, or pass another "
                "--datasets_folder"
            )
        print(f"Reusing the synthetic world in {world}, of seed {world_seed} (delete that folder to generate it again)")
        return True
    synthetic_cli.main(flags)
    return False


def read_results(path: Path) -> dict:
    """A run's results.json: {"baseline": {"R@1": ..}, "reranked": {"R@1": ..} or null, ...}."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise SystemExit(f"demo.py: cannot read the results file {path}: {error}") from None


def recall_table(rows: Sequence[tuple[str, dict]]) -> str:
    """Lines of a Recall@N table: one line for each (label, results.json content) and stage (baseline, re-ranked).

    The columns are the recall keys of the first results ("R@1", "R@5", ...); a stage that is null is skipped.
    """
    keys = list(rows[0][1]["baseline"])
    width = max(len(label) for label, _ in rows) + len("  re-ranked")
    lines = [f"{'':<{width}}" + "".join(f"{key:>8}" for key in keys)]
    for label, results in rows:
        for stage, name in (("baseline", "baseline"), ("reranked", "re-ranked")):
            if results.get(stage) is None:
                continue
            values = "".join(f"{results[stage][key]:8.1f}" for key in keys)
            lines.append(f"{label + '  ' + name:<{width}}{values}")
    return "\n".join(lines)


def run_stage(title: str, script: str, cli: Callable[[list[str]], dict], argv: list[str]) -> tuple[dict, float]:
    """Print the stage's title and its equivalent command line, run `cli(argv)`; returns its result and seconds."""
    print(f"\n== {title}\n   python {script} {shlex.join(argv)}", flush=True)
    start = time.perf_counter()
    result = cli(argv)
    return result, time.perf_counter() - start


def main(args: argparse.Namespace) -> dict:
    """Run the four stages; print and return {"times": {stage: s}, "train_dhe", "finetune", "eval": results}."""
    datasets_folder = Path(args.datasets_folder)
    common = ["--datasets_folder", str(datasets_folder), "--dataset_name", DATASET_NAME, *MODEL_FLAGS]
    common += ["--device", args.device, "--num_workers", str(args.num_workers), "--seed", str(args.seed)]
    times = {}

    start = time.perf_counter()
    reused = ensure_world(datasets_folder, args.seed)
    times["world (reused)" if reused else "world"] = time.perf_counter() - start

    dhe, times["train_dhe"] = run_stage(
        "1/3 DHE initialisation on the frozen backbone",
        "train_dhe.py",
        train_dhe.cli,
        [*common, *TRAIN_DHE_FLAGS, "--exp_name", f"{args.exp_name}_train_dhe"],
    )
    head = dhe["output_folder"] / f"homography_regression_{DHE_EPOCHS - 1:03d}.torch"

    joint, times["finetune"] = run_stage(
        "2/3 backbone and head trained together",
        "finetune.py",
        finetune.cli,
        [*common, *FINETUNE_FLAGS, "--resume_hr", str(head), "--exp_name", f"{args.exp_name}_finetune"],
    )
    last_epoch = FINETUNE_EPOCHS - 1
    folder = joint["output_folder"]
    checkpoints = ["--resume_fe", str(folder / f"features_extractor_{last_epoch:03d}.torch")]
    checkpoints += ["--resume_hr", str(folder / f"homography_regression_{last_epoch:03d}.torch")]

    test, times["eval"] = run_stage(
        "3/3 the finetuned model on the test split",
        "eval.py",
        evaluation.cli,
        [*common, *checkpoints, "--exp_name", f"{args.exp_name}_eval", "--save_predictions"],
    )

    results = {
        "train_dhe": read_results(dhe["output_folder"] / "results.json"),
        "finetune": read_results(folder / "results.json"),
        "eval": read_results(test["output_folder"] / "results.json"),
    }
    queries = len(list((datasets_folder / DATASET_NAME / "images" / "test" / "queries").glob("*.jpg")))
    print(f"\nRecall@N (%) on the test split of {DATASET_NAME} ({queries} queries):")
    print(recall_table([("DHE initialised", results["train_dhe"]), ("finetuned", results["eval"])]))
    print("Time: " + ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in times.items()))
    print(f"Total: {sum(times.values()) / 60:.1f} min. Runs: {dhe['output_folder']}, {folder}, {test['output_folder']}")
    return {"times": times, **results}


if __name__ == "__main__":
    main(parse_arguments(sys.argv[1:]))

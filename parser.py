"""Command-line flags of `eval.py`, `finetune.py` and `train_dhe.py`.

The flags and their defaults are those of the original DHE-VPR scripts; `--device`, `--amp`, `--pretrained_cct`,
`--qp_mode`, `--save_predictions`, `--resume_train`, `--rei_weight`, `--rei_inliers` and `--rerank_val_from_epoch` are
new, and `--patience` is opt-in (the original never stopped early). Every value is checked after parsing, and a bad
one stops the script with a message that names the flag and what was expected.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence

from commons import check_exp_name
from model.features_extractor import PATCH_SIZE
from model.precision import COMPILE_MODES

SEED_RANGE = (0, 2**32 - 1)  # what numpy's seeding accepts
MAX_COUNT = 2**31 - 1  # counts, sizes and distances: anything larger is a typo, and overflows faiss or sklearn
TEST_METHODS = ("hard_resize", "single_query", "central_crop", "five_crops", "nearest_crop", "maj_voting")
MINING_METHODS = ("partial", "full", "random", "msls_weighted")
MAX_PREDS_TO_SAVE = 50  # predictions per row of a picture (--num_preds_to_save); beyond that it is unreadable


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--resize",
        type=int,
        default=[384, 384],
        nargs=2,
        metavar=("H", "W"),
        help="Images are resized to H x W; each side must be a multiple of 16. The local feature grid is "
        "(H/16) x (W/16) and the DHE head is sized for it.",
    )
    group.add_argument(
        "--trunc_te",
        type=int,
        default=8,
        choices=range(0, 14),
        metavar="{0..13}",
        help="Number of CCT transformer blocks kept.",
    )
    group.add_argument(
        "--freeze_te",
        type=int,
        default=5,
        choices=range(-1, 14),
        metavar="{-1..13}",
        help="CCT blocks with index <= this stay frozen (-1: train every block).",
    )
    group.add_argument(
        "--pretrained_cct",
        type=str,
        default=None,
        help="Optional local file with ImageNet CCT-14/7x2 weights, used when no --resume_fe is given. Nothing is "
        "ever downloaded.",
    )
    group.add_argument("--resume_fe", type=str, default=None, help="Checkpoint of the features extractor to load.")
    group.add_argument("--resume_hr", type=str, default=None, help="Checkpoint of the DHE (homography) head to load.")


def _add_common_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("run")
    group.add_argument("--seed", type=int, default=0, help="Seed of every random generator, 0 to 2**32 - 1.")
    group.add_argument(
        "--exp_name",
        type=str,
        default="default",
        help="Run folder name: outputs go to logs/<exp_name>/<YYYY-MM-DD_HH-MM-SS>/.",
    )
    group.add_argument(
        "--device",
        type=str,
        default="auto",
        choices=["auto", "cuda", "cpu"],
        help="Where to run; auto means cuda when available, else cpu.",
    )
    group.add_argument(
        "--amp",
        action="store_true",
        help="Run the DHE head in mixed precision when re-ranking: bf16 on CPU, bf16 (fp16 where unsupported) on "
        "CUDA. Descriptors, correlation, DLT and matching stay fp32.",
    )
    group.add_argument("--num_workers", type=int, default=8, help="Worker processes of every data loader.")
    group.add_argument(
        "--datasets_folder",
        type=str,
        default=None,
        help="Folder that holds the datasets (default: $DATASETS_FOLDER).",
    )
    group.add_argument(
        "--dataset_name",
        type=str,
        default="pitts30k",
        help="Dataset folder inside --datasets_folder, laid out as <name>/images/<split>/{database,queries}.",
    )
    group.add_argument(
        "--num_reranked_preds",
        type=int,
        default=32,
        help="How many of the top global-descriptor predictions the DHE head re-ranks.",
    )
    group.add_argument(
        "--infer_batch_size",
        type=int,
        default=32,
        help="Batch size for descriptor extraction (the re-ranking has --rerank_batch_size).",
    )


def _add_test_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("test")
    group.add_argument(
        "--recall_values",
        type=int,
        default=[1, 5, 10, 20],
        nargs="+",
        help="Recall@N values to report.",
    )
    group.add_argument(
        "--val_positive_dist_threshold",
        type=int,
        default=25,
        help="A database image within this many metres of a query is a positive for evaluation.",
    )
    group.add_argument(
        "--test_method",
        type=str,
        default="hard_resize",
        choices=TEST_METHODS,
        help="How queries are processed for the global retrieval stage (re-ranking always uses the "
        "hard-resized query).",
    )
    group.add_argument(
        "--majority_weight",
        type=float,
        default=0.01,
        help="Only for --test_method maj_voting: the higher, the more the agreement of crops counts.",
    )
    group.add_argument(
        "--efficient_ram_testing",
        action="store_true",
        help="Kept for compatibility with the original; memory is always bounded here, so it changes nothing.",
    )
    group.add_argument(
        "--rerank_batch_size",
        type=int,
        default=None,
        help="Query-candidate pairs per pass of the DHE head when re-ranking; the pairs of consecutive queries fill "
        "each pass. Default: 16 on CPU; on CUDA 512 with >= 24 GiB of GPU memory, 128 with >= 8 GiB, else 32.",
    )
    group.add_argument(
        "--compile_head",
        type=str,
        default="none",
        choices=COMPILE_MODES,
        help="Compile the DHE head with torch.compile in this mode before re-ranking (reduce-overhead adds CUDA "
        "graphs; meant for GPUs). The compiled head is checked against the eager one on one pass; if compiling fails "
        "or disagrees, a warning says so and the head runs eagerly.",
    )
    group.add_argument(
        "--local_features_in_memory_mb",
        type=int,
        default=-1,
        help="Keep up to this many MB of the fp16 local features (database first) in memory instead of the run "
        "folder's local_features.f16 file: GPU memory on CUDA, host RAM on CPU; the rest goes to the file. -1: "
        "automatic, half of the free GPU memory on CUDA, 0 on CPU (the page cache keeps the file in RAM).",
    )
    group.add_argument(
        "--save_predictions",
        action="store_true",
        help="Write every query's top predictions before and after re-ranking, with scores, to the run folder.",
    )
    group.add_argument(
        "--local_features_dir",
        type=str,
        default=None,
        help="Existing folder for the temporary file of local features (fp16, 2 * 384 * (H/16) * (W/16) bytes an "
        "image; deleted at the end). Default: the run folder. Its free space is checked before extracting.",
    )


def _add_eval_output_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("evaluation outputs")
    group.add_argument(
        "--num_preds_to_save",
        type=int,
        default=0,
        metavar="N",
        help="Save a picture per query into preds/ in the run folder: the query, its top N predictions before and "
        "after re-ranking (framed green if correct, red if wrong, grey without labels; distance in metres, inlier "
        "score), and the matches and DHE homography of the top candidate after re-ranking. 0: none; at most "
        f"{MAX_PREDS_TO_SAVE}.",
    )
    group.add_argument(
        "--save_only_wrong_preds",
        action="store_true",
        help="With --num_preds_to_save: only the queries whose top prediction after re-ranking is wrong.",
    )
    group.add_argument(
        "--no_labels",
        action="store_true",
        help="The images' file names carry no position (any name is accepted): no recalls are computed, and the "
        "predictions are saved to predictions.csv (and pictures with --num_preds_to_save).",
    )


def _add_augmentation_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training-query augmentation")
    group.add_argument("--brightness", type=float, default=None, help="ColorJitter brightness for training queries.")
    group.add_argument("--contrast", type=float, default=None, help="ColorJitter contrast for training queries.")
    group.add_argument("--saturation", type=float, default=None, help="ColorJitter saturation for training queries.")
    group.add_argument("--hue", type=float, default=None, help="ColorJitter hue for training queries.")
    group.add_argument(
        "--rand_perspective", type=float, default=None, help="RandomPerspective distortion scale for training queries."
    )
    group.add_argument("--horizontal_flip", action="store_true", help="Random horizontal flip of training queries.")
    group.add_argument(
        "--random_resized_crop",
        type=float,
        default=None,
        help="RandomResizedCrop of training queries with scale (1 - this value, 1), as the original.",
    )
    group.add_argument(
        "--random_rotation", type=float, default=None, help="RandomRotation of training queries, in degrees."
    )


def _add_finetune_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("fine-tuning")
    group.add_argument(
        "--train_batch_size",
        type=int,
        default=4,
        help="Triplets (query, positive, negatives) per batch; each has 2 + negs_num_per_query images.",
    )
    group.add_argument(
        "--criterion", type=str, default="triplet", choices=["triplet", "sare_ind", "sare_joint"], help="Metric loss."
    )
    group.add_argument("--margin", type=float, default=0.1, help="Margin of the triplet loss.")
    group.add_argument("--epochs_num", type=int, default=1000, help="Maximum number of epochs.")
    group.add_argument(
        "--patience",
        type=int,
        default=None,
        help="Stop after this many epochs without a better validation R@5. Default: never stop early (all "
        "--epochs_num epochs run), as the original, whose --patience 3 was never used.",
    )
    group.add_argument(
        "--rei_weight",
        type=float,
        default=100.0,
        help="Weight of the DHE head's REI loss (pixels) in loss = triplet + rei_weight * REI, as the original's 100.",
    )
    group.add_argument(
        "--rerank_val_from_epoch",
        type=int,
        default=None,
        help="Validation re-ranks with the DHE head from this epoch on (0-based); before it, only the baseline recalls "
        "are computed. Default as the original: 0 for msls*, 35 for pitts30k, 0 for other datasets.",
    )
    group.add_argument("--lr", type=float, default=0.00001, help="Learning rate.")
    group.add_argument("--optim", type=str, default="adam", choices=["adam", "sgd"], help="Optimizer.")
    group.add_argument(
        "--cache_refresh_rate",
        type=int,
        default=1000,
        help="How often (in queries) the mining cache is recomputed.",
    )
    group.add_argument(
        "--queries_per_epoch",
        type=int,
        default=5000,
        help="Queries in one epoch; must be a multiple of --cache_refresh_rate.",
    )
    group.add_argument("--negs_num_per_query", type=int, default=2, help="Negatives per query in the loss.")
    group.add_argument(
        "--neg_samples_num", type=int, default=1000, help="Negatives sampled to choose the hardest ones from."
    )
    group.add_argument("--mining", type=str, default="partial", choices=MINING_METHODS, help="Negative mining.")
    group.add_argument(
        "--l2",
        type=str,
        default="before_pool",
        choices=["before_pool", "after_pool", "none"],
        help="Kept from the original's parser: DHE-VPR's features extractor L2-normalises before GeM, and other "
        "values are refused.",
    )
    group.add_argument(
        "--train_positives_dist_threshold",
        type=int,
        default=10,
        help="Training positives are within this many metres of the query.",
    )
    group.add_argument(
        "--save_dir",
        type=str,
        dest="exp_name",
        default=argparse.SUPPRESS,
        help="The original's name for --exp_name (the same flag): outputs go to logs/<save_dir>/<date_time>/.",
    )


def _add_train_dhe_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("DHE initialisation")
    group.add_argument("--lr", type=float, default=0.0001, help="Learning rate of the DHE head.")
    group.add_argument("--optim", type=str, default="adam", choices=["adam", "sgd"], help="Optimizer.")
    group.add_argument("--n_epochs", type=int, default=100, help="Epochs.")
    group.add_argument("--iterations_per_epoch", type=int, default=2000, help="Iterations in one epoch.")
    group.add_argument(
        "--qp_threshold",
        type=float,
        default=0.14,
        help="With --qp_mode predicted: max descriptor distance of a query-positive pair.",
    )
    group.add_argument(
        "--qp_mode",
        type=str,
        default=None,
        choices=["gt", "predicted"],
        help="Query-positive pairs: every ground-truth pair (gt), or predicted positives closer than --qp_threshold "
        "(predicted). Default: gt for datasets named msls*, predicted otherwise, as the original.",
    )
    group.add_argument(
        "--batch_size",
        type=int,
        default=16,
        help="Query-positive pairs per iteration (over all processes under torchrun; a multiple of their number).",
    )
    group.add_argument(
        "--positive_dist_threshold",
        type=int,
        dest="val_positive_dist_threshold",
        default=argparse.SUPPRESS,
        help="The original's name for --val_positive_dist_threshold (the same flag): query-positive pairs and test "
        "positives are within this many metres.",
    )


def build_parser(script: str) -> argparse.ArgumentParser:
    """The parser of one script: "eval", "finetune" or "train_dhe"."""
    if script not in ("eval", "finetune", "train_dhe"):
        raise ValueError(f"unknown script {script!r}; expected 'eval', 'finetune' or 'train_dhe'")
    parser = argparse.ArgumentParser(
        prog=f"{script}.py",
        description="DHE-VPR: deep homography estimation for visual place recognition.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_model_flags(parser)
    _add_common_flags(parser)
    _add_test_flags(parser)
    if script == "eval":
        _add_eval_output_flags(parser)
    else:  # the training scripts' validation and test runs (eval.test) write no pictures and need labels
        parser.set_defaults(num_preds_to_save=0, save_only_wrong_preds=False, no_labels=False)
    if script in ("finetune", "eval"):
        _add_augmentation_flags(parser)
    if script == "finetune":
        _add_finetune_flags(parser)
    if script == "train_dhe":
        _add_train_dhe_flags(parser)
    if script in ("finetune", "train_dhe"):
        parser.add_argument_group("REI loss").add_argument(
            "--rei_inliers",
            type=str,
            default="minimal",
            choices=["minimal", "refined"],
            help="How the REI loss counts RANSAC's inliers k: those of the best minimal (4-point) model, as the "
            "original's OpenCV 3.4.13 (minimal, default), or those recounted under the refitted model, as OpenCV "
            "4.11 and later (refined). See docs/ransac.md.",
        )
        group = parser.add_argument_group("resuming")
        group.add_argument(
            "--resume_train",
            type=str,
            default=None,
            help="A last_checkpoint.pth of an interrupted or finished run of this script: continue it exactly "
            "(models, optimizer, scheduler, AMP scaler, epoch, random generators) in a new run folder, up to the "
            "epochs asked for now.",
        )
        amp = next(action for action in parser._actions if action.dest == "amp")
        amp.help = (
            "Train under autocast (bf16 on CPU and on GPUs that have it, else fp16 with a gradient scaler); the "
            "matching and RANSAC of the REI loss stay fp32. Validation and test re-rank with the head in bf16/fp16."
        )
    return parser


# (flag, low, high, low inclusive, high inclusive): ranges of the float flags, where the flag exists and is set
_FLOAT_RANGES = (
    ("lr", 0.0, math.inf, False, False),
    ("margin", 0.0, math.inf, True, False),
    ("qp_threshold", 0.0, math.inf, False, False),
    ("majority_weight", 0.0, math.inf, True, False),
    # ColorJitter draws its factor in float32: 1 + value must stay below float32's largest number (3.4e38)
    ("brightness", 0.0, 1e38, True, True),
    ("contrast", 0.0, 1e38, True, True),
    ("saturation", 0.0, 1e38, True, True),
    ("hue", 0.0, 0.5, True, True),
    ("rand_perspective", 0.0, 1.0, True, True),
    ("random_resized_crop", 0.0, 1.0, True, False),
    ("random_rotation", 0.0, 180.0, True, True),
)


def _check_numbers(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Every float flag finite, every int flag within int32 (seed: numpy's 0 .. 2**32 - 1), then per-flag ranges."""
    for name, value in sorted(vars(args).items()):
        values = value if isinstance(value, (list, tuple)) else [value]
        for item in values:
            if isinstance(item, float) and not math.isfinite(item):
                parser.error(f"--{name} {item}: must be a finite number")
            if isinstance(item, int) and not isinstance(item, bool) and name != "seed" and abs(item) > MAX_COUNT:
                parser.error(f"--{name} {item}: must be at most {MAX_COUNT} in absolute value")
    if not SEED_RANGE[0] <= args.seed <= SEED_RANGE[1]:
        parser.error(f"--seed {args.seed}: must be between {SEED_RANGE[0]} and {SEED_RANGE[1]} (numpy's seed range)")
    for name, low, high, low_inclusive, high_inclusive in _FLOAT_RANGES:
        value = getattr(args, name, None)
        if value is None:
            continue
        above = value >= low if low_inclusive else value > low
        below = value <= high if high_inclusive else value < high
        if not (above and below):
            interval = f"{'[' if low_inclusive else '('}{low:g}, {high:g}{']' if high_inclusive else ')'}"
            parser.error(f"--{name} {value}: must be in {interval}")


def check_arguments(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Validate parsed values; `parser.error` (exit 2) names the flag and what was expected."""
    _check_numbers(args, parser)
    height, width = args.resize
    if height <= 0 or width <= 0 or height % PATCH_SIZE or width % PATCH_SIZE:
        parser.error(f"--resize {height} {width}: each side must be a positive multiple of {PATCH_SIZE}")
    positive_ints = ["num_reranked_preds", "infer_batch_size", "val_positive_dist_threshold"]
    positive_ints += [
        name
        for name in (
            "train_batch_size",
            "epochs_num",
            "cache_refresh_rate",
            "queries_per_epoch",
            "negs_num_per_query",
            "neg_samples_num",
            "n_epochs",
            "iterations_per_epoch",
            "batch_size",
            "train_positives_dist_threshold",
        )
        if hasattr(args, name)
    ]
    for name in positive_ints:
        if getattr(args, name) <= 0:
            parser.error(f"--{name} {getattr(args, name)}: must be a positive integer")
    if hasattr(args, "num_preds_to_save"):
        if not 0 <= args.num_preds_to_save <= MAX_PREDS_TO_SAVE:
            parser.error(f"--num_preds_to_save {args.num_preds_to_save}: must be between 0 and {MAX_PREDS_TO_SAVE}")
        if args.save_only_wrong_preds and args.num_preds_to_save == 0:
            parser.error("--save_only_wrong_preds needs --num_preds_to_save N with N > 0")
        if args.save_only_wrong_preds and args.no_labels:
            parser.error("--save_only_wrong_preds needs labels: it cannot be used with --no_labels")
    if getattr(args, "rerank_batch_size", None) is not None and args.rerank_batch_size <= 0:
        parser.error(f"--rerank_batch_size {args.rerank_batch_size}: must be a positive integer")
    if getattr(args, "local_features_in_memory_mb", -1) < -1:
        parser.error(
            f"--local_features_in_memory_mb {args.local_features_in_memory_mb}: must be >= 0 (MB), or -1 (automatic)"
        )
    if args.num_workers < 0:
        parser.error(f"--num_workers {args.num_workers}: must be >= 0")
    if any(n <= 0 for n in args.recall_values):
        parser.error(f"--recall_values {args.recall_values}: every value must be a positive integer")
    local_features_dir = getattr(args, "local_features_dir", None)
    if local_features_dir is not None and not os.path.isdir(local_features_dir):
        parser.error(f"--local_features_dir {local_features_dir}: not an existing folder")
    if local_features_dir is not None and not os.access(local_features_dir, os.W_OK | os.X_OK):
        parser.error(f"--local_features_dir {local_features_dir}: not writable (the local features go there)")
    try:
        check_exp_name(args.exp_name)
    except ValueError as error:
        parser.error(str(error))
    if hasattr(args, "queries_per_epoch") and args.queries_per_epoch % args.cache_refresh_rate != 0:
        parser.error(
            f"--queries_per_epoch {args.queries_per_epoch} must be a multiple of "
            f"--cache_refresh_rate {args.cache_refresh_rate}"
        )
    if getattr(args, "l2", "before_pool") != "before_pool":
        parser.error(f"--l2 {args.l2}: only before_pool exists in DHE-VPR's features extractor (L2 -> GeM)")
    if args.datasets_folder is None:
        args.datasets_folder = os.environ.get("DATASETS_FOLDER")
        if args.datasets_folder is None:
            parser.error(
                "no datasets folder: pass --datasets_folder or export DATASETS_FOLDER "
                "(e.g. export DATASETS_FOLDER=datasets_vg/datasets)"
            )
    if getattr(args, "patience", None) is not None and args.patience <= 0:
        parser.error(f"--patience {args.patience}: must be a positive integer (leave it out to never stop early)")
    if getattr(args, "rei_weight", 0.0) < 0:
        parser.error(f"--rei_weight {args.rei_weight}: must be >= 0")
    if hasattr(args, "rerank_val_from_epoch"):
        if args.rerank_val_from_epoch is None:
            args.rerank_val_from_epoch = 35 if args.dataset_name.lower() == "pitts30k" else 0
        elif args.rerank_val_from_epoch < 0:
            parser.error(f"--rerank_val_from_epoch {args.rerank_val_from_epoch}: must be >= 0")
    if hasattr(args, "qp_mode") and args.qp_mode is None:
        args.qp_mode = "gt" if args.dataset_name.lower().startswith("msls") else "predicted"
    args.resize = (height, width)
    return args


def given_flags(script: str, argv: Sequence[str] | None = None) -> set[str]:
    """The flags (their `dest`s) given explicitly in `argv`, whatever their values: defaults are left out."""
    parser = build_parser(script)
    parser._defaults.clear()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_known_args(argv)[0]))


def parse_arguments(script: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check the flags of `script` ("eval", "finetune" or "train_dhe")."""
    parser = build_parser(script)
    return check_arguments(parser.parse_args(argv), parser)

"""Command-line flags of `eval.py`, `finetune.py` and `train_dhe.py`, and their conversion to the libraries' values.

The flags and their defaults are those of the original DHE-VPR scripts; `--device`, `--amp`, `--pretrained_cct`,
`--qp_mode`, `--save_predictions`, `--resume_train`, `--rei_weight`, `--rei_inliers` and `--rerank_val_from_epoch` are
new, and `--patience` is opt-in (the original never stopped early). The flags come in groups (`FlagGroup`), each with
the check of its values beside it; every value is checked after parsing, and a bad one stops the script with a
message that names the flag and what was expected. `model_config`, `eval_settings`, `mining_settings`,
`query_augmentation`, `inference_settings` and `dataset_options` turn the parsed flags into the plain values the
libraries take; `run_options`, `dhe_init_settings` and `finetune_settings` into those of the training library.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Callable, Sequence

import torch

from commons import ModelConfig, check_exp_name
from datasets_ws import InferenceSettings, MiningSettings, QueryAugmentation
from evaluation.index import IndexSettings
from evaluation.pipeline import EvalSettings
from model.features_extractor import PATCH_SIZE
from model.precision import COMPILE_MODES
from training.dhe_init import LOG_PERIOD, SAVE_PERIOD, DHEInitSettings
from training.finetuning import FinetuneSettings
from training.loop import RunOptions
from training.task import TrainSettings

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


def _check_model_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    height, width = args.resize
    if height <= 0 or width <= 0 or height % PATCH_SIZE or width % PATCH_SIZE:
        parser.error(f"--resize {height} {width}: each side must be a positive multiple of {PATCH_SIZE}")
    args.resize = (height, width)


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
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


def _check_run_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    _check_positive(args, parser, ("num_reranked_preds", "infer_batch_size"))
    if args.num_workers < 0:
        parser.error(f"--num_workers {args.num_workers}: must be >= 0")
    try:
        check_exp_name(args.exp_name)
    except ValueError as error:
        parser.error(str(error))
    if args.datasets_folder is None:
        args.datasets_folder = os.environ.get("DATASETS_FOLDER")
        if args.datasets_folder is None:
            parser.error(
                "no datasets folder: pass --datasets_folder or export DATASETS_FOLDER "
                "(e.g. export DATASETS_FOLDER=datasets_vg/datasets)"
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
        "--local_features",
        type=str,
        default="auto",
        choices=("auto", "all", "candidates"),
        help="Which images' local features are extracted for re-ranking: all (in the database and query pass), "
        "candidates (a second pass over the queries and their top --num_reranked_preds candidates only; the same "
        "results), auto: candidates when the database holds more images than queries x --num_reranked_preds, under "
        "torchrun, or with --database_descriptors; else all.",
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


def _check_test_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    _check_positive(args, parser, ("val_positive_dist_threshold",))
    _check_ranges(args, parser, (("majority_weight", 0.0, math.inf, True, False),))
    if args.rerank_batch_size is not None and args.rerank_batch_size <= 0:
        parser.error(f"--rerank_batch_size {args.rerank_batch_size}: must be a positive integer")
    if args.local_features_in_memory_mb < -1:
        parser.error(
            f"--local_features_in_memory_mb {args.local_features_in_memory_mb}: must be >= 0 (MB), or -1 (automatic)"
        )
    if any(n <= 0 for n in args.recall_values):
        parser.error(f"--recall_values {args.recall_values}: every value must be a positive integer")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's
    if args.local_features == "all" and world_size > 1:
        parser.error(
            f"--local_features all keeps every image's local features in one process, but torchrun started "
            f"{world_size}: use --local_features candidates (or auto)"
        )
    local_features_dir = args.local_features_dir
    if local_features_dir is not None and not os.path.isdir(local_features_dir):
        parser.error(f"--local_features_dir {local_features_dir}: not an existing folder")
    if local_features_dir is not None and not os.access(local_features_dir, os.W_OK | os.X_OK):
        parser.error(f"--local_features_dir {local_features_dir}: not writable (the local features go there)")


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


def _add_database_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("large databases")
    group.add_argument(
        "--faiss_index",
        type=str,
        default="Flat",
        metavar="FACTORY",
        help="The faiss index of the global search, as a faiss index_factory string: Flat (exact, the original's), "
        "or approximate ones for large databases, e.g. IVF4096,Flat, HNSW32, IVF65536_HNSW32,PQ48.",
    )
    group.add_argument(
        "--faiss_train_size",
        type=int,
        default=262144,
        help="Database descriptors (a seeded sample) an index that needs training is trained on.",
    )
    group.add_argument(
        "--faiss_nprobe",
        type=int,
        default=None,
        help="IVF indexes: lists searched per query (more: slower and closer to exact). Default: faiss's (1).",
    )
    group.add_argument(
        "--faiss_ef_search",
        type=int,
        default=None,
        help="HNSW indexes: the search's queue length (more: slower and closer to exact). Default: faiss's (16).",
    )
    group.add_argument(
        "--save_database_descriptors",
        action="store_true",
        help="Save the database's global descriptors to the run folder (database_descriptors.npy and .json), for "
        "--database_descriptors.",
    )
    group.add_argument(
        "--database_descriptors",
        type=str,
        default=None,
        metavar="PATH",
        help="Use the database descriptors saved by --save_database_descriptors (the .npy, or its run folder) "
        "instead of extracting them; refused when made from other images, another --resize or another checkpoint.",
    )


def _check_database_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    _check_positive(args, parser, ("faiss_train_size",))
    for name in ("faiss_nprobe", "faiss_ef_search"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name} {value}: must be a positive integer")
    if args.save_database_descriptors and args.database_descriptors is not None:
        parser.error("--save_database_descriptors with --database_descriptors: the descriptors are already saved")


def _check_eval_output_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if not 0 <= args.num_preds_to_save <= MAX_PREDS_TO_SAVE:
        parser.error(f"--num_preds_to_save {args.num_preds_to_save}: must be between 0 and {MAX_PREDS_TO_SAVE}")
    if args.save_only_wrong_preds and args.num_preds_to_save == 0:
        parser.error("--save_only_wrong_preds needs --num_preds_to_save N with N > 0")
    if args.save_only_wrong_preds and args.no_labels:
        parser.error("--save_only_wrong_preds needs labels: it cannot be used with --no_labels")


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


def _check_augmentation_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    # ColorJitter draws its factor in float32: 1 + value must stay below float32's largest number (3.4e38)
    _check_ranges(
        args,
        parser,
        (
            ("brightness", 0.0, 1e38, True, True),
            ("contrast", 0.0, 1e38, True, True),
            ("saturation", 0.0, 1e38, True, True),
            ("hue", 0.0, 0.5, True, True),
            ("rand_perspective", 0.0, 1.0, True, True),
            ("random_resized_crop", 0.0, 1.0, True, False),
            ("random_rotation", 0.0, 180.0, True, True),
        ),
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


def _check_finetune_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    _check_ranges(args, parser, (("lr", 0.0, math.inf, False, False), ("margin", 0.0, math.inf, True, False)))
    positive = ("train_batch_size", "epochs_num", "cache_refresh_rate", "queries_per_epoch", "negs_num_per_query")
    _check_positive(args, parser, (*positive, "neg_samples_num", "train_positives_dist_threshold"))
    if args.queries_per_epoch % args.cache_refresh_rate != 0:
        parser.error(
            f"--queries_per_epoch {args.queries_per_epoch} must be a multiple of "
            f"--cache_refresh_rate {args.cache_refresh_rate}"
        )
    if args.l2 != "before_pool":
        parser.error(f"--l2 {args.l2}: only before_pool exists in DHE-VPR's features extractor (L2 -> GeM)")
    if args.patience is not None and args.patience <= 0:
        parser.error(f"--patience {args.patience}: must be a positive integer (leave it out to never stop early)")
    if args.rei_weight < 0:
        parser.error(f"--rei_weight {args.rei_weight}: must be >= 0")
    if args.rerank_val_from_epoch is None:
        args.rerank_val_from_epoch = 35 if args.dataset_name.lower() == "pitts30k" else 0
    elif args.rerank_val_from_epoch < 0:
        parser.error(f"--rerank_val_from_epoch {args.rerank_val_from_epoch}: must be >= 0")


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


def _check_train_dhe_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    _check_ranges(args, parser, (("lr", 0.0, math.inf, False, False), ("qp_threshold", 0.0, math.inf, False, False)))
    _check_positive(args, parser, ("n_epochs", "iterations_per_epoch", "batch_size"))
    if args.qp_mode is None:
        args.qp_mode = "gt" if args.dataset_name.lower().startswith("msls") else "predicted"


def _add_training_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument_group("REI loss").add_argument(
        "--rei_inliers",
        type=str,
        default="minimal",
        choices=["minimal", "refined"],
        help="How the REI loss counts RANSAC's inliers k: those of the best minimal (4-point) model, as the "
        "original's OpenCV 3.4.13 (minimal, default), or those recounted under the refitted model, as OpenCV "
        "4.11 and later (refined). See docs/ransac.md.",
    )
    parser.add_argument_group("outputs").add_argument(
        "--tensorboard",
        action="store_true",
        help="Also write TensorBoard event files into the run folder: the losses and the learning rate of every "
        "iteration, the validation recalls and one prediction picture per validation (needs the tensorboard "
        "package; open with: tensorboard --logdir logs/).",
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


@dataclasses.dataclass(frozen=True)
class FlagGroup:
    """Flags that belong together: `add` puts them on a parser, `check` validates (and completes) their values
    (None: any value their type and choices allow)."""

    add: Callable[[argparse.ArgumentParser], None]
    check: Callable[[argparse.Namespace, argparse.ArgumentParser], None] | None = None


MODEL = FlagGroup(_add_model_flags, _check_model_flags)
RUN = FlagGroup(_add_run_flags, _check_run_flags)
TEST = FlagGroup(_add_test_flags, _check_test_flags)
EVAL_OUTPUTS = FlagGroup(_add_eval_output_flags, _check_eval_output_flags)
DATABASE = FlagGroup(_add_database_flags, _check_database_flags)
AUGMENTATION = FlagGroup(_add_augmentation_flags, _check_augmentation_flags)
FINETUNE = FlagGroup(_add_finetune_flags, _check_finetune_flags)
TRAIN_DHE = FlagGroup(_add_train_dhe_flags, _check_train_dhe_flags)
TRAINING = FlagGroup(_add_training_flags)

# The groups of each script, in the order of its --help. eval.py keeps the augmentation flags of the original's
# parser (accepted, unused) so that its command lines keep working.
SCRIPT_GROUPS = {
    "eval": (MODEL, RUN, TEST, EVAL_OUTPUTS, DATABASE, AUGMENTATION),
    "finetune": (MODEL, RUN, TEST, AUGMENTATION, FINETUNE, TRAINING),
    "train_dhe": (MODEL, RUN, TEST, TRAIN_DHE, TRAINING),
}


def build_parser(script: str) -> argparse.ArgumentParser:
    """The parser of one script: "eval", "finetune" or "train_dhe"."""
    if script not in SCRIPT_GROUPS:
        raise ValueError(f"unknown script {script!r}; expected 'eval', 'finetune' or 'train_dhe'")
    parser = argparse.ArgumentParser(
        prog=f"{script}.py",
        description="DHE-VPR: deep homography estimation for visual place recognition.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for group in SCRIPT_GROUPS[script]:
        group.add(parser)
    return parser


def _check_positive(args: argparse.Namespace, parser: argparse.ArgumentParser, names: Sequence[str]) -> None:
    for name in names:
        if getattr(args, name) <= 0:
            parser.error(f"--{name} {getattr(args, name)}: must be a positive integer")


def _check_ranges(
    args: argparse.Namespace,
    parser: argparse.ArgumentParser,
    ranges: Sequence[tuple[str, float, float, bool, bool]],
) -> None:
    """`ranges`: (flag, low, high, low inclusive, high inclusive) of float flags, checked when set."""
    for name, low, high, low_inclusive, high_inclusive in ranges:
        value = getattr(args, name)
        if value is None:
            continue
        above = value >= low if low_inclusive else value > low
        below = value <= high if high_inclusive else value < high
        if not (above and below):
            interval = f"{'[' if low_inclusive else '('}{low:g}, {high:g}{']' if high_inclusive else ')'}"
            parser.error(f"--{name} {value}: must be in {interval}")


def _check_numbers(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Every float flag finite, every int flag within int32 (seed: numpy's 0 .. 2**32 - 1)."""
    for name, value in sorted(vars(args).items()):
        values = value if isinstance(value, (list, tuple)) else [value]
        for item in values:
            if isinstance(item, float) and not math.isfinite(item):
                parser.error(f"--{name} {item}: must be a finite number")
            if isinstance(item, int) and not isinstance(item, bool) and name != "seed" and abs(item) > MAX_COUNT:
                parser.error(f"--{name} {item}: must be at most {MAX_COUNT} in absolute value")
    if not SEED_RANGE[0] <= args.seed <= SEED_RANGE[1]:
        parser.error(f"--seed {args.seed}: must be between {SEED_RANGE[0]} and {SEED_RANGE[1]} (numpy's seed range)")


def check_arguments(script: str, args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Validate the parsed values of `script`'s flags, group by group; `parser.error` (exit 2) names the flag and
    what was expected. Fills the defaults that depend on other flags (--datasets_folder from $DATASETS_FOLDER,
    --rerank_val_from_epoch, --qp_mode); --resize becomes a tuple."""
    _check_numbers(args, parser)
    for group in SCRIPT_GROUPS[script]:
        if group.check is not None:
            group.check(args, parser)
    return args


# ------------------------------------------------------------------------------------------- flags -> plain values
def model_config(args: argparse.Namespace, resume_train: str | None = None) -> ModelConfig:
    """The model group's flags; `resume_train`: the training scripts' --resume_train."""
    return ModelConfig(
        resize=tuple(args.resize),
        trunc_te=args.trunc_te,
        freeze_te=args.freeze_te,
        pretrained_cct=args.pretrained_cct,
        resume_fe=args.resume_fe,
        resume_hr=args.resume_hr,
        resume_train=resume_train,
    )


def eval_settings(args: argparse.Namespace, outputs: bool = False) -> EvalSettings:
    """The evaluation's flags (run and test groups); with `outputs` (eval.py) also its pictures and --no_labels,
    which the training scripts' validation and test runs do without, and its large-database flags (faiss index,
    saved descriptors)."""
    settings = EvalSettings(
        recall_values=tuple(args.recall_values),
        test_method=args.test_method,
        majority_weight=args.majority_weight,
        num_reranked_preds=args.num_reranked_preds,
        infer_batch_size=args.infer_batch_size,
        rerank_batch_size=args.rerank_batch_size,
        num_workers=args.num_workers,
        amp=args.amp,
        compile_head=args.compile_head,
        local_features=args.local_features,
        local_features_in_memory_mb=args.local_features_in_memory_mb,
        local_features_dir=args.local_features_dir,
        exp_name=args.exp_name,
        save_predictions=args.save_predictions,
        features_checkpoint=args.resume_fe,
    )
    if not outputs:
        return settings
    return dataclasses.replace(
        settings,
        no_labels=args.no_labels,
        num_preds_to_save=args.num_preds_to_save,
        save_only_wrong_preds=args.save_only_wrong_preds,
        index=IndexSettings(
            factory=args.faiss_index,
            train_size=args.faiss_train_size,
            nprobe=args.faiss_nprobe,
            ef_search=args.faiss_ef_search,
            seed=args.seed,
        ),
        database_descriptors=args.database_descriptors,
        save_database_descriptors=args.save_database_descriptors,
    )


def dataset_options(args: argparse.Namespace) -> dict:
    """Keyword arguments of every `BaseDataset` / `TripletsDataset` of a script: resize, positive_dist_threshold."""
    return {"resize": tuple(args.resize), "positive_dist_threshold": args.val_positive_dist_threshold}


def mining_settings(args: argparse.Namespace) -> MiningSettings:
    """The fine-tuning's mining flags."""
    return MiningSettings(
        mining=args.mining,
        neg_samples_num=args.neg_samples_num,
        negs_num_per_query=args.negs_num_per_query,
        cache_refresh_rate=args.cache_refresh_rate,
        train_positives_dist_threshold=args.train_positives_dist_threshold,
        seed=args.seed,
    )


def query_augmentation(args: argparse.Namespace) -> QueryAugmentation:
    """The training-query augmentation flags."""
    return QueryAugmentation(
        brightness=args.brightness,
        contrast=args.contrast,
        saturation=args.saturation,
        hue=args.hue,
        rand_perspective=args.rand_perspective,
        random_resized_crop=args.random_resized_crop,
        random_rotation=args.random_rotation,
    )


def inference_settings(args: argparse.Namespace, device: torch.device) -> InferenceSettings:
    """How the training scripts compute descriptors for mining and pairs: on `device`, --infer_batch_size a batch,
    --num_workers loader processes."""
    return InferenceSettings(device=device, batch_size=args.infer_batch_size, num_workers=args.num_workers)


def run_options(args: argparse.Namespace) -> RunOptions:
    """How `training.loop.run` sets up a run of a training script."""
    return RunOptions(
        device=args.device,
        seed=args.seed,
        exp_name=args.exp_name,
        amp=args.amp,
        resume_train=args.resume_train,
        tensorboard=args.tensorboard,
    )


def dhe_init_settings(args: argparse.Namespace, device: torch.device) -> DHEInitSettings:
    """`train_dhe.py`'s flags (the run's, after resuming) as the task's settings; `device`: where it trains."""
    train = TrainSettings(
        num_epochs=args.n_epochs,
        iterations_per_epoch=args.iterations_per_epoch,
        log_period=min(LOG_PERIOD, args.iterations_per_epoch),
        lr=args.lr,
        amp=args.amp,
        recall_values=tuple(args.recall_values),
        save_period=SAVE_PERIOD,
    )
    return DHEInitSettings(
        train=train,
        model=model_config(args, args.resume_train),
        evaluation=eval_settings(args),
        inference=inference_settings(args, device),
        datasets_folder=args.datasets_folder,
        dataset_name=args.dataset_name,
        dataset_options=dataset_options(args),
        seed=args.seed,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        qp_mode=args.qp_mode,
        qp_threshold=args.qp_threshold,
        optim=args.optim,
        rei_inliers=args.rei_inliers,
    )


def finetune_settings(args: argparse.Namespace, device: torch.device) -> FinetuneSettings:
    """`finetune.py`'s flags (the run's, after resuming) as the task's settings; `device`: where it trains."""
    batches_per_loop = args.cache_refresh_rate // args.train_batch_size
    train = TrainSettings(
        num_epochs=args.epochs_num,
        iterations_per_epoch=args.queries_per_epoch // args.cache_refresh_rate * batches_per_loop,
        log_period=batches_per_loop,  # the original logged once per loop
        lr=args.lr,
        amp=args.amp,
        recall_values=tuple(args.recall_values),
        patience=args.patience,
    )
    return FinetuneSettings(
        train=train,
        model=model_config(args, args.resume_train),
        evaluation=eval_settings(args),
        inference=inference_settings(args, device),
        mining=mining_settings(args),
        augmentation=query_augmentation(args),
        datasets_folder=args.datasets_folder,
        dataset_name=args.dataset_name,
        dataset_options=dataset_options(args),
        seed=args.seed,
        batch_size=args.train_batch_size,
        num_workers=args.num_workers,
        horizontal_flip=args.horizontal_flip,
        queries_per_epoch=args.queries_per_epoch,
        criterion=args.criterion,
        margin=args.margin,
        rei_weight=args.rei_weight,
        rei_inliers=args.rei_inliers,
        optim=args.optim,
        rerank_val_from_epoch=args.rerank_val_from_epoch,
    )


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
    return check_arguments(script, parser.parse_args(argv), parser)

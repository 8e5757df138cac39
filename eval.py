"""Evaluate DHE-VPR: global retrieval (GeM descriptors + faiss), then DHE re-ranking of the top candidates.

    python eval.py --resume_fe finetunedCCT14_pitts30k.torch --resume_hr finetunedDHE_pitts30k.torch \
        --datasets_folder datasets_vg/datasets --dataset_name pitts30k

Logs Recall@N before ("baseline") and after re-ranking, and the time of each stage, to logs/<exp_name>/<time>/.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Subset

import commons
import parser
import util
import visualize
from datasets_ws import BaseDataset
from model import FeaturesExtractor
from model.precision import compile_head

NUM_CROPS = 5  # five_crops, nearest_crop and maj_voting describe each query by five square crops


def query_descriptors(
    args: argparse.Namespace,
    features_extractor: FeaturesExtractor,
    dataset: BaseDataset,
    store: util.LocalFeatureStore | None,
    device: torch.device,
) -> np.ndarray:
    """Global descriptors of the queries per `--test_method` ((Q, D), or (Q * 5, D) for nearest_crop and
    maj_voting); the hard-resized queries' local features go to `store`, when given, in every case."""
    query_indexes = range(dataset.database_num, dataset.database_num + dataset.queries_num)
    hard_resized = dataset.hard_resized_images(query_indexes)
    batch_size, workers = args.infer_batch_size, args.num_workers
    if args.test_method == "hard_resize":
        return util.extract_features(features_extractor, hard_resized, device, batch_size, workers, store, "queries")
    if store is not None:
        util.extract_features(
            features_extractor, hard_resized, device, batch_size, workers, store, "query local features"
        )
    dataset.test_method = args.test_method
    # single_query keeps each query's aspect ratio, so queries of different sizes cannot share a batch.
    query_batch_size = 1 if args.test_method == "single_query" else batch_size
    descriptors = util.extract_features(
        features_extractor, Subset(dataset, query_indexes), device, query_batch_size, workers, desc="queries"
    )
    if args.test_method == "five_crops":
        descriptors = descriptors.reshape(dataset.queries_num, NUM_CROPS, -1).mean(axis=1)
    return descriptors


def log_recalls(
    prefix: str, predictions: np.ndarray, positives: list[np.ndarray] | None, recall_values: Sequence[int]
) -> np.ndarray | None:
    """Recall@N of `predictions` (None without labels), logged after `prefix`."""
    if positives is None:
        logging.info(f"{prefix}no labels (--no_labels): recalls not computed")
        return None
    recalls = util.compute_recalls(predictions, positives, recall_values)
    logging.info(f"{prefix}{util.recalls_to_str(recalls, recall_values)}")
    return recalls


def main(args: argparse.Namespace) -> dict:
    """Run the evaluation; returns recalls before/after re-ranking, predictions and the run folder.

    A run that fails (a bad folder, image or checkpoint, an interruption) before its recalls are known leaves no
    run folder behind; once they are logged, a later failure (writing the predictions, a full disk, Ctrl-C) keeps
    the folder with its logs, which say what failed.
    """
    commons.make_deterministic(args.seed)
    device = commons.resolve_device(args.device)
    output_folder = commons.make_run_folder(args.exp_name)
    results: dict = {"output_folder": output_folder}
    try:
        return evaluate(args, device, output_folder, results)
    except BaseException as error:
        commons.end_failed_run(output_folder, error, keep="baseline_recalls" in results)
        raise


def local_features_path(args: argparse.Namespace, output_folder: Path) -> Path:
    """Where the temporary local-feature file goes: the run folder, or `--local_features_dir` (a name unique to
    this run, so that runs sharing that folder do not collide)."""
    if args.local_features_dir is None:
        return output_folder / "local_features.f16"
    unique = f"local_features_{args.exp_name}_{output_folder.name}_{os.getpid()}.f16".replace(os.sep, "_")
    return Path(args.local_features_dir) / unique


def evaluate(args: argparse.Namespace, device: torch.device, output_folder: Path, results: dict | None = None) -> dict:
    """The body of `main`, logging to `output_folder`; fills `results` (returned) as results become known."""
    results = {} if results is None else results
    commons.setup_logging(output_folder)
    commons.log_run_header(args, output_folder)
    dataset = BaseDataset(args, args.datasets_folder, args.dataset_name, "test")
    features_extractor, homography_regression = commons.build_models(args, device)
    logging.info(f"Running on {device}{' with mixed precision' if args.amp else ''}")
    test(args, dataset, features_extractor, homography_regression, device, output_folder, results=results)
    util.save_results(
        output_folder / "results.json",
        args.recall_values,
        results["baseline_recalls"],
        results["reranked_recalls"],
        split=dataset.split,
        dataset=args.dataset_name,
    )
    return results


def test(
    args: argparse.Namespace,
    dataset: BaseDataset,
    features_extractor: FeaturesExtractor,
    homography_regression: torch.nn.Module,
    device: torch.device,
    output_folder: Path,
    rerank: bool = True,
    results: dict | None = None,
) -> dict:
    """Recalls of `dataset` (any split) before and, when `rerank`, after re-ranking; the models end in eval mode.

    Local features (only when re-ranking) are kept in memory under `--local_features_in_memory_mb`, the rest in a
    temporary file in `output_folder` or `--local_features_dir`. Fills and returns `results` as they become known
    (baseline_recalls, predictions, then reranked_recalls, reranked_predictions, rerank_scores, rerank_seconds; the
    re-ranked ones are None without `rerank`), with output_folder.
    """
    results = {} if results is None else results
    results["output_folder"] = output_folder
    logging.info(f"{dataset.split.capitalize()} set: {dataset}")

    store = None
    rerank_batch_size = args.rerank_batch_size or util.default_rerank_batch_size(device)
    if rerank:
        memory_budget, memory_device = util.local_features_memory_budget(args.local_features_in_memory_mb, device)
        store = util.LocalFeatureStore(
            local_features_path(args, output_folder),
            len(dataset.images_paths),
            (features_extractor.features_dim, *features_extractor.grid_size),
            memory_budget,
            memory_device,
        )
        logging.info(
            f"Local features: {store.memory_bytes / 2**20:.1f} MB in {memory_device} memory, "
            f"{store.file_bytes / 2**20:.1f} MB in {store.path}; re-ranking {rerank_batch_size} pairs per pass"
        )
    try:
        start = time.perf_counter()
        database_descriptors = util.extract_features(
            features_extractor,
            dataset.hard_resized_images(range(dataset.database_num)),
            device,
            args.infer_batch_size,
            args.num_workers,
            store,
            "database",
        )
        queries_descriptors = query_descriptors(args, features_extractor, dataset, store, device)
        util.check_finite_descriptors(database_descriptors, dataset.database_paths, "database", args.resume_fe)
        util.check_finite_descriptors(queries_descriptors, dataset.queries_paths, "query", args.resume_fe)
        descriptors_time = time.perf_counter() - start

        start = time.perf_counter()
        num_predictions = max(max(args.recall_values), args.num_reranked_preds, args.num_preds_to_save)
        distances, predictions = util.search(database_descriptors, queries_descriptors, num_predictions)
        if args.test_method in ("nearest_crop", "maj_voting"):
            num_predictions = predictions.shape[1]
            predictions = util.merge_crop_predictions(
                distances, predictions, NUM_CROPS, num_predictions, args.test_method, args.majority_weight
            )
            distances = np.full(predictions.shape, np.nan, dtype=np.float32)  # crops' distances do not merge
        search_time = time.perf_counter() - start
        positives = dataset.get_positives()  # None with --no_labels
        baseline = log_recalls(f"baseline {dataset.split}: ", predictions, positives, args.recall_values)
        results.update(baseline_recalls=baseline, predictions=predictions)
        if not rerank:
            results.update(reranked_recalls=None, reranked_predictions=None, rerank_scores=None)
            return results

        start = time.perf_counter()
        if args.compile_head != "none":
            homography_regression = compile_head(
                homography_regression, args.compile_head, rerank_batch_size, device, args.amp
            )
        query_indexes = list(range(dataset.database_num, dataset.database_num + dataset.queries_num))
        reranked, scores = util.rerank_predictions(
            homography_regression,
            store,
            query_indexes,
            predictions,
            args.num_reranked_preds,
            rerank_batch_size,
            device,
            args.amp,
        )
        rerank_time = time.perf_counter() - start
        after = log_recalls(f"{dataset.split} after re-ranking - ", reranked, positives, args.recall_values)
        results.update(reranked_recalls=after, reranked_predictions=reranked, rerank_scores=scores)
        if args.num_preds_to_save:  # the top pair's matches and homography, while the local features are on disk
            saved = visualize.queries_to_save(reranked, positives, args.save_only_wrong_preds)
            geometries = visualize.top_match_geometries(
                homography_regression, store, saved + dataset.database_num, reranked[saved, 0],
                args.infer_batch_size, device, args.amp,
            )  # fmt: skip
    finally:
        if store is not None:
            store.close()

    logging.info(
        f"Time: descriptors {descriptors_time:.1f} s, search {search_time:.2f} s, re-ranking {rerank_time:.1f} s "
        f"({dataset.queries_num * min(args.num_reranked_preds, predictions.shape[1]) / rerank_time:.1f} pairs/s)"
    )
    if args.save_predictions or args.no_labels:
        path = output_folder / "predictions.csv"
        util.save_predictions(
            path, dataset.queries_paths, dataset.database_paths, predictions, distances, reranked, scores
        )
        logging.info(f"Predictions saved to {path}")
    if args.num_preds_to_save:
        folder = output_folder / "preds"
        visualize.save_prediction_pictures(
            folder, dataset, saved, predictions, reranked, scores, args.num_preds_to_save, geometries, positives
        )
        logging.info(f"{len(saved)} prediction pictures saved to {folder}")
    results["rerank_seconds"] = rerank_time
    return results


def cli(argv: Sequence[str] | None = None) -> dict:
    """Parse `argv` (default: the command line), run `main`, and close the run's log files."""
    args = parser.parse_arguments("eval", argv)
    restore_signal_handlers = commons.install_signal_handlers()
    try:
        return main(args)
    finally:
        commons.close_logging()
        restore_signal_handlers()


if __name__ == "__main__":
    try:
        cli()
    except commons.Interrupted as interrupted:
        sys.exit(128 + interrupted.signum)  # the shell's convention for a process ended by a signal
    except (OSError, ValueError) as error:  # bad input, or an output folder that cannot be written: one line
        print(f"eval.py: error: {error}", file=sys.stderr)
        sys.exit(1)

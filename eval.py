"""Evaluate DHE-VPR: global retrieval (GeM descriptors + faiss), then DHE re-ranking of the top candidates.

    python eval.py --resume_fe finetunedCCT14_pitts30k.torch --resume_hr finetunedDHE_pitts30k.torch \
        --datasets_folder datasets_vg/datasets --dataset_name pitts30k

Logs Recall@N before ("baseline") and after re-ranking, and the time of each stage, to logs/<exp_name>/<time>/.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Subset

import commons
import parser
import util
from datasets_ws import BaseDataset
from model import FeaturesExtractor
from model.dhe import compile_head

NUM_CROPS = 5  # five_crops, nearest_crop and maj_voting describe each query by five square crops


def query_descriptors(
    args: argparse.Namespace,
    features_extractor: FeaturesExtractor,
    dataset: BaseDataset,
    store: util.LocalFeatureStore,
    device: torch.device,
) -> np.ndarray:
    """Global descriptors of the queries per `--test_method` ((Q, D), or (Q * 5, D) for nearest_crop and
    maj_voting); the hard-resized queries' local features go to `store` in every case."""
    query_indexes = range(dataset.database_num, dataset.database_num + dataset.queries_num)
    hard_resized = dataset.hard_resized_images(query_indexes)
    batch_size, workers = args.infer_batch_size, args.num_workers
    if args.test_method == "hard_resize":
        return util.extract_features(features_extractor, hard_resized, device, batch_size, workers, store, "queries")
    util.extract_features(features_extractor, hard_resized, device, batch_size, workers, store, "query local features")
    dataset.test_method = args.test_method
    # single_query keeps each query's aspect ratio, so queries of different sizes cannot share a batch.
    query_batch_size = 1 if args.test_method == "single_query" else batch_size
    descriptors = util.extract_features(
        features_extractor, Subset(dataset, query_indexes), device, query_batch_size, workers, desc="queries"
    )
    if args.test_method == "five_crops":
        descriptors = descriptors.reshape(dataset.queries_num, NUM_CROPS, -1).mean(axis=1)
    return descriptors


def main(args: argparse.Namespace) -> dict:
    """Run the evaluation; returns recalls before/after re-ranking, predictions and the run folder.

    A run that fails (a bad folder, image or checkpoint, an interruption) leaves no run folder behind.
    """
    commons.make_deterministic(args.seed)
    device = commons.resolve_device(args.device)
    output_folder = commons.make_run_folder(args.exp_name)
    try:
        return evaluate(args, device, output_folder)
    except BaseException:
        commons.close_logging()
        commons.remove_run_folder(output_folder)
        raise


def evaluate(args: argparse.Namespace, device: torch.device, output_folder: Path) -> dict:
    """The body of `main`, logging to `output_folder`."""
    commons.setup_logging(output_folder)
    commons.log_run_header(args, output_folder)
    dataset = BaseDataset(args, args.datasets_folder, args.dataset_name, "test")
    features_extractor, homography_regression = commons.build_models(args, device)
    logging.info(f"Test set: {dataset}")
    logging.info(f"Running on {device}{' with mixed precision' if args.amp else ''}")

    memory_budget, memory_device = util.local_features_memory_budget(args.local_features_in_memory_mb, device)
    store = util.LocalFeatureStore(
        output_folder / "local_features.f16",
        len(dataset.images_paths),
        (features_extractor.features_dim, *features_extractor.grid_size),
        memory_budget,
        memory_device,
    )
    rerank_batch_size = args.rerank_batch_size or util.default_rerank_batch_size(device)
    logging.info(
        f"Local features: {store.memory_bytes / 2**20:.1f} MB in {memory_device} memory, "
        f"{store.file_bytes / 2**20:.1f} MB in {store.path.name}; re-ranking {rerank_batch_size} pairs per pass"
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
        descriptors_time = time.perf_counter() - start

        start = time.perf_counter()
        num_predictions = max(max(args.recall_values), args.num_reranked_preds)
        distances, predictions = util.search(database_descriptors, queries_descriptors, num_predictions)
        if args.test_method in ("nearest_crop", "maj_voting"):
            num_predictions = predictions.shape[1]
            predictions = util.merge_crop_predictions(
                distances, predictions, NUM_CROPS, num_predictions, args.test_method, args.majority_weight
            )
            distances = np.full(predictions.shape, np.nan, dtype=np.float32)  # crops' distances do not merge
        search_time = time.perf_counter() - start
        positives = dataset.get_positives()
        baseline = util.compute_recalls(predictions, positives, args.recall_values)
        logging.info(f"baseline test: {util.recalls_to_str(baseline, args.recall_values)}")

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
        after = util.compute_recalls(reranked, positives, args.recall_values)
        logging.info(f"test after re-ranking - {util.recalls_to_str(after, args.recall_values)}")
    finally:
        store.close()

    logging.info(
        f"Time: descriptors {descriptors_time:.1f} s, search {search_time:.2f} s, re-ranking {rerank_time:.1f} s "
        f"({dataset.queries_num * min(args.num_reranked_preds, predictions.shape[1]) / rerank_time:.1f} pairs/s)"
    )
    if args.save_predictions:
        path = output_folder / "predictions.csv"
        util.save_predictions(
            path, dataset.queries_paths, dataset.database_paths, predictions, distances, reranked, scores
        )
        logging.info(f"Predictions saved to {path}")
    return {
        "baseline_recalls": baseline,
        "reranked_recalls": after,
        "predictions": predictions,
        "reranked_predictions": reranked,
        "rerank_scores": scores,
        "rerank_seconds": rerank_time,
        "output_folder": output_folder,
    }


def cli(argv: Sequence[str] | None = None) -> dict:
    """Parse `argv` (default: the command line), run `main`, and close the run's log files."""
    args = parser.parse_arguments("eval", argv)
    try:
        return main(args)
    finally:
        commons.close_logging()


if __name__ == "__main__":
    cli()

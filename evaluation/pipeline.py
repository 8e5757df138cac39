"""The evaluation pipeline: descriptors -> search -> recalls -> re-ranking -> optional pictures and predictions.

`evaluate_split` evaluates one split with models already built (`eval.py`, and the training scripts' validation and
test runs); `evaluate` is what `eval.py` does once its flags are read: build the dataset and the models, evaluate the
test split and write `results.json`. Both take an `EvalSettings` (plain values: `parser.eval_settings(args)` makes
one from the flags), so a notebook can call them.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Subset

import util
from commons import ModelConfig, build_models
from datasets_ws import BaseDataset
from evaluation import pictures
from evaluation.figures import RECALLS_PNG, recalls_figure, save_figure
from evaluation.local_features import LocalFeatureStore, default_rerank_batch_size, local_features_memory_budget
from evaluation.report import write_report
from evaluation.reranking import rerank_predictions
from evaluation.retrieval import log_recalls, merge_crop_predictions, search
from model import FeaturesExtractor
from model.precision import compile_head

NUM_CROPS = 5  # five_crops, nearest_crop and maj_voting describe each query by five square crops


@dataclass(frozen=True)
class EvalSettings:
    """How a split is evaluated (the flags of the same names; `parser.eval_settings(args)`).

    recall_values: the N of the Recall@N reported. test_method: how queries are described for the global search
    (re-ranking always uses the hard-resized query); majority_weight: for maj_voting. num_reranked_preds: top
    predictions the DHE head re-ranks. infer_batch_size, num_workers: descriptor extraction; rerank_batch_size:
    query-candidate pairs per pass of the head (None: `default_rerank_batch_size`). amp: the head in bf16/fp16;
    compile_head: a torch.compile mode or "none". local_features_in_memory_mb: memory budget of the local features
    (-1: automatic); local_features_dir: folder of their temporary file (None: the run folder), whose name holds
    exp_name. save_predictions (always with no_labels): write predictions.csv; num_preds_to_save: pictures of the
    top N (0: none), save_only_wrong_preds: of the queries wrong after re-ranking only. features_checkpoint: the
    features extractor's checkpoint, named when its descriptors are not finite.
    """

    recall_values: tuple[int, ...] = (1, 5, 10, 20)
    test_method: str = "hard_resize"
    majority_weight: float = 0.01
    num_reranked_preds: int = 32
    infer_batch_size: int = 32
    rerank_batch_size: int | None = None
    num_workers: int = 8
    amp: bool = False
    compile_head: str = "none"
    local_features_in_memory_mb: int = -1
    local_features_dir: str | None = None
    exp_name: str = "default"
    save_predictions: bool = False
    no_labels: bool = False
    num_preds_to_save: int = 0
    save_only_wrong_preds: bool = False
    features_checkpoint: str | None = None


def evaluate(
    settings: EvalSettings,
    model_config: ModelConfig,
    datasets_folder: str,
    dataset_name: str,
    positive_dist_threshold: int,
    device: torch.device,
    output_folder: Path,
    results: dict | None = None,
) -> dict:
    """Evaluate the test split of `dataset_name` with the models of `model_config`, and write results.json and
    recalls.png (`evaluation.figures.recalls_figure`; none without labels) to `output_folder`. Fills `results`
    (returned) as results become known (see `evaluate_split`)."""
    results = {} if results is None else results
    dataset = BaseDataset(
        datasets_folder,
        dataset_name,
        "test",
        resize=model_config.resize,
        positive_dist_threshold=positive_dist_threshold,
        test_method=settings.test_method,
        labelled=not settings.no_labels,
    )
    features_extractor, homography_regression = build_models(model_config, device)
    logging.info(f"Running on {device}{' with mixed precision' if settings.amp else ''}")
    evaluate_split(settings, dataset, features_extractor, homography_regression, device, output_folder, results=results)
    if results["baseline_recalls"] is None:
        logging.info(f"No labels (--no_labels): no recalls to draw, {RECALLS_PNG} not written")
    else:
        title = f"{dataset_name} {dataset.split}: Recall@N before and after re-ranking"
        figure = recalls_figure(settings.recall_values, results["baseline_recalls"], results["reranked_recalls"], title)
        save_figure(figure, output_folder / RECALLS_PNG)
    util.save_results(
        output_folder / "results.json",
        settings.recall_values,
        results["baseline_recalls"],
        results["reranked_recalls"],
        split=dataset.split,
        dataset=dataset_name,
    )
    return results


def evaluate_split(
    settings: EvalSettings,
    dataset: BaseDataset,
    features_extractor: FeaturesExtractor,
    homography_regression: nn.Module,
    device: torch.device,
    output_folder: Path,
    rerank: bool = True,
    results: dict | None = None,
) -> dict:
    """Recalls of `dataset` (any split) before and, when `rerank`, after re-ranking; the models end in eval mode.

    Local features (only when re-ranking) are kept in memory under `local_features_in_memory_mb`, the rest in a
    temporary file in `output_folder` or `local_features_dir`. Fills and returns `results` as they become known
    (baseline_recalls, predictions, then reranked_recalls, reranked_predictions, rerank_scores, rerank_seconds; the
    re-ranked ones are None without `rerank`), with output_folder.
    """
    results = {} if results is None else results
    results["output_folder"] = output_folder
    logging.info(f"{dataset.split.capitalize()} set: {dataset}")
    rerank_batch_size = settings.rerank_batch_size or default_rerank_batch_size(device)
    store = None
    if rerank:
        store = open_local_feature_store(settings, dataset, features_extractor, device, output_folder)
        logging.info(
            f"Local features: {store.memory_bytes / 2**20:.1f} MB in {store.memory_device} memory, "
            f"{store.file_bytes / 2**20:.1f} MB in {store.path}; re-ranking {rerank_batch_size} pairs per pass"
        )
    seconds: dict[str, float] = {}
    try:
        start = time.perf_counter()
        descriptors = compute_descriptors(settings, dataset, features_extractor, store, device)
        seconds["descriptors"] = time.perf_counter() - start
        start = time.perf_counter()
        distances, predictions = retrieve(settings, *descriptors)
        seconds["search"] = time.perf_counter() - start
        positives = dataset.get_positives()  # None without labels
        baseline = log_recalls(f"baseline {dataset.split}: ", predictions, positives, settings.recall_values)
        results.update(baseline_recalls=baseline, predictions=predictions)
        if not rerank:
            results.update(reranked_recalls=None, reranked_predictions=None, rerank_scores=None)
            return results
        start = time.perf_counter()
        reranked, scores, homography_regression = rerank_split(
            settings, dataset, homography_regression, store, predictions, rerank_batch_size, device
        )
        seconds["re-ranking"] = time.perf_counter() - start
        after = log_recalls(f"{dataset.split} after re-ranking - ", reranked, positives, settings.recall_values)
        results.update(reranked_recalls=after, reranked_predictions=reranked, rerank_scores=scores)
        saved, geometries = None, None
        if settings.num_preds_to_save:  # the top pair's matches and homography, while the local features are stored
            saved = pictures.queries_to_save(reranked, positives, settings.save_only_wrong_preds)
            geometries = pictures.top_match_geometries(
                homography_regression, store, saved + dataset.database_num, reranked[saved, 0],
                settings.infer_batch_size, device, settings.amp,
            )  # fmt: skip
    finally:
        if store is not None:
            store.close()
    write_outputs(settings, dataset, output_folder, seconds, results, distances, saved, geometries)
    results["rerank_seconds"] = seconds["re-ranking"]
    return results


def write_outputs(
    settings: EvalSettings,
    dataset: BaseDataset,
    output_folder: Path,
    seconds: dict[str, float],
    results: dict,
    distances: np.ndarray,
    saved: np.ndarray | None,
    geometries: list[pictures.MatchGeometry] | None,
) -> None:
    """After re-ranking: log the time of each stage, write predictions.csv (with `save_predictions` or
    `no_labels`; `distances` (Q, k) of the global stage) and the pictures of the `saved` query positions (S,) with
    their top match `geometries` (S,), and `preds/index.html` over them (`evaluation.report`)."""
    predictions, reranked, scores = results["predictions"], results["reranked_predictions"], results["rerank_scores"]
    num_pairs = dataset.queries_num * min(settings.num_reranked_preds, predictions.shape[1])
    logging.info(
        f"Time: descriptors {seconds['descriptors']:.1f} s, search {seconds['search']:.2f} s, re-ranking "
        f"{seconds['re-ranking']:.1f} s ({num_pairs / seconds['re-ranking']:.1f} pairs/s)"
    )
    if settings.save_predictions or settings.no_labels:
        path = output_folder / "predictions.csv"
        util.save_predictions(
            path, dataset.queries_paths, dataset.database_paths, predictions, distances, reranked, scores
        )
        logging.info(f"Predictions saved to {path}")
    if saved is not None:
        folder = output_folder / "preds"
        positives = dataset.get_positives()
        paths = pictures.save_prediction_pictures(
            folder, dataset, saved, predictions, reranked, scores, settings.num_preds_to_save, geometries, positives
        )
        correct = [None if positives is None else bool(np.isin(reranked[q, 0], positives[q])) for q in saved]
        page = write_report(
            folder, paths, saved, [dataset.queries_paths[q] for q in saved], correct, settings.recall_values,
            results["baseline_recalls"], results["reranked_recalls"], f"{dataset.dataset_name} {dataset.split}",
        )  # fmt: skip
        logging.info(f"{len(saved)} prediction pictures saved to {folder}, browse them with {page}")


def local_features_path(settings: EvalSettings, output_folder: Path) -> Path:
    """Where the temporary local-feature file goes: the run folder, or `local_features_dir` (a name unique to this
    run, so that runs sharing that folder do not collide)."""
    if settings.local_features_dir is None:
        return output_folder / "local_features.f16"
    unique = f"local_features_{settings.exp_name}_{output_folder.name}_{os.getpid()}.f16".replace(os.sep, "_")
    return Path(settings.local_features_dir) / unique


def open_local_feature_store(
    settings: EvalSettings,
    dataset: BaseDataset,
    features_extractor: FeaturesExtractor,
    device: torch.device,
    output_folder: Path,
) -> LocalFeatureStore:
    """An empty store for the local features (C, h, w) of every image of `dataset`, under the memory budget."""
    memory_budget, memory_device = local_features_memory_budget(settings.local_features_in_memory_mb, device)
    return LocalFeatureStore(
        local_features_path(settings, output_folder),
        len(dataset.images_paths),
        (features_extractor.features_dim, *features_extractor.grid_size),
        memory_budget,
        memory_device,
    )


def compute_descriptors(
    settings: EvalSettings,
    dataset: BaseDataset,
    features_extractor: FeaturesExtractor,
    store: LocalFeatureStore | None,
    device: torch.device,
) -> tuple[np.ndarray, np.ndarray]:
    """Global descriptors of the database (N_db, D) and of the queries (see `query_descriptors`), checked finite;
    the local features of every hard-resized image go to `store`, when given."""
    database_descriptors = util.extract_features(
        features_extractor,
        dataset.hard_resized_images(range(dataset.database_num)),
        device,
        settings.infer_batch_size,
        settings.num_workers,
        store,
        "database",
    )
    queries_descriptors = query_descriptors(settings, features_extractor, dataset, store, device)
    checkpoint = settings.features_checkpoint
    util.check_finite_descriptors(database_descriptors, dataset.database_paths, "database", checkpoint)
    util.check_finite_descriptors(queries_descriptors, dataset.queries_paths, "query", checkpoint)
    return database_descriptors, queries_descriptors


def query_descriptors(
    settings: EvalSettings,
    features_extractor: FeaturesExtractor,
    dataset: BaseDataset,
    store: LocalFeatureStore | None,
    device: torch.device,
) -> np.ndarray:
    """Global descriptors of the queries per `test_method` ((Q, D), or (Q * 5, D) for nearest_crop and
    maj_voting); the hard-resized queries' local features go to `store`, when given, in every case."""
    query_indexes = range(dataset.database_num, dataset.database_num + dataset.queries_num)
    hard_resized = dataset.hard_resized_images(query_indexes)
    batch_size, workers = settings.infer_batch_size, settings.num_workers
    if settings.test_method == "hard_resize":
        return util.extract_features(features_extractor, hard_resized, device, batch_size, workers, store, "queries")
    if store is not None:
        util.extract_features(
            features_extractor, hard_resized, device, batch_size, workers, store, "query local features"
        )
    dataset.test_method = settings.test_method
    # single_query keeps each query's aspect ratio, so queries of different sizes cannot share a batch.
    query_batch_size = 1 if settings.test_method == "single_query" else batch_size
    descriptors = util.extract_features(
        features_extractor, Subset(dataset, query_indexes), device, query_batch_size, workers, desc="queries"
    )
    if settings.test_method == "five_crops":
        descriptors = descriptors.reshape(dataset.queries_num, NUM_CROPS, -1).mean(axis=1)
    return descriptors


def retrieve(
    settings: EvalSettings, database_descriptors: np.ndarray, queries_descriptors: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(distances (Q, k), predictions (Q, k)) of the exact search, k enough for the recalls, the re-ranking and the
    pictures; the crops' rankings merged for nearest_crop and maj_voting (whose distances are then NaN)."""
    num_predictions = max(max(settings.recall_values), settings.num_reranked_preds, settings.num_preds_to_save)
    distances, predictions = search(database_descriptors, queries_descriptors, num_predictions)
    if settings.test_method in ("nearest_crop", "maj_voting"):
        num_predictions = predictions.shape[1]
        predictions = merge_crop_predictions(
            distances, predictions, NUM_CROPS, num_predictions, settings.test_method, settings.majority_weight
        )
        distances = np.full(predictions.shape, np.nan, dtype=np.float32)  # crops' distances do not merge
    return distances, predictions


def rerank_split(
    settings: EvalSettings,
    dataset: BaseDataset,
    homography_regression: nn.Module,
    store: LocalFeatureStore,
    predictions: np.ndarray,
    rerank_batch_size: int,
    device: torch.device,
) -> tuple[np.ndarray, np.ndarray, nn.Module]:
    """Re-rank the queries' top `num_reranked_preds` predictions (Q, k) with the head, compiled when asked:
    (reranked predictions (Q, k), scores (Q, K), the head that ran)."""
    if settings.compile_head != "none":
        homography_regression = compile_head(
            homography_regression, settings.compile_head, rerank_batch_size, device, settings.amp
        )
    query_indexes = list(range(dataset.database_num, dataset.database_num + dataset.queries_num))
    reranked, scores = rerank_predictions(
        homography_regression,
        store,
        query_indexes,
        predictions,
        settings.num_reranked_preds,
        rerank_batch_size,
        device,
        settings.amp,
    )
    return reranked, scores, homography_regression

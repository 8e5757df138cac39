"""The evaluation pipeline: descriptors -> search -> recalls -> re-ranking -> optional pictures and predictions.

`evaluate_split` evaluates one split with models already built (`eval.py`, and the training scripts' validation and
test runs); `evaluate` is what `eval.py` does once its flags are read: build the dataset and the models, evaluate the
test split and write `results.json`. Both take an `EvalSettings` (plain values: `parser.eval_settings(args)` makes
one from the flags), so a notebook can call them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Subset

import distributed
import util
from commons import ModelConfig, build_models
from datasets_ws import BaseDataset
from evaluation import pictures
from evaluation.figures import RECALLS_PNG, recalls_figure, save_figure
from evaluation.index import IndexSettings, build_index, check_index, index_log_line, search_index
from evaluation.local_features import LocalFeatureStore, default_rerank_batch_size, local_features_memory_budget
from evaluation.report import write_report
from evaluation.reranking import order_by_scores, score_candidate_pairs
from evaluation.retrieval import log_recalls, merge_crop_predictions
from evaluation.saved_descriptors import (
    DescriptorsProvenance,
    load_database_descriptors,
    provenance_of,
    save_database_descriptors,
)
from evaluation.sharding import gather_in_order, shard_positions
from model import FeaturesExtractor
from model.precision import compile_head

NUM_CROPS = 5  # five_crops, nearest_crop and maj_voting describe each query by five square crops
LOCAL_FEATURES_MODES = ("auto", "all", "candidates")
STAGES = ("descriptors", "search", "local_features", "reranking")  # results.json's stats.seconds


@dataclass(frozen=True)
class EvalSettings:
    """How a split is evaluated (the flags of the same names; `parser.eval_settings(args)`).

    recall_values: the N of the Recall@N reported. test_method: how queries are described for the global search
    (re-ranking always uses the hard-resized query); majority_weight: for maj_voting. num_reranked_preds: top
    predictions the DHE head re-ranks. infer_batch_size, num_workers: descriptor extraction; rerank_batch_size:
    query-candidate pairs per pass of the head (None: `default_rerank_batch_size`). amp: the head in bf16/fp16;
    compile_head: a torch.compile mode or "none". local_features: which images get their local features extracted
    ("all" in the database pass, "candidates" in a second pass over the queries and their candidates, "auto": see
    `choose_local_features`). local_features_in_memory_mb: memory budget of the local features (-1: automatic);
    local_features_dir: folder of their temporary file (None: the run folder), whose name holds exp_name. index:
    the faiss index of the global search. database_descriptors: a saved database's descriptors to use instead of
    extracting them (`evaluation.saved_descriptors`); save_database_descriptors: save them to the run folder.
    save_predictions (always with no_labels): write predictions.csv; num_preds_to_save: pictures of the top N (0:
    none), save_only_wrong_preds: of the queries wrong after re-ranking only. features_checkpoint: the features
    extractor's checkpoint, named when its descriptors are not finite and in saved descriptors.
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
    local_features: str = "auto"
    local_features_in_memory_mb: int = -1
    local_features_dir: str | None = None
    exp_name: str = "default"
    index: IndexSettings = field(default_factory=IndexSettings)
    database_descriptors: str | None = None
    save_database_descriptors: bool = False
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
    (returned) as results become known (see `evaluate_split`). Under torchrun every process calls it: they share
    the work (see `evaluate_split`) and rank 0 writes."""
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
    distributed.share_weights(features_extractor, homography_regression)  # random parts too: one model everywhere
    logging.info(f"Running on {device}{' with mixed precision' if settings.amp else ''}")
    evaluate_split(settings, dataset, features_extractor, homography_regression, device, output_folder, results=results)
    if not distributed.is_main_process():
        return results
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
        stats=results["stats"],
    )
    return results


class Stopwatch:
    """Seconds spent in each stage: `with clock("search"): ...` adds to `clock.seconds["search"]`."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(STAGES, 0.0)

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - start

    def rounded(self) -> dict[str, float]:
        """The seconds of each stage to the millisecond, as results.json's stats.seconds holds them."""
        return {stage: round(seconds, 3) for stage, seconds in self.seconds.items()}


def choose_local_features(
    mode: str, database_num: int, queries_num: int, num_reranked: int, world_size: int = 1, reuse: bool = False
) -> tuple[str, str]:
    """(the mode that runs, "all" or "candidates"; why) for `--local_features mode`.

    "all" stores every image's local features in the database and query pass; "candidates" keeps the database pass
    global and extracts the local features of the queries and of their top `num_reranked` candidates afterwards.
    "auto" picks "candidates" when the database holds more images than queries x num_reranked (the most candidates
    there can be), when several processes share the work (each holds the local features of its own pairs only)
    or when the database's descriptors are reused (its images are not read at all), else "all".

    Raises:
        ValueError: an unknown mode, or "all" where it cannot run (several processes, reused descriptors).
    """
    if mode not in LOCAL_FEATURES_MODES:
        raise ValueError(f"--local_features {mode!r}: expected one of {', '.join(LOCAL_FEATURES_MODES)}")
    if mode == "all" and world_size > 1:
        raise ValueError(
            f"--local_features all keeps every image's local features in one process, but {world_size} processes "
            "share this evaluation: use --local_features candidates (or auto)"
        )
    if mode == "all" and reuse:
        raise ValueError(
            "--local_features all extracts the database's local features in the database pass, which "
            "--database_descriptors skips: use --local_features candidates (or auto)"
        )
    if mode != "auto":
        return mode, f"--local_features {mode}"
    most = queries_num * num_reranked
    if world_size > 1:
        return "candidates", f"{world_size} processes each extract the local features of their own pairs"
    if reuse:
        return "candidates", "the database's descriptors are reused (--database_descriptors)"
    if database_num > most:
        return "candidates", f"{database_num} database images > {queries_num} queries x {num_reranked} candidates"
    return "all", f"{database_num} database images <= {queries_num} queries x {num_reranked} candidates"


def plan_split(
    settings: EvalSettings, dataset: BaseDataset, features_extractor: FeaturesExtractor, rerank: bool
) -> dict:
    """Check what can be checked before any image is read (the local-features mode, the faiss index) and log what
    the evaluation will cost: one line. Returns the start of results.json's "stats" block."""
    world_size = distributed.get_world_size()
    reuse = settings.database_descriptors is not None
    mode, why = "none", "no re-ranking"
    if rerank:
        mode, why = choose_local_features(
            settings.local_features, dataset.database_num, dataset.queries_num, settings.num_reranked_preds,
            world_size, reuse,
        )  # fmt: skip
    index_description = check_index(settings.index, features_extractor.features_dim, dataset.database_num)
    crops = NUM_CROPS if settings.test_method in ("five_crops", "nearest_crop", "maj_voting") else 1
    global_bytes = (dataset.database_num + dataset.queries_num * crops) * features_extractor.features_dim * 4
    record_bytes = features_extractor.features_dim * int(np.prod(features_extractor.grid_size)) * 2
    if mode == "all":
        records, local = len(dataset.images_paths), f"every image's {len(dataset.images_paths)}"
    elif mode == "candidates":
        records = min(dataset.queries_num * (1 + settings.num_reranked_preds), len(dataset.images_paths))
        local = f"at most {records} (queries and their candidates)"
    else:
        records, local = 0, "none"
    logging.info(
        f"Cost: {dataset.database_num} database images and {dataset.queries_num} queries, {world_size} "
        f"process{'es' if world_size > 1 else ''}; global descriptors {global_bytes / 2**20:.1f} MB of RAM; local "
        f"features {mode} ({why}): {local} of {record_bytes / 2**10:.0f} KB = {records * record_bytes / 2**20:.1f} MB "
        f"(memory, then disk); faiss index {index_description}"
        + (f"; database descriptors from {settings.database_descriptors}" if reuse else "")
    )
    return {
        "database_num": dataset.database_num,
        "queries_num": dataset.queries_num,
        "processes": world_size,
        "local_features": mode,
        "faiss_index": settings.index.factory,
    }


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

    Local features (only when re-ranking) are those of every image or of the queries and their candidates
    (`choose_local_features`), kept in memory under `local_features_in_memory_mb`, the rest in a temporary file in
    `output_folder` or `local_features_dir`. Under torchrun every process calls it: each describes its share of the
    images and scores its share of the pairs (`evaluation.sharding`), rank 0 searches, logs and writes, and every
    process gets the same results. Fills and returns `results` as they become known (baseline_recalls,
    predictions, then reranked_recalls, reranked_predictions, rerank_scores, rerank_seconds; the re-ranked ones
    are None without `rerank`), with output_folder and stats (results.json's "stats").
    """
    results = {} if results is None else results
    results["output_folder"] = output_folder
    logging.info(f"{dataset.split.capitalize()} set: {dataset}")
    stats = plan_split(settings, dataset, features_extractor, rerank)
    rerank_batch_size = settings.rerank_batch_size or default_rerank_batch_size(device)
    clock = Stopwatch()
    stores: list[LocalFeatureStore] = []
    try:
        if stats["local_features"] == "all":
            stores.append(open_local_feature_store(settings, dataset, features_extractor, device, output_folder))
            log_store(stores[0], rerank_batch_size)
        with clock("descriptors"):
            store = stores[0] if stores else None
            descriptors = compute_descriptors(settings, dataset, features_extractor, store, device, output_folder)
        distances, predictions = None, None
        if distributed.is_main_process():
            with clock("search"):
                distances, predictions, stats["faiss"] = retrieve(settings, *descriptors)
        del descriptors
        predictions = distributed.broadcast_object(predictions)
        positives = dataset.get_positives()  # None without labels
        baseline = log_recalls(f"baseline {dataset.split}: ", predictions, positives, settings.recall_values)
        results.update(baseline_recalls=baseline, predictions=predictions, stats=stats)
        if not rerank:
            results.update(reranked_recalls=None, reranked_predictions=None, rerank_scores=None)
            stats["seconds"] = clock.rounded()
            return results
        reranked, scores, homography_regression = rerank_split(
            settings, dataset, features_extractor, homography_regression, stores, predictions, rerank_batch_size,
            device, output_folder, clock,
        )  # fmt: skip
        after = log_recalls(f"{dataset.split} after re-ranking - ", reranked, positives, settings.recall_values)
        results.update(reranked_recalls=after, reranked_predictions=reranked, rerank_scores=scores)
        record_stats(stats, stores, clock, len(reranked) * scores.shape[1])
        saved, geometries = None, None
        if settings.num_preds_to_save and distributed.is_main_process():  # the top pair's matches and homography
            saved = pictures.queries_to_save(reranked, positives, settings.save_only_wrong_preds)
            geometries = saved_geometries(
                settings, dataset, features_extractor, homography_regression, stores, saved, reranked[saved, 0],
                device, output_folder,
            )  # fmt: skip
    finally:
        for store in stores:
            store.close()
    if distributed.is_main_process():
        write_outputs(settings, dataset, output_folder, stats, results, distances, saved, geometries)
    results["rerank_seconds"] = clock.seconds["reranking"]
    return results


def record_stats(stats: dict, stores: list[LocalFeatureStore], clock: Stopwatch, num_pairs: int) -> None:
    """Fill `stats` after re-ranking: the local-feature records and bytes of every process (memory and file), the
    seconds of each stage (rank 0's clock), the pairs scored and their rate."""
    mine = [(store.num_records, store.memory_bytes + store.file_bytes, store.file_bytes) for store in stores[:1]]
    totals = np.sum(distributed.gather_objects(mine[0] if mine else (0, 0, 0)), axis=0)
    stats["local_feature_records"], stats["local_feature_bytes"], stats["local_feature_file_bytes"] = map(int, totals)
    stats["seconds"] = clock.rounded()
    stats["reranking_pairs"] = num_pairs
    reranking = clock.seconds["reranking"]
    stats["reranking_pairs_per_second"] = round(num_pairs / reranking, 3) if reranking > 0 else None


def log_store(store: LocalFeatureStore, rerank_batch_size: int) -> None:
    logging.info(
        f"Local features: {store.num_records} images, {store.memory_bytes / 2**20:.1f} MB in {store.memory_device} "
        f"memory, {store.file_bytes / 2**20:.1f} MB in {store.path}; re-ranking {rerank_batch_size} pairs per pass"
    )


def write_outputs(
    settings: EvalSettings,
    dataset: BaseDataset,
    output_folder: Path,
    stats: dict,
    results: dict,
    distances: np.ndarray,
    saved: np.ndarray | None,
    geometries: list[pictures.MatchGeometry] | None,
) -> None:
    """After re-ranking (rank 0): log the time of each stage (`stats`), write predictions.csv (with
    `save_predictions` or `no_labels`; `distances` (Q, k) of the global stage) and the pictures of the `saved`
    query positions (S,) with their top match `geometries` (S,), and `preds/index.html` over them
    (`evaluation.report`)."""
    predictions, reranked, scores = results["predictions"], results["reranked_predictions"], results["rerank_scores"]
    seconds, rate = stats["seconds"], stats["reranking_pairs_per_second"]
    logging.info(
        f"Time: descriptors {seconds['descriptors']:.1f} s, search {seconds['search']:.2f} s, local features "
        f"{seconds['local_features']:.1f} s, re-ranking {seconds['reranking']:.1f} s"
        + (f" ({rate:.1f} pairs/s)" if rate is not None else "")
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


def local_features_path(settings: EvalSettings, output_folder: Path, part: str = "") -> Path:
    """Where the temporary local-feature file goes: the run folder, or `local_features_dir` (a name unique to this
    run, so that runs sharing that folder do not collide); under torchrun each rank has its own file, and each
    store of a run its own `part` of the name."""
    rank = distributed.get_rank()
    suffix = part + (f".rank{rank}" if distributed.get_world_size() > 1 else "")
    if settings.local_features_dir is None:
        output_folder.mkdir(parents=True, exist_ok=True)  # on another machine than rank 0's, a folder of its own
        return output_folder / f"local_features{suffix}.f16"
    unique = f"local_features_{settings.exp_name}_{output_folder.name}_{os.getpid()}{suffix}.f16".replace(os.sep, "_")
    return Path(settings.local_features_dir) / unique


def open_local_feature_store(
    settings: EvalSettings,
    dataset: BaseDataset,
    features_extractor: FeaturesExtractor,
    device: torch.device,
    output_folder: Path,
    indexes: np.ndarray | None = None,
    part: str = "",
) -> LocalFeatureStore:
    """An empty store for the local features (C, h, w) of the images `indexes` (increasing; None: every image of
    `dataset`), under the memory budget, its file named with `part` (`local_features_path`)."""
    memory_budget, memory_device = local_features_memory_budget(settings.local_features_in_memory_mb, device)
    return LocalFeatureStore(
        local_features_path(settings, output_folder, part),
        len(dataset.images_paths) if indexes is None else len(indexes),
        (features_extractor.features_dim, *features_extractor.grid_size),
        memory_budget,
        memory_device,
        indexes,
    )


def extract_sharded(
    features_extractor: FeaturesExtractor,
    images: Dataset,
    device: torch.device,
    batch_size: int,
    num_workers: int,
    store: LocalFeatureStore | None,
    desc: str,
    rows_per_item: int = 1,
) -> np.ndarray | None:
    """`util.extract_features` of `images` shared by the processes (each its batches, `shard_positions`): the
    descriptors (N * rows_per_item, D) in order on rank 0, None on the others. One process describes them all."""
    if distributed.get_world_size() == 1:
        return util.extract_features(features_extractor, images, device, batch_size, num_workers, store, desc)
    positions = shard_positions(len(images), batch_size)
    if len(positions):
        part = util.extract_features(
            features_extractor, Subset(images, positions.tolist()), device, batch_size, num_workers, store, desc
        )
    else:
        part = np.zeros((0, features_extractor.features_dim), dtype=np.float32)
    return gather_in_order(part, len(images), batch_size, rows_per_item)


def compute_descriptors(
    settings: EvalSettings,
    dataset: BaseDataset,
    features_extractor: FeaturesExtractor,
    store: LocalFeatureStore | None,
    device: torch.device,
    output_folder: Path,
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Global descriptors of the database (N_db, D) and of the queries (see `query_descriptors`), checked finite, on
    rank 0 (None on the others); the database's are read from `database_descriptors` when given, and saved with
    `save_database_descriptors` (to `output_folder`). The local features of every hard-resized image go to
    `store`, when given."""
    checkpoint = settings.features_checkpoint
    if settings.database_descriptors is not None:
        database_descriptors = None
        if distributed.is_main_process():
            database_descriptors = load_database_descriptors(
                settings.database_descriptors, descriptors_provenance(dataset, features_extractor, checkpoint)
            )
            logging.info(f"Database descriptors read from {settings.database_descriptors}")
    else:
        database_descriptors = extract_sharded(
            features_extractor,
            dataset.hard_resized_images(range(dataset.database_num)),
            device,
            settings.infer_batch_size,
            settings.num_workers,
            store,
            "database",
        )
    queries_descriptors = query_descriptors(settings, features_extractor, dataset, store, device)
    if not distributed.is_main_process():
        return None, None
    util.check_finite_descriptors(database_descriptors, dataset.database_paths, "database", checkpoint)
    util.check_finite_descriptors(queries_descriptors, dataset.queries_paths, "query", checkpoint)
    if settings.save_database_descriptors:
        paths = save_database_descriptors(
            output_folder, database_descriptors, descriptors_provenance(dataset, features_extractor, checkpoint)
        )
        logging.info(f"Database descriptors saved to {paths[0]}")
    return database_descriptors, queries_descriptors


def descriptors_provenance(
    dataset: BaseDataset, features_extractor: FeaturesExtractor, checkpoint: str | None
) -> DescriptorsProvenance:
    """What the database's descriptors of `dataset` are made from, for saving and checking them."""
    return provenance_of(
        dataset.database_paths,
        dataset.dataset_folder,
        features_extractor.resize,
        checkpoint,
        features_extractor,
        len(features_extractor.encoder.classifier.blocks),
    )


def query_descriptors(
    settings: EvalSettings,
    features_extractor: FeaturesExtractor,
    dataset: BaseDataset,
    store: LocalFeatureStore | None,
    device: torch.device,
) -> np.ndarray | None:
    """Global descriptors of the queries per `test_method` ((Q, D), or (Q * 5, D) for nearest_crop and
    maj_voting) on rank 0 (None on the others); the hard-resized queries' local features go to `store`, when
    given, in every case."""
    query_indexes = range(dataset.database_num, dataset.database_num + dataset.queries_num)
    hard_resized = dataset.hard_resized_images(query_indexes)
    batch_size, workers = settings.infer_batch_size, settings.num_workers
    if settings.test_method == "hard_resize":
        return extract_sharded(features_extractor, hard_resized, device, batch_size, workers, store, "queries")
    if store is not None:
        util.extract_features(
            features_extractor, hard_resized, device, batch_size, workers, store, "query local features"
        )
    dataset.test_method = settings.test_method
    # single_query keeps each query's aspect ratio, so queries of different sizes cannot share a batch.
    query_batch_size = 1 if settings.test_method == "single_query" else batch_size
    crops = NUM_CROPS if settings.test_method in ("five_crops", "nearest_crop", "maj_voting") else 1
    descriptors = extract_sharded(
        features_extractor, Subset(dataset, query_indexes), device, query_batch_size, workers, None, "queries", crops
    )
    if descriptors is not None and settings.test_method == "five_crops":
        descriptors = descriptors.reshape(dataset.queries_num, NUM_CROPS, -1).mean(axis=1)
    return descriptors


def retrieve(
    settings: EvalSettings, database_descriptors: np.ndarray, queries_descriptors: np.ndarray
) -> tuple[np.ndarray, np.ndarray, dict]:
    """(distances (Q, k), predictions (Q, k), the index's stats) of the search in the faiss index of
    `settings.index`, k enough for the recalls, the re-ranking and the pictures; the crops' rankings merged for
    nearest_crop and maj_voting (whose distances are then NaN)."""
    num_predictions = max(max(settings.recall_values), settings.num_reranked_preds, settings.num_preds_to_save)
    index, index_stats = build_index(settings.index, database_descriptors)
    distances, predictions, search_seconds = search_index(index, queries_descriptors, num_predictions)
    logging.info(index_log_line(index_stats, search_seconds))
    if settings.test_method in ("nearest_crop", "maj_voting"):
        num_predictions = predictions.shape[1]
        predictions = merge_crop_predictions(
            distances, predictions, NUM_CROPS, num_predictions, settings.test_method, settings.majority_weight
        )
        distances = np.full(predictions.shape, np.nan, dtype=np.float32)  # crops' distances do not merge
    return distances, predictions, dataclasses.asdict(index_stats) | {"search_seconds": round(search_seconds, 3)}


def candidate_store(
    settings: EvalSettings,
    dataset: BaseDataset,
    features_extractor: FeaturesExtractor,
    images: np.ndarray,
    device: torch.device,
    output_folder: Path,
    part: str = "",
) -> LocalFeatureStore:
    """A store holding the local features of the images `images` (any order, repeats allowed), extracted now (the
    second pass of `--local_features candidates`), its file named with `part`."""
    indexes = np.unique(images)
    store = open_local_feature_store(settings, dataset, features_extractor, device, output_folder, indexes, part)
    if not len(indexes):  # a process without pairs (fewer passes than processes)
        return store
    try:
        util.extract_features(
            features_extractor,
            dataset.hard_resized_images(indexes),
            device,
            settings.infer_batch_size,
            settings.num_workers,
            store,
            "local features",
        )
    except BaseException:
        store.close()
        raise
    return store


def rerank_split(
    settings: EvalSettings,
    dataset: BaseDataset,
    features_extractor: FeaturesExtractor,
    homography_regression: nn.Module,
    stores: list[LocalFeatureStore],
    predictions: np.ndarray,
    rerank_batch_size: int,
    device: torch.device,
    output_folder: Path,
    clock: Stopwatch,
) -> tuple[np.ndarray, np.ndarray, nn.Module]:
    """Re-rank the queries' top `num_reranked_preds` predictions (Q, k) with the head, compiled when asked:
    (reranked predictions (Q, k), scores (Q, K), the head that ran), on every process.

    The pairs (query-major) are scored `rerank_batch_size` at a time, each process its passes
    (`shard_positions`), from `stores[0]` ("all") or from a store of its pairs' images made here ("candidates",
    appended to `stores`); rank 0 gathers the scores and orders them."""
    num_reranked = min(settings.num_reranked_preds, predictions.shape[1])
    query_indexes = np.arange(dataset.database_num, dataset.database_num + dataset.queries_num, dtype=np.int64)
    pair_queries = np.repeat(query_indexes, num_reranked)  # (Q * K,) image indexes
    pair_candidates = predictions[:, :num_reranked].reshape(-1).astype(np.int64)
    mine = shard_positions(len(pair_queries), rerank_batch_size)
    if not stores:
        with clock("local_features"):
            images = np.concatenate([pair_queries[mine], pair_candidates[mine]])
            stores.append(candidate_store(settings, dataset, features_extractor, images, device, output_folder))
        log_store(stores[0], rerank_batch_size)
    if settings.compile_head != "none":
        homography_regression = compile_head(
            homography_regression, settings.compile_head, rerank_batch_size, device, settings.amp
        )
    homography_regression.eval()
    with clock("reranking"):
        part = score_candidate_pairs(
            homography_regression, stores[0], pair_queries[mine], pair_candidates[mine], rerank_batch_size, device,
            settings.amp, pairs_per_query=num_reranked,
        )  # fmt: skip
        scores = gather_in_order(part, len(pair_queries), rerank_batch_size)
    ordered = None
    if scores is not None:
        ordered = order_by_scores(predictions, scores.reshape(dataset.queries_num, num_reranked))
    reranked, ordered_scores = distributed.broadcast_object(ordered)
    return reranked, ordered_scores, homography_regression


def saved_geometries(
    settings: EvalSettings,
    dataset: BaseDataset,
    features_extractor: FeaturesExtractor,
    homography_regression: nn.Module,
    stores: list[LocalFeatureStore],
    saved: np.ndarray,
    top_candidates: np.ndarray,
    device: torch.device,
    output_folder: Path,
) -> list[pictures.MatchGeometry]:
    """The matches and homography of each saved query position (S,) with its top candidate (S,) after re-ranking,
    from the local features in `stores[0]`, or extracted again for them where it lacks some (another process
    scored their pairs)."""
    queries = saved + dataset.database_num
    needed = np.concatenate([queries, top_candidates])
    store = stores[0]
    if not all(int(index) in store for index in needed):
        store = candidate_store(settings, dataset, features_extractor, needed, device, output_folder, ".pictures")
        stores.append(store)
    return pictures.top_match_geometries(
        homography_regression, store, queries, top_candidates, settings.infer_batch_size, device, settings.amp
    )

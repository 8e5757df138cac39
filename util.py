"""Evaluation building blocks: descriptors, the on-disk local-feature store, faiss search, recalls, re-ranking.

Memory stays bounded by the global descriptors (N x 384 float32): local feature maps are written as float16 to a
file in the run folder (`LocalFeatureStore`) and read back, a query's candidates at a time, with positioned reads
(not a memory map, whose touched pages would count towards the process's resident memory).
"""

from __future__ import annotations

import csv
import ctypes
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import faiss
import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

__all__ = [
    "LocalFeatureStore",
    "extract_features",
    "search",
    "merge_crop_predictions",
    "compute_recalls",
    "recalls_to_str",
    "rerank_predictions",
    "save_predictions",
    "save_results",
]


def _glibc_malloc_trim() -> Callable[[], None]:
    """`malloc_trim(0)` of glibc, or a no-op where there is none (macOS, musl, Windows)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return lambda: None
    return lambda: trim(0)


# Decoding and resizing images and the per-batch tensors leave glibc's heap fragmented: freed memory stays with the
# process and the resident size grows with the number of batches (about 170 KB per image at 192 x 192, measured with
# benchmarks/bench_eval_memory.py). Handing it back after each batch keeps the peak flat.
release_freed_memory = _glibc_malloc_trim()


class LocalFeatureStore:
    """Fixed-size float16 records of local features (C, h, w), one per image index, in a file.

    Args:
        path: the file; created (truncated) here and deleted by `close(delete=True)`.
        num_records: how many images.
        feature_shape: (C, h, w) of one record.
    """

    def __init__(self, path: str | Path, num_records: int, feature_shape: tuple[int, int, int]) -> None:
        self.path = Path(path)
        self.num_records = num_records
        self.feature_shape = tuple(feature_shape)
        self.record_bytes = int(np.prod(self.feature_shape)) * 2
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(self._fd, self.record_bytes * num_records)

    def write(self, indexes: Sequence[int], features: Tensor) -> None:
        """Store features (B, C, h, w) at `indexes` (B,)."""
        if tuple(features.shape[1:]) != self.feature_shape or len(indexes) != features.shape[0]:
            raise ValueError(
                f"expected ({len(indexes)}, {', '.join(map(str, self.feature_shape))}) features, "
                f"got {tuple(features.shape)}"
            )
        array = features.detach().to("cpu", torch.float16).numpy()
        for index, record in zip(indexes, array):
            self._check_index(int(index))
            os.pwrite(self._fd, record.tobytes(), int(index) * self.record_bytes)

    def read(self, indexes: Sequence[int]) -> Tensor:
        """Features (B, C, h, w) float16 of `indexes` (B,)."""
        out = np.empty((len(indexes), *self.feature_shape), dtype=np.float16)
        for slot, index in enumerate(indexes):
            self._check_index(int(index))
            data = os.pread(self._fd, self.record_bytes, int(index) * self.record_bytes)
            out[slot] = np.frombuffer(data, dtype=np.float16).reshape(self.feature_shape)
        return torch.from_numpy(out)

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.num_records:
            raise IndexError(f"record {index} out of range for a store of {self.num_records}")

    def close(self, delete: bool = True) -> None:
        """Close the file, and delete it unless `delete=False`."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if delete:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> LocalFeatureStore:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def extract_features(
    features_extractor: nn.Module,
    images: Dataset,
    device: torch.device,
    batch_size: int,
    num_workers: int = 0,
    store: LocalFeatureStore | None = None,
    desc: str = "features",
) -> np.ndarray:
    """Global descriptors (N, D) float32 of a Dataset yielding (image, index), in its order.

    Images may be (3, H, W), or (K, 3, H, W) crops whose descriptors are then returned as (N * K, D) in image-major
    order. When `store` is given, the L2-normalised local features (B, C, h, w) of single images go to it at the
    yielded indexes. The model runs in eval mode and gets its train/eval mode back afterwards.
    """
    loader = DataLoader(
        images, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=device.type == "cuda"
    )
    was_training = features_extractor.training
    features_extractor.eval()
    descriptors = []
    with torch.inference_mode():
        for batch, indexes in tqdm(loader, desc=desc, ncols=100, leave=False):
            crops = batch.dim() == 5
            batch = batch.flatten(0, 1) if crops else batch
            global_descriptors, local_features = features_extractor(batch.to(device, non_blocking=True))
            descriptors.append(global_descriptors.float().cpu().numpy())
            if store is not None:
                if crops:
                    raise ValueError("local features are stored for single images only, got crops")
                store.write(indexes.tolist(), local_features)
            release_freed_memory()
    features_extractor.train(was_training)
    return np.concatenate(descriptors).astype(np.float32, copy=False)


def search(database_descriptors: np.ndarray, queries_descriptors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact L2 kNN with faiss `IndexFlatL2`: (distances (Q, k'), predictions (Q, k')), k' = min(k, database size).

    faiss pads with -1 when the database is smaller than k; asking for no more than there is avoids that, with one
    warning.
    """
    database_num = database_descriptors.shape[0]
    if k > database_num:
        logging.warning(
            f"Asked for {k} predictions, but the database has only {database_num} images: using {database_num}"
        )
        k = database_num
    index = faiss.IndexFlatL2(database_descriptors.shape[1])
    index.add(np.ascontiguousarray(database_descriptors, dtype=np.float32))
    distances, predictions = index.search(np.ascontiguousarray(queries_descriptors, dtype=np.float32), k)
    if (predictions < 0).any():
        raise RuntimeError("faiss returned -1 (padding) as a prediction; this is a bug")
    return distances, predictions


def _vote(predictions: np.ndarray, distances: np.ndarray, top_n: int, weight: float) -> None:
    """Majority voting over the crops of one query (K, k), in place: a prediction found in the top `top_n` of
    several crops gets its distance lowered by weight * count / top_n there."""
    selected = slice(0, top_n)
    values, counts = np.unique(predictions[:, selected], return_counts=True)
    for value, count in zip(values[counts > 1], counts[counts > 1]):
        mask = predictions[:, selected] == value
        distances[:, selected][mask] -= weight * count / top_n


def merge_crop_predictions(
    distances: np.ndarray, predictions: np.ndarray, num_crops: int, k: int, test_method: str, majority_weight: float
) -> np.ndarray:
    """Merge the kNN of each query's crops into one ranking (the benchmark's nearest_crop and maj_voting).

    Args:
        distances, predictions: (Q * num_crops, k) from `search` on crop descriptors, query-major.
    Returns:
        predictions (Q, k): the crops' predictions sorted by distance, duplicates keeping their closest occurrence.
    """
    num_queries = distances.shape[0] // num_crops
    distances = distances.reshape(num_queries, num_crops, -1).copy()
    predictions = predictions.reshape(num_queries, num_crops, -1)
    merged = np.empty((num_queries, k), dtype=predictions.dtype)
    for query in range(num_queries):
        if test_method == "maj_voting":
            for top_n in (1, 5, 10):
                _vote(predictions[query], distances[query], top_n, majority_weight)
        order = np.argsort(distances[query].ravel(), kind="stable")
        ranked = predictions[query].ravel()[order]
        _, first = np.unique(ranked, return_index=True)
        unique_ranked = ranked[np.sort(first)]
        if len(unique_ranked) < k:  # fewer distinct predictions than asked: repeat the last to keep the shape
            unique_ranked = np.concatenate([unique_ranked, np.repeat(unique_ranked[-1:], k - len(unique_ranked))])
        merged[query] = unique_ranked[:k]
    return merged


def compute_recalls(
    predictions: np.ndarray, positives_per_query: Sequence[np.ndarray], recall_values: Sequence[int]
) -> np.ndarray:
    """Recall@N in percent (len(recall_values),): a query counts at N when one of its first N predictions is a
    positive. Queries without positives count as misses, as in the original."""
    hits = np.zeros(len(recall_values))
    for prediction, positives in zip(predictions, positives_per_query):
        for slot, n in enumerate(recall_values):
            if np.isin(prediction[:n], positives).any():
                hits[slot] += 1
    return hits / len(predictions) * 100


def recalls_to_str(recalls: np.ndarray, recall_values: Sequence[int]) -> str:
    """ "R@1: 81.2, R@5: 90.1" style."""
    return ", ".join(f"R@{n}: {value:.1f}" for n, value in zip(recall_values, recalls))


def rerank_predictions(
    homography_regression: nn.Module,
    store: LocalFeatureStore,
    query_indexes: Sequence[int],
    predictions: np.ndarray,
    num_reranked: int,
    batch_size: int,
    device: torch.device,
    amp: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Re-rank each query's top `num_reranked` predictions by the DHE inlier count.

    Args:
        store: local features of every image, at dataset indexes (database index = prediction value).
        query_indexes: (Q,) store indexes of the queries.
        predictions: (Q, k) database indexes.
    Returns:
        (reranked predictions (Q, k), scores (Q, num_reranked') of the reranked head), num_reranked' =
        min(num_reranked, k). Predictions beyond num_reranked' keep their order. Ties are ordered as the original
        (`argsort()[::-1]` of the scores).
    """
    from model.homography import rerank_scores

    num_reranked = min(num_reranked, predictions.shape[1])
    homography_regression.eval()
    reranked = predictions.copy()
    all_scores = np.zeros((len(query_indexes), num_reranked), dtype=np.float64)
    # Queries go in groups that fill a batch of pairs (one query when it has batch_size candidates or more), so
    # that memory holds at most max(batch_size, num_reranked) candidate maps.
    group = max(1, batch_size // num_reranked)
    with torch.inference_mode(), tqdm(total=len(query_indexes), desc="re-ranking", ncols=100, leave=False) as bar:
        for start in range(0, len(query_indexes), group):
            rows = slice(start, start + group)
            candidates = predictions[rows, :num_reranked]  # (G, K)
            local_queries = store.read(query_indexes[rows]).to(device).float()
            local_candidates = store.read(candidates.ravel().tolist()).to(device).float()
            local_candidates = local_candidates.view(*candidates.shape, *local_candidates.shape[1:])
            scores = rerank_scores(homography_regression, local_queries, local_candidates, batch_size, amp)
            scores = scores.double().cpu().numpy()
            order = scores.argsort(axis=1)[:, ::-1]
            reranked[rows, :num_reranked] = np.take_along_axis(candidates, order, axis=1)
            all_scores[rows] = np.take_along_axis(scores, order, axis=1)
            bar.update(len(candidates))
    return reranked, all_scores


def save_predictions(
    path: str | Path,
    queries_paths: Sequence[str],
    database_paths: Sequence[str],
    predictions: np.ndarray,
    distances: np.ndarray,
    reranked: np.ndarray,
    rerank_scores: np.ndarray,
) -> None:
    """Write every query's predictions before and after re-ranking to a CSV, atomically.

    Columns: query_index, query_path, stage ("global" or "reranked"), rank, database_index, database_path, score
    (squared L2 descriptor distance for "global", DHE inlier count for "reranked"; empty past the re-ranked head).
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        with open(temporary, "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["query_index", "query_path", "stage", "rank", "database_index", "database_path", "score"])
            for query, query_path in enumerate(queries_paths):
                for stage, ranking, scores in (
                    ("global", predictions[query], distances[query]),
                    ("reranked", reranked[query], rerank_scores[query]),
                ):
                    for rank, database_index in enumerate(ranking):
                        score = f"{scores[rank]:.6g}" if rank < len(scores) else ""
                        writer.writerow(
                            [query, query_path, stage, rank, int(database_index), database_paths[database_index], score]
                        )
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def save_results(
    path: str | Path,
    recall_values: Sequence[int],
    baseline: Sequence[float] | None,
    reranked: Sequence[float] | None,
    **extra: object,
) -> None:
    """Write `{"baseline": {"R@1": ..}, "reranked": {"R@1": ..}, **extra}` (recalls in percent) as JSON, atomically.

    A stage that was not computed is null. `extra` holds JSON-serialisable values (split, epoch, ...).
    """

    def as_dict(recalls: Sequence[float] | None) -> dict[str, float] | None:
        if recalls is None:
            return None
        return {f"R@{n}": round(float(value), 6) for n, value in zip(recall_values, recalls)}

    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    content = {"baseline": as_dict(baseline), "reranked": as_dict(reranked), **extra}
    try:
        temporary.write_text(json.dumps(content, indent=2) + "\n")
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise

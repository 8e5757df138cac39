"""Global retrieval: exact faiss search, merging the crops' rankings of a query, and Recall@N."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import faiss
import numpy as np


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


def log_recalls(
    prefix: str, predictions: np.ndarray, positives: Sequence[np.ndarray] | None, recall_values: Sequence[int]
) -> np.ndarray | None:
    """Recall@N (len(recall_values),) of `predictions` (Q, k) (None without labels), logged after `prefix`."""
    if positives is None:
        logging.info(f"{prefix}no labels (--no_labels): recalls not computed")
        return None
    recalls = compute_recalls(predictions, positives, recall_values)
    logging.info(f"{prefix}{recalls_to_str(recalls, recall_values)}")
    return recalls

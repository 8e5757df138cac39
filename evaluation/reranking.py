"""Re-ranking the global predictions by the DHE inlier count, passes of query-candidate pairs read from a
`LocalFeatureStore` (a reader thread prefetches the next pass)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from evaluation.local_features import LocalFeatureStore
from interrupts import raise_if_interrupted
from model.rerank import rerank_order, score_pairs


def rerank_predictions(
    homography_regression: nn.Module,
    store: LocalFeatureStore,
    query_indexes: Sequence[int],
    predictions: np.ndarray,
    num_reranked: int,
    batch_size: int,
    device: torch.device,
    amp: bool = False,
    prefetch: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Re-rank each query's top `num_reranked` predictions by the DHE inlier count.

    The (query, candidate) pairs of all queries, query-major, are scored `batch_size` at a time (the last pass
    may be shorter), so that queries fill each pass of the head whatever `num_reranked`. With `prefetch` a reader
    thread reads the next pass's local features from the store's file (into pinned memory on CUDA) while the
    head runs; memory holds the features of at most two passes beyond the store's in-memory part. The passes, and
    so the scores, do not depend on `prefetch` nor on which records the store keeps in memory.

    Args:
        store: local features of every image, at dataset indexes (database index = prediction value).
        query_indexes: (Q,) store indexes of the queries.
        predictions: (Q, k) database indexes.
        batch_size: pairs per pass of the head (`--rerank_batch_size`).
    Returns:
        (reranked predictions (Q, k), scores (Q, num_reranked') of the reranked head), num_reranked' =
        min(num_reranked, k). Predictions beyond num_reranked' keep their order. Ties are ordered as the original
        (`argsort()[::-1]` of the scores), except when every score of a query ties (e.g. all 0: a grid too small
        for 4 matches): that query keeps its global order, with a warning, instead of getting it reversed.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    num_reranked = min(num_reranked, predictions.shape[1])
    homography_regression.eval()
    candidates = predictions[:, :num_reranked]  # (Q, K)
    pair_queries = np.repeat(np.asarray(query_indexes, dtype=np.int64), num_reranked)  # (Q * K,) store indexes
    pair_candidates = candidates.reshape(-1).astype(np.int64)
    scores = score_candidate_pairs(
        homography_regression, store, pair_queries, pair_candidates, batch_size, device, amp, prefetch, num_reranked
    )
    return order_by_scores(predictions, scores.reshape(len(query_indexes), num_reranked))


def score_candidate_pairs(
    homography_regression: nn.Module,
    store: LocalFeatureStore,
    pair_queries: np.ndarray,
    pair_candidates: np.ndarray,
    batch_size: int,
    device: torch.device,
    amp: bool = False,
    prefetch: bool = True,
    pairs_per_query: int = 1,
) -> np.ndarray:
    """DHE inlier counts (P,) float64 of the pairs (pair_queries[i], pair_candidates[i]) (store indexes, (P,) each),
    `batch_size` pairs a pass; the progress bar counts queries of `pairs_per_query` consecutive pairs."""
    num_pairs = len(pair_queries)
    pin_memory = device.type == "cuda"

    def read(start: int) -> tuple[np.ndarray, np.ndarray, Tensor]:
        """The distinct records of the pass at `start` (queries and candidates), where each pair's query and
        candidate are among them, and the part of those records that is in the store's file."""
        stop = min(start + batch_size, num_pairs)
        records, inverse = np.unique(
            np.concatenate([pair_queries[start:stop], pair_candidates[start:stop]]), return_inverse=True
        )
        return records, inverse, store.read_file_part(records, pin_memory)

    scores = []
    with (
        torch.inference_mode(),
        ThreadPoolExecutor(1, thread_name_prefix="local-features") if prefetch else contextlib.nullcontext() as reader,
        tqdm(total=num_pairs // max(pairs_per_query, 1), desc="re-ranking", ncols=100, leave=False) as bar,
    ):
        pending = reader.submit(read, 0) if prefetch and num_pairs else None
        for start in range(0, num_pairs, batch_size):
            raise_if_interrupted()
            records, inverse, file_part = pending.result() if prefetch else read(start)
            if prefetch and start + batch_size < num_pairs:
                pending = reader.submit(read, start + batch_size)
            features = store.assemble(records, file_part, device)
            inverse = torch.from_numpy(inverse).to(device)
            num = len(inverse) // 2
            scores.append(score_pairs(homography_regression, features[inverse[:num]], features[inverse[num:]], amp))
            bar.n = (start + num) // pairs_per_query
            bar.refresh()
    return torch.cat(scores).double().cpu().numpy() if scores else np.zeros(0)


def order_by_scores(predictions: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Predictions (Q, k) with their first K re-ordered by `scores` (Q, K), best first, and the scores in that
    order (Q, K); a query whose scores all tie keeps its order (logged)."""
    num_reranked = scores.shape[1]
    reranked = predictions.copy()
    order, tied = rerank_order(scores)
    if tied.any() and num_reranked > 1:
        logging.warning(
            f"For {int(tied.sum())} of {len(scores)} queries every re-ranked candidate got the same score: "
            f"they keep their global order. Equal scores of 0 mean fewer than 4 mutual matches (a --resize grid too "
            f"small) or DHE head outputs that are not finite."
        )
    reranked[:, :num_reranked] = np.take_along_axis(predictions[:, :num_reranked], order, axis=1)
    return reranked, np.take_along_axis(scores, order, axis=1)

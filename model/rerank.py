"""DHE re-ranking: the one correlation -> head -> DLT chain (``predict_homographies``), the inlier score of a pass
of pairs (``score_pairs``), the batched driver over queries and candidates (``rerank_scores``) and the order of the
candidates (``rerank_order``)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from model.dhe import compute_similarity
from model.geometry import points_to_homography
from model.matching import inlier_scores
from model.precision import amp_autocast


def predict_homographies(
    homography_regression: nn.Module,
    query_features: Tensor,
    candidate_features: Tensor,
    amp: bool = False,
    dlt_weights: Tensor | None = None,
) -> Tensor:
    """The DHE homographies of B pairs: correlation -> head -> 4 point pairs -> DLT, the one chain that the
    re-ranking and both training losses run.

    The correlation and the DLT run in float32 whatever the autocast state; the head runs under `amp_autocast` with
    `amp`, and in the caller's autocast state, if any, without it.

    Args:
        homography_regression: the DHE head, (B, h*w, h, w) correlation -> (B, 8, 2) points.
        query_features: (B, C, h, w) float32 query local features of each pair.
        candidate_features: (B, C, h, w) float32 candidate local features.
        amp: run the head under `amp_autocast`.
        dlt_weights: optional (B, 4) weight of each of the four correspondences in the DLT, as
            `points_to_homography` takes them (``None``: all equal).

    Returns:
        (B, 3, 3) homographies from query pixels to candidate pixels (see `points_to_homography`), differentiable
        with respect to the head's parameters and the features.
    """
    device = candidate_features.device
    with torch.autocast(device.type, enabled=False):
        correlation = compute_similarity(query_features, candidate_features)
    with amp_autocast(device, amp):
        points = homography_regression(correlation)
    with torch.autocast(device.type, enabled=False):
        return points_to_homography(points, dlt_weights)


def score_pairs(
    homography_regression: nn.Module,
    query_features: Tensor,
    candidate_features: Tensor,
    amp: bool = False,
    image_hw: tuple[int, int] | None = None,
) -> Tensor:
    """One pass of the head over B pairs: correlation -> head -> DLT -> inlier counts (see `rerank_scores`).

    Args:
        query_features: (B, C, h, w) query local features of each pair (any float dtype; used in float32).
        candidate_features: (B, C, h, w) candidate local features.
        amp, image_hw: as in `rerank_scores`.

    Returns:
        (B,) float32 inlier counts, on the features' device.
    """
    with torch.inference_mode():
        candidate_features, query_features = candidate_features.float(), query_features.float()
        H = predict_homographies(homography_regression, query_features, candidate_features, amp)
        return inlier_scores(query_features, candidate_features, H, image_hw)


def rerank_scores(
    homography_regression: nn.Module,
    local_q: Tensor,
    local_candidates: Tensor,
    batch_size: int = 32,
    amp: bool = False,
    image_hw: tuple[int, int] | None = None,
) -> Tensor:
    """DHE re-ranking scores of queries against their candidates, ``batch_size`` pairs per pass.

    For each chunk of pairs: correlation (``compute_similarity``) -> head -> 4 point pairs -> DLT homography ->
    ``inlier_scores``, all batched. Runs under ``torch.inference_mode``; the head should be in eval mode.

    Args:
        homography_regression: the DHE head, (B, h*w, h, w) correlation -> (B, 8, 2) points.
        local_q: (C, h, w) local features of one query, or (Q, C, h, w) of Q queries.
        local_candidates: (K, C, h, w) features of its K candidates, or (Q, K, C, h, w).
        batch_size: pairs per pass of the head.
        amp: run the head under autocast (bfloat16 on CPU; on CUDA bfloat16 where supported, else float16);
            without it the head runs in the caller's autocast state. The correlation, the DLT and the matching
            stay in float32 either way.
        image_hw: (H, W) pixels of the resized images; defaults to the grid times ``PATCH_SIZE``.

    Returns:
        (K,) or (Q, K) float32 inlier counts (see ``inlier_scores``); a higher score ranks first.
    """
    single_query = local_q.dim() == 3
    if single_query:
        local_q, local_candidates = local_q.unsqueeze(0), local_candidates.unsqueeze(0)
    if local_q.dim() != 4 or local_candidates.dim() != 5 or local_candidates.shape[0] != local_q.shape[0]:
        raise ValueError(
            "expected local_q (C, h, w) with local_candidates (K, C, h, w), or (Q, C, h, w) with (Q, K, C, h, w); "
            f"got {tuple(local_q.shape)} and {tuple(local_candidates.shape)}"
        )
    if local_candidates.shape[2:] != local_q.shape[1:]:
        raise ValueError(
            f"query and candidate features differ: {tuple(local_q.shape)} vs {tuple(local_candidates.shape)}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    for name, features in (("local_q", local_q), ("local_candidates", local_candidates)):
        if features.is_floating_point() and not features.isfinite().all():
            raise ValueError(
                f"{name} holds non-finite values (NaN or infinite): no homography can be scored on them; check the "
                "images and the features extractor's weights"
            )
    num_queries, num_candidates = local_candidates.shape[:2]
    device = local_candidates.device
    if num_queries * num_candidates == 0:  # no candidate (or no query): nothing to score
        empty = torch.zeros(num_queries, num_candidates, dtype=torch.float32, device=device)
        return empty[0] if single_query else empty
    candidates = local_candidates.reshape(num_queries * num_candidates, *local_candidates.shape[2:])
    query_of_pair = torch.arange(num_queries, device=device).repeat_interleave(num_candidates)
    scores = []
    with torch.inference_mode():
        for start in range(0, candidates.shape[0], batch_size):
            pairs = slice(start, start + batch_size)
            scores.append(
                score_pairs(homography_regression, local_q[query_of_pair[pairs]], candidates[pairs], amp, image_hw)
            )
    scores = torch.cat(scores).view(num_queries, num_candidates)
    return scores[0] if single_query else scores


def rerank_order(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order (G, K) of the candidates by descending score (G, K), ties as the original's `argsort()[::-1]`, and
    which rows tie everywhere (G,) bool: those keep the global order (0 .. K-1) rather than a reversed one.

    Raises ValueError on a non-finite score, which no order could rank meaningfully.
    """
    if not np.isfinite(scores).all():
        raise ValueError(
            "the DHE re-ranking scores are not finite (NaN or infinite): check the --resume_hr weights, and try "
            "without --amp"
        )
    order = np.ascontiguousarray(scores.argsort(axis=1)[:, ::-1])
    tied = (scores == scores[:, :1]).all(axis=1)
    order[tied] = np.arange(scores.shape[1])
    return order, tied

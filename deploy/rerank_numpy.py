"""The re-ranking step outside the ONNX graphs in numpy alone, for a deployment without torch.

This file imports nothing but numpy, so that it can be copied beside the two .onnx files. It computes what
`deploy.onnx_export.rerank_from_points` computes with the torch functions of `eval.py` (`points_to_homography`,
`inlier_scores`, the tie ordering of `evaluation.reranking.rerank_predictions`); tests/test_onnx_export.py checks
that both give the same counts and orders. The conventions are those of `model.geometry`: one keypoint per
16 x 16 patch at its centre, positions row by row, homographies from query pixels to candidate pixels, inliers
within 48 px.
"""

from __future__ import annotations

import numpy as np

PATCH_SIZE = 16  # pixels per local feature of the CCT backbone (model.features_extractor.PATCH_SIZE)
SCORE_THRESHOLD = 3.0 * PATCH_SIZE  # inlier radius in pixels (model.matching.SCORE_THRESHOLD)
MIN_MATCHES = 4  # fewer mutual matches score 0 (model.matching.MIN_MATCHES)


def homographies_from_points(points: np.ndarray) -> np.ndarray:
    """(K, 8, 2) point pairs (rows 0-3 query pixels, 4-7 candidate pixels) -> (K, 3, 3) float64 homographies with
    H[2, 2] = 1, by the direct linear transform of the four correspondences (NaN where they are degenerate)."""
    points = np.asarray(points, dtype=np.float64)
    x, y = points[:, :4, 0], points[:, :4, 1]
    u, v = points[:, 4:, 0], points[:, 4:, 1]
    ones, zeros = np.ones_like(x), np.zeros_like(x)
    rows_u = np.stack([x, y, ones, zeros, zeros, zeros, -u * x, -u * y], axis=-1)  # (K, 4, 8)
    rows_v = np.stack([zeros, zeros, zeros, x, y, ones, -v * x, -v * y], axis=-1)
    system = np.concatenate([rows_u, rows_v], axis=1)  # (K, 8, 8)
    target = np.concatenate([u, v], axis=1)  # (K, 8)
    solution = np.full(target.shape, np.nan)
    solvable = np.abs(np.linalg.det(system)) > 1e-12
    solution[solvable] = np.linalg.solve(system[solvable], target[solvable][..., None])[..., 0]
    H = np.concatenate([solution, np.ones_like(solution[:, :1])], axis=1).reshape(-1, 3, 3)
    H[~solvable] = np.nan
    return H


def patch_keypoints(grid_hw: tuple[int, int], image_hw: tuple[int, int]) -> np.ndarray:
    """(h * w, 2) pixel centres (x, y) of the patches, row by row, as the original's `np.linspace(..., dtype=int)`."""
    (grid_h, grid_w), (image_h, image_w) = grid_hw, image_hw
    half = PATCH_SIZE // 2
    xs = np.linspace(half, image_w - half, grid_w, dtype=int)
    ys = np.linspace(half, image_h - half, grid_h, dtype=int)
    return np.stack([np.tile(xs, grid_h), np.repeat(ys, grid_w)], axis=1).astype(np.float64)


def inlier_counts(
    local_q: np.ndarray, local_c: np.ndarray, H: np.ndarray, image_hw: tuple[int, int] | None = None
) -> np.ndarray:
    """(K,) float32 counts of the mutual nearest neighbours that `H` (K, 3, 3) maps within 48 px.

    local_q: (1, C, h, w) or (K, C, h, w) query local features; local_c: (K, C, h, w) candidate ones.
    """
    local_q, local_c = np.asarray(local_q, dtype=np.float32), np.asarray(local_c, dtype=np.float32)
    grid_hw = local_c.shape[-2:]
    image_hw = image_hw or (grid_hw[0] * PATCH_SIZE, grid_hw[1] * PATCH_SIZE)
    flat_q = local_q.reshape(local_q.shape[0], local_q.shape[1], -1)  # (1 or K, C, L)
    flat_c = local_c.reshape(local_c.shape[0], local_c.shape[1], -1)  # (K, C, L)
    similarity = flat_c.transpose(0, 2, 1) @ flat_q  # (K, L candidate, L query)
    cand_idx = similarity.argmax(axis=1)  # best candidate position of each query position
    query_idx = similarity.argmax(axis=2)  # best query position of each candidate position
    valid = np.take_along_axis(query_idx, cand_idx, axis=1) == np.arange(similarity.shape[2])
    keypoints = patch_keypoints(grid_hw, image_hw)
    projected = np.concatenate([keypoints, np.ones_like(keypoints[:, :1])], axis=1) @ H.transpose(0, 2, 1)
    denominator = projected[..., 2:]
    denominator = np.where(denominator == 0, 1e-8, denominator)
    with np.errstate(invalid="ignore"):  # a NaN homography maps nothing within the radius
        distances = np.linalg.norm(projected[..., :2] / denominator - keypoints[cand_idx], axis=-1)
        counts = (valid & (distances < SCORE_THRESHOLD)).sum(axis=1)
    return np.where(valid.sum(axis=1) >= MIN_MATCHES, counts, 0).astype(np.float32)


def rerank_from_points(
    points: np.ndarray, local_q: np.ndarray, local_c: np.ndarray, image_hw: tuple[int, int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One query's K candidates re-ranked from dhe_head.onnx's points: (order (K,) best first, scores (K,)).

    points (K, 8, 2); local_q (C, h, w), (1, C, h, w) or (K, C, h, w); local_c (K, C, h, w) in the global order.
    Ties are ordered as eval.py (`argsort()[::-1]`), and a query whose scores all tie keeps its global order.
    """
    local_q = np.asarray(local_q)
    local_q = local_q[None] if local_q.ndim == 3 else local_q
    scores = inlier_counts(local_q, local_c, homographies_from_points(points), image_hw)
    if (scores == scores[0]).all():
        return np.arange(len(scores)), scores
    # float64, as eval.py sorts them: numpy may pick another sorting kernel (so another order of ties) per dtype
    return np.ascontiguousarray(scores.astype(np.float64).argsort()[::-1]), scores

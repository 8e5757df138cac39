"""Matching and scores of DHE: mutual nearest-neighbour matches, the test-time inlier score and the training loss
(REI), all batched over pairs.

Pairs have different numbers of mutual matches, so matches are kept in fixed-shape tensors, one slot per query
position, with a validity mask: there is no Python loop over pairs and no host-device synchronisation per pair
(the REI loss's RANSAC synchronises a few times per round of hypotheses). Keypoints and homographies follow the
conventions of ``model.geometry``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from model.features_extractor import PATCH_SIZE
from model.geometry import MIN_CORRESPONDENCES, keypoints, reprojection_distances
from model.ransac import RANSAC_THRESHOLD, find_homography_ransac

SCORE_THRESHOLD = 3.0 * PATCH_SIZE
"""The test-time inlier radius of the original: 3 patches, 48 px."""
MIN_MATCHES = MIN_CORRESPONDENCES
"""A pair with fewer mutual matches (than a homography needs) scores 0 and contributes 0 to the loss, as in the
original."""
REI_INLIER_COUNTS = ("minimal", "refined")
"""How the REI loss counts RANSAC's inliers k: the best minimal model's (OpenCV 3.4.x, the original's) or those
recounted under the refitted model (OpenCV 4.11+); see docs/ransac.md."""


def mutual_nearest_neighbours(local_q: Tensor, local_c: Tensor) -> tuple[Tensor, Tensor]:
    """Mutual nearest neighbours of two local feature maps by dot product.

    For each query position j the best candidate position is ``cand_idx[:, j]`` (argmax of the dot products, the
    first one on ties); the match is kept (``valid``) when that candidate's best query position is j. The dot
    products are computed in at least float32 whatever the autocast state, so that the arg-maxes, whose margins
    are often below 1e-3, do not depend on it.

    Args:
        local_q: (B, C, h, w) query features, or (1, C, h, w) for one query against B candidates.
        local_c: (B, C, h, w) candidate features.

    Returns:
        cand_idx: (B, h * w) int64, the best candidate position of each query position;
        valid: (B, h * w) bool, whether that match is mutual.
    """
    _check_feature_maps(local_q, local_c)
    dtype = torch.promote_types(torch.promote_types(local_q.dtype, local_c.dtype), torch.float32)
    with torch.autocast(local_c.device.type, enabled=False):
        # (B, l_c, l_q): the original's M = fm2 @ fm1.T
        similarity = local_c.flatten(2).transpose(1, 2).to(dtype) @ local_q.flatten(2).to(dtype)
    cand_idx = similarity.argmax(dim=1)  # best candidate position of each query position
    query_idx = similarity.argmax(dim=2)  # best query position of each candidate position
    positions = torch.arange(similarity.shape[2], device=similarity.device)
    valid = query_idx.gather(1, cand_idx) == positions
    return cand_idx, valid


def matched_keypoints(
    local_q: Tensor, local_c: Tensor, image_hw: tuple[int, int] | None = None, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor, Tensor]:
    """Pixel coordinates of the mutual nearest neighbours of two local feature maps.

    Args:
        local_q: (B, C, h, w) or (1, C, h, w) query features.
        local_c: (B, C, h, w) candidate features.
        image_hw: (H, W) pixels of the resized images; defaults to the grid times ``PATCH_SIZE``.
        dtype: floating dtype of the coordinates.

    Returns:
        query_points: (1, h * w, 2) keypoint of every query position (the same for every pair);
        cand_points: (B, h * w, 2) keypoint of the best candidate position of each query position;
        valid: (B, h * w) bool, which of them are mutual matches.
    """
    cand_idx, valid = mutual_nearest_neighbours(local_q, local_c)
    kps = keypoints(tuple(local_c.shape[-2:]), image_hw, device=local_c.device, dtype=dtype)
    return kps.unsqueeze(0), kps[cand_idx], valid


def inlier_scores(
    local_q: Tensor,
    local_c: Tensor,
    H: Tensor,
    image_hw: tuple[int, int] | None = None,
    threshold: float = SCORE_THRESHOLD,
) -> Tensor:
    """Test-time score of DHE: how many mutual matches the homography ``H`` maps within ``threshold`` pixels.

    Mutually nearest query and candidate keypoints are matched; each query keypoint is projected with ``H``
    and counts when its distance to the matched candidate keypoint is below ``threshold`` (48 px, 3 patches).
    A pair with fewer than ``MIN_MATCHES`` mutual matches scores 0, as in the original.

    Args:
        local_q: (B, C, h, w) query features, or (1, C, h, w) for one query against B candidates.
        local_c: (B, C, h, w) candidate features.
        H: (B, 3, 3) homographies from query pixels to candidate pixels.
        image_hw: (H, W) pixels of the resized images; defaults to the grid times ``PATCH_SIZE``.
        threshold: inlier radius in pixels.

    Returns:
        (B,) inlier counts as floats (integer values; dtype of ``H`` promoted to at least float32, so that
        counts stay exact under autocast). Not differentiable.
    """
    _check_homographies(H, local_c.shape[0])
    dtype = torch.promote_types(H.dtype, torch.float32)
    query_points, cand_points, valid = matched_keypoints(local_q, local_c, image_hw, dtype)
    distances = reprojection_distances(H.detach(), query_points, cand_points)
    counts = (valid & (distances < threshold)).sum(dim=1)
    enough = valid.sum(dim=1) >= MIN_MATCHES
    return torch.where(enough, counts, torch.zeros_like(counts)).to(dtype)


def rei_loss(
    local_q: Tensor,
    local_c: Tensor,
    H: Tensor,
    image_hw: tuple[int, int] | None = None,
    seed: int = 0,
    generator: torch.Generator | None = None,
    ransac_threshold: float = RANSAC_THRESHOLD,
    max_iters: int = 2000,
    confidence: float = 0.995,
    inliers: str = "minimal",
) -> Tensor:
    """Training loss of DHE (re-projection error of inliers, REI) for each pair.

    A homography is fitted to the pair's mutual matches (query keypoint -> candidate keypoint) by RANSAC at
    ``ransac_threshold`` pixels (see ``find_homography_ransac``, which follows ``cv2.findHomography(RANSAC)``);
    k is its number of inliers, counted as ``inliers`` says: ``"minimal"`` (default) those of the best minimal
    (4-point) model, the mask that OpenCV 3.4.x returns and the original (OpenCV 3.4.13) trained with;
    ``"refined"`` those recounted under the refitted model, as OpenCV 4.11 and later. The loss of the pair is the
    mean of the k smallest reprojection distances of the matches under the predicted ``H``. A pair with fewer than
    ``MIN_MATCHES`` matches, or where RANSAC finds no model or k = 0, contributes 0.

    The loss of a pair is a function of that pair's inputs and ``seed`` alone: RANSAC draws every pair's samples
    from the same counter-based stream of ``seed``, as OpenCV re-seeds its RNG at every call, so a pair gets the
    same k whatever else is in the batch, in whatever order, and whatever the state of torch's global RNG.

    Args:
        local_q: (B, C, h, w) query features, or (1, C, h, w) for one query against B candidates.
        local_c: (B, C, h, w) candidate features.
        H: (B, 3, 3) predicted homographies from query pixels to candidate pixels.
        image_hw: (H, W) pixels of the resized images; defaults to the grid times ``PATCH_SIZE``.
        seed: seed of RANSAC's sample stream (see ``find_homography_ransac``).
        generator: if given, the seed is drawn from it instead (one draw per call), for other samples each call.
        ransac_threshold: RANSAC's inlier threshold in pixels.
        max_iters: RANSAC's maximum number of hypotheses per pair (OpenCV's default, 2000).
        confidence: RANSAC's confidence for stopping early (OpenCV's default, 0.995).
        inliers: "minimal" or "refined", how k is counted (see above and docs/ransac.md).

    Returns:
        (B,) losses in the dtype of ``H`` promoted to at least float32, differentiable with respect to ``H``.
    """
    if inliers not in REI_INLIER_COUNTS:
        raise ValueError(f"inliers {inliers!r}: expected one of {', '.join(REI_INLIER_COUNTS)}")
    _check_homographies(H, local_c.shape[0])
    dtype = torch.promote_types(H.dtype, torch.float32)
    query_points, cand_points, valid = matched_keypoints(local_q, local_c, image_hw, dtype)
    distances = reprojection_distances(H, query_points, cand_points)
    src = query_points.expand_as(cand_points)
    # Without the refit, the mask is the best minimal model's: OpenCV 3.4's mask (its refit changes H, not the mask).
    _, inlier_mask, found = find_homography_ransac(
        src,
        cand_points,
        valid,
        ransac_threshold,
        max_iters,
        confidence,
        seed=seed,
        generator=generator,
        refine=inliers == "refined",
    )
    num_inliers = inlier_mask.sum(dim=1)
    # Mean of the k smallest distances of the valid matches, with k varying across pairs.
    sorted_distances = torch.where(valid, distances, torch.full_like(distances, math.inf)).sort(dim=1).values
    ranks = torch.arange(distances.shape[1], device=distances.device)
    kept = ranks < num_inliers.unsqueeze(1)
    loss = torch.where(kept, sorted_distances, torch.zeros_like(sorted_distances)).sum(dim=1)
    loss = loss / num_inliers.clamp_min(1).to(dtype)
    counts = found & (num_inliers > 0) & (valid.sum(dim=1) >= MIN_MATCHES)
    return torch.where(counts, loss, torch.zeros_like(loss))


def _check_feature_maps(local_q: Tensor, local_c: Tensor) -> None:
    if local_q.dim() != 4 or local_c.dim() != 4:
        raise ValueError(f"local features must be (B, C, h, w), got {tuple(local_q.shape)} and {tuple(local_c.shape)}")
    if local_q.shape[1:] != local_c.shape[1:]:
        raise ValueError(f"query and candidate features differ: {tuple(local_q.shape)} vs {tuple(local_c.shape)}")
    if local_q.shape[0] not in (1, local_c.shape[0]):
        raise ValueError(f"query batch {local_q.shape[0]} must be 1 or the candidates' {local_c.shape[0]}")


def _check_homographies(H: Tensor, batch: int) -> None:
    if H.shape != (batch, 3, 3):
        raise ValueError(f"H must have shape ({batch}, 3, 3), got {tuple(H.shape)}")

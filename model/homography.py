"""Geometry of DHE: patch keypoints, the homography of the regressed corners, mutual nearest-neighbour matches,
the test-time inlier score and the training loss (REI), with a batched RANSAC for the loss.

Every function works on a batch of pairs at once. Pairs have different numbers of mutual matches, so matches are
kept in fixed-shape tensors, one slot per query position, with a validity mask: there is no Python loop over pairs
and no host-device synchronisation per pair (the RANSAC synchronises a few times per round of hypotheses).

Conventions, as in the original DHE-VPR:
- a local feature map has one position per 16x16 patch, numbered row by row (index = row * w + col), and its
  keypoint is the patch centre in pixels of the resized image, (x, y);
- a homography ``H`` (B, 3, 3) maps query pixels to candidate pixels;
- distances are Euclidean reprojection errors in pixels of the forward map (query -> candidate).
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
from kornia.geometry.homography import find_homography_dlt
from torch import Tensor, nn

from model.dhe import PATCH_SIZE, compute_similarity

SCORE_THRESHOLD = 3.0 * PATCH_SIZE
"""The test-time inlier radius of the original: 3 patches, 48 px."""
RANSAC_THRESHOLD = 1.5 * PATCH_SIZE
"""The reprojection threshold of the original's RANSAC (``cv2.findHomography``) in the REI loss: 24 px."""
MIN_MATCHES = 4
"""A pair with fewer mutual matches scores 0 and contributes 0 to the loss, as in the original."""
REI_INLIER_COUNTS = ("minimal", "refined")
"""How the REI loss counts RANSAC's inliers k: the best minimal model's (OpenCV 3.4.x, the original's) or those
recounted under the refitted model (OpenCV 4.11+); see docs/ransac.md."""

_ZERO_DENOMINATOR = 1e-8  # the original replaced a zero homogeneous coordinate by this


def keypoints(
    grid_hw: tuple[int, int],
    image_hw: tuple[int, int] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Pixel coordinates of the patch centres of a feature map.

    As the original: ``x = linspace(8, W - 8, w)`` and ``y = linspace(8, H - 8, h)`` cast to integers the way
    ``numpy.linspace(..., dtype=int)`` does (its float64 values rounded down, the last one exactly the end point).

    Args:
        grid_hw: (h, w), the feature map's size.
        image_hw: (H, W), the resized image's size in pixels; defaults to the grid times ``PATCH_SIZE``.
        device: where to allocate the result.
        dtype: its floating dtype (the values are integers).

    Returns:
        (h * w, 2) keypoints (x, y); position ``row * w + col`` is the patch at that row and column.
    """
    grid_h, grid_w = grid_hw
    if grid_h < 1 or grid_w < 1:
        raise ValueError(f"grid_hw must be positive, got {grid_hw}")
    image_h, image_w = image_hw if image_hw is not None else (grid_h * PATCH_SIZE, grid_w * PATCH_SIZE)
    half = PATCH_SIZE // 2
    xs = _numpy_int_linspace(half, image_w - half, grid_w, device)
    ys = _numpy_int_linspace(half, image_h - half, grid_h, device)
    return torch.stack([xs.repeat(grid_h), ys.repeat_interleave(grid_w)], dim=1).to(dtype)


def _numpy_int_linspace(start: int, stop: int, num: int, device: torch.device | str | None) -> Tensor:
    """``numpy.linspace(start, stop, num, dtype=int)`` as float64 values."""
    if num == 1:
        return torch.full((1,), float(start), dtype=torch.float64, device=device)
    values = torch.arange(num, dtype=torch.float64, device=device) * ((stop - start) / (num - 1)) + start
    values[-1] = stop
    return values.floor()


def points_to_homography(points: Tensor, weights: Tensor | None = None) -> Tensor:
    """The homography of the four point pairs that the DHE head regresses, by (weighted) DLT.

    Args:
        points: (B, 8, 2) pixels (x, y); rows 0-3 are in the query, rows 4-7 the matching points in the candidate.
        weights: optional (B, 4) weight of each correspondence (``None``: all equal).

    Returns:
        (B, 3, 3) homographies mapping query pixels to candidate pixels, scaled so that ``H[2, 2] = 1``, in the
        dtype of ``points`` promoted to at least float32; differentiable with respect to ``points``. NaN for a
        degenerate configuration (see kornia's ``find_homography_dlt``). With four correspondences the fit is
        exact, so ``weights`` change it only by rounding.
    """
    if points.dim() != 3 or points.shape[1:] != (8, 2):
        raise ValueError(f"points must have shape (B, 8, 2), got {tuple(points.shape)}")
    if weights is not None and weights.shape != (points.shape[0], 4):
        raise ValueError(f"weights must have shape ({points.shape[0]}, 4), got {tuple(weights.shape)}")
    # A head run under autocast gives half-precision points: the DLT needs at least float32.
    points = points.to(torch.promote_types(points.dtype, torch.float32))
    return find_homography_dlt(points[:, :4], points[:, 4:], weights)


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


def reprojection_distances(H: Tensor, src: Tensor, dst: Tensor) -> Tensor:
    """Euclidean distance between ``H`` applied to ``src`` and ``dst``, as the original computed it.

    A zero homogeneous coordinate is replaced by 1e-8, as in the original.

    Args:
        H: (B, 3, 3) homographies.
        src: (B, N, 2) or (1, N, 2) points (x, y) mapped by H.
        dst: (B, N, 2) points (x, y) to compare with.

    Returns:
        (B, N) distances in the dtype of ``H`` promoted to at least float32; differentiable with respect to H.
    """
    dtype = torch.promote_types(H.dtype, torch.float32)
    src, dst = src.to(dtype), dst.to(dtype)
    projected = torch.cat([src, torch.ones_like(src[..., :1])], dim=-1) @ H.to(dtype).transpose(-1, -2)
    denominator = projected[..., 2:]
    denominator = torch.where(denominator == 0, torch.full_like(denominator, _ZERO_DENOMINATOR), denominator)
    return torch.linalg.vector_norm(projected[..., :2] / denominator - dst, dim=-1)


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


def amp_dtype(device: torch.device) -> torch.dtype:
    """The half precision of ``--amp`` on ``device``: bfloat16 on CPU and on GPUs that support it, else float16."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def amp_autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """``torch.autocast`` in ``amp_dtype(device)`` when enabled, else a context that changes nothing (the caller's
    autocast state, if any, applies)."""
    return torch.autocast(device.type, dtype=amp_dtype(device)) if enabled else contextlib.nullcontext()


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


def predict_homographies(
    homography_regression: nn.Module,
    query_features: Tensor,
    candidate_features: Tensor,
    amp: bool = False,
    dlt_weights: Tensor | None = None,
) -> Tensor:
    """The DHE homographies of B pairs: correlation (float32) -> head -> 4 point pairs -> DLT (float32).

    Args:
        homography_regression: the DHE head, (B, h*w, h, w) correlation -> (B, 8, 2) points.
        query_features: (B, C, h, w) float32 query local features of each pair.
        candidate_features: (B, C, h, w) float32 candidate local features.
        amp: run the head under `amp_autocast`; without it the caller's autocast state, if any, applies.
        dlt_weights: optional (B, 4) weight of each correspondence in the DLT (the training losses' random ones).

    Returns:
        (B, 3, 3) homographies from query pixels to candidate pixels (see `points_to_homography`).
    """
    device = candidate_features.device
    with torch.autocast(device.type, enabled=False):
        correlation = compute_similarity(query_features, candidate_features)
    with amp_autocast(device, amp):
        points = homography_regression(correlation)
    with torch.autocast(device.type, enabled=False):
        return points_to_homography(points, dlt_weights)


def find_homography_ransac(
    src: Tensor,
    dst: Tensor,
    valid: Tensor | None = None,
    threshold: float = RANSAC_THRESHOLD,
    max_iters: int = 2000,
    confidence: float = 0.995,
    seed: int = 0,
    generator: torch.Generator | None = None,
    refine: bool = True,
    max_chunk_elements: int = 1 << 22,
) -> tuple[Tensor, Tensor, Tensor]:
    """RANSAC homographies for a batch of point sets of different sizes, all pairs at once.

    It follows OpenCV's ``findHomography(src, dst, RANSAC, threshold)`` (4.11+; its inliers are those of 3.4.x
    without ``refine``): minimal samples of four distinct valid points, rejected when a triple is collinear or the
    orientations of the triples disagree between the two images (a mirror image is allowed); a model's inliers are
    the points whose squared forward reprojection error is at most ``threshold ** 2``; a model replaces the best one
    when it has more inliers (and more than 3); the number of hypotheses shrinks with the best inlier ratio to reach
    ``confidence``, up to ``max_iters``; with ``refine`` the best model is refitted on its inliers (OpenCV's
    normalised DLT, then 10 Levenberg-Marquardt iterations) and its inliers are counted again. A set of exactly four
    points is fitted directly, all four being inliers.

    Samples are drawn for every unfinished pair at once, in chunks of about ``max_chunk_elements``
    point-hypothesis pairs, solved by kornia's batched 4-point DLT, and scored at once; a pair stops as OpenCV's
    loop would after the same sequence of hypotheses. Rejected samples do not count as hypotheses; a pair stops
    after ``10 * max_iters`` draws at most. Pairs are grouped by size (powers of two) so that small sets are not
    padded to the largest one.

    The i-th sample of every pair comes from the same counter-based stream of ``seed`` (a hash of the seed and
    the counter, like OpenCV re-seeding its RNG at every call), and inliers are counted with elementwise
    arithmetic, which rounds the same whatever the shapes: a pair's result depends on its points and the seed
    alone, not on the other pairs of the batch, their order, the chunk sizes or torch's global RNG.

    Args:
        src: (B, N, 2) points (x, y) in the first image.
        dst: (B, N, 2) matching points in the second image.
        valid: (B, N) bool, which points take part (``None``: all).
        threshold: inlier threshold in pixels.
        max_iters: maximum number of hypotheses per pair.
        confidence: probability of having drawn an all-inlier sample that stops the search early; 1 disables it.
        seed: seed of the sample stream (any integer; reduced to 64 bits).
        generator: if given, the seed is drawn from it instead (one draw per call).
        refine: refit the best model on its inliers and recount them (OpenCV 4.11+). Without it, H is the best
            minimal model and the inliers are its own: the mask of OpenCV 3.4.x, which refits H but not the mask.
        max_chunk_elements: bound on samples x points scored at once (the default peaks at about 70 MB).

    Returns:
        H: (B, 3, 3) float32 homographies from ``src`` to ``dst``, NaN where no model was found;
        inliers: (B, N) bool inliers of ``H`` among the valid points;
        found: (B,) bool, whether a model was found (at least 4 valid points and a model with 4 or more inliers).
    """
    if src.dim() != 3 or src.shape[-1] != 2 or src.shape != dst.shape:
        raise ValueError(f"src and dst must have the same shape (B, N, 2), got {tuple(src.shape)}, {tuple(dst.shape)}")
    batch, num_points = src.shape[:2]
    if valid is None:
        valid = torch.ones(batch, num_points, dtype=torch.bool, device=src.device)
    if valid.shape != (batch, num_points):
        raise ValueError(f"valid must have shape ({batch}, {num_points}), got {tuple(valid.shape)}")
    if not 0 < confidence <= 1:
        raise ValueError(f"confidence must be in (0, 1], got {confidence}")

    if generator is not None:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    key = _stream_key(seed)
    max_draws = 10 * max_iters  # OpenCV gives up after 10000 rejected samples in a row; this bounds all the draws

    with torch.no_grad(), torch.autocast(src.device.type, enabled=False):
        threshold_sq = float(threshold) ** 2
        num_valid = valid.sum(dim=1)
        # Compact each pair's valid points to the front, in their order, and drop the columns that no pair needs.
        order = torch.argsort((~valid).to(torch.uint8), dim=1, stable=True)
        width = int(num_valid.max()) if batch else 0
        order = order[:, :width]
        src = src.detach().float().gather(1, order.unsqueeze(-1).expand(-1, -1, 2))
        dst = dst.detach().float().gather(1, order.unsqueeze(-1).expand(-1, -1, 2))
        valid = torch.arange(width, device=src.device) < num_valid.unsqueeze(1)

        best_H = src.new_full((batch, 3, 3), math.nan)
        best_count = torch.zeros_like(num_valid)
        hypotheses_done = torch.zeros_like(num_valid)
        draws_done = torch.zeros_like(num_valid)
        active = num_valid > MIN_MATCHES
        chunk = 16  # grows: most pairs of a good match set stop after a few hypotheses
        while True:
            pair_idx = active.nonzero().squeeze(1)  # a few synchronisations per round of chunks, none per pair
            if pair_idx.numel() == 0:
                break
            # Pairs of similar sizes together (powers of two), so that small sets are not padded to large ones.
            size_class = torch.log2(num_valid[pair_idx].double()).floor().long()
            for size_log2 in size_class.unique().tolist():
                group = pair_idx[size_class == size_log2]
                group_width = min(2 ** (size_log2 + 1) - 1, width)
                group_chunk = min(chunk, max(1, max_chunk_elements // (group.numel() * group_width)))
                state = _ransac_chunk(
                    src[group, :group_width],
                    dst[group, :group_width],
                    valid[group, :group_width],
                    num_valid[group],
                    best_H[group],
                    best_count[group],
                    hypotheses_done[group],
                    draws_done[group],
                    group_chunk,
                    threshold_sq,
                    max_iters,
                    max_draws,
                    confidence,
                    key,
                )
                best_H[group], best_count[group], hypotheses_done[group], stopped = state
                draws_done[group] += group_chunk
                active[group] = ~stopped & (draws_done[group] < max_draws)
            chunk = min(4 * chunk, max_iters)

        found = best_count >= MIN_MATCHES
        # OpenCV fits exactly four points directly, without RANSAC nor refit.
        four = num_valid == MIN_MATCHES
        if bool(four.any()):
            H_four = find_homography_dlt(src[:, :MIN_MATCHES], dst[:, :MIN_MATCHES])
            four_ok = four & H_four.flatten(1).isfinite().all(dim=1)
            best_H = torch.where(four_ok[:, None, None], H_four, best_H)
            found = found | four_ok
        inliers = valid & (_squared_transfer_errors(best_H.unsqueeze(1), src, dst).squeeze(1) <= threshold_sq)
        if refine:
            refit = found & (num_valid > MIN_MATCHES)
            weights = (inliers & refit.unsqueeze(1)).float()
            H_refit, solved = _least_squares_dlt(src, dst, weights)
            # Where the least-squares fit fails OpenCV keeps the RANSAC model, and refines it all the same.
            H_refit = torch.where(solved[:, None, None], H_refit, best_H.double())
            H_refit = torch.where(refit[:, None, None], H_refit, torch.eye(3, dtype=H_refit.dtype, device=src.device))
            H_refit = _refine_levenberg_marquardt(H_refit, src, dst, weights).float()
            refit = refit & H_refit.flatten(1).isfinite().all(dim=1)
            best_H = torch.where(refit[:, None, None], H_refit, best_H)
            recount = _squared_transfer_errors(best_H.unsqueeze(1), src, dst).squeeze(1) <= threshold_sq
            inliers = torch.where(refit.unsqueeze(1), valid & recount, inliers)
        inliers = inliers & found.unsqueeze(1)
        # Back to the input's positions.
        inliers = torch.zeros(batch, num_points, dtype=torch.bool, device=src.device).scatter(1, order, inliers)
        best_H = torch.where(found[:, None, None], best_H, torch.full_like(best_H, math.nan))
    return best_H, inliers, found


def _ransac_chunk(
    src: Tensor,
    dst: Tensor,
    valid: Tensor,
    num_valid: Tensor,
    best_H: Tensor,
    best_count: Tensor,
    hypotheses_done: Tensor,
    draws_done: Tensor,
    chunk: int,
    threshold_sq: float,
    max_iters: int,
    max_draws: int,
    confidence: float,
    key: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Draw and score ``chunk`` hypotheses for each of A pairs and update their state as OpenCV's loop would.

    Shapes: src, dst (A, N, 2) with each pair's num_valid valid points first, as valid (A, N) says; num_valid,
    best_count, hypotheses_done, draws_done (A,); best_H (A, 3, 3). A pair's draws are numbered from draws_done
    on, and draws numbered ``max_draws`` or more are not used.
    Returns the updated best_H, best_count, hypotheses_done and whether each pair has stopped.
    """
    pairs = src.shape[0]
    draw_number = draws_done.unsqueeze(1) + torch.arange(chunk, device=src.device)  # (A, T)
    positions = _sample_distinct(num_valid, draw_number, key)  # (A, T, 4) among the valid points
    sample_idx = positions.view(pairs, chunk * MIN_MATCHES, 1).expand(-1, -1, 2)
    src_sample = src.gather(1, sample_idx).view(pairs * chunk, MIN_MATCHES, 2)
    dst_sample = dst.gather(1, sample_idx).view(pairs * chunk, MIN_MATCHES, 2)
    good_sample = _sample_is_valid(src_sample, dst_sample) & (draw_number < max_draws).flatten()
    # Only the accepted samples are solved and scored (with many outliers most samples are rejected).
    good = good_sample.nonzero().squeeze(1)
    hypotheses = src.new_full((pairs * chunk, 3, 3), math.nan)
    counts = torch.full((pairs * chunk,), -1, dtype=torch.long, device=src.device)  # rejected samples never win
    if good.numel() > 0:
        pair_of_sample = torch.div(good, chunk, rounding_mode="floor")
        solved = find_homography_dlt(src_sample[good], dst_sample[good])
        errors_sq = _squared_transfer_errors(solved.unsqueeze(1), src[pair_of_sample], dst[pair_of_sample])
        counts[good] = ((errors_sq.squeeze(1) <= threshold_sq) & valid[pair_of_sample]).sum(dim=1)
        hypotheses[good] = solved
    good_sample, counts = good_sample.view(pairs, chunk), counts.view(pairs, chunk)
    hypotheses = hypotheses.view(pairs, chunk, 3, 3)

    # Sequence semantics of OpenCV's loop: hypothesis t is the i-th accepted sample; after it the loop runs while
    # i + 1 < niters, where niters shrinks with the best inlier count so far.
    iteration = hypotheses_done.unsqueeze(1) + good_sample.cumsum(dim=1) - 1
    running_best = torch.maximum(counts.cummax(dim=1).values, best_count.unsqueeze(1))
    niters = _ransac_num_iters(running_best, num_valid.unsqueeze(1), confidence, max_iters)
    stop = good_sample & (iteration + 1 >= niters)
    stopped = stop.any(dim=1)
    last = torch.where(stopped, stop.to(torch.uint8).argmax(dim=1), torch.full_like(num_valid, chunk - 1))
    considered = torch.arange(chunk, device=src.device).unsqueeze(0) <= last.unsqueeze(1)
    counts = torch.where(considered, counts, torch.full_like(counts, -1))
    chunk_best = counts.amax(dim=1)
    # The first hypothesis with the most inliers, as in OpenCV's sequence.
    chunk_arg = (counts == chunk_best.unsqueeze(1)).to(torch.uint8).argmax(dim=1)
    # OpenCV keeps a model only with more inliers than the best so far and than 3.
    better = chunk_best > best_count.clamp_min(MIN_MATCHES - 1)
    chunk_H = hypotheses[torch.arange(pairs, device=src.device), chunk_arg]
    best_H = torch.where(better[:, None, None], chunk_H, best_H)
    best_count = torch.where(better, chunk_best, best_count)
    hypotheses_done = hypotheses_done + (good_sample & considered).sum(dim=1)
    return best_H, best_count, hypotheses_done, stopped


_MASK32 = 0xFFFFFFFF
_GOLDEN32 = 0x9E3779B9


def _mix32(x):
    """A 32-bit integer hash (xor-shift-multiply rounds) of ints in [0, 2**32): Python ints or int64 tensors.

    The multipliers are below 2**31, so every product stays below 2**63 and int64 never overflows.
    """
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & _MASK32
    return x ^ (x >> 16)


def _stream_key(seed: int) -> int:
    """The 32-bit key of a sample stream, from any integer seed (reduced to 64 bits)."""
    seed = int(seed) % 2**64
    return _mix32(seed & _MASK32 ^ _mix32((seed >> 32) ^ _GOLDEN32))


def _counter_uniform(key: int, counter: Tensor) -> Tensor:
    """Uniform float64 numbers in (0, 1), a function of the key and each int64 counter (< 2**31) alone."""
    bits = _mix32(_mix32((counter * _GOLDEN32 + key) & _MASK32) ^ key)
    return (bits.double() + 0.5) / 2.0**32


def _sample_distinct(num_valid: Tensor, draw_number: Tensor, key: int) -> Tensor:
    """(A, T, 4) sorted distinct positions in [0, num_valid) for each of A pairs, T draws each.

    Draw ``draw_number[a, t]`` of any pair uses the uniforms of counters ``4 * draw_number + i`` of the stream
    ``key``, so a pair's samples depend on its number of points and the stream alone.
    """
    counters = draw_number.unsqueeze(-1) * MIN_MATCHES + torch.arange(MIN_MATCHES, device=draw_number.device)
    uniform = _counter_uniform(key, counters)
    upper = num_valid.view(-1, 1)
    chosen = uniform.new_empty((*draw_number.shape, 0), dtype=torch.long)
    for i in range(MIN_MATCHES):
        # Uniform among the n - i positions left, then skip over those already chosen (in increasing order).
        position = torch.minimum((uniform[..., i] * (upper - i)).long(), (upper - 1 - i).clamp_min(0))
        for j in range(i):
            position = position + (position >= chosen[..., j]).long()
        chosen = torch.cat([chosen, position.unsqueeze(-1)], dim=-1).sort(dim=-1).values
    return chosen


def _sample_is_valid(src: Tensor, dst: Tensor) -> Tensor:
    """OpenCV's test of a minimal sample (M, 4, 2) x 2 -> (M,) bool.

    No triple may be collinear (up to float32 rounding) in either image, and the four triples must keep their
    orientation across the images, or all flip it.
    """
    triples = ((0, 1, 2), (1, 2, 3), (0, 2, 3), (0, 1, 3))
    a, b, c = (torch.stack([src[:, t[i]] for t in triples], dim=1) for i in range(3))
    area_src, spread_src = _signed_area(a, b, c)
    a, b, c = (torch.stack([dst[:, t[i]] for t in triples], dim=1) for i in range(3))
    area_dst, spread_dst = _signed_area(a, b, c)
    eps = torch.finfo(torch.float32).eps
    not_collinear = (area_src.abs() > eps * spread_src) & (area_dst.abs() > eps * spread_dst)
    product = area_src * area_dst
    same_orientation = (product > 0).all(dim=1) | (product < 0).all(dim=1)
    return not_collinear.all(dim=1) & same_orientation


def _signed_area(a: Tensor, b: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """Twice the signed area of triangles (..., 2) and the sum of the absolute edge components it comes from."""
    ab, ac = b - a, c - a
    area = ab[..., 0] * ac[..., 1] - ab[..., 1] * ac[..., 0]
    return area, ab.abs().sum(dim=-1) + ac.abs().sum(dim=-1)


def _squared_transfer_errors(H: Tensor, src: Tensor, dst: Tensor) -> Tensor:
    """Squared forward reprojection errors of T homographies per pair: H (A, T, 3, 3), points (A, N, 2) -> (A, T, N).

    NaN or infinite (never an inlier) where a point maps to infinity or H is NaN. Computed with elementwise
    products and sums in a fixed order rather than a matrix product, whose rounding depends on the kernel that
    the shapes select: the counts at the threshold then do not depend on the batch.
    """
    x, y = src[..., 0].unsqueeze(1), src[..., 1].unsqueeze(1)  # (A, 1, N)
    h = H.flatten(2).unsqueeze(-1)  # (A, T, 9, 1)

    def row(i: int) -> Tensor:
        return h[:, :, 3 * i] * x + h[:, :, 3 * i + 1] * y + h[:, :, 3 * i + 2]

    w = row(2)
    dx = row(0) / w - dst[..., 0].unsqueeze(1)
    dy = row(1) / w - dst[..., 1].unsqueeze(1)
    return dx * dx + dy * dy


def _least_squares_dlt(src: Tensor, dst: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """OpenCV's homography DLT of the points with weight 1 (its ``runKernel``), batched: (B, N, 2) x 2, (B, N).

    Each point set is normalised per axis (centroid, mean absolute deviation), and the homography is the
    eigenvector of the smallest eigenvalue of the 9x9 normal matrix, denormalised and scaled to H[2, 2] = 1.
    Starting LM from the same point as OpenCV makes it land on the same model for nearly degenerate sets too.

    Returns:
        (B, 3, 3) float64 homographies and (B,) bool, False where a spread is zero (OpenCV's failure).
    """
    src, dst, weights = src.double(), dst.double(), weights.double()
    count = weights.sum(dim=1, keepdim=True).clamp_min(1)  # (B, 1)
    centre_src = (src * weights.unsqueeze(-1)).sum(dim=1) / count  # (B, 2)
    centre_dst = (dst * weights.unsqueeze(-1)).sum(dim=1) / count
    spread_src = ((src - centre_src.unsqueeze(1)).abs() * weights.unsqueeze(-1)).sum(dim=1)
    spread_dst = ((dst - centre_dst.unsqueeze(1)).abs() * weights.unsqueeze(-1)).sum(dim=1)
    eps = torch.finfo(torch.float64).eps
    solved = (spread_src > eps).all(dim=1) & (spread_dst > eps).all(dim=1)
    scale_src = count / spread_src.clamp_min(eps)
    scale_dst = count / spread_dst.clamp_min(eps)
    X, Y = ((src - centre_src.unsqueeze(1)) * scale_src.unsqueeze(1)).unbind(-1)
    x, y = ((dst - centre_dst.unsqueeze(1)) * scale_dst.unsqueeze(1)).unbind(-1)
    ones, zeros = torch.ones_like(X), torch.zeros_like(X)
    row_x = torch.stack([X, Y, ones, zeros, zeros, zeros, -x * X, -x * Y, -x], dim=-1)
    row_y = torch.stack([zeros, zeros, zeros, X, Y, ones, -y * X, -y * Y, -y], dim=-1)
    rows = torch.cat([row_x, row_y], dim=1) * weights.repeat(1, 2).unsqueeze(-1)  # (B, 2N, 9)
    normal = rows.transpose(1, 2) @ rows
    normal = torch.where(solved[:, None, None], normal, torch.eye(9, dtype=normal.dtype, device=normal.device))
    H = torch.linalg.eigh(normal)[1][..., 0].view(-1, 3, 3)
    denormalise = torch.zeros_like(H)
    denormalise[:, 0, 0], denormalise[:, 1, 1], denormalise[:, 2, 2] = 1 / scale_dst[:, 0], 1 / scale_dst[:, 1], 1
    denormalise[:, 0, 2], denormalise[:, 1, 2] = centre_dst[:, 0], centre_dst[:, 1]
    normalise = torch.zeros_like(H)
    normalise[:, 0, 0], normalise[:, 1, 1], normalise[:, 2, 2] = scale_src[:, 0], scale_src[:, 1], 1
    normalise[:, 0, 2] = -centre_src[:, 0] * scale_src[:, 0]
    normalise[:, 1, 2] = -centre_src[:, 1] * scale_src[:, 1]
    H = denormalise @ H @ normalise
    return H / H[:, 2:, 2:], solved


def _refine_levenberg_marquardt(H: Tensor, src: Tensor, dst: Tensor, weights: Tensor, iters: int = 10) -> Tensor:
    """Minimise the weighted squared forward reprojection errors over the 8 free entries of H (H[2, 2] = 1).

    The batched counterpart of OpenCV's ``LMSolver`` (10 iterations, as ``findHomography`` runs it after its
    refit): damping ``lambda * diag(J^T J)`` of the starting point, adapted by the gain ratio; a pair stops when
    its step or its residual falls below float32's epsilon. Works in float64.

    Args:
        H: (B, 3, 3) starting homographies with H[2, 2] = 1.
        src, dst: (B, N, 2) points.
        weights: (B, N) 0/1 weights (the inliers).
        iters: maximum number of iterations.

    Returns:
        (B, 3, 3) refined homographies in the dtype of H.
    """
    dtype = H.dtype
    src, dst, weights = src.double(), dst.double(), weights.double()
    params = H.double().flatten(1)[:, :8]
    eps = torch.finfo(torch.float64).eps
    flt_eps = torch.finfo(torch.float32).eps

    def residuals(p: Tensor, with_jacobian: bool) -> tuple[Tensor, Tensor | None]:
        x, y = src[..., 0], src[..., 1]
        w = p[:, 6:7] * x + p[:, 7:8] * y + 1
        w = torch.where(w.abs() > eps, 1 / w, torch.zeros_like(w))
        u = (p[:, 0:1] * x + p[:, 1:2] * y + p[:, 2:3]) * w
        v = (p[:, 3:4] * x + p[:, 4:5] * y + p[:, 5:6]) * w
        r = torch.stack([u - dst[..., 0], v - dst[..., 1]], dim=-1) * weights.unsqueeze(-1)  # (B, N, 2)
        if not with_jacobian:
            return r.flatten(1), None
        zeros = torch.zeros_like(x)
        row_u = torch.stack([x * w, y * w, w, zeros, zeros, zeros, -x * w * u, -y * w * u], dim=-1)
        row_v = torch.stack([zeros, zeros, zeros, x * w, y * w, w, -x * w * v, -y * w * v], dim=-1)
        J = torch.stack([row_u, row_v], dim=2) * weights[..., None, None]  # (B, N, 2, 8)
        return r.flatten(1), J.flatten(1, 2)

    r, J = residuals(params, True)
    S = (r * r).sum(dim=1)
    A = J.transpose(1, 2) @ J
    g = (J.transpose(1, 2) @ r.unsqueeze(-1)).squeeze(-1)
    D = A.diagonal(dim1=1, dim2=2).clone()
    lam = torch.ones_like(S)
    lam_c = torch.full_like(S, 0.75)
    running = weights.sum(dim=1) >= MIN_MATCHES
    for _ in range(iters):
        step, info = torch.linalg.solve_ex(A + torch.diag_embed(lam.unsqueeze(1) * D), g)
        step = torch.where((info == 0).unsqueeze(1), step, torch.zeros_like(step))  # singular: stop there
        trial = params - step
        r_trial, _ = residuals(trial, False)
        S_trial = (r_trial * r_trial).sum(dim=1)
        predicted = (step * (2 * g - (A @ step.unsqueeze(-1)).squeeze(-1))).sum(dim=1)
        gain = (S - S_trial) / torch.where(predicted.abs() > eps, predicted, torch.ones_like(predicted))
        # Gain above 0.75: halve the damping (to 0 below lam_c); below 0.25: raise it by nu in [2, 10].
        halved = lam * 0.5
        halved = torch.where(halved < lam_c, torch.zeros_like(halved), halved)
        t = (step * g).sum(dim=1)
        nu = ((S_trial - S) / torch.where(t.abs() > eps, t, torch.ones_like(t)) + 2).clamp(2, 10)
        diag_inv = torch.linalg.inv_ex(A)[0].diagonal(dim1=1, dim2=2).abs().amax(dim=1).nan_to_num().clamp_min(eps)
        from_zero = lam == 0
        new_lam_c = torch.where(from_zero, 1 / diag_inv, lam_c)
        raised = torch.where(from_zero, new_lam_c * nu * 0.5, lam * nu)
        new_lam = torch.where(gain > 0.75, halved, torch.where(gain < 0.25, raised, lam))
        new_lam_c = torch.where((gain < 0.25) & from_zero, new_lam_c, lam_c)
        better = running & (S_trial < S)
        params = torch.where(better.unsqueeze(1), trial, params)
        S = torch.where(better, S_trial, S)
        r_new, J_new = residuals(params, True)
        r = torch.where(better.unsqueeze(1), r_new, r)
        A = torch.where(better[:, None, None], J_new.transpose(1, 2) @ J_new, A)
        g = torch.where(better.unsqueeze(1), (J_new.transpose(1, 2) @ r_new.unsqueeze(-1)).squeeze(-1), g)
        lam = torch.where(running, new_lam, lam)
        lam_c = torch.where(running, new_lam_c, lam_c)
        running = running & (step.abs().amax(dim=1) >= flt_eps) & (r.abs().amax(dim=1) >= flt_eps)
    return torch.cat([params, torch.ones_like(params[:, :1])], dim=1).view(-1, 3, 3).to(dtype)


def _ransac_num_iters(best_count: Tensor, num_valid: Tensor, confidence: float, max_iters: int) -> Tensor:
    """OpenCV's RANSACUpdateNumIters for 4-point samples, for the best inlier counts (..., ) of n valid points.

    ``round(log(1 - confidence) / log(1 - (best / n) ** 4))`` capped at ``max_iters``; 0 when every point is an
    inlier; ``max_iters`` while no model has been accepted (best < 4).
    """
    ratio = best_count.double() / num_valid.double().clamp_min(1)
    all_fail = 1.0 - ratio**MIN_MATCHES
    log_miss = math.log(max(1.0 - confidence, torch.finfo(torch.float64).tiny))
    # log(all_fail) < 0 for 0 < all_fail < 1; clamped so that the division stays finite.
    needed = log_miss / torch.log(all_fail.clamp(torch.finfo(torch.float64).tiny, 1.0 - 1e-16))
    needed = torch.where(needed < max_iters, needed.round(), torch.full_like(needed, max_iters)).long()
    needed = torch.where(all_fail < torch.finfo(torch.float64).tiny, torch.zeros_like(needed), needed)
    return torch.where(best_count >= MIN_MATCHES, needed, torch.full_like(needed, max_iters))


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

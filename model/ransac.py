"""A batched clone of OpenCV's ``findHomography(RANSAC)``: counter-based sampling, OpenCV's sample test, chunked
hypotheses scored all pairs at once, OpenCV's adaptive number of iterations, and its refit (``model.refit``)."""

from __future__ import annotations

import math

import torch
from kornia.geometry.homography import find_homography_dlt
from torch import Tensor

from model.features_extractor import PATCH_SIZE
from model.geometry import MIN_CORRESPONDENCES
from model.refit import least_squares_dlt, refine_levenberg_marquardt

RANSAC_THRESHOLD = 1.5 * PATCH_SIZE
"""The reprojection threshold of the original's RANSAC (``cv2.findHomography``) in the REI loss: 24 px."""


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
    batch, num_points = src.shape[:2]
    valid = _checked_valid(src, dst, valid, confidence)
    if generator is not None:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    key = _stream_key(seed)
    with torch.no_grad(), torch.autocast(src.device.type, enabled=False):
        threshold_sq = float(threshold) ** 2
        src, dst, valid, num_valid, order = _valid_points_first(src, dst, valid)
        search = (threshold_sq, max_iters, confidence, key, max_chunk_elements)
        best_H, best_count = _search_hypotheses(src, dst, valid, num_valid, *search)
        best_H, found = _fit_four_points(src, dst, num_valid, best_H, best_count)
        inliers = valid & (_squared_transfer_errors(best_H.unsqueeze(1), src, dst).squeeze(1) <= threshold_sq)
        if refine:
            best_H, inliers = _refit(src, dst, valid, num_valid, best_H, inliers, found, threshold_sq)
        inliers = inliers & found.unsqueeze(1)
        # Back to the input's positions.
        inliers = torch.zeros(batch, num_points, dtype=torch.bool, device=src.device).scatter(1, order, inliers)
        best_H = torch.where(found[:, None, None], best_H, torch.full_like(best_H, math.nan))
    return best_H, inliers, found


def _checked_valid(src: Tensor, dst: Tensor, valid: Tensor | None, confidence: float) -> Tensor:
    """Check the arguments of `find_homography_ransac`; returns `valid` (B, N), all True when None."""
    if src.dim() != 3 or src.shape[-1] != 2 or src.shape != dst.shape:
        raise ValueError(f"src and dst must have the same shape (B, N, 2), got {tuple(src.shape)}, {tuple(dst.shape)}")
    batch, num_points = src.shape[:2]
    if valid is None:
        valid = torch.ones(batch, num_points, dtype=torch.bool, device=src.device)
    if valid.shape != (batch, num_points):
        raise ValueError(f"valid must have shape ({batch}, {num_points}), got {tuple(valid.shape)}")
    if not 0 < confidence <= 1:
        raise ValueError(f"confidence must be in (0, 1], got {confidence}")
    return valid


def _valid_points_first(src: Tensor, dst: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Each pair's valid points moved to the front, in their order, without the columns that no pair needs.

    Returns src, dst (B, W, 2) float32 and detached, valid (B, W) (the first num_valid of each row), num_valid (B,)
    and order (B, W), the input position of each column; W is the largest number of valid points.
    """
    num_valid = valid.sum(dim=1)
    order = torch.argsort((~valid).to(torch.uint8), dim=1, stable=True)
    width = int(num_valid.max()) if valid.shape[0] else 0
    order = order[:, :width]
    src = src.detach().float().gather(1, order.unsqueeze(-1).expand(-1, -1, 2))
    dst = dst.detach().float().gather(1, order.unsqueeze(-1).expand(-1, -1, 2))
    valid = torch.arange(width, device=src.device) < num_valid.unsqueeze(1)
    return src, dst, valid, num_valid, order


def _search_hypotheses(
    src: Tensor,
    dst: Tensor,
    valid: Tensor,
    num_valid: Tensor,
    threshold_sq: float,
    max_iters: int,
    confidence: float,
    key: int,
    max_chunk_elements: int,
) -> tuple[Tensor, Tensor]:
    """OpenCV's hypothesis loop for every pair with more than four valid points, in growing chunks of hypotheses.

    Shapes: src, dst (B, W, 2) and valid (B, W) with the valid points first (`_valid_points_first`), num_valid (B,).
    Returns the best minimal model of each pair (B, 3, 3), NaN where none was accepted, and its inlier count (B,).
    """
    batch, width = valid.shape
    max_draws = 10 * max_iters  # OpenCV gives up after 10000 rejected samples in a row; this bounds all the draws
    best_H = src.new_full((batch, 3, 3), math.nan)
    best_count = torch.zeros_like(num_valid)
    hypotheses_done = torch.zeros_like(num_valid)
    draws_done = torch.zeros_like(num_valid)
    active = num_valid > MIN_CORRESPONDENCES
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
    return best_H, best_count


def _fit_four_points(
    src: Tensor, dst: Tensor, num_valid: Tensor, best_H: Tensor, best_count: Tensor
) -> tuple[Tensor, Tensor]:
    """OpenCV fits a pair of exactly four points directly, without RANSAC nor refit.

    Returns the models (B, 3, 3), those of four-point pairs replaced by their exact fit, and whether each pair has
    one (B,) bool: a search model with four or more inliers, or a finite four-point fit.
    """
    found = best_count >= MIN_CORRESPONDENCES
    four = num_valid == MIN_CORRESPONDENCES
    if bool(four.any()):
        H_four = find_homography_dlt(src[:, :MIN_CORRESPONDENCES], dst[:, :MIN_CORRESPONDENCES])
        four_ok = four & H_four.flatten(1).isfinite().all(dim=1)
        best_H = torch.where(four_ok[:, None, None], H_four, best_H)
        found = found | four_ok
    return best_H, found


def _refit(
    src: Tensor,
    dst: Tensor,
    valid: Tensor,
    num_valid: Tensor,
    best_H: Tensor,
    inliers: Tensor,
    found: Tensor,
    threshold_sq: float,
) -> tuple[Tensor, Tensor]:
    """OpenCV 4.11+'s refit of the best model on its inliers (least-squares DLT, then Levenberg-Marquardt), and its
    inliers counted again. Pairs of four points, or without a model, keep theirs.

    Shapes: src, dst (B, W, 2), valid and inliers (B, W), num_valid and found (B,), best_H (B, 3, 3).
    Returns the models (B, 3, 3) and their inliers (B, W).
    """
    refit = found & (num_valid > MIN_CORRESPONDENCES)
    weights = (inliers & refit.unsqueeze(1)).float()
    H_refit, solved = least_squares_dlt(src, dst, weights)
    # Where the least-squares fit fails OpenCV keeps the RANSAC model, and refines it all the same.
    H_refit = torch.where(solved[:, None, None], H_refit, best_H.double())
    H_refit = torch.where(refit[:, None, None], H_refit, torch.eye(3, dtype=H_refit.dtype, device=src.device))
    H_refit = refine_levenberg_marquardt(H_refit, src, dst, weights).float()
    refit = refit & H_refit.flatten(1).isfinite().all(dim=1)
    best_H = torch.where(refit[:, None, None], H_refit, best_H)
    recount = _squared_transfer_errors(best_H.unsqueeze(1), src, dst).squeeze(1) <= threshold_sq
    return best_H, torch.where(refit.unsqueeze(1), valid & recount, inliers)


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
    sample_idx = positions.view(pairs, chunk * MIN_CORRESPONDENCES, 1).expand(-1, -1, 2)
    src_sample = src.gather(1, sample_idx).view(pairs * chunk, MIN_CORRESPONDENCES, 2)
    dst_sample = dst.gather(1, sample_idx).view(pairs * chunk, MIN_CORRESPONDENCES, 2)
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
    better = chunk_best > best_count.clamp_min(MIN_CORRESPONDENCES - 1)
    chunk_H = hypotheses[torch.arange(pairs, device=src.device), chunk_arg]
    best_H = torch.where(better[:, None, None], chunk_H, best_H)
    best_count = torch.where(better, chunk_best, best_count)
    hypotheses_done = hypotheses_done + (good_sample & considered).sum(dim=1)
    return best_H, best_count, hypotheses_done, stopped


def _ransac_num_iters(best_count: Tensor, num_valid: Tensor, confidence: float, max_iters: int) -> Tensor:
    """OpenCV's RANSACUpdateNumIters for 4-point samples, for the best inlier counts (..., ) of n valid points.

    ``round(log(1 - confidence) / log(1 - (best / n) ** 4))`` capped at ``max_iters``; 0 when every point is an
    inlier; ``max_iters`` while no model has been accepted (best < 4).
    """
    ratio = best_count.double() / num_valid.double().clamp_min(1)
    all_fail = 1.0 - ratio**MIN_CORRESPONDENCES
    log_miss = math.log(max(1.0 - confidence, torch.finfo(torch.float64).tiny))
    # log(all_fail) < 0 for 0 < all_fail < 1; clamped so that the division stays finite.
    needed = log_miss / torch.log(all_fail.clamp(torch.finfo(torch.float64).tiny, 1.0 - 1e-16))
    needed = torch.where(needed < max_iters, needed.round(), torch.full_like(needed, max_iters)).long()
    needed = torch.where(all_fail < torch.finfo(torch.float64).tiny, torch.zeros_like(needed), needed)
    return torch.where(best_count >= MIN_CORRESPONDENCES, needed, torch.full_like(needed, max_iters))


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
    counters = draw_number.unsqueeze(-1) * MIN_CORRESPONDENCES + torch.arange(
        MIN_CORRESPONDENCES, device=draw_number.device
    )
    uniform = _counter_uniform(key, counters)
    upper = num_valid.view(-1, 1)
    chosen = uniform.new_empty((*draw_number.shape, 0), dtype=torch.long)
    for i in range(MIN_CORRESPONDENCES):
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

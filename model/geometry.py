"""Pure geometry of DHE: patch keypoints, the homography of the regressed corners (DLT) and reprojection errors.

Conventions, as in the original DHE-VPR:
- a local feature map has one position per 16x16 patch (``PATCH_SIZE``), numbered row by row (index = row * w + col),
  and its keypoint is the patch centre in pixels of the resized image, (x, y);
- a homography ``H`` (B, 3, 3) maps query pixels to candidate pixels;
- distances are Euclidean reprojection errors in pixels of the forward map (query -> candidate).
"""

from __future__ import annotations

import torch
from kornia.geometry.homography import find_homography_dlt
from torch import Tensor

from model.features_extractor import PATCH_SIZE

MIN_CORRESPONDENCES = 4
"""Point correspondences that determine a homography: RANSAC's minimal sample."""

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

"""Tests of model.geometry: patch keypoints and the DLT of the regressed points."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import apply_homography, translation

from model.geometry import keypoints, points_to_homography

CORNERS = torch.tensor([[8.0, 8.0], [376.0, 8.0], [8.0, 376.0], [376.0, 376.0]])


# --- keypoints -------------------------------------------------------------------------------------------------------


def test_keypoints_default_grid():
    kps = keypoints((24, 24))
    assert kps.shape == (576, 2) and kps.dtype == torch.float32
    assert kps[0].tolist() == [8, 8]
    assert kps[1].tolist() == [24, 8]  # along a row first: index = row * w + col
    assert kps[24].tolist() == [8, 24]
    assert kps[-1].tolist() == [376, 376]
    assert kps[5 * 24 + 7].tolist() == [8 + 7 * 16, 8 + 5 * 16]


@pytest.mark.parametrize(("grid_hw", "image_hw"), [((12, 20), None), ((24, 24), (500, 333)), ((1, 3), (16, 50))])
def test_keypoints_follow_numpy_int_linspace(grid_hw, image_hw):
    h, w = grid_hw
    H, W = image_hw if image_hw is not None else (h * 16, w * 16)
    xs = np.linspace(8, W - 8, w, dtype=int)
    ys = np.linspace(8, H - 8, h, dtype=int)
    expected = np.stack([np.tile(xs, h), np.repeat(ys, w)], axis=1)
    kps = keypoints(grid_hw, image_hw, dtype=torch.float64)
    assert kps.dtype == torch.float64
    np.testing.assert_array_equal(kps.numpy(), expected)


# --- points_to_homography --------------------------------------------------------------------------------------------


def test_points_to_homography_recovers_known_homographies(device):
    H_true = torch.stack(
        [
            torch.tensor([[1.05, 0.03, -12.0], [-0.02, 1.0, 8.0], [1e-5, 2e-5, 1.0]]),
            translation(20.0, -6.0),
            torch.tensor([[0.9, -0.1, 30.0], [0.05, 1.1, -4.0], [-1e-4, 5e-5, 1.0]]),
        ]
    ).to(device)
    query = CORNERS.to(device).expand(3, -1, -1)
    points = torch.cat([query, apply_homography(H_true, query)], dim=1)
    H = points_to_homography(points)
    assert H.shape == (3, 3, 3)
    torch.testing.assert_close(H, H_true, rtol=1e-4, atol=1e-4)
    # Equal weights, whatever their scale, give the same DLT.
    weights = torch.full((3, 4), 0.3, device=device)
    torch.testing.assert_close(points_to_homography(points, weights), H_true, rtol=1e-4, atol=1e-4)
    assert H.device == points.device
    # One pair alone gives the same as in the batch (to rounding: the batched solver may take other kernels).
    torch.testing.assert_close(points_to_homography(points[1:2]), H[1:2])


def test_points_to_homography_weights_and_shapes():
    """Four correspondences fit exactly: their weights only scale the equations and leave the homography as is."""
    points = torch.cat([CORNERS, CORNERS + torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, -3.0], [2.0, 2.0]])])[None]
    weighted = points_to_homography(points, torch.tensor([[1.0, 1.0, 1.0, 5.0]]))
    torch.testing.assert_close(weighted, points_to_homography(points), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"\(B, 8, 2\)"):
        points_to_homography(points[:, :6])
    with pytest.raises(ValueError, match="weights"):
        points_to_homography(points, torch.ones(1, 3))

"""Tests of model.ransac: the batched clone of OpenCV's findHomography(RANSAC)."""

from __future__ import annotations

import torch
from helpers import apply_homography, seeded, translation

from model.geometry import keypoints
from model.ransac import _ransac_num_iters as ransac_num_iters
from model.ransac import find_homography_ransac


def random_matches(H: torch.Tensor, num: int, num_outliers: int, generator: torch.Generator):
    """Grid keypoints mapped by H, the first num_outliers of them replaced by random points."""
    src = keypoints((24, 24))[torch.randperm(576, generator=generator)[:num]]
    dst = apply_homography(H[None], src[None])[0]
    dst[:num_outliers] = torch.rand(num_outliers, 2, generator=generator) * 384
    return src, dst


def test_ransac_finds_the_inliers_of_pairs_of_different_sizes(device):
    generator = seeded()
    H_true = [torch.tensor([[1.05, 0.03, -12.0], [-0.02, 1.0, 8.0], [1e-5, 2e-5, 1.0]]), translation(20.0, -6.0)]
    sets = [random_matches(H_true[0], 200, 80, generator), random_matches(H_true[1], 30, 10, generator)]
    src, dst = torch.zeros(3, 200, 2), torch.zeros(3, 200, 2)
    valid = torch.zeros(3, 200, dtype=torch.bool)
    for i, (s, d) in enumerate(sets):
        src[i, : len(s)], dst[i, : len(d)], valid[i, : len(s)] = s, d, True
    valid[2, :3] = True  # three points: no model
    src, dst, valid = src.to(device), dst.to(device), valid.to(device)
    H, inliers, found = find_homography_ransac(src, dst, valid, threshold=2.0)
    assert H.device == src.device
    H, inliers, found, dst = H.cpu(), inliers.cpu(), found.cpu(), dst.cpu()
    assert found.tolist() == [True, True, False]
    torch.testing.assert_close(H[0], H_true[0], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(H[1], H_true[1], rtol=1e-3, atol=1e-3)
    assert torch.isnan(H[2]).all() and not inliers[2].any()
    for i, (s, _) in enumerate(sets):
        outliers = (apply_homography(H_true[i][None], s[None])[0] - dst[i, : len(s)]).norm(dim=1) > 2.0
        assert torch.equal(inliers[i, : len(s)], ~outliers)
    assert not inliers[:, 200:].any() and not (inliers[1, 30:]).any()
    # Reproducible with the same seed.
    again = find_homography_ransac(src, dst.to(device), valid, threshold=2.0)
    assert torch.equal(again[1].cpu(), inliers)


def test_ransac_num_iters_follows_opencv():
    best = torch.tensor([2, 50, 100, 80])
    num_valid = torch.tensor([100, 100, 100, 100])
    # round(log(0.005) / log(1 - 0.5 ** 4)) = 82, ... 0.8 ... = 10; all inliers: 0; no model yet: max_iters.
    assert ransac_num_iters(best, num_valid, 0.995, 2000).tolist() == [2000, 82, 0, 10]
    assert ransac_num_iters(torch.tensor([10]), torch.tensor([100]), 0.995, 2000).tolist() == [2000]

"""Tests of model.rerank: the correlation -> head -> DLT chain and the batched re-ranking scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import seeded

from model import HomographyRegression, compute_similarity
from model.dhe import init_spread_corners_
from model.geometry import points_to_homography, reprojection_distances
from model.matching import inlier_scores, matched_keypoints
from model.precision import amp_dtype
from model.rerank import predict_homographies, rerank_order, rerank_scores


def test_rerank_scores_batches_queries_and_chunks(device):
    torch.manual_seed(0)
    head = HomographyRegression(resize=(64, 64), num_layers=1, dim_feedforward=32).eval().to(device)
    with torch.no_grad():  # spread the predicted corners over the 64x64 image
        head.linear.weight.mul_(0.01)
        head.linear.bias.copy_(torch.tensor([8, 8, 56, 8, 8, 56, 56, 56, 9, 7, 55, 9, 7, 57, 57, 55.0]))
    generator = seeded()
    local_q = F.normalize(torch.randn(2, 8, 4, 4, generator=generator), dim=1).to(device)
    noise = 0.5 * torch.randn(2, 5, 8, 4, 4, generator=generator).to(device)
    local_candidates = F.normalize(local_q[:, None] + noise, dim=2)
    scores = rerank_scores(head, local_q, local_candidates, batch_size=3)
    assert scores.shape == (2, 5) and scores.dtype == torch.float32 and scores.sum() > 0
    assert scores.device == local_q.device
    # Each pair is scored with its own query, whatever the chunking. The head may round differently with another
    # batch size; a count can then move only by the matches that lie at the 48 px threshold to that rounding.
    with torch.no_grad():
        pairs_q = local_q.repeat_interleave(5, dim=0)
        pairs_c = local_candidates.flatten(0, 1)
        H = points_to_homography(head(compute_similarity(pairs_q, pairs_c)))
        query_points, cand_points, valid = matched_keypoints(pairs_q, pairs_c)
        at_threshold = valid & ((reprojection_distances(H, query_points, cand_points) - 48).abs() < 1e-3)
        allowed = at_threshold.sum(dim=1).view(2, 5).float()
        per_pair = inlier_scores(pairs_q, pairs_c, H).view(2, 5)
    assert ((per_pair - scores).abs() <= allowed).all()
    assert ((rerank_scores(head, local_q, local_candidates, batch_size=100) - scores).abs() <= allowed).all()
    assert ((rerank_scores(head, local_q[1], local_candidates[1], batch_size=1) - scores[1]).abs() <= allowed[1]).all()
    amp_scores = rerank_scores(head, local_q, local_candidates, batch_size=4, amp=True)
    assert amp_scores.dtype == torch.float32
    # Without amp=True the head runs in the caller's autocast state (eval.py's --amp sets it around the call):
    # the same kernels on the same chunks, so the same scores.
    with torch.autocast(device.type, dtype=amp_dtype(device)):
        assert torch.equal(rerank_scores(head, local_q, local_candidates, batch_size=4), amp_scores)
    with pytest.raises(ValueError, match="expected"):
        rerank_scores(head, local_q, local_candidates[0])


@pytest.mark.parametrize("autocast", [False, True])
def test_predict_homographies_is_the_hand_written_chain_bit_for_bit(autocast):
    """The chain both training losses run: correlation in float32 -> head in the caller's autocast state -> weighted
    DLT in float32. The same homographies and the same gradients of the head's parameters, bit for bit."""
    torch.manual_seed(0)
    head = HomographyRegression(resize=(64, 64), num_layers=1, dim_feedforward=32).train()
    init_spread_corners_(head)
    generator = seeded()
    query = F.normalize(torch.randn(3, 8, 4, 4, generator=generator), dim=1)
    candidates = F.normalize(query + 0.3 * torch.randn(3, 8, 4, 4, generator=generator), dim=1)
    weights = torch.rand(3, 4, generator=generator) + 0.5

    def homographies_and_gradients(chain) -> tuple[torch.Tensor, list[torch.Tensor]]:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            H = chain()
        return H, torch.autograd.grad(H.square().sum(), list(head.parameters()))

    def by_hand() -> torch.Tensor:
        with torch.autocast("cpu", enabled=False):
            correlation = compute_similarity(query, candidates)
        points = head(correlation)
        with torch.autocast("cpu", enabled=False):
            return points_to_homography(points.float(), weights)

    def by_the_library() -> torch.Tensor:
        return predict_homographies(head, query, candidates, dlt_weights=weights)

    H, gradients = homographies_and_gradients(by_the_library)
    H_expected, gradients_expected = homographies_and_gradients(by_hand)
    assert H.dtype == torch.float32 and H.shape == (3, 3, 3) and H.isfinite().all()
    assert torch.equal(H, H_expected)
    for gradient, expected in zip(gradients, gradients_expected, strict=True):
        assert torch.equal(gradient, expected)


def test_nan_scores_are_reported_not_ranked():
    with pytest.raises(ValueError, match="re-ranking scores are not finite"):
        rerank_order(np.array([[3.0, np.nan, 1.0]]))
    order, tied = rerank_order(np.array([[1.0, 5.0, 1.0], [2.0, 2.0, 2.0]]))
    assert order.tolist() == [[1, 2, 0], [0, 1, 2]] and tied.tolist() == [False, True]  # ties as the original

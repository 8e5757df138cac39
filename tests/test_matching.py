"""Tests of model.matching: mutual matches, inlier scores and the REI loss, against the original's reference."""

from __future__ import annotations

import math

import kornia
import pytest
import torch
import torch.nn.functional as F
from conftest import normalise_uint8, reference_features_extractor, reference_homography_regression
from helpers import patch_descriptors, seeded, smooth_texture, translation

from model.geometry import points_to_homography, reprojection_distances
from model.matching import inlier_scores, matched_keypoints, mutual_nearest_neighbours, rei_loss
from model.ransac import RANSAC_THRESHOLD, find_homography_ransac
from model.rerank import rerank_scores

# --- mutual nearest neighbours ---------------------------------------------------------------------------------------


def one_hot_maps(channels: list[int], num_channels: int = 4, grid_hw: tuple[int, int] = (2, 2)) -> torch.Tensor:
    """(1, C, h, w) features whose position i is the one-hot vector of channels[i]."""
    return F.one_hot(torch.tensor(channels), num_channels).float().T.reshape(1, num_channels, *grid_hw)


def test_mutual_nearest_neighbours_on_known_maps(device):
    query = one_hot_maps([0, 1, 2, 3]).to(device)
    cand_idx, valid = mutual_nearest_neighbours(query, one_hot_maps([2, 0, 3, 1]).to(device))
    assert cand_idx.tolist() == [[1, 3, 0, 2]] and valid.all() and cand_idx.device == query.device
    # Candidate positions 2 and 3 both hold channel 2: query 2 takes the first; nobody holds channel 3, so query 3
    # falls on candidate 0 (all ties, first index), whose best query is 0: not mutual.
    cand_idx, valid = mutual_nearest_neighbours(query, one_hot_maps([0, 1, 2, 2]).to(device))
    assert cand_idx.tolist() == [[0, 1, 2, 0]]
    assert valid.tolist() == [[True, True, True, False]]


def test_mutual_nearest_neighbours_broadcasts_one_query():
    generator = seeded()
    query = F.normalize(torch.randn(1, 8, 3, 4, generator=generator), dim=1)
    candidates = F.normalize(torch.randn(5, 8, 3, 4, generator=generator), dim=1)
    broadcast = mutual_nearest_neighbours(query, candidates)
    expanded = mutual_nearest_neighbours(query.expand(5, -1, -1, -1), candidates)
    for a, b in zip(broadcast, expanded):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="batch"):
        mutual_nearest_neighbours(query.expand(2, -1, -1, -1), candidates)


# --- the parity reference --------------------------------------------------------------------------------------------
# The reference's features are stored in fp16, and for these deterministic weights 505 of the 576 query positions
# have their two best candidates within 1e-3 of each other: fp16 rounding moves a few mutual matches, and the
# scores by about 1.5% (392 for 386, 286 for 290). The features recomputed in fp32 by the model reproduce them
# exactly (test_parity_with_fp32_features).


@pytest.fixture(scope="module")
def reference_on_device(reference, device) -> dict:
    return {key: value.to(device) if torch.is_tensor(value) else value for key, value in reference.items()}


@pytest.fixture(scope="module")
def reference_features(reference_on_device) -> torch.Tensor:
    return reference_on_device["local_features_fp16"].float()


@pytest.fixture(scope="module")
def dhe_homographies(reference_on_device) -> torch.Tensor:
    points = reference_on_device["dhe_points_img0_vs_img123"]
    return points_to_homography(points, points.new_ones(points.shape[0], 4))


def test_scores_reproduce_reference(reference_on_device, reference_features, dhe_homographies):
    reference = reference_on_device
    query, candidates = reference_features[:1], reference_features[1:]
    scores = inlier_scores(query, candidates, dhe_homographies)
    assert scores.shape == (3,) and scores.dtype == torch.float32 and scores.device == query.device
    torch.testing.assert_close(scores, reference["score_dhe_img0_vs_img123"], rtol=0.02, atol=0)
    assert scores[2] == 0  # img3 is unrelated
    scores_gt = inlier_scores(query, candidates[:2], reference["H_base_to_img1_img2"])
    torch.testing.assert_close(scores_gt, reference["score_gt_H_img0_vs_img12"], rtol=0.02, atol=0)


def test_rei_reproduces_reference(reference_on_device, reference_features, dhe_homographies):
    # The reference's k were counted after the refit (OpenCV 4.x: its img3 has k = 1, which no minimal model gives).
    reference = reference_on_device
    query, candidates = reference_features[:1], reference_features[1:3]
    rei_gt = rei_loss(query, candidates, reference["H_base_to_img1_img2"], inliers="refined")
    expected_gt = torch.stack([reference["rei_gt_H_img0_vs_img1"], reference["rei_gt_H_img0_vs_img2"]])
    torch.testing.assert_close(rei_gt, expected_gt, rtol=0.05, atol=0)
    rei_dhe = rei_loss(query, candidates, dhe_homographies[:2], inliers="refined")
    torch.testing.assert_close(rei_dhe, reference["rei_dhe_img0_vs_img123_unit_weights"][:2], rtol=0.05, atol=0)


def near_ties(local_q: torch.Tensor, local_c: torch.Tensor, margin: float = 1e-6) -> torch.Tensor:
    """(B,) how many positions of each pair have their two best dot products within ``margin`` (both ways)."""
    similarity = local_c.flatten(2).transpose(1, 2).double() @ local_q.flatten(2).double()  # (B, l_c, l_q)
    best_two_c = similarity.topk(2, dim=1).values
    best_two_q = similarity.topk(2, dim=2).values
    return ((best_two_c[:, 0] - best_two_c[:, 1]) < margin).sum(dim=1) + (
        (best_two_q[..., 0] - best_two_q[..., 1]) < margin
    ).sum(dim=1)


def test_parity_with_fp32_features(reference_on_device, dhe_homographies, device):
    """Scores to a few matches, and REI to 1%, from the features the model computes in fp32 (as the reference did).

    The reference's scores come from the original's features on its CPU; ours differ from them by fp32 rounding
    (about 1e-7: the model in fp64 differs by 1.4e-7). A match can only change where a position's two best dot
    products lie closer than that, and each such position changes a count by at most 2 (its own match, and the
    mutual check of one candidate position). So the counts may differ by at most twice the number of positions
    tied within 1e-6 (a few per pair for these weights; 505 of the 576 positions are within 1e-3, which is why
    the fp16 features move the scores by 1.5%).

    The REI of the unrelated img3 is left out: its k comes from RANSAC on 8 random matches, which gives 0 or 5
    inliers by the luck of the draw (OpenCV 4.14 gives 0 on these matches, the reference 1). The reference's k were
    counted after the refit (OpenCV 4.x), so the REI is compared with `inliers="refined"`; the default, the best
    minimal model's inliers (OpenCV 3.4.x), is tested below.
    """
    reference = reference_on_device
    with torch.inference_mode():
        images = normalise_uint8(reference["images_uint8"].cpu()).to(device)
        _, local = reference_features_extractor().to(device)(images)
    query, candidates = local[:1], local[1:]
    allowed = 2 * near_ties(query, candidates).to(torch.float32)
    scores = inlier_scores(query, candidates, dhe_homographies)
    assert ((scores - reference["score_dhe_img0_vs_img123"]).abs() <= allowed).all(), (scores, allowed)
    scores_gt = inlier_scores(query, candidates[:2], reference["H_base_to_img1_img2"])
    assert ((scores_gt - reference["score_gt_H_img0_vs_img12"]).abs() <= allowed[:2]).all(), (scores_gt, allowed)
    rei_gt = rei_loss(query, candidates[:2], reference["H_base_to_img1_img2"], inliers="refined")
    expected_gt = torch.stack([reference["rei_gt_H_img0_vs_img1"], reference["rei_gt_H_img0_vs_img2"]])
    torch.testing.assert_close(rei_gt, expected_gt, rtol=0.01, atol=0)
    rei_dhe = rei_loss(query, candidates[:2], dhe_homographies[:2], inliers="refined")
    torch.testing.assert_close(rei_dhe, reference["rei_dhe_img0_vs_img123_unit_weights"][:2], rtol=0.01, atol=0)
    # End to end: correlation -> head -> DLT -> score.
    head = reference_homography_regression().to(device)
    scores = rerank_scores(head, local[0], local[1:], batch_size=2)
    assert ((scores - reference["score_dhe_img0_vs_img123"]).abs() <= allowed).all(), (scores, allowed)


def test_true_homography_beats_a_wrong_one(reference_on_device, reference_features):
    query, candidate = reference_features[:1], reference_features[1:2]
    H_true = reference_on_device["H_base_to_img1_img2"][:1]
    H_wrong = (translation(64.0, 0.0).to(H_true.device) @ H_true[0])[None]
    assert inlier_scores(query, candidate, H_true) > inlier_scores(query, candidate, H_wrong) + 100
    assert rei_loss(query, candidate, H_true) < rei_loss(query, candidate, H_wrong)


# --- batching, edge cases, dtypes, gradients -------------------------------------------------------------------------


def test_batch_gives_the_same_as_pairs_one_by_one(reference_features, dhe_homographies):
    query, candidates = reference_features[:1], reference_features[1:]
    scores = inlier_scores(query, candidates, dhe_homographies)
    for i in range(3):
        assert inlier_scores(query, candidates[i : i + 1], dhe_homographies[i : i + 1]) == scores[i]
    expanded = inlier_scores(query.expand(3, -1, -1, -1), candidates, dhe_homographies)
    assert torch.equal(expanded, scores)


@pytest.mark.parametrize("seed", [0, 1])
def test_rei_of_a_pair_depends_on_that_pair_alone(reference_features, dhe_homographies, seed):
    """The same loss for a pair alone, in a batch, in another order, and after reseeding torch's global RNG.

    img3 (unrelated to img0, 8 mutual matches) has a k that depends on the RANSAC draws after the refit: 0 inliers
    with seed 0, 5 with seed 1 (a loss of 0 or about 227 px), so its loss shows which samples it got; so does img2's
    k under the default counting (the best minimal model's inliers). The tolerance covers
    only the rounding of the reprojection distances (a 3x3 matrix product whose kernel may change with the batch
    shape); a different k would change a loss by percents.
    """
    query, candidates = reference_features[:1], reference_features[1:]
    torch.manual_seed(1234)
    losses = rei_loss(query, candidates, dhe_homographies, seed=seed)
    assert losses[:2].min() > 0
    for i in range(3):
        torch.manual_seed(i + 99)  # another state of the global RNG, which the loss must not read
        single = rei_loss(query, candidates[i : i + 1], dhe_homographies[i : i + 1], seed=seed)
        torch.testing.assert_close(single, losses[i : i + 1], rtol=1e-5, atol=1e-5)
    order = [2, 0, 1, 2]  # another order, with a pair twice
    shuffled = rei_loss(query.expand(4, -1, -1, -1), candidates[order], dhe_homographies[order], seed=seed)
    torch.testing.assert_close(shuffled, losses[order], rtol=1e-5, atol=1e-5)
    # The same seed twice: the same losses; a generator gives a seed drawn from it.
    torch.testing.assert_close(rei_loss(query, candidates, dhe_homographies, seed=seed), losses)
    from_generator = rei_loss(query, candidates, dhe_homographies, generator=seeded(seed))
    torch.testing.assert_close(from_generator, rei_loss(query, candidates, dhe_homographies, generator=seeded(seed)))


def test_unrelated_pair_gets_other_draws_with_another_seed(reference_features, dhe_homographies):
    """The stream's seed matters where k is sensitive to the draws: img3's loss over seeds takes both values after
    the refit (k = 0 or 5); the best minimal model's k of img2 (the default counting) takes several."""
    query, unrelated, H = reference_features[:1], reference_features[3:4], dhe_homographies[2:3]
    losses = {round(rei_loss(query, unrelated, H, seed=seed, inliers="refined").item(), 1) for seed in range(8)}
    assert len(losses) == 2 and 0.0 in losses
    warped, H = reference_features[2:3], dhe_homographies[1:2]
    assert len({rei_loss(query, warped, H, seed=seed).item() for seed in range(8)}) > 1


def test_fewer_than_four_matches_give_zero(device):
    query = one_hot_maps([0, 1, 2, 3]).to(device)
    identity = torch.eye(3, device=device)[None]
    # three mutual matches (see test_mutual_nearest_neighbours_on_known_maps)
    three = one_hot_maps([0, 1, 2, 2]).to(device)
    assert inlier_scores(query, three, identity).item() == 0
    assert rei_loss(query, three, identity).item() == 0
    four = one_hot_maps([0, 1, 2, 3]).to(device)
    assert inlier_scores(query, four, identity).item() == 4
    # Four exact matches: k = 4 (fitted directly, as OpenCV), all distances 0 under the identity.
    assert rei_loss(query, four, identity).item() == 0
    assert rei_loss(query, four, translation(3.0, 4.0).to(device)[None]).item() == pytest.approx(5.0)


def test_dtypes_and_devices_follow_the_inputs(reference_features, dhe_homographies):
    query, candidates = reference_features[:1].double(), reference_features[1:].double()
    H = dhe_homographies.double()
    assert inlier_scores(query, candidates, H).dtype == torch.float64
    assert rei_loss(query, candidates, H).dtype == torch.float64
    assert matched_keypoints(query, candidates)[1].device == candidates.device
    # Under autocast the matching and the counts stay in float32: the same scores.
    scores = inlier_scores(query.float(), candidates.float(), H.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores_amp = inlier_scores(query.float(), candidates.float(), H.bfloat16())
    assert scores_amp.dtype == torch.float32
    assert (scores_amp - scores).abs().max() <= 2  # H rounded to bfloat16 moves points near the threshold


def test_shapes_are_checked(reference_features, dhe_homographies):
    with pytest.raises(ValueError, match=r"\(3, 3, 3\)"):
        inlier_scores(reference_features[:1], reference_features[1:], dhe_homographies[:2])
    with pytest.raises(ValueError, match="differ"):
        inlier_scores(reference_features[:1, :8], reference_features[1:], dhe_homographies)


def test_gradient_flows_to_H_and_to_the_points(reference_on_device, reference_features):
    points = reference_on_device["dhe_points_img0_vs_img123"][:2].clone().requires_grad_(True)
    H = points_to_homography(points)
    H.retain_grad()
    loss = rei_loss(reference_features[:1], reference_features[1:3], H)
    loss.sum().backward()
    assert torch.isfinite(H.grad).all() and H.grad.abs().sum() > 0
    assert torch.isfinite(points.grad).all() and points.grad.abs().sum() > 0


def test_gradient_is_finite_at_zero_distance(device):
    query = one_hot_maps([0, 1, 2, 3]).to(device)
    H = torch.eye(3, device=device)[None].requires_grad_(True)
    loss = rei_loss(query, query, H)
    loss.sum().backward()
    assert loss.item() == 0 and torch.isfinite(H.grad).all()


# --- a constructed case: a texture, warped copies and distractors ----------------------------------------------------


def test_constructed_case_ranks_the_warped_copies_first(device):
    generator = seeded()
    size = 192
    query = smooth_texture(size, generator)
    corners = torch.tensor([[[0.0, 0.0], [size, 0.0], [0.0, size], [size, size]]])
    moves = [
        torch.tensor([[[6.0, -4.0], [-8.0, 5.0], [4.0, 7.0], [-5.0, -6.0]]]),
        torch.tensor([[[-10.0, 8.0], [5.0, 10.0], [-6.0, -9.0], [8.0, 4.0]]]),
    ]
    H_true = torch.cat([kornia.geometry.transform.get_perspective_transform(corners, corners + m) for m in moves])
    warped = kornia.geometry.transform.warp_perspective(
        query.expand(2, -1, -1, -1), H_true, (size, size), padding_mode="reflection"
    )
    distractors = torch.cat([smooth_texture(size, generator) for _ in range(3)])
    features = patch_descriptors(torch.cat([query, warped, distractors])).to(device)
    H_true = H_true.to(device)
    assert features.shape == (6, 48, 12, 12)
    query_features, candidates = features[:1], features[1:]
    # The true homography of each warped copy, and the first one for the distractors.
    H = torch.cat([H_true, H_true[:1].expand(3, -1, -1)])
    scores = inlier_scores(query_features, candidates, H)
    assert scores[:2].min() > 3 * scores[2:].max()
    num_matches = mutual_nearest_neighbours(query_features, candidates)[1].sum(dim=1)
    assert (scores[:2] >= 0.75 * num_matches[:2]).all()  # most mutual matches of a copy are inliers
    wrong = translation(64.0, 0.0).to(device).expand(5, -1, -1)
    assert (inlier_scores(query_features, candidates, wrong)[:2] < scores[:2] / 3).all()
    losses = rei_loss(query_features, candidates, H)
    assert losses[:2].max() < 8.0 < losses[2:].min()  # within half a patch for the copies only
    assert math.isfinite(losses.sum().item())


def test_c_rei_counts_the_best_minimal_models_inliers_by_default(reference):
    """k is the inlier count of the best minimal model (OpenCV 3.4.x's mask, the original's), not the recount
    under the refitted model (OpenCV 4.11+), which stays available as inliers="refined"."""
    features = reference["local_features_fp16"].float()
    query, warped, H = features[:1], features[2:3], reference["H_base_to_img1_img2"][1:2]
    query_points, cand_points, valid = matched_keypoints(query, warped, None, torch.float32)
    src = query_points.expand_as(cand_points)
    minimal_H, minimal_inliers, _ = find_homography_ransac(src, cand_points, valid, refine=False)
    k = int(minimal_inliers.sum())
    errors = reprojection_distances(minimal_H, src, cand_points)
    assert int((valid & (errors**2 <= RANSAC_THRESHOLD**2)).sum()) == k  # the minimal model's own inliers
    _, refined_inliers, _ = find_homography_ransac(src, cand_points, valid, refine=True)
    assert int(refined_inliers.sum()) != k  # the two countings differ on this pair: the test can tell them apart
    distances = reprojection_distances(H, query_points, cand_points)[valid].sort().values
    for kind, count in (("minimal", k), ("refined", int(refined_inliers.sum()))):
        expected = distances[:count].mean().reshape(1)
        torch.testing.assert_close(rei_loss(query, warped, H, inliers=kind), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rei_loss(query, warped, H), rei_loss(query, warped, H, inliers="minimal"))
    with pytest.raises(ValueError, match="inliers 'opencv': expected one of minimal, refined"):
        rei_loss(query, warped, H, inliers="opencv")


def test_c_a_minimal_count_is_never_one_to_three(reference):
    """The reference's unrelated pair (8 random matches) has k = 1 after the refit in the reference; a best minimal
    model has 4 inliers or more (or none is found)."""
    features = reference["local_features_fp16"].float()
    query_points, cand_points, valid = matched_keypoints(features[:1], features[3:4], None, torch.float32)
    for seed in range(8):
        _, inliers, found = find_homography_ransac(
            query_points.expand_as(cand_points), cand_points, valid, refine=False, seed=seed
        )
        assert int(inliers.sum()) >= 4 if bool(found) else int(inliers.sum()) == 0

"""Re-ranking throughput: the batched DHE scoring of model.homography against a per-pair loop like the original's.

Random-weight models in eval mode, local features precomputed by the FeaturesExtractor from procedural images
(per query: the query texture, a few perspective-warped copies of it among its candidates, the rest distractors),
so that the mutual matches look like real ones. Feature extraction is not timed. For each query its
``--num_reranked_preds`` candidates are scored by:

(a) batched: ``model.homography.rerank_scores``: correlation -> head -> DLT -> inlier count, ``--batch_size``
    pairs per pass, matching and counting for all of them in a few tensor operations;
(b) per pair, as the original's test.py / homography_project.py: the head (its nn.TransformerEncoder modules, as
    the original ran them) on chunks of ``--batch_size`` pairs, then a Python loop over the candidates with a
    ``nonzero`` per pair, numpy keypoints and CPU round-trips;
(c) (a) with the head under ``torch.autocast`` (bfloat16 on CPU): the ``--amp`` path.

It prints pairs/s of each, the ratios, the same for the scoring stage alone (head outputs given), and how often the
top-1 candidate after re-ranking agrees between fp32 and amp (random weights: only indicative).

    python benchmarks/bench_rerank.py [--num_queries 4] [--num_reranked_preds 32] [--resize 384 384] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import kornia
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import datasets_ws  # noqa: E402
from model import FeaturesExtractor, HomographyRegression, compute_similarity  # noqa: E402
from model.dhe import PATCH_SIZE  # noqa: E402
from model.homography import inlier_scores, points_to_homography, rerank_scores  # noqa: E402

IMAGENET_MEAN = torch.tensor(datasets_ws.IMAGENET_MEAN).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor(datasets_ws.IMAGENET_STD).view(1, 3, 1, 1)


def smooth_textures(num: int, resize: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """(num, 3, H, W) images in [0, 1]: sums of upsampled noise at several scales."""
    images = torch.zeros(num, 3, *resize)
    for cells, amplitude in ((6, 1.0), (12, 0.7), (24, 0.5), (48, 0.3)):
        noise = torch.rand(num, 3, cells, cells, generator=generator)
        images += amplitude * F.interpolate(noise, size=resize, mode="bicubic", align_corners=False)
    return (images / 2.5).clamp(0, 1)


def random_warps(images: torch.Tensor, copies: int, generator: torch.Generator) -> torch.Tensor:
    """(Q, 3, H, W) -> (Q, copies, 3, H, W): each image warped by random homographies (corners moved <= 8%)."""
    num, _, height, width = images.shape
    corners = torch.tensor([[0.0, 0.0], [width, 0.0], [0.0, height], [width, height]]).expand(num * copies, -1, -1)
    moves = (torch.rand(num * copies, 4, 2, generator=generator) - 0.5) * 0.16 * torch.tensor([width, height])
    H = kornia.geometry.transform.get_perspective_transform(corners, corners + moves)
    sources = images.repeat_interleave(copies, dim=0)
    warped = kornia.geometry.transform.warp_perspective(sources, H, (height, width), padding_mode="reflection")
    return warped.view(num, copies, *images.shape[1:])


@torch.inference_mode()
def local_features(features_extractor: FeaturesExtractor, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    chunks = []
    for start in range(0, images.shape[0], batch_size):
        batch = (images[start : start + batch_size] - IMAGENET_MEAN) / IMAGENET_STD
        chunks.append(features_extractor(batch)[1])
    return torch.cat(chunks)


def build_features(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """Local features of the queries (Q, C, h, w) and of their candidates (Q, K, C, h, w)."""
    generator = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    features_extractor = FeaturesExtractor(resize=tuple(args.resize), trunc_te=8, freeze_te=5).eval()
    num_queries, num_candidates = args.num_queries, args.num_reranked_preds
    copies = min(args.warped_copies, num_candidates)
    queries = smooth_textures(num_queries, tuple(args.resize), generator)
    warped = random_warps(queries, copies, generator)
    # Distractors are shared between the queries, as neighbours in a database are.
    distractors = smooth_textures(num_candidates - copies, tuple(args.resize), generator)
    images = torch.cat([queries, warped.flatten(0, 1), distractors])
    features = local_features(features_extractor, images, args.batch_size)
    local_q = features[:num_queries]
    local_warped = features[num_queries : num_queries * (1 + copies)].view(num_queries, copies, *features.shape[1:])
    local_distractors = features[num_queries * (1 + copies) :].expand(num_queries, -1, -1, -1, -1)
    candidates = torch.cat([local_warped, local_distractors], dim=1)
    # Shuffle so that the warped copies are not always first.
    order = torch.stack([torch.randperm(num_candidates, generator=generator) for _ in range(num_queries)])
    candidates = candidates[torch.arange(num_queries)[:, None], order]
    return local_q, candidates


def original_keypoints(image_hw: tuple[int, int]) -> np.ndarray:
    """(h*w, 2) int keypoints as the original's get_keypoints."""
    height, width = image_hw
    half = PATCH_SIZE // 2
    xs = np.linspace(half, width - half, width // PATCH_SIZE, dtype=int)
    ys = np.linspace(half, height - half, height // PATCH_SIZE, dtype=int)
    return np.stack([np.tile(xs, len(ys)), np.repeat(ys, len(xs))], axis=1)


def per_pair_match_scores(
    local_q: torch.Tensor, local_c: torch.Tensor, thetas: torch.Tensor, kps: np.ndarray
) -> torch.Tensor:
    """The original's test-time match_batch_tensor: one query (C, h, w) against N candidates, one pair at a time."""
    device = local_c.device
    query = local_q.flatten(1).T  # (l, D)
    preds = local_c.flatten(2).transpose(1, 2)  # (N, l, D)
    M = preds @ query.T  # (N, l, l)
    max1 = M.argmax(dim=1)
    max2 = M.argmax(dim=2)
    m = max2[torch.arange(M.shape[0]).reshape(-1, 1), max1]
    valid = torch.arange(M.shape[-1], device=device).repeat(M.shape[0], 1) == m
    scores = torch.zeros(M.shape[0], device=device)
    for i in range(M.shape[0]):
        idx1 = torch.nonzero(valid[i]).squeeze()
        idx2 = max1[i][idx1]
        if idx1.dim() < 1 or idx1.shape[0] < 4:
            continue
        idx1, idx2 = idx1.cpu(), idx2.cpu()
        pix1 = np.ones([len(idx1), 3])
        pix1[:, :-1] = kps[idx1]
        pix1 = torch.from_numpy(pix1).to(torch.float32).to(device)
        pix2 = torch.from_numpy(kps[idx2]).to(torch.float32).to(device)
        projected = (thetas[i] @ pix1.T).T
        denominator = projected[:, -1]
        denominator = torch.where(denominator == 0, torch.full_like(denominator, 1e-8), denominator)
        distances = torch.sqrt(((projected[:, :-1] / denominator.unsqueeze(1) - pix2) ** 2).sum(dim=1))
        scores[i] = (distances < 3 * PATCH_SIZE).sum()
    return scores


def original_head_forward(head: HomographyRegression, correlation: torch.Tensor) -> torch.Tensor:
    """The original's HomographyRegression.forward: the head's nn.TransformerEncoder modules called as such
    (nn.MultiheadAttention inside), with the output of the first encoder cloned."""
    batch = correlation.shape[0]
    x = (correlation.reshape(batch, head.d_model, -1) + head.pe).permute(0, 2, 1)
    x = head.encoder(x)
    x = head.encoder2(x) + x.clone()
    return head.linear(x.permute(0, 2, 1).contiguous().view(batch, -1)).reshape(batch, 8, 2)


@torch.inference_mode()
def per_pair_rerank_scores(
    head: HomographyRegression, local_q: torch.Tensor, local_candidates: torch.Tensor, batch_size: int
) -> np.ndarray:
    """(b): the original's test loop for one query: the head on chunks of pairs, then the per-pair scoring."""
    kps = original_keypoints(tuple(PATCH_SIZE * s for s in local_q.shape[-2:]))
    scores = np.zeros(local_candidates.shape[0])
    for start in range(0, local_candidates.shape[0], batch_size):
        candidates = local_candidates[start : start + batch_size]
        queries = torch.repeat_interleave(local_q.unsqueeze(0), candidates.shape[0], 0)
        points = original_head_forward(head, compute_similarity(queries, candidates))
        thetas = kornia.geometry.homography.find_homography_dlt(points[:, :4], points[:, 4:], None)
        scores[start : start + batch_size] = per_pair_match_scores(local_q, candidates, thetas, kps).cpu().numpy()
    return scores


def timed(fn, repeats: int = 1):
    """(result of the last call, seconds per call)."""
    start = time.perf_counter()
    for _ in range(repeats):
        result = fn()
    return result, (time.perf_counter() - start) / repeats


def top1(scores: np.ndarray) -> int:
    """Index ranked first by the original's ``argsort()[::-1]`` (the last of tied maxima)."""
    return int(scores.argsort()[::-1][0])


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, resize {tuple(args.resize)}")
    start = time.perf_counter()
    local_q, local_candidates = build_features(args)
    num_queries, num_candidates = local_candidates.shape[:2]
    num_pairs = num_queries * num_candidates
    print(
        f"{num_queries} queries x {num_candidates} candidates, local features {tuple(local_q.shape[1:])} "
        f"(extracted in {time.perf_counter() - start:.1f} s, not timed)"
    )
    torch.manual_seed(args.seed)
    head = HomographyRegression(resize=tuple(args.resize)).eval()
    with torch.no_grad():  # spread the random head's corners over the image, as a trained head's are
        height, width = args.resize
        corners = torch.tensor([[8, 8], [width - 8, 8], [8, height - 8], [width - 8, height - 8]], dtype=torch.float)
        head.linear.bias.copy_(torch.cat([corners, corners]).flatten())
        head.linear.weight.mul_(0.1)

    def batched(amp: bool) -> list[np.ndarray]:
        return [
            rerank_scores(head, local_q[q], local_candidates[q], args.batch_size, amp=amp).numpy()
            for q in range(num_queries)
        ]

    def per_pair() -> list[np.ndarray]:
        return [
            per_pair_rerank_scores(head, local_q[q], local_candidates[q], args.batch_size) for q in range(num_queries)
        ]

    # Warm-up on one query, untimed.
    rerank_scores(head, local_q[0], local_candidates[0, : args.batch_size], args.batch_size)
    rerank_scores(head, local_q[0], local_candidates[0, : args.batch_size], args.batch_size, amp=True)
    scores_batched, time_batched = timed(lambda: batched(False))
    scores_per_pair, time_per_pair = timed(per_pair)
    scores_amp, time_amp = timed(lambda: batched(True))
    max_difference = max(np.abs(a - b).max() for a, b in zip(scores_batched, scores_per_pair))

    # The scoring stage alone, given the head's points (as a fast head on an accelerator would leave it).
    with torch.inference_mode():
        points = [
            head(compute_similarity(local_q[q : q + 1].expand(num_candidates, -1, -1, -1), local_candidates[q]))
            for q in range(num_queries)
        ]
        thetas = [points_to_homography(p) for p in points]
    kps = original_keypoints(tuple(args.resize))
    _, time_scoring_batched = timed(
        lambda: [inlier_scores(local_q[q : q + 1], local_candidates[q], thetas[q]) for q in range(num_queries)],
        args.repeats,
    )
    _, time_scoring_per_pair = timed(
        lambda: [per_pair_match_scores(local_q[q], local_candidates[q], thetas[q], kps) for q in range(num_queries)],
        args.repeats,
    )

    print(f"\n{'path':<44} {'pairs/s':>9} {'ratio':>7}")
    print(f"{'(b) per pair, as the original':<44} {num_pairs / time_per_pair:9.2f} {1:7.2f}")
    print(f"{'(a) batched (rerank_scores)':<44} {num_pairs / time_batched:9.2f} {time_per_pair / time_batched:7.2f}")
    print(f"{'(c) batched, head under autocast bf16 (--amp)':<44} {num_pairs / time_amp:9.2f} ", end="")
    print(f"{time_per_pair / time_amp:7.2f}   ({time_batched / time_amp:.2f}x (a))")
    print(f"{'scoring only, per pair':<44} {num_pairs / time_scoring_per_pair:9.1f} {1:7.2f}")
    print(
        f"{'scoring only, batched (inlier_scores)':<44} {num_pairs / time_scoring_batched:9.1f} "
        f"{time_scoring_per_pair / time_scoring_batched:7.2f}"
    )
    print(f"\nlargest score difference, batched vs per pair: {max_difference:.0f} inliers")
    top1_agree = np.mean([top1(a) == top1(b) for a, b in zip(scores_batched, scores_amp)])
    mean_change = np.mean([np.abs(a - b).mean() for a, b in zip(scores_batched, scores_amp)])
    print(
        f"top-1 after re-ranking, fp32 vs amp: same for {top1_agree:.0%} of {num_queries} queries; "
        f"mean |score change| {mean_change:.2f} inliers (random weights: only indicative)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_queries", type=int, default=4, help="queries to re-rank")
    parser.add_argument("--num_reranked_preds", type=int, default=32, help="candidates re-ranked per query")
    parser.add_argument("--resize", type=int, nargs=2, default=[384, 384], metavar=("H", "W"), help="image size")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--batch_size", type=int, default=32, help="pairs per pass of the head (infer_batch_size)")
    parser.add_argument("--warped_copies", type=int, default=4, help="warped copies of the query among its candidates")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions of the scoring-only stage")
    parser.add_argument("--seed", type=int, default=0, help="seed of the images and the weights")
    args = parser.parse_args()
    if any(size <= 0 or size % PATCH_SIZE for size in args.resize):
        parser.error(f"--resize: each side must be a positive multiple of {PATCH_SIZE}")
    if min(args.num_queries, args.num_reranked_preds, args.threads, args.batch_size, args.repeats) < 1:
        parser.error("--num_queries, --num_reranked_preds, --threads, --batch_size and --repeats must be positive")
    main(args)

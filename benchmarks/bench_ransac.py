"""How closely the batched RANSAC of model.ransac reproduces OpenCV's inlier count k, and how fast it is.

The REI loss averages the k smallest reprojection errors, where the original took k from
``cv2.findHomography(query_kps, cand_kps, cv2.RANSAC, 24)``. This compares k on match sets like the ones the loss
sees (mutual nearest neighbours on the 24x24 grid of keypoints):
- "reference": the parity reference's local features (tests/data/parity_reference.pt), every ordered pair of its
  four images, each with a few perturbations of the features at fp16 rounding level;
- "synthetic": random homographies, 5 to 450 matches, 10% to 100% inliers (snapped to the grid, some one patch
  off), the rest random grid positions.

OpenCV is optional (the project does not depend on it): without it only the timings of this implementation and
of kornia's RANSAC are printed. With it, it also prints how often OpenCV agrees with itself when the same matches
are given in another order (its random samples change), the natural spread of k to compare against.

    python -m benchmarks.bench_ransac [--cases 300] [--threads 2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from model.geometry import keypoints
from model.matching import matched_keypoints
from model.ransac import RANSAC_THRESHOLD, find_homography_ransac

try:
    import cv2
except ImportError:  # optional
    cv2 = None

REFERENCE = Path(__file__).resolve().parents[1] / "tests" / "data" / "parity_reference.pt"


def reference_cases(perturbations: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    features = torch.load(REFERENCE, weights_only=True)["local_features_fp16"].float()
    generator = torch.Generator().manual_seed(seed)
    cases = []
    for trial in range(perturbations):
        noisy = features
        if trial:
            ulp = features.abs().mul(2.0**-11).clamp_min(2.0**-24)
            noisy = features + (torch.rand(features.shape, generator=generator) - 0.5) * ulp
        for q in range(4):
            for c in range(4):
                if q != c:
                    query_points, cand_points, valid = matched_keypoints(noisy[q : q + 1], noisy[c : c + 1])
                    cases.append((query_points[0, valid[0]].numpy(), cand_points[0, valid[0]].numpy()))
    return cases


def synthetic_cases(num_cases: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    kps = keypoints((24, 24)).numpy()
    corners = np.array([[0, 0], [384, 0], [0, 384], [384, 384]], dtype=np.float64)
    cases = []
    while len(cases) < num_cases:
        shift = rng.choice([20.0, 60.0, 100.0])
        moved = corners + rng.uniform(-shift, shift, corners.shape)
        H = _four_point_homography(corners, moved)
        num = int(rng.choice([5, 8, 12, 20, 40, 80, 150, 300, 450]))
        inlier_ratio = rng.uniform(0.1, 1.0)
        query_idx = rng.choice(576, size=num, replace=False)
        projected = np.c_[kps[query_idx], np.ones(num)] @ H.T
        projected = projected[:, :2] / projected[:, 2:]
        col = np.clip(np.rint((projected[:, 0] - 8) / 16), 0, 23)
        row = np.clip(np.rint((projected[:, 1] - 8) / 16), 0, 23)
        off_by_one = rng.random(num) < 0.2  # matches of real features are often a patch off
        col = np.clip(col + off_by_one * rng.integers(-1, 2, num), 0, 23)
        cand_idx = (row * 24 + col).astype(int)
        outliers = rng.random(num) > inlier_ratio
        cand_idx[outliers] = rng.integers(0, 576, outliers.sum())
        _, first = np.unique(cand_idx, return_index=True)  # mutual matches have distinct candidates
        keep = np.sort(first)
        if len(keep) >= 5:
            cases.append((kps[query_idx[keep]], kps[cand_idx[keep]]))
    return cases


def _four_point_homography(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    rows = []
    for (x, y), (u, v) in zip(src, dst):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y, -u])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y, -v])
    return np.linalg.svd(np.array(rows))[2][-1].reshape(3, 3)


def opencv_k(src: np.ndarray, dst: np.ndarray) -> int:
    H, mask = cv2.findHomography(src, dst, cv2.RANSAC, ransacReprojThreshold=RANSAC_THRESHOLD)
    return 0 if H is None or mask is None else int(mask.sum())


def batched_k(cases: list[tuple[np.ndarray, np.ndarray]], seed: int, **kwargs) -> np.ndarray:
    """k of every case by model.ransac.find_homography_ransac, all cases in one batch."""
    num = max(len(src) for src, _ in cases)
    src = torch.zeros(len(cases), num, 2)
    dst = torch.zeros(len(cases), num, 2)
    valid = torch.zeros(len(cases), num, dtype=torch.bool)
    for i, (s, d) in enumerate(cases):
        src[i, : len(s)], dst[i, : len(d)], valid[i, : len(s)] = torch.from_numpy(s), torch.from_numpy(d), True
    _, inliers, _ = find_homography_ransac(src, dst, valid, seed=seed, **kwargs)
    return inliers.sum(dim=1).numpy()


def kornia_k(src: np.ndarray, dst: np.ndarray, seed: int) -> int:
    from kornia.geometry.ransac import RANSAC

    ransac = RANSAC("homography", inl_th=RANSAC_THRESHOLD, max_iter=1, max_samples=2000, confidence=0.995, seed=seed)
    _, mask = ransac(torch.from_numpy(src), torch.from_numpy(dst))
    return int(mask.sum())


def agreement(name: str, k: np.ndarray, k_ref: np.ndarray) -> str:
    diff = np.abs(k - k_ref)
    large = k_ref >= 20
    return (
        f"{name:<36} exact {np.mean(diff == 0):6.1%}   |dk|<=1 {np.mean(diff <= 1):6.1%}   "
        f"|dk|<=2% of k {np.mean(diff <= 0.02 * k_ref):6.1%}   mean |dk| {diff.mean():5.2f}   "
        f"k>=20: mean |dk|/k {np.mean(diff[large] / k_ref[large]) if large.any() else 0:6.2%}"
    )


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    sets = {
        "reference": reference_cases(args.perturbations, args.seed),
        "synthetic": synthetic_cases(args.cases, args.seed),
    }
    for set_name, cases in sets.items():
        sizes = np.array([len(s) for s, _ in cases])
        print(f"\n== {set_name}: {len(cases)} match sets, {sizes.min()}-{sizes.max()} matches", end=" ")
        print(f"(median {np.median(sizes):.0f})")
        k_mine = batched_k(cases, args.seed)
        # A set's k depends on the set and the seed alone: the same in the batch and one set at a time.
        k_alone = np.concatenate([batched_k([case], args.seed) for case in cases])
        print(f"batched: k of each set alone equals k in the batch for {np.mean(k_alone == k_mine):.1%} of the sets")
        k_mine_other_seed = batched_k(cases, args.seed + 1)
        k_no_refine = batched_k(cases, args.seed, refine=False)
        k_kornia = np.array([kornia_k(s, d, args.seed) for s, d in cases])
        if cv2 is None:
            print("OpenCV not installed: k agreement not measured")
            print(agreement("batched vs batched (other seed)", k_mine, k_mine_other_seed))
            continue
        k_cv = np.array([opencv_k(s, d) for s, d in cases])
        rng = np.random.default_rng(args.seed)
        permuted = [rng.permutation(len(s)) for s, _ in cases]
        k_cv_permuted = np.array([opencv_k(s[p], d[p]) for (s, d), p in zip(cases, permuted)])
        print(agreement("OpenCV vs OpenCV (matches permuted)", k_cv_permuted, k_cv))
        print(agreement("batched vs OpenCV", k_mine, k_cv))
        print(agreement("batched (other seed) vs OpenCV", k_mine_other_seed, k_cv))
        print(agreement("batched, no refit vs OpenCV", k_no_refine, k_cv))
        print(agreement("kornia RANSAC vs OpenCV", k_kornia, k_cv))

    # Speed: a training batch's worth of pairs with many matches (the reference's larger sets), and every
    # synthetic set (fewer matches, many with few inliers, which need many hypotheses) in one batch.
    speed_sets = {
        "reference, large sets": [c for c in sets["reference"] if len(c[0]) >= 100][: args.batch],
        "synthetic, all sets": sets["synthetic"],
    }
    for set_name, cases in speed_sets.items():
        sizes = np.mean([len(s) for s, _ in cases])
        print(f"\n== speed, {set_name}: {len(cases)} pairs in one batch, {sizes:.0f} matches on average")
        timings = {"batched (one call)": lambda cases=cases: batched_k(cases, args.seed)}
        timings["batched, confidence 1 (2000 hypotheses)"] = lambda cases=cases: batched_k(
            cases, args.seed, confidence=1.0
        )
        timings["kornia RANSAC (loop over pairs)"] = lambda cases=cases: [kornia_k(s, d, args.seed) for s, d in cases]
        if cv2 is not None:
            timings["OpenCV (loop over pairs)"] = lambda cases=cases: [opencv_k(s, d) for s, d in cases]
        for name, fn in timings.items():
            fn()
            start = time.perf_counter()
            for _ in range(args.repeats):
                fn()
            elapsed = (time.perf_counter() - start) / args.repeats
            print(f"{name:<42} {elapsed * 1e3:8.1f} ms per batch  {len(cases) / elapsed:8.1f} pairs/s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=300, help="number of synthetic match sets")
    parser.add_argument("--perturbations", type=int, default=10, help="feature perturbations of the reference pairs")
    parser.add_argument("--batch", type=int, default=32, help="pairs per batch in the speed test")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0, help="seed of the cases and of RANSAC's sample stream")
    main(parser.parse_args())

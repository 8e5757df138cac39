"""Re-ranking throughput: the original-style per-pair path, our kernel at several pass sizes, and eval.py's
re-ranking stage end to end, fp32 and amp, on CPU or CUDA.

1. Kernel, at ``--resize`` (384 x 384 by default), on local features precomputed by a random-weight
   FeaturesExtractor from procedural images (per query: the query texture, a few perspective-warped copies of it
   among its ``--num_reranked_preds`` candidates, the rest distractors), feature extraction not timed:
   (b) per pair, as the original's test.py: the head (its nn.TransformerEncoder modules, as the original ran
       them) on chunks of 32 pairs, then a Python loop over the candidates with a ``nonzero`` per pair, numpy
       keypoints and CPU round trips;
   (a) ours: ``model.rerank.rerank_scores`` (correlation -> head -> DLT -> inlier count, all pairs of a pass
       at once) at each ``--pass_sizes``, queries filling the passes; on CPU also with the head's linears on
       aten's kernels (``model.dhe.set_cpu_kernels("aten")``: MKL's sgemm) instead of the automatic choice;
   (c) (a) with the head under autocast (bf16; fp16 on GPUs without bf16): the ``--amp`` path.
   Every variant runs ``--rounds`` times, interleaved (b, a, a', c, ... b, a, ...), and the best round counts, so
   that load from other processes (a shared CPU) hits them alike; the median is printed too.
2. End to end: ``eval.py`` on a generated synthetic world with ``--e2e_queries`` test queries and
   ``--e2e_database`` database images at ``--e2e_resize``, random weights, fp32 then ``--amp``; its re-ranking
   stage (reading the local features, the head, DLT, scoring, sorting) against the kernel's rate at the same size
   and pass size, as a fraction.

    python -m benchmarks.bench_rerank --quick            # CPU, a few minutes: 2 queries at 384, e2e at 128 x 128
    python -m benchmarks.bench_rerank --device cuda      # GPU: 16 queries at 384, e2e 500 queries at 384
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import kornia
import numpy as np
import torch
import torch.nn.functional as F

import commons
import datasets_ws
import util
from evaluation import reranking
from evaluation.local_features import default_rerank_batch_size
from evaluation.pipeline import EvalSettings, evaluate
from model import FeaturesExtractor, HomographyRegression, compute_similarity, dhe
from model.dhe import init_spread_corners_
from model.features_extractor import PATCH_SIZE
from model.precision import COMPILE_MODES
from model.rerank import rerank_scores

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


def timed(fn, device: torch.device):
    """(result, seconds) of one call, synchronising a GPU around it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


def top1(scores: np.ndarray) -> int:
    """Index ranked first by the original's ``argsort()[::-1]`` (the last of tied maxima)."""
    return int(scores.argsort()[::-1][0])


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        model = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in model.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        model = platform.processor() or "unknown CPU"
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    extras = [flag for flag in ("avx512f", "avx512_bf16", "amx_bf16") if f" {flag}" in flags]
    return f"{model} ({os.cpu_count()} CPUs; {', '.join(extras) or 'no AVX-512'})"


def kernel_section(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Section 1; returns pairs/s of each variant."""
    start = time.perf_counter()
    local_q, local_candidates = build_features(args)
    local_q, local_candidates = local_q.to(device), local_candidates.to(device)
    num_queries, num_candidates = local_candidates.shape[:2]
    num_pairs = num_queries * num_candidates
    print(
        f"\n1. kernel: {num_queries} queries x {num_candidates} candidates at {tuple(args.resize)}, local features "
        f"{tuple(local_q.shape[1:])} (extracted in {time.perf_counter() - start:.1f} s, not timed)"
    )
    torch.manual_seed(args.seed)
    head = init_spread_corners_(HomographyRegression(resize=tuple(args.resize)).eval()).to(device)
    automatic = dhe.cpu_kernels()

    def ours(pass_size: int, amp: bool, kernels: str = "auto"):
        def run():
            dhe.set_cpu_kernels(kernels)
            try:
                return rerank_scores(head, local_q, local_candidates, pass_size, amp=amp).cpu().numpy()
            finally:
                dhe.set_cpu_kernels("auto")

        return run

    def per_pair():
        return np.stack([per_pair_rerank_scores(head, local_q[q], local_candidates[q], 32) for q in range(num_queries)])

    variants = {"(b) per pair, as the original (fp32)": per_pair}
    for pass_size in args.pass_sizes:
        variants[f"(a) ours fp32, {pass_size} pairs a pass"] = ours(pass_size, False)
    if device.type == "cpu" and automatic != "aten":
        variants[f"(a') ours fp32, {args.pass_sizes[0]} a pass, aten kernels"] = ours(args.pass_sizes[0], False, "aten")
    for pass_size in args.pass_sizes:
        variants[f"(c) ours amp, {pass_size} pairs a pass"] = ours(pass_size, True)
    if device.type == "cpu" and automatic != "aten":
        variants[f"(c') ours amp, {args.pass_sizes[0]} a pass, aten kernels"] = ours(args.pass_sizes[0], True, "aten")
    # Warm-up (oneDNN primitives, CUDA kernels and allocator) on one query, untimed.
    for pass_size in args.pass_sizes:
        for amp in (False, True):
            rerank_scores(head, local_q[:1], local_candidates[:1], pass_size, amp=amp)
    seconds = {name: [] for name in variants}
    results = {}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            results[name], elapsed = timed(fn, device)
            seconds[name].append(elapsed)
    baseline = num_pairs / min(seconds["(b) per pair, as the original (fp32)"])
    print(f"{'path':<48} {'pairs/s':>9} {'median':>9} {'x (b)':>7}   (best of {args.rounds} interleaved rounds)")
    rates = {}
    for name in variants:
        rates[name] = num_pairs / min(seconds[name])
        median = num_pairs / statistics.median(seconds[name])
        print(f"{name:<48} {rates[name]:9.2f} {median:9.2f} {rates[name] / baseline:7.2f}")
    fp32 = results[f"(a) ours fp32, {args.pass_sizes[0]} pairs a pass"]
    amp = results[f"(c) ours amp, {args.pass_sizes[0]} pairs a pass"]
    difference = np.abs(fp32 - results["(b) per pair, as the original (fp32)"]).max()
    print(f"largest score difference, ours fp32 vs per pair: {difference:.0f} inliers")
    agree = np.mean([top1(a) == top1(b) for a, b in zip(fp32, amp)])
    print(
        f"top-1 after re-ranking, fp32 vs amp: same for {agree:.0%} of {num_queries} queries; mean |score change| "
        f"{np.abs(fp32 - amp).mean():.2f} inliers (random weights: only indicative; see bench_amp_agreement.py)"
    )
    return rates


def end_to_end_section(args: argparse.Namespace, device: torch.device) -> None:
    """Section 2: eval.py's re-ranking stage (`evaluation.pipeline.evaluate`) against the kernel at the same size and
    pass size."""
    from model import FeaturesExtractor
    from model.checkpoints import save_state_dict
    from tools.synthetic.world import generate_world

    resize = tuple(args.e2e_resize)
    pass_size = args.e2e_pass_size or default_rerank_batch_size(device)
    print(
        f"\n2. eval.py end to end: {args.e2e_queries} queries x {args.num_reranked_preds} candidates, "
        f"{args.e2e_database} database images at {resize}, {pass_size} pairs a pass, random weights"
    )
    with tempfile.TemporaryDirectory() as temporary:
        temporary = Path(temporary)
        start = time.perf_counter()
        generate_world(
            temporary / "worlds",
            "bench",
            image_size=resize,
            database_per_split=(2, 2, args.e2e_database),
            queries_per_split=(1, 1, args.e2e_queries),
        )
        torch.manual_seed(args.seed)
        save_state_dict(FeaturesExtractor(resize=resize, trunc_te=args.e2e_trunc_te), temporary / "fe.torch")
        torch.manual_seed(args.seed)
        head = init_spread_corners_(HomographyRegression(resize=resize).eval())
        save_state_dict(head, temporary / "hr.torch")
        print(f"world and checkpoints in {time.perf_counter() - start:.1f} s (not timed)")
        model_config = commons.ModelConfig(
            resize, args.e2e_trunc_te, resume_fe=str(temporary / "fe.torch"), resume_hr=str(temporary / "hr.torch")
        )
        settings = EvalSettings(
            recall_values=(1,),
            num_reranked_preds=args.num_reranked_preds,
            rerank_batch_size=pass_size,
            num_workers=args.num_workers,
            compile_head=args.compile_head,
        )

        # The kernel's rate at the same size: rerank_scores on random unit features, in memory, same pass size.
        generator = torch.Generator().manual_seed(args.seed)
        grid = (resize[0] // PATCH_SIZE, resize[1] // PATCH_SIZE)
        kernel_queries = max(1, 4 * pass_size // args.num_reranked_preds)  # 4 passes
        local_q = F.normalize(torch.randn(kernel_queries, 384, *grid, generator=generator), dim=1).to(device)
        local_c = F.normalize(
            torch.randn(kernel_queries, args.num_reranked_preds, 384, *grid, generator=generator), dim=2
        ).to(device)
        head = head.to(device)
        print(f"{'precision':<10} {'kernel pairs/s':>15} {'eval.py pairs/s':>16} {'fraction':>9}")
        for amp in (False, True):

            def kernel_rate(amp: bool = amp) -> float:
                _, seconds = timed(lambda: rerank_scores(head, local_q, local_c, pass_size, amp=amp), device)
                return local_c.shape[0] * local_c.shape[1] / seconds

            kernel_rate()  # warm-up
            before = kernel_rate()
            name = "amp" if amp else "fp32"
            commons.make_deterministic(0)  # as eval.py
            (temporary / name).mkdir()
            result = evaluate(
                dataclasses.replace(settings, amp=amp, exp_name=name),
                model_config,
                str(temporary / "worlds"),
                "bench",
                25,
                device,
                temporary / name,
            )
            pairs = result["rerank_scores"].size
            e2e_rate = pairs / result["rerank_seconds"]
            # The better of the rates measured just before and after the run (the machine's load may vary).
            kernel_rate = max(before, kernel_rate())
            print(f"{name:<10} {kernel_rate:15.2f} {e2e_rate:16.2f} {e2e_rate / kernel_rate:9.0%}", flush=True)


def main(args: argparse.Namespace) -> None:
    device = commons.resolve_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    logging.disable(logging.INFO)  # the evaluation's log lines would bury the figures
    util.tqdm = functools.partial(util.tqdm, disable=True)  # and so would its progress bars
    reranking.tqdm = functools.partial(reranking.tqdm, disable=True)
    print(
        f"{device_name(device)}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"head kernels on CPU: {dhe.cpu_kernels()}"
    )
    if not args.skip_kernel:
        kernel_section(args, device)
    if not args.skip_e2e:
        end_to_end_section(args, device)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="where to run")
    parser.add_argument("--quick", action="store_true", help="CPU defaults that finish in a few minutes")
    parser.add_argument("--num_queries", type=int, default=None, help="kernel: queries (default 16; --quick 2)")
    parser.add_argument("--num_reranked_preds", type=int, default=32, help="candidates re-ranked per query")
    parser.add_argument("--resize", type=int, nargs=2, default=[384, 384], metavar=("H", "W"), help="kernel size")
    parser.add_argument(
        "--pass_sizes",
        type=int,
        nargs="+",
        default=None,
        help="kernel: pairs a pass (CPU 16 32 8; CUDA 512 128 32 1024)",
    )
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 3; --quick 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--warped_copies", type=int, default=4, help="warped copies of the query among its candidates")
    parser.add_argument("--e2e_queries", type=int, default=500, help="end to end: test queries of the world")
    parser.add_argument("--e2e_database", type=int, default=64, help="end to end: database images of the world")
    parser.add_argument(
        "--e2e_resize", type=int, nargs=2, default=None, metavar=("H", "W"), help="end to end: size (--quick: 128)"
    )
    parser.add_argument(
        "--e2e_trunc_te", type=int, default=None, help="end to end: CCT blocks of the features extractor (8; --quick 2)"
    )
    parser.add_argument("--e2e_pass_size", type=int, default=None, help="end to end: --rerank_batch_size")
    parser.add_argument("--num_workers", type=int, default=2, help="end to end: eval.py's --num_workers")
    parser.add_argument("--compile_head", default="none", choices=COMPILE_MODES, help="end to end: --compile_head")
    parser.add_argument("--skip_kernel", action="store_true", help="skip section 1")
    parser.add_argument("--skip_e2e", action="store_true", help="skip section 2")
    parser.add_argument("--batch_size", type=int, default=32, help="features extraction batch size (not timed)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the images and the weights")
    args = parser.parse_args()
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.num_queries is None:
        args.num_queries = 2 if args.quick else 16
    if args.pass_sizes is None:
        args.pass_sizes = [16, 32, 8] if not cuda else [512, 128, 32, 1024]
    if args.rounds is None:
        args.rounds = 2 if args.quick else 3
    if args.e2e_trunc_te is None:
        args.e2e_trunc_te = 2 if args.quick else 8
    if args.e2e_resize is None:
        args.e2e_resize = [128, 128] if args.quick else list(args.resize)
    for name in ("resize", "e2e_resize"):
        if any(size <= 0 or size % PATCH_SIZE for size in getattr(args, name)):
            parser.error(f"--{name}: each side must be a positive multiple of {PATCH_SIZE}")
    positive = ["num_queries", "num_reranked_preds", "threads", "rounds", "e2e_queries", "e2e_database", "batch_size"]
    if min(getattr(args, name) for name in positive) < 1 or min(args.pass_sizes) < 1:
        parser.error(f"--{', --'.join(positive)} and --pass_sizes must be positive")
    if args.e2e_database < args.num_reranked_preds:
        parser.error("--e2e_database must be at least --num_reranked_preds")
    main(args)

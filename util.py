"""Global descriptors of a dataset (`extract_features`, with the local features going to a store) and the files of
an evaluation's results (`results.json`, `predictions.csv`)."""

from __future__ import annotations

import csv
import ctypes
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from evaluation.local_features import LocalFeatureStore
from interrupts import raise_if_interrupted, worker_init
from model.files import replaced_atomically

__all__ = ["extract_features", "check_finite_descriptors", "save_predictions", "save_results"]


def _glibc_malloc_trim() -> Callable[[], None]:
    """`malloc_trim(0)` of glibc, or a no-op where there is none (macOS, musl, Windows)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return lambda: None
    return lambda: trim(0)


# Decoding and resizing images and the per-batch tensors leave glibc's heap fragmented: freed memory stays with the
# process and the resident size grows with the number of batches (about 170 KB per image at 192 x 192, measured with
# benchmarks/bench_eval_memory.py). Handing it back after each batch keeps the peak flat.
release_freed_memory = _glibc_malloc_trim()


def extract_features(
    features_extractor: nn.Module,
    images: Dataset,
    device: torch.device,
    batch_size: int,
    num_workers: int = 0,
    store: LocalFeatureStore | None = None,
    desc: str = "features",
) -> np.ndarray:
    """Global descriptors (N, D) float32 of a Dataset yielding (image, index), in its order.

    Images may be (3, H, W), or (K, 3, H, W) crops whose descriptors are then returned as (N * K, D) in image-major
    order. When `store` is given, the L2-normalised local features (B, C, h, w) of single images go to it at the
    yielded indexes. The model runs in eval mode and gets its train/eval mode back afterwards.
    """
    loader = DataLoader(
        images,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        worker_init_fn=worker_init,
    )
    was_training = features_extractor.training
    features_extractor.eval()
    descriptors = []
    with torch.inference_mode():
        for batch, indexes in tqdm(loader, desc=desc, ncols=100, leave=False):
            raise_if_interrupted()
            crops = batch.dim() == 5
            batch = batch.flatten(0, 1) if crops else batch
            global_descriptors, local_features = features_extractor(batch.to(device, non_blocking=True))
            descriptors.append(global_descriptors.float().cpu().numpy())
            if store is not None:
                if crops:
                    raise ValueError("local features are stored for single images only, got crops")
                store.write(indexes.tolist(), local_features)
            release_freed_memory()
    features_extractor.train(was_training)
    return np.concatenate(descriptors).astype(np.float32, copy=False)


def check_finite_descriptors(
    descriptors: np.ndarray, paths: Sequence[str], what: str, checkpoint: str | None = None
) -> None:
    """Raise ValueError naming the images whose descriptors (N * K, D) (K rows per path) are NaN or infinite.

    Non-finite descriptors come from non-finite weights or an overflow; faiss would rank them arbitrarily.
    """
    rows = ~np.isfinite(descriptors).all(axis=1)
    if rows.any():
        per_path = max(1, len(descriptors) // max(1, len(paths)))
        images = np.unique(np.flatnonzero(rows) // per_path)
        source = f"the checkpoint {checkpoint}" if checkpoint else "its (random) initialisation"
        raise ValueError(
            f"the features extractor gave non-finite (NaN or infinite) {what} descriptors for {len(images)} of "
            f"{len(paths)} images, e.g. {paths[images[0]]}; check its weights ({source}), and try without --amp"
        )


def save_predictions(
    path: str | Path,
    queries_paths: Sequence[str],
    database_paths: Sequence[str],
    predictions: np.ndarray,
    distances: np.ndarray,
    reranked: np.ndarray,
    rerank_scores: np.ndarray,
) -> None:
    """Write every query's predictions before and after re-ranking to a CSV, atomically.

    Columns: query_index, query_path, stage ("global" or "reranked"), rank, database_index, database_path, score
    (squared L2 descriptor distance for "global", DHE inlier count for "reranked"; empty past the re-ranked head).
    The file is UTF-8; a path that is not valid UTF-8 is written as its exact bytes, so it still names the file.
    """
    path = Path(path)
    with replaced_atomically(path) as temporary:
        with open(temporary, "w", newline="", encoding="utf-8", errors="surrogateescape") as file:
            writer = csv.writer(file)
            writer.writerow(["query_index", "query_path", "stage", "rank", "database_index", "database_path", "score"])
            for query, query_path in enumerate(queries_paths):
                for stage, ranking, scores in (
                    ("global", predictions[query], distances[query]),
                    ("reranked", reranked[query], rerank_scores[query]),
                ):
                    for rank, database_index in enumerate(ranking):
                        score = f"{scores[rank]:.6g}" if rank < len(scores) else ""
                        writer.writerow(
                            [query, query_path, stage, rank, int(database_index), database_paths[database_index], score]
                        )


def save_results(
    path: str | Path,
    recall_values: Sequence[int],
    baseline: Sequence[float] | None,
    reranked: Sequence[float] | None,
    **extra: object,
) -> None:
    """Write `{"baseline": {"R@1": ..}, "reranked": {"R@1": ..}, **extra}` (recalls in percent) as JSON, atomically.

    A stage that was not computed is null. `extra` holds JSON-serialisable values (split, epoch, ...).
    """

    def as_dict(recalls: Sequence[float] | None) -> dict[str, float] | None:
        if recalls is None:
            return None
        return {f"R@{n}": round(float(value), 6) for n, value in zip(recall_values, recalls)}

    path = Path(path)
    content = {"baseline": as_dict(baseline), "reranked": as_dict(reranked), **extra}
    with replaced_atomically(path) as temporary:
        temporary.write_text(json.dumps(content, indent=2) + "\n")

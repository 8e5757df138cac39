"""Evaluation building blocks: descriptors, the on-disk local-feature store, faiss search, recalls, re-ranking.

Memory stays bounded by the global descriptors (N x 384 float32): local feature maps are written as float16 to a
file in the run folder (`LocalFeatureStore`) and read back, one pass of the head's pairs at a time, with positioned
reads (not a memory map, whose touched pages would count towards the process's resident memory), except those that
fit in an explicit memory budget (GPU memory on CUDA by default).
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import errno
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import faiss
import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from interrupts import raise_if_interrupted, worker_init
from model.files import replaced_atomically
from model.rerank import rerank_order as _rerank_order

__all__ = [
    "LocalFeatureStore",
    "extract_features",
    "check_finite_descriptors",
    "search",
    "merge_crop_predictions",
    "compute_recalls",
    "recalls_to_str",
    "rerank_predictions",
    "default_rerank_batch_size",
    "local_features_memory_budget",
    "save_predictions",
    "save_results",
]


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


_OUT_OF_SPACE = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}
_MOVE_HINT = "free some space, or put the file on another disk with --local_features_dir DIR"


def _file_size_limit() -> int | None:
    """The soft RLIMIT_FSIZE in bytes (`ulimit -f`), or None when there is none (or no `resource`, on Windows)."""
    try:
        import resource
    except ImportError:
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else int(soft)


class LocalFeatureStore:
    """Fixed-size float16 records of local features (C, h, w), one per image index, in memory and in a file.

    The first `num_in_memory` records (the database comes first in a dataset's indexes, and its records are read
    again and again by the re-ranking) live in one float16 tensor on `memory_device` (host RAM or GPU memory),
    bounded by `memory_budget_bytes`; the others in a file, read back with positioned reads (not a memory map,
    whose touched pages would count towards the process's resident memory).

    The file's final size (`file_bytes`) is known at the start: the free space of its disk and the file-size limit
    are checked before anything is extracted, and a write that fails later for lack of space raises the same clear
    OSError (ENOSPC/EFBIG) naming the file, the size and `--local_features_dir`.

    Args:
        path: the file; created (truncated) here and deleted by `close(delete=True)`. It holds the records that do
            not fit in memory (`file_bytes`), and is created empty when all of them fit.
        num_records: how many images.
        feature_shape: (C, h, w) of one record.
        memory_budget_bytes: at most this many bytes of records are kept in memory (0: all in the file).
        memory_device: where the in-memory records live.
    """

    def __init__(
        self,
        path: str | Path,
        num_records: int,
        feature_shape: tuple[int, int, int],
        memory_budget_bytes: int = 0,
        memory_device: torch.device | str = "cpu",
    ) -> None:
        if memory_budget_bytes < 0:
            raise ValueError(f"memory_budget_bytes must be >= 0, got {memory_budget_bytes}")
        self.path = Path(path)
        self.num_records = num_records
        self.feature_shape = tuple(feature_shape)
        self.record_bytes = int(np.prod(self.feature_shape)) * 2
        self.num_in_memory = min(num_records, memory_budget_bytes // self.record_bytes)
        self.memory_device = torch.device(memory_device)
        self.file_bytes = self.record_bytes * (num_records - self.num_in_memory)
        self._fd = None
        self._check_room()
        self._memory = torch.empty((self.num_in_memory, *self.feature_shape), dtype=torch.float16, device=memory_device)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(self._fd, self.file_bytes)
        except OSError as error:
            self.close()
            if error.errno in _OUT_OF_SPACE:
                raise self._out_of_space(error) from error
            raise

    @property
    def memory_bytes(self) -> int:
        """Bytes of records held in memory (on `memory_device`)."""
        return self.num_in_memory * self.record_bytes

    def _need(self) -> str:
        return (
            f"the local features of {self.num_records - self.num_in_memory} images need {self.file_bytes / 1e9:.3g} "
            f"GB ({self.file_bytes} bytes) in {self.path}"
        )

    def _check_room(self) -> None:
        limit = _file_size_limit()
        if limit is not None and self.file_bytes > limit:
            raise OSError(
                errno.EFBIG,
                f"{self._need()}, more than this process's file-size limit of {limit} bytes (ulimit -f); raise the "
                f"limit, or put the file where another limit applies with --local_features_dir DIR",
            )
        free = shutil.disk_usage(self.path.parent).free
        if free < self.file_bytes:
            raise OSError(errno.ENOSPC, f"{self._need()}, but only {free / 1e9:.3g} GB are free there; {_MOVE_HINT}")

    def _out_of_space(self, error: OSError) -> OSError:
        return OSError(error.errno, f"writing {self.path} failed ({error.strerror}): {self._need()}; {_MOVE_HINT}")

    def write(self, indexes: Sequence[int], features: Tensor) -> None:
        """Store features (B, C, h, w) at `indexes` (B,)."""
        if tuple(features.shape[1:]) != self.feature_shape or len(indexes) != features.shape[0]:
            raise ValueError(
                f"expected ({len(indexes)}, {', '.join(map(str, self.feature_shape))}) features, "
                f"got {tuple(features.shape)}"
            )
        indexes = np.asarray(indexes, dtype=np.int64).reshape(-1)
        for index in indexes:
            self._check_index(int(index))
        features = features.detach()
        in_memory = indexes < self.num_in_memory
        if in_memory.any():
            rows = torch.from_numpy(np.flatnonzero(in_memory)).to(features.device)
            self._memory[torch.from_numpy(indexes[in_memory]).to(self.memory_device)] = features.index_select(
                0, rows
            ).to(self.memory_device, torch.float16)
        if not in_memory.all():
            rows = torch.from_numpy(np.flatnonzero(~in_memory)).to(features.device)
            array = features.index_select(0, rows).to("cpu", torch.float16).numpy()
            for index, record in zip(indexes[~in_memory], array):
                try:
                    written = os.pwrite(self._fd, record.tobytes(), self._offset(int(index)))
                except OSError as error:
                    if error.errno in _OUT_OF_SPACE:
                        raise self._out_of_space(error) from error
                    raise
                if written != self.record_bytes:  # a short write: the disk filled up during this one
                    raise self._out_of_space(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))

    def read(self, indexes: Sequence[int], device: torch.device | str = "cpu") -> Tensor:
        """Features (B, C, h, w) float16 of `indexes` (B,), on `device`."""
        return self.assemble(indexes, self.read_file_part(indexes), torch.device(device))

    def read_file_part(self, indexes: Sequence[int], pin_memory: bool = False) -> Tensor:
        """The records of `indexes` that are in the file, in their order: (F, C, h, w) float16 on the host, in
        pinned memory with `pin_memory` (for non-blocking copies to a GPU). The first half of `read`; it does not
        touch the in-memory records, so that a reader thread can run it while the model runs."""
        indexes = [int(index) for index in indexes]
        for index in indexes:
            self._check_index(index)
        in_file = [index for index in indexes if index >= self.num_in_memory]
        out = torch.empty((len(in_file), *self.feature_shape), dtype=torch.float16, pin_memory=pin_memory)
        buffer = out.view(torch.uint8).numpy().reshape(len(in_file), self.record_bytes)
        for slot, index in enumerate(in_file):
            if os.preadv(self._fd, [buffer[slot]], self._offset(index)) != self.record_bytes:
                raise OSError(f"{self.path}: short read of record {index} (the file was truncated?)")
        return out

    def assemble(self, indexes: Sequence[int], file_part: Tensor, device: torch.device) -> Tensor:
        """Features (B, C, h, w) float16 of `indexes` (B,) on `device`, from the in-memory records and `file_part`
        (from `read_file_part` of the same indexes), copied without blocking where the source is pinned."""
        indexes = np.asarray(indexes, dtype=np.int64).reshape(-1)
        in_memory = indexes < self.num_in_memory
        file_part = file_part.to(device, non_blocking=True)
        if not in_memory.any():
            return file_part
        from_memory = self._memory[torch.from_numpy(indexes[in_memory]).to(self.memory_device)].to(device)
        if in_memory.all():
            return from_memory
        out = torch.empty((len(indexes), *self.feature_shape), dtype=torch.float16, device=device)
        out[torch.from_numpy(np.flatnonzero(in_memory)).to(device)] = from_memory
        out[torch.from_numpy(np.flatnonzero(~in_memory)).to(device)] = file_part
        return out

    def _offset(self, index: int) -> int:
        return (index - self.num_in_memory) * self.record_bytes

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.num_records:
            raise IndexError(f"record {index} out of range for a store of {self.num_records}")

    def close(self, delete: bool = True) -> None:
        """Close the file, and delete it unless `delete=False`; free the in-memory records."""
        self._memory = self._memory[:0]
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if delete:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> LocalFeatureStore:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def default_rerank_batch_size(device: torch.device) -> int:
    """Pairs per pass of the DHE head when `--rerank_batch_size` is not given.

    CPU: 16. The head is ~30 GFLOP a pair, so the per-pass costs do not matter, while passes whose activations
    outgrow the cache are slower a pair (2-core AMD EPYC, 32 MB L3, single-thread CPU time per pair at 4/8/16/32
    pairs a pass: fp32 5.7/5.4/5.3/4.8 pairs/s, bf16 9.4/10.6/11.0/8.1 pairs/s). CUDA: 512 with >= 24 GiB of GPU
    memory, 128 with >= 8 GiB, else 32 (a pass needs ~15 MB of activations a pair in fp32).
    """
    if device.type != "cuda":
        return 16
    total = torch.cuda.get_device_properties(device).total_memory
    return 512 if total >= 24 * 2**30 else 128 if total >= 8 * 2**30 else 32


def local_features_memory_budget(requested_mb: int, device: torch.device) -> tuple[int, torch.device]:
    """(bytes, device) of the in-memory part of the `LocalFeatureStore` for `--local_features_in_memory_mb`.

    A budget >= 0 is taken as given, in GPU memory on CUDA and host RAM otherwise. -1 (automatic): on CUDA half of
    the GPU memory free now (after the models are loaded), which spares the file reads and host-to-GPU copies; on
    CPU 0, because the operating system's page cache already keeps a file that fits in RAM in RAM (without counting
    towards the process's memory) and a reader thread overlaps the reads with the head, which is the cost there.
    """
    if requested_mb >= 0:
        return requested_mb * 2**20, device
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2, device
    return 0, device


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


def search(database_descriptors: np.ndarray, queries_descriptors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact L2 kNN with faiss `IndexFlatL2`: (distances (Q, k'), predictions (Q, k')), k' = min(k, database size).

    faiss pads with -1 when the database is smaller than k; asking for no more than there is avoids that, with one
    warning.
    """
    database_num = database_descriptors.shape[0]
    if k > database_num:
        logging.warning(
            f"Asked for {k} predictions, but the database has only {database_num} images: using {database_num}"
        )
        k = database_num
    index = faiss.IndexFlatL2(database_descriptors.shape[1])
    index.add(np.ascontiguousarray(database_descriptors, dtype=np.float32))
    distances, predictions = index.search(np.ascontiguousarray(queries_descriptors, dtype=np.float32), k)
    if (predictions < 0).any():
        raise RuntimeError("faiss returned -1 (padding) as a prediction; this is a bug")
    return distances, predictions


def _vote(predictions: np.ndarray, distances: np.ndarray, top_n: int, weight: float) -> None:
    """Majority voting over the crops of one query (K, k), in place: a prediction found in the top `top_n` of
    several crops gets its distance lowered by weight * count / top_n there."""
    selected = slice(0, top_n)
    values, counts = np.unique(predictions[:, selected], return_counts=True)
    for value, count in zip(values[counts > 1], counts[counts > 1]):
        mask = predictions[:, selected] == value
        distances[:, selected][mask] -= weight * count / top_n


def merge_crop_predictions(
    distances: np.ndarray, predictions: np.ndarray, num_crops: int, k: int, test_method: str, majority_weight: float
) -> np.ndarray:
    """Merge the kNN of each query's crops into one ranking (the benchmark's nearest_crop and maj_voting).

    Args:
        distances, predictions: (Q * num_crops, k) from `search` on crop descriptors, query-major.
    Returns:
        predictions (Q, k): the crops' predictions sorted by distance, duplicates keeping their closest occurrence.
    """
    num_queries = distances.shape[0] // num_crops
    distances = distances.reshape(num_queries, num_crops, -1).copy()
    predictions = predictions.reshape(num_queries, num_crops, -1)
    merged = np.empty((num_queries, k), dtype=predictions.dtype)
    for query in range(num_queries):
        if test_method == "maj_voting":
            for top_n in (1, 5, 10):
                _vote(predictions[query], distances[query], top_n, majority_weight)
        order = np.argsort(distances[query].ravel(), kind="stable")
        ranked = predictions[query].ravel()[order]
        _, first = np.unique(ranked, return_index=True)
        unique_ranked = ranked[np.sort(first)]
        if len(unique_ranked) < k:  # fewer distinct predictions than asked: repeat the last to keep the shape
            unique_ranked = np.concatenate([unique_ranked, np.repeat(unique_ranked[-1:], k - len(unique_ranked))])
        merged[query] = unique_ranked[:k]
    return merged


def compute_recalls(
    predictions: np.ndarray, positives_per_query: Sequence[np.ndarray], recall_values: Sequence[int]
) -> np.ndarray:
    """Recall@N in percent (len(recall_values),): a query counts at N when one of its first N predictions is a
    positive. Queries without positives count as misses, as in the original."""
    hits = np.zeros(len(recall_values))
    for prediction, positives in zip(predictions, positives_per_query):
        for slot, n in enumerate(recall_values):
            if np.isin(prediction[:n], positives).any():
                hits[slot] += 1
    return hits / len(predictions) * 100


def recalls_to_str(recalls: np.ndarray, recall_values: Sequence[int]) -> str:
    """ "R@1: 81.2, R@5: 90.1" style."""
    return ", ".join(f"R@{n}: {value:.1f}" for n, value in zip(recall_values, recalls))


def rerank_predictions(
    homography_regression: nn.Module,
    store: LocalFeatureStore,
    query_indexes: Sequence[int],
    predictions: np.ndarray,
    num_reranked: int,
    batch_size: int,
    device: torch.device,
    amp: bool = False,
    prefetch: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Re-rank each query's top `num_reranked` predictions by the DHE inlier count.

    The (query, candidate) pairs of all queries, query-major, are scored `batch_size` at a time (the last pass
    may be shorter), so that queries fill each pass of the head whatever `num_reranked`. With `prefetch` a reader
    thread reads the next pass's local features from the store's file (into pinned memory on CUDA) while the
    head runs; memory holds the features of at most two passes beyond the store's in-memory part. The passes, and
    so the scores, do not depend on `prefetch` nor on which records the store keeps in memory.

    Args:
        store: local features of every image, at dataset indexes (database index = prediction value).
        query_indexes: (Q,) store indexes of the queries.
        predictions: (Q, k) database indexes.
        batch_size: pairs per pass of the head (`--rerank_batch_size`).
    Returns:
        (reranked predictions (Q, k), scores (Q, num_reranked') of the reranked head), num_reranked' =
        min(num_reranked, k). Predictions beyond num_reranked' keep their order. Ties are ordered as the original
        (`argsort()[::-1]` of the scores), except when every score of a query ties (e.g. all 0: a grid too small
        for 4 matches): that query keeps its global order, with a warning, instead of getting it reversed.
    """
    from model.rerank import score_pairs

    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    num_reranked = min(num_reranked, predictions.shape[1])
    homography_regression.eval()
    candidates = predictions[:, :num_reranked]  # (Q, K)
    pair_queries = np.repeat(np.asarray(query_indexes, dtype=np.int64), num_reranked)  # (Q * K,) store indexes
    pair_candidates = candidates.reshape(-1).astype(np.int64)
    num_pairs = len(pair_queries)
    pin_memory = device.type == "cuda"

    def read(start: int) -> tuple[np.ndarray, np.ndarray, Tensor]:
        """The distinct records of the pass at `start` (queries and candidates), where each pair's query and
        candidate are among them, and the part of those records that is in the store's file."""
        stop = min(start + batch_size, num_pairs)
        records, inverse = np.unique(
            np.concatenate([pair_queries[start:stop], pair_candidates[start:stop]]), return_inverse=True
        )
        return records, inverse, store.read_file_part(records, pin_memory)

    scores = []
    with (
        torch.inference_mode(),
        ThreadPoolExecutor(1, thread_name_prefix="local-features") if prefetch else contextlib.nullcontext() as reader,
        tqdm(total=len(query_indexes), desc="re-ranking", ncols=100, leave=False) as bar,
    ):
        pending = reader.submit(read, 0) if prefetch and num_pairs else None
        for start in range(0, num_pairs, batch_size):
            raise_if_interrupted()
            records, inverse, file_part = pending.result() if prefetch else read(start)
            if prefetch and start + batch_size < num_pairs:
                pending = reader.submit(read, start + batch_size)
            features = store.assemble(records, file_part, device)
            inverse = torch.from_numpy(inverse).to(device)
            num = len(inverse) // 2
            scores.append(score_pairs(homography_regression, features[inverse[:num]], features[inverse[num:]], amp))
            bar.n = (start + num) // num_reranked
            bar.refresh()
    scores = torch.cat(scores).double().cpu().numpy() if scores else np.zeros(0)
    scores = scores.reshape(len(query_indexes), num_reranked)
    reranked = predictions.copy()
    order, tied = _rerank_order(scores)
    if tied.any() and num_reranked > 1:
        logging.warning(
            f"For {int(tied.sum())} of {len(query_indexes)} queries every re-ranked candidate got the same score: "
            f"they keep their global order. Equal scores of 0 mean fewer than 4 mutual matches (a --resize grid too "
            f"small) or DHE head outputs that are not finite."
        )
    reranked[:, :num_reranked] = np.take_along_axis(candidates, order, axis=1)
    return reranked, np.take_along_axis(scores, order, axis=1)


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

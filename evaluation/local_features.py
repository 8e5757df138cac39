"""Where the local features live between extraction and re-ranking: a float16 record per image, the first ones in
memory (GPU memory on CUDA by default) under a budget, the rest in a file read back with positioned reads (not a
memory map, whose touched pages would count towards the process's resident memory).
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

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
        indexes: the image indexes (num_records,) the records belong to, increasing (re-ranking's candidates and
            queries, `--local_features candidates`); None: the indexes 0 .. num_records - 1 (every image). Reads
            and writes take image indexes either way.
    """

    def __init__(
        self,
        path: str | Path,
        num_records: int,
        feature_shape: tuple[int, int, int],
        memory_budget_bytes: int = 0,
        memory_device: torch.device | str = "cpu",
        indexes: Sequence[int] | np.ndarray | None = None,
    ) -> None:
        if memory_budget_bytes < 0:
            raise ValueError(f"memory_budget_bytes must be >= 0, got {memory_budget_bytes}")
        self.indexes = None if indexes is None else np.asarray(indexes, dtype=np.int64).reshape(-1)
        if self.indexes is not None and (len(self.indexes) != num_records or (np.diff(self.indexes) <= 0).any()):
            raise ValueError(f"indexes must be {num_records} increasing image indexes, got {len(self.indexes)}")
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
        indexes = self.slots(indexes)
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
        in_file = [int(index) for index in self.slots(indexes) if index >= self.num_in_memory]
        out = torch.empty((len(in_file), *self.feature_shape), dtype=torch.float16, pin_memory=pin_memory)
        buffer = out.view(torch.uint8).numpy().reshape(len(in_file), self.record_bytes)
        for slot, index in enumerate(in_file):
            if os.preadv(self._fd, [buffer[slot]], self._offset(index)) != self.record_bytes:
                raise OSError(f"{self.path}: short read of record {index} (the file was truncated?)")
        return out

    def assemble(self, indexes: Sequence[int], file_part: Tensor, device: torch.device) -> Tensor:
        """Features (B, C, h, w) float16 of `indexes` (B,) on `device`, from the in-memory records and `file_part`
        (from `read_file_part` of the same indexes), copied without blocking where the source is pinned."""
        indexes = self.slots(indexes)
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

    def slots(self, indexes: Sequence[int] | np.ndarray) -> np.ndarray:
        """The record positions (B,) int64 of image `indexes` (B,); IndexError for an image the store lacks."""
        indexes = np.asarray(indexes, dtype=np.int64).reshape(-1)
        if self.indexes is None:
            outside = (indexes < 0) | (indexes >= self.num_records)
            if outside.any():
                raise IndexError(f"record {indexes[outside][0]} out of range for a store of {self.num_records}")
            return indexes
        if self.num_records == 0 and len(indexes):
            raise IndexError(f"image {indexes[0]} has no record in this empty store")
        slots = np.searchsorted(self.indexes, indexes)
        missing = (slots >= self.num_records) | (self.indexes[np.minimum(slots, self.num_records - 1)] != indexes)
        if missing.any():
            raise IndexError(f"image {indexes[missing][0]} has no record in this store of {self.num_records} images")
        return slots

    def __contains__(self, index: int) -> bool:
        try:
            self.slots([index])
        except IndexError:
            return False
        return True

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

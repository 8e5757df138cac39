"""Sharing a list of work items between the processes of `torchrun` so that the result is the one process's.

The items (images to describe, query-candidate pairs to score) are cut into chunks of one batch, in order; chunk i
goes to rank i % world_size. Every batch then holds the same items as in a single process, so that each rank's
network sees the batches one process would have seen, and the gathered results are put back in the items' order.
"""

from __future__ import annotations

import numpy as np

import distributed


def shard_positions(num_items: int, chunk: int, rank: int | None = None, world_size: int | None = None) -> np.ndarray:
    """The positions (n,) int64 of the items of `rank` (default: this process's): chunks rank, rank + world_size,
    ... of `chunk` consecutive items each, in order. A single process gets every position."""
    if chunk < 1:
        raise ValueError(f"chunk must be positive, got {chunk}")
    rank = distributed.get_rank() if rank is None else rank
    world_size = distributed.get_world_size() if world_size is None else world_size
    starts = np.arange(rank * chunk, num_items, world_size * chunk, dtype=np.int64)
    if len(starts) == 0:
        return np.zeros(0, dtype=np.int64)
    positions = (starts[:, None] + np.arange(chunk, dtype=np.int64)[None, :]).reshape(-1)
    return positions[positions < num_items]


def unshard(parts: list[np.ndarray], num_items: int, chunk: int, rows_per_item: int = 1) -> np.ndarray:
    """The items' results in their order from the ranks' `parts` (rank order; part r holds the rows of
    `shard_positions(num_items, chunk, r, len(parts))`, `rows_per_item` rows per item, e.g. the 5 crops of a
    query): (num_items * rows_per_item, ...)."""
    world_size = len(parts)
    if world_size == 1:
        return parts[0]
    first = next(part for part in parts if part is not None)
    out = np.empty((num_items * rows_per_item, *first.shape[1:]), dtype=first.dtype)
    for rank, part in enumerate(parts):
        positions = shard_positions(num_items, chunk, rank, world_size)
        if len(part) != len(positions) * rows_per_item:
            raise RuntimeError(f"rank {rank} returned {len(part)} rows for {len(positions)} items; this is a bug")
        rows = (positions[:, None] * rows_per_item + np.arange(rows_per_item)[None, :]).reshape(-1)
        out[rows] = part
    return out


def gather_in_order(part: np.ndarray, num_items: int, chunk: int, rows_per_item: int = 1) -> np.ndarray | None:
    """This rank's `part` (see `unshard`) gathered with the others' into the items' order on rank 0; None on the
    other ranks."""
    parts = distributed.gather_to_main(part)
    return None if parts is None else unshard(parts, num_items, chunk, rows_per_item)

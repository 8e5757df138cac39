"""`evaluation.sharding`: how torchrun's processes share items, and putting their results back in order; the local
feature store of some images only (`--local_features candidates`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evaluation.local_features import LocalFeatureStore
from evaluation.sharding import shard_positions, unshard


@pytest.mark.parametrize(("num_items", "chunk", "world_size"), [(10, 3, 2), (7, 4, 3), (2, 5, 4), (0, 2, 2), (9, 1, 1)])
def test_the_ranks_share_whole_batches_and_unshard_restores_the_order(num_items, chunk, world_size):
    shards = [shard_positions(num_items, chunk, rank, world_size) for rank in range(world_size)]
    assert np.array_equal(np.sort(np.concatenate(shards)), np.arange(num_items))  # each item once
    for rank, positions in enumerate(shards):
        batches = [positions[i : i + chunk] for i in range(0, len(positions), chunk)]
        for batch in batches:  # each batch of a rank is a batch of the single process, whole
            assert batch[0] % chunk == 0 and (batch[0] // chunk) % world_size == rank
            assert np.array_equal(batch, np.arange(batch[0], min(batch[0] + chunk, num_items)))
    rows = 3
    values = np.arange(num_items * rows * 2, dtype=np.float32).reshape(num_items * rows, 2)
    parts = [values[(p[:, None] * rows + np.arange(rows)).reshape(-1)] for p in shards]
    assert np.array_equal(unshard(parts, num_items, chunk, rows), values)


def test_unshard_refuses_a_part_of_the_wrong_length():
    parts = [np.zeros((3, 1)), np.zeros((1, 1))]  # rank 0 holds 2 items of 4 in chunks of 2
    with pytest.raises(RuntimeError, match="rank 0 returned 3 rows for 2 items"):
        unshard(parts, 4, 2)


def test_a_store_of_some_images_reads_and_writes_by_image_index(tmp_path):
    indexes = np.array([2, 5, 9, 40])
    features = torch.randn(4, 3, 2, 2)
    for budget in (0, 2 * 24, 10**6):  # all in the file, half in memory, all in memory
        with LocalFeatureStore(tmp_path / "f.f16", 4, (3, 2, 2), budget, indexes=indexes) as store:
            store.write([40, 2], features[[3, 0]])
            store.write([9, 5], features[[2, 1]])
            assert torch.equal(store.read([5, 40, 2]), features[[1, 3, 0]].half())
            assert 9 in store and 3 not in store
            with pytest.raises(IndexError, match="image 3 has no record"):
                store.read([3])
            with pytest.raises(IndexError, match="image 41 has no record"):
                store.write([41], features[:1])
    with pytest.raises(ValueError, match="increasing"):
        LocalFeatureStore(tmp_path / "g.f16", 2, (3, 2, 2), indexes=[5, 5])

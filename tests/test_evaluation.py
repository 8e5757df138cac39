"""Evaluation helpers: the local feature store, faiss search and its padding, crop merging, recalls."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import util
from evaluation import local_features
from evaluation.local_features import LocalFeatureStore
from evaluation.reranking import rerank_predictions
from evaluation.retrieval import compute_recalls, merge_crop_predictions, recalls_to_str, search


def test_local_feature_store_round_trip(tmp_path):
    path = tmp_path / "local.f16"
    features = torch.randn(5, 8, 3, 2, generator=torch.Generator().manual_seed(0))
    store = LocalFeatureStore(path, num_records=7, feature_shape=(8, 3, 2))
    store.write([6, 0, 3, 2, 5], features)
    read = store.read([0, 6, 5])
    assert read.dtype == torch.float16 and read.shape == (3, 8, 3, 2)
    torch.testing.assert_close(read.float(), features[[1, 0, 4]].half().float())
    assert path.stat().st_size == 7 * 8 * 3 * 2 * 2
    with pytest.raises(IndexError, match="record 7 out of range for a store of 7"):
        store.read([7])
    with pytest.raises(ValueError, match=r"expected \(1, 8, 3, 2\) features"):
        store.write([1], torch.zeros(1, 8, 2, 3))
    store.close()
    assert not path.exists()


def test_search_clamps_faiss_padding_and_warns(caplog):
    database = np.array([[0.0, 0.0], [1.0, 0.0], [5.0, 5.0]], dtype=np.float32)
    queries = np.array([[0.9, 0.1], [4.0, 4.0]], dtype=np.float32)
    with caplog.at_level(logging.WARNING):
        distances, predictions = search(database, queries, k=10)
    assert predictions.shape == (2, 3)
    assert (predictions >= 0).all()
    np.testing.assert_array_equal(predictions, [[1, 0, 2], [2, 1, 0]])
    np.testing.assert_allclose(distances[0, 0], 0.01 + 0.01, rtol=1e-5)
    assert sum("database has only 3 images" in r.message for r in caplog.records) == 1


def test_recalls_count_queries_without_positives_as_misses():
    predictions = np.array([[3, 1, 2], [0, 2, 1], [1, 2, 3], [2, 0, 1]])
    positives = [np.array([3]), np.array([1]), np.array([], dtype=np.int64), np.array([1, 0])]
    recalls = compute_recalls(predictions, positives, [1, 2, 3])
    # query 0 hit at 1; query 1 at 3; query 2 never (no positives); query 3 at 2
    np.testing.assert_allclose(recalls, [25.0, 50.0, 75.0])
    assert recalls_to_str(recalls, [1, 2, 3]) == "R@1: 25.0, R@2: 50.0, R@3: 75.0"


def test_nearest_crop_merges_crops_by_distance_without_duplicates():
    # one query, two crops, k = 3
    distances = np.array([[0.5, 0.7, 0.9], [0.1, 0.6, 0.8]], dtype=np.float32)
    predictions = np.array([[4, 2, 7], [2, 5, 4]])
    merged = merge_crop_predictions(distances, predictions, 2, 3, "nearest_crop", 0.01)
    np.testing.assert_array_equal(merged, [[2, 4, 5]])


def test_majority_voting_promotes_predictions_that_crops_agree_on():
    distances = np.array([[0.10, 0.20], [0.30, 0.11], [0.31, 0.12]], dtype=np.float32)
    predictions = np.array([[1, 2], [3, 2], [4, 2]])
    nearest = merge_crop_predictions(distances, predictions, 3, 2, "nearest_crop", 0.1)
    voted = merge_crop_predictions(distances, predictions, 3, 2, "maj_voting", 0.1)
    np.testing.assert_array_equal(nearest, [[1, 2]])
    # 2 is in the top 5 and top 10 of all three crops: its distances drop by 0.1 * 3 / 5 + 0.1 * 3 / 10
    np.testing.assert_array_equal(voted, [[2, 1]])


def test_save_predictions_writes_both_stages(tmp_path):
    path = tmp_path / "predictions.csv"
    util.save_predictions(
        path,
        ["q0.jpg"],
        ["d0.jpg", "d1.jpg", "d2.jpg"],
        predictions=np.array([[2, 0, 1]]),
        distances=np.array([[0.1, 0.2, 0.3]]),
        reranked=np.array([[0, 2, 1]]),
        rerank_scores=np.array([[12.0, 3.0]]),
    )
    lines = path.read_text().splitlines()
    assert lines[0] == "query_index,query_path,stage,rank,database_index,database_path,score"
    assert lines[1] == "0,q0.jpg,global,0,2,d2.jpg,0.1"
    assert lines[4] == "0,q0.jpg,reranked,0,0,d0.jpg,12"
    assert lines[6] == "0,q0.jpg,reranked,2,1,d1.jpg,"
    assert [p.name for p in tmp_path.iterdir()] == ["predictions.csv"]


def test_reranking_moves_the_warped_copy_to_rank_one(tmp_path):
    """A texture, a perspective-warped copy ranked third by the global stage, and distractors: a DHE head that
    predicts the copy's true corner correspondences re-ranks it first."""
    import kornia
    from helpers import patch_descriptors, seeded, smooth_texture

    from model import HomographyRegression

    size, generator = 192, seeded()
    query = smooth_texture(size, generator)
    corners = torch.tensor([[[8.0, 8.0], [size - 8.0, 8.0], [8.0, size - 8.0], [size - 8.0, size - 8.0]]])
    moved = corners + torch.tensor([[[7.0, -5.0], [-9.0, 6.0], [5.0, 8.0], [-6.0, -7.0]]])
    H_true = kornia.geometry.transform.get_perspective_transform(corners, moved)
    copy = kornia.geometry.transform.warp_perspective(query, H_true, (size, size), padding_mode="reflection")
    distractors = torch.cat([smooth_texture(size, generator) for _ in range(3)])
    features = patch_descriptors(torch.cat([distractors[:2], copy, distractors[2:], query]))  # store order
    store = LocalFeatureStore(tmp_path / "local.f16", 5, tuple(features.shape[1:]))
    store.write(list(range(5)), features)

    head = HomographyRegression(resize=(size, size)).eval()
    with torch.no_grad():
        head.linear.weight.zero_()
        head.linear.bias.copy_(torch.cat([corners[0], moved[0]]).flatten())
    predictions = np.array([[0, 1, 2, 3]])  # the copy (database index 2) is third after the global stage
    reranked, scores = rerank_predictions(head, store, [4], predictions, 4, 2, torch.device("cpu"))
    store.close()
    assert reranked[0, 0] == 2
    assert sorted(reranked[0].tolist()) == [0, 1, 2, 3]
    assert scores[0, 0] > 3 * scores[0, 1:].max()
    assert (np.diff(scores[0]) <= 0).all()


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_reranking_groups_queries_and_orders_ties_as_the_original(tmp_path, batch_size):
    from model import HomographyRegression
    from model.rerank import rerank_scores

    generator = torch.Generator().manual_seed(0)
    features = torch.nn.functional.normalize(torch.randn(9, 16, 4, 4, generator=generator), dim=1)
    features[5] = features[6]  # two identical candidates: tied scores
    store = LocalFeatureStore(tmp_path / "local.f16", 9, (16, 4, 4))
    store.write(list(range(9)), features)
    head = HomographyRegression(resize=(64, 64)).eval()
    with torch.no_grad():
        head.linear.weight.zero_()
        head.linear.bias.copy_(torch.tensor([8.0, 8, 56, 8, 8, 56, 56, 56] * 2))
    predictions = np.array([[0, 1, 2, 5, 6], [6, 5, 4, 3, 2], [1, 0, 5, 6, 4]])
    query_indexes = [7, 8, 5]
    reranked, scores = rerank_predictions(head, store, query_indexes, predictions, 4, batch_size, torch.device("cpu"))
    store.close()
    for row, query in enumerate(query_indexes):
        candidates = predictions[row, :4]
        expected = rerank_scores(head, features[query].half().float(), features[candidates].half().float()).numpy()
        order = expected.astype(np.float64).argsort()[::-1]  # the original's ordering, ties included
        np.testing.assert_array_equal(reranked[row, :4], candidates[order])
        np.testing.assert_array_equal(scores[row], expected[order])
        assert reranked[row, 4] == predictions[row, 4]  # beyond the re-ranked head, the order is kept


@pytest.mark.parametrize(("budget_records", "in_memory"), [(0, 0), (3, 3), (2.5, 2), (100, 7)])
def test_local_feature_store_memory_budget(tmp_path, budget_records, in_memory):
    """The first records that fit in the budget stay in memory, the others go to the file; reads mix both."""
    path = tmp_path / "local.f16"
    record_bytes = 8 * 3 * 2 * 2
    features = torch.randn(7, 8, 3, 2, generator=torch.Generator().manual_seed(0))
    store = LocalFeatureStore(path, 7, (8, 3, 2), memory_budget_bytes=int(budget_records * record_bytes))
    assert store.num_in_memory == in_memory
    assert store.memory_bytes == in_memory * record_bytes <= budget_records * record_bytes
    assert store.file_bytes == path.stat().st_size == (7 - in_memory) * record_bytes
    store.write([6, 0, 3, 2, 5, 1, 4], features[[6, 0, 3, 2, 5, 1, 4]])
    read = store.read([5, 0, 6, 2, 0])
    assert read.dtype == torch.float16 and read.shape == (5, 8, 3, 2)
    assert torch.equal(read, features[[5, 0, 6, 2, 0]].half())
    assert store.read_file_part([5, 0, 6, 2, 0]).shape[0] == sum(i >= in_memory for i in (5, 0, 6, 2, 0))
    assert path.stat().st_size == store.file_bytes  # writes of in-memory records did not grow the file
    store.close()
    assert not path.exists()


def rerank_world(tmp_path, budget_records: int):
    """A store of 12 records (8 database, 4 queries) of random features, with `budget_records` in memory."""
    generator = torch.Generator().manual_seed(0)
    features = torch.nn.functional.normalize(torch.randn(12, 16, 4, 4, generator=generator), dim=1)
    features[8:] = torch.nn.functional.normalize(features[[1, 3, 5, 7]] + 0.7 * features[8:], dim=1)
    store = LocalFeatureStore(
        tmp_path / f"local{budget_records}.f16", 12, (16, 4, 4), memory_budget_bytes=budget_records * 16 * 16 * 2
    )
    store.write(list(range(12)), features)
    return store, features.half()


@pytest.mark.parametrize("batch_size", [3, 8, 64])
def test_overlapped_and_in_memory_reranking_equal_the_file_path(tmp_path, batch_size):
    """Where the features come from (file, memory or both) and whether a reader thread prefetches them change
    nothing: the passes are the same pairs, so the same kernels run on the same fp16 values, and the scores and
    rankings are equal, bit for bit, to the file path read in the main thread and to `rerank_scores`."""
    from model import HomographyRegression
    from model.rerank import rerank_scores

    torch.manual_seed(0)
    head = HomographyRegression(resize=(64, 64), num_layers=1, dim_feedforward=32).eval()
    with torch.no_grad():  # corners spread over the 64 x 64 image, moved a little by the correlation
        head.linear.weight.mul_(0.5)
        head.linear.bias.copy_(torch.tensor([8.0, 8, 56, 8, 8, 56, 56, 56] * 2))
    predictions = np.array([[1, 0, 2, 6, 4], [3, 2, 1, 0, 7], [5, 4, 6, 7, 0], [7, 6, 5, 4, 3]])
    query_indexes = [8, 9, 10, 11]
    results = []
    for budget_records, prefetch in ((0, False), (0, True), (5, True), (12, True), (5, False)):
        store, features = rerank_world(tmp_path, budget_records)
        results.append(
            rerank_predictions(
                head, store, query_indexes, predictions, 4, batch_size, torch.device("cpu"), prefetch=prefetch
            )
        )
        store.close()
    reference_reranked, reference_scores = results[0]
    print(reference_scores)
    assert len(np.unique(reference_scores)) > 3  # scores that tell the candidates apart
    for reranked, scores in results[1:]:
        np.testing.assert_array_equal(reranked, reference_reranked)
        np.testing.assert_array_equal(scores, reference_scores)
    direct = rerank_scores(head, features[query_indexes], features[predictions[:, :4]], batch_size).double().numpy()
    np.testing.assert_array_equal(np.sort(direct, axis=1)[:, ::-1], reference_scores)


def test_a_disk_that_fills_up_while_writing_says_so(tmp_path, monkeypatch):
    store = LocalFeatureStore(tmp_path / "local_features.f16", 4, (8, 2, 2))

    def full(fd, data, offset):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(local_features.os, "pwrite", full)
    with pytest.raises(OSError, match=r"writing .*local_features.f16 failed \(No space left on device\).*need"):
        store.write([0], torch.zeros(1, 8, 2, 2))
    monkeypatch.undo()
    store.close()
    assert not (tmp_path / "local_features.f16").exists()

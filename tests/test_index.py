"""evaluation.index: the faiss index of --faiss_index, its checks before extraction, training, search and cost."""

from __future__ import annotations

import logging

import faiss
import numpy as np
import pytest

from evaluation.index import IndexSettings, build_index, check_index, index_log_line, search_index
from evaluation.retrieval import search

DIM = 32
NUM = 2000


@pytest.fixture(scope="module")
def descriptors() -> tuple[np.ndarray, np.ndarray]:
    """(database (2000, 32), queries (100, 32)) float32: points around 40 centres, queries near database points."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((40, DIM))
    database = centres[rng.integers(0, 40, NUM)] + 0.3 * rng.standard_normal((NUM, DIM))
    queries = database[rng.integers(0, NUM, 100)] + 0.1 * rng.standard_normal((100, DIM))
    return database.astype(np.float32), queries.astype(np.float32)


def test_flat_is_exactly_retrieval_search(descriptors):
    database, queries = descriptors
    index, stats = build_index(IndexSettings(), database)
    distances, predictions, seconds = search_index(index, queries, 10)
    expected_distances, expected_predictions = search(database, queries, 10)
    assert type(index) is faiss.IndexFlatL2
    np.testing.assert_array_equal(predictions, expected_predictions)
    np.testing.assert_array_equal(distances, expected_distances)
    assert stats.num_train == 0 and seconds >= 0
    assert NUM * DIM * 4 <= stats.memory_bytes < NUM * DIM * 4 + 1024  # the vectors and a header


def test_ivf_visiting_every_list_finds_flat_neighbours(descriptors):
    database, queries = descriptors
    flat_distances, flat_predictions = search(database, queries, 10)
    index, stats = build_index(IndexSettings("IVF16,Flat", nprobe=16), database)
    distances, predictions, _ = search_index(index, queries, 10)
    np.testing.assert_array_equal(predictions, flat_predictions)
    np.testing.assert_allclose(distances, flat_distances, rtol=1e-5, atol=1e-5)
    assert stats.num_train == NUM and "nlist 16, nprobe 16" in stats.description


def test_hnsw_finds_most_top1_and_gets_ef_search(descriptors):
    database, queries = descriptors
    _, flat_predictions = search(database, queries, 10)
    index, stats = build_index(IndexSettings("HNSW32", ef_search=64), database)
    _, predictions, _ = search_index(index, queries, 10)
    assert index.hnsw.efSearch == 64 and stats.num_train == 0
    assert (predictions[:, 0] == flat_predictions[:, 0]).mean() >= 0.95


def test_ivf_with_hnsw_quantizer_gets_nprobe_and_ef_search(descriptors):
    database, queries = descriptors
    index, stats = build_index(IndexSettings("IVF16_HNSW32,Flat", nprobe=4, ef_search=40), database)
    ivf = faiss.extract_index_ivf(index)
    assert ivf.nprobe == 4 and faiss.downcast_index(ivf.quantizer).hnsw.efSearch == 40
    assert "quantizer HNSW M 32, efSearch 40" in stats.description
    assert search_index(index, queries, 5)[1].shape == (100, 5)


def test_seeded_ivfpq_builds_are_reproducible_and_the_seed_reaches_faiss(descriptors):
    database, queries = descriptors
    settings = IndexSettings("IVF16,PQ8np", train_size=1000, nprobe=4, seed=3)
    first = search_index(build_index(settings, database)[0], queries, 10)
    second = search_index(build_index(settings, database)[0], queries, 10)
    np.testing.assert_array_equal(first[1], second[1])
    np.testing.assert_array_equal(first[0], second[0])
    # the whole database trains both: only faiss's k-means seeds differ
    seed_3, seed_4 = (IndexSettings("IVF16,PQ8np", train_size=NUM, nprobe=4, seed=seed) for seed in (3, 4))
    distances_3 = search_index(build_index(seed_3, database)[0], queries, 10)[0]
    distances_4 = search_index(build_index(seed_4, database)[0], queries, 10)[0]
    assert not np.array_equal(distances_3, distances_4)


@pytest.mark.parametrize("factory", ["IVF", "Foo", "IVF16,PQ7", ""])
def test_bad_factory_strings_are_refused_naming_them(factory):
    with pytest.raises(ValueError, match=f"--faiss_index '{factory}': faiss cannot build it for 32-d"):
        check_index(IndexSettings(factory), DIM, NUM)


@pytest.mark.parametrize(
    ("settings", "database_num", "message"),
    [
        (
            IndexSettings("IVF64,Flat", train_size=10),
            NUM,
            r"at least 64 .* trained on 10, limited by --faiss_train_size",
        ),
        (IndexSettings("IVF64,Flat"), 20, r"at least 64 .* trained on 20, limited by the database size \(20"),
        (IndexSettings("IVF16,PQ8np", train_size=255), NUM, r"at least 256 training descriptors \(k-means of PQ8x8"),
        (IndexSettings("PCA8,Flat", train_size=7), NUM, r"at least 8 training descriptors \(PCA to 8"),
        (IndexSettings(train_size=0), NUM, "--faiss_train_size must be at least 1"),
        (IndexSettings("HNSW32", nprobe=4), NUM, "--faiss_nprobe applies to indexes with an IVF part; 'HNSW32'"),
        (IndexSettings("IVF16,Flat", nprobe=17), NUM, "--faiss_nprobe 17: must be between 1 and the 16 lists"),
        (IndexSettings("IVF16,Flat", ef_search=8), NUM, "--faiss_ef_search applies to indexes with an HNSW graph"),
        (IndexSettings("HNSW32", ef_search=0), NUM, "--faiss_ef_search must be at least 1"),
    ],
)
def test_bad_settings_are_refused_before_extraction(settings, database_num, message):
    with pytest.raises(ValueError, match=message):
        check_index(settings, DIM, database_num)


@pytest.mark.parametrize(
    ("factory", "need"), [("IVF64,Flat", 64), ("IVF16,PQ8np", 256), ("PCA8,Flat", 8), ("OPQ4,Flat", 256)]
)
def test_the_training_minimum_is_exactly_what_faiss_refuses(descriptors, factory, need):
    database, _ = descriptors
    check_index(IndexSettings(factory, train_size=need), DIM, NUM)
    _, stats = build_index(IndexSettings(factory, train_size=need), database)
    assert stats.num_train == need
    with pytest.raises(RuntimeError):  # one fewer: faiss itself refuses, so the check refuses nothing faiss takes
        faiss.index_factory(DIM, factory).train(database[: need - 1])


def test_a_training_refusal_faiss_finds_itself_is_a_value_error(descriptors):
    database, _ = descriptors
    with pytest.raises(ValueError, match=r"'IVF16,RQ2x8': faiss cannot train it on 100 descriptors: .*\(256\)"):
        build_index(IndexSettings("IVF16,RQ2x8", train_size=100), database)


def test_fewer_results_than_k_ask_for_more_search_effort(descriptors):
    database, queries = descriptors
    index, _ = build_index(IndexSettings("IVF64,Flat", nprobe=1), database)
    with pytest.raises(ValueError, match=r"fewer than 1000 candidates for \d+ of 100 queries: raise --faiss_nprobe"):
        search_index(index, queries, 1000)


def test_k_above_the_database_size_is_clamped_with_a_warning(descriptors, caplog):
    database, queries = descriptors
    index, _ = build_index(IndexSettings(), database[:5])
    with caplog.at_level(logging.WARNING):
        distances, predictions, _ = search_index(index, queries, 10)
    assert predictions.shape == distances.shape == (100, 5)
    assert "database has only 5 images" in caplog.text


def test_description_and_log_line(descriptors):
    database, queries = descriptors
    settings = IndexSettings("IVF16,Flat")
    description = check_index(settings, DIM, NUM)
    assert description == (
        "IVF16,Flat (IndexIVFFlat, nlist 16, nprobe 1 (faiss default)), trained on 2000 of 2000 descriptors"
    )
    index, stats = build_index(settings, database)
    assert stats.description == description
    line = index_log_line(stats, search_index(index, queries, 3)[2])
    assert line.startswith(f"faiss index IVF16,Flat: {stats.memory_bytes / 2**20:.1f} MB, trained in ")
    assert "s on 2000 descriptors, added in " in line and ", searched in " in line
    assert index_log_line(build_index(IndexSettings(), database)[1], 0.0).startswith(
        "faiss index Flat: 0.2 MB, no training"
    )

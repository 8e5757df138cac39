"""`eval.py` for large databases on the session's tiny world (16 database images, 6 queries, random weights at
--resize 64 64, one CCT block): local features of the candidates only, several processes with torchrun, faiss
indexes other than Flat, reused database descriptors, the cost line and results.json's "stats".

Every comparison is between two runs of the same code on the same machine: the same images through the same
network must give the same predictions and inlier counts, bit for bit.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import eval_argv

import eval as eval_script
import util
from evaluation.pipeline import choose_local_features

ROOT = Path(__file__).resolve().parent.parent
# One image a batch: whichever images a pass holds, each goes through the network alone, so that no kernel that
# rounds by batch size can make modes differ. The re-ranking's passes of 5 pairs cross queries.
FEW = ("--num_reranked_preds", "3", "--rerank_batch_size", "5", "--save_predictions", "--infer_batch_size", "1")


def run(world: Path, *extra: str) -> dict:
    return eval_script.cli(eval_argv(world, *FEW, *extra))


def rows(folder: Path) -> list[dict]:
    with open(folder / "predictions.csv") as file:
        return list(csv.DictReader(file))


def info(folder: Path) -> str:
    return (folder / "info.log").read_text()


def results_json(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


@pytest.fixture(scope="module")
def flat(tiny_world, tmp_path_factory) -> dict:
    """The reference run: every image's local features, exact search, database descriptors saved."""
    before, where = os.getcwd(), tmp_path_factory.mktemp("flat")
    os.chdir(where)
    try:
        result = run(tiny_world, "--local_features", "all", "--save_database_descriptors", "--exp_name", "all")
    finally:
        os.chdir(before)
    result["output_folder"] = where / result["output_folder"]  # absolute
    return result


def test_candidates_give_the_predictions_and_scores_of_all(tiny_world, flat, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    candidates = run(tiny_world, "--local_features", "candidates", "--exp_name", "candidates")
    for key in ("predictions", "reranked_predictions", "rerank_scores", "baseline_recalls", "reranked_recalls"):
        assert np.array_equal(candidates[key], flat[key]), key
    assert len(np.unique(flat["rerank_scores"])) > 2  # the inlier counts differ: the order means something
    assert rows(candidates["output_folder"]) == rows(flat["output_folder"])
    all_stats, candidate_stats = flat["stats"], candidates["stats"]
    assert all_stats["local_features"] == "all" and candidate_stats["local_features"] == "candidates"
    assert all_stats["local_feature_records"] == 16 + 6
    needed = np.unique(np.concatenate([flat["predictions"][:, :3].ravel(), np.arange(16, 22)]))
    assert candidate_stats["local_feature_records"] == len(needed) < 22  # the queries and their candidates only
    record_bytes = 384 * 4 * 4 * 2  # fp16 (384, 4, 4) at 64 x 64
    assert candidate_stats["local_feature_bytes"] == len(needed) * record_bytes
    assert candidate_stats["seconds"]["local_features"] > 0 and all_stats["seconds"]["local_features"] == 0


def test_auto_chooses_by_the_numbers_and_says_why(tiny_world, flat, tmp_path, monkeypatch):
    # 16 database images <= 6 queries x 3 candidates: all (the reference run asked for it; auto would agree)
    assert choose_local_features("auto", 16, 6, 3) == ("all", "16 database images <= 6 queries x 3 candidates")
    assert choose_local_features("auto", 19, 6, 3)[0] == "candidates"
    assert choose_local_features("auto", 18, 6, 3)[0] == "all"
    assert choose_local_features("auto", 10, 6, 3, world_size=2)[0] == "candidates"
    assert choose_local_features("auto", 10, 6, 3, reuse=True)[0] == "candidates"
    with pytest.raises(ValueError, match="2 processes share this evaluation: use --local_features candidates"):
        choose_local_features("all", 10, 6, 3, world_size=2)
    with pytest.raises(ValueError, match="which --database_descriptors skips"):
        choose_local_features("all", 10, 6, 3, reuse=True)
    monkeypatch.chdir(tmp_path)
    auto = run(tiny_world, "--num_reranked_preds", "2", "--exp_name", "auto")  # 16 > 6 x 2
    assert "local features candidates (16 database images > 6 queries x 2 candidates)" in info(auto["output_folder"])
    assert results_json(auto["output_folder"])["stats"]["local_features"] == "candidates"
    assert "local features all (16 database images <= 6 queries x 3 candidates)" in info(
        run(tiny_world, "--exp_name", "auto3")["output_folder"]
    )


def test_results_json_holds_the_stats_and_the_log_the_cost(flat):
    folder = flat["output_folder"]
    stats = results_json(folder)["stats"]
    assert stats["database_num"] == 16 and stats["queries_num"] == 6 and stats["processes"] == 1
    assert stats["local_features"] == "all" and stats["faiss_index"] == "Flat"
    assert stats["local_feature_bytes"] == 22 * 384 * 16 * 2 and stats["local_feature_file_bytes"] == 22 * 384 * 16 * 2
    assert set(stats["seconds"]) == {"descriptors", "search", "local_features", "reranking"}
    assert stats["reranking_pairs"] == 6 * 3
    seconds = stats["seconds"]["reranking"]  # rounded to the millisecond, the rate is not
    assert 18 / (seconds + 0.0005) <= stats["reranking_pairs_per_second"] <= 18 / max(seconds - 0.0005, 1e-9)
    assert stats["faiss"]["memory_bytes"] >= 16 * 384 * 4
    (cost,) = [line for line in info(folder).splitlines() if "Cost: " in line]
    assert "16 database images and 6 queries, 1 process;" in cost
    assert f"global descriptors {(16 + 6) * 384 * 4 / 2**20:.1f} MB of RAM" in cost and "faiss index Flat" in cost


def test_two_processes_with_torchrun_give_one_process_results(tiny_world, flat, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [str(ROOT / "eval.py"), *eval_argv(tiny_world, *FEW, "--exp_name", "ddp", "--num_preds_to_save", "2")]
    # the threads of this process (torchrun would set 1), so that no kernel splits its work otherwise
    environment = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), PYTHONPATH=str(ROOT))
    completed = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    (folder,) = (tmp_path / "logs" / "ddp").iterdir()  # one run folder, written by rank 0
    assert rows(folder) == rows(flat["output_folder"])
    two, one = results_json(folder), results_json(flat["output_folder"])
    assert two["baseline"] == one["baseline"] and two["reranked"] == one["reranked"]
    assert two["stats"]["processes"] == 2 and two["stats"]["local_features"] == "candidates"
    assert "2 processes each extract the local features of their own pairs" in info(folder)
    assert len(list((folder / "preds").glob("*.png"))) == 6  # rank 0 drew every query
    assert not list(folder.glob("local_features*"))  # every process's temporary store is gone


def test_an_ivf_index_searched_exhaustively_equals_flat(tiny_world, flat, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ivf = run(tiny_world, "--faiss_index", "IVF4,Flat", "--faiss_nprobe", "4", "--exp_name", "ivf")
    assert np.array_equal(ivf["predictions"], flat["predictions"])
    assert np.array_equal(ivf["reranked_predictions"], flat["reranked_predictions"])
    stats = results_json(ivf["output_folder"])["stats"]
    assert stats["faiss_index"] == "IVF4,Flat" and stats["faiss"]["train_seconds"] >= 0
    assert "IVF4,Flat" in info(ivf["output_folder"])


def test_hnsw32_runs(tiny_world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hnsw = run(tiny_world, "--faiss_index", "HNSW32", "--faiss_ef_search", "64", "--exp_name", "hnsw")
    assert hnsw["predictions"].shape == (6, 5) and len(np.unique(hnsw["predictions"][0])) == 5
    assert results_json(hnsw["output_folder"])["stats"]["faiss_index"] == "HNSW32"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--faiss_index", "IVF,Flatt"), "IVF,Flatt"),
        (("--faiss_index", "IVF64,Flat"), "64"),  # 64 lists, 16 database images to train on
        (("--faiss_index", "IVF4,Flat", "--faiss_train_size", "2"), "2"),
    ],
)
def test_a_bad_index_is_refused_before_any_extraction(tiny_world, tmp_path, monkeypatch, flags, message):
    monkeypatch.chdir(tmp_path)

    def no_extraction(*args, **kwargs):
        raise AssertionError("an image was described before the index was checked")

    monkeypatch.setattr(util, "extract_features", no_extraction)
    with pytest.raises(ValueError, match=message):
        run(tiny_world, *flags, "--exp_name", "bad")
    assert not (tmp_path / "logs" / "bad").exists() or not list((tmp_path / "logs" / "bad").iterdir())


def test_reused_database_descriptors_give_the_same_results(tiny_world, flat, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    saved = flat["output_folder"]
    assert (saved / "database_descriptors.npy").is_file() and (saved / "database_descriptors.json").is_file()
    described = []
    extract = util.extract_features

    def counting(model, images, *args, **kwargs):
        described.append(len(images))
        return extract(model, images, *args, **kwargs)

    monkeypatch.setattr(util, "extract_features", counting)
    reused = run(tiny_world, "--database_descriptors", str(saved), "--exp_name", "reused")
    assert 16 not in described  # the database was not described again: the queries (6) and candidates only
    assert rows(reused["output_folder"]) == rows(saved)
    assert results_json(reused["output_folder"])["reranked"] == results_json(saved)["reranked"]
    assert f"Database descriptors read from {saved}" in info(reused["output_folder"])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--resize", "80", "80"), "--resize 64 64"),
        (("--seed", "1"), "another features extractor"),  # other random weights
    ],
)
def test_mismatched_database_descriptors_are_refused(tiny_world, flat, tmp_path, monkeypatch, flags, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=message):
        run(tiny_world, "--database_descriptors", str(flat["output_folder"]), *flags, "--exp_name", "mismatch")


@pytest.mark.parametrize("test_method", ["nearest_crop", "single_query"])
def test_torchrun_shards_the_queries_of_every_test_method(tiny_world, tmp_path, test_method):
    """Five crops a query (gathered five rows an image) and one query a batch (single_query): two processes give one
    process's predictions."""
    argv = eval_argv(tiny_world, *FEW, "--test_method", test_method, "--local_features", "candidates")
    environment = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), PYTHONPATH=str(ROOT))
    folders = {}
    for processes in (1, 2):
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
        command += [str(ROOT / "eval.py"), *argv, "--exp_name", f"p{processes}"]
        completed = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300)
        assert completed.returncode == 0, completed.stderr[-3000:]
        (folders[processes],) = (tmp_path / "logs" / f"p{processes}").iterdir()
    assert rows(folders[2]) == rows(folders[1])
    assert results_json(folders[2])["stats"]["processes"] == 2

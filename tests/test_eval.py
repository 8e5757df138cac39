"""`eval.py` end to end on a tiny hand-made dataset whose recalls can be worked out by hand.

Queries are exact (lossless) copies of database images, so with any weights their global descriptors equal those of
the copied image, and a DHE head that always predicts the identity homography gives the copy every mutual match as
an inlier (64 on an 8 x 8 grid). q0 copies d1 (1 m away) and q1 copies d3 (2 m away): both are hits at rank 1,
before and after re-ranking. q2 copies d0 but lies 5 km away: it has no positive and counts as a miss. So R@1 = R@5
= 2/3 = 66.7 % in both stages.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import eval_argv, save_identity_head
from PIL import Image

import eval as eval_script
from model import FeaturesExtractor
from model.checkpoints import save_state_dict

SIZE = 128
TRUNC_TE = 2  # two transformer blocks keep the test fast; the checkpoint is saved at that depth
DATABASE = {
    "d0": (500000.0, 4000000.0),
    "d1": (500100.0, 4000000.0),
    "d2": (500200.0, 4000000.0),
    "d3": (500300.0, 4000000.0),
}
QUERIES = {"q0": ("d1", 500101.0, 4000000.0), "q1": ("d3", 500302.0, 4000000.0), "q2": ("d0", 505000.0, 4005000.0)}


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    split = root / "tiny" / "images" / "test"
    rng = np.random.default_rng(0)
    pixels = {}
    for name, (east, north) in DATABASE.items():
        pixels[name] = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        path = split / "database" / f"@{east:.2f}@{north:.2f}@33@T@@@{name}@@@@@@@@.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels[name]).save(path)
    for name, (source, east, north) in QUERIES.items():
        path = split / "queries" / f"@{east:.2f}@{north:.2f}@33@T@@@{name}@@@@@@@@.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels[source]).save(path)

    torch.manual_seed(0)
    save_state_dict(FeaturesExtractor(resize=(SIZE, SIZE), trunc_te=TRUNC_TE), root / "fe.torch")
    save_identity_head(root / "hr.torch", SIZE)
    return root


def run_eval(world: Path, *extra: str, device: str = "cpu") -> dict:
    options = {"resize": SIZE, "trunc_te": TRUNC_TE, "checkpoints": world, "device": device}
    return eval_script.cli(eval_argv(world / "tiny", "--infer_batch_size", "3", *extra, **options))


def test_eval_end_to_end_recalls_logs_and_predictions(tiny_world, tmp_path, monkeypatch, device):
    monkeypatch.chdir(tmp_path)
    result = run_eval(tiny_world, "--exp_name", "e2e", "--save_predictions", device=device)
    np.testing.assert_allclose(result["baseline_recalls"], [200 / 3, 200 / 3])
    np.testing.assert_allclose(result["reranked_recalls"], [200 / 3, 200 / 3])
    # the copy is first, and keeps every one of the 64 mutual matches under the identity homography
    assert result["reranked_predictions"][:, 0].tolist() == [1, 3, 0]
    assert result["rerank_scores"][:, 0].tolist() == [64, 64, 64]
    assert (result["rerank_scores"][:, 1:] < 64).all()

    folder = result["output_folder"]
    assert folder.parent == Path("logs") / "e2e"
    info = (folder / "info.log").read_text()
    lines = info.splitlines()
    assert "python " in lines[0] and "Arguments: Namespace(" in lines[1] and "Versions: python" in lines[2]
    assert "Test set: < BaseDataset, tiny - #database: 4; #queries: 3 >" in info
    assert "Asked for 32 predictions, but the database has only 4 images: using 4" in info
    assert "baseline test: R@1: 66.7, R@5: 66.7" in info
    assert "test after re-ranking - R@1: 66.7, R@5: 66.7" in info
    assert "Time: descriptors" in info and "re-ranking" in info
    assert (folder / "debug.log").exists()
    assert not (folder / "local_features.f16").exists()  # the temporary store is gone
    results = json.loads((folder / "results.json").read_text())
    assert results["baseline"] == {"R@1": pytest.approx(200 / 3), "R@5": pytest.approx(200 / 3)}
    assert results["reranked"] == results["baseline"] and results["split"] == "test"

    with open(folder / "predictions.csv") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 3 * 2 * 4
    top = [r for r in rows if r["stage"] == "reranked" and r["rank"] == "0"]
    assert [(r["database_index"], r["score"]) for r in top] == [("1", "64"), ("3", "64"), ("0", "64")]
    assert "@q0@" in top[0]["query_path"] and "@d1@" in top[0]["database_path"]


MARGIN = 16  # px of noise on each side of a wide query: its centre square is the copied database image


@pytest.fixture(scope="module")
def wide_world(tiny_world, tmp_path_factory) -> Path:
    """tiny_world with wide queries (SIZE x SIZE + 2 * MARGIN): the copied database image framed left and right by
    MARGIN pixels of noise, so that each test method sees something else (only central_crop sees the exact copy)."""
    root = tmp_path_factory.mktemp("wide")
    shutil.copytree(tiny_world, root, dirs_exist_ok=True)
    rng = np.random.default_rng(1)
    for path in (root / "tiny" / "images" / "test" / "queries").glob("*.png"):
        copy = np.asarray(Image.open(path))
        margins = rng.integers(0, 256, (2, SIZE, MARGIN, 3), dtype=np.uint8)
        Image.fromarray(np.concatenate([margins[0], copy, margins[1]], axis=1)).save(path)
    return root


@pytest.mark.parametrize("test_method", ["single_query", "central_crop", "five_crops", "nearest_crop", "maj_voting"])
def test_eval_test_methods(wide_world, tmp_path, monkeypatch, test_method, device):
    # wide queries: each method describes them differently, and every method still finds the copies
    monkeypatch.chdir(tmp_path)
    extra = ("--test_method", test_method, "--num_reranked_preds", "2", "--save_predictions")
    result = run_eval(wide_world, *extra, device=device)
    np.testing.assert_allclose(result["baseline_recalls"], [200 / 3, 200 / 3])
    np.testing.assert_allclose(result["reranked_recalls"], [200 / 3, 200 / 3])
    assert result["rerank_scores"].shape == (3, 2)
    # the global distance of each query's top prediction, its copy: 0 only for the method that sees the copy alone
    with open(result["output_folder"] / "predictions.csv") as file:
        rows = list(csv.DictReader(file))
    top = [float(r["score"]) for r in rows if r["stage"] == "global" and r["rank"] == "0"]
    if test_method in ("nearest_crop", "maj_voting"):
        assert np.isnan(top).all()  # merged crops have no distance
    elif test_method == "central_crop":
        np.testing.assert_allclose(top, 0, atol=1e-6)
    else:  # the whole wide query, or the mean of five crops of which four take in noise
        assert min(top) > 1e-4


def test_eval_on_a_missing_dataset_leaves_no_run_folder(tiny_world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        eval_script.cli(["--datasets_folder", str(tiny_world), "--dataset_name", "nowhere", "--device", "cpu"])
    assert not any((tmp_path / "logs").rglob("*.log"))


def test_eval_with_a_checkpoint_that_does_not_fit(tiny_world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="DHE head checkpoint"):
        run_eval(tiny_world, "--resume_fe", str(tiny_world / "hr.torch"))
    assert not any((tmp_path / "logs").rglob("*.log"))


def test_eval_with_a_corrupt_image_names_it_and_leaves_no_run_folder(tiny_world, tmp_path, monkeypatch):
    world = tmp_path / "world"
    shutil.copytree(tiny_world, world)
    broken = next((world / "tiny" / "images" / "test" / "database").glob("*@d2@*"))
    broken.write_bytes(b"\x89PNG not really")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OSError, match=f"cannot read image {broken}"):
        run_eval(world)
    assert not any((tmp_path / "logs").rglob("*"))


def test_eval_with_local_features_in_memory_gives_the_same_ranking(tiny_world, tmp_path, monkeypatch):
    """All records in RAM and 5 pairs a pass (passes across queries) against the defaults (file, 16 a pass)."""
    monkeypatch.chdir(tmp_path)
    default = run_eval(tiny_world, "--exp_name", "file")
    in_memory = run_eval(
        tiny_world, "--exp_name", "memory", "--local_features_in_memory_mb", "1", "--rerank_batch_size", "5"
    )
    np.testing.assert_array_equal(in_memory["reranked_predictions"], default["reranked_predictions"])
    np.testing.assert_array_equal(in_memory["rerank_scores"], default["rerank_scores"])
    info = (in_memory["output_folder"] / "info.log").read_text()
    store = in_memory["output_folder"] / "local_features.f16"
    assert f"Local features: 0.3 MB in cpu memory, 0.0 MB in {store}; re-ranking 5 pairs per pass" in info


def test_evaluate_split_from_plain_values(tiny_world, tmp_path):
    """The library without flags, as a notebook or a training loop calls it: the recalls of the command line."""
    from commons import ModelConfig, build_models
    from datasets_ws import BaseDataset
    from evaluation.pipeline import EvalSettings, evaluate_split

    dataset = BaseDataset(str(tiny_world), "tiny", "test", resize=(SIZE, SIZE))
    config = ModelConfig((SIZE, SIZE), TRUNC_TE, resume_fe=tiny_world / "fe.torch", resume_hr=tiny_world / "hr.torch")
    features_extractor, homography_regression = build_models(config, torch.device("cpu"))
    settings = EvalSettings(recall_values=(1, 5), infer_batch_size=3, num_workers=0)
    result = evaluate_split(settings, dataset, features_extractor, homography_regression, torch.device("cpu"), tmp_path)
    np.testing.assert_allclose(result["baseline_recalls"], [200 / 3, 200 / 3])
    np.testing.assert_allclose(result["reranked_recalls"], [200 / 3, 200 / 3])
    assert result["reranked_predictions"][:, 0].tolist() == [1, 3, 0] and result["output_folder"] == tmp_path
    assert list(tmp_path.iterdir()) == []  # the temporary local features are gone; nothing else is written

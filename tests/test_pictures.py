"""Prediction pictures (`eval.py --num_preds_to_save`) and `eval.py --no_labels`, on the tiny synthetic world.

The world gets one extra query: a byte-for-byte copy of a database image, 1 m away from it, listed in
homographies.json with the identity as its true homography. With any features extractor its descriptor equals the
database image's, so that image is its top prediction before re-ranking (a positive: green); the DHE head predicts
the identity homography, so the copy keeps all its mutual matches (every position) as inliers and stays first after
re-ranking, and the DHE and the true borders both fall on the candidate's own border.
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
from evaluation import pictures
from model import FeaturesExtractor, HomographyRegression
from model.checkpoints import save_state_dict

SIZE = 96  # the tiny world's images; a 6 x 6 grid of local features
GRID = SIZE // 16
NUM_PREDS = 3


@pytest.fixture(scope="module")
def world(tiny_world, tmp_path_factory) -> Path:
    """A copy of the tiny world with one more query, an exact copy of a database image, and checkpoints beside it."""
    root = tmp_path_factory.mktemp("pictures")
    shutil.copytree(tiny_world, root / "tiny")
    split = root / "tiny" / "images" / "test"
    source = sorted((split / "database").glob("*.jpg"))[5]
    fields = source.name.split("@")
    fields[1] = f"{float(fields[1]) + 1:.2f}"
    fields[7] = "copy"
    copy_name = "@".join(fields)
    shutil.copyfile(source, split / "queries" / copy_name)
    sidecar = json.loads((split / "homographies.json").read_text())
    sidecar["homographies"][copy_name] = {"database": source.name, "homography": np.eye(3).tolist()}
    (split / "homographies.json").write_text(json.dumps(sidecar))

    torch.manual_seed(0)
    save_state_dict(FeaturesExtractor(resize=(SIZE, SIZE), trunc_te=1), root / "fe.torch")
    save_identity_head(root / "hr.torch", SIZE)
    return root


def run_eval(root: Path, dataset_name: str, *extra: str) -> dict:
    argv = eval_argv(root / dataset_name, "--num_reranked_preds", "8", *extra, resize=SIZE, checkpoints=root)
    return eval_script.cli(argv)


def pixel(image: Image.Image, xy: tuple[int, int]) -> tuple[int, int, int]:
    return image.getpixel(xy)[:3]


def test_prediction_pictures(world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_eval(world, "tiny", "--num_preds_to_save", str(NUM_PREDS), "--exp_name", "pics")
    folder = result["output_folder"] / "preds"
    queries = sorted((world / "tiny" / "images" / "test" / "queries").glob("*.jpg"))
    assert sorted(p.name for p in folder.glob("*.png")) == [f"{q:04d}.png" for q in range(len(queries))]
    copy = next(q for q, path in enumerate(queries) if "@copy@" in path.name)

    layout = pictures.Layout((SIZE, SIZE), NUM_PREDS)
    dataset_positives = [
        np.flatnonzero(
            np.linalg.norm(result_utms(world, "database") - utm, axis=1) <= 25  # --val_positive_dist_threshold
        )
        for utm in result_utms(world, "queries")
    ]
    for q in range(len(queries)):
        with Image.open(folder / f"{q:04d}.png") as picture:
            picture = picture.convert("RGB")
            assert picture.size == layout.size
            assert pixel(picture, layout.query_box()[:2]) == pictures.QUERY_COLOUR
            for stage, ranking in enumerate((result["predictions"], result["reranked_predictions"])):
                for rank in range(NUM_PREDS):
                    correct = ranking[q, rank] in dataset_positives[q]
                    expected = pictures.CORRECT_COLOUR if correct else pictures.WRONG_COLOUR
                    x0, y0, x1, y1 = layout.tile_box(stage, rank)
                    for corner in ((x0, y0), (x1 - 1, y1 - 1), (x0 + 2, (y0 + y1) // 2)):
                        assert pixel(picture, corner) == expected, (q, stage, rank, corner)

    # the copy: found first by both stages (green), with every position an inlier, and both borders drawn
    assert result["predictions"][copy, 0] == result["reranked_predictions"][copy, 0]
    assert result["rerank_scores"][copy, 0] == GRID * GRID
    with Image.open(folder / f"{copy:04d}.png") as picture:
        picture = picture.convert("RGB")
        assert pixel(picture, layout.tile_box(0, 0)[:2]) == pictures.CORRECT_COLOUR
        assert pixel(picture, layout.tile_box(1, 0)[:2]) == pictures.CORRECT_COLOUR
        x, y = layout.match_candidate_origin()
        width, height = layout.match_wh
        # the true homography (yellow, 5 px wide) and the DHE one (magenta, 2 px, on top) follow the image's border
        assert pixel(picture, (x + width // 2, y)) == pictures.DHE_COLOUR
        assert pixel(picture, (x + width // 2, y - 2)) == pictures.TRUE_COLOUR
        assert pixel(picture, (x, y + height // 2)) == pictures.DHE_COLOUR
        assert pixel(picture, (x - 2, y + height // 2)) == pictures.TRUE_COLOUR
        # the query's frame in the match picture is magenta; the margin around the candidate is grey
        qx, qy = layout.match_origin()
        assert pixel(picture, (qx, qy + height // 2)) == pictures.DHE_COLOUR
        assert pixel(picture, (x - layout.match_margin + 1, y - layout.match_margin + 1)) == pictures.MARGIN_COLOUR


def result_utms(world: Path, folder: str) -> np.ndarray:
    paths = sorted((world / "tiny" / "images" / "test" / folder).glob("*.jpg"))
    return np.array([[float(v) for v in p.name.split("@")[1:3]] for p in paths])


def test_only_wrong_predictions_are_saved(world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_eval(world, "tiny", "--num_preds_to_save", "1", "--save_only_wrong_preds")
    queries_utms, database_utms = result_utms(world, "queries"), result_utms(world, "database")
    top = result["reranked_predictions"][:, 0]
    wrong = [q for q in range(len(top)) if np.linalg.norm(database_utms[top[q]] - queries_utms[q]) > 25]
    saved = sorted(p.name for p in (result["output_folder"] / "preds").glob("*.png"))
    assert saved == [f"{q:04d}.png" for q in wrong]


def test_match_geometry_counts_the_rerank_score():
    torch.manual_seed(0)
    head = HomographyRegression(resize=(64, 64)).eval()
    local_q = torch.nn.functional.normalize(torch.randn(3, 8, 4, 4), dim=1)
    local_c = torch.nn.functional.normalize(local_q + 0.3 * torch.randn(3, 8, 4, 4), dim=1)
    from model.rerank import rerank_scores

    scores = rerank_scores(head, local_q, local_c.unsqueeze(1)).squeeze(1)
    geometries = pictures.match_geometry(head, local_q, local_c)
    for geometry, score in zip(geometries, scores.tolist()):
        assert geometry.homography.shape == (3, 3) and geometry.query_points.shape == geometry.candidate_points.shape
        expected = geometry.num_inliers if len(geometry.inliers) >= 4 else 0
        assert expected == score


def test_resized_homography_maps_pixel_centres():
    # a translation by (10, 5) px between 200 x 100 images, seen at 100 x 50: (5, 2.5) px
    H = np.array([[1, 0, 10], [0, 1, 5], [0, 0, 1.0]])
    resized = pictures.resized_homography(H, (200, 100), (200, 100), (100, 50))
    np.testing.assert_allclose(resized, [[1, 0, 5], [0, 1, 2.5], [0, 0, 1]], atol=1e-12)


@pytest.fixture(scope="module")
def unlabelled(world) -> Path:
    """The tiny world's test split copied under names without positions (and no homographies.json)."""
    root = world / "photos_root"
    for folder in ("database", "queries"):
        target = root / "photos" / "images" / "test" / folder
        target.mkdir(parents=True)
        for k, path in enumerate(sorted((world / "tiny" / "images" / "test" / folder).glob("*.jpg"))):
            shutil.copyfile(path, target / f"IMG_{folder[0]}{k:03d}.jpg")
    for name in ("fe.torch", "hr.torch"):
        shutil.copyfile(world / name, root / name)
    return root


def test_no_labels(unlabelled, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_eval(unlabelled, "photos", "--no_labels", "--num_preds_to_save", "2")
    assert result["baseline_recalls"] is None and result["reranked_recalls"] is None
    folder = result["output_folder"]
    info = (folder / "info.log").read_text()
    assert "baseline test: no labels (--no_labels): recalls not computed" in info
    with open(folder / "predictions.csv") as file:
        rows = list(csv.DictReader(file))
    num_queries, num_database = result["predictions"].shape[0], result["predictions"].shape[1]
    assert len(rows) == num_queries * 2 * num_database
    top = [r for r in rows if r["stage"] == "reranked" and r["rank"] == "0"]
    assert [int(r["database_index"]) for r in top] == result["reranked_predictions"][:, 0].tolist()
    assert all("IMG_q" in r["query_path"] and "IMG_d" in r["database_path"] for r in top)

    layout = pictures.Layout((SIZE, SIZE), 2)
    saved = sorted((folder / "preds").glob("*.png"))
    assert len(saved) == num_queries
    with Image.open(saved[0]) as picture:
        assert picture.size == layout.size
        for stage in (0, 1):
            assert pixel(picture.convert("RGB"), layout.tile_box(stage, 1)[:2]) == pictures.NEUTRAL_COLOUR


def test_without_no_labels_unparseable_names_stop(unlabelled, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="cannot read UTM coordinates from the file name of .*IMG_d000.jpg"):
        run_eval(unlabelled, "photos")


def test_picture_flags_are_checked(capsys):
    import parser as project_parser

    for argv, message in (
        (["--num_preds_to_save", "-1"], "--num_preds_to_save -1"),
        (["--num_preds_to_save", "51"], "--num_preds_to_save 51"),
        (["--save_only_wrong_preds"], "--save_only_wrong_preds needs --num_preds_to_save"),
        (["--num_preds_to_save", "2", "--save_only_wrong_preds", "--no_labels"], "needs labels"),
    ):
        with pytest.raises(SystemExit):
            project_parser.parse_arguments("eval", ["--datasets_folder", "x", *argv])
        assert message in capsys.readouterr().err

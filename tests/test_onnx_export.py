"""ONNX export (export_onnx.py, deploy/onnx_export.py): onnxruntime agrees with torch and re-ranks as eval.py does.

On the tiny synthetic world at 64 x 64 (a 4 x 4 grid, two CCT blocks) with seeded random weights; the DHE head's
points are the identity corners plus a random function of the correlation (its linear weight scaled up), so that the
inlier counts differ between candidates, tie often, and reorder the global predictions.
"""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import eval_argv

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import eval as eval_script  # noqa: E402
import export_onnx  # noqa: E402
from datasets_ws import normalized_tensor, open_rgb_image  # noqa: E402
from deploy import onnx_export, rerank_numpy  # noqa: E402
from model import FeaturesExtractor, HomographyRegression, compute_similarity  # noqa: E402
from model.checkpoints import load_features_extractor, load_homography_regression, save_state_dict  # noqa: E402
from model.rerank import score_pairs  # noqa: E402

SIZE = 64
TRUNC_TE = 2
HEAD_WEIGHT_SCALE = 20.0  # points move by some pixels with the correlation: the counts differ, and often tie
TOLERANCE = 1e-4
REPOSITORY = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny synthetic world with seeded checkpoints fe.torch and hr.torch beside it."""
    root = tmp_path_factory.mktemp("onnx_world")
    shutil.copytree(tiny_world, root / "tiny")
    torch.manual_seed(0)
    save_state_dict(FeaturesExtractor(resize=(SIZE, SIZE), trunc_te=TRUNC_TE), root / "fe.torch")
    head = HomographyRegression(resize=(SIZE, SIZE))
    state_dict = head.state_dict()
    state_dict["linear.weight"] *= HEAD_WEIGHT_SCALE
    corners = [8, 8, SIZE - 8, 8, 8, SIZE - 8, SIZE - 8, SIZE - 8]
    state_dict["linear.bias"].copy_(torch.tensor(corners + corners, dtype=torch.float32))
    head.load_state_dict(state_dict)
    save_state_dict(head, root / "hr.torch")
    return root


def model_flags(world: Path) -> list[str]:
    return [
        "--resume_fe", str(world / "fe.torch"), "--resume_hr", str(world / "hr.torch"),
        "--resize", str(SIZE), str(SIZE), "--trunc_te", str(TRUNC_TE),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def exported(world: Path) -> dict:
    """export_onnx.py end to end: {"paths": ..., "differences": ...}."""
    return export_onnx.cli([*model_flags(world), "--out", str(world / "onnx")])


@pytest.fixture(scope="module")
def models(world: Path) -> tuple[FeaturesExtractor, HomographyRegression]:
    features_extractor = FeaturesExtractor(resize=(SIZE, SIZE), trunc_te=TRUNC_TE)
    head = HomographyRegression(resize=(SIZE, SIZE))
    load_features_extractor(features_extractor, world / "fe.torch")
    load_homography_regression(head, world / "hr.torch")
    return features_extractor.eval(), head.eval()


@pytest.fixture(scope="module")
def sessions(exported: dict) -> dict:
    return {name: onnx_export.load_session(path) for name, path in exported["paths"].items()}


def load_images(paths: list[str]) -> torch.Tensor:
    """(N, 3, SIZE, SIZE) as eval.py hard-resizes them."""
    return torch.stack([normalized_tensor(open_rgb_image(path), (SIZE, SIZE)) for path in paths])


def test_script_writes_two_valid_graphs_with_a_dynamic_batch(exported):
    import onnx

    paths = exported["paths"]
    assert paths["features_extractor"].name == "features_extractor.onnx" and paths["head"].name == "dhe_head.onnx"
    assert all(value <= TOLERANCE for value in exported["differences"].values()), exported["differences"]

    def shapes(values) -> dict[str, list]:
        return {
            value.name: [dim.dim_param or dim.dim_value for dim in value.type.tensor_type.shape.dim] for value in values
        }

    graph = onnx.load(str(paths["features_extractor"])).graph
    onnx.checker.check_model(onnx.load(str(paths["features_extractor"])))
    assert shapes(graph.input) == {"images": ["batch", 3, SIZE, SIZE]}
    grid = SIZE // 16
    assert shapes(graph.output) == {"global_descriptors": ["batch", 384], "local_features": ["batch", 384, grid, grid]}
    graph = onnx.load(str(paths["head"])).graph
    assert shapes(graph.input) == {name: ["batch", 384, grid, grid] for name in ("local_q", "local_c")}
    assert shapes(graph.output) == {"points": ["batch", 8, 2]}


@pytest.mark.parametrize("batch_size", [1, 3])
def test_onnxruntime_matches_torch(world, models, sessions, batch_size):
    features_extractor, head = models
    paths = sorted(str(path) for path in (world / "tiny" / "images" / "test" / "database").glob("*.jpg"))[:batch_size]
    images = load_images(paths)
    with torch.inference_mode():
        global_descriptors, local_features = features_extractor(images)
        candidates = local_features.flip(0)
        points = head(compute_similarity(local_features, candidates))
    onnx_global, onnx_local = sessions["features_extractor"].run(None, {"images": images.numpy()})
    (onnx_points,) = sessions["head"].run(None, {"local_q": local_features.numpy(), "local_c": candidates.numpy()})
    assert onnx_global.shape == (batch_size, 384) and onnx_points.shape == (batch_size, 8, 2)
    assert onnx_export.relative_difference(onnx_global, global_descriptors.numpy()) <= TOLERANCE
    assert onnx_export.relative_difference(onnx_local, local_features.numpy()) <= TOLERANCE
    assert onnx_export.relative_difference(onnx_points, points.numpy()) <= TOLERANCE


def read_predictions(path: Path) -> list[dict]:
    """predictions.csv -> per query: its path, the global and re-ranked database paths, the re-ranked scores."""
    queries: dict[int, dict[str, list]] = {}
    with open(path, newline="", encoding="utf-8") as file:
        for row in csv.DictReader(file):
            query = queries.setdefault(
                int(row["query_index"]), {"path": row["query_path"], "global": [], "reranked": []}
            )
            query[row["stage"]].append(row["database_path"])
            if row["stage"] == "reranked" and row["score"]:
                query.setdefault("scores", []).append(float(row["score"]))
    return [queries[index] for index in sorted(queries)]


def test_onnx_reranking_equals_eval(world, sessions, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    extra = ["--recall_values", "1", "5", "10", "20", "--save_predictions", "--exp_name", "onnx"]
    eval_script.cli(eval_argv(world / "tiny", *extra, resize=SIZE, trunc_te=TRUNC_TE, checkpoints=world))
    (predictions_csv,) = tmp_path.glob("logs/onnx/*/predictions.csv")
    queries = read_predictions(predictions_csv)
    reordered = 0
    for query in queries:
        num_reranked = len(query["scores"])
        candidates = query["global"][:num_reranked]
        (_, local_q), (_, local_c) = (
            sessions["features_extractor"].run(None, {"images": load_images(paths).numpy()})
            for paths in ([query["path"]], candidates)
        )
        (points,) = sessions["head"].run(
            None, {"local_q": np.repeat(local_q, num_reranked, axis=0), "local_c": local_c}
        )
        order, scores = onnx_export.rerank_from_points(points, local_q, local_c)
        assert [candidates[i] for i in order] == query["reranked"][:num_reranked]
        assert scores[order].tolist() == query["scores"]
        numpy_order, numpy_scores = rerank_numpy.rerank_from_points(points, local_q, local_c)
        assert np.array_equal(numpy_order, order) and np.array_equal(numpy_scores, scores)
        reordered += query["reranked"] != query["global"]
    # The check means something only where re-ranking changes orders, with scores that tie and that differ.
    all_scores = np.concatenate([query["scores"] for query in queries])
    assert reordered >= len(queries) // 2 and len(np.unique(all_scores)) > 3 and len(all_scores) > len(queries) * 3


def test_rerank_from_points_scores_as_score_pairs_and_orders_ties_as_eval(models):
    _, head = models
    generator = torch.Generator().manual_seed(0)
    local_c = torch.nn.functional.normalize(torch.rand(6, 384, SIZE // 16, SIZE // 16, generator=generator), dim=1)
    local_q = local_c[2:3] + 0.05 * torch.rand(1, 384, SIZE // 16, SIZE // 16, generator=generator)
    local_q = torch.nn.functional.normalize(local_q, dim=1)
    with torch.inference_mode():
        points = head(compute_similarity(local_q.expand_as(local_c), local_c))
    order, scores = onnx_export.rerank_from_points(points.numpy(), local_q[0].numpy(), local_c.numpy())
    expected = score_pairs(head, local_q.expand_as(local_c), local_c).numpy()
    assert scores.dtype == np.float32 and np.array_equal(scores, expected)
    assert order.tolist() == np.argsort(expected.astype(np.float64))[::-1].tolist()
    # every score tied (six copies of the query under the identity): the global order stays, as in eval.py
    corners = torch.tensor([[8, 8], [SIZE - 8, 8], [8, SIZE - 8], [SIZE - 8, SIZE - 8]], dtype=torch.float32)
    identity = torch.cat([corners, corners]).expand(6, 8, 2)
    order, scores = onnx_export.rerank_from_points(identity, local_q, local_q.expand_as(local_c))
    assert order.tolist() == list(range(6)) and (scores == (SIZE // 16) ** 2).all()


def test_numpy_homographies_and_counts_equal_torch():
    from model.geometry import points_to_homography
    from model.matching import inlier_scores

    generator = torch.Generator().manual_seed(1)
    corners = torch.tensor([[8, 8], [SIZE - 8, 8], [8, SIZE - 8], [SIZE - 8, SIZE - 8]], dtype=torch.float32)
    points = torch.cat([corners, corners]).repeat(5, 1, 1) + 12 * torch.randn(5, 8, 2, generator=generator)
    H = points_to_homography(points)
    H_numpy = rerank_numpy.homographies_from_points(points.numpy())
    assert np.allclose(H_numpy, H.double().numpy(), rtol=1e-4, atol=1e-4)
    local_c = torch.nn.functional.normalize(torch.rand(5, 16, 6, 5, generator=generator), dim=1)
    local_q = torch.nn.functional.normalize(local_c[:1] + 0.3 * torch.rand(1, 16, 6, 5, generator=generator), dim=1)
    expected = inlier_scores(local_q, local_c, H)
    assert len(set(expected.tolist())) > 1  # counts that differ, so that a wrong one shows
    assert np.array_equal(rerank_numpy.inlier_counts(local_q.numpy(), local_c.numpy(), H_numpy), expected.numpy())
    # a degenerate configuration (every query point on one line) gives NaN, which maps nothing
    points[0, :4, 1] = 8
    assert np.isnan(rerank_numpy.homographies_from_points(points.numpy())[0]).all()


def test_export_leaves_the_models_training_flags_and_head_kernels(models, tmp_path):
    from model.dhe import cpu_kernels

    features_extractor, head = models
    kernels = cpu_kernels()
    features_extractor.train()
    try:
        onnx_export.export_features_extractor(features_extractor, tmp_path / "fe.onnx")
        assert all(module.training for module in features_extractor.modules())
    finally:
        features_extractor.eval()
    onnx_export.export_head(head, features_extractor.features_dim, tmp_path / "head.onnx")
    assert not any(module.training for module in head.modules()) and cpu_kernels() == kernels


def test_missing_checkpoint_is_one_line_and_exit_code_1(world, tmp_path):
    missing = tmp_path / "nowhere.torch"
    result = subprocess.run(
        [sys.executable, "export_onnx.py", "--resume_fe", str(missing), "--out", str(tmp_path / "out")],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"export_onnx.py: error: --resume_fe {missing}: no such file"]
    assert not (tmp_path / "out").exists()


def test_out_that_is_a_file(world, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        export_onnx.cli([*model_flags(world), "--out", str(tmp_path / "file")])


def test_missing_onnxruntime_says_how_to_install(world, tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else find_spec(name)
    )
    with pytest.raises(onnx_export.MissingOnnxError, match=r"pip install onnxruntime \(or pip install -r requirements"):
        export_onnx.cli([*model_flags(world), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()

"""`hubconf.dhe_vpr` through `torch.hub.load(<repo dir>, source="local")`, with checkpoints in the format that
finetune.py writes (`model.checkpoints.save_state_dict`: plain state dicts with the original's key names)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import save_identity_head

import hubconf
from model import FeaturesExtractor, HomographyRegression
from model.checkpoints import (
    CheckpointMismatchError,
    NotACheckpointError,
    load_features_extractor,
    load_homography_regression,
    save_state_dict,
)
from model.files import save_atomically

REPO = Path(__file__).resolve().parents[1]
SIZE = 64
TRUNC_TE = 1


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("hub")
    torch.manual_seed(0)
    features_extractor = FeaturesExtractor(resize=(SIZE, SIZE), trunc_te=TRUNC_TE)
    with torch.no_grad():
        features_extractor.pool[1].p.fill_(2.5)  # not the initial value: loading must really happen
    save_state_dict(features_extractor, folder / "features_extractor_best.torch")
    save_identity_head(folder / "homography_regression_best.torch", SIZE)
    return folder / "features_extractor_best.torch", folder / "homography_regression_best.torch"


def no_download(*args, **kwargs):
    raise AssertionError("something tried to download")


def hub_load(**kwargs):
    return torch.hub.load(str(REPO), "dhe_vpr", source="local", **kwargs)


def test_hub_loads_finetune_checkpoints(checkpoints, monkeypatch):
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    monkeypatch.setattr(urllib.request, "urlopen", no_download)
    resume_fe, resume_hr = checkpoints
    model = hub_load(resume_fe=str(resume_fe), resume_hr=resume_hr, resize=(SIZE, SIZE), trunc_te=TRUNC_TE)
    assert isinstance(model, torch.nn.Module) and not model.training
    assert isinstance(model.features_extractor, FeaturesExtractor)
    assert isinstance(model.homography_regression, HomographyRegression)
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert model.features_extractor.pool[1].p.item() == 2.5
    expected = torch.load(resume_hr, weights_only=True)
    for key, value in model.homography_regression.state_dict().items():
        assert torch.equal(value, expected[key]), key

    torch.manual_seed(1)
    images = torch.randn(4, 3, SIZE, SIZE)
    with torch.no_grad():
        global_descriptors, local_features = model(images)
    assert global_descriptors.shape == (4, 384) and local_features.shape == (4, 384, SIZE // 16, SIZE // 16)
    # candidates: images 1..3 and the query itself, which keeps every mutual match under the identity homography
    candidates = torch.cat([local_features[1:], local_features[:1]])
    order, scores = model.rerank(local_features[0], candidates)
    assert order.shape == scores.shape == (4,) and order[0] == 3
    assert scores[3] == (SIZE // 16) ** 2
    batched_order, batched_scores = model.rerank(local_features[:1], candidates[None])
    assert batched_order.tolist() == [order.tolist()] and torch.equal(batched_scores[0], scores)


def test_hub_loads_what_finetune_wrote(tmp_path, monkeypatch):
    """One tiny epoch of finetune.py, then its best and per-epoch state dicts through torch.hub.load."""
    import finetune
    from tools.synthetic.world import generate_world

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    monkeypatch.chdir(tmp_path)
    generate_world(tmp_path, "tiny", image_size=(96, 96), database_per_split=(16, 8, 8), queries_per_split=(6, 4, 2))
    result = finetune.cli(
        [
            "--datasets_folder", str(tmp_path), "--dataset_name", "tiny", "--resize", str(SIZE), str(SIZE),
            "--trunc_te", str(TRUNC_TE), "--num_workers", "0", "--device", "cpu", "--infer_batch_size", "8",
            "--cache_refresh_rate", "4", "--queries_per_epoch", "4", "--train_batch_size", "2",
            "--neg_samples_num", "8", "--epochs_num", "1", "--exp_name", "hub",
        ]
    )  # fmt: skip
    folder = result["output_folder"]
    for prefix in ("best_", ""):
        suffix = "" if prefix else "_000"
        resume_fe = folder / f"{prefix}features_extractor{suffix}.torch"
        resume_hr = folder / f"{prefix}homography_regression{suffix}.torch"
        model = hub_load(resume_fe=str(resume_fe), resume_hr=str(resume_hr), resize=(SIZE, SIZE), trunc_te=TRUNC_TE)
        for module, path in ((model.features_extractor, resume_fe), (model.homography_regression, resume_hr)):
            saved = torch.load(path, weights_only=True)
            state_dict = module.state_dict()
            assert set(saved) == set(state_dict)
            assert all(torch.equal(state_dict[key], value) for key, value in saved.items())


@pytest.mark.filterwarnings("ignore:dhe_vpr. no resume")
def test_hub_preprocess(checkpoints, tmp_path):
    import numpy as np
    from PIL import Image

    path = tmp_path / "photo.png"
    Image.new("RGB", (100, 80), (124, 116, 104)).save(path)  # the ImageNet mean colour, roughly
    model = hubconf.dhe_vpr(*checkpoints, resize=(SIZE, SIZE), trunc_te=TRUNC_TE)
    image = model.preprocess(path)
    assert image.shape == (3, SIZE, SIZE) and image.abs().max() < 0.05

    # a noisy 100 x 80 (W x H) photo into a 48 x 64 (H x W) model: eval.py's bilinear resize without antialiasing,
    # rows and columns in place, ImageNet-normalised
    pixels = np.random.default_rng(0).integers(0, 256, (80, 100, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    wide = hubconf.dhe_vpr(resize=(48, 64), trunc_te=0)
    photo = torch.from_numpy(pixels).permute(2, 0, 1).float().unsqueeze(0) / 255
    expected = torch.nn.functional.interpolate(photo, size=(48, 64), mode="bilinear", align_corners=False)[0]
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    torch.testing.assert_close(wide.preprocess(path), (expected - mean) / std)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"resize": (65, 64)}, ValueError, "resize must be"),
        ({"resize": 64}, ValueError, "resize must be"),
        ({"trunc_te": 14}, ValueError, "trunc_te must be an integer from 0 to 13"),
        ({"freeze_te": -2}, ValueError, "freeze_te must be"),
        ({"resume_fe": "nowhere.torch"}, FileNotFoundError, "nothing is ever downloaded"),
        ({"resume_hr": 3}, TypeError, "resume_hr must be a path"),
    ],
)
def test_hub_checks_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        hubconf.dhe_vpr(**{"resize": (SIZE, SIZE), "trunc_te": TRUNC_TE, **kwargs})


@pytest.mark.filterwarnings("ignore:dhe_vpr. no resume")
def test_hub_swapped_or_mis_sized_checkpoints(checkpoints):
    resume_fe, resume_hr = checkpoints
    with pytest.raises(CheckpointMismatchError, match="DHE head checkpoint"):
        hubconf.dhe_vpr(resume_fe=resume_hr, resize=(SIZE, SIZE), trunc_te=TRUNC_TE)
    with pytest.raises(CheckpointMismatchError, match="another --resize"):
        hubconf.dhe_vpr(resume_hr=resume_hr, resize=(2 * SIZE, SIZE), trunc_te=TRUNC_TE)


def test_hub_without_weights_warns():
    with pytest.warns(UserWarning, match="random weights"):
        hubconf.dhe_vpr(resize=(SIZE, SIZE), trunc_te=TRUNC_TE)


GRID = SIZE // 16


@pytest.fixture(scope="module")
def api_checkpoints(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("api")
    torch.manual_seed(0)
    save_state_dict(FeaturesExtractor(resize=(SIZE, SIZE), trunc_te=TRUNC_TE), folder / "features_extractor.torch")
    save_identity_head(folder / "homography_regression.torch", SIZE)
    return folder / "features_extractor.torch", folder / "homography_regression.torch"


@pytest.fixture(scope="module")
def model(api_checkpoints) -> hubconf.DHEVPR:
    return hubconf.dhe_vpr(*api_checkpoints, resize=(SIZE, SIZE), trunc_te=TRUNC_TE)


@pytest.fixture(scope="module")
def local_features(model) -> torch.Tensor:
    """(4, 384, GRID, GRID) local features of four random images."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        return model(torch.randn(4, 3, SIZE, SIZE, generator=generator))[1]


def test_hub_api_from_another_project(api_checkpoints, tmp_path):
    """The README's torch.hub example from another project's folder: load, preprocess, forward and rerank all work
    once `torch.hub.load` has returned (and taken this repository off sys.path)."""
    from PIL import Image

    elsewhere = tmp_path / "other_project"
    elsewhere.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (90, 70), (120, 110, 100)).save(elsewhere / name)
    script = textwrap.dedent(
        f"""
        import sys, warnings
        import torch
        model = torch.hub.load({str(REPO)!r}, "dhe_vpr", source="local", resume_fe={str(api_checkpoints[0])!r},
                               resume_hr={str(api_checkpoints[1])!r}, resize=({SIZE}, {SIZE}), trunc_te={TRUNC_TE})
        assert {str(REPO)!r} not in sys.path
        images = torch.stack([model.preprocess(path) for path in ("a.png", "b.png")])
        with torch.no_grad():
            global_descriptors, local_features = model(images)
        order, scores = model.rerank(local_features[0], local_features)
        print("OK", tuple(images.shape), tuple(global_descriptors.shape), order.tolist(), scores.tolist())
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=elsewhere, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"OK (2, 3, {SIZE}, {SIZE}) (2, 384)" in result.stdout


def test_hub_api_beside_a_module_of_the_same_name(api_checkpoints, tmp_path):
    """Another project with its own `util` module, imported before torch.hub.load: a message that says so, not an
    ImportError about a name missing from that module (or, worse, its code running in place of ours)."""
    (tmp_path / "util.py").write_text("def helper():\n    return 1\n")
    script = f"import torch, util\ntorch.hub.load({str(REPO)!r}, 'dhe_vpr', source='local')\n"
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    assert f"a module named 'util' is already imported ({tmp_path / 'util.py'})" in last_line
    assert "load DHE-VPR in a separate process" in last_line


def test_hub_rerank_one_candidate(model, local_features):
    order, scores = model.rerank(local_features[0], local_features[1:2])
    assert order.tolist() == [0] and scores.shape == (1,)
    batched_order, batched_scores = model.rerank(local_features[:2], local_features[2:].unsqueeze(1))
    assert batched_order.tolist() == [[0], [0]] and batched_scores.shape == (2, 1)


def test_hub_rerank_no_candidate_gives_empty_results(model, local_features):
    order, scores = model.rerank(local_features[0], local_features[:0])
    assert order.shape == scores.shape == (0,) and order.dtype == torch.int64
    order, scores = model.rerank(local_features[:2], local_features[:0].unsqueeze(0).expand(2, 0, -1, -1, -1))
    assert order.shape == scores.shape == (2, 0)


def test_hub_rerank_orders_ties_as_eval(model, local_features):
    """All candidates tied: the given order is kept (eval.py's rule), with a warning; partial ties: the original's
    `argsort()[::-1]`, exactly as `evaluation.reranking.rerank_predictions` orders them."""
    same = local_features[1:2].expand(4, -1, -1, -1)
    with pytest.warns(UserWarning, match="same score"):
        order, scores = model.rerank(local_features[0], same)
    assert (scores == scores[0]).all()
    assert order.tolist() == [0, 1, 2, 3]
    # the query itself scores GRID * GRID under the identity head: two tied winners, two tied losers
    mixed = torch.stack([local_features[1], local_features[0], local_features[1], local_features[0]])
    order, scores = model.rerank(local_features[0], mixed)
    assert scores[1] == scores[3] == GRID * GRID and scores[0] == scores[2] < GRID * GRID
    assert order.tolist() == scores.double().numpy().argsort()[::-1].tolist()
    assert set(order[:2].tolist()) == {1, 3}


@pytest.mark.parametrize("which", ["query", "candidates"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_hub_rerank_refuses_non_finite_features(model, local_features, which, value):
    query, candidates = local_features[0].clone(), local_features[1:].clone()
    (query if which == "query" else candidates)[..., 0, 0] = value
    name = "local_q" if which == "query" else "local_candidates"
    with pytest.raises(ValueError, match=f"{name} holds non-finite values"):
        model.rerank(query, candidates)


@pytest.mark.parametrize(
    ("images", "error", "message"),
    [
        (torch.zeros(1, 3, 2 * SIZE, SIZE), ValueError, r"model's resize \(64, 64\), got \(128, 64\).*preprocess"),
        (torch.zeros(1, 3, SIZE, SIZE, dtype=torch.uint8), TypeError, "ImageNet-normalised torch.float32 images"),
        (torch.zeros(1, 3, SIZE, SIZE, dtype=torch.float64), TypeError, "got torch.float64"),
        (np.zeros((1, 3, SIZE, SIZE), dtype=np.float32), TypeError, "torch.Tensor"),
    ],
    ids=["size", "uint8", "float64", "numpy"],
)
def test_hub_forward_names_what_is_wrong_with_the_images(model, images, error, message):
    with pytest.raises(error, match=message):
        model(images)


def test_hub_rerank_names_what_is_wrong_with_the_features(model, local_features):
    with pytest.raises(TypeError, match="local_q must be a floating-point torch.Tensor"):
        model.rerank(local_features[0].long(), local_features[1:])
    with pytest.raises(TypeError, match="local_candidates must be a floating-point torch.Tensor.*ndarray"):
        model.rerank(local_features[0], local_features[1:].numpy())
    other_grid = torch.nn.functional.normalize(torch.rand(3, 384, 2 * GRID, GRID), dim=1)
    with pytest.raises(ValueError, match=r"\(8, 4\) feature grid, but the model was built for resize \(64, 64\)"):
        model.rerank(other_grid[0], other_grid[1:])
    for batch_size in (True, 2.5, 0):
        with pytest.raises(ValueError, match="batch_size must be an integer"):
            model.rerank(local_features[0], local_features[1:], batch_size=batch_size)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_hub_cuda_map_location_without_cuda(api_checkpoints):
    with pytest.raises(RuntimeError, match="torch sees no CUDA device"):
        hubconf.dhe_vpr(*api_checkpoints, resize=(SIZE, SIZE), trunc_te=TRUNC_TE, map_location="cuda")
    # the loader itself says the same, not "damaged or truncated"
    with pytest.raises(NotACheckpointError, match="torch sees no CUDA device") as error:
        load_homography_regression(HomographyRegression((SIZE, SIZE)), api_checkpoints[1], map_location="cuda")
    assert "damaged" not in str(error.value)


@pytest.mark.parametrize("name", ["resume_fe", "resume_hr", "pretrained_cct"])
def test_hub_folder_as_checkpoint(api_checkpoints, name):
    folder = api_checkpoints[0].parent
    with pytest.raises(IsADirectoryError, match=r"is a folder, not a checkpoint file.*features_extractor\.torch"):
        hubconf.dhe_vpr(**{name: folder}, resize=(SIZE, SIZE), trunc_te=TRUNC_TE)


@pytest.fixture(scope="module")
def training_checkpoint(tmp_path_factory) -> Path:
    """A `last_checkpoint.pth` as training.py writes it: modules' state dicts beside the optimizer and bookkeeping."""
    path = tmp_path_factory.mktemp("run") / "last_checkpoint.pth"
    features_extractor = FeaturesExtractor(resize=(SIZE, SIZE), trunc_te=TRUNC_TE)
    head = HomographyRegression((SIZE, SIZE))
    optimizer = torch.optim.Adam(list(features_extractor.parameters()) + list(head.parameters()))
    modules = {"features_extractor": features_extractor.state_dict(), "homography_regression": head.state_dict()}
    save_atomically({"format": 1, "epoch": 1, "modules": modules, "optimizer": optimizer.state_dict()}, path)
    return path


@pytest.mark.filterwarnings("ignore:dhe_vpr. no resume")
@pytest.mark.parametrize("name", ["resume_fe", "resume_hr"])
def test_training_checkpoint_where_weights_are_expected(training_checkpoint, name):
    with pytest.raises(CheckpointMismatchError, match=r"training checkpoint .*best_homography_regression\.torch"):
        hubconf.dhe_vpr(**{name: training_checkpoint}, resize=(SIZE, SIZE), trunc_te=TRUNC_TE)
    module = FeaturesExtractor(resize=(SIZE, SIZE), trunc_te=TRUNC_TE)
    with pytest.raises(CheckpointMismatchError, match="training checkpoint"):
        load_features_extractor(module, training_checkpoint)

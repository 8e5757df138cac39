"""Hostile inputs, round 3 (issue 14): the Python/torch.hub API used as documented from anywhere, run folders that
stay under logs/, and the training augmentations on odd but valid images and values."""

from __future__ import annotations

import subprocess
import sys
import textwrap
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
GRID = SIZE // 16
TRUNC_TE = 1


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("hostile_api")
    torch.manual_seed(0)
    save_state_dict(FeaturesExtractor(resize=(SIZE, SIZE), trunc_te=TRUNC_TE), folder / "features_extractor.torch")
    save_identity_head(folder / "homography_regression.torch", SIZE)
    return folder / "features_extractor.torch", folder / "homography_regression.torch"


@pytest.fixture(scope="module")
def model(checkpoints) -> hubconf.DHEVPR:
    return hubconf.dhe_vpr(*checkpoints, resize=(SIZE, SIZE), trunc_te=TRUNC_TE)


@pytest.fixture(scope="module")
def local_features(model) -> torch.Tensor:
    """(4, 384, GRID, GRID) local features of four random images."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        return model(torch.randn(4, 3, SIZE, SIZE, generator=generator))[1]


# --- Kind 5: the Python API used as documented, from anywhere ---


def test_hub_api_from_another_project(checkpoints, tmp_path):
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
        model = torch.hub.load({str(REPO)!r}, "dhe_vpr", source="local", resume_fe={str(checkpoints[0])!r},
                               resume_hr={str(checkpoints[1])!r}, resize=({SIZE}, {SIZE}), trunc_te={TRUNC_TE})
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


def test_hub_api_beside_a_module_of_the_same_name(checkpoints, tmp_path):
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
def test_hub_cuda_map_location_without_cuda(checkpoints):
    with pytest.raises(RuntimeError, match="torch sees no CUDA device"):
        hubconf.dhe_vpr(*checkpoints, resize=(SIZE, SIZE), trunc_te=TRUNC_TE, map_location="cuda")
    # the loader itself says the same, not "damaged or truncated"
    with pytest.raises(NotACheckpointError, match="torch sees no CUDA device") as error:
        load_homography_regression(HomographyRegression((SIZE, SIZE)), checkpoints[1], map_location="cuda")
    assert "damaged" not in str(error.value)


@pytest.mark.parametrize("name", ["resume_fe", "resume_hr", "pretrained_cct"])
def test_hub_folder_as_checkpoint(checkpoints, name):
    folder = checkpoints[0].parent
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


# --- Kind 8: outputs where they belong ---

BAD_EXP_NAMES = ["../escape", "/tmp/absolute", "a/b", "", ".", "..", "a\nb", "a\x00b", "x" * 201]


@pytest.mark.parametrize(
    ("script", "flag"),
    [("eval", "--exp_name"), ("finetune", "--exp_name"), ("finetune", "--save_dir"), ("train_dhe", "--exp_name")],
)
@pytest.mark.parametrize("name", BAD_EXP_NAMES)
def test_exp_name_cannot_leave_logs(script, flag, name, tmp_path, capsys):
    import parser as flags

    with pytest.raises(SystemExit):
        flags.parse_arguments(script, ["--datasets_folder", str(tmp_path), flag, name])
    message = capsys.readouterr().err.splitlines()[-1]
    assert message.startswith(f"{script}.py: error: --exp_name {name!r}")


@pytest.mark.parametrize("name", BAD_EXP_NAMES)
def test_make_run_folder_refuses_paths(name, tmp_path):
    import commons

    root = tmp_path / "logs"
    root.mkdir()
    with pytest.raises(ValueError, match="give one folder name"):
        commons.make_run_folder(name, root)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["logs"]


def test_make_run_folder_keeps_plain_names(tmp_path):
    import commons

    for name in ("default", "run with spaces", "été-2026", "..dots.."):
        folder = commons.make_run_folder(name, tmp_path)
        assert folder.parent == tmp_path / name and folder.is_dir()


@pytest.mark.parametrize("blocked", ["logs", "logs/default"])
@pytest.mark.parametrize("script", ["train_dhe", "finetune"])
def test_training_run_folder_blocked_by_a_file(script, blocked, tmp_path, monkeypatch, capsys):
    import importlib

    monkeypatch.chdir(tmp_path)
    (tmp_path / blocked).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / blocked).write_text("not a folder")
    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as exit_info:
        module.cli(["--datasets_folder", str(tmp_path), "--device", "cpu", "--num_workers", "0"])
    assert exit_info.value.code == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"{script}.py: error: cannot create the run folder logs/default/")
    assert line.endswith(f"{blocked} is a file, not a folder")
    assert (tmp_path / blocked).read_text() == "not a folder"


@pytest.mark.parametrize("existing", [[], ["logs"]])
def test_run_folder_not_writable_names_the_folder(existing, tmp_path, monkeypatch):
    """A read-only logs/ (simulated: the tests may run as root, who can write anywhere) names the folder that
    refused, in one line."""
    import errno

    import commons

    for name in existing:
        (tmp_path / name).mkdir()
    real_mkdir = Path.mkdir

    def read_only_mkdir(self, *args, **kwargs):
        if self.parent.name in ("", "logs", tmp_path.name) and self.parent.exists():
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only_mkdir)
    with pytest.raises(PermissionError) as error:
        commons.make_run_folder("default", tmp_path / "logs")
    blocked = tmp_path / "logs" if existing else tmp_path
    assert str(error.value).startswith(f"cannot create the run folder {tmp_path / 'logs' / 'default'}/")
    assert str(error.value).endswith(f"Permission denied; check that {blocked} is writable")


def test_eval_run_folder_blocked_by_a_file_one_line(tmp_path):
    (tmp_path / "logs").write_text("not a folder")
    argv = ["--datasets_folder", str(tmp_path), "--device", "cpu", "--num_workers", "0"]
    result = subprocess.run(
        [sys.executable, str(REPO / "eval.py"), *argv], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("eval.py: error: cannot create the run folder logs/default/")
    assert line.endswith("logs is a file, not a folder")


def test_local_features_dir_not_writable(tmp_path, monkeypatch, capsys):
    import os

    import parser as flags

    folder = tmp_path / "read_only"
    folder.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == folder else real_access(path, mode))
    with pytest.raises(SystemExit):
        flags.parse_arguments("eval", ["--datasets_folder", str(tmp_path), "--local_features_dir", str(folder)])
    assert f"--local_features_dir {folder}: not writable" in capsys.readouterr().err


# --- Kind 9 (augmentations): odd but valid images and values ---

AUGMENTATION_LIMITS = [
    {"brightness": 1e38},
    {"contrast": 1e38},
    {"saturation": 1e38},
    {"brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.0},
    {"hue": 0.5},
    {"rand_perspective": 0.0},
    {"rand_perspective": 0.5},
    {"rand_perspective": 1.0},
    {"random_resized_crop": 0.0},
    {"random_resized_crop": 0.999999},
    {"random_rotation": 180.0},
]
ODD_SIZES = [(1, 1), (1, 300), (300, 1), (2, 500), (500, 2), (3, 3), (17, 9)]  # (width, height), all below --resize


@pytest.mark.parametrize("flags", AUGMENTATION_LIMITS, ids=lambda flags: ",".join(f"{k}={v}" for k, v in flags.items()))
def test_query_augmentation_at_its_limits_on_odd_images(flags):
    """Every augmentation flag at the ends of what the parser accepts, on images 1 pixel wide or high, thin, tiny:
    a finite (3, H, W) query, draw after draw."""
    from PIL import Image

    import datasets_ws

    augmentation = datasets_ws.query_augmentation(datasets_ws.QueryAugmentation(**flags), (SIZE, SIZE))
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    for width, height in ODD_SIZES:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        for _ in range(20):
            query = augmentation(image)
            assert query.shape == (3, SIZE, SIZE) and query.isfinite().all(), (width, height)


def test_random_perspective_draws_as_torchvision_on_ordinary_images():
    """The perspective that copes with thin images gives torchvision's result, draw for draw, where torchvision's
    works (the same random numbers, the same transform)."""
    import torchvision.transforms as T
    from PIL import Image

    import datasets_ws

    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    for seed in range(10):
        torch.manual_seed(seed)
        ours = np.asarray(datasets_ws._RandomPerspective(distortion_scale=0.5)(image))
        torch.manual_seed(seed)
        theirs = np.asarray(T.RandomPerspective(distortion_scale=0.5)(image))
        np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("flag", ["--brightness", "--contrast", "--saturation"])
def test_colour_jitter_beyond_float32_refused(flag, tmp_path, capsys):
    """ColorJitter draws its factor in float32: a larger value crashed the first training batch; the parser
    refuses it now, and its largest accepted value works."""
    import parser as flags

    with pytest.raises(SystemExit):
        flags.parse_arguments("finetune", ["--datasets_folder", str(tmp_path), flag, "1e39"])
    assert f"{flag} 1e+39: must be in [0, 1e+38]" in capsys.readouterr().err
    args = flags.parse_arguments("finetune", ["--datasets_folder", str(tmp_path), flag, "1e38"])
    assert getattr(args, flag[2:]) == 1e38

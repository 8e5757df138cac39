"""Shared fixtures: the device to test on, the original's reference outputs, deterministic weights, the session's tiny
synthetic world and the dataset tools' inputs.

`pytest --device cuda` runs the tests that take the `device` fixture on the GPU (the default is cpu); the others
(datasets, parser, synthetic world, files) always run on the CPU.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "data"
sys.path.insert(0, str(DATA))

from fill_weights import fill_  # noqa: E402
from helpers import photo_csv, small_photos  # noqa: E402

import datasets_ws  # noqa: E402
from tools.synthetic.world import PRESETS, generate_world  # noqa: E402

# The head's linear bias and weight scale used for parity_reference.pt (see tests/data/README.md).
REFERENCE_LINEAR_BIAS = [8, 8, 376, 8, 8, 376, 376, 376, 20, 4, 370, 15, 2, 380, 366, 372]
IMAGENET_MEAN = torch.tensor(datasets_ws.IMAGENET_MEAN).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor(datasets_ws.IMAGENET_STD).view(1, 3, 1, 1)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device",
        default="cpu",
        choices=("cpu", "cuda"),
        help="Device of the tests that take the `device` fixture (model, matching, RANSAC, eval.py); default cpu.",
    )


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--device") == "cuda":
        if not torch.cuda.is_available():
            raise pytest.UsageError("--device cuda was asked for, but torch sees no CUDA device")
        # The parity tolerances are those of fp32: no TF32 in convolutions or matrix products.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> torch.device:
    """The device given by `pytest --device` (cpu by default)."""
    return torch.device(request.config.getoption("--device"))


@pytest.fixture(scope="session")
def reference() -> dict:
    return torch.load(DATA / "parity_reference.pt", weights_only=True)


@pytest.fixture(scope="session")
def checkpoint_keys() -> dict:
    return json.loads((DATA / "checkpoint_keys.json").read_text())


def reference_features_extractor():
    """The default FeaturesExtractor with the reference's deterministic weights, in eval mode."""
    from model import FeaturesExtractor

    model = FeaturesExtractor().eval()
    model.load_state_dict(fill_(model.state_dict()))
    return model


def reference_homography_regression():
    """The default HomographyRegression with the reference's deterministic weights, in eval mode."""
    from model import HomographyRegression

    model = HomographyRegression().eval()
    state_dict = fill_(model.state_dict())
    state_dict["linear.bias"] = torch.tensor(REFERENCE_LINEAR_BIAS, dtype=torch.float32)
    state_dict["linear.weight"] = state_dict["linear.weight"] * 0.1
    model.load_state_dict(state_dict)
    return model


def normalise_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> ImageNet-normalised float (B, 3, H, W)."""
    return (images.float() / 255 - IMAGENET_MEAN) / IMAGENET_STD


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The world folder of `synthetic.py --preset tiny` (seed 0: train 16/6, val 8/4, test 16/6 database/queries at
    96 x 96), generated once for the whole session. Tests must not change it: one that writes into the dataset
    copies it first."""
    return generate_world(tmp_path_factory.mktemp("worlds"), "tiny", seed=0, **PRESETS["tiny"])


@pytest.fixture
def inputs(tmp_path: Path) -> tuple[Path, Path]:
    """(photos folder, CSV) in tmp_path/data."""
    photos = small_photos(tmp_path / "data" / "photos", ["a.jpg", "q.jpg"])
    return photos, photo_csv(tmp_path / "data" / "photos.csv")

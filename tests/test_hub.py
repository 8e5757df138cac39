"""`hubconf.dhe_vpr` through `torch.hub.load(<repo dir>, source="local")`, with checkpoints in the format that
finetune.py writes (`model.checkpoints.save_state_dict`: plain state dicts with the original's key names)."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
import torch
from helpers import save_identity_head

import hubconf
from model import FeaturesExtractor, HomographyRegression
from model.checkpoints import CheckpointMismatchError, save_state_dict

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

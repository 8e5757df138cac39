"""model.checkpoints: files from the wild that are not checkpoints, checkpoints of another --resize or with NaN
weights, and the original loading ours strictly."""

from __future__ import annotations

import io
import pickle
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from model import FeaturesExtractor, HomographyRegression
from model.checkpoints import (
    GRID_METADATA_KEY,
    CheckpointMismatchError,
    NotACheckpointError,
    load_features_extractor,
    load_homography_regression,
    load_state_dict_file,
    save_state_dict,
)


class _Numpy1Pickler(pickle._Pickler):
    """Pickles numpy objects under numpy 1.x's module names (`numpy.core.multiarray`), as old checkpoints have."""

    def save_global(self, obj, name=None):
        module = getattr(obj, "__module__", "") or ""
        if module.startswith("numpy._core"):
            qualified = f"{module.replace('numpy._core', 'numpy.core')}\n{name or obj.__name__}\n"
            self.write(pickle.GLOBAL + qualified.encode())
            self.memoize(obj)
            return
        super().save_global(obj, name)


def test_benchmark_checkpoint_pickled_under_numpy_1_loads(tmp_path):
    features_extractor = FeaturesExtractor(resize=(64, 64), trunc_te=1)
    renames = {"encoder.": "module.backbone.", "pool.": "module.aggregation."}
    state_dict = {
        renames[k.split(".")[0] + "."] + k.split(".", 1)[1]: v for k, v in features_extractor.state_dict().items()
    }
    checkpoint = {"epoch_num": 3, "model_state_dict": state_dict, "recalls": np.array([80.1, 90.2])}
    checkpoint["best_r5"] = np.float64(90.2)
    path = tmp_path / "CCT14_msls.pth"
    shim = types.SimpleNamespace(Pickler=_Numpy1Pickler, Unpickler=pickle.Unpickler, __name__="pickle")
    torch.save(checkpoint, path, pickle_module=shim)
    assert b"numpy.core.multiarray\n_reconstruct" in zipfile.ZipFile(path).read("CCT14_msls/data.pkl")
    loaded = load_state_dict_file(path)
    assert loaded["recalls"].tolist() == [80.1, 90.2] and loaded["best_r5"] == 90.2
    load_features_extractor(FeaturesExtractor(resize=(64, 64), trunc_te=1), path)


def _truncated_checkpoint(path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(HomographyRegression(resize=(32, 32)).state_dict(), buffer)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


@pytest.mark.parametrize(
    ("make", "looks_like"),
    [
        (lambda p: p.write_text("these are not weights\n"), "is a text file"),
        (lambda p: p.write_text("<!DOCTYPE html>\n<html><head><title>Sign in</title>"), "is an HTML page"),
        (
            lambda p: p.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:ab12\nsize 123\n"),
            "is a Git LFS pointer",
        ),
        (lambda p: p.write_bytes(b""), "is empty (0 bytes)"),
        (lambda p: p.mkdir(), "is a folder"),
        (_truncated_checkpoint, "is a damaged or truncated zip archive"),
        (lambda p: p.write_bytes(b"\x00\x01\x02\x03binary"), "is not a torch checkpoint"),
    ],
    ids=["text", "html", "git-lfs", "empty", "folder", "truncated-zip", "binary"],
)
def test_files_that_are_not_checkpoints_say_what_they_look_like(tmp_path, make, looks_like):
    path = tmp_path / "finetunedDHE_pitts30k.torch"
    make(path)
    with pytest.raises(NotACheckpointError) as error:
        load_homography_regression(HomographyRegression(resize=(32, 32)), path)
    message = str(error.value)
    assert str(path) in message and looks_like in message
    assert "weights_only" not in message


def test_a_checkpoint_with_other_objects_is_refused_without_unsafe_advice(tmp_path):
    path = tmp_path / "pickled_model.torch"
    torch.save({"model": HomographyRegression(resize=(32, 32))}, path)
    with pytest.raises(NotACheckpointError) as error:
        load_state_dict_file(path)
    message = str(error.value)
    assert "objects other than tensors" in message and "HomographyRegression" in message
    assert "weights_only" not in message


def test_a_checkpoint_for_another_resize_is_refused_even_with_the_same_patch_count(tmp_path):
    # 192 x 128 and 128 x 192 both have 96 patches: every shape matches, only the recorded grid differs
    save_state_dict(FeaturesExtractor(resize=(192, 128), trunc_te=1), tmp_path / "fe.torch")
    save_state_dict(HomographyRegression(resize=(192, 128)), tmp_path / "hr.torch")
    with pytest.raises(CheckpointMismatchError, match=r"12 x 8 feature grid \(--resize 192 128\).*8 x 12"):
        load_features_extractor(FeaturesExtractor(resize=(128, 192), trunc_te=1), tmp_path / "fe.torch")
    with pytest.raises(CheckpointMismatchError, match="another --resize"):
        load_homography_regression(HomographyRegression(resize=(128, 192)), tmp_path / "hr.torch")
    load_homography_regression(HomographyRegression(resize=(192, 128)), tmp_path / "hr.torch")


def test_the_original_loads_our_checkpoints_strictly_and_the_grid_is_in_the_metadata(tmp_path):
    head = HomographyRegression(resize=(48, 32))
    save_state_dict(head, tmp_path / "hr.torch")
    saved = torch.load(tmp_path / "hr.torch", weights_only=False)  # as the original's torch.load
    assert set(saved) == set(head.state_dict())  # no extra key
    assert saved._metadata[""][GRID_METADATA_KEY] == (3, 2)
    HomographyRegression(resize=(48, 32)).load_state_dict(saved, strict=True)


def test_a_foreign_file_with_576_positions_is_taken_as_the_originals_24_x_24(tmp_path):
    # no recorded grid: 576 positions can only be the original's 24 x 24, not 12 x 48
    state_dict = dict(FeaturesExtractor(resize=(192, 768), trunc_te=1).state_dict())
    torch.save(state_dict, tmp_path / "foreign.torch")
    with pytest.raises(CheckpointMismatchError, match=r"24 x 24 feature grid \(--resize 384 384\)"):
        load_features_extractor(FeaturesExtractor(resize=(192, 768), trunc_te=1), tmp_path / "foreign.torch")


def test_a_checkpoint_with_nan_weights_is_refused(tmp_path):
    head = HomographyRegression(resize=(32, 32))
    with torch.no_grad():
        head.linear.bias[3] = float("nan")
    save_state_dict(head, tmp_path / "hr.torch")
    with pytest.raises(
        CheckpointMismatchError, match=r"non-finite values \(NaN or infinite\) in 1 tensors: linear.bias"
    ):
        load_homography_regression(HomographyRegression(resize=(32, 32)), tmp_path / "hr.torch")

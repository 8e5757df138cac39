"""evaluation.saved_descriptors: the database's descriptors saved, reloaded bit for bit, and refused when they were
made from other images, at another size, with another features extractor, or when their files are damaged."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from distributed import weights_digest
from evaluation import saved_descriptors
from evaluation.saved_descriptors import (
    DESCRIPTORS_JSON,
    DESCRIPTORS_NPY,
    DescriptorsProvenance,
    load_database_descriptors,
    provenance_of,
    save_database_descriptors,
)
from model import FeaturesExtractor

NAMES = ("a.jpg", "b.jpg", "c.jpg", "sub/d.jpg", "sub/e.jpg")
DIM = 8
DIGEST = "ab" * 32


def provenance(**changes: object) -> DescriptorsProvenance:
    """A provenance of `NAMES` at 32 x 32 with digest `DIGEST`, with `changes`."""
    values: dict = {
        "database_folder": "/data/pitts30k/images/test/database",
        "image_paths": NAMES,
        "resize": (32, 32),
        "checkpoint": "runs/best_model.torch",
        "weights_digest": DIGEST,
        "descriptors_dim": DIM,
        "model_flags": {"trunc_te": 8, "freeze_te": 5, "pretrained_cct": None},
    }
    values.update(changes)
    return DescriptorsProvenance(**values)


def descriptors(count: int = len(NAMES), dim: int = DIM) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((count, dim)).astype(np.float32)


def saved(folder: Path) -> np.ndarray:
    """Descriptors saved to `folder` with `provenance()`; returns them."""
    array = descriptors()
    save_database_descriptors(folder, array, provenance())
    return array


def our_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.mark.parametrize("form", ["folder", "npy"])
def test_save_then_load_round_trips_bit_identically(tmp_path, form):
    array = descriptors()
    npy_path, json_path = save_database_descriptors(tmp_path / "run", array, provenance())
    assert (npy_path.name, json_path.name) == (DESCRIPTORS_NPY, DESCRIPTORS_JSON)
    assert our_files(tmp_path / "run") == [DESCRIPTORS_JSON, DESCRIPTORS_NPY]  # no temporary left

    loaded = load_database_descriptors(tmp_path / "run" if form == "folder" else npy_path, provenance())
    assert loaded.dtype == np.float32 and loaded.flags.c_contiguous
    assert loaded.tobytes() == array.tobytes()

    record = json.loads(json_path.read_text())
    assert record["format"] == saved_descriptors.FORMAT_VERSION
    assert (record["count"], record["dim"], record["dtype"]) == (len(NAMES), DIM, "float32")
    assert record["image_paths"] == list(NAMES) and record["resize"] == [32, 32]
    assert record["checkpoint"] == "runs/best_model.torch" and record["weights_digest"] == DIGEST
    assert record["model_flags"] == {"trunc_te": 8, "freeze_te": 5, "pretrained_cct": None}
    assert record["created"].endswith("+00:00")


def test_provenance_of_lists_paths_relative_to_the_database_folder_so_a_moved_dataset_still_matches(tmp_path):
    torch.manual_seed(0)
    model = FeaturesExtractor(resize=(32, 32), trunc_te=1, freeze_te=-1)
    first, moved = tmp_path / "datasets" / "database", tmp_path / "elsewhere" / "database"
    made = provenance_of(
        [first / name for name in NAMES], first, [32, 32], tmp_path / "fe.torch", model, 1, {"freeze_te": -1}
    )
    assert made.image_paths == NAMES and made.database_folder == str(first)
    assert made.weights_digest == weights_digest(model) and made.descriptors_dim == model.features_dim
    assert made.model_flags == {"trunc_te": 1, "freeze_te": -1} and made.checkpoint == str(tmp_path / "fe.torch")
    array = descriptors(dim=model.features_dim)
    save_database_descriptors(tmp_path / "run", array, made)

    now = provenance_of([moved / name for name in NAMES], moved, (32, 32), None, model, 1)
    assert load_database_descriptors(tmp_path / "run", now).tobytes() == array.tobytes()

    with torch.no_grad():
        model.pool[1].p.add_(1.0)  # GeM's p: the weights changed, not a path or a flag
    changed = provenance_of([moved / name for name in NAMES], moved, (32, 32), None, model, 1)
    with pytest.raises(ValueError, match="made with another features extractor"):
        load_database_descriptors(tmp_path / "run", changed)


def test_provenance_of_refuses_an_image_outside_the_database_folder(tmp_path):
    model = FeaturesExtractor(resize=(32, 32), trunc_te=1, freeze_te=-1)
    folder = tmp_path / "database"
    with pytest.raises(ValueError, match=r"queries/q\.jpg is not inside the database folder"):
        provenance_of([folder / "a.jpg", tmp_path / "queries" / "q.jpg"], folder, (32, 32), None, model, 1)


@pytest.mark.parametrize(
    ("image_paths", "expected_message"),
    [
        (
            ("a.jpg", "b.jpg", "c.jpg", "sub/x.jpg", "sub/e.jpg"),
            "5 paths listed, this database has 5; first difference at #3: 'sub/d.jpg' vs 'sub/x.jpg'",
        ),
        (NAMES + ("sub/f.jpg",), "5 paths listed, this database has 6; first difference at #5: (none) vs 'sub/f.jpg'"),
        (NAMES[:4], "5 paths listed, this database has 4; first difference at #4: 'sub/e.jpg' vs (none)"),
        (NAMES[1:] + NAMES[:1], "first difference at #0: 'a.jpg' vs 'b.jpg'"),  # same images, another order
    ],
    ids=["another-image", "one-more", "one-fewer", "another-order"],
)
def test_descriptors_of_other_images_are_refused_naming_the_first_difference(tmp_path, image_paths, expected_message):
    saved(tmp_path)
    with pytest.raises(ValueError, match="made from other images") as error:
        load_database_descriptors(tmp_path, provenance(image_paths=image_paths))
    assert expected_message in str(error.value) and str(tmp_path / DESCRIPTORS_NPY) in str(error.value)
    assert "resize" not in str(error.value) and "features extractor" not in str(error.value)


def test_descriptors_made_at_another_size_are_refused(tmp_path):
    saved(tmp_path)
    with pytest.raises(ValueError, match="made at --resize 32 32, this run uses 48 64"):
        load_database_descriptors(tmp_path, provenance(resize=(48, 64)))


def test_descriptors_of_other_weights_are_refused_naming_both_checkpoints_and_digests(tmp_path):
    saved(tmp_path)
    other = provenance(checkpoint=None, weights_digest="cd" * 32)
    with pytest.raises(ValueError, match="made with another features extractor") as error:
        load_database_descriptors(tmp_path, other)
    message = str(error.value)
    assert "checkpoint runs/best_model.torch (weights sha256 abababababab" in message
    assert "no checkpoint (random or pretrained weights) (weights sha256 cdcdcdcdcdcd" in message


def test_the_same_weights_under_another_checkpoint_path_are_accepted(tmp_path):
    array = saved(tmp_path)
    moved = provenance(checkpoint="/elsewhere/copy_of_best_model.torch", model_flags={"trunc_te": 8, "freeze_te": 2})
    assert load_database_descriptors(tmp_path, moved).tobytes() == array.tobytes()


def test_descriptors_of_another_trunc_te_are_refused(tmp_path):
    saved(tmp_path)
    with pytest.raises(ValueError, match="made with --trunc_te 8, this run uses 6"):
        load_database_descriptors(tmp_path, provenance(model_flags={"trunc_te": 6}))


def test_every_difference_is_named_together(tmp_path):
    saved(tmp_path)
    expected = provenance(
        image_paths=NAMES[:3], resize=(64, 64), weights_digest="ef" * 32, model_flags={"trunc_te": 4}, descriptors_dim=6
    )
    with pytest.raises(ValueError) as error:
        load_database_descriptors(tmp_path, expected)
    message = str(error.value)
    for part in [
        "made from other images: 5 paths listed, this database has 3",
        "made at --resize 32 32, this run uses 64 64",
        "made with another features extractor",
        "made with --trunc_te 8, this run uses 4",
        "made of 8-d descriptors, this features extractor gives 6-d ones",
    ]:
        assert part in message


def test_a_missing_json_is_refused_naming_it(tmp_path):
    saved(tmp_path)
    (tmp_path / DESCRIPTORS_JSON).unlink()
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / DESCRIPTORS_JSON} does not exist"):
        load_database_descriptors(tmp_path / DESCRIPTORS_NPY, provenance())


@pytest.mark.parametrize("form", ["folder", "npy"])
def test_a_missing_npy_is_refused_naming_it(tmp_path, form):
    saved(tmp_path)
    (tmp_path / DESCRIPTORS_NPY).unlink()
    path = tmp_path if form == "folder" else tmp_path / DESCRIPTORS_NPY
    with pytest.raises(FileNotFoundError, match=DESCRIPTORS_NPY) as error:
        load_database_descriptors(path, provenance())
    assert str(path) in str(error.value)


def test_a_corrupt_npy_is_refused_naming_it(tmp_path):
    saved(tmp_path)
    (tmp_path / DESCRIPTORS_NPY).write_bytes(b"not a numpy file at all" * 10)
    with pytest.raises(ValueError, match="is not a readable .npy file") as error:
        load_database_descriptors(tmp_path, provenance())
    assert str(tmp_path / DESCRIPTORS_NPY) in str(error.value)


def test_a_corrupt_json_is_refused_naming_it(tmp_path):
    saved(tmp_path)
    json_path = tmp_path / DESCRIPTORS_JSON
    json_path.write_text(json_path.read_text()[:40])
    with pytest.raises(ValueError, match="is not valid JSON") as error:
        load_database_descriptors(tmp_path, provenance())
    assert str(json_path) in str(error.value)


def test_a_json_of_another_format_is_refused_naming_it(tmp_path):
    saved(tmp_path)
    json_path = tmp_path / DESCRIPTORS_JSON
    json_path.write_text(json.dumps({**json.loads(json_path.read_text()), "format": 99}))
    with pytest.raises(ValueError, match=f"{json_path} has format 99"):
        load_database_descriptors(tmp_path, provenance())


@pytest.mark.parametrize("damage", ["truncated", "other-shape", "other-dtype", "other-values"])
def test_an_npy_that_disagrees_with_its_json_is_refused_naming_it(tmp_path, damage):
    array = saved(tmp_path)
    npy_path = tmp_path / DESCRIPTORS_NPY
    if damage == "truncated":
        npy_path.write_bytes(npy_path.read_bytes()[: -DIM * 4 - 3])
    elif damage == "other-shape":
        np.save(npy_path, array[:3])
    elif damage == "other-dtype":
        np.save(npy_path, array.astype(np.float64))
    else:
        np.save(npy_path, array + 1)
    with pytest.raises(ValueError, match="truncated|replaced") as error:
        load_database_descriptors(tmp_path, provenance())
    assert str(npy_path) in str(error.value)


@pytest.mark.parametrize(
    ("array", "expected_message"),
    [
        (descriptors().astype(np.float64), "must be float32, got float64"),
        (descriptors(dim=DIM)[:, :, None], r"must be a \(N, D\) array"),
        (descriptors(count=4), r"are \(4, 8\); expected \(5, 8\)"),
        (descriptors(dim=6), r"are \(5, 6\); expected \(5, 8\)"),
        (
            np.where(np.arange(len(NAMES) * DIM).reshape(len(NAMES), DIM) == 17, np.inf, 1.0).astype(np.float32),
            r"non-finite values \(NaN or inf\) in 1 rows, first row 2 \(c\.jpg\)",
        ),
    ],
    ids=["float64", "3-d", "too-few-rows", "too-short-rows", "non-finite"],
)
def test_saving_bad_descriptors_is_refused_and_leaves_no_file(tmp_path, array, expected_message):
    with pytest.raises(ValueError, match=expected_message):
        save_database_descriptors(tmp_path / "run", array, provenance())
    assert our_files(tmp_path / "run") == []


def test_an_interrupted_save_leaves_no_partial_file_and_keeps_the_previous_pair(tmp_path, monkeypatch):
    def save_half_then_fail(file, array, allow_pickle=True):
        file.write(b"\x93NUMPY half of it")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "save", save_half_then_fail)
    with pytest.raises(KeyboardInterrupt):
        save_database_descriptors(tmp_path / "fresh", descriptors(), provenance())
    assert our_files(tmp_path / "fresh") == []
    monkeypatch.undo()

    previous = saved(tmp_path / "run")
    before = {name: (tmp_path / "run" / name).read_bytes() for name in our_files(tmp_path / "run")}
    monkeypatch.setattr(np, "save", save_half_then_fail)
    with pytest.raises(KeyboardInterrupt):
        save_database_descriptors(tmp_path / "run", descriptors() + 1, provenance())
    monkeypatch.undo()
    assert {name: (tmp_path / "run" / name).read_bytes() for name in our_files(tmp_path / "run")} == before
    assert load_database_descriptors(tmp_path / "run", provenance()).tobytes() == previous.tobytes()

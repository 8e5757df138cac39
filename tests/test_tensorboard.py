"""`--tensorboard` on the tiny synthetic world: event files whose scalars read back (tensorboard's EventAccumulator)
with the losses of debug.log and metrics.csv, a picture per validation, a resumed run that continues the step count,
and a one-line stop when the package is missing."""

from __future__ import annotations

import csv
import io
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import finetune
import train_dhe
import training.resume
from tools.synthetic.world import generate_world

SIZE = 64
COMMON = ["--resize", str(SIZE), str(SIZE), "--trunc_te", "1", "--num_workers", "0", "--device", "cpu"]
COMMON += ["--infer_batch_size", "8", "--recall_values", "1", "5", "--num_reranked_preds", "4"]
FINETUNE = [
    "--cache_refresh_rate",
    "4",
    "--queries_per_epoch",
    "4",
    "--train_batch_size",
    "2",
    "--neg_samples_num",
    "8",
]
FINETUNE += ["--rerank_val_from_epoch", "1"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tensorboard")
    generate_world(
        root,
        "tiny",
        image_size=(96, 96),
        database_per_split=(16, 8, 8),
        queries_per_split=(6, 4, 2),
        images_per_street=8,
    )
    return root


def data(world: Path) -> list[str]:
    return ["--datasets_folder", str(world), "--dataset_name", "tiny", *COMMON]


def events(folder: Path) -> EventAccumulator:
    assert list(folder.glob("events.out.tfevents.*"))
    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def scalars(accumulator: EventAccumulator, tag: str) -> dict[int, float]:
    return {event.step: event.value for event in accumulator.Scalars(tag)}


def debug_losses(folder: Path) -> dict[int, dict[str, float]]:
    """{iteration: {loss name: value}} from debug.log's per-iteration lines."""
    found = {}
    for match in re.finditer(r"iteration (\d+): (.*)", (folder / "debug.log").read_text()):
        found[int(match[1])] = {name: float(v) for name, v in re.findall(r"(\w+) (-?[\d.e+-]+)", match[2])}
    return found


def test_tensorboard_logs_losses_recalls_pictures_and_resumes(world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = finetune.cli([*data(world), *FINETUNE, "--epochs_num", "2", "--exp_name", "first", "--tensorboard"])
    folder = first["output_folder"]
    log = events(folder)
    logged = debug_losses(folder)
    iterations = sorted(logged)
    assert iterations == list(range(1, len(iterations) + 1))  # the global iteration counts from 1
    for name in ("loss", "triplet_loss", "rei_loss"):
        written = scalars(log, f"loss/{name}")
        assert sorted(written) == iterations
        np.testing.assert_allclose([written[i] for i in iterations], [logged[i][name] for i in iterations], rtol=1e-5)
    assert sorted(scalars(log, "lr")) == iterations
    rows = list(csv.DictReader(open(folder / "metrics.csv")))
    epoch_steps = sorted(scalars(log, "epoch/loss"))
    assert len(epoch_steps) == 2 and epoch_steps[-1] == iterations[-1]
    np.testing.assert_allclose(
        [scalars(log, "epoch/loss")[s] for s in epoch_steps], [float(r["loss"]) for r in rows], rtol=1e-6
    )
    assert [scalars(log, "val/R@5")[s] for s in epoch_steps] == pytest.approx([float(r["val_R@5"]) for r in rows])
    assert sorted(scalars(log, "val/reranked_R@1")) == epoch_steps[1:]  # re-ranked from epoch 1
    pictures = log.Images("val/prediction")
    assert [p.step for p in pictures] == epoch_steps
    with Image.open(io.BytesIO(pictures[0].encoded_image_string)) as picture:
        assert picture.size == (pictures[0].width, pictures[0].height) and min(picture.size) > 100

    checkpoint = training.resume.load_training_checkpoint(folder / training.resume.LAST_CHECKPOINT, "finetune")
    per_epoch = len(iterations) // 2
    assert checkpoint["iteration"] == iterations[-1] == checkpoint["epoch"] * per_epoch  # what a resumed run counts on
    continued = finetune.cli(
        [*data(world), *FINETUNE, "--epochs_num", "3", "--exp_name", "continued", "--tensorboard"]
        + ["--resume_train", str(folder / training.resume.LAST_CHECKPOINT)]
    )
    steps = sorted(scalars(events(continued["output_folder"]), "loss/loss"))
    assert steps == list(range(iterations[-1] + 1, iterations[-1] + per_epoch + 1))  # epoch 2 only, numbered on


def test_tensorboard_is_free_on_resume(world, tmp_path, monkeypatch):
    """An output only: a run without --tensorboard resumes with it, and a checkpoint older than the flag resumes."""
    monkeypatch.chdir(tmp_path)
    args = [*data(world), "--iterations_per_epoch", "1", "--batch_size", "4", "--qp_mode", "gt", "--n_epochs", "1"]
    first = train_dhe.cli([*args, "--exp_name", "plain"])
    checkpoint_path = first["output_folder"] / training.resume.LAST_CHECKPOINT
    checkpoint = training.resume.load_training_checkpoint(checkpoint_path, "train_dhe")
    assert checkpoint["args"]["tensorboard"] is False
    del checkpoint["args"]["tensorboard"]  # as written before the flag existed
    torch.save(checkpoint, tmp_path / "old.pth")
    resumed = train_dhe.cli(
        [*args[:-1], "2", "--exp_name", "resumed", "--resume_train", str(tmp_path / "old.pth"), "--tensorboard"]
    )
    assert sorted(scalars(events(resumed["output_folder"]), "loss/loss")) == [2]  # iteration 1 was the old run's


def test_missing_tensorboard_stops_at_start(world, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` raises ImportError
    with pytest.raises(SystemExit) as stopped:
        train_dhe.cli([*data(world), "--iterations_per_epoch", "1", "--batch_size", "4", "--tensorboard"])
    assert stopped.value.code == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert error == ["train_dhe.py: error: --tensorboard needs the tensorboard package: pip install tensorboard"]
    assert not (tmp_path / "logs").exists()  # nothing was made

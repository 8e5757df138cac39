"""`train_dhe.py` and `finetune.py` end to end on the tiny synthetic world: files, exact resume, torchrun, errors.

Every run is tiny (64 x 64 images, one CCT block, a few iterations) so that the module takes well under a minute
on 2 cores, torchrun included. Losses are compared only between runs of the same code on the same machine, which
perform the same operations in the same order: they must agree to 1e-6.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import finetune
import train_dhe
import training.dhe_init
import training.finetuning
import training.records
import training.resume
from model import FeaturesExtractor, HomographyRegression
from model.checkpoints import load_features_extractor, load_homography_regression
from tools.synthetic.world import generate_world

ROOT = Path(__file__).resolve().parent.parent
SIZE, TRUNC_TE = 64, 1
COMMON = ["--resize", str(SIZE), str(SIZE), "--trunc_te", str(TRUNC_TE), "--num_workers", "0", "--device", "cpu"]
COMMON += ["--infer_batch_size", "8", "--recall_values", "1", "5", "--num_reranked_preds", "4"]
DHE = ["--iterations_per_epoch", "2", "--batch_size", "4", "--qp_mode", "gt"]
FINETUNE = ["--cache_refresh_rate", "4", "--queries_per_epoch", "4", "--train_batch_size", "2"]
FINETUNE += ["--neg_samples_num", "8", "--horizontal_flip", "--random_resized_crop", "0.3"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """The tiny synthetic world (train 16/6, val 8/4, test 16/6 database/queries at 96 x 96)."""
    root = tmp_path_factory.mktemp("worlds")
    generate_world(
        root,
        "tiny",
        image_size=(96, 96),
        database_per_split=(16, 8, 16),
        queries_per_split=(6, 4, 6),
        images_per_street=8,
    )
    return root


def data(world: Path, name: str = "tiny") -> list[str]:
    return ["--datasets_folder", str(world), "--dataset_name", name, *COMMON]


def losses(folder: Path, columns: tuple[str, ...]) -> np.ndarray:
    with open(folder / "metrics.csv") as file:
        return np.array([[float(row[c]) for c in columns] for row in csv.DictReader(file)])


# ------------------------------------------------------------------------------------------------------- train_dhe
def test_train_dhe_end_to_end_and_exact_resume(world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    whole = train_dhe.cli([*data(world), *DHE, "--n_epochs", "4", "--exp_name", "whole"])
    folder = whole["output_folder"]
    names = {p.name for p in folder.iterdir()}
    expected = {"info.log", "debug.log", "metrics.csv", "last_checkpoint.pth", "results.json", "training_curves.png"}
    assert expected | {"homography_regression_003.torch"} == names  # saved at the last epoch (and at 9, 19, ...)
    rows = list(csv.DictReader(open(folder / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["0", "1", "2", "3"] and list(rows[0]) == ["epoch", "loss", "lr", "seconds"]
    assert all(float(r["loss"]) > 0 for r in rows)
    results = json.loads((folder / "results.json").read_text())
    assert set(results["baseline"]) == set(results["reranked"]) == {"R@1", "R@5"} and results["split"] == "test"
    info = (folder / "info.log").read_text()
    assert "epoch 0, iteration 2: loss" in info and "mean of the last 2" in info  # the period adapts to 2
    assert "Differs from the original on purpose: the frozen backbone runs under no_grad" in info
    assert "baseline test: R@1" in info and "test after re-ranking" in info
    load_homography_regression(HomographyRegression((SIZE, SIZE)), folder / "homography_regression_003.torch")
    curves = Image.open(folder / "training_curves.png")
    assert curves.size == (1000, 400)
    # train_dhe.py does not validate during training: its recall panel says so instead of "no data yet"
    training.records.plot_metrics(rows, tmp_path / "waiting.png")
    assert not np.array_equal(np.asarray(curves.convert("RGB")), np.asarray(Image.open(tmp_path / "waiting.png")))
    checkpoint = training.resume.load_training_checkpoint(folder / "last_checkpoint.pth", "train_dhe")
    assert (checkpoint["epoch"], checkpoint["iteration"]) == (4, 8)
    assert checkpoint["scheduler"]["last_epoch"] == 8  # StepLR stepped every iteration

    first = train_dhe.cli([*data(world), *DHE, "--n_epochs", "2", "--exp_name", "first"])
    resumed = train_dhe.cli(
        [*data(world), *DHE, "--n_epochs", "4", "--exp_name", "resumed"]
        + ["--resume_train", str(first["output_folder"] / "last_checkpoint.pth")]
    )
    np.testing.assert_allclose(
        losses(resumed["output_folder"], ("loss",)), losses(folder, ("loss",)), rtol=0, atol=1e-6
    )
    assert f"Resumed from {first['output_folder']}" in (resumed["output_folder"] / "info.log").read_text()
    assert resumed["results"]["reranked"] == results["reranked"]


def test_train_dhe_stops_on_a_non_finite_loss(world, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    calls = []

    def poisoned(local_q, local_c, H, **options):  # the third step (epoch 1) gets NaN
        calls.append(1)
        value = torch.nan if len(calls) == 3 else 1.0
        return (H[:, 0, 0] * 0 + value).float()

    monkeypatch.setattr(training.dhe_init, "rei_loss", poisoned)
    with pytest.raises(SystemExit) as error:
        train_dhe.cli([*data(world), *DHE, "--n_epochs", "3", "--exp_name", "nan"])
    assert error.value.code == 1
    message = capsys.readouterr().err
    assert "non-finite loss (loss nan) at iteration 2 (epoch 1, step 0 of the epoch)" in message
    assert "Traceback" not in message
    (folder,) = (tmp_path / "logs" / "nan").iterdir()
    checkpoint = training.resume.load_training_checkpoint(folder / "last_checkpoint.pth", "train_dhe")
    assert checkpoint["epoch"] == 1  # epoch 0 is kept, nothing of epoch 1 is written
    assert not list(folder.glob("homography_regression_*.torch"))
    for state in checkpoint["modules"]["homography_regression"].values():
        assert torch.isfinite(state).all()


# -------------------------------------------------------------------------------------------------------- finetune
def test_finetune_end_to_end_and_exact_resume(world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [*data(world), *FINETUNE, "--rerank_val_from_epoch", "3", "--mining", "full"]
    whole = finetune.cli([*args, "--epochs_num", "4", "--exp_name", "whole"])
    folder = whole["output_folder"]
    for epoch in range(4):
        load_features_extractor(
            FeaturesExtractor((SIZE, SIZE), TRUNC_TE), folder / f"features_extractor_00{epoch}.torch"
        )
        load_homography_regression(
            HomographyRegression((SIZE, SIZE)), folder / f"homography_regression_00{epoch}.torch"
        )
    load_features_extractor(FeaturesExtractor((SIZE, SIZE), TRUNC_TE), folder / "best_features_extractor.torch")
    load_homography_regression(HomographyRegression((SIZE, SIZE)), folder / "best_homography_regression.torch")
    rows = list(csv.DictReader(open(folder / "metrics.csv")))
    assert list(rows[0])[:6] == ["epoch", "loss", "triplet_loss", "rei_loss", "lr", "seconds"]
    assert rows[2]["val_R@5"] != "" and rows[2]["val_reranked_R@1"] == ""  # re-ranked from epoch 3 only
    assert rows[3]["val_reranked_R@1"] != ""
    for row in rows:  # loss = triplet + 100 * REI, to the rounding of the logged means
        assert float(row["loss"]) == pytest.approx(float(row["triplet_loss"]) + 100 * float(row["rei_loss"]), rel=1e-5)
    results = json.loads((folder / "results.json").read_text())
    assert results["split"] == "val" and results["epoch"] == 3 and set(results["reranked"]) == {"R@1", "R@5"}

    first = finetune.cli([*args, "--epochs_num", "2", "--exp_name", "first"])
    resumed = finetune.cli(
        [*args, "--epochs_num", "4", "--exp_name", "resumed"]
        + ["--resume_train", str(first["output_folder"] / "last_checkpoint.pth")]
    )
    columns = ("loss", "triplet_loss", "rei_loss")
    np.testing.assert_allclose(losses(resumed["output_folder"], columns), losses(folder, columns), rtol=0, atol=1e-6)


def test_finetune_patience_is_opt_in(world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [*data(world), *FINETUNE, "--epochs_num", "6", "--patience", "1", "--rerank_val_from_epoch", "9"]
    result = finetune.cli([*args, "--exp_name", "patience"])
    # the tiny val split saturates R@5 quickly: one epoch without a better R@5 stops the run
    assert len(result["metrics"]) < 6
    assert "Stopping early: val_R@5 did not improve for 1 epochs" in (result["output_folder"] / "info.log").read_text()
    assert result["results"]["reranked"] is None  # validation never re-ranked


@pytest.mark.parametrize("criterion", ["sare_ind", "sare_joint"])
def test_sare_criteria(criterion):
    descriptors = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])  # query, positive, 2 negatives
    triplets = torch.tensor([[0, 1, 2], [0, 1, 3]])
    loss = training.finetuning.metric_loss(criterion, descriptors, triplets, margin=0.1, negatives_num=2)
    # squared distances: positive 1, negatives 4 and 9
    if criterion == "sare_ind":
        expected = np.log(1 + np.exp(-3)) + np.log(1 + np.exp(-8))
    else:
        expected = np.log(1 + np.exp(-3) + np.exp(-8))
    assert float(loss) == pytest.approx(expected, rel=1e-6)


# ------------------------------------------------------------------------------------------------------- torchrun
@pytest.mark.parametrize(
    ("script", "extra"),
    [
        ("train_dhe.py", [*DHE, "--n_epochs", "1"]),
        ("finetune.py", [*FINETUNE, "--epochs_num", "1", "--criterion", "sare_joint"]),
    ],
)
def test_two_processes_with_gloo(world, tmp_path, script, extra):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [str(ROOT / script), *data(world), *extra, "--exp_name", "ddp"]
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    completed = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=240)
    assert completed.returncode == 0, completed.stderr[-3000:]
    (folder,) = (tmp_path / "logs" / "ddp").iterdir()  # one run folder for both processes
    assert "2 processes" in (folder / "info.log").read_text()
    assert json.loads((folder / "results.json").read_text())["baseline"]["R@1"] >= 0
    checkpoint = training.resume.load_training_checkpoint(folder / "last_checkpoint.pth", script.removesuffix(".py"))
    assert len(checkpoint["rng"]) == 2  # each process's random streams


def test_sigterm_leaves_a_resumable_checkpoint(world, tmp_path):
    # with a data-loader worker, which gets the signal too when a process group is signalled
    command = [sys.executable, str(ROOT / "train_dhe.py"), *data(world), *DHE, "--n_epochs", "1000"]
    command += ["--num_workers", "1"]
    command += ["--exp_name", "term"]
    environment = dict(os.environ, PYTHONPATH=str(ROOT))
    process = subprocess.Popen(
        command, cwd=tmp_path, env=environment, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob("logs/term/*/last_checkpoint.pth")) and time.monotonic() < deadline:
            time.sleep(0.2)
        os.killpg(process.pid, signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM and "interrupted by SIGTERM" in stderr
    (folder,) = (tmp_path / "logs" / "term").iterdir()
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]  # no temporary file left
    assert training.resume.load_training_checkpoint(folder / "last_checkpoint.pth", "train_dhe")["epoch"] >= 1


# ------------------------------------------------------------------------------------------------------ bad input
def far_queries_world(root: Path) -> Path:
    """A train split whose queries are all 5 km from every database image."""
    rng = np.random.default_rng(0)
    for folder, east in (("database", 500000.0), ("queries", 505000.0)):
        for index in range(4):
            path = root / "far" / "images" / "train" / folder / f"@{east + 3 * index:.2f}@4000000.00@33@T@.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(path)
    return root


def run_failing(cli, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as error:
        cli(argv)
    assert error.value.code == 1
    message = capsys.readouterr().err
    assert "Traceback" not in message
    return message


def test_bad_input_is_one_clear_line(world, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    dhe = [*data(world), *DHE, "--n_epochs", "1"]
    tune = [*data(world), *FINETUNE, "--epochs_num", "1"]
    missing = tmp_path / "missing.pth"
    assert f"--resume_train {missing}: the file does not exist" in run_failing(
        train_dhe.cli, [*dhe, "--resume_train", str(missing)], capsys
    )

    done = train_dhe.cli([*dhe, "--exp_name", "done", "--amp", "--optim", "sgd"])["output_folder"]
    assert "with mixed precision bfloat16" in (done / "info.log").read_text()
    done = done / "last_checkpoint.pth"
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(done.read_bytes()[: done.stat().st_size // 2])
    assert "cannot be read, truncated or not a torch checkpoint" in run_failing(
        train_dhe.cli, [*dhe, "--resume_train", str(truncated)], capsys
    )
    assert "was written by train_dhe.py; finetune.py can only continue its own runs" in run_failing(
        finetune.cli, [*tune, "--resume_train", str(done)], capsys
    )
    head = done.parent / "homography_regression_000.torch"
    assert "is not a last_checkpoint.pth of a training run" in run_failing(
        train_dhe.cli, [*dhe, "--resume_train", str(head)], capsys
    )
    assert "is a DHE head checkpoint" in run_failing(finetune.cli, [*tune, "--resume_fe", str(head)], capsys)
    assert "--negs_num_per_query 50 negatives are asked" in run_failing(
        finetune.cli, [*tune, "--negs_num_per_query", "50"], capsys
    )
    far = far_queries_world(tmp_path / "far_world")
    assert "has a database image within 10 m" in run_failing(
        finetune.cli, [*data(far, "far"), *FINETUNE, "--cache_refresh_rate", "2", "--queries_per_epoch", "2"], capsys
    )
    assert "no query-positive pair" in run_failing(train_dhe.cli, [*data(far, "far"), *DHE], capsys)
    # failed runs leave no run folder behind; only the successful one is there
    assert [p.name for p in (tmp_path / "logs").iterdir()] == ["done"]

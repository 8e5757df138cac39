"""`train_dhe.py` and `finetune.py` end to end on the tiny synthetic world: files, exact resume, torchrun, errors.

Every run is tiny (64 x 64 images, one CCT block, a few iterations) so that the module takes well under a minute
on 2 cores, torchrun included. Losses are compared only between runs of the same code on the same machine, which
perform the same operations in the same order: they must agree to 1e-6.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
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
import training.task
from model import FeaturesExtractor, HomographyRegression, checkpoints, files
from model.checkpoints import load_features_extractor, load_homography_regression

ROOT = Path(__file__).resolve().parent.parent
SIZE, TRUNC_TE = 64, 1
COMMON = ["--resize", str(SIZE), str(SIZE), "--trunc_te", str(TRUNC_TE), "--num_workers", "0", "--device", "cpu"]
COMMON += ["--infer_batch_size", "8", "--recall_values", "1", "5", "--num_reranked_preds", "4"]
DHE = ["--iterations_per_epoch", "2", "--batch_size", "4", "--qp_mode", "gt"]
FINETUNE_PLAIN = ["--cache_refresh_rate", "4", "--queries_per_epoch", "4", "--train_batch_size", "2"]
FINETUNE_PLAIN += ["--neg_samples_num", "8"]
FINETUNE = [*FINETUNE_PLAIN, "--horizontal_flip", "--random_resized_crop", "0.3"]


@pytest.fixture
def world(tiny_world: Path) -> Path:
    """The datasets folder of the session's tiny world (conftest.tiny_world)."""
    return tiny_world.parent


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
    log = (folder / "info.log").read_text()
    assert "2 processes" in log
    # validation / the final test share the work too: each process extracts the local features of its own pairs
    assert "local features candidates (2 processes each extract the local features of their own pairs)" in log
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


def run_failing(cli, argv: list[str], capsys, code: int = 1) -> str:
    with pytest.raises(SystemExit) as error:
        cli(argv)
    assert error.value.code == code
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


# ------------------------------------------------------ failures, resources, resuming, validation that measures nothing
def last_log_line(folder: Path) -> str:
    return (folder / "info.log").read_text().strip().splitlines()[-1]


def test_a_failure_between_the_weights_and_the_checkpoint_keeps_the_weights(world, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    save = training.resume.save_atomically

    def no_checkpoint(obj, path):
        if Path(path).name == training.resume.LAST_CHECKPOINT:
            raise OSError(5, "Input/output error")
        save(obj, path)

    monkeypatch.setattr(training.resume, "save_atomically", no_checkpoint)
    run_failing(train_dhe.cli, [*data(world), *DHE, "--n_epochs", "1", "--exp_name", "io"], capsys)
    (folder,) = (tmp_path / "logs" / "io").iterdir()
    assert (folder / "homography_regression_000.torch").is_file()
    assert "no last_checkpoint.pth: the run cannot be resumed" in last_log_line(folder)
    assert "Input/output error" in last_log_line(folder)


def test_an_interruption_during_validation_keeps_the_epochs_weights(world, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training.finetuning, "evaluate_split", interrupted)
    run_failing(
        finetune.cli,
        [*data(world), *FINETUNE_PLAIN, "--epochs_num", "1", "--exp_name", "ctrl_c"],
        capsys,
        130,
    )
    (folder,) = (tmp_path / "logs" / "ctrl_c").iterdir()
    assert {"features_extractor_000.torch", "homography_regression_000.torch"} <= {p.name for p in folder.iterdir()}
    assert "was interrupted (Ctrl-C)" in last_log_line(folder)


def test_a_full_disk_while_saving_the_checkpoint_is_one_line_and_keeps_the_last_one(
    world, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    save = files.torch.save
    calls = []

    def disk_fills_up(obj, path):
        if "last_checkpoint" in str(path):
            calls.append(path)
            if len(calls) == 2:  # the second epoch's checkpoint: half written, then the disk is full
                Path(path).write_bytes(b"x" * 1000)
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        save(obj, path)

    monkeypatch.setattr(files.torch, "save", disk_fills_up)
    monkeypatch.setattr(files.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 4096))
    message = run_failing(train_dhe.cli, [*data(world), *DHE, "--n_epochs", "2", "--exp_name", "full"], capsys)
    (folder,) = (tmp_path / "logs" / "full").iterdir()
    folder = folder.relative_to(tmp_path)
    checkpoint = folder / "last_checkpoint.pth"
    assert f"cannot write {checkpoint}: no space left on the device (4096 bytes free in {folder})" in message
    assert "bytes to write, 1000 written when it failed; free some space there" in message
    assert message.strip().splitlines()[-1].startswith(f"train_dhe.py: error: cannot write {checkpoint}")
    assert training.resume.load_training_checkpoint(checkpoint, "train_dhe")["epoch"] == 1  # the last complete one
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def save_features_extractor(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    checkpoints.save_state_dict(FeaturesExtractor((SIZE, SIZE), TRUNC_TE), path)
    return path


def test_train_dhe_resume_takes_the_runs_flags_applies_lr_and_refuses_contradictions(
    world, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    backbone = save_features_extractor(tmp_path / "backbone.torch", 1)
    first = [*data(world), *DHE, "--resume_fe", str(backbone), "--optim", "sgd", "--exp_name", "first"]
    checkpoint = train_dhe.cli([*first, "--n_epochs", "1"])["output_folder"] / "last_checkpoint.pth"
    resume = [*data(world), *DHE, "--resume_train", str(checkpoint), "--exp_name", "resumed"]

    # left out, --resume_fe and --optim are the run's (not a random backbone and Adam); --lr is applied
    resumed = train_dhe.cli([*resume, "--n_epochs", "2", "--lr", "0.001", "--num_workers", "1"])["output_folder"]
    info = (resumed / "info.log").read_text()
    assert "Resuming with a change: --num_workers 1 (the run had 0: WARNING: each data-loader worker" in info
    assert f"taken from the checkpoint, as the run used them: --optim sgd, --resume_fe {backbone}" in info
    assert "Resuming with a change: --lr 0.001 (the run had 0.0001" in info
    assert "random weights" not in info  # the head and the backbone are not random
    rows = list(csv.DictReader(open(resumed / "metrics.csv")))
    assert [float(row["lr"]) for row in rows] == [0.0001, 0.001]
    state = training.resume.load_training_checkpoint(resumed / "last_checkpoint.pth", "train_dhe")
    assert state["args"]["optim"] == "sgd" and "momentum" in state["optimizer"]["param_groups"][0]

    other = save_features_extractor(tmp_path / "other.torch", 2)
    message = run_failing(train_dhe.cli, [*resume, "--resume_fe", str(other), "--resize", "96", "96"], capsys)
    assert f"--resume_fe {other} contradicts the checkpoint's --resume_fe {backbone}" in message
    assert "--resize 96 96 contradicts the checkpoint's --resize 64 64" in message
    # the same file name with other weights
    save_features_extractor(backbone, 3)
    message = run_failing(train_dhe.cli, resume, capsys)
    assert f"the features extractor ({backbone}) is not the one the run was trained with" in message


def test_finetune_resume_refuses_another_criterion_and_carries_the_best_model(world, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    first = finetune.cli([*data(world), *FINETUNE_PLAIN, "--epochs_num", "1", "--exp_name", "first"])["output_folder"]
    resume = [
        *data(world),
        *FINETUNE_PLAIN,
        "--resume_train",
        str(first / "last_checkpoint.pth"),
        "--exp_name",
        "resumed",
    ]
    message = run_failing(finetune.cli, [*resume, "--criterion", "sare_ind", "--epochs_num", "2"], capsys)
    assert "--criterion sare_ind contradicts the checkpoint's --criterion triplet" in message

    resumed = finetune.cli([*resume, "--epochs_num", "1"])["output_folder"]  # nothing left to train
    for name in training.finetuning.BEST_FILES:
        assert (resumed / name).read_bytes() == (first / name).read_bytes()
    info = (resumed / "info.log").read_text()
    assert "The best model of the run so far (val_R@5 " in info and f"is copied from {first}" in info
    assert "random weights" not in info


def world_with_queries_moved_away(world: Path, root: Path, split: str, count: int) -> Path:
    """A copy of the tiny world whose first `count` queries of `split` are 5 km east of where they were."""
    shutil.copytree(world, root)
    queries = sorted((root / "tiny" / "images" / split / "queries").iterdir())
    for query in queries[:count]:
        fields = query.name.split("@")
        fields[1] = f"{float(fields[1]) + 5000:.2f}"
        query.rename(query.with_name("@".join(fields)))
    return root


def test_a_validation_split_without_positives_is_refused(world, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    far = world_with_queries_moved_away(world, tmp_path / "far", "val", 4)
    argv = [*data(far), *FINETUNE_PLAIN, "--epochs_num", "2", "--patience", "1", "--exp_name", "far"]
    message = run_failing(finetune.cli, argv, capsys)
    assert f"{far / 'tiny' / 'images' / 'val'}: none of its 4 queries has a database image within 25 m" in message
    assert "validation, which chooses the best model and stops early would measure nothing" in message
    assert not list(tmp_path.glob("logs/far/*"))  # refused before training: no run folder


def test_a_test_split_without_positives_is_refused_by_train_dhe(world, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    far = world_with_queries_moved_away(world, tmp_path / "far", "test", 6)
    message = run_failing(train_dhe.cli, [*data(far), *DHE, "--n_epochs", "1", "--exp_name", "far"], capsys)
    assert "none of its 6 queries has a database image within 25 m" in message and "final test" in message


def test_validation_queries_without_positives_are_logged(world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    partly = world_with_queries_moved_away(world, tmp_path / "partly", "val", 1)
    folder = finetune.cli([*data(partly), *FINETUNE_PLAIN, "--epochs_num", "1", "--exp_name", "partly"])[
        "output_folder"
    ]
    assert "1 of the 4 queries of" in (folder / "info.log").read_text()
    assert "recalls are at most 75.0%" in (folder / "info.log").read_text()


def test_a_resumed_run_that_fails_points_to_the_checkpoint_it_came_from(world, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = [*data(world), *FINETUNE_PLAIN, "--seed", "3"]
    first = finetune.cli([*argv, "--epochs_num", "1", "--exp_name", "first"])["output_folder"]
    checkpoint = first / "last_checkpoint.pth"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training.finetuning, "evaluate_split", interrupted)
    resume = [
        *data(world),
        *FINETUNE_PLAIN,
        "--epochs_num",
        "2",
        "--resume_train",
        str(checkpoint),
        "--exp_name",
        "again",
    ]
    run_failing(finetune.cli, resume, capsys, 130)  # --seed 3 is taken from the checkpoint
    (folder,) = (tmp_path / "logs" / "again").iterdir()  # kept: it holds the weights of epoch 1
    assert (folder / "features_extractor_001.torch").is_file()
    assert f"the last complete epoch is still {checkpoint}: continue with --resume_train {checkpoint}" in (
        last_log_line(folder)
    )
    assert "taken from the checkpoint, as the run used them: --seed 3" in (folder / "info.log").read_text()


def test_a_resumed_run_builds_its_models_with_the_runs_seed(world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # no --resume_fe: train_dhe's frozen backbone is the random one of --seed 3, which the resumed run must rebuild
    first = train_dhe.cli([*data(world), *DHE, "--n_epochs", "1", "--seed", "3", "--exp_name", "first"])
    checkpoint = first["output_folder"] / "last_checkpoint.pth"
    resumed = train_dhe.cli([*data(world), *DHE, "--resume_train", str(checkpoint), "--exp_name", "resumed"])
    assert resumed["results"]["baseline"] == first["results"]["baseline"]


def test_resuming_on_a_train_split_whose_images_changed_is_refused(world, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    copy = tmp_path / "world"
    shutil.copytree(world, copy)
    first = train_dhe.cli([*data(copy), *DHE, "--n_epochs", "1", "--exp_name", "first"])["output_folder"]
    database = sorted((copy / "tiny" / "images" / "train" / "database").iterdir())
    # one image less and one more: the same count, but the run's pairs (indexes in the sorted list) now point to
    # other images
    database[0].unlink()
    fields = database[-1].name.split("@")
    fields[1] = f"{float(fields[1]) + 1:.2f}"
    shutil.copyfile(database[-1], database[-1].with_name("@".join(fields)))
    resume = [*data(copy), *DHE, "--resume_train", str(first / "last_checkpoint.pth"), "--n_epochs", "2"]
    message = run_failing(train_dhe.cli, resume, capsys)
    assert f"the train split {copy / 'tiny' / 'images' / 'train'} is not the one the run trained on" in message
    assert "it now has 16 database images" in message


def test_a_checkpoint_older_than_rei_inliers_resumes_with_the_recount_it_was_trained_with():
    """Runs saved before --rei_inliers existed recounted the inliers (refined); resuming them keeps that count, and
    asking for the other one is refused."""
    args = {"rei_inliers": "minimal", "lr": 0.1}
    resolved = training.resume.resume_arguments(args, {"lr": 0.1}, given=set(), source="old.pth")
    assert resolved["rei_inliers"] == "refined"
    with pytest.raises(training.task.TrainingError, match="--rei_inliers minimal contradicts the checkpoint's"):
        training.resume.resume_arguments(args, {"lr": 0.1}, given={"rei_inliers"}, source="old.pth")
    resolved = training.resume.resume_arguments(args, {"lr": 0.1, "rei_inliers": "minimal"}, set(), "new.pth")
    assert resolved["rei_inliers"] == "minimal"


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

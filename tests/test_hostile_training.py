"""Hostile inputs to the training scripts (issue 14, round 3): resuming under other circumstances, failures that
must not delete trained weights, resources that run out while saving, validation that measures nothing."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import finetune
import train_dhe
import training.finetuning
import training.resume
import training.task
from model import FeaturesExtractor, checkpoints, files
from tools.synthetic.world import generate_world

ROOT = Path(__file__).resolve().parent.parent
SIZE, TRUNC_TE = 64, 1
COMMON = ["--resize", str(SIZE), str(SIZE), "--trunc_te", str(TRUNC_TE), "--num_workers", "0", "--device", "cpu"]
COMMON += ["--infer_batch_size", "8", "--recall_values", "1", "5", "--num_reranked_preds", "4"]
DHE = ["--iterations_per_epoch", "2", "--batch_size", "4", "--qp_mode", "gt"]
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


def run_failing(cli, argv: list[str], capsys, code: int = 1) -> str:
    with pytest.raises(SystemExit) as error:
        cli(argv)
    assert error.value.code == code
    message = capsys.readouterr().err
    assert "Traceback" not in message
    return message


def last_log_line(folder: Path) -> str:
    return (folder / "info.log").read_text().strip().splitlines()[-1]


# ----------------------------------------------------------------------------- 3. trained weights are never deleted
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
    run_failing(finetune.cli, [*data(world), *FINETUNE, "--epochs_num", "1", "--exp_name", "ctrl_c"], capsys, 130)
    (folder,) = (tmp_path / "logs" / "ctrl_c").iterdir()
    assert {"features_extractor_000.torch", "homography_regression_000.torch"} <= {p.name for p in folder.iterdir()}
    assert "was interrupted (Ctrl-C)" in last_log_line(folder)


# ------------------------------------------------------------------------ 4. resources run out during training
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


def test_the_file_size_limit_while_saving_is_one_line_and_keeps_the_previous_file(tmp_path):
    path = tmp_path / "homography_regression_000.torch"
    files.save_atomically({"small": torch.zeros(10)}, path)
    before = path.read_bytes()
    script = f"""
        import resource, torch
        from model.files import save_atomically
        resource.setrlimit(resource.RLIMIT_FSIZE, (100000, resource.RLIM_INFINITY))
        try:
            save_atomically({{"big": torch.zeros(100000)}}, {str(path)!r})
        except OSError as error:
            print(error)
    """
    environment = dict(os.environ, PYTHONPATH=str(ROOT))
    completed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], env=environment, capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr  # not killed by SIGXFSZ
    assert f"cannot write {path}: the file-size limit of this process is 100000 bytes (ulimit -f)" in completed.stdout
    assert "400000 bytes to write" in completed.stdout and "raise the limit" in completed.stdout
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_a_temporary_file_of_a_killed_writer_is_removed_by_the_next_write(tmp_path):
    path = tmp_path / "last_checkpoint.pth"
    script = f"""
        import os, signal
        from model.files import replaced_atomically
        with replaced_atomically({str(path)!r}) as temporary:
            temporary.write_bytes(b"half")
            os.kill(os.getpid(), signal.SIGKILL)
    """
    environment = dict(os.environ, PYTHONPATH=str(ROOT))
    completed = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=environment, timeout=120)
    assert completed.returncode == -signal.SIGKILL
    assert len([p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]) == 1  # what SIGKILL leaves
    files.save_atomically({"weights": torch.zeros(3)}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


# ---------------------------------------------------------------------- 2. resuming with other circumstances
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
    first = finetune.cli([*data(world), *FINETUNE, "--epochs_num", "1", "--exp_name", "first"])["output_folder"]
    resume = [*data(world), *FINETUNE, "--resume_train", str(first / "last_checkpoint.pth"), "--exp_name", "resumed"]
    message = run_failing(finetune.cli, [*resume, "--criterion", "sare_ind", "--epochs_num", "2"], capsys)
    assert "--criterion sare_ind contradicts the checkpoint's --criterion triplet" in message

    resumed = finetune.cli([*resume, "--epochs_num", "1"])["output_folder"]  # nothing left to train
    for name in training.finetuning.BEST_FILES:
        assert (resumed / name).read_bytes() == (first / name).read_bytes()
    info = (resumed / "info.log").read_text()
    assert "The best model of the run so far (val_R@5 " in info and f"is copied from {first}" in info
    assert "random weights" not in info


# --------------------------------------------------------------------------- 6. validation that measures nothing
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
    argv = [*data(far), *FINETUNE, "--epochs_num", "2", "--patience", "1", "--exp_name", "far"]
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
    folder = finetune.cli([*data(partly), *FINETUNE, "--epochs_num", "1", "--exp_name", "partly"])["output_folder"]
    assert "1 of the 4 queries of" in (folder / "info.log").read_text()
    assert "recalls are at most 75.0%" in (folder / "info.log").read_text()


def test_a_resumed_run_that_fails_points_to_the_checkpoint_it_came_from(world, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = [*data(world), *FINETUNE, "--seed", "3"]
    first = finetune.cli([*argv, "--epochs_num", "1", "--exp_name", "first"])["output_folder"]
    checkpoint = first / "last_checkpoint.pth"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training.finetuning, "evaluate_split", interrupted)
    resume = [*data(world), *FINETUNE, "--epochs_num", "2", "--resume_train", str(checkpoint), "--exp_name", "again"]
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


def test_a_write_that_torch_reports_without_a_reason_is_one_line_that_says_what_to_check(tmp_path, monkeypatch):
    path = tmp_path / "last_checkpoint.pth"

    def quota_exceeded(obj, temporary):  # a disk quota: plenty of free space, and torch says only this
        Path(temporary).write_bytes(b"x" * 100)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(files.torch, "save", quota_exceeded)
    with pytest.raises(OSError, match=r"cannot write .*last_checkpoint.pth: the write failed \(\[enforce fail"):
        files.save_atomically({"weights": torch.zeros(3)}, path)
    assert list(tmp_path.iterdir()) == []


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

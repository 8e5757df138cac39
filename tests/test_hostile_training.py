"""Hostile inputs to the training scripts (issue 14, round 3): resuming under other circumstances, failures that
must not delete trained weights, resources that run out while saving, validation that measures nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

import finetune
import train_dhe
import training
from synthetic import generate_world

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
    save = training.save_atomically

    def no_checkpoint(obj, path):
        if Path(path).name == training.LAST_CHECKPOINT:
            raise OSError(5, "Input/output error")
        save(obj, path)

    monkeypatch.setattr(training, "save_atomically", no_checkpoint)
    run_failing(train_dhe.cli, [*data(world), *DHE, "--n_epochs", "1", "--exp_name", "io"], capsys)
    (folder,) = (tmp_path / "logs" / "io").iterdir()
    assert (folder / "homography_regression_000.torch").is_file()
    assert "no last_checkpoint.pth: the run cannot be resumed" in last_log_line(folder)
    assert "Input/output error" in last_log_line(folder)


def test_an_interruption_during_validation_keeps_the_epochs_weights(world, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(finetune.evaluation, "test", interrupted)
    run_failing(finetune.cli, [*data(world), *FINETUNE, "--epochs_num", "1", "--exp_name", "ctrl_c"], capsys, 130)
    (folder,) = (tmp_path / "logs" / "ctrl_c").iterdir()
    assert {"features_extractor_000.torch", "homography_regression_000.torch"} <= {p.name for p in folder.iterdir()}
    assert "was interrupted (Ctrl-C)" in last_log_line(folder)

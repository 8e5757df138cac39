"""Flags: the original's defaults, the new ones, and clear errors for values out of range."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import BAD_EXP_NAMES

import parser


def test_eval_defaults_are_the_originals(monkeypatch):
    monkeypatch.delenv("DATASETS_FOLDER", raising=False)
    args = parser.parse_arguments("eval", ["--datasets_folder", "data"])
    assert args.resize == (384, 384)
    assert (args.trunc_te, args.freeze_te) == (8, 5)
    assert (args.num_reranked_preds, args.infer_batch_size) == (32, 32)
    assert args.recall_values == [1, 5, 10, 20]
    assert args.val_positive_dist_threshold == 25
    assert args.test_method == "hard_resize"
    assert args.device == "auto" and args.amp is False


def test_finetune_and_train_dhe_defaults():
    finetune = parser.parse_arguments("finetune", ["--datasets_folder", "data"])
    assert (finetune.lr, finetune.margin, finetune.train_batch_size) == (0.00001, 0.1, 4)
    assert (finetune.mining, finetune.cache_refresh_rate, finetune.queries_per_epoch) == ("partial", 1000, 5000)
    assert (finetune.negs_num_per_query, finetune.neg_samples_num, finetune.train_positives_dist_threshold) == (
        2,
        1000,
        10,
    )
    train_dhe = parser.parse_arguments("train_dhe", ["--datasets_folder", "data"])
    assert (train_dhe.lr, train_dhe.batch_size, train_dhe.qp_threshold) == (0.0001, 16, 0.14)
    assert (train_dhe.n_epochs, train_dhe.iterations_per_epoch) == (100, 2000)
    assert train_dhe.qp_mode == "predicted"
    assert not hasattr(train_dhe, "train_positives_dist_threshold")
    assert finetune.patience is None and finetune.rei_weight == 100 and finetune.criterion == "triplet"
    assert finetune.rerank_val_from_epoch == 35 and finetune.exp_name == "default"
    aliases = ["--datasets_folder", "d", "--positive_dist_threshold", "30", "--dataset_name", "msls"]
    assert parser.parse_arguments("train_dhe", aliases).val_positive_dist_threshold == 30
    finetune = parser.parse_arguments("finetune", ["--datasets_folder", "d", "--save_dir", "x", "--dataset_name", "y"])
    assert finetune.exp_name == "x" and finetune.rerank_val_from_epoch == 0
    msls = parser.parse_arguments("train_dhe", ["--datasets_folder", "data", "--dataset_name", "msls"])
    assert msls.qp_mode == "gt"


def test_datasets_folder_from_environment(monkeypatch):
    monkeypatch.setenv("DATASETS_FOLDER", "/somewhere")
    assert parser.parse_arguments("eval", []).datasets_folder == "/somewhere"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--resize", "100", "96"], "--resize 100 96: each side must be a positive multiple of 16"),
        (["--num_reranked_preds", "0"], "--num_reranked_preds 0: must be a positive integer"),
        (["--recall_values", "1", "-5"], "--recall_values [1, -5]"),
        (["--trunc_te", "20"], "argument --trunc_te: invalid choice"),
        (["--device", "tpu"], "argument --device: invalid choice"),
        (["--rerank_batch_size", "0"], "--rerank_batch_size 0: must be a positive integer"),
        (["--local_features_in_memory_mb", "-2"], "--local_features_in_memory_mb -2: must be >= 0 (MB), or -1"),
    ],
)
def test_bad_values_are_named(argv, message, capsys):
    with pytest.raises(SystemExit) as error:
        parser.parse_arguments("eval", ["--datasets_folder", "data", *argv])
    assert error.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_datasets_folder_is_explained(monkeypatch, capsys):
    monkeypatch.delenv("DATASETS_FOLDER", raising=False)
    with pytest.raises(SystemExit):
        parser.parse_arguments("eval", [])
    assert "pass --datasets_folder or export DATASETS_FOLDER" in capsys.readouterr().err


def test_l2_other_than_before_pool_is_refused(capsys):
    with pytest.raises(SystemExit):
        parser.parse_arguments("finetune", ["--datasets_folder", "d", "--l2", "after_pool"])
    assert "--l2 after_pool: only before_pool exists" in capsys.readouterr().err


def test_queries_per_epoch_must_be_a_multiple_of_cache_refresh_rate(capsys):
    with pytest.raises(SystemExit):
        parser.parse_arguments("finetune", ["--datasets_folder", "d", "--queries_per_epoch", "1500"])
    assert "--queries_per_epoch 1500 must be a multiple of --cache_refresh_rate 1000" in capsys.readouterr().err


@pytest.mark.parametrize("script", ["finetune", "train_dhe"])
def test_training_parsers_have_no_eval_outputs_and_older_checkpoints_still_resume(script):
    import training.resume

    args = parser.parse_arguments(script, ["--datasets_folder", "d"])
    eval_outputs = {"num_preds_to_save": 0, "save_only_wrong_preds": False, "no_labels": False}
    assert not set(eval_outputs) & set(vars(args))
    settings = parser.eval_settings(args)
    assert (settings.num_preds_to_save, settings.save_only_wrong_preds, settings.no_labels) == (0, False, False)
    # the arguments of a checkpoint written when the training parsers still carried eval.py's output flags
    recorded = {name: list(value) if isinstance(value, tuple) else value for name, value in vars(args).items()}
    resumed = training.resume.resume_arguments(vars(args), {**recorded, **eval_outputs}, set(), "last_checkpoint.pth")
    assert resumed == vars(args)


def test_settings_from_flags():
    args = parser.parse_arguments("eval", ["--datasets_folder", "d", "--resize", "48", "64", "--no_labels"])
    assert parser.model_config(args).resize == (48, 64) and parser.model_config(args).resume_train is None
    assert parser.eval_settings(args, outputs=True).no_labels and not parser.eval_settings(args).no_labels
    assert parser.eval_settings(args).recall_values == (1, 5, 10, 20)
    assert parser.dataset_options(args) == {"resize": (48, 64), "positive_dist_threshold": 25}
    finetune = parser.parse_arguments("finetune", ["--datasets_folder", "d", "--hue", "0.1", "--seed", "3"])
    assert parser.mining_settings(finetune).seed == 3 and parser.query_augmentation(finetune).hue == 0.1


@pytest.mark.parametrize(
    ("script", "argv", "message"),
    [
        ("eval", ["--seed", "-1"], "--seed -1: must be between 0 and 4294967295"),
        ("eval", ["--seed", str(2**32)], "--seed 4294967296: must be between 0 and 4294967295"),
        ("eval", ["--majority_weight", "nan"], "--majority_weight nan: must be a finite number"),
        ("eval", ["--majority_weight", "-0.5"], "--majority_weight -0.5: must be in [0, inf)"),
        ("eval", ["--hue", "0.7"], "--hue 0.7: must be in [0, 0.5]"),
        ("eval", ["--random_resized_crop", "1"], "--random_resized_crop 1.0: must be in [0, 1)"),
        ("eval", ["--val_positive_dist_threshold", str(10**20)], "must be at most 2147483647"),
        ("finetune", ["--lr", "inf"], "--lr inf: must be a finite number"),
        ("finetune", ["--lr", "0"], "--lr 0.0: must be in (0, inf)"),
        ("finetune", ["--margin", "-1"], "--margin -1.0: must be in [0, inf)"),
        ("finetune", ["--patience", "0"], "--patience 0: must be a positive integer"),
        ("train_dhe", ["--qp_threshold", "-0.1"], "--qp_threshold -0.1: must be in (0, inf)"),
        ("train_dhe", ["--qp_threshold", "nan"], "--qp_threshold nan: must be a finite number"),
        ("eval", ["--local_features_dir", "/nonexistent/scratch"], "/nonexistent/scratch: not an existing folder"),
    ],
)
def test_numeric_flags_are_range_checked(script, argv, message, capsys):
    with pytest.raises(SystemExit):
        parser.parse_arguments(script, ["--datasets_folder", "d", *argv])
    assert message in capsys.readouterr().err


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

"""Several processes (distributed.py), seeds near 2**32 and the REI loss's inlier counting in training.

The two-process tests start 2 gloo processes on the CPU with torch.multiprocessing and run `training.loop.run` in each,
on a tiny synthetic world of their own at 48 x 48 (resized to 32 x 32) with one CCT block, so that they take a few
seconds.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torchvision.transforms.v2 as T
from torch import nn

import commons
import distributed
import finetune
import parser as flags
import train_dhe
import training.loop
import training.resume
from model.matching import rei_loss
from tools.synthetic.world import generate_world
from training import dhe_init, finetuning

SIZE = 32
COMMON = ["--resize", str(SIZE), str(SIZE), "--trunc_te", "1", "--num_workers", "0", "--device", "cpu"]
COMMON += ["--infer_batch_size", "8", "--recall_values", "1", "--num_reranked_preds", "2"]
DHE = ["--iterations_per_epoch", "1", "--batch_size", "4", "--qp_mode", "gt", "--n_epochs", "1"]
FINETUNE = ["--cache_refresh_rate", "4", "--queries_per_epoch", "4", "--train_batch_size", "4", "--epochs_num", "1"]
FINETUNE += ["--neg_samples_num", "8", "--rerank_val_from_epoch", "1"]
SCRIPTS = {"train_dhe": (train_dhe.build_task, DHE), "finetune": (finetune.build_task, FINETUNE)}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("worlds")
    generate_world(
        root,
        "tiny",
        image_size=(48, 48),
        database_per_split=(16, 8, 16),
        queries_per_split=(6, 4, 6),
        images_per_street=8,
    )
    return root


def argv(world: Path, script: str, *extra: str) -> list[str]:
    return ["--datasets_folder", str(world), "--dataset_name", "tiny", *COMMON, *SCRIPTS[script][1], *extra]


class StopAfterBuilding(Exception):
    """Raised by `_digest_task` once the task is built: the test wants the weights, not the training."""


def _digest_task(script: str, digest_file: Path):
    """A `build_task` for `training.loop.run` that writes the digest of every model part of the built task, then
    stops."""

    def build(run_flags, device, output_folder, resume):
        task = SCRIPTS[script][0](run_flags, device, output_folder, resume)
        modules = [distributed.unwrap(m) for m in task.modules.values()]
        if script == "train_dhe":
            modules.append(task.features_extractor)  # frozen, not in task.modules
        digest_file.write_text(distributed.weights_digest(*modules))
        raise StopAfterBuilding

    return build


def _equalised_task(script: str):
    """A `build_task` whose random draws are the same in every process: whole images instead of random crops,
    dropout off, unit DLT weights (they change the DLT only by rounding)."""

    def build(run_flags, device, output_folder, resume):
        task = SCRIPTS[script][0](run_flags, device, output_folder, resume)
        if script == "train_dhe":
            task.pairs.crop = T.Resize(list(run_flags["resize"]), antialias=False)
        for module in task.modules.values():
            for layer in module.modules():
                if isinstance(layer, nn.Dropout):
                    layer.p = 0.0
        # no validation nor test pass: not what is tested
        task.end_epoch = lambda epoch, output_folder: {}
        task.finish = lambda output_folder: {"baseline": None, "reranked": None}
        return task

    return build


def _run_arguments(args) -> tuple:
    """`training.loop.run`'s first arguments for parsed flags, as the scripts' `main` gives them."""
    return flags.run_options(args), dict(vars(args))


def _unit_dlt_weights(batch_size: int, device: torch.device) -> torch.Tensor:
    return torch.ones(batch_size, 4, device=device)


def _process(rank: int, world_size: int, port: int, script: str, arguments: list[str], mode: str, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    os.chdir(out)
    dhe_init.dlt_weights = finetuning.dlt_weights = _unit_dlt_weights  # a process of its own: nothing else to restore
    args = flags.parse_arguments(script, arguments)
    if mode == "digest":
        try:
            training.loop.run(*_run_arguments(args), script, _digest_task(script, Path(out) / f"digest_{rank}.txt"))
        except StopAfterBuilding:
            pass
    else:
        training.loop.run(*_run_arguments(args), script, _equalised_task(script))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_processes(world_size: int, script: str, arguments: list[str], mode: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    # fork: the processes inherit the imported modules instead of importing them again (seconds, not a minute)
    mp.start_processes(
        _process,
        args=(world_size, _free_port(), script, arguments, mode, str(out)),
        nprocs=world_size,
        start_method="fork",
    )


def test_a_seed_at_the_top_of_the_range_trains_in_every_process(world, tmp_path):
    """Rank 1 of --seed 4294967295 seeded numpy with 2**32 (out of its range) and failed; it must train, with data
    loader workers, and with random streams of its own."""
    arguments = argv(world, "train_dhe", "--exp_name", "step", "--seed", "4294967295", "--num_workers", "1")
    run_processes(2, "train_dhe", arguments, "step", tmp_path)
    (run,) = (tmp_path / "logs" / "step").iterdir()
    checkpoint = training.resume.load_training_checkpoint(run / "last_checkpoint.pth", "train_dhe")
    numpy_keys = [states["numpy"][1] for states in checkpoint["rng"]]
    assert len(numpy_keys) == 2 and not torch.equal(*numpy_keys)  # distinct seeds per process


@pytest.mark.parametrize("script", ["train_dhe", "finetune"])
def test_b_every_process_holds_rank_0_weights(world, tmp_path, script):
    """Without --resume_fe / --resume_hr every part is random; the frozen backbone of train_dhe.py was each
    process's own (seeded --seed + rank, and not in DDP)."""
    run_processes(2, script, argv(world, script, "--exp_name", "digest"), "digest", tmp_path)
    digests = [(tmp_path / f"digest_{rank}.txt").read_text() for rank in range(2)]
    assert len(digests[0]) == 64 and digests[0] == digests[1]


def _trained_weights(folder: Path, script: str) -> dict[str, torch.Tensor]:
    (run,) = (folder / "logs" / "step").iterdir()
    checkpoint = training.resume.load_training_checkpoint(run / "last_checkpoint.pth", script)
    return {f"{part}.{k}": v for part, state in checkpoint["modules"].items() for k, v in state.items()}


@pytest.mark.parametrize("script", ["train_dhe", "finetune"])
def test_b_two_process_step_equals_one_process_step(world, tmp_path, monkeypatch, script):
    """One step of 2 processes on a global batch equals one step of one process on it, up to fp32 rounding, once
    the random draws (crops, dropout, DLT weights) are the same in every process."""
    # 64 x 64: a 4 x 4 grid of keypoints, enough mutual matches for an REI loss (at 32 x 32 most pairs have < 4)
    arguments = argv(world, script, "--exp_name", "step", "--optim", "sgd", "--lr", "0.1", "--resize", "64", "64")
    run_processes(2, script, arguments, "step", tmp_path / "two")
    (tmp_path / "one").mkdir()
    monkeypatch.chdir(tmp_path / "one")
    monkeypatch.setattr(dhe_init, "dlt_weights", _unit_dlt_weights)
    monkeypatch.setattr(finetuning, "dlt_weights", _unit_dlt_weights)
    try:  # one process: here
        training.loop.run(*_run_arguments(flags.parse_arguments(script, arguments)), script, _equalised_task(script))
    finally:
        commons.close_logging()
    two, one = _trained_weights(tmp_path / "two", script), _trained_weights(tmp_path / "one", script)
    assert two.keys() == one.keys()
    initial = _initial_weights(tmp_path, script, arguments)
    step = max((one[k] - initial[k]).abs().max().item() for k in one if one[k].is_floating_point())
    assert step > 1e-3, f"the step moved the weights by {step} at most: nothing was tested"
    # fp32 rounding: the two halves' gradients are summed in another order than the whole batch's
    for key in one:
        torch.testing.assert_close(
            two[key], one[key], rtol=1e-4, atol=1e-4 * step, msg=lambda m, key=key: f"{key} (step {step:.3g}): {m}"
        )


def _initial_weights(tmp_path: Path, script: str, arguments: list[str]) -> dict[str, torch.Tensor]:
    """The weights the one-process run started from (same seed, built the same way)."""
    args = flags.parse_arguments(script, arguments)
    commons.make_deterministic(commons.process_seed(args.seed, 0))
    features_extractor, head = commons.build_models(flags.model_config(args), torch.device("cpu"))
    parts = {"homography_regression": head}
    if script == "finetune":
        parts["features_extractor"] = features_extractor
    return {f"{part}.{k}": v for part, module in parts.items() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("script", ["train_dhe", "finetune"])
def test_c_rei_inliers_flag_reaches_the_loss_and_the_checkpoint(world, tmp_path, monkeypatch, script):
    assert flags.parse_arguments(script, argv(world, script)).rei_inliers == "minimal"
    module, library = (train_dhe, dhe_init) if script == "train_dhe" else (finetune, finetuning)
    asked = []

    def recording_rei_loss(*args, **kwargs):
        asked.append(kwargs.get("inliers"))
        return rei_loss(*args, **kwargs)

    monkeypatch.setattr(library, "rei_loss", recording_rei_loss)
    monkeypatch.chdir(tmp_path)
    result = module.cli(argv(world, script, "--exp_name", "flag", "--rei_inliers", "refined"))
    assert asked and set(asked) == {"refined"}
    checkpoint = training.resume.load_training_checkpoint(result["output_folder"] / "last_checkpoint.pth", script)
    assert checkpoint["args"]["rei_inliers"] == "refined"


@pytest.mark.parametrize("script", ["train_dhe", "finetune"])
def test_c_bad_rei_inliers_is_one_clear_line(world, script, capsys):
    with pytest.raises(SystemExit) as error:
        flags.parse_arguments(script, argv(world, script, "--rei_inliers", "opencv"))
    assert error.value.code == 2 and "--rei_inliers: invalid choice: 'opencv'" in capsys.readouterr().err

"""Several processes, seeds and RANSAC's inlier counting under hostile but valid inputs (issue 14, round 3).

The two-process tests start 2 gloo processes on the CPU with torch.multiprocessing and run `training.loop.run` in each,
on the tiny synthetic world at 32 x 32 with one CCT block, so that they take a few seconds.
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
from model.geometry import reprojection_distances
from model.matching import matched_keypoints, rei_loss
from model.ransac import RANSAC_THRESHOLD, find_homography_ransac
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


# ------------------------------------------------------------------------------------------- A: seeds near 2**32
def test_a_seed_at_the_top_of_the_range_trains_in_every_process(world, tmp_path):
    """Rank 1 of --seed 4294967295 seeded numpy with 2**32 (out of its range) and failed; it must train, with data
    loader workers, and with random streams of its own."""
    arguments = argv(world, "train_dhe", "--exp_name", "step", "--seed", "4294967295", "--num_workers", "1")
    run_processes(2, "train_dhe", arguments, "step", tmp_path)
    (run,) = (tmp_path / "logs" / "step").iterdir()
    checkpoint = training.resume.load_training_checkpoint(run / "last_checkpoint.pth", "train_dhe")
    numpy_keys = [states["numpy"][1] for states in checkpoint["rng"]]
    assert len(numpy_keys) == 2 and not torch.equal(*numpy_keys)  # distinct seeds per process


def test_process_seed_wraps_into_numpys_range():
    assert [commons.process_seed(2**32 - 2, rank) for rank in range(4)] == [2**32 - 2, 2**32 - 1, 0, 1]
    commons.make_deterministic(commons.process_seed(2**32 - 1, 3))  # numpy accepts it


# ------------------------------------------------------------------------------- B: several processes, one model
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


# ------------------------------------------------------------ C: the REI loss's k as the original (OpenCV 3.4) counted
def test_c_rei_counts_the_best_minimal_models_inliers_by_default(reference):
    """k is the inlier count of the best minimal model (OpenCV 3.4.x's mask, the original's), not the recount
    under the refitted model (OpenCV 4.11+), which stays available as inliers="refined"."""
    features = reference["local_features_fp16"].float()
    query, warped, H = features[:1], features[2:3], reference["H_base_to_img1_img2"][1:2]
    query_points, cand_points, valid = matched_keypoints(query, warped, None, torch.float32)
    src = query_points.expand_as(cand_points)
    minimal_H, minimal_inliers, _ = find_homography_ransac(src, cand_points, valid, refine=False)
    k = int(minimal_inliers.sum())
    errors = reprojection_distances(minimal_H, src, cand_points)
    assert int((valid & (errors**2 <= RANSAC_THRESHOLD**2)).sum()) == k  # the minimal model's own inliers
    _, refined_inliers, _ = find_homography_ransac(src, cand_points, valid, refine=True)
    assert int(refined_inliers.sum()) != k  # the two countings differ on this pair: the test can tell them apart
    distances = reprojection_distances(H, query_points, cand_points)[valid].sort().values
    for kind, count in (("minimal", k), ("refined", int(refined_inliers.sum()))):
        expected = distances[:count].mean().reshape(1)
        torch.testing.assert_close(rei_loss(query, warped, H, inliers=kind), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rei_loss(query, warped, H), rei_loss(query, warped, H, inliers="minimal"))
    with pytest.raises(ValueError, match="inliers 'opencv': expected one of minimal, refined"):
        rei_loss(query, warped, H, inliers="opencv")


def test_c_a_minimal_count_is_never_one_to_three(reference):
    """The reference's unrelated pair (8 random matches) has k = 1 after the refit in the reference; a best minimal
    model has 4 inliers or more (or none is found)."""
    features = reference["local_features_fp16"].float()
    query_points, cand_points, valid = matched_keypoints(features[:1], features[3:4], None, torch.float32)
    for seed in range(8):
        _, inliers, found = find_homography_ransac(
            query_points.expand_as(cand_points), cand_points, valid, refine=False, seed=seed
        )
        assert int(inliers.sum()) >= 4 if bool(found) else int(inliers.sum()) == 0


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

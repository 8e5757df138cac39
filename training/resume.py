"""`last_checkpoint.pth`: what `--resume_train` needs to continue a run exactly, how it is saved and read back, and
what a resumed run does with each flag (RESUME_CHANGEABLE, RESUME_LEGACY, RESUME_FREE)."""

from __future__ import annotations

import hashlib
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import distributed
from model.checkpoints import load_state_dict_file
from model.files import save_atomically
from training.task import Task, TrainingError

LAST_CHECKPOINT = "last_checkpoint.pth"
CHECKPOINT_FORMAT = 1


@dataclass
class Progress:
    """The loop's bookkeeping, saved in the checkpoint: epochs and iterations done, metrics.csv's rows, the best
    `Task.selection_key` so far and the epochs since it improved."""

    epoch: int = 0
    iteration: int = 0
    rows: list[dict] = field(default_factory=list)
    best: float | None = None
    not_improved: int = 0


def capture_rng_states() -> dict:
    """States of Python's, NumPy's global, torch's CPU and every CUDA device's generator (safe-loadable types)."""
    name, keys, position, has_gauss, cached = np.random.get_state()  # noqa: NPY002 - the original's global RNG
    return {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_states(states: dict) -> None:
    """Set the generators to `states` from `capture_rng_states`."""
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in states["python"]))
    name, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))  # noqa: NPY002
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"][: torch.cuda.device_count()])


def load_training_checkpoint(path: str | Path, script: str) -> dict:
    """Read a `last_checkpoint.pth` written by `script`; raise TrainingError saying what is wrong with it."""
    try:
        checkpoint = load_state_dict_file(path)
    except FileNotFoundError:
        raise TrainingError(f"--resume_train {path}: the file does not exist") from None
    except ValueError as error:
        raise TrainingError(
            f"--resume_train {path}: cannot be read, truncated or not a torch checkpoint ({error})"
        ) from None
    if "script" not in checkpoint or "format" not in checkpoint:
        raise TrainingError(
            f"--resume_train {path} is not a {LAST_CHECKPOINT} of a training run (it looks like a model state dict: "
            "load weights with --resume_fe / --resume_hr instead)"
        )
    if checkpoint["script"] != script:
        raise TrainingError(
            f"--resume_train {path} was written by {checkpoint['script']}.py; {script}.py can only continue its own "
            f"runs (to start from its weights, pass its state-dict files with --resume_fe / --resume_hr)"
        )
    if checkpoint["format"] != CHECKPOINT_FORMAT:
        raise TrainingError(f"--resume_train {path}: checkpoint format {checkpoint['format']}, expected 1")
    return checkpoint


# What `--resume_train` does with each flag. A resumed run continues the run it came from, so every flag that is not
# in one of these two tables must match the checkpoint's value: left out, it is taken from the checkpoint (logged);
# given with another value, the run is refused with the flag, the checkpoint's value and the new one.
RESUME_CHANGEABLE = {  # left out: the run's value; given: the new value is applied and logged (as a warning when
    # its reason starts with WARNING)
    "lr": "the optimizer's learning rate (and the scheduler's base) is set to it, keeping the decay so far",
    "n_epochs": "the run goes on to this many epochs",
    "epochs_num": "the run goes on to this many epochs",
    "patience": "early stopping counts the epochs without improvement of the run so far",
    "num_reranked_preds": "validation and test re-rank this many predictions",
    "num_workers": "WARNING: each data-loader worker draws its own random crops, so the batches differ from those "
    "of an uninterrupted run",
}
# Flags added since a checkpoint may have been written, with the value such a run used (its checkpoint lacks them)
RESUME_LEGACY = {"rei_inliers": "refined"}  # the REI loss recounted inliers (OpenCV 4.11+) before the flag existed
RESUME_FREE = {  # where and how this process runs, not what it trains: this run's value, never compared
    "resume_train",
    "exp_name",
    "device",
    "infer_batch_size",
    "rerank_batch_size",
    "local_features_dir",
    "local_features_in_memory_mb",
    "local_features",  # which images' local features are extracted when: the same scores either way
    "efficient_ram_testing",
    "compile_head",
    "save_predictions",
    "tensorboard",  # an output only: a resumed run may add or drop the event files
}


def split_digest(dataset: Any) -> str:
    """SHA-256 of a split's image list (a datasets_ws.BaseDataset's database then query paths, relative to its
    folder), which a resumed run compares with the run's: its pairs, triplets and caches index those images."""
    digest = hashlib.sha256()
    for path in [*dataset.database_paths, *dataset.queries_paths]:
        digest.update(os.path.relpath(path, dataset.dataset_folder).encode("utf-8", "surrogateescape") + b"\0")
    return digest.hexdigest()


def check_resumed_split(dataset: Any, digest: str, resume: dict | None) -> None:
    """Refuse to resume on a train split whose images are not those of the run (`digest` from `split_digest`)."""
    recorded = resume["task"].get("train_split_digest") if resume is not None else None
    if recorded is not None and recorded != digest:
        raise TrainingError(
            f"--resume_train: the train split {dataset.dataset_folder} is not the one the run trained on (its images "
            f"changed since; it now has {dataset.database_num} database images and {dataset.queries_num} queries), "
            "and the run's pairs and mining index its images: restore the split, or start a new run"
        )


def _as_checkpoint_value(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def resume_arguments(
    flags: dict[str, Any], checkpoint_args: dict[str, Any], given: set[str] | None, source: str
) -> dict[str, Any]:
    """The flags of a run resumed from a checkpoint whose flags were `checkpoint_args`, by RESUME_CHANGEABLE and
    RESUME_FREE (every other flag must match): `flags` (the command line's, {dest: value}) with the values taken from
    the checkpoint. `given`: the flags given on the command line (None: every flag whose value differs from the
    checkpoint's counts as given). Logs what is taken from the checkpoint and what changes.

    Raises:
        TrainingError: naming each given flag that contradicts the checkpoint, with both values.
    """
    resolved = dict(flags)
    checkpoint_args = {**{k: v for k, v in RESUME_LEGACY.items() if k in flags}, **checkpoint_args}
    taken, changed, refused = [], [], []
    for name, value in sorted(flags.items()):
        if name in RESUME_FREE or name not in checkpoint_args:
            continue
        old = checkpoint_args[name]
        if _as_checkpoint_value(value) == old:
            continue
        shown_old = " ".join(map(str, old)) if isinstance(old, list) else old
        shown_new = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
        if given is not None and name not in given:
            resolved[name] = tuple(old) if isinstance(value, tuple) else old
            taken.append(f"--{name} {shown_old}")
        elif name in RESUME_CHANGEABLE:
            changed.append(f"--{name} {shown_new} (the run had {shown_old}: {RESUME_CHANGEABLE[name]})")
        else:
            refused.append(f"--{name} {shown_new} contradicts the checkpoint's --{name} {shown_old}")
    if refused:
        raise TrainingError(
            f"--resume_train {source} continues a run, which needs the flags it was started with: "
            + "; ".join(refused)
            + " (leave these flags out to continue the run, or start a new run without --resume_train)"
        )
    if taken:
        logging.info("Resuming: taken from the checkpoint, as the run used them: " + ", ".join(taken))
    for line in changed:
        (logging.warning if "WARNING" in line else logging.info)(f"Resuming with a change: {line}")
    return resolved


def apply_learning_rate(task: Task, lr: float) -> None:
    """Set the optimizer's learning rate to `lr` after loading its state, keeping the scheduler's decay so far."""
    for group in task.optimizer.param_groups:
        decay = group["lr"] / group.get("initial_lr", group["lr"])
        group["initial_lr"], group["lr"] = lr, lr * decay
    if task.scheduler is not None:
        task.scheduler.base_lrs = [lr for _ in task.optimizer.param_groups]


def save_checkpoint(
    task: Task, progress: Progress, states: list[dict], flags: dict[str, Any], output_folder: Path
) -> None:
    """Rank 0: write `last_checkpoint.pth` atomically after an epoch; `states`: every process's random states
    (`capture_rng_states`), `flags`: the run's flags (tuples as lists)."""
    save_atomically(
        {
            "format": CHECKPOINT_FORMAT,
            "script": task.script,
            "epoch": progress.epoch,
            "iteration": progress.iteration,
            "modules": {name: distributed.unwrap(m).state_dict() for name, m in task.modules.items()},
            "optimizer": task.optimizer.state_dict(),
            "scheduler": task.scheduler.state_dict() if task.scheduler is not None else None,
            "scaler": task.scaler.state_dict(),
            "best": progress.best,
            "not_improved": progress.not_improved,
            "metrics": progress.rows,
            "rng": states,
            "task": task.state(),
            "args": flags,
            "output_folder": str(output_folder),
        },
        output_folder / LAST_CHECKPOINT,
    )


def restore_checkpoint(task: Task, resume: dict, lr: float, source: str | None) -> Progress:
    """Load `resume` (from `load_training_checkpoint`) into `task` and this process's random generators, applying
    the learning rate `lr` when it differs from the run's; returns the run's progress. `source`: the file's name."""
    for name, module in task.modules.items():
        distributed.unwrap(module).load_state_dict(resume["modules"][name])
    task.optimizer.load_state_dict(resume["optimizer"])
    if task.scheduler is not None:
        task.scheduler.load_state_dict(resume["scheduler"])
    if lr != resume["args"].get("lr", lr):
        apply_learning_rate(task, lr)
    task.scaler.load_state_dict(resume["scaler"])
    progress = Progress(
        resume["epoch"], resume["iteration"], list(resume["metrics"]), resume["best"], resume["not_improved"]
    )
    task.load_state(resume["task"])
    states = resume["rng"]
    if len(states) != distributed.get_world_size():
        logging.warning(
            f"The checkpoint comes from {len(states)} processes and this run has {distributed.get_world_size()}: the "
            "random streams of the processes differ from those of an uninterrupted run"
        )
    restore_rng_states(states[min(distributed.get_rank(), len(states) - 1)])
    logging.info(
        f"Resumed from {source} (run folder {resume.get('output_folder')}): {progress.epoch} epochs "
        f"and {progress.iteration} iterations done, continuing to epoch {task.settings.num_epochs}"
    )
    return progress

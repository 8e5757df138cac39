"""The training loop that `train_dhe.py` and `finetune.py` share, and what every training run leaves behind.

A script describes its job as a `Task` (models, optimizer, data, loss, what to do at the end of an epoch); `run`
makes the run folder and the logs, resumes, and calls `fit`, the one loop: steps under autocast when `--amp`,
losses averaged over processes, a stop on a non-finite loss, then per epoch the task's files and validation,
`metrics.csv`, the plot `training_curves.png` and `last_checkpoint.pth`; at the end `results.json`.

Files of a run folder `logs/<exp_name>/<YYYY-MM-DD_HH-MM-SS>/`:
    info.log, debug.log     the command, arguments, versions, counts and the periodic loss lines;
    metrics.csv             one row per epoch: epoch, the losses, lr, seconds, val_R@N and val_reranked_R@N;
    training_curves.png     the losses and recalls per epoch, redrawn each epoch;
    last_checkpoint.pth     everything `--resume_train` needs, rewritten atomically each epoch;
    results.json            recalls at the end (util.save_results);
and the task's state dicts (`homography_regression_{epoch:03d}.torch`, ...), saved atomically.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import math
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor, nn
from tqdm import tqdm

import commons
import distributed
import util
from model.checkpoints import CheckpointMismatchError, load_state_dict_file
from model.files import replaced_atomically, save_atomically
from model.precision import amp_autocast, amp_dtype

__all__ = [
    "TrainingError",
    "NonFiniteLossError",
    "Task",
    "amp_dtype",
    "autocast",
    "capture_rng_states",
    "restore_rng_states",
    "load_training_checkpoint",
    "check_split_measures",
    "split_digest",
    "check_resumed_split",
    "resume_arguments",
    "write_metrics",
    "plot_metrics",
    "fit",
    "run",
    "cli",
]

METRICS_CSV = "metrics.csv"
LAST_CHECKPOINT = "last_checkpoint.pth"
RESULTS_JSON = "results.json"
PLOT_PNG = "training_curves.png"
CHECKPOINT_FORMAT = 1


class TrainingError(Exception):
    """A problem with the user's input or run that the scripts report in one line, without a traceback."""


class NonFiniteLossError(TrainingError):
    """The loss became NaN or infinite: the run stops before the weights take that step."""


# ------------------------------------------------------------------------------------------------- mixed precision
# amp_dtype and autocast (= model.precision.amp_autocast) are the re-ranking's: one precision policy for all.
autocast = amp_autocast


def grad_scaler(device: torch.device, enabled: bool) -> torch.amp.GradScaler:
    """A GradScaler that scales only for float16 autocast (bfloat16 needs none); a pass-through otherwise."""
    return torch.amp.GradScaler(device.type, enabled=enabled and amp_dtype(device) == torch.float16)


# ----------------------------------------------------------------------------------------------------------- files
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


# ------------------------------------------------------------------------------------------------------- resuming
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
    "efficient_ram_testing",
    "compile_head",
    "save_predictions",
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
    args: argparse.Namespace, checkpoint_args: dict, given: set[str] | None, source: str
) -> argparse.Namespace:
    """The flags of a run resumed from a checkpoint whose flags were `checkpoint_args`, by RESUME_CHANGEABLE and
    RESUME_FREE (every other flag must match). `given`: the flags given on the command line (None: every flag whose
    value differs from the checkpoint's counts as given). Logs what is taken from the checkpoint and what changes.

    Raises:
        TrainingError: naming each given flag that contradicts the checkpoint, with both values.
    """
    resolved = argparse.Namespace(**vars(args))
    checkpoint_args = {**{k: v for k, v in RESUME_LEGACY.items() if k in vars(args)}, **checkpoint_args}
    taken, changed, refused = [], [], []
    for name, value in sorted(vars(args).items()):
        if name in RESUME_FREE or name not in checkpoint_args:
            continue
        old = checkpoint_args[name]
        if _as_checkpoint_value(value) == old:
            continue
        shown_old = " ".join(map(str, old)) if isinstance(old, list) else old
        shown_new = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
        if given is not None and name not in given:
            setattr(resolved, name, tuple(old) if isinstance(value, tuple) else old)
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


def _apply_learning_rate(task: Task, lr: float) -> None:
    """Set the optimizer's learning rate to `lr` after loading its state, keeping the scheduler's decay so far."""
    for group in task.optimizer.param_groups:
        decay = group["lr"] / group.get("initial_lr", group["lr"])
        group["initial_lr"], group["lr"] = lr, lr * decay
    if task.scheduler is not None:
        task.scheduler.base_lrs = [lr for _ in task.optimizer.param_groups]


def check_split_measures(dataset: Any, threshold: float, use: str) -> None:
    """Refuse a validation or test split (`dataset`, a datasets_ws.BaseDataset) none of whose queries has a positive
    within `threshold` metres: its recalls would be 0 whatever the model, so it could neither choose the best model,
    nor stop early, nor report anything. Some queries without a positive get a warning: they count as misses.
    `use` says what the split is for ("validation, which chooses the best model", ...)."""
    positives = dataset.get_positives()
    if positives is None:
        return
    without = sum(len(p) == 0 for p in positives)
    if without == len(positives):
        raise TrainingError(
            f"{dataset.dataset_folder}: none of its {len(positives)} queries has a database image within {threshold} m "
            f"(--val_positive_dist_threshold), so its recalls are 0 whatever the model and the {use} would measure "
            "nothing: fix the split or the threshold"
        )
    if without:
        logging.warning(
            f"WARNING: {without} of the {len(positives)} queries of {dataset.dataset_folder} have no database image "
            f"within {threshold} m: they count as misses in the {use}, whose recalls are at most "
            f"{100 * (len(positives) - without) / len(positives):.1f}%"
        )


def write_metrics(rows: Sequence[dict], path: str | Path) -> None:
    """`rows` (one dict per epoch) as CSV, atomically; columns in order of first appearance, empty where missing."""
    path = Path(path)
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    with replaced_atomically(path) as temporary, open(temporary, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns, restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.9g}" if isinstance(v, float) else v) for k, v in row.items()})


def read_metrics(path: str | Path) -> list[dict[str, str]]:
    """The rows of a metrics.csv as dicts of strings."""
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def _panel(
    draw: ImageDraw.ImageDraw,
    box: tuple[int, int, int, int],
    title: str,
    series: dict[str, list],
    epochs: list,
    empty: str = "no data yet",
) -> None:
    """One line chart inside `box` (left, top, right, bottom): axes, min/max labels, one polyline per series; the
    text `empty` where there is nothing to draw."""
    left, top, right, bottom = box
    draw.text((left, top - 16), title, fill="black")
    draw.rectangle(box, outline="black")
    values = [v for points in series.values() for v in points if v is not None and math.isfinite(v)]
    if not values or not epochs:
        draw.text((left + 8, top + 8), empty, fill="grey")
        return
    low, high = min(values), max(values)
    if high == low:
        low, high = low - 1, high + 1
    first, last = min(epochs), max(epochs)
    span = max(last - first, 1)

    def xy(epoch: float, value: float) -> tuple[float, float]:
        return (
            left + 6 + (epoch - first) / span * (right - left - 12),
            bottom - 6 - (value - low) / (high - low) * (bottom - top - 12),
        )

    draw.text((left - 58, top), f"{high:.4g}", fill="black")
    draw.text((left - 58, bottom - 12), f"{low:.4g}", fill="black")
    draw.text((left, bottom + 4), f"epoch {first}", fill="black")
    draw.text((right - 60, bottom + 4), f"epoch {last}", fill="black")
    for slot, (name, points) in enumerate(series.items()):
        colour = _COLOURS[slot % len(_COLOURS)]
        line = [xy(e, v) for e, v in zip(epochs, points) if v is not None and math.isfinite(v)]
        if len(line) > 1:
            draw.line(line, fill=colour, width=2)
        for x, y in line:
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
        legend_y = top + 6 + 14 * slot
        draw.line((right - 150, legend_y + 6, right - 135, legend_y + 6), fill=colour, width=2)
        draw.text((right - 130, legend_y), name, fill=colour)


def plot_metrics(rows: Sequence[dict], path: str | Path, validates: bool = True) -> None:
    """Draw the losses (left) and validation recalls (right) per epoch of `rows` to a PNG, atomically (Pillow).
    For a run that does not validate during training (`validates=False`: train_dhe.py) the recall panel says so."""
    path = Path(path)
    epochs = [int(row["epoch"]) for row in rows]

    def column(name: str) -> list:
        return [float(row[name]) if row.get(name) not in (None, "") else None for row in rows]

    names = list(dict.fromkeys(key for row in rows for key in row))
    losses = {name: column(name) for name in names if name.endswith("loss")}
    recalls = {name: column(name) for name in names if name.startswith("val_")}
    image = Image.new("RGB", (1000, 400), "white")
    draw = ImageDraw.Draw(image)
    _panel(draw, (70, 30, 480, 360), "training losses (epoch mean)", losses, epochs)
    empty = "no data yet" if validates else "no validation during training:\nthe test recalls are in results.json"
    _panel(draw, (570, 30, 980, 360), "validation recalls (%)", recalls, epochs, empty)
    with replaced_atomically(path) as temporary:
        image.save(temporary, format="PNG")


# ------------------------------------------------------------------------------------------------------------ task
class Task:
    """What a training script defines; `fit` drives it.

    Attributes set by subclasses:
        script: "train_dhe" or "finetune" (checked when resuming).
        modules: {name: module} saved in the checkpoint (may be DistributedDataParallel-wrapped).
        optimizer, scheduler (stepped every iteration; None for none), scaler (from `grad_scaler`).
        num_epochs, iterations_per_epoch, log_period (iterations between loss lines).
        loss_names: names of the values `losses` returns; the first, "loss", is the one minimised.
        selection_key: the metrics.csv column whose best value (higher is better) makes `save_best` run, or None.
        fixes: lines logged once at start-up, each a deliberate difference from the original.
    """

    script: str
    modules: dict[str, nn.Module]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    scaler: torch.amp.GradScaler
    num_epochs: int
    iterations_per_epoch: int
    log_period: int
    loss_names: tuple[str, ...] = ("loss",)
    selection_key: str | None = None
    patience: int | None = None
    fixes: tuple[str, ...] = ()

    def epoch_batches(self, epoch: int) -> Iterator[Any]:
        """This process's batches of `epoch` (its share of each global batch), on the device."""
        raise NotImplementedError

    def losses(self, batch: Any) -> dict[str, Tensor]:
        """Scalar losses of this process's batch, keyed by `loss_names` (runs under the autocast of `--amp`)."""
        raise NotImplementedError

    def end_epoch(self, epoch: int, output_folder: Path) -> dict[str, float]:
        """Rank 0 after each epoch: save the epoch's files, validate; returns metrics.csv columns (val_R@N ...)."""
        return {}

    def save_best(self, output_folder: Path) -> None:
        """Rank 0, when `selection_key` improved: save the best model's files."""

    def finish(self, output_folder: Path) -> dict:
        """Rank 0 after the last epoch: {"baseline": recalls, "reranked": recalls or None, **extra} for results.json."""
        return {"baseline": None, "reranked": None}

    def state(self) -> dict:
        """What else `--resume_train` needs (mining generator, pairs, ...): tensors, numbers, strings, lists."""
        return {}

    def load_state(self, state: dict) -> None:
        """Restore `state()`."""


def _check_parameters_finite(task: Task, epoch: int) -> None:
    for name, module in task.modules.items():
        for parameter_name, parameter in module.named_parameters():
            if not torch.isfinite(parameter).all():
                raise NonFiniteLossError(
                    f"{name}.{parameter_name} holds non-finite values after epoch {epoch}: stopping without "
                    "saving this epoch's weights"
                )


def fit(args: argparse.Namespace, task: Task, device: torch.device, output_folder: Path, resume: dict | None) -> dict:
    """Train `task` from its current state (or `resume`) up to `task.num_epochs`; returns what `run` returns."""
    world_size = distributed.get_world_size()
    is_main = distributed.is_main_process()
    start_epoch, iteration, rows, best, not_improved = 0, 0, [], None, 0
    if resume is not None:
        for name, module in task.modules.items():
            distributed.unwrap(module).load_state_dict(resume["modules"][name])
        task.optimizer.load_state_dict(resume["optimizer"])
        if task.scheduler is not None:
            task.scheduler.load_state_dict(resume["scheduler"])
        if args.lr != resume["args"].get("lr", args.lr):
            _apply_learning_rate(task, args.lr)
        task.scaler.load_state_dict(resume["scaler"])
        start_epoch, iteration, rows = resume["epoch"], resume["iteration"], list(resume["metrics"])
        best, not_improved = resume["best"], resume["not_improved"]
        task.load_state(resume["task"])
        states = resume["rng"]
        if len(states) != world_size:
            logging.warning(
                f"The checkpoint comes from {len(states)} processes and this run has {world_size}: the random "
                "streams of the processes differ from those of an uninterrupted run"
            )
        restore_rng_states(states[min(distributed.get_rank(), len(states) - 1)])
        logging.info(
            f"Resumed from {args.resume_train} (run folder {resume.get('output_folder')}): {start_epoch} epochs "
            f"and {iteration} iterations done, continuing to epoch {task.num_epochs}"
        )
        if is_main and rows:
            write_metrics(rows, output_folder / METRICS_CSV)
    if start_epoch >= task.num_epochs:
        logging.info(f"Nothing to train: the checkpoint has {start_epoch} epochs, {task.num_epochs} were asked for")

    for epoch in range(start_epoch, task.num_epochs):
        epoch_start = time.perf_counter()
        sums = torch.zeros(len(task.loss_names), dtype=torch.float64)
        window: list[float] = []
        steps = 0
        batches = tqdm(
            task.epoch_batches(epoch),
            desc=f"epoch {epoch}",
            total=task.iterations_per_epoch,
            ncols=100,
            leave=False,
            disable=not is_main,
        )
        for batch in batches:
            commons.raise_if_interrupted()
            with autocast(device, args.amp):
                losses = task.losses(batch)
            local = torch.stack([losses[name].detach().double() for name in task.loss_names])  # on the device (nccl)
            means = (distributed.all_reduce_sum(local) / world_size).cpu()
            if not torch.isfinite(means).all():
                raise NonFiniteLossError(
                    f"non-finite loss ({', '.join(f'{n} {v:.4g}' for n, v in zip(task.loss_names, means.tolist()))}) "
                    f"at iteration {iteration} (epoch {epoch}, step {steps} of the epoch): stopping before the "
                    "optimizer step; nothing of this epoch is saved"
                    + (f", the last good checkpoint is {output_folder / LAST_CHECKPOINT}" if epoch > 0 else "")
                )
            task.optimizer.zero_grad(set_to_none=True)
            task.scaler.scale(losses["loss"]).backward()
            task.scaler.step(task.optimizer)
            task.scaler.update()
            if task.scheduler is not None:
                task.scheduler.step()
            iteration += 1
            steps += 1
            sums += means
            window.append(float(means[0]))
            if len(window) == task.log_period:
                logging.info(
                    f"epoch {epoch}, iteration {iteration}: loss {window[-1]:.4f}, mean of the last "
                    f"{len(window)}: {sum(window) / len(window):.4f}"
                )
                window = []
            logging.debug(
                f"iteration {iteration}: " + ", ".join(f"{n} {v:.6f}" for n, v in zip(task.loss_names, means))
            )
        if steps == 0:
            raise TrainingError(f"epoch {epoch} had no batch: check the batch size against the data")
        _check_parameters_finite(task, epoch)
        epoch_losses = {name: float(value) for name, value in zip(task.loss_names, sums / steps)}
        lr = task.optimizer.param_groups[0]["lr"]
        metrics = task.end_epoch(epoch, output_folder) if is_main else {}
        selection = metrics.get(task.selection_key) if task.selection_key else None
        if selection is not None:
            if best is None or selection > best:
                best, not_improved = selection, 0
                task.save_best(output_folder)
                logging.info(f"New best {task.selection_key}: {selection:.2f} at epoch {epoch}")
            else:
                not_improved += 1
        row = {"epoch": epoch, **epoch_losses, "lr": lr, "seconds": time.perf_counter() - epoch_start, **metrics}
        rows.append(row)
        logging.info(
            f"Finished epoch {epoch:02d} in {row['seconds']:.1f} s: "
            + ", ".join(f"{k} {v:.4f}" for k, v in epoch_losses.items())
            + f", lr {lr:.3g}"
        )
        states = distributed.gather_objects(capture_rng_states())
        if is_main:
            write_metrics(rows, output_folder / METRICS_CSV)
            save_atomically(
                {
                    "format": CHECKPOINT_FORMAT,
                    "script": task.script,
                    "epoch": epoch + 1,
                    "iteration": iteration,
                    "modules": {name: distributed.unwrap(m).state_dict() for name, m in task.modules.items()},
                    "optimizer": task.optimizer.state_dict(),
                    "scheduler": task.scheduler.state_dict() if task.scheduler is not None else None,
                    "scaler": task.scaler.state_dict(),
                    "best": best,
                    "not_improved": not_improved,
                    "metrics": rows,
                    "rng": states,
                    "task": task.state(),
                    "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
                    "output_folder": str(output_folder),
                },
                output_folder / LAST_CHECKPOINT,
            )
            plot_metrics(rows, output_folder / PLOT_PNG, task.selection_key is not None)
        stop = task.patience is not None and not_improved >= task.patience
        if distributed.broadcast_object(stop):
            logging.info(f"Stopping early: {task.selection_key} did not improve for {task.patience} epochs")
            break

    result: dict = {"output_folder": output_folder, "metrics": rows}
    if is_main:
        results = task.finish(output_folder)
        util.save_results(
            output_folder / RESULTS_JSON,
            args.recall_values,
            results.pop("baseline"),
            results.pop("reranked"),
            **results,
        )
        result["results"] = json.loads((output_folder / RESULTS_JSON).read_text())
        if rows:
            plot_metrics(rows, output_folder / PLOT_PNG, task.selection_key is not None)
    distributed.barrier()
    return result


# ------------------------------------------------------------------------------------------------------------- run
def run(
    args: argparse.Namespace,
    script: str,
    build_task: Callable[[argparse.Namespace, torch.device, Path, dict | None], Task],
) -> dict:
    """Set up the processes, the run folder and the logs, resume if asked, build the task and `fit` it.

    A run that fails before it saved any weights leaves no run folder; a later failure or interruption keeps the
    folder and every weights file in it (`last_checkpoint.pth` is the last complete epoch), and the last line of
    its info.log says what happened.
    """
    device = distributed.init(args.device)
    try:
        commons.make_deterministic(commons.process_seed(args.seed, distributed.get_rank()))
        output_folder = commons.make_run_folder(args.exp_name) if distributed.is_main_process() else None
        output_folder = Path(distributed.broadcast_object(str(output_folder) if output_folder else None))
        try:
            if distributed.is_main_process():
                commons.setup_logging(output_folder)
                commons.log_run_header(args, output_folder)
            else:  # rank 0 speaks for every process; the others report errors only
                logging.getLogger().setLevel(logging.ERROR)
            world_size = distributed.get_world_size()
            logging.info(
                f"{script}.py on {device}, {world_size} process{'es' if world_size > 1 else ''}"
                + (" with mixed precision " + str(amp_dtype(device)).removeprefix("torch.") if args.amp else "")
            )
            resume = load_training_checkpoint(args.resume_train, script) if args.resume_train else None
            if resume is not None:
                seed = args.seed
                args = resume_arguments(args, resume.get("args", {}), _given_flags, args.resume_train)
                logging.debug(f"Arguments of the resumed run: {args}")
                if args.seed != seed:  # the run's --seed, taken from the checkpoint: what is built before fit
                    commons.make_deterministic(args.seed + distributed.get_rank())  # restores the generators
            task = build_task(args, device, output_folder, resume)
            for line in task.fixes:
                logging.info(f"Differs from the original on purpose: {line}")
            return fit(args, task, device, output_folder, resume)
        except BaseException as error:
            if distributed.is_main_process():
                _end_stopped_run(output_folder, error, args.resume_train)
            raise
    finally:
        distributed.shutdown()


def saved_weights(output_folder: Path) -> list[Path]:
    """The trained weights in a run folder: the task's state dicts (`*.torch`) and `last_checkpoint.pth`."""
    return sorted(p for p in output_folder.glob("*.torch") if p.is_file()) + [
        p for p in [output_folder / LAST_CHECKPOINT] if p.is_file()
    ]


def _end_stopped_run(output_folder: Path, error: BaseException, resumed_from: str | None) -> None:
    """Rank 0, when a run stops on an error or an interruption: the last line of info.log says what happened; the
    run folder is removed only when it holds no trained weights (a failure before the first epoch was saved).
    `resumed_from`: the --resume_train checkpoint, still the last complete epoch until this run writes its own."""
    if isinstance(error, KeyboardInterrupt):
        what = f"was interrupted ({getattr(error, 'signal_name', 'Ctrl-C')})"
    else:
        what = f"failed ({type(error).__name__}: {error})"
    weights = saved_weights(output_folder)
    checkpoint = output_folder / LAST_CHECKPOINT
    if checkpoint.is_file():
        logging.info(
            f"Stopped: the run {what}; the run folder {output_folder} keeps the last "
            f"complete epoch: continue with --resume_train {checkpoint}"
        )
    elif weights and resumed_from:
        logging.error(
            f"The run {what}; the run folder {output_folder} is kept with {', '.join(p.name for p in weights)}; the "
            f"last complete epoch is still {resumed_from}: continue with --resume_train {resumed_from}"
        )
    elif weights:
        logging.error(
            f"The run {what}; the run folder {output_folder} is kept with the weights saved so far "
            f"({', '.join(p.name for p in weights)}) but no {LAST_CHECKPOINT}: the run cannot be resumed, start a new "
            "one from these weights (--resume_fe / --resume_hr)"
        )
    else:
        logging.debug("Failed before any epoch was saved", exc_info=True)
    commons.close_logging()
    if not weights:
        commons.remove_run_folder(output_folder)


# The flags given on the command line of the run `cli` is running (for `resume_arguments`); None outside `cli`.
_given_flags: set[str] | None = None

EXPECTED_ERRORS = (TrainingError, CheckpointMismatchError, FileNotFoundError, ValueError, OSError)


def cli(script: str, main: Callable[[argparse.Namespace], dict], argv: Sequence[str] | None = None) -> dict:
    """Parse `argv`, run `main(args)`; bad input and non-finite losses end with a one-line error and exit code 1."""
    import parser as flags

    global _given_flags
    restore_signal_handlers = commons.install_signal_handlers()
    args = flags.parse_arguments(script, argv)
    _given_flags = flags.given_flags(script, argv)
    try:
        return main(args)
    except EXPECTED_ERRORS as error:
        print(f"{script}.py: error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt as error:
        # Ctrl-C, or SIGTERM / SIGHUP turned into commons.Interrupted; the exit code is the shell's 128 + signal
        signal_name = getattr(error, "signal_name", "SIGINT (Ctrl-C)")
        print(f"{script}.py: interrupted by {signal_name}", file=sys.stderr)
        raise SystemExit(128 + getattr(error, "signum", signal.SIGINT)) from None
    finally:
        _given_flags = None
        commons.close_logging()
        restore_signal_handlers()

"""What a training script defines for the loop: a `Task` (models, optimizer, data, losses, what to do at the end of
an epoch), the `TrainSettings` the loop reads, and the errors and checks the tasks share."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from model.precision import amp_dtype


class TrainingError(Exception):
    """A problem with the user's input or run that the scripts report in one line, without a traceback."""


class NonFiniteLossError(TrainingError):
    """The loss became NaN or infinite: the run stops before the weights take that step."""


@dataclass(frozen=True)
class TrainSettings:
    """The values the loop reads (a task builds them from its flags).

    Attributes:
        num_epochs: the run trains up to this many epochs.
        iterations_per_epoch: optimizer steps in an epoch (the progress bar's length).
        log_period: iterations between the loss lines of info.log.
        lr: the learning rate asked for (a resumed run applies it when it differs from the run's).
        amp: run the losses under mixed precision (`model.precision.amp_autocast`).
        recall_values: the N of the R@N written to results.json.
        patience: stop after this many epochs without a better `Task.selection_key`; None: never stop early.
        save_period: the task saves its weights every `save_period` epochs (and at the last).
    """

    num_epochs: int
    iterations_per_epoch: int
    log_period: int
    lr: float
    amp: bool
    recall_values: tuple[int, ...]
    patience: int | None = None
    save_period: int = 1


def grad_scaler(device: torch.device, enabled: bool) -> torch.amp.GradScaler:
    """A GradScaler that scales only for float16 autocast (bfloat16 needs none); a pass-through otherwise."""
    return torch.amp.GradScaler(device.type, enabled=enabled and amp_dtype(device) == torch.float16)


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


class Task:
    """What a training script defines; `training.loop.fit` drives it.

    Attributes set by subclasses:
        script: "train_dhe" or "finetune" (checked when resuming).
        settings: the loop's values (`TrainSettings`).
        modules: {name: module} saved in the checkpoint (may be DistributedDataParallel-wrapped).
        optimizer, scheduler (stepped every iteration; None for none), scaler (from `grad_scaler`).
        loss_names: names of the values `losses` returns; the first, "loss", is the one minimised.
        selection_key: the metrics.csv column whose best value (higher is better) makes `save_best` run, or None.
        fixes: lines logged once at start-up, each a deliberate difference from the original.
    """

    script: str
    settings: TrainSettings
    modules: dict[str, nn.Module]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    scaler: torch.amp.GradScaler
    loss_names: tuple[str, ...] = ("loss",)
    selection_key: str | None = None
    fixes: tuple[str, ...] = ()

    def epoch_batches(self, epoch: int) -> Iterator[Any]:
        """This process's batches of `epoch` (its share of each global batch), on the device."""
        raise NotImplementedError

    def losses(self, batch: Any) -> dict[str, Tensor]:
        """Scalar losses of this process's batch, keyed by `loss_names` (runs under the autocast of `amp`)."""
        raise NotImplementedError

    def end_epoch(self, epoch: int, output_folder: Path) -> dict[str, float]:
        """Every process after each epoch: save the epoch's files (rank 0), validate (every process shares the
        evaluation, `evaluation.pipeline.evaluate_split`); returns metrics.csv columns (val_R@N ...), the same in
        every process."""
        return {}

    def validation_picture(self) -> Image.Image | None:
        """Rank 0, after `end_epoch`: a picture of the epoch's validation for `--tensorboard`, or None (no
        validation)."""
        return None

    def save_best(self, output_folder: Path) -> None:
        """Rank 0, when `selection_key` improved: save the best model's files."""

    def finish(self, output_folder: Path) -> dict:
        """Every process after the last epoch (a final test shares its work): {"baseline": recalls, "reranked":
        recalls or None, **extra} for results.json, which rank 0 writes."""
        return {"baseline": None, "reranked": None}

    def state(self) -> dict:
        """What else `--resume_train` needs (mining generator, pairs, ...): tensors, numbers, strings, lists."""
        return {}

    def load_state(self, state: dict) -> None:
        """Restore `state()`."""

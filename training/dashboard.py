"""`--tensorboard`: TensorBoard event files (`events.out.tfevents.*`) in the run folder, written by rank 0.

What is logged, all against one step, the global iteration (`Progress.iteration`: optimizer steps since the run
began, restored by `--resume_train`, so a resumed run continues the numbering of the run it continues):
    loss/<name>      every iteration, each loss of the task (the mean over processes, as the loop checks it);
    lr               every iteration, the learning rate of that step;
    epoch/<name>     at the end of each epoch, metrics.csv's loss means;
    val/<R@N>        after each validation, its recalls (`val/R@1`, ..., `val/reranked_R@1`, ...);
    val/prediction   after each validation, the picture of its first query (`Task.validation_picture`).
Open the dashboard with `tensorboard --logdir logs/`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from training.task import TrainingError

INSTALL_HINT = "--tensorboard needs the tensorboard package: pip install tensorboard"


def require_tensorboard() -> None:
    """Raise TrainingError (`INSTALL_HINT`) when the tensorboard package cannot be imported."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise TrainingError(INSTALL_HINT) from None


class TensorBoardLog:
    """The run's event writer (`torch.utils.tensorboard.SummaryWriter`) with the loop's few kinds of records."""

    def __init__(self, output_folder: Path) -> None:
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(output_folder))

    def log_iteration(self, step: int, losses: dict[str, float], lr: float) -> None:
        """The losses {name: value} and the learning rate of global iteration `step`."""
        for name, value in losses.items():
            self.writer.add_scalar(f"loss/{name}", value, step)
        self.writer.add_scalar("lr", lr, step)

    def log_epoch(self, step: int, row: dict[str, Any], loss_names: tuple[str, ...]) -> None:
        """metrics.csv's `row` of the epoch that ended at global iteration `step`: its loss means and recalls."""
        for name in loss_names:
            self.writer.add_scalar(f"epoch/{name}", row[name], step)
        for name, value in row.items():
            if name.startswith("val_"):
                self.writer.add_scalar(f"val/{name.removeprefix('val_')}", value, step)

    def log_picture(self, step: int, picture: Image.Image) -> None:
        """A validation's prediction/match picture (RGB) at global iteration `step`."""
        self.writer.add_image("val/prediction", np.asarray(picture.convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        """Write what is buffered and close the event file."""
        self.writer.close()

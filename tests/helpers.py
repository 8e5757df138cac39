"""Helpers that several test files share."""

from __future__ import annotations

from pathlib import Path

import torch

from model import HomographyRegression
from model.checkpoints import save_state_dict


def save_identity_head(path: Path, size: int) -> None:
    """Save a DHE head for `size` x `size` images that always predicts the identity homography (its four corner
    points map to themselves: a zero linear weight and the patch-centre corners as bias)."""
    head = HomographyRegression(resize=(size, size))
    state_dict = head.state_dict()
    state_dict["linear.weight"].zero_()
    corners = [8, 8, size - 8, 8, 8, size - 8, size - 8, size - 8]
    state_dict["linear.bias"].copy_(torch.tensor(corners + corners, dtype=torch.float32))
    head.load_state_dict(state_dict)
    save_state_dict(head, path)


def eval_argv(
    dataset: Path,
    *extra: str,
    resize: int = 64,
    trunc_te: int = 1,
    checkpoints: Path | None = None,
    device: str = "cpu",
) -> list[str]:
    """The flags of a small eval.py run of `dataset` (<datasets_folder>/<dataset_name>) on CPU-sized inputs:
    `resize` x `resize` images, `trunc_te` CCT blocks, R@1 and R@5, no loader processes, the checkpoints `fe.torch`
    and `hr.torch` of the folder `checkpoints` when given, then `extra`."""
    argv = ["--datasets_folder", str(dataset.parent), "--dataset_name", dataset.name]
    argv += ["--resize", str(resize), str(resize), "--trunc_te", str(trunc_te), "--recall_values", "1", "5"]
    argv += ["--device", str(device), "--num_workers", "0"]
    if checkpoints is not None:
        argv += ["--resume_fe", str(checkpoints / "fe.torch"), "--resume_hr", str(checkpoints / "hr.torch")]
    return [*argv, *extra]

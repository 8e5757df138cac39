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

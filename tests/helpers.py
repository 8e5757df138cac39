"""Helpers that several test files share."""

from __future__ import annotations

from pathlib import Path

import kornia
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


# --- model: homographies and seeded generators (tests of model.geometry, matching, ransac and rerank) ---------------


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def translation(dx: float, dy: float) -> torch.Tensor:
    """(3, 3) homography of a translation by (dx, dy) pixels."""
    return torch.tensor([[1.0, 0.0, dx], [0.0, 1.0, dy], [0.0, 0.0, 1.0]])


def apply_homography(H: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """(B, 3, 3) homographies applied to (B, N, 2) points -> (B, N, 2)."""
    return kornia.geometry.transform_points(H, points)

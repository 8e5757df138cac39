"""Helpers that several test files share."""

from __future__ import annotations

from pathlib import Path

import kornia
import torch
import torch.nn.functional as F

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


# --- model: homographies, seeded generators and textures (tests of model.geometry, matching, ransac, rerank, util)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def translation(dx: float, dy: float) -> torch.Tensor:
    """(3, 3) homography of a translation by (dx, dy) pixels."""
    return torch.tensor([[1.0, 0.0, dx], [0.0, 1.0, dy], [0.0, 0.0, 1.0]])


def apply_homography(H: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """(B, 3, 3) homographies applied to (B, N, 2) points -> (B, N, 2)."""
    return kornia.geometry.transform_points(H, points)


def smooth_texture(size: int, generator: torch.Generator) -> torch.Tensor:
    """(1, 3, size, size) sum of bicubically upsampled noise at several scales."""
    octaves = [(6, 1.0), (12, 0.7), (24, 0.5), (48, 0.3)]
    return sum(
        amplitude * F.interpolate(torch.rand(1, 3, res, res, generator=generator), size=(size, size), mode="bicubic")
        for res, amplitude in octaves
    )


def patch_descriptors(images: torch.Tensor, patch_size: int = 16) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 48, H/16, W/16): each 16x16 patch as 4x4 average colours, centred and L2-normalised."""
    cells = F.avg_pool2d(images, patch_size // 4)
    b, c, h, w = cells.shape
    cells = cells.view(b, c, h // 4, 4, w // 4, 4).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 16, h // 4, w // 4)
    return F.normalize(cells - cells.mean(dim=1, keepdim=True), dim=1)


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

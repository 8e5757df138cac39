"""Helpers that several test files share."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import kornia
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

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


# --- processes: runs stopped from outside, leftovers of killed runs


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until `process` has written `path`; fail if it ends first or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the run never got going"
        time.sleep(0.05)


def dead_pid() -> int:
    """The id of a process that has exited."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    return dead.pid


# --- run folders and the dataset tools (make_vg_dataset.py, synthetic.py, demo.py's world)

BAD_EXP_NAMES = ["../escape", "/tmp/absolute", "a/b", "", ".", "..", "a\nb", "a\x00b", "x" * 201]
MARKER = ".dataset_tool.json"  # the marker of the datasets the tools write (tool_outputs.MARKER)
MICRO = {  # the smallest world: one street per split, for the tests of the writing behaviour
    "image_size": (48, 64),
    "database_per_split": (2, 2, 2),
    "queries_per_split": (1, 1, 1),
    "images_per_street": 2,
    "database_spacing": 5.0,
}

# made-up photos on a street of Venice, in degrees (1e-4 degrees of latitude is about 11 m)
LAT, LON = 45.4371, 12.3326


def small_photos(folder: Path, names: list[str]) -> Path:
    """Random 20 x 16 photos `names` in `folder` (created); returns `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in names:
        Image.fromarray(rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)).save(folder / name)
    return folder


def photo_csv(path: Path, rows: str = "") -> Path:
    """A make_vg_dataset.py CSV at `path` of a.jpg (database) and q.jpg (query, 2 m north), then `rows`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"path,role,lat,lon\na.jpg,database,{LAT},{LON}\nq.jpg,queries,{LAT + 0.00002},{LON}\n{rows}")
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below `folder`: relative path -> bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def user_folder(tmp_path: Path) -> Path:
    """A folder of the user's (no tool marker) in `tmp_path`."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    return folder


def a_file(tmp_path: Path) -> Path:
    """A plain file in `tmp_path`."""
    (tmp_path / "a_file").write_text("keep me")
    return tmp_path / "a_file"

"""Loading and saving checkpoints in the original DHE-VPR formats, with strict key matching.

Formats understood:
    (a) a visual-geo-localization-benchmark backbone checkpoint (CCT14_msls.pth, CCT14_pitts30k.pth): a dict whose
        "model_state_dict" has keys `module.backbone.*` and `module.aggregation.*` (mapped to `encoder.*`, `pool.*`);
    (b) a features-extractor state dict (finetunedCCT14_*.torch): keys `encoder.*` and `pool.*`;
    (c) a DHE head state dict (initializedDHE.torch, finetunedDHE_*.torch): keys `pe`, `encoder.*`, `encoder2.*`,
        `linear.*`.
Any of them may carry a DataParallel/DistributedDataParallel `module.` prefix. What this project saves is (b) and (c),
so the original code loads it too.

The feature grid a checkpoint was made for, (H/16, W/16), is recorded in what we save, where the original's
strict loading ignores it: in the state dict's `_metadata` (which `torch.save` keeps and `load_state_dict` only
reads versions from), as `_metadata[""]["dhe_vpr_grid"] = (h, w)`. Files without it (the original's, the benchmark's)
are taken as 24 x 24 when their positional embedding has 576 positions, since the original only ran at 384 x 384.
A checkpoint whose grid differs from the model's is refused, even when the number of positions is the same.
"""

from __future__ import annotations

import math
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from model.files import save_atomically

__all__ = [
    "CheckpointMismatchError",
    "NotACheckpointError",
    "GRID_METADATA_KEY",
    "checkpoint_grid",
    "load_state_dict_file",
    "strict_load",
    "features_extractor_state_dict",
    "homography_regression_state_dict",
    "load_features_extractor",
    "load_homography_regression",
    "save_state_dict",
]

_MAX_KEYS_SHOWN = 12
_POSITIONAL_KEYS = ("pe", "encoder.classifier.positional_emb")
GRID_METADATA_KEY = "dhe_vpr_grid"
# The original (and the benchmark's CCT) only ran at 384 x 384: a foreign file with 576 positions is 24 x 24.
_ORIGINAL_GRID = (24, 24)


class CheckpointMismatchError(ValueError):
    """A checkpoint whose keys or shapes do not fit the model."""


class NotACheckpointError(ValueError):
    """A file that is not a checkpoint we can read safely (text, a web page, a Git LFS pointer, damaged...)."""


def _numpy_safe_globals() -> list:
    """Globals that benchmark checkpoints pickle next to tensors (numpy recall arrays and scalars), under numpy 2's
    module names and numpy 1.x's (`numpy.core.multiarray`), which numpy 2 still resolves."""
    multiarray = np._core.multiarray
    names: list = [np.ndarray, np.dtype, multiarray._reconstruct, multiarray.scalar]
    names += [getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType")]
    names += [
        (multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
        (multiarray.scalar, "numpy.core.multiarray.scalar"),
    ]
    return names


def _describe_file(path: Path) -> str | None:
    """What `path` looks like when it is plainly not a torch checkpoint, else None."""
    size = path.stat().st_size
    if size == 0:
        return "is empty (0 bytes): an interrupted download or copy?"
    with open(path, "rb") as file:
        head = file.read(1024)
    text = head.lstrip().lower()
    if head.startswith(b"version https://git-lfs"):
        return (
            f"is a Git LFS pointer ({size} bytes), not the weights: fetch them with `git lfs pull` in the repository "
            "they came from"
        )
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<?xml")) or b"<html" in text[:256]:
        return (
            f"is an HTML page ({size} bytes), not a checkpoint: the download saved a web page (a login, a redirect, "
            "a quota or virus-scan warning) instead of the file; download it again from the page it points to"
        )
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError, EOFError):
            return f"is a damaged or truncated zip archive ({size} bytes): download or copy it again"
        if not any(name.endswith("data.pkl") for name in names):
            return f"is a zip archive of other files ({', '.join(names[:5])}), not a torch checkpoint: unpack it"
        return None
    if head.startswith(b"\x80") and len(head) > 1 and 2 <= head[1] <= 5:
        return None  # a pickle: torch's legacy format
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None  # (a multi-byte character cut at 1024 bytes is rare enough to call binary)
    if text is None or any(ord(c) < 32 and c not in "\t\n\r\f" for c in text):
        return f"is not a torch checkpoint ({size} bytes, starting with bytes {head[:8].hex(' ')})"
    first_line = text.strip().splitlines()[0][:80] if text.strip() else ""
    return f"is a text file ({size} bytes) starting with {first_line!r}, not a torch checkpoint"


def _unreadable_reason(error: BaseException) -> str:
    """torch's reason in a few words, without its advice to load unsafely."""
    message = str(error)
    unsupported = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message)
    if unsupported:
        return (
            f"it holds Python objects other than tensors, numbers and numpy arrays ({unsupported.group(1)}), which "
            "are not loaded, for safety; save its state dict alone (torch.save(model.state_dict(), path))"
        )
    if "CUDA device but torch.cuda.is_available() is False" in message:
        return (
            "its tensors are to be loaded on a CUDA device, but torch sees no CUDA device: load it on the CPU "
            "(map_location='cpu', or --device cpu)"
        )
    first_line = next((line.strip() for line in message.splitlines() if line.strip()), type(error).__name__)
    if "weights_only" in first_line or "Weights only" in first_line:
        first_line = "torch's safe loader refused it"
    return f"torch cannot read it ({first_line}); it may be damaged or truncated: download or copy it again"


def load_state_dict_file(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """`torch.load` a checkpoint safely (`weights_only=True`, numpy arrays and scalars allowed, numpy 1.x's too).

    The returned dict keeps the `_metadata` of a saved state dict (see `checkpoint_grid`).

    Raises:
        FileNotFoundError: the file does not exist.
        NotACheckpointError (a ValueError): the path is a folder, or the file is not a torch checkpoint (the message
            says what it looks like: empty, text, an HTML page, a Git LFS pointer, a damaged archive), or it holds
            objects other than tensors, numbers and numpy arrays.
    """
    path = Path(path)
    if path.is_dir():
        raise NotACheckpointError(f"checkpoint {path} is a folder, not a file: pass the checkpoint file inside it")
    if not path.is_file():
        if path.exists():
            raise NotACheckpointError(f"checkpoint {path} is not a regular file (a FIFO or a device?)")
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    looks_like = _describe_file(path)
    if looks_like is not None:
        raise NotACheckpointError(f"checkpoint {path} {looks_like}")
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as error:
        raise NotACheckpointError(f"cannot read checkpoint {path}: {_unreadable_reason(error)}") from None
    if not isinstance(checkpoint, Mapping):
        raise NotACheckpointError(f"checkpoint {path} holds a {type(checkpoint).__name__}, expected a dict of tensors")
    return checkpoint if isinstance(checkpoint, dict) else dict(checkpoint)


def checkpoint_grid(checkpoint: Mapping) -> tuple[int, int] | None:
    """The feature grid (h, w) a checkpoint of any format was made for: recorded in its `_metadata` by
    `save_state_dict`, else 24 x 24 when its positional embedding has 576 positions (the original's only grid),
    else None (unknown)."""
    state_dict = checkpoint.get("model_state_dict", checkpoint)
    recorded = getattr(state_dict, "_metadata", {}).get("", {}).get(GRID_METADATA_KEY)
    if recorded is not None:
        return (int(recorded[0]), int(recorded[1]))
    for key, value in state_dict.items():
        name = key.removeprefix("module.").replace("backbone.", "encoder.", 1)
        if name in _POSITIONAL_KEYS and isinstance(value, Tensor) and value.dim() == 3:
            if value.shape[1] == math.prod(_ORIGINAL_GRID):
                return _ORIGINAL_GRID
    return None


def _grid_note(module: nn.Module, grid: tuple[int, int] | None) -> str | None:
    """Why a checkpoint made for the feature grid `grid` does not fit `module`, or None when it does (or when either
    grid is unknown). The --resize of each grid comes from the module's own `patch_size` (pixels per position)."""
    model_grid = getattr(module, "grid_size", None)
    if grid is None or model_grid is None or tuple(grid) == tuple(model_grid):
        return None
    (h, w), (mh, mw), patch = grid, model_grid, module.patch_size
    return (
        f"it was made for another --resize: a {h} x {w} feature grid (--resize {h * patch} {w * patch}), "
        f"but the model's grid is {mh} x {mw} (--resize {mh * patch} {mw * patch}); pass the --resize "
        "it was made for"
    )


def _check_finite(state_dict: Mapping[str, Tensor], source: str) -> None:
    bad = sorted(
        k for k, v in state_dict.items() if isinstance(v, Tensor) and v.is_floating_point() and not v.isfinite().all()
    )
    if bad:
        raise CheckpointMismatchError(
            f"{source} holds non-finite values (NaN or infinite) in {len(bad)} tensors: {_shorten(bad)}; it comes "
            "from a diverged or damaged training: use an earlier checkpoint"
        )


def _shorten(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_KEYS_SHOWN])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > _MAX_KEYS_SHOWN else "")


def strict_load(
    module: nn.Module, state_dict: Mapping[str, Tensor], source: str = "checkpoint", grid: tuple[int, int] | None = None
) -> None:
    """`module.load_state_dict(state_dict)` that first checks keys, shapes, the feature grid the checkpoint was made
    for (`grid`, when known; see `checkpoint_grid`) and that every value is finite, and names every difference.

    Raises:
        CheckpointMismatchError: with the missing, unexpected and mis-shaped keys, the grids, or the non-finite keys.
    """
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    misshaped = sorted(
        f"{k} (checkpoint {tuple(state_dict[k].shape)}, model {tuple(expected[k].shape)})"
        for k in set(expected) & set(state_dict)
        if tuple(state_dict[k].shape) != tuple(expected[k].shape)
    )
    grid_note = _grid_note(module, grid)
    if missing or unexpected or misshaped or grid_note:
        lines = [f"{source} does not fit {type(module).__name__}:"]
        if grid_note:
            lines.append(f"  {grid_note}")
        if missing:
            lines.append(f"  missing keys: {_shorten(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys: {_shorten(unexpected)}")
        if misshaped:
            lines.append(f"  mis-shaped keys: {_shorten(misshaped)}")
            if not grid_note and any(k.split(" ")[0] in _POSITIONAL_KEYS for k in misshaped):
                lines.append("  (the positional embedding differs: was the checkpoint made for another --resize?)")
        raise CheckpointMismatchError("\n".join(lines))
    _check_finite(state_dict, source)
    module.load_state_dict(state_dict, strict=True)


def _strip_module_prefix(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k.removeprefix("module."): v for k, v in state_dict.items()}
    return dict(state_dict)


def _looks_like_dhe_head(state_dict: Mapping[str, Tensor]) -> bool:
    return "pe" in state_dict and "linear.weight" in state_dict


def _refuse_training_checkpoint(checkpoint: Mapping, source: str) -> None:
    """A `last_checkpoint.pth` (what training resumes from) is not a state dict: say where the weights are."""
    if "modules" in checkpoint and "optimizer" in checkpoint:
        raise CheckpointMismatchError(
            f"{source} is a training checkpoint (last_checkpoint.pth, for --resume_train), not a state dict of "
            "weights: pass the *.torch files saved beside it in the run folder (best_features_extractor.torch, "
            "best_homography_regression.torch, or the per-epoch features_extractor_NNN.torch / "
            "homography_regression_NNN.torch), or extract one with "
            "torch.save(torch.load(path)['modules']['features_extractor' or 'homography_regression'], 'out.torch')"
        )


def features_extractor_state_dict(checkpoint: Mapping, source: str = "checkpoint") -> dict[str, Tensor]:
    """Map format (a) or (b), with or without `module.`, to the FeaturesExtractor's keys (`encoder.*`, `pool.*`)."""
    _refuse_training_checkpoint(checkpoint, source)
    if "model_state_dict" in checkpoint:
        state_dict = _strip_module_prefix(checkpoint["model_state_dict"])
        renamed = {}
        for key, value in state_dict.items():
            for old, new in (("backbone.", "encoder."), ("aggregation.", "pool.")):
                if key.startswith(old):
                    key = new + key.removeprefix(old)
            renamed[key] = value
        return renamed
    state_dict = _strip_module_prefix(checkpoint)
    if _looks_like_dhe_head(state_dict):
        raise CheckpointMismatchError(
            f"{source} is a DHE head checkpoint (keys pe, encoder.layers.*, linear.*); pass it as --resume_hr, "
            "and give --resume_fe a features-extractor checkpoint"
        )
    return state_dict


def homography_regression_state_dict(checkpoint: Mapping, source: str = "checkpoint") -> dict[str, Tensor]:
    """Map format (c), with or without `module.`, to the HomographyRegression's keys."""
    _refuse_training_checkpoint(checkpoint, source)
    if "model_state_dict" in checkpoint:
        raise CheckpointMismatchError(
            f"{source} is a benchmark backbone checkpoint (model_state_dict); pass it as --resume_fe, and give "
            "--resume_hr a DHE head checkpoint"
        )
    state_dict = _strip_module_prefix(checkpoint)
    if any(k.startswith("pool.") or k.startswith("encoder.classifier.") for k in state_dict):
        raise CheckpointMismatchError(
            f"{source} is a features-extractor checkpoint (encoder.classifier.*, pool.*); pass it as --resume_fe, and "
            "give --resume_hr a DHE head checkpoint"
        )
    return state_dict


def load_features_extractor(
    module: nn.Module, checkpoint: str | Path | Mapping, map_location: str | torch.device = "cpu"
) -> nn.Module:
    """Load a features-extractor checkpoint of format (a) or (b) into `module`, strictly. Returns `module`."""
    source = str(checkpoint) if isinstance(checkpoint, (str, Path)) else "features-extractor checkpoint"
    if isinstance(checkpoint, (str, Path)):
        checkpoint = load_state_dict_file(checkpoint, map_location)
    state_dict = features_extractor_state_dict(checkpoint, source)
    strict_load(module, state_dict, source, checkpoint_grid(checkpoint))
    return module


def load_homography_regression(
    module: nn.Module, checkpoint: str | Path | Mapping, map_location: str | torch.device = "cpu"
) -> nn.Module:
    """Load a DHE head checkpoint of format (c) into `module`, strictly. Returns `module`."""
    source = str(checkpoint) if isinstance(checkpoint, (str, Path)) else "DHE head checkpoint"
    if isinstance(checkpoint, (str, Path)):
        checkpoint = load_state_dict_file(checkpoint, map_location)
    state_dict = homography_regression_state_dict(checkpoint, source)
    strict_load(module, state_dict, source, checkpoint_grid(checkpoint))
    return module


def save_state_dict(module: nn.Module, path: str | Path) -> None:
    """Save `module`'s plain state dict (no `module.` prefix) atomically: a crash never leaves a partial file.

    The module's `grid_size` is recorded in the state dict's `_metadata` (see the module docstring), which the
    original's strict `load_state_dict` ignores. The file gets the permissions of the umask, as any new file.
    """
    module = getattr(module, "module", module)  # unwrap DistributedDataParallel
    state_dict = module.state_dict()
    grid = getattr(module, "grid_size", None)
    if grid is not None:
        state_dict._metadata[""][GRID_METADATA_KEY] = (int(grid[0]), int(grid[1]))
    save_atomically(state_dict, path)

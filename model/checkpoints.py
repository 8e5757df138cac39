"""Loading and saving checkpoints in the original DHE-VPR formats, with strict key matching.

Formats understood:
    (a) a visual-geo-localization-benchmark backbone checkpoint (CCT14_msls.pth, CCT14_pitts30k.pth): a dict whose
        "model_state_dict" has keys `module.backbone.*` and `module.aggregation.*` (mapped to `encoder.*`, `pool.*`);
    (b) a features-extractor state dict (finetunedCCT14_*.torch): keys `encoder.*` and `pool.*`;
    (c) a DHE head state dict (initializedDHE.torch, finetunedDHE_*.torch): keys `pe`, `encoder.*`, `encoder2.*`,
        `linear.*`.
Any of them may carry a DataParallel/DistributedDataParallel `module.` prefix. What this project saves is (b) and (c),
so the original code loads it too.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "CheckpointMismatchError",
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


class CheckpointMismatchError(ValueError):
    """A checkpoint whose keys or shapes do not fit the model."""


def _numpy_safe_globals() -> list:
    """Globals that benchmark checkpoints pickle next to tensors (numpy recall arrays and scalars)."""
    names = [np.ndarray, np.dtype, np.dtypes.Float64DType, np.dtypes.Float32DType, np.dtypes.Int64DType]
    names += [np._core.multiarray._reconstruct, np._core.multiarray.scalar]
    return names


def load_state_dict_file(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """`torch.load` a checkpoint safely (`weights_only=True`, numpy arrays and scalars allowed).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a torch checkpoint, or holds objects other than tensors, numbers and numpy arrays.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        raise ValueError(f"cannot read checkpoint {path}: {error}") from error
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"checkpoint {path} holds a {type(checkpoint).__name__}, expected a dict of tensors")
    return dict(checkpoint)


def _shorten(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_KEYS_SHOWN])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > _MAX_KEYS_SHOWN else "")


def strict_load(module: nn.Module, state_dict: Mapping[str, Tensor], source: str = "checkpoint") -> None:
    """`module.load_state_dict(state_dict)` that first checks keys and shapes and names every difference.

    Raises:
        CheckpointMismatchError: with the missing, unexpected and mis-shaped keys.
    """
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    misshaped = sorted(
        f"{k} (checkpoint {tuple(state_dict[k].shape)}, model {tuple(expected[k].shape)})"
        for k in set(expected) & set(state_dict)
        if tuple(state_dict[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or misshaped:
        lines = [f"{source} does not fit {type(module).__name__}:"]
        if missing:
            lines.append(f"  missing keys: {_shorten(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys: {_shorten(unexpected)}")
        if misshaped:
            lines.append(f"  mis-shaped keys: {_shorten(misshaped)}")
            if any(k.split(" ")[0] in _POSITIONAL_KEYS for k in misshaped):
                lines.append("  (the positional embedding differs: was the checkpoint made for another --resize?)")
        raise CheckpointMismatchError("\n".join(lines))
    module.load_state_dict(state_dict, strict=True)


def _strip_module_prefix(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k.removeprefix("module."): v for k, v in state_dict.items()}
    return dict(state_dict)


def _looks_like_dhe_head(state_dict: Mapping[str, Tensor]) -> bool:
    return "pe" in state_dict and "linear.weight" in state_dict


def features_extractor_state_dict(checkpoint: Mapping, source: str = "checkpoint") -> dict[str, Tensor]:
    """Map format (a) or (b), with or without `module.`, to the FeaturesExtractor's keys (`encoder.*`, `pool.*`)."""
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
    strict_load(module, features_extractor_state_dict(checkpoint, source), source)
    return module


def load_homography_regression(
    module: nn.Module, checkpoint: str | Path | Mapping, map_location: str | torch.device = "cpu"
) -> nn.Module:
    """Load a DHE head checkpoint of format (c) into `module`, strictly. Returns `module`."""
    source = str(checkpoint) if isinstance(checkpoint, (str, Path)) else "DHE head checkpoint"
    if isinstance(checkpoint, (str, Path)):
        checkpoint = load_state_dict_file(checkpoint, map_location)
    strict_load(module, homography_regression_state_dict(checkpoint, source), source)
    return module


def save_state_dict(module: nn.Module, path: str | Path) -> None:
    """Save `module`'s plain state dict (no `module.` prefix) atomically: a crash never leaves a partial file."""
    module = getattr(module, "module", module)  # unwrap DistributedDataParallel
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        torch.save(module.state_dict(), temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise

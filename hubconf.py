"""torch.hub entry point of DHE-VPR.

    import torch
    model = torch.hub.load("path/to/this/repo", "dhe_vpr", source="local",
                           resume_fe="finetunedCCT14_pitts30k.torch", resume_hr="finetunedDHE_pitts30k.torch")
    images = torch.stack([model.preprocess(path) for path in paths])  # (B, 3, 384, 384), ImageNet-normalised
    with torch.no_grad():
        global_descriptors, local_features = model(images)  # (B, 384), (B, 384, 24, 24)
    order, scores = model.rerank(local_features[0], local_features[1:])  # candidates 1..B-1 of query 0, best first

Nothing is downloaded: checkpoints are local files, loaded on CPU (`map_location`) with strict key matching, in any
of the formats `model.checkpoints` reads (the released checkpoints, and what `finetune.py` and `train_dhe.py`
save). ``torch.hub.load("<owner>/<repo>", ...)`` with ``source="github"`` fetches this file's repository (that is
torch.hub's doing, not this file's); the weights still come from the paths you pass.
"""

from __future__ import annotations

import numbers
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

_REPOSITORY = Path(__file__).resolve().parent
_OWN_MODULES = ("model", "evaluation", "datasets_ws", "util", "commons", "interrupts")


def _check_own_modules_are_free() -> None:
    """This repository's modules have common names: another project's module of one of those names, imported
    before `torch.hub.load`, would stand in for ours (Python imports a name once)."""
    for name in _OWN_MODULES:
        module = sys.modules.get(name)
        origin = getattr(module, "__file__", None)
        if module is not None and (origin is None or _REPOSITORY not in Path(origin).resolve().parents):
            raise ImportError(
                f"a module named {name!r} is already imported ({origin or 'not from a file'}), and DHE-VPR's own "
                f"{name!r} cannot be imported beside it (its modules are {', '.join(_OWN_MODULES)}): load DHE-VPR in "
                "a separate process, or before that module is imported"
            )


_check_own_modules_are_free()

# Imported here, while torch.hub has this repository on sys.path: it is gone from it once `torch.hub.load` returns.
from commons import ModelConfig, build_models  # noqa: E402 - after the check above
from datasets_ws import normalized_tensor, open_rgb_image  # noqa: E402 - after the check above
from model import FeaturesExtractor, HomographyRegression  # noqa: E402 - after the check above
from model.features_extractor import PATCH_SIZE  # noqa: E402 - after the check above
from model.rerank import rerank_order, rerank_scores  # noqa: E402 - after the check above

dependencies = ["torch", "torchvision", "timm", "kornia", "numpy", "PIL", "sklearn", "faiss"]

NUM_BLOCKS = 14  # CCT-14: --trunc_te keeps 0..13 of them, as parser.py allows


class DHEVPR(nn.Module):
    """The features extractor (`features_extractor`: CCT + GeM) and the DHE head (`homography_regression`).

    `forward(images)` gives the global descriptors for retrieval and the local features for re-ranking;
    `rerank(local_q, local_candidates)` orders candidates by the DHE inlier count, as `eval.py` does.
    """

    def __init__(self, features_extractor: FeaturesExtractor, homography_regression: HomographyRegression) -> None:
        super().__init__()
        self.features_extractor = features_extractor
        self.homography_regression = homography_regression

    @property
    def resize(self) -> tuple[int, int]:
        """(H, W) of the images the model was built for."""
        return tuple(self.features_extractor.resize)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """ImageNet-normalised images (B, 3, H, W), (H, W) = `resize` -> (global descriptors (B, 384), L2-normalised
        local features (B, 384, H/16, W/16))."""
        if not isinstance(images, Tensor):
            raise TypeError(f"expected images as a torch.Tensor (B, 3, H, W), got {type(images).__name__}")
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W), got {tuple(images.shape)}")
        if tuple(images.shape[2:]) != self.resize:
            raise ValueError(
                f"expected images of the model's resize {self.resize}, got {tuple(images.shape[2:])}: prepare them "
                "with model.preprocess(path), or load the model with resize=(H, W)"
            )
        weights_dtype = next(self.features_extractor.parameters()).dtype
        if images.dtype != weights_dtype:
            raise TypeError(
                f"expected ImageNet-normalised {weights_dtype} images (as model.preprocess gives), got {images.dtype}"
            )
        return self.features_extractor(images)

    def rerank(
        self, local_q: Tensor, local_candidates: Tensor, batch_size: int = 32, amp: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Re-rank candidates by how many mutual matches the DHE homography explains (48 px), as `eval.py` does.

        Args:
            local_q: (C, h, w) local features of one query, or (Q, C, h, w) of Q queries (from `forward`).
            local_candidates: (K, C, h, w) features of its K candidates, or (Q, K, C, h, w).
            batch_size: query-candidate pairs per pass of the DHE head.
            amp: run the DHE head in bfloat16 (float16 on CUDA without bfloat16).

        Returns:
            order: (K,) or (Q, K) int64 candidate positions, best first (ties ordered as the original,
                `argsort()[::-1]`, except that a query whose candidates all tie keeps their given order, with a
                warning, as `eval.py` does); K = 0 gives empty results;
            scores: (K,) or (Q, K) float32 inlier counts of the candidates, in their given order.

        Raises:
            TypeError: features that are not floating-point tensors.
            ValueError: features of the wrong shape or grid, or not finite (NaN or infinite); a bad `batch_size`.
        """
        for name, features in (("local_q", local_q), ("local_candidates", local_candidates)):
            if not isinstance(features, Tensor) or not features.is_floating_point():
                what = features.dtype if isinstance(features, Tensor) else type(features).__name__
                raise TypeError(f"{name} must be a floating-point torch.Tensor from model(images), got {what}")
        grid = self.homography_regression.grid_size
        if local_q.dim() in (3, 4) and tuple(local_q.shape[-2:]) != tuple(grid):
            raise ValueError(
                f"local_q has a {tuple(local_q.shape[-2:])} feature grid, but the model was built for resize "
                f"{self.resize}, a {tuple(grid)} grid: extract the features with this model, from images of that size"
            )
        _check_int("batch_size", batch_size, 1, 2**31 - 1)
        scores = rerank_scores(self.homography_regression, local_q, local_candidates, batch_size, amp)
        num_candidates = scores.shape[-1]
        rows = scores.double().cpu().numpy().reshape(scores.numel() // max(num_candidates, 1), num_candidates)
        order, tied = rerank_order(rows)
        if num_candidates > 1 and tied.any():
            warnings.warn(
                f"rerank: for {int(tied.sum())} of {len(tied)} queries every candidate got the same score: they keep "
                "their given order. Equal scores of 0 mean fewer than 4 mutual matches (a resize grid too small) or "
                "DHE head outputs that are not finite.",
                stacklevel=2,
            )
        return torch.from_numpy(order.reshape(scores.shape).copy()).to(scores.device), scores

    def preprocess(self, image: str | os.PathLike) -> Tensor:
        """An image file as the model's input (3, H, W): RGB, resized to `resize` (bilinear, no antialiasing, as
        `eval.py`), ImageNet-normalised."""
        return normalized_tensor(open_rgb_image(str(image)), self.resize)


def _check_path(name: str, value: str | os.PathLike | None) -> None:
    if value is not None and not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path to a local checkpoint file or None, got {type(value).__name__}")
    if value is not None and Path(value).is_dir():
        inside = sorted(path.name for path in Path(value).glob("*.torch"))
        raise IsADirectoryError(
            f"{name}: {value} is a folder, not a checkpoint file: pass one of the files in it"
            + (f" ({', '.join(inside[:6])})" if inside else " (it holds no *.torch file)")
        )
    if value is not None and not Path(value).is_file():
        raise FileNotFoundError(f"{name}: checkpoint {value} does not exist (nothing is ever downloaded)")


def _check_map_location(map_location: str | torch.device) -> None:
    try:
        device = torch.device(map_location)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"map_location must be a device such as 'cpu' or 'cuda', got {map_location!r}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"map_location={map_location!r}, but torch sees no CUDA device: load on 'cpu' (the default), then move "
            "the model with .to(device)"
        )


def _check_int(name: str, value: int, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer from {low} to {high}, got {value!r}")


def dhe_vpr(
    resume_fe: str | os.PathLike | None = None,
    resume_hr: str | os.PathLike | None = None,
    resize: Sequence[int] = (384, 384),
    trunc_te: int = 8,
    freeze_te: int = 5,
    pretrained_cct: str | os.PathLike | None = None,
    map_location: str | torch.device = "cpu",
) -> DHEVPR:
    """DHE-VPR (CCT-14 cut to `trunc_te` blocks + GeM, and the DHE head) in eval mode, on CPU.

    Args:
        resume_fe: features-extractor checkpoint (a benchmark `CCT14_*.pth`, a `finetunedCCT14_*.torch`, or
            `features_extractor_*.torch` saved by finetune.py); None: random weights (with a warning).
        resume_hr: DHE head checkpoint (`initializedDHE.torch`, `finetunedDHE_*.torch`, or
            `homography_regression_*.torch` saved by train_dhe.py/finetune.py); None: random weights (with a warning).
        resize: (H, W) of the input images, each a positive multiple of 16, as the checkpoints were trained.
        trunc_te: CCT blocks kept, 0..13 (as --trunc_te).
        freeze_te: blocks with index <= freeze_te are frozen, -1..13 (as --freeze_te; matters for training only).
        pretrained_cct: optional local file with ImageNet CCT-14 weights, used when `resume_fe` is None.
        map_location: where the checkpoints' tensors are loaded (the model stays on CPU; move it with `.to()`).

    Raises:
        ValueError: a bad `resize`, `trunc_te` or `freeze_te`; a checkpoint that does not fit (its keys named).
        FileNotFoundError: a checkpoint path that does not exist.
        IsADirectoryError: a folder given as a checkpoint (the message lists its *.torch files).
        RuntimeError: `map_location` is a CUDA device, but there is none.
    """
    if (
        isinstance(resize, (str, bytes))
        or not isinstance(resize, Sequence)
        or len(resize) != 2
        or not all(
            isinstance(s, numbers.Integral) and not isinstance(s, bool) and s > 0 and s % PATCH_SIZE == 0
            for s in resize
        )
    ):
        raise ValueError(f"resize must be (H, W), two positive multiples of {PATCH_SIZE}, got {resize!r}")
    _check_int("trunc_te", trunc_te, 0, NUM_BLOCKS - 1)
    _check_int("freeze_te", freeze_te, -1, NUM_BLOCKS - 1)
    for name, value in (("resume_fe", resume_fe), ("resume_hr", resume_hr), ("pretrained_cct", pretrained_cct)):
        _check_path(name, value)
    _check_map_location(map_location)
    resize = (int(resize[0]), int(resize[1]))
    pretrained_cct = pretrained_cct if resume_fe is None else None  # the checkpoint replaces every weight
    config = ModelConfig(resize, trunc_te, freeze_te, pretrained_cct, resume_fe, resume_hr)
    features_extractor, homography_regression = build_models(
        config, torch.device("cpu"), map_location=map_location, on_random_weights=_warn_random_weights
    )
    return DHEVPR(features_extractor, homography_regression).eval()


def _warn_random_weights(flag: str, part: str) -> None:
    # stacklevel 4: this function, build_models, dhe_vpr, then dhe_vpr's caller
    warnings.warn(f"dhe_vpr: no {flag}, the {part} has random weights", stacklevel=4)

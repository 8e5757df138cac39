"""ONNX export of DHE-VPR's two parts, and the re-ranking step that stays outside the graphs.

- `features_extractor.onnx`: images (B, 3, H, W) -> global descriptors (B, C) and L2-normalised local features
  (B, C, H/16, W/16), C = 384;
- `dhe_head.onnx`: query and candidate local features (B, C, h, w) each -> the correlation (`compute_similarity`)
  -> the DHE head -> its 4 point pairs (B, 8, 2) in pixels of the resized images.

Both graphs have a dynamic batch axis and a fixed image size (`--resize`). ONNX has no linear solve, so the DLT of
the 4 point pairs and the inlier count run outside the graph, in `rerank_from_points`, with the very functions that
`eval.py` uses (`points_to_homography`, `inlier_scores`, and the tie ordering of
`evaluation.reranking.rerank_predictions`).

The export needs the `onnx` package, the check `onnxruntime`: both are optional for users (requirements-dev.txt);
`require_onnx` raises `MissingOnnxError` with the command that installs them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model import FeaturesExtractor, HomographyRegression, compute_similarity
from model.dhe import cpu_kernels, set_cpu_kernels
from model.geometry import points_to_homography
from model.matching import inlier_scores
from model.rerank import rerank_order  # eval.py's order, ties included

__all__ = [
    "DEFAULT_OPSET",
    "FEATURES_EXTRACTOR_FILE",
    "HEAD_FILE",
    "MissingOnnxError",
    "require_onnx",
    "export_features_extractor",
    "export_head",
    "export_models",
    "load_session",
    "relative_difference",
    "check_exported",
    "rerank_from_points",
]

DEFAULT_OPSET = 17
"""ONNX opset of the export: the first with LayerNormalization as one operator (onnxruntime >= 1.14 runs it)."""
FEATURES_EXTRACTOR_FILE = "features_extractor.onnx"
HEAD_FILE = "dhe_head.onnx"
EXPORT_BATCH_SIZE = 2
"""Batch of the example inputs that the tracer runs: not 1, so that no size-1 broadcast is baked into the graph."""


class MissingOnnxError(ImportError):
    """`onnx` or `onnxruntime` is not installed."""


def require_onnx(*packages: str) -> None:
    """Raise `MissingOnnxError` naming the missing ones of `packages` (default: onnx and onnxruntime) and how to
    install them."""
    packages = packages or ("onnx", "onnxruntime")
    missing = [name for name in packages if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingOnnxError(
            f"the ONNX export needs {' and '.join(missing)}, which is not installed: "
            f"pip install {' '.join(missing)} (or pip install -r requirements-dev.txt)"
        )


class FeaturesExtractorGraph(nn.Module):
    """What `features_extractor.onnx` computes: `FeaturesExtractor.forward` for images of its `resize`.

    The GeM pooling is written as a mean over the grid: `gem`'s `avg_pool2d` takes its kernel size from the input's
    shape, which the TorchScript exporter cannot keep as a constant once the batch axis is dynamic. The outputs are
    checked against `FeaturesExtractor.forward` (`check_exported`, tests/test_onnx_export.py).
    """

    def __init__(self, features_extractor: FeaturesExtractor) -> None:
        super().__init__()
        self.features_extractor = features_extractor

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 3, H, W) -> (global descriptors (B, C), L2-normalised local features (B, C, H/16, W/16))."""
        features_extractor = self.features_extractor
        l2norm, gem, _ = features_extractor.pool
        # `local_grid`, with the grid's sizes as constants: ONNX's shape inference then knows every output size.
        tokens = features_extractor.encoder.forward_features(images)
        grid = tokens.transpose(1, 2).reshape(-1, features_extractor.features_dim, *features_extractor.grid_size)
        normalised = l2norm(grid)
        pooled = normalised.clamp(min=gem.eps).pow(gem.p).mean(dim=(2, 3)).pow(1.0 / gem.p)
        return pooled, F.normalize(grid, p=2, dim=1)


class HeadGraph(nn.Module):
    """What `dhe_head.onnx` computes: the correlation of two local feature maps, then the DHE head."""

    def __init__(self, homography_regression: HomographyRegression) -> None:
        super().__init__()
        self.homography_regression = homography_regression

    def forward(self, local_q: Tensor, local_c: Tensor) -> Tensor:
        """(B, C, h, w) query and candidate local features -> points (B, 8, 2): query points, then candidate ones."""
        return self.homography_regression(compute_similarity(local_q, local_c))


@contextlib.contextmanager
def _exporting(module: nn.Module) -> Iterator[None]:
    """Eval mode for every submodule and the head's portable (aten) CPU kernels, restored afterwards.

    `torch.onnx.export` restores the training flag of the exported module only, and on every submodule, so a
    wrapper would leave a model in eval mode in training mode (its dropouts on): the flags are saved one by one.
    The head's oneDNN kernels (`torch.ops.mkldnn`) have no ONNX form; its aten path computes the same up to rounding.
    """
    modes = {submodule: submodule.training for submodule in module.modules()}
    kernels = cpu_kernels()
    module.eval()
    set_cpu_kernels("aten")
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # The shape checks of the model run in Python on traced sizes (TracerWarning), and torch >= 2.9 warns
            # that the TorchScript exporter is the legacy one (DeprecationWarning): both are expected here.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        set_cpu_kernels(kernels)
        for submodule, training in modes.items():
            submodule.train(training)


def _export(module: nn.Module, inputs: tuple[Tensor, ...], input_names: list[str], output_names: list[str],
            path: str | Path, opset: int) -> Path:  # fmt: skip
    require_onnx("onnx")
    path = Path(path)
    batch_axes = {name: {0: "batch"} for name in input_names + output_names}
    with _exporting(module):
        torch.onnx.export(
            module,
            inputs,
            str(path),
            dynamo=False,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=batch_axes,
            opset_version=opset,
        )
        outputs = module(*inputs)
    outputs = (outputs,) if isinstance(outputs, Tensor) else outputs
    _declare_output_sizes(path, {name: tuple(output.shape[1:]) for name, output in zip(output_names, outputs)})
    return path


def _declare_output_sizes(path: Path, sizes: dict[str, tuple[int, ...]]) -> None:
    """Write the non-batch sizes of the outputs into the graph at `path`: the exporter's shape inference names
    them symbolically (e.g. "Divlocal_features_dim_1") where they pass through a shape computed at run time."""
    import onnx

    model = onnx.load(str(path))
    for output in model.graph.output:
        dims = output.type.tensor_type.shape.dim
        for dim, size in zip(dims[1:], sizes[output.name], strict=True):
            dim.dim_value = size  # replaces the symbolic name (a oneof)
    onnx.save(model, str(path))


def export_features_extractor(
    features_extractor: FeaturesExtractor, path: str | Path, opset: int = DEFAULT_OPSET
) -> Path:
    """Write `features_extractor` as ONNX to `path`: input "images" (B, 3, H, W) at its `resize`, outputs
    "global_descriptors" (B, C) and "local_features" (B, C, H/16, W/16); B is dynamic. Returns `path`."""
    graph = FeaturesExtractorGraph(features_extractor)
    parameter = next(features_extractor.parameters())
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(EXPORT_BATCH_SIZE, 3, *features_extractor.resize, generator=generator)
    images = images.to(parameter.device, parameter.dtype)
    return _export(graph, (images,), ["images"], ["global_descriptors", "local_features"], path, opset)


def export_head(
    homography_regression: HomographyRegression, features_dim: int, path: str | Path, opset: int = DEFAULT_OPSET
) -> Path:
    """Write the correlation + DHE head as ONNX to `path`: inputs "local_q" and "local_c" (B, features_dim, h, w)
    at the head's grid, output "points" (B, 8, 2); B is dynamic. Returns `path`."""
    parameter = next(homography_regression.parameters())
    generator = torch.Generator().manual_seed(0)
    shape = (EXPORT_BATCH_SIZE, features_dim, *homography_regression.grid_size)
    local_q, local_c = (F.normalize(torch.rand(shape, generator=generator), dim=1) for _ in range(2))
    inputs = tuple(features.to(parameter.device, parameter.dtype) for features in (local_q, local_c))
    return _export(HeadGraph(homography_regression), inputs, ["local_q", "local_c"], ["points"], path, opset)


def export_models(
    features_extractor: FeaturesExtractor,
    homography_regression: HomographyRegression,
    out_dir: str | Path,
    opset: int = DEFAULT_OPSET,
) -> dict[str, Path]:
    """Export both parts into `out_dir` (created if needed): {"features_extractor": path, "head": path}."""
    require_onnx("onnx")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--out {out_dir} is a file, not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    return {
        "features_extractor": export_features_extractor(features_extractor, out_dir / FEATURES_EXTRACTOR_FILE, opset),
        "head": export_head(homography_regression, features_extractor.features_dim, out_dir / HEAD_FILE, opset),
    }


def load_session(path: str | Path):
    """An onnxruntime `InferenceSession` of `path` on the CPU."""
    require_onnx("onnxruntime")
    import onnxruntime

    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def relative_difference(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |actual - expected| / max |expected|: the agreement measure of docs/onnx.md."""
    expected = np.asarray(expected, dtype=np.float64)
    difference = np.abs(np.asarray(actual, dtype=np.float64) - expected).max()
    return float(difference / max(np.abs(expected).max(), np.finfo(np.float64).tiny))


def check_exported(
    features_extractor: FeaturesExtractor,
    homography_regression: HomographyRegression,
    paths: dict[str, Path],
    batch_size: int = 3,
    seed: int = 0,
) -> dict[str, float]:
    """Run both exported graphs with onnxruntime (CPU) and the torch models on `batch_size` seeded random images
    (and their pairs); returns the `relative_difference` of each output: global_descriptors, local_features,
    points. The models end on the CPU in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, *features_extractor.resize, generator=generator)
    features_extractor, homography_regression = features_extractor.cpu().eval(), homography_regression.cpu().eval()
    with torch.inference_mode():
        global_descriptors, local_features = features_extractor(images)
        candidates = local_features.roll(1, dims=0)
        points = homography_regression(compute_similarity(local_features, candidates))
    onnx_global, onnx_local = load_session(paths["features_extractor"]).run(None, {"images": images.numpy()})
    (onnx_points,) = load_session(paths["head"]).run(
        None, {"local_q": local_features.numpy(), "local_c": candidates.numpy()}
    )
    return {
        "global_descriptors": relative_difference(onnx_global, global_descriptors.numpy()),
        "local_features": relative_difference(onnx_local, local_features.numpy()),
        "points": relative_difference(onnx_points, points.numpy()),
    }


def rerank_from_points(
    points: np.ndarray | Tensor,
    local_q: np.ndarray | Tensor,
    local_c: np.ndarray | Tensor,
    image_hw: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Re-rank one query's K candidates from the head's points, as `eval.py` does: DLT -> inlier counts -> order.

    Args:
        points: (K, 8, 2) output "points" of dhe_head.onnx for the K (query, candidate) pairs.
        local_q: (C, h, w), (1, C, h, w) or (K, C, h, w) query local features ("local_features").
        local_c: (K, C, h, w) candidate local features, in their global order.
        image_hw: (H, W) of the resized images; defaults to the grid times 16.

    Returns:
        order: (K,) int64 candidate positions, best first (ties as eval.py: `argsort()[::-1]`, and a query whose
            scores all tie keeps its global order);
        scores: (K,) float32 inlier counts of the candidates, in their given order.
    """
    points, local_q, local_c = (torch.as_tensor(array).float() for array in (points, local_q, local_c))
    if local_q.dim() == 3:
        local_q = local_q.unsqueeze(0)
    if local_c.dim() != 4 or points.shape != (local_c.shape[0], 8, 2):
        raise ValueError(
            f"expected points (K, 8, 2) and candidates (K, C, h, w), got {tuple(points.shape)} and "
            f"{tuple(local_c.shape)}"
        )
    with torch.inference_mode():
        scores = inlier_scores(local_q, local_c, points_to_homography(points), image_hw)
    scores = scores.numpy().astype(np.float32)
    order, _ = rerank_order(scores[None].astype(np.float64))
    return order[0], scores

"""The deep homography estimation (DHE) head and the correlation volume it reads."""

from __future__ import annotations

import functools
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.features_extractor import PATCH_SIZE

__all__ = [
    "HomographyRegression",
    "compute_similarity",
    "attention_heads",
    "init_spread_corners_",
    "set_cpu_kernels",
    "cpu_kernels",
]


def compute_similarity(features_a: Tensor, features_b: Tensor) -> Tensor:
    """Correlation of query features A with candidate features B, as the original's `compute_similarity`.

    Args:
        features_a: query local features (B, C, h, w).
        features_b: candidate local features (B, C, h, w).

    Returns:
        (B, h*w, h, w): channel k is A's position in column-major order (k = col * h + row), the spatial grid runs
        over B's positions; ReLU, then L2-normalised over the channel axis.
    """
    if features_a.shape != features_b.shape or features_a.dim() != 4:
        raise ValueError(
            f"expected two (B, C, h, w) tensors of one shape, got {tuple(features_a.shape)} and "
            f"{tuple(features_b.shape)}"
        )
    batch, channels, height, width = features_a.shape
    a_column_major = features_a.transpose(2, 3).reshape(batch, channels, height * width)
    correlation = torch.bmm(a_column_major.transpose(1, 2), features_b.reshape(batch, channels, height * width))
    correlation = correlation.reshape(batch, height * width, height, width)
    return F.normalize(F.relu(correlation), p=2, dim=1)


def attention_heads(d_model: int, max_heads: int = 12) -> int:
    """Heads of the DHE head's encoders: the largest divisor of `d_model` that is <= `max_heads`.

    At the default 24 x 24 grid (d_model 576) this is the original's 12; a 10 x 10 grid (d_model 100) gets 10.
    """
    return max(n for n in range(1, max_heads + 1) if d_model % n == 0)


class HomographyRegression(nn.Module):
    """DHE head: correlation (B, h*w, h, w) -> 4 point correspondences (B, 8, 2), in pixels.

    The sequence runs over the h*w spatial positions, the features over the h*w correlation channels (d_model = h*w),
    plus a learnable positional embedding `pe` (1, h*w, h*w). Two stacked 3-layer post-norm transformer encoders
    (`encoder`, `encoder2`; GELU, feed-forward 2048, no dropout); the output is encoder2(e) + e with e = encoder(x),
    then a linear layer `linear` (h*w * h*w -> 16). Rows 0-3 are points in the query image, rows 4-7 their
    correspondences in the candidate image. `grid_size` is (h, w) = resize / `patch_size` (the backbone's
    `PATCH_SIZE`, 16 pixels), `d_model` is h*w.

    Args:
        resize: (H, W) of the images, each a multiple of 16.
        num_layers: layers of each encoder.
        dim_feedforward: hidden size of the encoders' MLPs.
    """

    def __init__(self, resize: tuple[int, int] = (384, 384), num_layers: int = 3, dim_feedforward: int = 2048) -> None:
        super().__init__()
        height, width = resize
        if height <= 0 or width <= 0 or height % PATCH_SIZE or width % PATCH_SIZE:
            raise ValueError(
                f"HomographyRegression resize {tuple(resize)}: each side must be a positive multiple of {PATCH_SIZE}"
            )
        self.patch_size = PATCH_SIZE
        self.grid_size = (height // PATCH_SIZE, width // PATCH_SIZE)
        d_model = self.grid_size[0] * self.grid_size[1]
        self.d_model = d_model
        layer = nn.TransformerEncoderLayer(
            d_model=d_model,
            nhead=attention_heads(d_model),
            dim_feedforward=dim_feedforward,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
        )
        # As in the original, both encoders start from copies of one layer. They hold the parameters (and keep the
        # original's key names); `_encode` runs them. Dropout is 0 and must stay so: `_encode` has none.
        self.encoder = nn.TransformerEncoder(layer, num_layers=num_layers, enable_nested_tensor=False)
        self.encoder2 = nn.TransformerEncoder(layer, num_layers=num_layers, enable_nested_tensor=False)
        self.pe = nn.Parameter(torch.zeros(1, d_model, d_model))
        self.linear = nn.Linear(d_model * d_model, 16)

    def forward(self, correlation: Tensor) -> Tensor:
        """(B, h*w, h, w) -> points (B, 8, 2)."""
        batch = correlation.shape[0]
        if tuple(correlation.shape[1:]) != (self.d_model, *self.grid_size):
            raise ValueError(
                f"HomographyRegression expects (B, {self.d_model}, {self.grid_size[0]}, "
                f"{self.grid_size[1]}), got {tuple(correlation.shape)}"
            )
        x = correlation.reshape(batch, self.d_model, self.d_model) + self.pe
        sequence = x.transpose(1, 2)  # (B, positions, channels)
        encoded = _encode(self.encoder, sequence)
        encoded = _encode(self.encoder2, encoded) + encoded
        return self.linear(encoded.transpose(1, 2).reshape(batch, -1)).reshape(batch, 8, 2)


def init_spread_corners_(head: HomographyRegression) -> HomographyRegression:
    """Make a random-weight head predict well-posed homographies, as a trained head does, in place: its output bias
    becomes the patch-centre corners of the image (the identity homography) and its output weight is scaled by 0.1,
    so the predicted corners spread over the image. Returns `head` (for benchmarks and tests without trained weights).
    """
    height, width = (size * head.patch_size for size in head.grid_size)
    half = head.patch_size // 2
    with torch.no_grad():
        corners = torch.tensor(
            [[half, half], [width - half, half], [half, height - half], [width - half, height - half]],
            dtype=torch.float,
        )
        head.linear.bias.copy_(torch.cat([corners, corners]).flatten())
        head.linear.weight.mul_(0.1)
    return head


def _encode(encoder: nn.TransformerEncoder, x: Tensor) -> Tensor:
    """`encoder(x)` for the head's post-norm GELU layers without dropout, (B, L, E) -> (B, L, E).

    The same arithmetic as `nn.TransformerEncoder`, written out with one fused QKV projection and
    `scaled_dot_product_attention` on (B, heads, L, E / heads) views: it skips the layout copies of
    `nn.MultiheadAttention`. Without gradients on a CPU where `cpu_kernels()` is "onednn", the linear layers run
    as oneDNN matmuls (`_linear`, GELU fused into the first feed-forward one; bf16 weights cast once under bf16
    autocast). The attention stays `scaled_dot_product_attention` (flash on CPU): in bf16 without AMX, two bf16
    `bmm` + softmax one pair at a time take 1.34x less CPU time, but with 2 threads on a loaded machine their
    many small parallel regions made the head 1.9x slower; flash has one per layer.
    """
    batch, length, dim = x.shape
    dtype = _onednn_dtype(x)
    for layer in encoder.layers:
        attention = layer.self_attn
        heads = attention.num_heads
        qkv = _linear(x, attention.in_proj_weight, attention.in_proj_bias, dtype)
        query, key, value = qkv.view(batch, length, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(query, key, value).transpose(1, 2).reshape(batch, length, dim)
        x = layer.norm1(x + _linear(attended, attention.out_proj.weight, attention.out_proj.bias, dtype))
        hidden = _linear(x, layer.linear1.weight, layer.linear1.bias, dtype, gelu=True)
        x = layer.norm2(x + _linear(hidden, layer.linear2.weight, layer.linear2.bias, dtype))
    return x


_cast_cache: dict[int, tuple[weakref.ref, int, Tensor]] = {}


def _cast_parameter(parameter: Tensor, dtype: torch.dtype) -> Tensor:
    """`parameter.to(dtype)`, cached while the parameter lives unchanged (autocast caches its casts of weights
    within one region only; the head's 20 M weights would otherwise be cast on every pass)."""
    if parameter.dtype == dtype:
        return parameter
    key = id(parameter)
    cached = _cast_cache.get(key)
    if cached is None or cached[0]() is not parameter or cached[1] != parameter._version or cached[2].dtype != dtype:
        if cached is None or cached[0]() is not parameter:
            weakref.finalize(parameter, _cast_cache.pop, key, None)
        cached = (weakref.ref(parameter), parameter._version, parameter.detach().to(dtype))
        _cast_cache[key] = cached
    return cached[2]


def _linear(x: Tensor, weight: Tensor, bias: Tensor, onednn_dtype: torch.dtype | None, gelu: bool = False) -> Tensor:
    """`F.linear` (then exact GELU with `gelu`), (..., in) -> (..., out); with `onednn_dtype` a oneDNN matmul whose
    inputs and weights are cast to that dtype, as autocast's `linear` casts them (the output has that dtype)."""
    if onednn_dtype is None:
        out = F.linear(x, weight, bias)
        return F.gelu(out) if gelu else out
    x, weight, bias = x.to(onednn_dtype), _cast_parameter(weight, onednn_dtype), _cast_parameter(bias, onednn_dtype)
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu" if gelu else "none", [], "none" if gelu else "")


CPU_KERNELS = ("auto", "onednn", "aten")
_cpu_kernels = "auto"


def set_cpu_kernels(kind: str) -> None:
    """Choose how the head's linear layers run on CPU at inference (no gradients).

    "aten": `F.linear`, i.e. MKL's sgemm in fp32 and whatever autocast picks in bf16. "onednn": oneDNN matmuls
    (`torch.ops.mkldnn._linear_pointwise`). "auto" (the default): oneDNN on AMD (and Hygon) CPUs, where MKL's
    sgemm takes a slower code path than on Intel CPUs (measured ~2x slower than oneDNN on a 2-core AMD EPYC
    without AMX, benchmarks/bench_rerank.py), and aten elsewhere (the Intel figures were measured with it).
    Training (gradients enabled) always uses aten. The outputs differ by rounding only (~1e-6 relative in fp32).
    """
    global _cpu_kernels
    if kind not in CPU_KERNELS:
        raise ValueError(f"cpu kernels {kind!r}: expected one of {', '.join(CPU_KERNELS)}")
    _cpu_kernels = kind


def cpu_kernels() -> str:
    """The CPU kernels the head uses at inference: "onednn" or "aten" (see `set_cpu_kernels`)."""
    if _cpu_kernels == "aten" or not _onednn_linear_available():
        return "aten"
    if _cpu_kernels == "onednn":
        return "onednn"
    return "onednn" if _cpu_vendor() in ("AuthenticAMD", "HygonGenuine") else "aten"


@functools.cache
def _onednn_linear_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@functools.cache
def _cpu_vendor() -> str:
    """x86 vendor string of the CPU ("GenuineIntel", "AuthenticAMD", ...), "" where unknown (not Linux, not x86)."""
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _onednn_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype of the head's oneDNN linears for input `x`, or None where they do not apply (not CPU, gradients
    enabled, aten kernels, or an autocast/input dtype other than fp32 and bf16)."""
    if x.device.type != "cpu" or torch.is_grad_enabled() or torch.compiler.is_compiling() or cpu_kernels() != "onednn":
        return None
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    return dtype if dtype in (torch.float32, torch.bfloat16) else None

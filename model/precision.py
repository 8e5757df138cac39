"""The precision policy: the half precision of ``--amp`` on each device, the autocast that runs the DHE head under
it, and the optional ``torch.compile`` of the head (checked against the eager head)."""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn.functional as F
from torch import nn

from model.dhe import HomographyRegression


def amp_dtype(device: torch.device) -> torch.dtype:
    """The half precision of ``--amp`` on ``device``: bfloat16 on CPU and on GPUs that support it, else float16."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def amp_autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """``torch.autocast`` in ``amp_dtype(device)`` when enabled, else a context that changes nothing (the caller's
    autocast state, if any, applies)."""
    return torch.autocast(device.type, dtype=amp_dtype(device)) if enabled else contextlib.nullcontext()


COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")
"""`--compile_head` values: no compilation, or a `torch.compile` mode ("reduce-overhead" adds CUDA graphs)."""


def compile_head(
    head: HomographyRegression, mode: str, batch_size: int, device: torch.device, amp: bool = False
) -> nn.Module:
    """`torch.compile(head, mode=mode)` for inference on `device`, checked on one pass of `batch_size` pairs.

    The compiled head is run once on random (batch_size, h*w, h, w) correlations (under autocast with `amp`, as
    `score_pairs` runs it; this compiles the full-pass shape) and its points compared with the eager head's;
    where compilation fails (no Triton or C++ compiler, an unsupported op) or the points differ by more than
    rounding, a warning says why and the eager head is returned. "none" returns `head` as it is. Each distinct
    pass size compiles once (the last pass of a run is usually shorter); "reduce-overhead" records a CUDA graph
    per size.
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r}: expected one of {', '.join(COMPILE_MODES)}")
    if mode == "none":
        return head
    generator = torch.Generator().manual_seed(0)
    example = torch.rand(batch_size, head.d_model, *head.grid_size, generator=generator).to(device)
    example = F.normalize(example, dim=1)
    try:
        compiled = torch.compile(head, mode=mode, dynamic=False)
        with torch.inference_mode(), amp_autocast(device, amp):
            expected = head(example).float()
            points = compiled(example).float()
    except Exception as error:  # noqa: BLE001 - any compiler failure falls back to the eager head, with a warning
        logging.warning(f"torch.compile of the DHE head (mode {mode}) failed, running it eagerly: {error!r}")
        return head
    # Pixels of the resized image. With amp the points are bf16 (or fp16) themselves: one unit in the last place is
    # 2 px between 256 and 512, and two fusions of the same sums may round differently.
    tolerance = 4.0 if amp else 0.05
    difference = (points - expected).abs().max().item()
    if not difference <= tolerance:
        logging.warning(
            f"torch.compile of the DHE head (mode {mode}) gives points {difference:.3g} px away from the eager "
            f"head's (tolerance {tolerance} px), running it eagerly"
        )
        return head
    logging.info(f"DHE head compiled with torch.compile (mode {mode}); points within {difference:.2g} px of eager")
    return compiled

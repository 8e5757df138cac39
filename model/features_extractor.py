"""The features extractor: CCT backbone (truncated, partly frozen) + GeM global descriptor + local feature maps."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.cct import CCT, load_pretrained_cct

__all__ = ["PATCH_SIZE", "FeaturesExtractor", "GeM", "L2Norm", "Flatten", "gem"]

PATCH_SIZE = 16
"""Pixels per token of the CCT-14/7x2 backbone (two stride-2 convolutions, each followed by a stride-2 pooling)."""


def gem(x: Tensor, p: Tensor | float = 3.0, eps: float = 1e-6) -> Tensor:
    """Generalised-mean pooling over the spatial grid: (B, C, h, w) -> (B, C, 1, 1)."""
    return F.avg_pool2d(x.clamp(min=eps).pow(p), (x.size(-2), x.size(-1))).pow(1.0 / p)


class GeM(nn.Module):
    """GeM pooling with a learnable exponent `p` (shape (1,), initialised to 3)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.ones(1) * p)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, h, w) -> (B, C, 1, 1)."""
        return gem(x, p=self.p, eps=self.eps)

    def extra_repr(self) -> str:
        return f"p={self.p.item():.4f}, eps={self.eps}"


class L2Norm(nn.Module):
    """L2-normalisation along `dim`."""

    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, p=2, dim=self.dim)


class Flatten(nn.Module):
    """(B, C, 1, 1) -> (B, C)."""

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2:] != (1, 1):
            raise ValueError(f"Flatten expects (B, C, 1, 1), got {tuple(x.shape)}")
        return x[:, :, 0, 0]


class FeaturesExtractor(nn.Module):
    """CCT-14/7x2 cut to `trunc_te` blocks (`encoder`), and L2 -> GeM -> flatten (`pool`) for global descriptors.

    Every backbone parameter is frozen except those of the blocks whose index is > `freeze_te`; GeM's p is trainable.

    Args:
        resize: (H, W) of the input images, each a multiple of 16. The local grid is (H / 16, W / 16).
        trunc_te: transformer blocks kept (0..14).
        freeze_te: blocks with index <= freeze_te stay frozen (-1: none).
        pretrained_cct: optional local file with ImageNet CCT-14/7x2 weights.
    """

    def __init__(
        self,
        resize: tuple[int, int] = (384, 384),
        trunc_te: int = 8,
        freeze_te: int = 5,
        pretrained_cct: str | Path | None = None,
    ) -> None:
        super().__init__()
        encoder = CCT(img_size=tuple(resize))
        if pretrained_cct is not None:
            load_pretrained_cct(encoder, pretrained_cct)
        encoder.truncate(trunc_te)
        for parameter in encoder.parameters():
            parameter.requires_grad = False
        for index, block in enumerate(encoder.classifier.blocks):
            if index > freeze_te:
                block.requires_grad_(True)
        self.encoder = encoder
        self.pool = nn.Sequential(L2Norm(), GeM(), Flatten())
        self.resize = encoder.img_size
        self.grid_size = encoder.grid_size
        self.patch_size = encoder.patch_size
        self.features_dim = encoder.embedding_dim

    def local_grid(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> unnormalised backbone feature grid (B, C, H/16, W/16)."""
        tokens = self.encoder.forward_features(images)
        height, width = (size // self.patch_size for size in images.shape[-2:])
        return tokens.transpose(1, 2).reshape(tokens.shape[0], self.features_dim, height, width)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 3, H, W) -> (global descriptors (B, C), L2-normalised local features (B, C, H/16, W/16)), C = 384.

        H, W are normally `resize`; another size (multiple of 16) gets a resized positional embedding.
        """
        grid = self.local_grid(images)
        return self.pool(grid), F.normalize(grid, p=2, dim=1)

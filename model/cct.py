"""CCT-14/7x2 (Compact Convolutional Transformer, Hassani et al. 2021), as the DHE-VPR backbone.

The module layout and parameter names are those of the original implementation (`tokenizer.conv_layers.*`,
`classifier.positional_emb`, `classifier.blocks.N.{pre_norm,self_attn,linear1,norm1,linear2}`, `classifier.norm`,
`classifier.attention_pool`), so its checkpoints load unchanged. Attention is timm's, whose `qkv`/`proj` names match.

Registered in timm: `timm.create_model("cct_14_7x2_384")`. Nothing is ever downloaded: ImageNet weights come from a
local file (`pretrained_path=`), see `load_pretrained_cct`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.layers import Attention, DropPath, trunc_normal_
from timm.models import register_model
from torch import Tensor, nn

__all__ = ["CCT", "cct_14_7x2_384", "load_pretrained_cct", "resize_positional_embedding"]


class Tokenizer(nn.Module):
    """Convolutional tokenizer: `n_conv_layers` x (conv k x k, stride s -> ReLU -> max-pool 3/2/1).

    (B, 3, H, W) -> (B, H/16 * W/16, embedding_dim) for CCT-14/7x2 (two layers, each dividing the size by 4).
    """

    def __init__(
        self,
        kernel_size: int = 7,
        n_conv_layers: int = 2,
        in_channels: int = 3,
        hidden_channels: int = 64,
        embedding_dim: int = 384,
    ) -> None:
        super().__init__()
        stride = max(1, kernel_size // 2 - 1)
        padding = max(1, kernel_size // 2)
        channels = [in_channels] + [hidden_channels] * (n_conv_layers - 1) + [embedding_dim]
        self.conv_layers = nn.Sequential(
            *[
                nn.Sequential(
                    nn.Conv2d(channels[i], channels[i + 1], kernel_size, stride=stride, padding=padding, bias=False),
                    nn.ReLU(),
                    nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
                )
                for i in range(n_conv_layers)
            ]
        )
        # Each layer divides the size by stride * 2 (conv then pool), exactly when the size is a multiple of it.
        self.reduction = (stride * 2) ** n_conv_layers
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight)

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> tokens (B, N, C), N in row-major order of the (H/16, W/16) grid."""
        return self.conv_layers(images).flatten(2).transpose(1, 2)


class TransformerBlock(nn.Module):
    """CCT's encoder block: x + attn(pre_norm(x)), then `norm1` on the stream, then + MLP (GELU)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_hidden_dim: int,
        attention_dropout: float = 0.1,
        dropout: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.pre_norm = nn.LayerNorm(dim)
        self.self_attn = Attention(
            dim, num_heads=num_heads, qkv_bias=False, attn_drop=attention_dropout, proj_drop=dropout
        )
        self.linear1 = nn.Linear(dim, mlp_hidden_dim)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.linear2 = nn.Linear(mlp_hidden_dim, dim)
        self.dropout2 = nn.Dropout(dropout)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """(B, N, C) -> (B, N, C)."""
        x = x + self.drop_path(self.self_attn(self.pre_norm(x)))
        x = self.norm1(x)
        x = x + self.drop_path(self.dropout2(self.linear2(self.dropout1(F.gelu(self.linear1(x))))))
        return x


class TransformerClassifier(nn.Module):
    """Positional embedding + transformer blocks + final LayerNorm (+ sequence pooling and `fc` when classifying)."""

    def __init__(
        self,
        sequence_length: int,
        embedding_dim: int = 384,
        num_layers: int = 14,
        num_heads: int = 6,
        mlp_ratio: float = 3.0,
        num_classes: int = 0,
        dropout: float = 0.0,
        attention_dropout: float = 0.1,
        stochastic_depth: float = 0.1,
    ) -> None:
        super().__init__()
        # Sequence pooling weights: part of every CCT checkpoint, used only for classification.
        self.attention_pool = nn.Linear(embedding_dim, 1)
        self.positional_emb = nn.Parameter(torch.zeros(1, sequence_length, embedding_dim))
        self.dropout = nn.Dropout(dropout)
        drop_path_rates = torch.linspace(0, stochastic_depth, num_layers).tolist()
        self.blocks = nn.ModuleList(
            [
                TransformerBlock(
                    embedding_dim,
                    num_heads,
                    int(embedding_dim * mlp_ratio),
                    attention_dropout=attention_dropout,
                    dropout=dropout,
                    drop_path=rate,
                )
                for rate in drop_path_rates
            ]
        )
        self.norm = nn.LayerNorm(embedding_dim)
        self.fc = nn.Linear(embedding_dim, num_classes) if num_classes > 0 else None
        self.apply(_init_weights)
        trunc_normal_(self.positional_emb, std=0.2)

    def forward_features(self, tokens: Tensor, positional_emb: Tensor | None = None) -> Tensor:
        """(B, N, C) -> normalised tokens (B, N, C); `positional_emb` (1, N, C) overrides the learned one."""
        x = self.dropout(tokens + (self.positional_emb if positional_emb is None else positional_emb))
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, tokens: Tensor) -> Tensor:
        """(B, N, C) -> logits (B, num_classes), or tokens (B, N, C) without a classifier head."""
        x = self.forward_features(tokens)
        if self.fc is None:
            return x
        pooled = (F.softmax(self.attention_pool(x), dim=1).transpose(1, 2) @ x).squeeze(1)
        return self.fc(pooled)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class CCT(nn.Module):
    """Compact Convolutional Transformer: `tokenizer` then `classifier`.

    Args:
        img_size: (H, W) of the input; the token grid is (H / 16, W / 16) for the 7x2 tokenizer.
        num_classes: 0 (default) gives a backbone whose `forward` returns tokens (B, N, embedding_dim).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = (384, 384),
        embedding_dim: int = 384,
        n_conv_layers: int = 2,
        kernel_size: int = 7,
        num_layers: int = 14,
        num_heads: int = 6,
        mlp_ratio: float = 3.0,
        num_classes: int = 0,
        dropout: float = 0.0,
        attention_dropout: float = 0.1,
        stochastic_depth: float = 0.1,
    ) -> None:
        super().__init__()
        self.tokenizer = Tokenizer(kernel_size, n_conv_layers, embedding_dim=embedding_dim)
        self.patch_size = self.tokenizer.reduction
        height, width = (img_size, img_size) if isinstance(img_size, int) else img_size
        if height % self.patch_size or width % self.patch_size or height <= 0 or width <= 0:
            raise ValueError(
                f"CCT img_size {tuple(img_size)}: each side must be a positive multiple of {self.patch_size}"
            )
        self.img_size = (height, width)
        self.grid_size = (height // self.patch_size, width // self.patch_size)
        self.embedding_dim = embedding_dim
        self.classifier = TransformerClassifier(
            self.grid_size[0] * self.grid_size[1],
            embedding_dim=embedding_dim,
            num_layers=num_layers,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            num_classes=num_classes,
            dropout=dropout,
            attention_dropout=attention_dropout,
            stochastic_depth=stochastic_depth,
        )

    def truncate(self, num_blocks: int) -> None:
        """Keep only the first `num_blocks` transformer blocks (the original's `--trunc_te`)."""
        if not 0 <= num_blocks <= len(self.classifier.blocks):
            raise ValueError(f"cannot keep {num_blocks} blocks of {len(self.classifier.blocks)}")
        self.classifier.blocks = nn.ModuleList(list(self.classifier.blocks)[:num_blocks])

    def forward_features(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> tokens (B, H/16 * W/16, embedding_dim), row-major over the grid.

        Images of another size than `img_size` (each side still a multiple of 16) get the positional embedding
        bilinearly resized to their grid, as when loading weights of another resolution.
        """
        height, width = images.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"CCT input of {height} x {width}: each side must be a multiple of {self.patch_size} "
                f"(built for {self.img_size})"
            )
        tokens = self.tokenizer(images)
        grid_size = (height // self.patch_size, width // self.patch_size)
        positional_emb = None
        if grid_size != self.grid_size:
            positional_emb = resize_positional_embedding(self.classifier.positional_emb, grid_size, self.grid_size)
        return self.classifier.forward_features(tokens, positional_emb)

    def forward(self, images: Tensor) -> Tensor:
        """Tokens (B, N, C) for a backbone (num_classes=0), logits (B, num_classes) otherwise."""
        if self.classifier.fc is None:
            return self.forward_features(images)
        return self.classifier(self.tokenizer(images))


def resize_positional_embedding(
    embedding: Tensor, grid_size: tuple[int, int], old_grid_size: tuple[int, int] | None = None
) -> Tensor:
    """Bilinearly resize a (1, h_old * w_old, C) positional embedding to (1, h * w, C).

    `old_grid_size` defaults to a square grid, as ImageNet checkpoints have.
    """
    _, num_tokens, channels = embedding.shape
    if old_grid_size is None:
        side = math.isqrt(num_tokens)
        old_grid_size = (side, side)
    if old_grid_size[0] * old_grid_size[1] != num_tokens:
        raise ValueError(f"positional embedding with {num_tokens} tokens is not a {old_grid_size} grid")
    grid = embedding.reshape(1, *old_grid_size, channels).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=grid_size, mode="bilinear", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, grid_size[0] * grid_size[1], channels)


def load_pretrained_cct(model: CCT, path: str | Path) -> None:
    """Load ImageNet CCT weights from a local file into `model`, strictly.

    The file may hold the state dict itself or wrap it in "state_dict"/"model". Blocks beyond the model's depth and the
    ImageNet `classifier.fc` are dropped when the model has none; the positional embedding is resized when the grid
    differs (as the original's `pe_check`). Any other difference raises, naming the keys.
    """
    from model.checkpoints import load_state_dict_file, strict_load

    state_dict = load_state_dict_file(path)
    for wrapper in ("state_dict", "model"):
        if wrapper in state_dict and isinstance(state_dict[wrapper], dict):
            state_dict = state_dict[wrapper]
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    own_keys = set(model.state_dict())
    dropped = [k for k in state_dict if k not in own_keys and (k.startswith("classifier.blocks.") or ".fc." in f".{k}")]
    for key in dropped:
        del state_dict[key]
    key = "classifier.positional_emb"
    if key in state_dict and state_dict[key].shape != model.classifier.positional_emb.shape:
        state_dict[key] = resize_positional_embedding(state_dict[key], model.grid_size)
    strict_load(model, state_dict, source=str(path))


@register_model
def cct_14_7x2_384(pretrained: bool = False, pretrained_path: str | Path | None = None, **kwargs) -> CCT:
    """CCT-14/7x2 at 384 x 384 (14 blocks, 6 heads, 384-d, MLP ratio 3), a backbone without classifier head.

    `pretrained=True` needs `pretrained_path`, a local file: nothing is downloaded.
    """
    for unused in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(unused, None)
    kwargs.setdefault("img_size", (384, 384))
    model = CCT(**kwargs)
    if pretrained and pretrained_path is None:
        raise ValueError("cct_14_7x2_384: pretrained=True needs pretrained_path= a local weights file (no downloads)")
    if pretrained_path is not None:
        load_pretrained_cct(model, pretrained_path)
    return model

"""Non-overlapping patch embedding: image -> token grid."""
from __future__ import annotations

import torch
from torch import nn


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """[B, C, H, W] -> tokens [B, (H/p)*(W/p), D] and the grid (H/p, W/p)."""
        if images.dim() != 4:
            raise ValueError(f"PatchEmbed: expected images [B, C, H, W], got shape {tuple(images.shape)}")
        height, width = images.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"PatchEmbed: image size {height}x{width} must be a multiple of the patch size {self.patch_size}")
        grid = self.proj(images)
        return grid.flatten(2).transpose(1, 2), (grid.shape[-2], grid.shape[-1])

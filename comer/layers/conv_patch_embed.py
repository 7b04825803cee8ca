"""Strided-conv patch embedding followed by a LayerNorm over the tokens (PVT v1 and v2)."""
from __future__ import annotations

import torch
from torch import nn

from .rel_pos_bias import Grid


class ConvPatchEmbed(nn.Module):
    """[B, C, H, W] -> conv (``proj``) -> tokens [B, h*w, D] (row-major) -> LayerNorm (``norm``), and (h, w).

    PVT v1: kernel = stride, no padding (non-overlapping patches). PVT v2: overlapping patches,
    kernel 7 / stride 4 or kernel 3 / stride 2, padding kernel // 2.
    """

    def __init__(self, in_channels: int, dim: int, kernel_size: int, stride: int, padding: int, norm_eps: float):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size, stride=stride, padding=padding)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Grid]:
        x = self.proj(x)
        grid = (x.shape[-2], x.shape[-1])
        return self.norm(x.flatten(2).transpose(1, 2)), grid

"""Conv2Former's convolutional modulation: a large-kernel depth-wise conv's output multiplies a linear value."""
from __future__ import annotations

import torch
from torch import nn

from .layer_norm_2d import LayerNorm2d


class ConvModulation(nn.Module):
    """``norm`` -> (``att``: 1x1 conv, GELU, depth-wise k x k conv) * ``v`` (1x1 conv) -> ``proj`` (1x1 conv),
    on [B, C, H, W] maps; the names are the official ones (``att.0``, ``att.2``)."""

    def __init__(self, dim: int, kernel_size: int, norm_eps: float):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"ConvModulation: kernel_size must be odd, got {kernel_size}")
        self.norm = LayerNorm2d(dim, eps=norm_eps)
        self.att = nn.Sequential(
            nn.Conv2d(dim, dim, 1),
            nn.GELU(),
            nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim),
        )
        self.v = nn.Conv2d(dim, dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return self.proj(self.att(x) * self.v(x))

"""ConvFFN: Linear -> depth-wise 3x3 conv on every level (one shared conv) -> act -> Linear."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .level_layout import LevelLayout


class ConvFFN(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, kernel_size: int = 3,
                 act_layer: Callable[[], nn.Module] = nn.GELU):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"ConvFFN: kernel_size must be odd, got {kernel_size}")
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.dwconv = nn.Conv2d(hidden_dim, hidden_dim, kernel_size, padding=kernel_size // 2, groups=hidden_dim)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor, layout: LevelLayout) -> torch.Tensor:
        """x [B, S, D] laid out by `layout` -> [B, S, D]."""
        hidden = self.fc1(x)
        hidden = layout.from_maps([self.dwconv(level) for level in layout.to_maps(hidden)])
        return self.fc2(self.act(hidden))

"""The feed-forward of a PVT block, with PVT v2's depth-wise conv over the token grid as an option."""
from __future__ import annotations

import torch
from torch import nn

from .rel_pos_bias import Grid


class PVTMlp(nn.Module):
    """``fc1`` -> [ReLU] -> [depth-wise k x k ``dwconv`` over the token grid] -> GELU -> ``fc2``.

    PVT v1: no conv (dw_kernel_size None). PVT v2: the "convolutional feed-forward" (dw_kernel_size 3).
    PVT v2-li: a ReLU after fc1 as well (relu_after_fc1).
    """

    def __init__(self, dim: int, hidden_dim: int, dw_kernel_size: int | None, relu_after_fc1: bool):
        super().__init__()
        if dw_kernel_size is not None and dw_kernel_size % 2 == 0:
            raise ValueError(f"PVTMlp: dw_kernel_size must be odd, got {dw_kernel_size}")
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.relu = nn.ReLU() if relu_after_fc1 else None
        self.dwconv = (nn.Conv2d(hidden_dim, hidden_dim, dw_kernel_size, padding=dw_kernel_size // 2,
                                 groups=hidden_dim) if dw_kernel_size is not None else None)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        """x [B, h*w, D] (row-major grid) -> [B, h*w, D]."""
        x = self.fc1(x)
        if self.relu is not None:
            x = self.relu(x)
        if self.dwconv is not None:
            maps = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *grid)
            x = self.dwconv(maps).flatten(2).transpose(1, 2)
        return self.fc2(self.act(x))

"""Conv2Former's feed-forward: 1x1 convs around a residual depth-wise conv ("pos")."""
from __future__ import annotations

import torch
from torch import nn

from .layer_norm_2d import LayerNorm2d


class Conv2FormerMlp(nn.Module):
    """``norm`` -> ``fc1`` (1x1) -> GELU -> h + GELU(``pos``(h)) (depth-wise k x k) -> ``fc2`` (1x1), on
    [B, C, H, W] maps."""

    def __init__(self, dim: int, hidden_dim: int, pos_kernel_size: int, norm_eps: float):
        super().__init__()
        if pos_kernel_size % 2 == 0:
            raise ValueError(f"Conv2FormerMlp: pos_kernel_size must be odd, got {pos_kernel_size}")
        self.norm = LayerNorm2d(dim, eps=norm_eps)
        self.fc1 = nn.Conv2d(dim, hidden_dim, 1)
        self.pos = nn.Conv2d(hidden_dim, hidden_dim, pos_kernel_size, padding=pos_kernel_size // 2, groups=hidden_dim)
        self.fc2 = nn.Conv2d(hidden_dim, dim, 1)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.act(self.fc1(self.norm(x)))
        hidden = hidden + self.act(self.pos(hidden))
        return self.fc2(hidden)

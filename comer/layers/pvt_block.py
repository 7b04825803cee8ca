"""A PVT transformer block: pre-norm spatial-reduction attention and feed-forward, each residual."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .drop_path import DropPath
from .pvt_mlp import PVTMlp
from .rel_pos_bias import Grid
from .spatial_reduction_attention import SpatialReductionAttention


class PVTBlock(nn.Module):
    """x + drop_path(attn(norm1(x))), then x + drop_path(mlp(norm2(x))); ``attn`` and ``mlp`` come built."""

    def __init__(self, dim: int, attn: SpatialReductionAttention, mlp: PVTMlp, drop_path: float, norm_eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = attn
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = mlp
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), grid))
        return x + self.drop_path(self.mlp(self.norm2(x), grid))


def build_pvt_blocks(dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, sr_ratio: int | None,
                     pool_size: int | None, dw_kernel_size: int | None, relu_after_fc1: bool,
                     drop_path: Sequence[float], norm_eps: float, reduction_norm_eps: float) -> list[PVTBlock]:
    """One stage's blocks, one per entry of ``drop_path`` (the stage's stochastic-depth rates)."""
    return [
        PVTBlock(dim,
                 SpatialReductionAttention(dim, num_heads, qkv_bias, sr_ratio, pool_size, reduction_norm_eps),
                 PVTMlp(dim, int(dim * mlp_ratio), dw_kernel_size, relu_after_fc1),
                 rate, norm_eps)
        for rate in drop_path
    ]

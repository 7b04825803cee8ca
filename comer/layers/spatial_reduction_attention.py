"""PVT's spatial-reduction attention (SRA): every token queries keys and values of a reduced grid."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .rel_pos_bias import Grid


class SpatialReductionAttention(nn.Module):
    """Multi-head attention with ``q``, ``kv`` and ``proj`` as in the official PVT code.

    Keys and values come from the token grid reduced by exactly one of:
      * ``sr_ratio`` r (PVT v1/v2): a k = s = r conv ``sr`` then LayerNorm ``norm``; r = 1 is plain
        global attention (no reduction modules);
      * ``pool_size`` p (PVT v2 "linear SRA", b2-li): adaptive average pool to p x p (``pool``), 1x1 conv
        ``sr``, LayerNorm ``norm``, GELU ``act``: a fixed p*p keys whatever the input size.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, sr_ratio: int | None, pool_size: int | None,
                 norm_eps: float):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"SpatialReductionAttention: dim {dim} must be divisible by num_heads {num_heads}")
        if (sr_ratio is None) == (pool_size is None):
            raise ValueError(f"SpatialReductionAttention: give exactly one of sr_ratio or pool_size, got "
                             f"sr_ratio={sr_ratio}, pool_size={pool_size}")
        if (sr_ratio if pool_size is None else pool_size) < 1:
            raise ValueError(f"SpatialReductionAttention: sr_ratio / pool_size must be >= 1, got "
                             f"sr_ratio={sr_ratio}, pool_size={pool_size}")
        self.num_heads = num_heads
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.pool = nn.AdaptiveAvgPool2d(pool_size) if pool_size is not None else None
        reduces = pool_size is not None or sr_ratio > 1
        reduction_kernel = 1 if pool_size is not None else sr_ratio
        self.sr = nn.Conv2d(dim, dim, reduction_kernel, stride=reduction_kernel) if reduces else None
        self.norm = nn.LayerNorm(dim, eps=norm_eps) if reduces else None
        self.act = nn.GELU() if pool_size is not None else None

    def reduce(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        """Tokens [B, h*w, D] -> the key/value tokens [B, n, D]."""
        if self.sr is None:
            return x
        height, width = grid
        if self.pool is None and (height % self.sr_ratio or width % self.sr_ratio):
            raise ValueError(f"SpatialReductionAttention: grid {height}x{width} is not divisible by sr_ratio "
                             f"{self.sr_ratio}")
        maps = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], height, width)
        if self.pool is not None:
            maps = self.pool(maps)
        reduced = self.norm(self.sr(maps).flatten(2).transpose(1, 2))
        return self.act(reduced) if self.act is not None else reduced

    def forward(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        """x [B, h*w, D] (row-major grid) -> [B, h*w, D]."""
        batch, tokens, dim = x.shape
        head_dim = dim // self.num_heads
        q = self.q(x).view(batch, tokens, self.num_heads, head_dim).transpose(1, 2)
        kv = self.kv(self.reduce(x, grid)).view(batch, -1, 2, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, kv[0], kv[1])
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))

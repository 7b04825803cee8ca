"""Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .attention import Attention
from .drop_path import DropPath
from .layer_scale import LayerScale
from .mlp import Mlp
from .rel_pos_bias import Grid, RelativePositionBias


class Block(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        qkv_bias: bool,
        drop_path: float,
        layer_scale_init: float | None,
        norm_layer: Callable[[int], nn.Module],
        act_layer: Callable[[], nn.Module] = nn.GELU,
        window_size: int | None = None,
        window_mask_padding: bool = False,
        rel_pos_grid: Grid | None = None,
    ):
        """layer_scale_init None: no layer scale (no `ls1/ls2` parameters). rel_pos_grid: the block's own
        relative position bias table, learned on that grid (see Attention)."""
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, window_size=window_size,
                              mask_padding=window_mask_padding, rel_pos_grid=rel_pos_grid)
        self.ls1 = nn.Identity() if layer_scale_init is None else LayerScale(dim, layer_scale_init)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer)
        self.ls2 = nn.Identity() if layer_scale_init is None else LayerScale(dim, layer_scale_init)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, grid_size: tuple[int, int],
                shared_rel_pos: RelativePositionBias | None = None) -> torch.Tensor:
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x), grid_size, shared_rel_pos)))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))

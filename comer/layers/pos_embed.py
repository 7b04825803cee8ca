"""Absolute position embeddings: resize a square pretraining grid to another grid."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def resize_pos_embed(
    pos_embed: torch.Tensor,
    grid_size: tuple[int, int],
    num_prefix_tokens: int = 1,
) -> torch.Tensor:
    """Resize [1, P + G*G, D] (P prefix tokens such as the class token, then a square G x G grid in
    row-major order) to [1, P + h*w, D] for grid_size (h, w).

    Prefix tokens are kept untouched; the grid is resized bicubically with align_corners=False.
    An unchanged grid is returned as is (bicubic resampling at scale 1 is the identity anyway).
    """
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"resize_pos_embed: expected pos_embed [1, N, D], got {tuple(pos_embed.shape)}")
    num_grid = pos_embed.shape[1] - num_prefix_tokens
    side = math.isqrt(max(num_grid, 0))
    if num_grid <= 0 or side * side != num_grid:
        raise ValueError(
            f"resize_pos_embed: {pos_embed.shape[1]} tokens minus {num_prefix_tokens} prefix tokens is not a square "
            f"grid")
    height, width = grid_size
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    if (height, width) != (side, side):
        dim = grid.shape[-1]
        grid = grid.reshape(1, side, side, dim).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=False)
        grid = grid.flatten(2).transpose(1, 2)
    return torch.cat([prefix, grid], dim=1)

"""Multi-scale deformable attention module (Deformable DETR) over a LevelLayout sequence."""
from __future__ import annotations

import math

import torch
from torch import nn

from comer.kernels import ms_deform_attn

from .level_layout import LevelLayout


class MSDeformAttn(nn.Module):
    """Each query samples `num_points` locations per head and level around its reference point.

    value_proj maps the value input to dim * value_ratio channels split into num_heads heads;
    sampling_offsets gives pixel offsets (normalised by each level's width/height);
    attention_weights are a softmax over levels * points; output_proj maps back to dim.
    """

    def __init__(self, dim: int, num_heads: int, num_levels: int, num_points: int, value_ratio: float = 1.0):
        super().__init__()
        value_dim = int(dim * value_ratio)
        if value_dim % num_heads:
            raise ValueError(
                f"MSDeformAttn: dim * value_ratio = {dim} * {value_ratio} = {value_dim} must be divisible by "
                f"num_heads {num_heads}")
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.sampling_offsets = nn.Linear(dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(dim, value_dim)
        self.output_proj = nn.Linear(value_dim, dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Offsets start on a circle per head (direction 2*pi*h/M, scaled to the unit square and by the
        point index 1..P); attention weights start uniform (zero logits)."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        directions = torch.stack([angles.cos(), angles.sin()], dim=-1)
        directions = directions / directions.abs().max(dim=-1, keepdim=True).values
        scales = torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        bias = directions.view(self.num_heads, 1, 1, 2).expand(-1, self.num_levels, self.num_points, -1) * scales
        self.sampling_offsets.bias.copy_(bias.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query: torch.Tensor, value_input: torch.Tensor, layout: LevelLayout,
                reference_points: torch.Tensor) -> torch.Tensor:
        """query [B, Lq, D], value_input [B, S, D] laid out by `layout`, reference_points
        [1 or B, Lq, 1, 2] normalised (x, y) -> [B, Lq, D]."""
        if layout.num_levels != self.num_levels:
            raise ValueError(f"MSDeformAttn: built for {self.num_levels} levels, layout has {layout.num_levels}")
        layout.check(value_input)
        batch, num_queries, _ = query.shape
        value = self.value_proj(value_input).view(batch, value_input.shape[1], self.num_heads, -1)
        offsets = self.sampling_offsets(query).view(
            batch, num_queries, self.num_heads, self.num_levels, self.num_points, 2)
        weights = self.attention_weights(query).view(batch, num_queries, self.num_heads, -1).softmax(-1)
        weights = weights.view(batch, num_queries, self.num_heads, self.num_levels, self.num_points)
        normalizer = layout.offset_normalizer(offsets.dtype)[None, None, None, :, None, :]
        locations = reference_points[:, :, None, :, None, :] + offsets / normalizer
        out = ms_deform_attn(value, layout.spatial_shapes, layout.level_start_index, locations, weights)
        return self.output_proj(out)

"""Pure-PyTorch multi-scale deformable attention: the reference every kernel is tested against.

Shapes (N batch, S value tokens over all levels, M heads, D head dim, Lq queries, L levels, P points):
    value               [N, S, M, D]
    spatial_shapes      [L, 2] int64, (H, W) per level, sum(H * W) == S
    level_start_index   [L]    int64, offset of each level in the S axis
    sampling_locations  [N, Lq, M, L, P, 2] in [0, 1], (x, y), align_corners=False convention
    attention_weights   [N, Lq, M, L, P]
    returns             [N, Lq, M * D]
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .validation import check_inputs


def ms_deform_attn_reference(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    batch, _, heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    level_sizes = [int(h) * int(w) for h, w in spatial_shapes.tolist()]
    values_per_level = value.split(level_sizes, dim=1)
    # grid_sample wants coordinates in [-1, 1]; with align_corners=False, -1 is the left edge
    # of the first pixel, so x_pixel = loc * W - 0.5 as in Deformable DETR.
    grids = 2 * sampling_locations - 1
    # [N, Lq, M, L, P] -> [N*M, 1, Lq, L, P]
    weights = attention_weights.transpose(1, 2).reshape(batch * heads, 1, num_queries, num_levels, num_points)
    output = None
    for level, (height, width) in enumerate(spatial_shapes.tolist()):
        # [N, H*W, M, D] -> [N*M, D, H, W]
        level_value = values_per_level[level].flatten(2).transpose(1, 2).reshape(batch * heads, head_dim, height, width)
        # [N, Lq, M, P, 2] -> [N*M, Lq, P, 2]
        level_grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled = F.grid_sample(level_value, level_grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        # [N*M, D, Lq, P] weighted over the points; levels accumulate without materialising all of them.
        contribution = (sampled * weights[:, :, :, level]).sum(-1)  # [N*M, D, Lq]
        output = contribution if output is None else output + contribution
    return output.view(batch, heads * head_dim, num_queries).transpose(1, 2).contiguous()

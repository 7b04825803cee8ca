"""Tensor adaptations between a checkpoint and the target model: position grid and patch kernel."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from comer.layers.pos_embed import resize_pos_embed


class CheckpointShapeError(ValueError):
    pass


def _grid_side(tokens: int, prefix: int, key: str) -> int:
    side = math.isqrt(max(tokens - prefix, 0))
    if tokens - prefix <= 0 or side * side != tokens - prefix:
        raise CheckpointShapeError(
            f"{key}: {tokens} tokens minus {prefix} prefix tokens is not a square position grid")
    return side


def adapt_pos_embed(source: torch.Tensor, target_shape: torch.Size, source_prefix: int, key: str) -> torch.Tensor:
    """[1, P + G*G, D] (P = source prefix tokens) -> target [1, 1 + g*g, D]: keep one class slot
    (the first prefix token, zeros when the source has none), resize the grid bicubically."""
    if source.dim() != 3 or len(target_shape) != 3 or source.shape[-1] != target_shape[-1]:
        raise CheckpointShapeError(f"{key}: checkpoint shape {tuple(source.shape)} does not fit the model's "
                                   f"{tuple(target_shape)}")
    _grid_side(source.shape[1], source_prefix, key)
    target_side = _grid_side(target_shape[1], 1, f"{key} (model)")
    class_slot = source[:, :1] if source_prefix else source.new_zeros(1, 1, source.shape[-1])
    grid = source[:, source_prefix:]
    return resize_pos_embed(torch.cat([class_slot, grid], dim=1), (target_side, target_side), num_prefix_tokens=1)


def adapt_patch_kernel(source: torch.Tensor, target_shape: torch.Size, key: str) -> torch.Tensor:
    """Patch-embedding kernel [D, C, k, k] -> [D, C, K, K] by bicubic resampling of the kernel
    (DINOv2: patch 14 -> 16)."""
    if source.dim() != 4 or source.shape[:2] != target_shape[:2]:
        raise CheckpointShapeError(f"{key}: checkpoint shape {tuple(source.shape)} does not fit the model's "
                                   f"{tuple(target_shape)}")
    return F.interpolate(source, size=tuple(target_shape[-2:]), mode="bicubic", align_corners=False)

"""MRFP (multi-receptive-field feature pyramid): Linear -> per level, grouped depth-wise convs with one
kernel size per channel group, BatchNorm, act -> act -> Linear. It replaces its input (no residual)."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from .level_layout import LevelLayout


def check_kernel_groups(hidden_dim: int, kernel_sizes: Sequence[int]) -> None:
    if not kernel_sizes:
        raise ValueError("MRFP: kernel_sizes must name at least one kernel size")
    even = [k for k in kernel_sizes if k < 1 or k % 2 == 0]
    if even:
        raise ValueError(f"MRFP: kernel_sizes must be positive odd ints (same-size padding), got {list(kernel_sizes)}")
    groups = len(kernel_sizes)
    if groups > hidden_dim:
        raise ValueError(f"MRFP: {groups} kernel groups {list(kernel_sizes)} but only {hidden_dim} hidden channels; "
                         f"allowed: at most one group per channel")
    if hidden_dim % groups:
        raise ValueError(f"MRFP: hidden channels {hidden_dim} must be divisible by the number of kernel groups "
                         f"{groups} (kernel_sizes {list(kernel_sizes)})")


class MRFP(nn.Module):
    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        kernel_sizes: Sequence[int] = (3, 5),
        num_levels: int = 3,
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
        act_layer: Callable[[], nn.Module] = nn.GELU,
    ):
        super().__init__()
        check_kernel_groups(hidden_dim, kernel_sizes)
        self.group_dim = hidden_dim // len(kernel_sizes)
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.dwconvs = nn.ModuleList(
            nn.ModuleList(
                nn.Conv2d(self.group_dim, self.group_dim, k, padding=k // 2, groups=self.group_dim)
                for k in kernel_sizes)
            for _ in range(num_levels))
        self.norms = nn.ModuleList(norm_layer(hidden_dim) for _ in range(num_levels))
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor, layout: LevelLayout) -> torch.Tensor:
        """x [B, S, D] laid out by `layout` -> [B, S, D]."""
        if layout.num_levels != len(self.norms):
            raise ValueError(f"MRFP: built for {len(self.norms)} levels, layout has {layout.num_levels}")
        maps = layout.to_maps(self.fc1(x))
        out = []
        for level_map, convs, norm in zip(maps, self.dwconvs, self.norms):
            groups = level_map.split(self.group_dim, dim=1)
            mixed = torch.cat([conv(group) for conv, group in zip(convs, groups)], dim=1)
            out.append(self.act(norm(mixed)))
        # The official code applies the activation a second time after the per-level one; kept for
        # parity with released weights.
        return self.fc2(self.act(layout.from_maps(out)))

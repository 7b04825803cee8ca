"""What the four-level hierarchical backbones (PVT v1/v2, Conv2Former) share: the input check, per-stage
setting checks, the stages' stochastic-depth rates and downsampling factors."""
from __future__ import annotations

from typing import Sequence

import torch

from .drop_path import drop_path_rates

IMAGE_CHANNELS = 3  # RGB input


def check_pyramid_input(images: torch.Tensor, size_divisor: int, owner: str, channels: int = IMAGE_CHANNELS) -> None:
    """Images must be [B, channels, H, W] with H and W multiples of ``size_divisor`` (the coarsest output
    stride), so that every level is an exact downsampling of the one before."""
    if images.dim() != 4 or images.shape[1] != channels:
        raise ValueError(f"{owner}: expected images [B, {channels}, H, W], got shape {tuple(images.shape)}")
    height, width = images.shape[-2:]
    if height % size_divisor or width % size_divisor:
        raise ValueError(f"{owner}: image size {height}x{width} is not allowed: both sides must be multiples of "
                         f"{size_divisor}")


def check_stage_lists(owner: str, num_stages: int, **lists: Sequence) -> None:
    """Every per-stage setting must have ``num_stages`` entries."""
    wrong = {name: list(values) for name, values in lists.items() if len(values) != num_stages}
    if wrong:
        raise ValueError(f"{owner}: per-stage settings need {num_stages} entries (one per output level), got {wrong}")


def stage_drop_path_rates(drop_path_rate: float, depths: Sequence[int]) -> list[list[float]]:
    """The linear stochastic-depth rule over all blocks (0 .. drop_path_rate), cut into the stages' runs."""
    rates = drop_path_rates(drop_path_rate, sum(depths))
    starts = [sum(depths[:i]) for i in range(len(depths))]
    return [rates[start:start + depth] for start, depth in zip(starts, depths)]


def stage_downsampling(strides: Sequence[int]) -> list[int]:
    """Each stage's downsampling of the previous stage's map (of the image for the first), e.g. output strides
    4, 8, 16, 32 -> 4, 2, 2, 2."""
    return [stride // previous for previous, stride in zip([1, *strides[:-1]], strides)]

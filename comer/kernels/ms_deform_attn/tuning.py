"""Launch parameters of the Triton kernels, per padded head dim (kept apart from the kernel code).

The channel block is the head dim rounded up to a power of two (96 -> 128, masked). The query block
and warp counts are starting points sized so one program holds the 4 corner tiles of BLOCK_Q x
BLOCK_D fp32 values in registers; re-tune them with benchmarks/ms_deform_attn.py on the target GPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import triton


@dataclass(frozen=True)
class LaunchConfig:
    block_q: int  # queries per program
    num_warps: int
    num_stages: int


# padded head dim -> (forward, backward) launch configs
_TABLE: dict[int, tuple[LaunchConfig, LaunchConfig]] = {
    16: (LaunchConfig(128, 4, 2), LaunchConfig(64, 4, 2)),
    32: (LaunchConfig(64, 4, 2), LaunchConfig(32, 4, 2)),
    64: (LaunchConfig(32, 4, 2), LaunchConfig(32, 4, 2)),
    128: (LaunchConfig(32, 8, 2), LaunchConfig(16, 8, 2)),
    256: (LaunchConfig(16, 8, 2), LaunchConfig(8, 8, 2)),
}
MIN_BLOCK_D = min(_TABLE)
MAX_HEAD_DIM = max(_TABLE)


def channel_block(head_dim: int) -> int:
    """Head dim padded to the power-of-two channel block the kernels use."""
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"ms_deform_attn (triton): head dim {head_dim} not supported; allowed 1..{MAX_HEAD_DIM}")
    return max(MIN_BLOCK_D, triton.next_power_of_2(head_dim))


def launch_configs(head_dim: int) -> tuple[LaunchConfig, LaunchConfig]:
    """(forward, backward) launch configs for this head dim."""
    return _TABLE[channel_block(head_dim)]

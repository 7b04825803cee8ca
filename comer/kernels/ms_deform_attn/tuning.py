"""Launch parameters of the Triton kernels, per padded head dim (kept apart from the kernel code).

The channel block is the head dim rounded up to a power of two (96 -> 128, masked). One program holds
four BLOCK_Q x BLOCK_D corner tiles; the table gives each thread ELEMENTS_PER_THREAD values of a tile
(BLOCK_Q = ELEMENTS_PER_THREAD * 32 * num_warps / BLOCK_D). That rule comes from compiling the kernels for
sm_90 on a machine without a GPU (benchmarks/kernel_resources.py --sweep, static register counts): at 8
values per thread neither kernel spills in bf16, fp16 or fp32 and an SM keeps 16 (backward) to 36
(forward) warps resident; at 16 the backward needs 168 registers (12 warps), at 32 it spills. num_stages
left every compiled kernel unchanged in that sweep, so it stays 1. Speed was not measured: re-tune on the
target GPU with benchmarks/tune_ms_deform_attn.py and replace these entries with its output.
"""
from __future__ import annotations

from dataclasses import dataclass

import triton


@dataclass(frozen=True)
class LaunchConfig:
    block_q: int  # queries per program
    num_warps: int
    num_stages: int


ELEMENTS_PER_THREAD = 8
THREADS_PER_WARP = 32
NUM_WARPS = 4
NUM_STAGES = 1


def _rule(block_d: int, num_warps: int = NUM_WARPS) -> LaunchConfig:
    return LaunchConfig(ELEMENTS_PER_THREAD * THREADS_PER_WARP * num_warps // block_d, num_warps, NUM_STAGES)


# padded head dim -> (forward, backward) launch configs
_TABLE: dict[int, tuple[LaunchConfig, LaunchConfig]] = {
    16: (_rule(16), _rule(16)),
    32: (_rule(32), _rule(32)),
    64: (_rule(64), _rule(64)),
    128: (_rule(128), _rule(128)),
    256: (_rule(256, num_warps=8), _rule(256, num_warps=8)),
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

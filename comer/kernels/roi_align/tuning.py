"""Launch parameters of the RoIAlign Triton kernels (kept apart from the kernel code).

One program handles one output row (RoI k, bin row ph): BLOCK_W >= ow bins (the output width rounded
up to a power of two, masked) by BLOCK_C channels. As in ms_deform_attn's table, a tile gives each
thread ELEMENTS_PER_THREAD values, so BLOCK_C = ELEMENTS_PER_THREAD * 32 * num_warps / BLOCK_W, capped by
the channels (7x7 bins, 256 channels: 8 x 128 tiles, two channel blocks per row; 14x14: 16 x 64).
Neither speed nor register use has been measured (no GPU yet): re-tune on the target GPU with
benchmarks/roi_ops.py and replace this rule with a measured table.
"""
from __future__ import annotations

from dataclasses import dataclass

import triton


@dataclass(frozen=True)
class LaunchConfig:
    block_w: int  # output columns per program (>= ow, a power of two)
    block_c: int  # channels per program
    num_warps: int


ELEMENTS_PER_THREAD = 8
THREADS_PER_WARP = 32
NUM_WARPS = 4
MIN_BLOCK_C = 16
MAX_OUTPUT_WIDTH = 256  # wider outputs would need tiles over BLOCK_W as well


def launch_config(output_w: int, channels: int) -> LaunchConfig:
    """The launch config for an output row of output_w bins over `channels` channels."""
    if not 1 <= output_w <= MAX_OUTPUT_WIDTH:
        raise ValueError(f"roi_align (triton): output width {output_w} not supported; allowed 1..{MAX_OUTPUT_WIDTH}")
    block_w = triton.next_power_of_2(output_w)
    per_program = ELEMENTS_PER_THREAD * THREADS_PER_WARP * NUM_WARPS
    block_c = min(triton.next_power_of_2(max(channels, 1)), max(MIN_BLOCK_C, per_program // block_w))
    return LaunchConfig(block_w, block_c, NUM_WARPS)

"""Registers, register spills and register-limited occupancy of the Triton kernels, compiled for a GPU
target on this machine (no GPU needed: Triton ships ptxas and cuobjdump).

These are static compile facts, not speed: they show whether a launch config spills registers and how
many warps an SM can keep resident for it, which is what hides the latency of the kernels' gathers.

    python benchmarks/kernel_resources.py                   # tuned configs, ViT-CoMer 512² shapes, sm_90
    python benchmarks/kernel_resources.py --sweep           # every candidate config (bf16), to choose from
    python benchmarks/kernel_resources.py --fail-on-spill   # exit 1 if a tuned config spills
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("benchmarks/kernel_resources.py compiles real kernels: unset TRITON_INTERPRET")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from ms_deform_attn import make_inputs  # noqa: E402
from tune_ms_deform_attn import HEADS_BY_HEAD_DIM, candidates, tuning_shape  # noqa: E402

from comer.kernels.ms_deform_attn import triton_kernels  # noqa: E402
from comer.kernels.ms_deform_attn.static_compile import compile_launch, resource_usage  # noqa: E402

REGISTERS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
REGISTER_ALLOCATION_UNIT = 256  # registers are given to a warp in blocks of this many
VALUE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resident_warps(registers: int, num_warps: int) -> int:
    """Warps an SM keeps resident when registers are the only limit."""
    unit = REGISTER_ALLOCATION_UNIT
    per_warp = -(-registers * 32 // unit) * unit
    blocks = REGISTERS_PER_SM // (per_warp * num_warps)
    return min(MAX_WARPS_PER_SM, blocks * num_warps)


def launches(head_dim: int, value_dtype: torch.dtype, config=None):
    """(kernel name, KernelLaunch) for the forward and backward at the 512² shape of this head dim. Locations
    and weights are fp32, as under autocast."""
    shape = tuning_shape(head_dim)
    value, spatial_shapes, level_start_index, locations, weights = make_inputs(shape, value_dtype,
                                                                               torch.device("cpu"))
    locations, weights = locations.float(), weights.float()
    output = value.new_empty(shape.batch, shape.num_queries, shape.heads * head_dim)
    grad_value = torch.zeros(value.shape, dtype=torch.float32)
    forward = triton_kernels.forward_launch(value, spatial_shapes, level_start_index, locations, weights, output,
                                            config=config)
    backward = triton_kernels.backward_launch(output, value, spatial_shapes, level_start_index, locations, weights,
                                              grad_value, torch.empty_like(locations), torch.empty_like(weights),
                                              config=config)
    return [("forward", forward), ("backward", backward)]


def report_row(kernel: str, head_dim: int, dtype: str, launch, arch: int) -> tuple[str, bool]:
    usage = resource_usage(compile_launch(launch, arch))
    options = launch.options
    warps = resident_warps(usage.registers, options["num_warps"])
    row = (f"| {kernel} | {HEADS_BY_HEAD_DIM[head_dim]}x{head_dim} | {dtype} | {options['BLOCK_Q']} "
           f"| {options['num_warps']} | {options['num_stages']} | {usage.registers} | {usage.stack_bytes} "
           f"| {usage.spill_store_bytes}/{usage.spill_load_bytes} | {warps} |")
    return row, usage.spills


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (80: A100, 90: H100/H200)")
    parser.add_argument("--sweep", action="store_true", help="every candidate config of the tuning sweep, bf16")
    parser.add_argument("--head-dims", type=int, nargs="+", default=sorted(HEADS_BY_HEAD_DIM),
                        choices=sorted(HEADS_BY_HEAD_DIM))
    parser.add_argument("--fail-on-spill", action="store_true", help="exit 1 if a reported config spills")
    args = parser.parse_args(argv)

    print(f"### ms_deform_attn kernels compiled for sm_{args.arch} (static: registers, not speed)\n")
    print("| kernel | heads x dim | value dtype | block_q | warps | stages | registers | stack bytes "
          "| spill stores/loads bytes | resident warps/SM |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    spilled = []
    for head_dim in args.head_dims:
        if args.sweep:
            jobs = [(kernel, "bf16", launch) for config in candidates(head_dim, smoke=False)
                    for kernel, launch in launches(head_dim, torch.bfloat16, config)]
        else:
            jobs = [(kernel, name, launch) for name, dtype in VALUE_DTYPES.items()
                    for kernel, launch in launches(head_dim, dtype)]
        for kernel, dtype, launch in jobs:
            row, spills = report_row(kernel, head_dim, dtype, launch, args.arch)
            print(row, flush=True)
            if spills:
                spilled.append(row)
    if spilled and args.fail_on_spill:
        sys.exit("register spills in:\n" + "\n".join(spilled))


if __name__ == "__main__":
    main()

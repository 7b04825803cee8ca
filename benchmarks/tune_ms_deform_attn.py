"""Sweep the Triton kernels' launch parameters on this GPU and print the fastest per padded head dim.

For each channel block the ViT-CoMer variants use (32: T and B, 64: S, 128: head dims 96 and 128) the
forward and the backward kernel run at the 512x512 3-level shape (batch 2, levels 64², 32², 16², 4 points,
heads x head dim 12x32, 6x64, 3x128) over query block x warps, leaving out the configs that spill. A
configuration whose results differ from the current table's is reported as wrong and never chosen. The
output is a Markdown table and, last, the `_TABLE` entries for comer/kernels/ms_deform_attn/tuning.py.

    python benchmarks/tune_ms_deform_attn.py --dtype bf16    # CUDA; minutes (one compile per config)
    python benchmarks/tune_ms_deform_attn.py --cpu-smoke     # tiny sweep in the Triton interpreter
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if "--cpu-smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from ms_deform_attn import DTYPES, LEVEL_STRIDES, POINTS, Shape, make_inputs  # noqa: E402

from comer.kernels.ms_deform_attn import triton_kernels  # noqa: E402
from comer.kernels.ms_deform_attn.tuning import LaunchConfig, channel_block, launch_configs  # noqa: E402

IMAGE_SIZE = 512
BATCH = 2
HEADS_BY_HEAD_DIM = {32: 12, 64: 6, 128: 3}  # 384 value channels, as ViT-CoMer-S/B
BLOCK_Q = (8, 16, 32, 64, 128)
NUM_WARPS = (2, 4, 8)
NUM_STAGES = (1,)  # 2 compiled to the same kernels (kernel_resources.py --sweep)
MAX_ELEMENTS_PER_THREAD = 16  # of one BLOCK_Q x BLOCK_D tile; above it the backward spills (kernel_resources.py)
THREADS_PER_WARP = 32


def tuning_shape(head_dim: int) -> Shape:
    levels = tuple((IMAGE_SIZE // s, IMAGE_SIZE // s) for s in LEVEL_STRIDES)
    heads = HEADS_BY_HEAD_DIM[head_dim]
    return Shape(f"{heads}x{head_dim} {IMAGE_SIZE}² 3-level", BATCH, heads, head_dim, levels, levels, POINTS)


def smoke_shape(head_dim: int) -> Shape:
    levels = ((4, 4), (2, 2), (1, 1))
    return Shape(f"smoke 2x{head_dim}", 1, 2, head_dim, levels, levels, 2)


def candidates(head_dim: int, smoke: bool) -> list[LaunchConfig]:
    if smoke:
        return [LaunchConfig(16, 4, 1), LaunchConfig(32, 4, 1)]
    block_d = channel_block(head_dim)
    return [LaunchConfig(q, w, s) for q in BLOCK_Q for w in NUM_WARPS for s in NUM_STAGES
            if q * block_d <= MAX_ELEMENTS_PER_THREAD * THREADS_PER_WARP * w]


def median_ms(fn, device: torch.device) -> float:
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, return_mode="median")
    begin = time.perf_counter()
    fn()
    return (time.perf_counter() - begin) * 1e3


def matches(actual, expected, dtype: torch.dtype) -> bool:
    # grad_value sums with atomics in a run-dependent order: allow the rounding of the output dtype.
    tolerance = 1e-5 if dtype in (torch.float32, torch.float64) else 2e-2
    return all(torch.allclose(a.float(), e.float(), atol=tolerance, rtol=tolerance) for a, e in zip(actual, expected))


def sweep(kernel: str, head_dim: int, shape: Shape, dtype: torch.dtype, device: torch.device, smoke: bool):
    """[(config, ms or None when wrong)] for one kernel ("forward" / "backward") and head dim."""
    value, spatial_shapes, level_start_index, locations, weights = make_inputs(shape, dtype, device)
    locations, weights = locations.float(), weights.float()  # as under autocast: fp32 from the projections
    grad_output = torch.randn(shape.batch, shape.num_queries, shape.heads * head_dim, device=device, dtype=dtype)
    if kernel == "forward":
        def run(config):
            return (triton_kernels.ms_deform_attn_forward(value, spatial_shapes, level_start_index, locations, weights,
                                                          config=config),)
    else:
        def run(config):
            return triton_kernels.ms_deform_attn_backward(grad_output, value, spatial_shapes, level_start_index,
                                                          locations, weights, config=config)
    expected = run(None)
    results = []
    for config in candidates(head_dim, smoke):
        correct = matches(run(config), expected, dtype)
        results.append((config, median_ms(lambda: run(config), device) if correct else None))
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="two configs, tiny shapes, Triton interpreter")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--head-dims", type=int, nargs="+", default=sorted(HEADS_BY_HEAD_DIM),
                        choices=sorted(HEADS_BY_HEAD_DIM))
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        device, dtype, shape_for = torch.device("cpu"), torch.float32, smoke_shape
        header = "CPU smoke run (Triton interpreter): NOT a benchmark"
    else:
        if not torch.cuda.is_available():
            sys.exit("benchmarks/tune_ms_deform_attn.py needs a CUDA GPU (use --cpu-smoke for a tiny CPU check)")
        device, dtype, shape_for = torch.device("cuda"), DTYPES[args.dtype], tuning_shape
        header = f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.dtype}"

    best: dict[int, dict[str, LaunchConfig]] = {}
    print(f"### ms_deform_attn launch configs — {header}\n")
    print("| kernel | shape | block_q | warps | stages | median ms | current |")
    print("|---|---|---|---|---|---|---|")
    for head_dim in args.head_dims:
        shape = shape_for(head_dim)
        for index, kernel in enumerate(("forward", "backward")):
            current = launch_configs(head_dim)[index]
            results = sweep(kernel, head_dim, shape, dtype, device, args.cpu_smoke)
            for config, ms in results:
                timing = "wrong result" if ms is None else f"{ms:.3f}"
                print(f"| {kernel} | {shape.name} | {config.block_q} | {config.num_warps} | {config.num_stages} "
                      f"| {timing} | {'yes' if config == current else ''} |", flush=True)
            timed = [(ms, config) for config, ms in results if ms is not None]
            if timed:
                best.setdefault(channel_block(head_dim), {})[kernel] = min(timed, key=lambda t: t[0])[1]
    print("\nFastest per channel block, for `_TABLE` in comer/kernels/ms_deform_attn/tuning.py:\n")
    for block_d, kernels in sorted(best.items()):
        if set(kernels) != {"forward", "backward"}:
            print(f"    # {block_d}: no correct configuration for {sorted({'forward', 'backward'} - set(kernels))}")
            continue
        configs = ", ".join(f"LaunchConfig{(c.block_q, c.num_warps, c.num_stages)}"
                            for c in (kernels["forward"], kernels["backward"]))
        print(f"    {block_d}: ({configs}),")


if __name__ == "__main__":
    main()

"""Benchmark multi-scale deformable attention: Triton vs reference vs torch.compile(reference).

Forward and forward+backward median time (CUDA events) and peak extra memory over the inputs, on the
shapes ViT-CoMer runs (batch 2, 3 levels at 1/8, 1/16, 1/32, 4 points):
    512x512   -> levels 64x64, 32x32, 16x16 (S = 5376)    1024x1024 -> 128x128, 64x64, 32x32 (S = 21504)
    heads x head dim: T 6x32, S 6x64, B 12x32 (deform heads, D * deform ratio / heads)
    "3-level": CTI-to-ViT and the CNN-side self-attention: queries = all S tokens, values = all 3 levels.
    "1-level": the official code also builds a 1-level input (deform_inputs2): values = the ViT map at
               1/16 only, queries = the 3-level tokens (Lq = S). The segmentation CTI-to-CNN of the
               official code adds x into the 1/16 part directly and does not attend with it; ViT-Adapter
               style extractors do, so it is measured for completeness.

    python benchmarks/ms_deform_attn.py                 # on a CUDA machine, prints a Markdown table
    python benchmarks/ms_deform_attn.py --cpu-smoke     # tiny end-to-end check on CPU (Triton interpreter)
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if "--cpu-smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from comer.kernels import ms_deform_attn_reference, ms_deform_attn_triton  # noqa: E402

VARIANTS = {"T": (6, 32), "S": (6, 64), "B": (12, 32)}  # name -> (deform heads, head dim)
IMAGE_SIZES = (512, 1024)
LEVEL_STRIDES = (8, 16, 32)
SINGLE_LEVEL_STRIDE = 16
POINTS = 4
BATCH = 2
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    heads: int
    head_dim: int
    query_levels: tuple[tuple[int, int], ...]  # queries sit on these maps (Lq = sum of sizes)
    value_levels: tuple[tuple[int, int], ...]
    points: int

    @property
    def num_queries(self) -> int:
        return sum(h * w for h, w in self.query_levels)


def real_shapes() -> list[Shape]:
    shapes = []
    for size in IMAGE_SIZES:
        levels = tuple((size // s, size // s) for s in LEVEL_STRIDES)
        single = ((size // SINGLE_LEVEL_STRIDE, size // SINGLE_LEVEL_STRIDE),)
        for variant, (heads, head_dim) in VARIANTS.items():
            shapes.append(Shape(f"{variant} {size}² 3-level", BATCH, heads, head_dim, levels, levels, POINTS))
            shapes.append(Shape(f"{variant} {size}² 1-level", BATCH, heads, head_dim, levels, single, POINTS))
    return shapes


def smoke_shapes() -> list[Shape]:
    levels = ((4, 4), (2, 2), (1, 1))
    return [Shape("smoke 3-level", 1, 2, 32, levels, levels, 2), Shape("smoke 1-level", 1, 2, 32, levels, ((2, 2),), 2)]


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device):
    spatial_shapes = torch.tensor(shape.value_levels, dtype=torch.int64, device=device)
    sizes = spatial_shapes.prod(1)
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    tokens, levels = int(sizes.sum()), len(shape.value_levels)
    lq = shape.num_queries
    value = torch.randn(shape.batch, tokens, shape.heads, shape.head_dim, device=device, dtype=dtype)
    # reference points at pixel centres plus small offsets, as MSDeformAttn produces
    locations = (torch.rand(shape.batch, lq, shape.heads, levels, shape.points, 2, device=device) * 1.1 - 0.05)
    weights = torch.rand(shape.batch, lq, shape.heads, levels * shape.points, device=device).softmax(-1)
    weights = weights.view(shape.batch, lq, shape.heads, levels, shape.points)
    return value, spatial_shapes, level_start_index, locations.to(dtype), weights.to(dtype)


def measure(fn, device: torch.device, warmup: int, iters: int) -> float:
    """Median milliseconds of fn()."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def peak_memory_mib(fn, device: torch.device) -> float:
    """Peak memory allocated by fn() above what was allocated before (NaN on CPU)."""
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def bench_one(impl, inputs, device, warmup, iters):
    value, spatial_shapes, level_start_index, locations, weights = inputs
    grad_inputs = [t.detach().clone().requires_grad_() for t in (value, locations, weights)]

    def forward():
        with torch.no_grad():
            return impl(value, spatial_shapes, level_start_index, locations, weights)

    def forward_backward():
        out = impl(grad_inputs[0], spatial_shapes, level_start_index, grad_inputs[1], grad_inputs[2])
        torch.autograd.grad(out, grad_inputs, torch.ones_like(out))

    return (measure(forward, device, warmup, iters), measure(forward_backward, device, warmup, iters),
            peak_memory_mib(forward, device), peak_memory_mib(forward_backward, device))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU, to check the script runs")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--impls", nargs="+", default=["triton", "reference", "compiled_reference"],
                        choices=["triton", "reference", "compiled_reference"])
    args = parser.parse_args(argv)

    if args.cpu_smoke:
        device, shapes, dtype, warmup, iters = torch.device("cpu"), smoke_shapes(), torch.float32, 0, 1
        impls = [i for i in args.impls if i != "compiled_reference"]  # inductor needs a C++ toolchain
        header = "CPU smoke run (Triton interpreter): NOT a benchmark"
    else:
        if not torch.cuda.is_available():
            sys.exit("benchmarks/ms_deform_attn.py needs a CUDA GPU (use --cpu-smoke for a tiny CPU check)")
        device, shapes, dtype = torch.device("cuda"), real_shapes(), DTYPES[args.dtype]
        warmup, iters, impls = args.warmup, args.iters, args.impls
        header = f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.dtype}"

    functions = {"triton": ms_deform_attn_triton, "reference": ms_deform_attn_reference,
                 "compiled_reference": torch.compile(ms_deform_attn_reference)}
    print(f"### ms_deform_attn — {header}\n")
    print("| shape | heads x dim | Lq | S | impl | fwd ms | fwd+bwd ms | fwd peak MiB | fwd+bwd peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shape in shapes:
        inputs = make_inputs(shape, dtype, device)
        for name in impls:
            fwd, fwd_bwd, mem_fwd, mem_fwd_bwd = bench_one(functions[name], inputs, device, warmup, iters)
            print(f"| {shape.name} | {shape.heads}x{shape.head_dim} | {shape.num_queries} | {inputs[0].shape[1]} "
                  f"| {name} | {fwd:.3f} | {fwd_bwd:.3f} | {mem_fwd:.1f} | {mem_fwd_bwd:.1f} |", flush=True)
        del inputs
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

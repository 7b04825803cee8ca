"""Whole comer_s backbone forward+backward with each deformable-attention path.

512x512 images, batch 8, bf16 autocast (as in training); for each implementation selected through
`comer.kernels.set_ms_deform_attn_impl`: median step time (CUDA events) and peak memory.

    python benchmarks/backbone_attention_paths.py                # CUDA only, prints a Markdown table
    python benchmarks/backbone_attention_paths.py --cpu-smoke    # tiny image, batch 1, on CPU (slow)
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

if "--cpu-smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from comer.kernels import set_ms_deform_attn_impl  # noqa: E402

IMPLS = ("triton", "reference")


def build_backbone(name: str) -> torch.nn.Module:
    try:
        from comer import build_backbone as build
    except ImportError as error:
        sys.exit(f"comer.build_backbone is not available yet ({error}); it is needed to build {name!r}")
    return build(name)


def step_time_and_memory(model, images, device, warmup, iters):
    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            features = model(images)
        loss = sum(f.float().mean() for f in features.values())
        loss.backward()

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            step()
            times.append((time.perf_counter() - begin) * 1e3)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    return statistics.median(times), peak


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="64x64 image, batch 1, one step on CPU")
    parser.add_argument("--backbone", default="comer_s")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=None,
                        help="default: all on CUDA; only the reference in --cpu-smoke (the interpreter takes minutes)")
    args = parser.parse_args(argv)

    if args.cpu_smoke:
        device, batch, size, warmup, iters = torch.device("cpu"), 1, 64, 0, 1
        header = "CPU smoke run: NOT a benchmark"
        impls = args.impls or ["reference"]
    else:
        if not torch.cuda.is_available():
            sys.exit("benchmarks/backbone_attention_paths.py needs a CUDA GPU (use --cpu-smoke for a tiny CPU check)")
        device, batch, size, warmup, iters = torch.device("cuda"), args.batch, args.size, args.warmup, args.iters
        header = f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16 autocast"
        impls = args.impls or list(IMPLS)

    model = build_backbone(args.backbone).to(device).train()
    images = torch.randn(batch, 3, size, size, device=device)
    print(f"### {args.backbone} forward+backward, {batch}x3x{size}x{size} — {header}\n")
    print("| attention path | step ms | peak MiB |")
    print("|---|---|---|")
    try:
        for impl in impls:
            set_ms_deform_attn_impl(impl)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            ms, peak = step_time_and_memory(model, images, device, warmup, iters)
            model.zero_grad(set_to_none=True)
            print(f"| {impl} | {ms:.1f} | {peak:.0f} |", flush=True)
    finally:
        set_ms_deform_attn_impl(None)


if __name__ == "__main__":
    main()

"""Whole comer_s backbone (or backbone + UperNet) forward+backward with each deformable-attention path.

512x512 images, batch 8, bf16 autocast (as in training); for each implementation selected through
`comer.kernels.set_ms_deform_attn_impl`: median step time (CUDA events), images/s and peak memory.

    python benchmarks/backbone_attention_paths.py                  # CUDA only, prints a Markdown table
    python benchmarks/backbone_attention_paths.py --with-heads     # + UperNet 512 and the FCN aux head,
                                                                   #   150 classes, cross-entropy loss
    python benchmarks/backbone_attention_paths.py --cpu-smoke      # tiny images, batch 2, on CPU
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


def build_segmentor(backbone: torch.nn.Module, num_classes: int) -> torch.nn.Module:
    """The ADE20K model of the paper: UperNet (512 channels) + auxiliary FCN head (256) on the backbone."""
    from functools import partial

    from comer.heads import FCNHead, UPerHead
    from comer.models import build_segmentor as build

    return build(backbone, partial(UPerHead, channels=512), partial(FCNHead, channels=256), num_classes=num_classes)


def backbone_loss(model, images, labels):
    return sum(f.float().mean() for f in model(images).values())


def segmentor_loss(model, images, labels):
    return sum(model.loss(images, labels).values())


def step_time_and_memory(model, loss_fn, images, labels, device, warmup, iters):
    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = loss_fn(model, images, labels)
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
    parser.add_argument("--cpu-smoke", action="store_true", help="64x64 images, batch 2, one step on CPU")
    parser.add_argument("--backbone", default="comer_s")
    parser.add_argument("--with-heads", action="store_true", help="UperNet + FCN aux head and their loss")
    parser.add_argument("--num-classes", type=int, default=150)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=None,
                        help="default: all on CUDA; only the reference in --cpu-smoke (the interpreter takes minutes)")
    args = parser.parse_args(argv)

    if args.cpu_smoke:
        device, batch, size, warmup, iters = torch.device("cpu"), 2, 64, 0, 1  # batch 2: BatchNorm in the PPM
        header = "CPU smoke run: NOT a benchmark"
        impls = args.impls or ["reference"]
    else:
        if not torch.cuda.is_available():
            sys.exit("benchmarks/backbone_attention_paths.py needs a CUDA GPU (use --cpu-smoke for a tiny CPU check)")
        device, batch, size, warmup, iters = torch.device("cuda"), args.batch, args.size, args.warmup, args.iters
        header = f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16 autocast"
        impls = args.impls or list(IMPLS)

    model = build_backbone(args.backbone)
    loss_fn = backbone_loss
    if args.with_heads:
        model, loss_fn = build_segmentor(model, args.num_classes), segmentor_loss
    model = model.to(device).train()
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, args.num_classes, (batch, size, size), device=device)
    what = f"{args.backbone} + UperNet" if args.with_heads else args.backbone
    print(f"### {what} forward+backward, {batch}x3x{size}x{size} — {header}\n")
    print("| attention path | step ms | images/s | peak MiB |")
    print("|---|---|---|---|")
    try:
        for impl in impls:
            set_ms_deform_attn_impl(impl)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            ms, peak = step_time_and_memory(model, loss_fn, images, labels, device, warmup, iters)
            model.zero_grad(set_to_none=True)
            print(f"| {impl} | {ms:.1f} | {batch / (ms / 1e3):.1f} | {peak:.0f} |", flush=True)
    finally:
        set_ms_deform_attn_impl(None)


if __name__ == "__main__":
    main()

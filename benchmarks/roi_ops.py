"""Benchmark the detection ops: NMS (vectorised PyTorch) and RoIAlign (Triton vs reference).

NMS: 1k / 5k / 20k random boxes in a 1333x800 image (sides 8-300 px), IoU threshold 0.7 as the RPN uses;
`nms` and `batched_nms` over 80 classes. Median time (CUDA events), peak memory above the inputs, boxes
kept. There is no Triton NMS (see comer/kernels/nms.py): these rows decide whether one is worth writing.

RoIAlign: 512 RoIs x 256 channels at 7x7 (box head) and 14x14 (mask head), on an FPN P2-sized map
(batch 2, 256x256, stride 4 of a 1024x1024 image), boxes of 16-112 image pixels (the sizes mmdet's
level mapping sends to P2: 4-28 map pixels, 1-4 adaptive samples per bin side), sampling_ratio 0,
aligned=True. Forward and forward+backward median time and peak memory above the inputs, per
implementation, and the Triton output's largest difference from the reference's.

    python benchmarks/roi_ops.py                  # on a CUDA machine, prints Markdown tables
    python benchmarks/roi_ops.py --dtype fp32     # RoIAlign input dtype (default bf16)
    python benchmarks/roi_ops.py --cpu-smoke      # tiny end-to-end check on CPU (Triton interpreter)
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

SMOKE_FLAGS = ("--cpu-smoke", "--smoke")
if any(flag in sys.argv for flag in SMOKE_FLAGS):
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from comer.kernels import batched_nms, nms, roi_align_reference, roi_align_triton  # noqa: E402
from ms_deform_attn import measure, peak_memory_mib  # noqa: E402  (this folder: the shared timing helpers)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NMS_IOU_THRESHOLD = 0.7
NMS_NUM_CLASSES = 80
IMAGE_SIZE = (1333, 800)  # (w, h)
BOX_SIDES = (8.0, 300.0)


@dataclass(frozen=True)
class NmsShape:
    name: str
    num_boxes: int
    image_size: tuple[int, int]  # (w, h) the boxes are spread over


@dataclass(frozen=True)
class RoiShape:
    name: str
    batch: int
    channels: int
    height: int
    width: int
    num_rois: int
    output_size: int
    spatial_scale: float
    box_sides: tuple[float, float]  # in image pixels


def real_shapes() -> tuple[list[NmsShape], list[RoiShape]]:
    nms_shapes = [NmsShape(f"{n // 1000}k boxes", n, IMAGE_SIZE) for n in (1000, 5000, 20000)]
    roi_shapes = [RoiShape(f"512 RoIs {s}x{s}", 2, 256, 256, 256, 512, s, 0.25, (16.0, 112.0)) for s in (7, 14)]
    return nms_shapes, roi_shapes


def smoke_shapes() -> tuple[list[NmsShape], list[RoiShape]]:
    nms_shapes = [NmsShape(f"smoke {n} boxes", n, (300, 300)) for n in (50, 200)]  # crowded: some suppressed
    roi_shapes = [RoiShape(f"smoke {s}x{s}", 1, 4, 6, 6, 2, s, 0.5, (2.0, 8.0)) for s in (2, 3)]
    return nms_shapes, roi_shapes


def random_boxes(num: int, width: float, height: float, sides: tuple[float, float], generator: torch.Generator,
                 device: torch.device) -> torch.Tensor:
    """[num, 4] boxes with sides uniform in `sides`, their top-left corners uniform in the image."""
    low, high = sides
    wh = low + (high - low) * torch.rand(num, 2, generator=generator)
    xy = torch.rand(num, 2, generator=generator) * (torch.tensor([width, height]) - wh).clamp(min=0)
    return torch.cat([xy, xy + wh], dim=1).to(device)


def bench_nms(shape: NmsShape, device: torch.device, warmup: int, iters: int) -> list[tuple[str, float, float, int]]:
    generator = torch.Generator().manual_seed(0)
    boxes = random_boxes(shape.num_boxes, *shape.image_size, BOX_SIDES, generator, device)
    scores = torch.rand(shape.num_boxes, generator=generator).to(device)
    labels = torch.randint(NMS_NUM_CLASSES, (shape.num_boxes,), generator=generator).to(device)
    runs = {"nms": lambda: nms(boxes, scores, NMS_IOU_THRESHOLD),
            f"batched_nms {NMS_NUM_CLASSES} classes": lambda: batched_nms(boxes, scores, labels, NMS_IOU_THRESHOLD)}
    return [(name, measure(fn, device, warmup, iters), peak_memory_mib(fn, device), len(fn()))
            for name, fn in runs.items()]


def make_roi_inputs(shape: RoiShape, dtype: torch.dtype, device: torch.device):
    generator = torch.Generator().manual_seed(0)
    input = torch.randn(shape.batch, shape.channels, shape.height, shape.width, generator=generator).to(device, dtype)
    image_w, image_h = shape.width / shape.spatial_scale, shape.height / shape.spatial_scale
    boxes = random_boxes(shape.num_rois, image_w, image_h, shape.box_sides, generator, device)
    batch_index = torch.randint(shape.batch, (shape.num_rois, 1), generator=generator).to(device, boxes.dtype)
    return input, torch.cat([batch_index, boxes], dim=1)


def bench_roi_align(fn, input, rois, shape: RoiShape, device, warmup, iters):
    kwargs = dict(output_size=shape.output_size, spatial_scale=shape.spatial_scale, sampling_ratio=0, aligned=True)
    grad_input = input.detach().clone().requires_grad_()

    def forward():
        with torch.no_grad():
            return fn(input, rois, **kwargs)

    def forward_backward():
        out = fn(grad_input, rois, **kwargs)
        torch.autograd.grad(out, grad_input, torch.ones_like(out))

    return (measure(forward, device, warmup, iters), measure(forward_backward, device, warmup, iters),
            peak_memory_mib(forward, device), peak_memory_mib(forward_backward, device), forward())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(*SMOKE_FLAGS, dest="cpu_smoke", action="store_true",
                        help="tiny shapes on CPU, to check the script runs")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="RoIAlign input dtype")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--impls", nargs="+", default=["triton", "reference"], choices=["triton", "reference"])
    args = parser.parse_args(argv)

    if args.cpu_smoke:
        device, dtype, warmup, iters = torch.device("cpu"), torch.float32, 0, 1
        nms_shapes, roi_shapes = smoke_shapes()
        header = "CPU smoke run (Triton interpreter): NOT a benchmark"
    else:
        if not torch.cuda.is_available():
            sys.exit("benchmarks/roi_ops.py needs a CUDA GPU (use --cpu-smoke for a tiny CPU check)")
        device, dtype, warmup, iters = torch.device("cuda"), DTYPES[args.dtype], args.warmup, args.iters
        nms_shapes, roi_shapes = real_shapes()
        header = f"{torch.cuda.get_device_name()}, torch {torch.__version__}"

    print(f"### nms — {header}\n")
    print("| boxes | op | ms | peak MiB | kept |")
    print("|---|---|---|---|---|")
    for shape in nms_shapes:
        for name, ms, mib, kept in bench_nms(shape, device, warmup, iters):
            print(f"| {shape.name} | {name} | {ms:.3f} | {mib:.1f} | {kept} |", flush=True)

    print(f"\n### roi_align — {header}, {'fp32' if args.cpu_smoke else args.dtype}\n")
    print("| shape | map | impl | fwd ms | fwd+bwd ms | fwd peak MiB | fwd+bwd peak MiB | max abs diff vs reference |")
    print("|---|---|---|---|---|---|---|---|")
    functions = {"triton": roi_align_triton, "reference": roi_align_reference}
    for shape in roi_shapes:
        input, rois = make_roi_inputs(shape, dtype, device)
        reference = roi_align_reference(input, rois, shape.output_size, shape.spatial_scale, 0, True)  # yardstick
        for name in args.impls:
            fwd, fwd_bwd, mem_fwd, mem_fwd_bwd, output = bench_roi_align(functions[name], input, rois, shape, device,
                                                                         warmup, iters)
            diff = "-" if name == "reference" else f"{(output.float() - reference.float()).abs().max().item():.2e}"
            print(f"| {shape.name} | {shape.batch}x{shape.channels}x{shape.height}x{shape.width} | {name} | {fwd:.3f} "
                  f"| {fwd_bwd:.3f} | {mem_fwd:.1f} | {mem_fwd_bwd:.1f} | {diff} |", flush=True)
        del input, rois, reference, output
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

"""Mask R-CNN training step (forward + backward) split by component: backbone, FPN, RPN, RoI heads, losses.

comer_s_det Mask R-CNN (80 classes), 1024x1024 images (the recipe's training crop), batch 2, bf16 autocast,
synthetic annotations (--objects boxes with rectangular masks per image). Each component runs on detached
copies of its inputs so its forward and its backward are timed (CUDA events) and its peak memory measured
on their own:

- backbone: ViT-CoMer forward / backward;
- FPN: the neck;
- RPN: head convs and proposal generation (top-k, decode, NMS; no gradient);
- RoI heads: proposal-to-gt assignment and sampling, RoI pooling, box and mask heads;
- losses: RPN anchor assignment, sampling and losses; box and mask targets and losses.

Peak memory is the most allocated above what was live when the component started (its inputs, the
activations the earlier components keep). "whole step" is the undivided model: forward, loss, backward.

    python benchmarks/mask_rcnn.py                 # CUDA only, prints a Markdown table
    python benchmarks/mask_rcnn.py --size 800 --batch 4 --backbone comer_b_det
    python benchmarks/mask_rcnn.py --cpu-smoke     # tiny model, 64x64 images, one step on CPU
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

if "--cpu-smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

COMPONENTS = ("backbone", "FPN", "RPN", "RoI heads", "losses")
LOSS_PREFIX = "loss_"
# --cpu-smoke: a 4-block ViT-CoMer and narrow heads, so one CPU step takes seconds.
SMOKE_BACKBONE = dict(embed_dim=48, depth=4, num_heads=3, deform_num_heads=3, window_block_indexes=[0, 2])
SMOKE_HEADS = dict(neck={"out_channels": 64}, rpn_head={"feat_channels": 64},
                   roi_head={"bbox_head": {"fc_out_channels": 256}, "mask_head": {"conv_out_channels": 64},
                             "sampler": {"num": 64}})
MIN_OBJECT_FRACTION, MAX_OBJECT_FRACTION = 0.05, 0.5  # synthetic box sides, relative to the image side


def build_model(backbone: str, num_classes: int, smoke: bool) -> torch.nn.Module:
    from omegaconf import OmegaConf

    from comer import build_backbone
    from comer.models import detector_config, instantiate_detector

    config = detector_config(num_classes)
    if smoke:
        config = OmegaConf.merge(config, SMOKE_HEADS)
    return instantiate_detector(config, build_backbone(backbone, **(SMOKE_BACKBONE if smoke else {})))


def synthetic_batch(batch: int, size: int, objects: int, num_classes: int, device, seed: int = 0):
    """Random images and per image ``objects`` boxes with rectangular masks (the box filled)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=g)
    boxes, labels, masks = [], [], []
    for _ in range(batch):
        sides = size * (MIN_OBJECT_FRACTION + (MAX_OBJECT_FRACTION - MIN_OBJECT_FRACTION) * torch.rand(objects, 2, generator=g))
        corners = (size - sides) * torch.rand(objects, 2, generator=g)
        image_boxes = torch.cat([corners, corners + sides], dim=1).floor()
        image_masks = torch.zeros(objects, size, size, dtype=torch.bool)
        for k, (x1, y1, x2, y2) in enumerate(image_boxes.long().tolist()):
            image_masks[k, y1:y2, x1:x2] = True
        boxes.append(image_boxes.to(device))
        labels.append(torch.randint(0, num_classes, (objects,), generator=g).to(device))
        masks.append(image_masks.to(device))
    return images.to(device), [(size, size)] * batch, boxes, labels, masks


class Clock:
    """Wall time (CUDA events on a GPU) and peak memory above the start of a call."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn):
        if not self.cuda:
            begin = time.perf_counter()
            result = fn()
            return result, (time.perf_counter() - begin) * 1e3, float("nan")
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = fn()
        end.record()
        torch.cuda.synchronize()
        return result, start.elapsed_time(end), (torch.cuda.max_memory_allocated() - base) / 2**20


def leaves(tensors):
    return [t.detach().requires_grad_() for t in tensors]


def backward_into(outputs, inputs) -> None:
    """Backpropagate the gradients the next component left on ``inputs`` (detached copies of ``outputs``)."""
    pairs = [(o, i.grad) for o, i in zip(outputs, inputs) if i.grad is not None]
    torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])


def staged_step(model, batch, clock: Clock, autocast, generator) -> dict[str, tuple[float, float, float]]:
    """One training step, component by component: {component: (forward ms, backward ms, peak MiB)}."""
    from comer.heads.standard_roi_head import RoIHeadOutputs

    images, sizes, boxes, labels, masks = batch
    pad_sizes = [model.pad_size(s) for s in sizes]
    rpn_head, roi_head = model.rpn_head, model.roi_head

    def run(fn):
        with autocast():
            return fn()

    feats, t_backbone, m_backbone = clock(lambda: run(lambda: model.backbone(images)))
    names = list(feats)
    feats_in = dict(zip(names, leaves(feats.values())))
    pyramid, t_fpn, m_fpn = clock(lambda: run(lambda: list(model.neck(feats_in).values())))
    pyramid_in = leaves(pyramid)

    def rpn():
        cls_scores, bbox_preds = rpn_head(pyramid_in)
        return cls_scores, bbox_preds, rpn_head.predict_proposals(cls_scores, bbox_preds, sizes, training=True)

    (cls_scores, bbox_preds, proposals), t_rpn, m_rpn = clock(lambda: run(rpn))
    cls_in, box_in = leaves(cls_scores), leaves(bbox_preds)

    def roi():
        sampling = roi_head.sample(proposals, boxes, labels, generator)
        return sampling, roi_head.forward_train(pyramid_in, sampling)

    (sampling, outputs), t_roi, m_roi = clock(lambda: run(roi))
    outputs_in = RoIHeadOutputs(*leaves([outputs.cls_score, outputs.bbox_pred, outputs.mask_logits]))

    def losses():
        values = rpn_head.loss(cls_in, box_in, boxes, sizes, generator=generator, pad_sizes=pad_sizes)
        values.update(roi_head.loss_from_outputs(outputs_in, sampling, masks))
        return sum(v for k, v in values.items() if k.startswith(LOSS_PREFIX))

    total, t_loss, m_loss = clock(lambda: run(losses))
    # backward, last component first; each hands the gradients of its inputs to the one before
    _, b_loss, mb_loss = clock(lambda: total.backward())
    roi_outputs = [outputs.cls_score, outputs.bbox_pred, outputs.mask_logits]
    _, b_roi, mb_roi = clock(lambda: backward_into(roi_outputs, [outputs_in.cls_score, outputs_in.bbox_pred,
                                                                 outputs_in.mask_logits]))
    _, b_rpn, mb_rpn = clock(lambda: backward_into(cls_scores + bbox_preds, cls_in + box_in))
    _, b_fpn, mb_fpn = clock(lambda: backward_into(pyramid, pyramid_in))
    _, b_backbone, mb_backbone = clock(lambda: backward_into([feats[n] for n in names], [feats_in[n] for n in names]))
    return {
        "backbone": (t_backbone, b_backbone, max(m_backbone, mb_backbone)),
        "FPN": (t_fpn, b_fpn, max(m_fpn, mb_fpn)),
        "RPN": (t_rpn, b_rpn, max(m_rpn, mb_rpn)),
        "RoI heads": (t_roi, b_roi, max(m_roi, mb_roi)),
        "losses": (t_loss, b_loss, max(m_loss, mb_loss)),
    }


def whole_step(model, batch, clock: Clock, autocast, generator) -> tuple[float, float]:
    def step():
        with autocast():
            losses = model(*batch, generator=generator)
        sum(v for k, v in losses.items() if k.startswith(LOSS_PREFIX)).backward()

    _, ms, peak = clock(step)
    return ms, peak


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model, 64x64 images, batch 2, one step on CPU")
    parser.add_argument("--backbone", default="comer_s_det")
    parser.add_argument("--num-classes", type=int, default=80)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--objects", type=int, default=10, help="synthetic objects per image")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args(argv)

    if args.cpu_smoke:
        device, batch, size, objects, warmup, iters = torch.device("cpu"), 2, 64, 3, 0, 1
        header = "CPU smoke run: NOT a benchmark"
        autocast = nullcontext
    else:
        if not torch.cuda.is_available():
            sys.exit("benchmarks/mask_rcnn.py needs a CUDA GPU (use --cpu-smoke for a tiny CPU check)")
        device, batch, size, objects = torch.device("cuda"), args.batch, args.size, args.objects
        warmup, iters = args.warmup, args.iters
        header = f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16 autocast"

        def autocast():
            return torch.autocast("cuda", dtype=torch.bfloat16)

    model = build_model(args.backbone, args.num_classes, args.cpu_smoke).to(device).train()
    data = synthetic_batch(batch, size, objects, args.num_classes, device)
    clock = Clock(device)
    generator = torch.Generator(device=device).manual_seed(0)
    runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name in COMPONENTS}
    wholes = []
    for i in range(warmup + iters):
        staged = staged_step(model, data, clock, autocast, generator)
        model.zero_grad(set_to_none=True)
        whole = whole_step(model, data, clock, autocast, generator)
        model.zero_grad(set_to_none=True)
        if i >= warmup:
            for name in COMPONENTS:
                runs[name].append(staged[name])
            wholes.append(whole)

    def median(values):
        return statistics.median(values)

    def mib(value: float) -> str:
        return "n/a" if math.isnan(value) else f"{value:.0f}"  # no CUDA allocator statistics on the CPU

    print(f"### {args.backbone} Mask R-CNN training step, {batch}x3x{size}x{size}, {objects} objects/image, "
          f"{args.num_classes} classes — {header}\n")
    print("| component | forward ms | backward ms | fwd+bwd ms | peak MiB |")
    print("|---|---|---|---|---|")
    sums = [0.0, 0.0]
    for name in COMPONENTS:
        forward, backward = median([r[0] for r in runs[name]]), median([r[1] for r in runs[name]])
        peak = max(r[2] for r in runs[name])
        sums[0] += forward
        sums[1] += backward
        print(f"| {name} | {forward:.1f} | {backward:.1f} | {forward + backward:.1f} | {mib(peak)} |")
    print(f"| sum of components | {sums[0]:.1f} | {sums[1]:.1f} | {sums[0] + sums[1]:.1f} | |")
    step_ms, step_peak = median([w[0] for w in wholes]), max(w[1] for w in wholes)
    print(f"| whole step | | | {step_ms:.1f} | {mib(step_peak)} |", flush=True)


if __name__ == "__main__":
    main()

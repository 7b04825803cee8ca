"""RoIAlign: public entry points, the Triton path and its reference (torchvision's `roi_align` semantics).

    roi_align            dispatches (CUDA -> Triton, CPU -> reference; see dispatch.py for the switch)
    roi_align_triton     always the Triton kernels (CPU tensors work under TRITON_INTERPRET=1)
    roi_align_reference  pure PyTorch

All three take input [B, C, H, W], boxes as a [K, 5] tensor (batch index, x1, y1, x2, y2) or a list of B
per-image [L_i, 4] tensors (x1, y1, x2, y2), output_size (an int or (h, w)), spatial_scale (box
coordinates x scale = map coordinates), sampling_ratio (samples per bin along each axis; <= 0: adaptive,
ceil(roi size / output size)) and aligned (True: shift boxes by -0.5 pixel, Detectron2's choice), and
return [K, C, oh, ow] in input's dtype, differentiable w.r.t. input. geometry.py states the sampling rule.
The Triton path goes through the custom op `comer::roi_align` (torch.compile friendly).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .dispatch import ENV_VAR, IMPLS, get_roi_align_impl, resolve_impl, set_roi_align_impl
from .op import roi_align_op
from .reference import reference_forward, roi_align_reference
from .validation import Boxes, RoiAlignArgs, prepare_inputs


def _call_op(input: torch.Tensor, args: RoiAlignArgs, impl: str) -> torch.Tensor:
    return roi_align_op(input, args.rois, args.spatial_scale, args.output_h, args.output_w, args.sampling_ratio,
                        args.aligned, impl)


def roi_align(
    input: torch.Tensor,
    boxes: Boxes,
    output_size: int | Sequence[int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> torch.Tensor:
    """[K, C, oh, ow] features of the boxes' regions of input [B, C, H, W], by the configured implementation
    (`set_roi_align_impl` / COMER_ROI_ALIGN_IMPL, default "auto").

    Eagerly, the reference path runs as plain PyTorch under autograd (its backward reuses the forward's
    sample layout); under torch.compile it goes through the custom op."""
    args = prepare_inputs(input, boxes, output_size, spatial_scale, sampling_ratio, aligned)
    impl = resolve_impl(input)
    if impl == "reference" and not torch.compiler.is_compiling():
        return reference_forward(input, args.rois, args.output_h, args.output_w, args.spatial_scale,
                                 args.sampling_ratio, args.aligned)
    return _call_op(input, args, impl)


def roi_align_triton(
    input: torch.Tensor,
    boxes: Boxes,
    output_size: int | Sequence[int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> torch.Tensor:
    """The Triton kernels, whatever the switch says."""
    return _call_op(input, prepare_inputs(input, boxes, output_size, spatial_scale, sampling_ratio, aligned), "triton")


__all__ = [
    "ENV_VAR", "IMPLS", "get_roi_align_impl", "roi_align", "roi_align_reference", "roi_align_triton",
    "set_roi_align_impl",
]

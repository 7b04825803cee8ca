"""Axis-aligned box arithmetic: areas, pairwise overlaps (IoU / IoF), clipping to an image.

Boxes are (x1, y1, x2, y2) in pixels with no +1 offset (mmdet 2.x / mmcv 1.x with offset=0): a box's
width is x2 - x1. Half-precision boxes are computed in fp32 (a bf16 coordinate near 1000 px is only
good to 4 px); every other float dtype is kept.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

BOX_DIM = 4  # x1, y1, x2, y2
# mmdet 2.x `bbox_overlaps` divides by max(union, eps): boxes of zero area give 0 instead of 0 / 0.
OVERLAP_EPS = 1e-6
OVERLAP_MODES = ("iou", "iof")


def check_boxes(boxes: torch.Tensor, name: str) -> None:
    """Raise ValueError naming the argument unless `boxes` is a floating [..., 4] tensor."""
    if not isinstance(boxes, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(boxes).__name__}")
    if boxes.dim() < 1 or boxes.shape[-1] != BOX_DIM:
        raise ValueError(f"{name} must have shape [..., {BOX_DIM}] (x1, y1, x2, y2), got {tuple(boxes.shape)}")
    if not boxes.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {boxes.dtype}")


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype box arithmetic runs in: the inputs' common float dtype, at least fp32."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """[..., 4] boxes -> [...] areas (x2 - x1) * (y2 - y1); negative for inverted boxes, as mmdet."""
    check_boxes(boxes, "boxes")
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def pairwise_overlaps(boxes1: torch.Tensor, boxes2: torch.Tensor, mode: str = "iou",
                      eps: float = OVERLAP_EPS) -> torch.Tensor:
    """[N, 4] x [M, 4] -> [N, M] overlaps, without argument checks (for callers in a loop, e.g. NMS).

    mode "iou": intersection / max(union, eps); "iof": intersection / max(area of boxes1, eps).
    With eps=0 two boxes of zero area give 0 / 0 = NaN, which exceeds no threshold (mmcv's NMS)."""
    top_left = torch.maximum(boxes1[:, None, :2], boxes2[None, :, :2])  # [N, M, 2]
    bottom_right = torch.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    intersection = wh[..., 0] * wh[..., 1]  # [N, M]
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    if mode == "iou":
        area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
        denominator = area1[:, None] + area2[None, :] - intersection
    else:
        denominator = area1[:, None].expand_as(intersection)
    return intersection / denominator.clamp(min=eps)


def bbox_overlaps(boxes1: torch.Tensor, boxes2: torch.Tensor, mode: str = "iou", eps: float = OVERLAP_EPS
                  ) -> torch.Tensor:
    """Pairwise overlaps of boxes1 [N, 4] and boxes2 [M, 4] -> [N, M], as mmdet 2.x `bbox_overlaps`
    (is_aligned=False): mode "iou" (intersection over union) or "iof" (intersection over the area of
    the boxes1 box, e.g. a proposal's overlap with an ignore region). Empty inputs give [N, 0] / [0, M].
    Boxes of zero area, or inverted ones, overlap nothing: 0."""
    check_boxes(boxes1, "boxes1")
    check_boxes(boxes2, "boxes2")
    for name, boxes in (("boxes1", boxes1), ("boxes2", boxes2)):
        if boxes.dim() != 2:
            raise ValueError(f"{name} must have shape [N, {BOX_DIM}], got {tuple(boxes.shape)}")
    if mode not in OVERLAP_MODES:
        raise ValueError(f"mode must be one of {OVERLAP_MODES}, got {mode!r}")
    if boxes1.device != boxes2.device:
        raise ValueError(f"boxes1 and boxes2 must be on one device, got {boxes1.device} and {boxes2.device}")
    dtype = compute_dtype(boxes1, boxes2)
    return pairwise_overlaps(boxes1.to(dtype), boxes2.to(dtype), mode, eps)


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """IoU of every pair: boxes1 [N, 4], boxes2 [M, 4] -> [N, M] (see `bbox_overlaps`)."""
    return bbox_overlaps(boxes1, boxes2, mode="iou")


def clip_boxes(boxes: torch.Tensor, image_size: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Clamp [..., 4] boxes into an image of image_size (h, w): x to [0, w], y to [0, h] (mmdet 2.x;
    the right edge is w, not w - 1). Returns a new tensor of boxes' dtype."""
    check_boxes(boxes, "boxes")
    if len(image_size) != 2:
        raise ValueError(f"image_size must be (h, w), got {image_size}")
    height, width = (float(s) for s in image_size)
    if not (height >= 0 and width >= 0):
        raise ValueError(f"image_size must be non-negative (h, w), got {image_size}")
    x = boxes[..., 0::2].clamp(min=0, max=width)
    y = boxes[..., 1::2].clamp(min=0, max=height)
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)

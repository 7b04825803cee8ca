"""Argument checks and the boxes -> rois conversion shared by every RoIAlign path.

`prepare_inputs` checks shapes, dtypes and devices (no host sync), converts a list of per-image boxes to
the [K, 5] rois layout and, outside torch.compile tracing, reads the rois' values once (one host sync)
to reject non-finite coordinates and batch indices that are not an image of `input`.
"""
from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ROI_COLUMNS = 5  # batch index, x1, y1, x2, y2
BOX_COLUMNS = 4  # x1, y1, x2, y2

Boxes = torch.Tensor | Sequence[torch.Tensor]


def _as_int(value) -> int | None:
    """value as a Python int if it is an integer (int, numpy / 0-d integer tensor; not bool), else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def output_hw(output_size: int | Sequence[int]) -> tuple[int, int]:
    """output_size as an int or an (h, w) pair -> (h, w), each a positive int."""
    single = _as_int(output_size)
    pair = (single, single) if single is not None else output_size
    try:
        sizes = tuple(_as_int(s) for s in pair)
    except TypeError:
        sizes = ()
    if len(sizes) != 2 or None in sizes:
        raise ValueError(f"roi_align: output_size must be an int or a pair of ints (h, w), got {output_size!r}")
    if min(sizes) < 1:
        raise ValueError(f"roi_align: output_size must be >= 1, got {output_size!r}")
    return sizes


def _check_input(input: torch.Tensor) -> None:
    if not isinstance(input, torch.Tensor) or input.dim() != 4:
        shape = tuple(input.shape) if isinstance(input, torch.Tensor) else type(input).__name__
        raise ValueError(f"roi_align: input must be a [B, C, H, W] tensor, got {shape}")
    if input.dtype not in FLOAT_DTYPES:
        raise ValueError(f"roi_align: input must be one of {FLOAT_DTYPES}, got {input.dtype}")
    if input.shape[2] == 0 or input.shape[3] == 0:
        raise ValueError(f"roi_align: input's feature map must be at least 1 x 1, got {tuple(input.shape)}")


def _check_box_tensor(boxes: torch.Tensor, name: str, columns: int, input: torch.Tensor) -> None:
    layout = "(batch index, x1, y1, x2, y2)" if columns == ROI_COLUMNS else "(x1, y1, x2, y2)"
    if boxes.dim() != 2 or boxes.shape[1] != columns:
        hint = ""
        if columns == ROI_COLUMNS and boxes.dim() == 2 and boxes.shape[1] == BOX_COLUMNS:
            hint = "; [K, 4] boxes without a batch index go in a list of per-image [L, 4] tensors"
        elif columns == BOX_COLUMNS and boxes.dim() == 2 and boxes.shape[1] == ROI_COLUMNS:
            hint = "; a [K, 5] tensor with batch indices is passed as boxes itself, not in a list"
        raise ValueError(f"roi_align: {name} must have shape [K, {columns}] {layout}, got {tuple(boxes.shape)}{hint}")
    if not boxes.is_floating_point():
        raise ValueError(f"roi_align: {name} must be a floating-point tensor, got {boxes.dtype}")
    if boxes.device != input.device:
        raise ValueError(f"roi_align: {name} is on {boxes.device} but input is on {input.device}")


def as_rois(boxes: Boxes, input: torch.Tensor) -> torch.Tensor:
    """boxes as a [K, 5] tensor (batch index first) or a list of per-image [L_i, 4] tensors -> [K, 5]."""
    if isinstance(boxes, torch.Tensor):
        _check_box_tensor(boxes, "boxes", ROI_COLUMNS, input)
        return boxes
    if not isinstance(boxes, (list, tuple)):
        raise TypeError(f"roi_align: boxes must be a [K, 5] tensor or a list of [L, 4] tensors, got "
                        f"{type(boxes).__name__}")
    if len(boxes) != input.shape[0]:
        raise ValueError(f"roi_align: boxes is a list of {len(boxes)} per-image tensors but input has a batch of "
                         f"{input.shape[0]} images")
    dtype = torch.float32
    for i, image_boxes in enumerate(boxes):
        if not isinstance(image_boxes, torch.Tensor):
            raise TypeError(f"roi_align: boxes[{i}] must be a tensor, got {type(image_boxes).__name__}")
        _check_box_tensor(image_boxes, f"boxes[{i}]", BOX_COLUMNS, input)
        dtype = torch.promote_types(dtype, image_boxes.dtype)
    if not boxes:
        return input.new_zeros(0, ROI_COLUMNS, dtype=dtype)
    batch_index = torch.cat([torch.full((len(b), 1), i, dtype=dtype, device=input.device) for i, b in enumerate(boxes)])
    return torch.cat([batch_index, torch.cat([b.to(dtype) for b in boxes])], dim=1)


def check_scalars(spatial_scale: float, sampling_ratio: int, aligned: bool) -> tuple[float, int, bool]:
    """The three scalar arguments as Python float, int, bool; TypeError / ValueError naming a bad one."""
    if isinstance(spatial_scale, (bool, torch.Tensor)) or not isinstance(spatial_scale, numbers.Real):
        raise TypeError(f"roi_align: spatial_scale must be a real number, got {type(spatial_scale).__name__}")
    if not 0 < spatial_scale < math.inf:
        raise ValueError(f"roi_align: spatial_scale must be positive and finite, got {spatial_scale}")
    ratio = _as_int(sampling_ratio)
    if ratio is None:
        raise TypeError(f"roi_align: sampling_ratio must be an int (<= 0: adaptive), got {sampling_ratio!r}")
    if not isinstance(aligned, bool):
        raise TypeError(f"roi_align: aligned must be a bool, got {aligned!r}")
    return float(spatial_scale), ratio, aligned


def check_roi_values(rois: torch.Tensor, batch_size: int) -> None:
    """Finite coordinates and integer batch indices in [0, batch_size): one host sync."""
    if rois.shape[0] == 0:
        return
    batch_index = rois[:, 0]
    finite = torch.isfinite(rois).all()
    in_range = ((batch_index >= 0) & (batch_index < batch_size) & (batch_index == batch_index.floor())).all()
    if bool(finite & in_range):  # the one sync; the messages below may read more
        return
    if not bool(torch.isfinite(rois[:, 1:]).all()):
        bad = int((~torch.isfinite(rois[:, 1:])).any(dim=1).nonzero()[0])
        raise ValueError(f"roi_align: boxes must be finite; roi {bad} is {rois[bad].tolist()}")
    bad = int((~((batch_index >= 0) & (batch_index < batch_size) & (batch_index == batch_index.floor()))).nonzero()[0])
    raise ValueError(f"roi_align: roi {bad} has batch index {rois[bad, 0].item()}, not an image index in "
                     f"[0, {batch_size}) of input")


@dataclass(frozen=True)
class RoiAlignArgs:
    """The checked arguments of a RoIAlign call, as plain Python values (the custom op's schema)."""

    rois: torch.Tensor  # [K, 5]
    spatial_scale: float
    output_h: int
    output_w: int
    sampling_ratio: int
    aligned: bool


def prepare_inputs(input: torch.Tensor, boxes: Boxes, output_size: int | Sequence[int], spatial_scale: float,
                   sampling_ratio: int, aligned: bool) -> RoiAlignArgs:
    """Every check of the public functions; returns the rois [K, 5] and the other arguments normalised."""
    _check_input(input)
    output_h, output_w = output_hw(output_size)
    spatial_scale, sampling_ratio, aligned = check_scalars(spatial_scale, sampling_ratio, aligned)
    rois = as_rois(boxes, input)
    if not torch.compiler.is_compiling():
        check_roi_values(rois, input.shape[0])
    return RoiAlignArgs(rois, spatial_scale, output_h, output_w, sampling_ratio, aligned)

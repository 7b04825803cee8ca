"""Pure-PyTorch RoIAlign: the reference the Triton kernels are tested against, and the CPU path.

Shapes (B images, C channels, H x W map, K RoIs, output oh x ow):
    input   [B, C, H, W]   any float dtype
    rois    [K, 5]         (batch index, x1, y1, x2, y2) in input-image pixels (x spatial_scale -> map)
    returns [K, C, oh, ow] input's dtype

Every sample of every bin of every RoI is handled at once. RoIs have different sample counts per bin
(adaptive grids), so the samples are laid out ragged: bin (k, ph, pw) owns grid_h[k] * grid_w[k]
consecutive samples, each with four bilinear corners. `F.embedding_bag` then sums, per bin, the corner
rows of the channels-last map weighted by their bilinear weights, without materialising a
[samples, C] tensor; its backward scatters the weighted output gradient back into the map. Sums are
taken in fp32 (fp64 for fp64 input) and divided by the bin's sample count.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .geometry import RoiGrid, accumulator_dtype, bilinear_axis, roi_grid, sample_coordinate
from .validation import Boxes, prepare_inputs

CORNERS = 4  # bilinear corners per sample


def _ragged_samples(grid: RoiGrid, output_h: int, output_w: int):
    """Every (RoI, bin, sample) triple, ragged by RoI: returns bag_starts [K*oh*ow] (first sample of each
    bin), and per sample [S]: its RoI, ph, pw, iy, ix."""
    device = grid.grid_h.device
    bins_per_roi = output_h * output_w
    bag_sizes = (grid.grid_h * grid.grid_w).repeat_interleave(bins_per_roi)  # [K * oh * ow]
    bag_starts = bag_sizes.cumsum(0) - bag_sizes
    total = int(bag_sizes.sum())  # host sync: the number of samples sizes the tensors below
    bag = torch.repeat_interleave(torch.arange(bag_sizes.shape[0], device=device), bag_sizes, output_size=total)
    local = torch.arange(total, device=device) - bag_starts[bag]  # sample number inside its bin
    roi = bag // bins_per_roi
    ph = (bag // output_w) % output_h
    pw = bag % output_w
    grid_w = grid.grid_w[roi]
    return bag_starts, roi, ph, pw, local // grid_w, local % grid_w


def reference_forward(input: torch.Tensor, rois: torch.Tensor, output_h: int, output_w: int, spatial_scale: float,
                      sampling_ratio: int, aligned: bool) -> torch.Tensor:
    """RoIAlign of checked inputs (see `roi_align_reference`); differentiable w.r.t. input, autocast off."""
    batch, channels, height, width = input.shape
    num_rois = rois.shape[0]
    acc = accumulator_dtype(input.dtype)
    if num_rois == 0:  # a slice of input, so the (empty) output stays in input's autograd graph
        return input[:0, :, :1, :1].expand(0, channels, output_h, output_w).clone()
    with torch.autocast(device_type=input.device.type, enabled=False):
        grid = roi_grid(rois, (output_h, output_w), spatial_scale, sampling_ratio, aligned, acc)
        bag_starts, roi, ph, pw, iy, ix = _ragged_samples(grid, output_h, output_w)
        y = sample_coordinate(grid.start_y[roi], ph.to(acc), grid.bin_h[roi], iy.to(acc), grid.grid_h[roi].to(acc))
        x = sample_coordinate(grid.start_x[roi], pw.to(acc), grid.bin_w[roi], ix.to(acc), grid.grid_w[roi].to(acc))
        y_low, y_high, ly, y_inside = bilinear_axis(y, height)
        x_low, x_high, lx, x_inside = bilinear_axis(x, width)
        hy, hx = 1 - ly, 1 - lx
        inside = (y_inside & x_inside).to(acc)
        # [S, 4] weights and rows of the [B*H*W, C] table, corners (low, low), (low, high), (high, low), (high, high)
        weights = torch.stack([hy * hx, hy * lx, ly * hx, ly * lx], dim=1) * inside[:, None]
        image_row = grid.batch[roi] * height
        rows = torch.stack([(image_row + y_low) * width + x_low, (image_row + y_low) * width + x_high,
                            (image_row + y_high) * width + x_low, (image_row + y_high) * width + x_high], dim=1)
        table = input.permute(0, 2, 3, 1).reshape(batch * height * width, channels).to(acc)
        sums = F.embedding_bag(rows.flatten(), table, bag_starts * CORNERS, mode="sum",
                               per_sample_weights=weights.flatten())  # [K * oh * ow, C]
        output = sums.view(num_rois, output_h, output_w, channels).permute(0, 3, 1, 2) / grid.count.view(-1, 1, 1, 1)
    return output.to(input.dtype).contiguous()


def roi_align_reference(
    input: torch.Tensor,
    boxes: Boxes,
    output_size: int | Sequence[int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> torch.Tensor:
    """RoIAlign in plain PyTorch, torchvision's signature: input [B, C, H, W], boxes [K, 5] (batch index,
    x1, y1, x2, y2) or a list of B per-image [L_i, 4] tensors -> [K, C, oh, ow] in input's dtype."""
    args = prepare_inputs(input, boxes, output_size, spatial_scale, sampling_ratio, aligned)
    return reference_forward(input, args.rois, args.output_h, args.output_w, args.spatial_scale, args.sampling_ratio,
                             args.aligned)

"""Triton kernels for RoIAlign (forward, and backward with atomic adds) and their launchers.

Layout (B images, C channels, H x W map, K RoIs, oh x ow output):
    features       [B, H, W, C]   input in channels-last order (a copy unless input is channels_last)
    geometry       [K, 8]         per-RoI sampling grid, accumulator dtype (geometry.py, GEOMETRY_FIELDS)
    output         [K, C, oh, ow] input's dtype
    grad_features  [B, H, W, C]   fp32 (fp64) buffer the backward accumulates into with atomics

One program handles one output row (RoI k, bin row ph) for BLOCK_W >= ow bins and BLOCK_C channels;
grid (K * oh, cdiv(C, BLOCK_C)). A sample row has a single y, so its vertical bilinear set-up is a
scalar; each corner is one [BLOCK_W, BLOCK_C] load of contiguous channel vectors. The per-RoI sample
counts are loop bounds read from `geometry`, so each RoI runs exactly its own adaptive grid.

Sample positions use the reference's operations in the reference's order, with IEEE division and no
fused multiply-adds (enable_fp_fusion=False), so both paths sample at the same points: a sample that
lands exactly on the map's border reads the same pixels in both (the border test is a discontinuity).
Accumulation is in fp32 (fp64 for fp64 input).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# The launch description shared with ms_deform_attn (compiled for a GPU target without one by static_compile).
from ..ms_deform_attn.triton_kernels import KernelLaunch
from .geometry import NUM_GEOMETRY_FIELDS, OUTSIDE_MARGIN, SAMPLE_CENTRE, accumulator_dtype, roi_grid
from .tuning import LaunchConfig, launch_config

_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}
# geometry.py's constants, as constexprs the kernels may read
_SAMPLE_CENTRE = tl.constexpr(SAMPLE_CENTRE)
_OUTSIDE_MARGIN = tl.constexpr(OUTSIDE_MARGIN)


@triton.jit
def _load_geometry(geometry_ptr, roi, NUM_FIELDS: tl.constexpr):
    """The RoI's row of geometry (GEOMETRY_FIELDS order): image index (int64), start y, start x, bin h,
    bin w, samples per bin along y and x (int32), sample count divisor."""
    row = geometry_ptr + roi * NUM_FIELDS
    batch = tl.load(row).to(tl.int64)
    start_y = tl.load(row + 1)
    start_x = tl.load(row + 2)
    bin_h = tl.load(row + 3)
    bin_w = tl.load(row + 4)
    grid_h = tl.load(row + 5).to(tl.int32)
    grid_w = tl.load(row + 6).to(tl.int32)
    count = tl.load(row + 7)
    return batch, start_y, start_x, bin_h, bin_w, grid_h, grid_w, count


@triton.jit
def _div_rn(numerator, denominator, ACC_DTYPE: tl.constexpr):
    """IEEE (round-to-nearest) division, as PyTorch's: fp32 `/` compiles to an approximate division."""
    if ACC_DTYPE == tl.float64:
        return numerator / denominator  # fp64 `/` is already div.rn.f64 (div_rn is fp32 only)
    else:
        return tl.math.div_rn(numerator, denominator)


@triton.jit
def _sample_coordinate(bin_start, sample, bin_size, grid, ACC_DTYPE: tl.constexpr):
    """geometry.sample_coordinate: bin_start + ((sample + 0.5) * bin_size) / grid."""
    offset = (tl.cast(sample, ACC_DTYPE) + _SAMPLE_CENTRE) * bin_size
    return bin_start + _div_rn(offset, grid.to(ACC_DTYPE), ACC_DTYPE)


@triton.jit
def _bilinear_axis(coord, size, ACC_DTYPE: tl.constexpr):
    """geometry.bilinear_axis: (low index, high index, weight of high, inside) along an axis of `size`."""
    size_f = size.to(ACC_DTYPE)
    inside = (coord >= -_OUTSIDE_MARGIN) & (coord <= size_f)
    coord = tl.minimum(tl.maximum(coord, 0.0), size_f)
    low = coord.to(tl.int32)  # truncation == floor: coord >= 0
    at_edge = low >= size - 1
    low = tl.where(at_edge, size - 1, low)
    high = tl.where(at_edge, low, low + 1)
    frac = tl.where(at_edge, 0.0, coord - low.to(ACC_DTYPE))
    return low.to(tl.int64), high.to(tl.int64), frac, inside


@triton.jit
def _program_tile(channels, OUT_H: tl.constexpr, OUT_W: tl.constexpr, BLOCK_W: tl.constexpr,
                  BLOCK_C: tl.constexpr):
    """This program's RoI, bin row, its BLOCK_W bin columns and BLOCK_C channels, and their masks."""
    pid = tl.program_id(0).to(tl.int64)
    offs_w = tl.arange(0, BLOCK_W)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    return pid // OUT_H, pid % OUT_H, offs_w, offs_c, offs_w < OUT_W, offs_c < channels


@triton.jit
def _roi_align_fwd_kernel(
    features_ptr, geometry_ptr, out_ptr,
    stride_fb, stride_fh, stride_fw,  # features [B, H, W, C], C contiguous
    stride_ok, stride_oc, stride_oh, stride_ow,  # output [K, C, OH, OW]
    height, width, channels,
    OUT_H: tl.constexpr, OUT_W: tl.constexpr, NUM_FIELDS: tl.constexpr,
    BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    # grid: (K * OUT_H, cdiv(C, BLOCK_C))
    roi, ph, offs_w, offs_c, w_mask, c_mask = _program_tile(channels, OUT_H, OUT_W, BLOCK_W, BLOCK_C)
    batch, start_y, start_x, bin_h, bin_w, grid_h, grid_w, count = _load_geometry(geometry_ptr, roi, NUM_FIELDS)
    image = features_ptr + batch * stride_fb
    y_bin_start = start_y + ph.to(ACC_DTYPE) * bin_h
    x_bin_start = start_x + offs_w.to(ACC_DTYPE) * bin_w  # [BLOCK_W]

    acc = tl.zeros([BLOCK_W, BLOCK_C], dtype=ACC_DTYPE)
    for iy in range(0, grid_h):
        y = _sample_coordinate(y_bin_start, iy, bin_h, grid_h, ACC_DTYPE)
        y_low, y_high, ly, y_inside = _bilinear_axis(y, height, ACC_DTYPE)
        hy = 1.0 - ly
        row_low = image + y_low * stride_fh
        row_high = image + y_high * stride_fh
        if y_inside:  # a sample row outside [-1, H] reads zeros: skip it
            for ix in range(0, grid_w):
                x = _sample_coordinate(x_bin_start, ix, bin_w, grid_w, ACC_DTYPE)  # [BLOCK_W]
                x_low, x_high, lx, x_inside = _bilinear_axis(x, width, ACC_DTYPE)
                hx = 1.0 - lx
                mask = (x_inside & w_mask)[:, None] & c_mask[None, :]
                col_low = x_low[:, None] * stride_fw + offs_c[None, :]
                col_high = x_high[:, None] * stride_fw + offs_c[None, :]
                v1 = tl.load(row_low + col_low, mask=mask, other=0.0).to(ACC_DTYPE)
                v2 = tl.load(row_low + col_high, mask=mask, other=0.0).to(ACC_DTYPE)
                v3 = tl.load(row_high + col_low, mask=mask, other=0.0).to(ACC_DTYPE)
                v4 = tl.load(row_high + col_high, mask=mask, other=0.0).to(ACC_DTYPE)
                acc += ((hy * hx)[:, None] * v1 + (hy * lx)[:, None] * v2 + (ly * hx)[:, None] * v3
                        + (ly * lx)[:, None] * v4)

    out_ptrs = (out_ptr + roi * stride_ok + ph * stride_oh + offs_w[:, None] * stride_ow
                + offs_c[None, :] * stride_oc)
    tl.store(out_ptrs, _div_rn(acc, count, ACC_DTYPE).to(out_ptr.dtype.element_ty),
             mask=w_mask[:, None] & c_mask[None, :])


@triton.jit
def _roi_align_bwd_kernel(
    grad_out_ptr, geometry_ptr, grad_features_ptr,
    stride_gk, stride_gc, stride_gh, stride_gw,  # grad_output [K, C, OH, OW], any strides (may be expanded)
    stride_fb, stride_fh, stride_fw,  # grad_features [B, H, W, C], C contiguous, accumulator dtype
    height, width, channels,
    OUT_H: tl.constexpr, OUT_W: tl.constexpr, NUM_FIELDS: tl.constexpr,
    BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    # grid: (K * OUT_H, cdiv(C, BLOCK_C)), as the forward.
    roi, ph, offs_w, offs_c, w_mask, c_mask = _program_tile(channels, OUT_H, OUT_W, BLOCK_W, BLOCK_C)
    batch, start_y, start_x, bin_h, bin_w, grid_h, grid_w, count = _load_geometry(geometry_ptr, roi, NUM_FIELDS)
    go_ptrs = (grad_out_ptr + roi * stride_gk + ph * stride_gh + offs_w[:, None] * stride_gw
               + offs_c[None, :] * stride_gc)
    tile_mask = w_mask[:, None] & c_mask[None, :]
    grad = _div_rn(tl.load(go_ptrs, mask=tile_mask, other=0.0).to(ACC_DTYPE), count, ACC_DTYPE)  # [BLOCK_W, BLOCK_C]
    image = grad_features_ptr + batch * stride_fb
    y_bin_start = start_y + ph.to(ACC_DTYPE) * bin_h
    x_bin_start = start_x + offs_w.to(ACC_DTYPE) * bin_w

    for iy in range(0, grid_h):
        y = _sample_coordinate(y_bin_start, iy, bin_h, grid_h, ACC_DTYPE)
        y_low, y_high, ly, y_inside = _bilinear_axis(y, height, ACC_DTYPE)
        hy = 1.0 - ly
        row_low = image + y_low * stride_fh
        row_high = image + y_high * stride_fh
        if y_inside:
            for ix in range(0, grid_w):
                x = _sample_coordinate(x_bin_start, ix, bin_w, grid_w, ACC_DTYPE)
                x_low, x_high, lx, x_inside = _bilinear_axis(x, width, ACC_DTYPE)
                hx = 1.0 - lx
                mask = x_inside[:, None] & tile_mask
                col_low = x_low[:, None] * stride_fw + offs_c[None, :]
                col_high = x_high[:, None] * stride_fw + offs_c[None, :]
                # d out / d corner = bilinear weight / count (C-wide vector atomics, relaxed: only sums)
                tl.atomic_add(row_low + col_low, (hy * hx)[:, None] * grad, mask=mask, sem="relaxed")
                tl.atomic_add(row_low + col_high, (hy * lx)[:, None] * grad, mask=mask, sem="relaxed")
                tl.atomic_add(row_high + col_low, (ly * hx)[:, None] * grad, mask=mask, sem="relaxed")
                tl.atomic_add(row_high + col_high, (ly * lx)[:, None] * grad, mask=mask, sem="relaxed")


def _check_device(tensor: torch.Tensor) -> None:
    if tensor.device.type == "cpu" and not triton.knobs.runtime.interpret:
        raise RuntimeError(
            "roi_align (triton): CPU tensors need the Triton interpreter; set TRITON_INTERPRET=1 before "
            "comer's Triton kernels are first used, or use the reference implementation")


def _launch(kernel, grid_rows: int, output_h: int, output_w: int, channels: int, acc: torch.dtype, args: tuple,
            config: LaunchConfig | None) -> KernelLaunch:
    """Grid and options, the same for both kernels."""
    config = config or launch_config(output_w, channels)
    grid = (grid_rows * output_h, triton.cdiv(channels, config.block_c))
    # No fused multiply-adds: sample positions must round as the reference's (see the module docstring).
    options = dict(OUT_H=output_h, OUT_W=output_w, NUM_FIELDS=NUM_GEOMETRY_FIELDS, BLOCK_W=config.block_w,
                   BLOCK_C=config.block_c, ACC_DTYPE=_TL_DTYPES[acc], num_warps=config.num_warps, num_stages=1,
                   enable_fp_fusion=False)
    return KernelLaunch(kernel, grid, args, options)


def forward_launch(features: torch.Tensor, geometry: torch.Tensor, output: torch.Tensor,
                   config: LaunchConfig | None = None) -> KernelLaunch:
    """The forward kernel's launch: features [B, H, W, C] (C contiguous), geometry [K, 8] (RoiGrid.packed),
    writing output [K, C, oh, ow]."""
    _, height, width, channels = features.shape
    num_rois, _, output_h, output_w = output.shape
    args = (features, geometry, output, features.stride(0), features.stride(1), features.stride(2),
            *output.stride(), height, width, channels)
    return _launch(_roi_align_fwd_kernel, num_rois, output_h, output_w, channels, geometry.dtype, args, config)


def backward_launch(grad_output: torch.Tensor, geometry: torch.Tensor, grad_features: torch.Tensor,
                    config: LaunchConfig | None = None) -> KernelLaunch:
    """The backward kernel's launch: grad_output [K, C, oh, ow] (any strides), geometry [K, 8], accumulating
    into grad_features [B, H, W, C] (zeroed, C contiguous, geometry's dtype)."""
    _, height, width, channels = grad_features.shape
    num_rois, _, output_h, output_w = grad_output.shape
    args = (grad_output, geometry, grad_features, *grad_output.stride(), grad_features.stride(0),
            grad_features.stride(1), grad_features.stride(2), height, width, channels)
    return _launch(_roi_align_bwd_kernel, num_rois, output_h, output_w, channels, geometry.dtype, args, config)


def roi_align_forward(input: torch.Tensor, rois: torch.Tensor, spatial_scale: float, output_h: int, output_w: int,
                      sampling_ratio: int, aligned: bool, config: LaunchConfig | None = None) -> torch.Tensor:
    """Run the forward kernel: input [B, C, H, W], rois [K, 5] -> [K, C, oh, ow] in input's dtype."""
    _check_device(input)
    num_rois, channels = rois.shape[0], input.shape[1]
    output = input.new_empty(num_rois, channels, output_h, output_w)
    if output.numel() == 0:
        return output
    acc = accumulator_dtype(input.dtype)
    geometry = roi_grid(rois, (output_h, output_w), spatial_scale, sampling_ratio, aligned, acc).packed()
    features = input.detach().permute(0, 2, 3, 1).contiguous()  # [B, H, W, C]; free for channels_last input
    forward_launch(features, geometry, output, config)()
    return output


def roi_align_backward(grad_output: torch.Tensor, rois: torch.Tensor, spatial_scale: float, output_h: int,
                       output_w: int, sampling_ratio: int, aligned: bool, batch: int, height: int, width: int,
                       config: LaunchConfig | None = None) -> torch.Tensor:
    """Run the backward kernel: grad_output [K, C, oh, ow] -> grad_input [B, C, H, W] in grad_output's
    dtype, laid out channels-last (strides of a permuted [B, H, W, C] tensor). Accumulated with atomics
    in an fp32 (fp64) buffer, then cast."""
    _check_device(grad_output)
    num_rois, channels = grad_output.shape[:2]
    acc = accumulator_dtype(grad_output.dtype)
    grad_features = torch.zeros(batch, height, width, channels, dtype=acc, device=grad_output.device)
    if num_rois and channels:
        geometry = roi_grid(rois, (output_h, output_w), spatial_scale, sampling_ratio, aligned, acc).packed()
        backward_launch(grad_output, geometry, grad_features, config)()
    return grad_features.permute(0, 3, 1, 2).to(grad_output.dtype)

"""Triton kernels for multi-scale deformable attention and their launchers.

Layout (N batch, S value tokens, M heads, D head dim, Lq queries, L levels, P points):
    value               [N, S, M, D]          any float dtype, D contiguous
    spatial_shapes      [L, 2] int64          (H, W) per level
    level_start_index   [L] int64
    sampling_locations  [N, Lq, M, L, P, 2]   (x, y) in [0, 1]; its own float dtype
    attention_weights   [N, Lq, M, L, P]      its own float dtype
    output              [N, Lq, M * D]        value's dtype

One program handles BLOCK_Q queries of one (batch, head) and all D channels (a BLOCK_D >= D block,
masked), so each corner is one coalesced load of D contiguous values per query and the reductions
over D for the location / weight gradients stay inside the program. Accumulation is in fp32 (fp64
for fp64 values). Bilinear sampling follows grid_sample(align_corners=False, padding_mode="zeros"):
pixel x = loc_x * W - 0.5, corners outside the map read as zero and receive no gradient.

The launchers make every input contiguous (a no-op for the usual Linear -> view layouts), so the
kernels only need the outer strides.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from .tuning import LaunchConfig, channel_block, launch_configs


@triton.jit
def _bilinear_setup(loc_ptrs, q_mask, height, width, ACC_DTYPE: tl.constexpr):
    """Integer top-left corner and fractional offsets of the BLOCK_Q sampling points at loc_ptrs."""
    x = tl.load(loc_ptrs, mask=q_mask, other=0.0).to(ACC_DTYPE) * width.to(ACC_DTYPE) - 0.5
    y = tl.load(loc_ptrs + 1, mask=q_mask, other=0.0).to(ACC_DTYPE) * height.to(ACC_DTYPE) - 0.5
    x_floor = tl.floor(x)
    y_floor = tl.floor(y)
    return x_floor.to(tl.int64), y_floor.to(tl.int64), x - x_floor, y - y_floor


@triton.jit
def _corner_mask(col, row, height, width, q_mask, d_mask):
    """[BLOCK_Q, BLOCK_D] mask of a corner: inside the map, a real query, a real channel."""
    inside = q_mask & (col >= 0) & (col < width) & (row >= 0) & (row < height)
    return inside[:, None] & d_mask[None, :]


@triton.jit
def _corner_offsets(level_start, col, row, width, offs_d, stride_vs):
    """[BLOCK_Q, BLOCK_D] element offsets of a corner's D channels inside one (batch, head) slice."""
    token = level_start + row * width + col
    return token[:, None] * stride_vs + offs_d[None, :]


@triton.jit
def _load_corner(value_base, level_start, col, row, height, width, offs_d, stride_vs, q_mask, d_mask,
                 ACC_DTYPE: tl.constexpr):
    mask = _corner_mask(col, row, height, width, q_mask, d_mask)
    offsets = _corner_offsets(level_start, col, row, width, offs_d, stride_vs)
    return tl.load(value_base + offsets, mask=mask, other=0.0).to(ACC_DTYPE)


@triton.jit
def _program_tile(num_queries, heads, head_dim, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's (batch, head), its BLOCK_Q query offsets and BLOCK_D channel offsets, and their
    masks; grid (cdiv(Lq, BLOCK_Q), N * M)."""
    pid_nm = tl.program_id(1).to(tl.int64)
    offs_q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)
    return pid_nm // heads, pid_nm % heads, offs_q, offs_d, offs_q < num_queries, offs_d < head_dim


@triton.jit
def _load_corners(value_base, level_start, col, row, height, width, offs_d, stride_vs, q_mask, d_mask,
                  ACC_DTYPE: tl.constexpr):
    """The four [BLOCK_Q, BLOCK_D] corner tiles around the sampling points: (top-left, top-right,
    bottom-left, bottom-right), zeros outside the map."""
    v00 = _load_corner(value_base, level_start, col, row, height, width, offs_d, stride_vs, q_mask, d_mask,
                       ACC_DTYPE)
    v01 = _load_corner(value_base, level_start, col + 1, row, height, width, offs_d, stride_vs, q_mask, d_mask,
                       ACC_DTYPE)
    v10 = _load_corner(value_base, level_start, col, row + 1, height, width, offs_d, stride_vs, q_mask, d_mask,
                       ACC_DTYPE)
    v11 = _load_corner(value_base, level_start, col + 1, row + 1, height, width, offs_d, stride_vs, q_mask,
                       d_mask, ACC_DTYPE)
    return v00, v01, v10, v11


@triton.jit
def _ms_deform_attn_fwd_kernel(
    value_ptr, shapes_ptr, starts_ptr, loc_ptr, weight_ptr, out_ptr,
    stride_vn, stride_vs, stride_vm,  # value [N, S, M, D]
    stride_ln, stride_lq, stride_lm,  # sampling_locations [N, Lq, M, L, P, 2]
    stride_wn, stride_wq, stride_wm,  # attention_weights [N, Lq, M, L, P]
    stride_on, stride_oq,  # output [N, Lq, M * D]
    num_queries, heads, head_dim,
    NUM_LEVELS: tl.constexpr, NUM_POINTS: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    # grid: (cdiv(Lq, BLOCK_Q), N * M); neighbouring programs share a (batch, head) value slice.
    batch, head, offs_q, offs_d, q_mask, d_mask = _program_tile(num_queries, heads, head_dim, BLOCK_Q, BLOCK_D)

    value_base = value_ptr + batch * stride_vn + head * stride_vm
    loc_rows = loc_ptr + batch * stride_ln + head * stride_lm + offs_q * stride_lq  # [BLOCK_Q]
    weight_rows = weight_ptr + batch * stride_wn + head * stride_wm + offs_q * stride_wq  # [BLOCK_Q]

    acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=ACC_DTYPE)
    for level in range(NUM_LEVELS):
        height = tl.load(shapes_ptr + 2 * level)
        width = tl.load(shapes_ptr + 2 * level + 1)
        level_start = tl.load(starts_ptr + level)
        for point in range(NUM_POINTS):
            sample = level * NUM_POINTS + point
            col, row, frac_x, frac_y = _bilinear_setup(loc_rows + 2 * sample, q_mask, height, width, ACC_DTYPE)
            weight = tl.load(weight_rows + sample, mask=q_mask, other=0.0).to(ACC_DTYPE)
            v00, v01, v10, v11 = _load_corners(value_base, level_start, col, row, height, width, offs_d, stride_vs,
                                               q_mask, d_mask, ACC_DTYPE)
            top = v00 + frac_x[:, None] * (v01 - v00)
            bottom = v10 + frac_x[:, None] * (v11 - v10)
            acc += weight[:, None] * (top + frac_y[:, None] * (bottom - top))

    out_ptrs = out_ptr + batch * stride_on + offs_q[:, None] * stride_oq + head * head_dim + offs_d[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=q_mask[:, None] & d_mask[None, :])


@triton.jit
def _scatter_corner(grad_value_base, level_start, col, row, height, width, offs_d, stride_vs, q_mask, d_mask,
                    contribution):
    mask = _corner_mask(col, row, height, width, q_mask, d_mask)
    offsets = _corner_offsets(level_start, col, row, width, offs_d, stride_vs)
    tl.atomic_add(grad_value_base + offsets, contribution, mask=mask, sem="relaxed")


@triton.jit
def _ms_deform_attn_bwd_kernel(
    grad_out_ptr, value_ptr, shapes_ptr, starts_ptr, loc_ptr, weight_ptr,
    grad_value_ptr, grad_loc_ptr, grad_weight_ptr,
    stride_gon, stride_goq,  # grad_output [N, Lq, M * D]
    stride_vn, stride_vs, stride_vm,  # value and grad_value (fp32/fp64 buffer) [N, S, M, D]
    stride_ln, stride_lq, stride_lm,  # sampling_locations and their gradient [N, Lq, M, L, P, 2]
    stride_wn, stride_wq, stride_wm,  # attention_weights and their gradient [N, Lq, M, L, P]
    num_queries, heads, head_dim,
    NUM_LEVELS: tl.constexpr, NUM_POINTS: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    # grid: (cdiv(Lq, BLOCK_Q), N * M), as the forward.
    batch, head, offs_q, offs_d, q_mask, d_mask = _program_tile(num_queries, heads, head_dim, BLOCK_Q, BLOCK_D)

    go_ptrs = grad_out_ptr + batch * stride_gon + offs_q[:, None] * stride_goq + head * head_dim + offs_d[None, :]
    grad_out = tl.load(go_ptrs, mask=q_mask[:, None] & d_mask[None, :], other=0.0).to(ACC_DTYPE)

    slice_offset = batch * stride_vn + head * stride_vm
    value_base = value_ptr + slice_offset
    grad_value_base = grad_value_ptr + slice_offset
    loc_offsets = batch * stride_ln + head * stride_lm + offs_q * stride_lq  # [BLOCK_Q]
    weight_offsets = batch * stride_wn + head * stride_wm + offs_q * stride_wq  # [BLOCK_Q]

    for level in range(NUM_LEVELS):
        height = tl.load(shapes_ptr + 2 * level)
        width = tl.load(shapes_ptr + 2 * level + 1)
        level_start = tl.load(starts_ptr + level)
        for point in range(NUM_POINTS):
            sample = level * NUM_POINTS + point
            col, row, frac_x, frac_y = _bilinear_setup(loc_ptr + loc_offsets + 2 * sample, q_mask, height, width,
                                                       ACC_DTYPE)
            weight = tl.load(weight_ptr + weight_offsets + sample, mask=q_mask, other=0.0).to(ACC_DTYPE)
            v00, v01, v10, v11 = _load_corners(value_base, level_start, col, row, height, width, offs_d, stride_vs,
                                               q_mask, d_mask, ACC_DTYPE)
            fx = frac_x[:, None]
            fy = frac_y[:, None]
            top = v00 + fx * (v01 - v00)
            bottom = v10 + fx * (v11 - v10)
            sampled = top + fy * (bottom - top)

            # d out / d weight = <grad_out, sampled>; d out / d frac = weight * <grad_out, d sampled / d frac>
            grad_weight = tl.sum(grad_out * sampled, axis=1)
            weighted_go = weight[:, None] * grad_out
            left = v00 + fy * (v10 - v00)
            right = v01 + fy * (v11 - v01)
            grad_x = tl.sum(weighted_go * (right - left), axis=1) * width.to(ACC_DTYPE)
            grad_y = tl.sum(weighted_go * (bottom - top), axis=1) * height.to(ACC_DTYPE)
            grad_loc_ptrs = grad_loc_ptr + loc_offsets + 2 * sample
            grad_loc_ty = grad_loc_ptr.dtype.element_ty
            tl.store(grad_loc_ptrs, grad_x.to(grad_loc_ty), mask=q_mask)
            tl.store(grad_loc_ptrs + 1, grad_y.to(grad_loc_ty), mask=q_mask)
            tl.store(grad_weight_ptr + weight_offsets + sample, grad_weight.to(grad_weight_ptr.dtype.element_ty),
                     mask=q_mask)

            # d out / d value at each corner = weight * bilinear coefficient * grad_out (D-wide atomics).
            gx = 1.0 - fx
            gy = 1.0 - fy
            _scatter_corner(grad_value_base, level_start, col, row, height, width, offs_d, stride_vs, q_mask, d_mask,
                            weighted_go * (gy * gx))
            _scatter_corner(grad_value_base, level_start, col + 1, row, height, width, offs_d, stride_vs, q_mask,
                            d_mask, weighted_go * (gy * fx))
            _scatter_corner(grad_value_base, level_start, col, row + 1, height, width, offs_d, stride_vs, q_mask,
                            d_mask, weighted_go * (fy * gx))
            _scatter_corner(grad_value_base, level_start, col + 1, row + 1, height, width, offs_d, stride_vs, q_mask,
                            d_mask, weighted_go * (fy * fx))


def _accumulator_dtype(value: torch.Tensor) -> tuple[torch.dtype, "tl.dtype"]:
    """fp64 values accumulate in fp64 (exact gradient checks); every other dtype in fp32."""
    if value.dtype == torch.float64:
        return torch.float64, tl.float64
    return torch.float32, tl.float32


def _check_device(value: torch.Tensor) -> None:
    if value.device.type == "cpu" and not triton.knobs.runtime.interpret:
        raise RuntimeError(
            "ms_deform_attn (triton): CPU tensors need the Triton interpreter; set TRITON_INTERPRET=1 before "
            "comer's Triton kernels are first used, or use the reference implementation")


@dataclass(frozen=True)
class KernelLaunch:
    """One kernel launch, described before it runs: so the same launch can also be compiled for a GPU
    target without one (static_compile.py) and its register use read."""

    kernel: triton.JITFunction
    grid: tuple[int, int]
    args: tuple
    options: dict[str, Any]  # constexpr arguments and launch options (warps, stages)

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.options)


def _launch(kernel, value: torch.Tensor, sampling_locations: torch.Tensor, args: tuple,
            config: LaunchConfig) -> KernelLaunch:
    """Grid and options, the same for both kernels."""
    batch, _, heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    # Fused multiply-adds on, explicitly: Triton 3.9 warns that its default turns them off in 3.10.
    options = dict(NUM_LEVELS=num_levels, NUM_POINTS=num_points, BLOCK_Q=config.block_q,
                   BLOCK_D=channel_block(head_dim), ACC_DTYPE=_accumulator_dtype(value)[1],
                   num_warps=config.num_warps, num_stages=config.num_stages, enable_fp_fusion=True)
    return KernelLaunch(kernel, (triton.cdiv(num_queries, config.block_q), batch * heads), args, options)


def forward_launch(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, output,
                   config: LaunchConfig | None = None) -> KernelLaunch:
    """The forward kernel's launch writing into output [N, Lq, M * D]; inputs must be contiguous."""
    _, _, heads, head_dim = value.shape
    num_queries = sampling_locations.shape[1]
    args = (
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, output,
        value.stride(0), value.stride(1), value.stride(2),
        sampling_locations.stride(0), sampling_locations.stride(1), sampling_locations.stride(2),
        attention_weights.stride(0), attention_weights.stride(1), attention_weights.stride(2),
        output.stride(0), output.stride(1),
        num_queries, heads, head_dim,
    )
    config = config or launch_configs(head_dim)[0]  # (forward, backward)
    return _launch(_ms_deform_attn_fwd_kernel, value, sampling_locations, args, config)


def backward_launch(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                    grad_value, grad_locations, grad_weights, config: LaunchConfig | None = None) -> KernelLaunch:
    """The backward kernel's launch accumulating into grad_value (zeroed, fp32/fp64) and writing
    grad_locations / grad_weights; inputs must be contiguous."""
    _, _, heads, head_dim = value.shape
    num_queries = sampling_locations.shape[1]
    args = (
        grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
        grad_value, grad_locations, grad_weights,
        grad_output.stride(0), grad_output.stride(1),
        value.stride(0), value.stride(1), value.stride(2),
        sampling_locations.stride(0), sampling_locations.stride(1), sampling_locations.stride(2),
        attention_weights.stride(0), attention_weights.stride(1), attention_weights.stride(2),
        num_queries, heads, head_dim,
    )
    config = config or launch_configs(head_dim)[1]  # (forward, backward)
    return _launch(_ms_deform_attn_bwd_kernel, value, sampling_locations, args, config)


def ms_deform_attn_forward(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    config: LaunchConfig | None = None,
) -> torch.Tensor:
    """Run the forward kernel: returns [N, Lq, M * D] in value's dtype. `config` overrides the tuned
    launch parameters (benchmarks/tune_ms_deform_attn.py)."""
    _check_device(value)
    inputs = [t.contiguous() for t in (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)]
    batch, _, heads, head_dim = value.shape
    output = value.new_empty(batch, sampling_locations.shape[1], heads * head_dim)
    forward_launch(*inputs, output, config=config)()
    return output


def ms_deform_attn_backward(
    grad_output: torch.Tensor,
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    config: LaunchConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the backward kernel: gradients of value, sampling_locations, attention_weights, each in its
    input's dtype. grad_value is accumulated with atomics in an fp32 (fp64) buffer, then cast. `config`
    overrides the tuned launch parameters."""
    _check_device(value)
    inputs = [t.contiguous() for t in (grad_output, value, spatial_shapes, level_start_index, sampling_locations,
                                       attention_weights)]
    grad_value = torch.zeros(value.shape, dtype=_accumulator_dtype(value)[0], device=value.device)
    grad_locations = torch.empty_like(inputs[4])
    grad_weights = torch.empty_like(inputs[5])
    backward_launch(*inputs, grad_value, grad_locations, grad_weights, config=config)()
    return grad_value.to(value.dtype), grad_locations, grad_weights

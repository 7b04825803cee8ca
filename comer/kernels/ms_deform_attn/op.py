"""The torch custom ops `comer::ms_deform_attn` and `comer::ms_deform_attn_backward`.

Both take the implementation name ("triton" or "reference") as their last argument, so the choice is
fixed when a graph is traced and torch.compile sees one opaque op (no graph break) with a fake
implementation for shapes. Autograd is registered on the forward op (the custom-op form of a
torch.autograd.Function): its backward calls the backward op.

Dtype policy (autocast): under bf16/fp16 autocast MSDeformAttn hands over value in the low precision
(from a Linear) and sampling locations / attention weights in fp32 (reference points are fp32, softmax
runs in fp32). Casting locations to bf16 would move points by up to half a pixel on a 128-wide map, so
each input keeps its own dtype: the Triton kernels read each in its dtype and compute in fp32; the
reference promotes the three to their common dtype with autocast off. The output has value's dtype;
each gradient has its input's dtype.
"""
from __future__ import annotations

import torch

from .reference import ms_deform_attn_reference
from .validation import check_level_layout

Tensors = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def reference_forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    dtype = torch.promote_types(torch.promote_types(value.dtype, sampling_locations.dtype), attention_weights.dtype)
    with torch.autocast(device_type=value.device.type, enabled=False):
        output = ms_deform_attn_reference(value.to(dtype), spatial_shapes, level_start_index,
                                          sampling_locations.to(dtype), attention_weights.to(dtype))
    return output.to(value.dtype)


@torch.library.custom_op("comer::ms_deform_attn", mutates_args=())
def ms_deform_attn_op(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    impl: str,
) -> torch.Tensor:
    check_level_layout(value, spatial_shapes, level_start_index)
    if impl == "triton":
        from .triton_kernels import ms_deform_attn_forward  # imported on first use: see TRITON_INTERPRET
        return ms_deform_attn_forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if impl == "reference":
        return reference_forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    raise ValueError(f"ms_deform_attn: impl must be 'triton' or 'reference', got {impl!r}")


@ms_deform_attn_op.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, impl):
    batch, _, heads, head_dim = value.shape
    return value.new_empty(batch, sampling_locations.shape[1], heads * head_dim)


@torch.library.custom_op("comer::ms_deform_attn_backward", mutates_args=())
def ms_deform_attn_backward_op(
    grad_output: torch.Tensor,
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    impl: str,
) -> Tensors:
    if impl == "triton":
        from .triton_kernels import ms_deform_attn_backward
        return ms_deform_attn_backward(grad_output, value, spatial_shapes, level_start_index, sampling_locations,
                                       attention_weights)
    if impl == "reference":
        # torch.func.vjp, not torch.autograd.grad: custom-op kernels run below the autograd dispatch key.
        def forward(value, sampling_locations, attention_weights):
            return reference_forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)

        _, vjp = torch.func.vjp(forward, value, sampling_locations, attention_weights)
        return vjp(grad_output)
    raise ValueError(f"ms_deform_attn: impl must be 'triton' or 'reference', got {impl!r}")


@ms_deform_attn_backward_op.register_fake
def _(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, impl):
    return torch.empty_like(value), torch.empty_like(sampling_locations), torch.empty_like(attention_weights)


def _setup_context(ctx, inputs, output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, impl = inputs
    ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    ctx.impl = impl


def _backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_locations, grad_weights = ms_deform_attn_backward_op(
        grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, ctx.impl)
    return grad_value, None, None, grad_locations, grad_weights, None


ms_deform_attn_op.register_autograd(_backward, setup_context=_setup_context)

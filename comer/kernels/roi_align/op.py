"""The torch custom ops `comer::roi_align` and `comer::roi_align_backward`.

Both take the implementation name ("triton" or "reference") as their last argument, so the choice is
fixed when a graph is traced and torch.compile sees one opaque op with a fake implementation for shapes
(the reference's ragged sample layout has a data-dependent size, which would otherwise break the graph).
Autograd is registered on the forward op: the gradient flows to input only (boxes get none, as in
torchvision). The backward needs the input's shape, not its values, so the forward saves only rois.

Dtype policy: input in any float dtype, rois in any float dtype; sampling and sums in fp32 (fp64 for fp64
input); the output has input's dtype, grad_input grad_output's. Autocast does not cast around the op
(a bf16 feature map from an autocast FPN stays bf16 and is read as such).
"""
from __future__ import annotations

import torch

from .reference import reference_forward


@torch.library.custom_op("comer::roi_align", mutates_args=())
def roi_align_op(
    input: torch.Tensor,
    rois: torch.Tensor,
    spatial_scale: float,
    output_h: int,
    output_w: int,
    sampling_ratio: int,
    aligned: bool,
    impl: str,
) -> torch.Tensor:
    if impl == "triton":
        from .triton_kernels import roi_align_forward  # imported on first use: see TRITON_INTERPRET
        return roi_align_forward(input, rois, spatial_scale, output_h, output_w, sampling_ratio, aligned)
    if impl == "reference":
        return reference_forward(input, rois, output_h, output_w, spatial_scale, sampling_ratio, aligned)
    raise ValueError(f"roi_align: impl must be 'triton' or 'reference', got {impl!r}")


@roi_align_op.register_fake
def _(input, rois, spatial_scale, output_h, output_w, sampling_ratio, aligned, impl):
    return input.new_empty(rois.shape[0], input.shape[1], output_h, output_w)


@torch.library.custom_op("comer::roi_align_backward", mutates_args=())
def roi_align_backward_op(
    grad_output: torch.Tensor,
    rois: torch.Tensor,
    spatial_scale: float,
    output_h: int,
    output_w: int,
    sampling_ratio: int,
    aligned: bool,
    batch: int,
    height: int,
    width: int,
    impl: str,
) -> torch.Tensor:
    if impl == "triton":
        from .triton_kernels import roi_align_backward
        return roi_align_backward(grad_output, rois, spatial_scale, output_h, output_w, sampling_ratio, aligned,
                                  batch, height, width)
    if impl == "reference":
        # RoIAlign is linear in input: its vector-Jacobian product does not depend on input's values, so it
        # is taken at zeros. torch.func.vjp: custom-op kernels run below the autograd dispatch key.
        channels = grad_output.shape[1]
        zeros = grad_output.new_zeros(batch, channels, height, width)
        _, vjp = torch.func.vjp(
            lambda x: reference_forward(x, rois, output_h, output_w, spatial_scale, sampling_ratio, aligned), zeros)
        return vjp(grad_output)[0]
    raise ValueError(f"roi_align: impl must be 'triton' or 'reference', got {impl!r}")


@roi_align_backward_op.register_fake
def _(grad_output, rois, spatial_scale, output_h, output_w, sampling_ratio, aligned, batch, height, width, impl):
    channels = grad_output.shape[1]
    if impl == "triton":  # the kernels accumulate channels-last: same strides as the real output
        return grad_output.new_empty(batch, height, width, channels).permute(0, 3, 1, 2)
    return grad_output.new_empty(batch, channels, height, width)


def _setup_context(ctx, inputs, output):
    input, rois, spatial_scale, output_h, output_w, sampling_ratio, aligned, impl = inputs
    ctx.save_for_backward(rois)
    ctx.args = (spatial_scale, output_h, output_w, sampling_ratio, aligned)
    ctx.input_shape = (input.shape[0], input.shape[2], input.shape[3])
    ctx.impl = impl


def _backward(ctx, grad_output):
    (rois,) = ctx.saved_tensors
    batch, height, width = ctx.input_shape
    grad_input = roi_align_backward_op(grad_output, rois, *ctx.args, batch, height, width, ctx.impl)
    return grad_input, None, None, None, None, None, None, None


roi_align_op.register_autograd(_backward, setup_context=_setup_context)

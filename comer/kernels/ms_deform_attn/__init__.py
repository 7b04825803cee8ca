"""Multi-scale deformable attention: public entry points, the Triton path and its reference.

    ms_deform_attn            dispatches (CUDA -> Triton, CPU -> reference; see dispatch.py for the switch)
    ms_deform_attn_triton     always the Triton kernels (CPU tensors work under TRITON_INTERPRET=1)
    ms_deform_attn_reference  pure PyTorch (grid_sample)

All three take value [N, S, M, D], spatial_shapes [L, 2] int64 (H, W), level_start_index [L] int64,
sampling_locations [N, Lq, M, L, P, 2] (x, y) in [0, 1], attention_weights [N, Lq, M, L, P] and return
[N, Lq, M * D]. The Triton path goes through the custom op `comer::ms_deform_attn` (torch.compile
friendly); both dispatched paths accept mixed float dtypes (autocast policy in op.py).
"""
from __future__ import annotations

import torch

from .dispatch import ENV_VAR, IMPLS, get_ms_deform_attn_impl, resolve_impl, set_ms_deform_attn_impl
from .op import ms_deform_attn_op, reference_forward
from .reference import ms_deform_attn_reference
from .validation import check_inputs, check_shapes


def _call_op(impl, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    check_shapes(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, same_dtype=False)
    return ms_deform_attn_op(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, impl)


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """[N, S, M, D] values sampled at [N, Lq, M, L, P, 2] locations -> [N, Lq, M*D], by the configured
    implementation (`set_ms_deform_attn_impl` / COMER_MS_DEFORM_ATTN_IMPL, default "auto").

    Eagerly, the reference path runs as plain PyTorch under autograd, so its backward reuses the forward's
    graph instead of recomputing the forward inside the opaque op; under torch.compile it goes through the
    custom op, because the reference reads the level sizes as Python ints (a data-dependent graph break)."""
    impl = resolve_impl(value)
    if impl == "reference" and not torch.compiler.is_compiling():
        check_shapes(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, same_dtype=False)
        return reference_forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return _call_op(impl, value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


def ms_deform_attn_triton(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """The Triton kernels, whatever the switch says."""
    return _call_op("triton", value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


__all__ = [
    "ENV_VAR", "IMPLS", "check_inputs", "check_shapes", "get_ms_deform_attn_impl", "ms_deform_attn",
    "ms_deform_attn_reference", "ms_deform_attn_triton", "set_ms_deform_attn_impl",
]

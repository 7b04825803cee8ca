"""Triton multi-scale deformable attention on a real GPU: low-precision forward and gradients against a
float64 reference, with tolerances set from the reference's own error in the same dtype."""
import pytest
import torch

from comer.kernels import ms_deform_attn, ms_deform_attn_reference, ms_deform_attn_triton, set_ms_deform_attn_impl

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# How much worse than the reference's own low-precision error the kernel may be (the kernel accumulates
# in fp32, so in practice it is better); a floor for outputs where the reference error happens to be ~0.
ERROR_FACTOR = 2.0
ABS_FLOOR = 1e-6


def make_inputs(levels, batch, queries, heads, head_dim, points, device="cuda"):
    spatial_shapes = torch.tensor(levels, dtype=torch.int64, device=device)
    sizes = spatial_shapes.prod(1)
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    value = torch.randn(batch, int(sizes.sum()), heads, head_dim, device=device, dtype=torch.float64)
    locations = torch.rand(batch, queries, heads, len(levels), points, 2, device=device, dtype=torch.float64)
    locations = locations * 1.2 - 0.1
    weights = torch.rand(batch, queries, heads, len(levels) * points, device=device, dtype=torch.float64)
    weights = weights.softmax(-1).view(batch, queries, heads, len(levels), points)
    return value, spatial_shapes, level_start_index, locations, weights


def forward_and_grads(fn, value, spatial_shapes, level_start_index, locations, weights, grad_output):
    inputs = [t.detach().clone().requires_grad_() for t in (value, locations, weights)]
    out = fn(inputs[0], spatial_shapes, level_start_index, inputs[1], inputs[2])
    grads = torch.autograd.grad(out, inputs, grad_output.to(out.dtype))
    return [out.detach().double()] + [g.double() for g in grads]


SHAPES = [
    ([(32, 32), (16, 16), (8, 8)], 2, 1344, 6, 32, 4),  # comer_t at 256x256, self-attention
    ([(32, 32), (16, 16), (8, 8)], 1, 1344, 6, 64, 4),  # comer_s
    ([(16, 16)], 2, 1344, 12, 32, 4),  # comer_b, the 1-level shape
    ([(15, 23), (8, 12), (1, 7)], 1, 333, 3, 96, 4),  # odd sizes, padded head dim
    ([(20, 20), (10, 10)], 1, 500, 2, 128, 2),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"shape{i}" for i in range(len(SHAPES))])
def test_low_precision_matches_float64_reference(shape, dtype):
    inputs = make_inputs(*shape)
    value, spatial_shapes, level_start_index, locations, weights = inputs
    grad_output = torch.randn(shape[1], shape[2], shape[3] * shape[4], device="cuda", dtype=torch.float64)
    exact = forward_and_grads(ms_deform_attn_reference, *inputs, grad_output)
    low = [value.to(dtype), spatial_shapes, level_start_index, locations.to(dtype), weights.to(dtype)]
    reference_low = forward_and_grads(ms_deform_attn_reference, *low, grad_output)
    triton_low = forward_and_grads(ms_deform_attn_triton, *low, grad_output)
    names = ("output", "grad value", "grad sampling_locations", "grad attention_weights")
    for name, e, r, t in zip(names, exact, reference_low, triton_low):
        tolerance = ERROR_FACTOR * (r - e).abs().max().item() + ABS_FLOOR
        error = (t - e).abs().max().item()
        assert error <= tolerance, f"{name}: triton error {error:.3g} > {tolerance:.3g} ({dtype})"


@pytest.mark.parametrize("shape", SHAPES[:2], ids=["shape0", "shape1"])
def test_float32_and_float64_match_reference(shape):
    inputs = make_inputs(*shape)
    grad_output = torch.randn(shape[1], shape[2], shape[3] * shape[4], device="cuda", dtype=torch.float64)
    exact = forward_and_grads(ms_deform_attn_reference, *inputs, grad_output)
    triton64 = forward_and_grads(ms_deform_attn_triton, *inputs, grad_output)
    for e, t in zip(exact, triton64):
        torch.testing.assert_close(t, e, atol=1e-10, rtol=1e-10)
    value, spatial_shapes, level_start_index, locations, weights = inputs
    low = [value.float(), spatial_shapes, level_start_index, locations.float(), weights.float()]
    triton32 = forward_and_grads(ms_deform_attn_triton, *low, grad_output)
    for e, t in zip(exact, triton32):
        torch.testing.assert_close(t, e, atol=1e-3, rtol=1e-3)


def test_autocast_mixed_dtypes_and_dispatch():
    # value bf16 (from a Linear under autocast), locations and weights fp32: auto dispatch runs Triton.
    value, spatial_shapes, level_start_index, locations, weights = make_inputs(*SHAPES[1])
    set_ms_deform_attn_impl("auto")
    try:
        out = ms_deform_attn(value.bfloat16(), spatial_shapes, level_start_index, locations.float(), weights.float())
    finally:
        set_ms_deform_attn_impl(None)
    assert out.dtype == torch.bfloat16
    expected = ms_deform_attn_reference(value.bfloat16().double(), spatial_shapes, level_start_index,
                                        locations.float().double(), weights.float().double())
    torch.testing.assert_close(out.double(), expected, atol=2e-2, rtol=2e-2)


def test_torch_compile_fullgraph_with_triton():
    value, spatial_shapes, level_start_index, locations, weights = make_inputs(*SHAPES[0])
    value, locations, weights = value.float(), locations.float(), weights.float()

    def fn(value, locations, weights):
        return ms_deform_attn_triton(value, spatial_shapes, level_start_index, locations, weights).relu()

    compiled = torch.compile(fn, fullgraph=True)
    torch.testing.assert_close(compiled(value, locations, weights), fn(value, locations, weights))


def test_no_host_sync_once_the_level_layout_was_checked():
    # The level layout's values are read (one sync) the first time a pair of tensors is seen; every later
    # forward and backward only queues kernels, so the CPU can run ahead of the GPU.
    value, spatial_shapes, level_start_index, locations, weights = make_inputs(*SHAPES[1])
    value, locations, weights = (t.bfloat16().requires_grad_() for t in (value, locations, weights))
    ms_deform_attn_triton(value, spatial_shapes, level_start_index, locations, weights)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            out = ms_deform_attn_triton(value, spatial_shapes, level_start_index, locations, weights)
            out.float().square().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert value.grad is not None and locations.grad is not None and weights.grad is not None

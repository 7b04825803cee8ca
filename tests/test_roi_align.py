"""RoIAlign: the reference against hand-computed values and a naive per-RoI / per-bin / per-sample loop,
its gradients, low precision, the Triton kernels (run by the Triton interpreter on CPU) against the
reference, the dispatch switch, torch.compile and bad input."""
import os

# The Triton interpreter is chosen when a @triton.jit function is decorated (see test_ms_deform_attn.py).
os.environ["TRITON_INTERPRET"] = "1"


def _enable_triton_interpreter():
    import importlib

    import triton.language as tl
    from triton.runtime.jit import JITFunction

    if isinstance(tl.zeros, JITFunction):
        importlib.reload(tl.standard)
        importlib.reload(tl)


_enable_triton_interpreter()

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from comer.kernels import (  # noqa: E402
    get_roi_align_impl,
    roi_align,
    roi_align_reference,
    roi_align_triton,
    set_roi_align_impl,
)
from comer.kernels.roi_align import ENV_VAR, triton_kernels  # noqa: E402


def naive_bilinear(image, y, x):
    """torchvision's bilinear_interpolate for one point of a [C, H, W] image (Python floats for y, x)."""
    _, height, width = image.shape
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return image.new_zeros(image.shape[0])
    y, x = max(y, 0.0), max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:
        y_low = y_high = height - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_low = x_high = width - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1.0 - ly, 1.0 - lx
    return (hy * hx * image[:, y_low, x_low] + hy * lx * image[:, y_low, x_high]
            + ly * hx * image[:, y_high, x_low] + ly * lx * image[:, y_high, x_high])


def naive_roi_align(input, rois, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False):
    """RoIAlign written out RoI by RoI, bin by bin, sample by sample (differentiable w.r.t. input)."""
    output_h, output_w = output_size
    channels = input.shape[1]
    offset = 0.5 if aligned else 0.0
    outputs = []
    for batch_index, *box in rois.tolist():
        x1, y1, x2, y2 = (v * spatial_scale - offset for v in box)
        roi_w, roi_h = x2 - x1, y2 - y1
        if not aligned:
            roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
        bin_h, bin_w = roi_h / output_h, roi_w / output_w
        grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_h / output_h)
        grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_w / output_w)
        count = max(grid_h * grid_w, 1)
        image = input[int(batch_index)]
        bins = []
        for ph in range(output_h):
            for pw in range(output_w):
                total = input.new_zeros(channels)
                for iy in range(grid_h):
                    y = y1 + ph * bin_h + (iy + 0.5) * bin_h / grid_h
                    for ix in range(grid_w):
                        x = x1 + pw * bin_w + (ix + 0.5) * bin_w / grid_w
                        total = total + naive_bilinear(image, y, x)
                bins.append(total / count)
        outputs.append(torch.stack(bins, dim=1).view(channels, output_h, output_w))
    if not outputs:
        return input.new_zeros(0, channels, output_h, output_w)
    return torch.stack(outputs)


def random_rois(num_rois, batch, height, width, generator, margin=3.0, max_size=None, dtype=torch.float64):
    """Boxes starting in [-margin, size) and up to max_size (default 0.7 x the map) long, so some stick out
    of the map; every fifth is smaller than a pixel and every seventh inverted; with batch indices."""
    max_size = max_size or 0.7 * max(height, width)
    xy = torch.rand(num_rois, 2, generator=generator, dtype=dtype) * torch.tensor([width + margin,
                                                                                    height + margin]) - margin
    wh = torch.rand(num_rois, 2, generator=generator, dtype=dtype) * max_size
    wh[::5] *= 0.05
    wh[1::7] *= -0.3
    index = torch.randint(batch, (num_rois, 1), generator=generator).to(dtype)
    return torch.cat([index, xy, xy + wh], dim=1)


def grads_of(fn, input, rois, grad_output=None, **kwargs):
    input = input.detach().clone().requires_grad_()
    output = fn(input, rois, **kwargs)
    if grad_output is None:
        grad_output = torch.randn_like(output)
    (grad,) = torch.autograd.grad(output, input, grad_output)
    return output.detach(), grad, grad_output


@pytest.fixture
def restore_impl():
    yield
    set_roi_align_impl(None)


# ---------------------------------------------------------------- hand-computed values

MAP = torch.arange(16, dtype=torch.float64).view(1, 1, 4, 4)  # value = 4 * row + col


def test_hand_values_aligned():
    # aligned: the box [0, 4] covers pixel centres 0..3 exactly; 2 x 2 bins, 2 x 2 samples per bin at
    # pixel centres: each bin is the mean of four pixels.
    out = roi_align_reference(MAP, torch.tensor([[0.0, 0, 0, 4, 4]], dtype=torch.float64), 2, sampling_ratio=2,
                              aligned=True)
    torch.testing.assert_close(out, torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]], dtype=torch.float64))


def test_hand_values_adaptive_not_aligned():
    # not aligned: one bin, ceil(4 / 1) = 4 samples per axis at 0.5, 1.5, 2.5, 3.5; 3.5 is past the last
    # pixel centre, so it reads the last row / column alone: per axis the mean of 0.5, 1.5, 2.5, 3.
    out = roi_align_reference(MAP, [torch.tensor([[0.0, 0, 4, 4]], dtype=torch.float64)], 1)
    axis_mean = (0.5 + 1.5 + 2.5 + 3.0) / 4
    torch.testing.assert_close(out.flatten(), torch.tensor([4 * axis_mean + axis_mean], dtype=torch.float64))


def test_hand_values_at_and_past_the_border():
    rois = torch.tensor([[0.0, -2, 0, 0, 1],  # one sample at x = -1: clamped onto column 0, y = 0.5
                         [0, -3, 0, -1, 1],  # its sample at x = -2: outside, 0
                         [0, 3, 3, 5, 5],  # sample (4, 4) is on the border: reads pixel (3, 3)
                         [0, 1, 1, 1.5, 1.25]], dtype=torch.float64)  # tiny: enlarged to 1 x 1, sample (1.5, 1.5)
    out = roi_align_reference(MAP, rois, 1, sampling_ratio=1).flatten()
    torch.testing.assert_close(out, torch.tensor([(0 + 4) / 2, 0, 15, 7.5], dtype=torch.float64))


def test_spatial_scale_and_non_square_output():
    # spatial_scale 0.5 maps the box [0, 0, 8, 4] to [0, 0, 4, 2]; 1 x 2 bins, 1 sample each at (1, 1), (3, 1)
    out = roi_align_reference(MAP, torch.tensor([[0.0, 0, 0, 8, 4]], dtype=torch.float64), (1, 2),
                              spatial_scale=0.5, sampling_ratio=1)
    torch.testing.assert_close(out, torch.tensor([[[[5.0, 7.0]]]], dtype=torch.float64))


# ---------------------------------------------------------------- against the naive loop

SETTINGS = [(aligned, ratio) for aligned in (False, True) for ratio in (0, 2)]


@pytest.mark.parametrize("aligned,sampling_ratio", SETTINGS)
def test_reference_matches_naive_loop(aligned, sampling_ratio):
    generator = torch.Generator().manual_seed(int(aligned) * 10 + sampling_ratio)
    input = torch.randn(2, 3, 7, 9, dtype=torch.float64, generator=generator)
    outside = torch.tensor([[1.0, -9, -9, -4, -4], [0, 3, 2, 12, 12]], dtype=torch.float64)  # fully, partly out
    rois = torch.cat([random_rois(10, 2, 7, 9, generator), outside])
    kwargs = dict(output_size=(2, 3), spatial_scale=1.0, sampling_ratio=sampling_ratio, aligned=aligned)
    out, grad, grad_output = grads_of(roi_align_reference, input, rois, **kwargs)
    out_naive, grad_naive, _ = grads_of(naive_roi_align, input, rois, grad_output, **kwargs)
    assert out.shape == (12, 3, 2, 3) and out.dtype == torch.float64
    assert (out.flatten(1).abs().amax(1) > 0).sum() >= 6  # most RoIs hit the map
    assert (out.flatten(1).abs().amax(1) == 0).any()  # and some are outside or inverted
    torch.testing.assert_close(out, out_naive, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(grad, grad_naive, atol=1e-12, rtol=1e-12)


def test_reference_matches_naive_loop_with_scale_and_large_boxes():
    generator = torch.Generator().manual_seed(3)
    input = torch.randn(1, 2, 6, 5, dtype=torch.float64, generator=generator)
    rois = random_rois(5, 1, 24, 20, generator, margin=8.0)  # input-image pixels, 4x the map
    kwargs = dict(output_size=(3, 2), spatial_scale=0.25, sampling_ratio=-1, aligned=True)
    out, grad, grad_output = grads_of(roi_align_reference, input, rois, **kwargs)
    out_naive, grad_naive, _ = grads_of(naive_roi_align, input, rois, grad_output, **kwargs)
    torch.testing.assert_close(out, out_naive, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(grad, grad_naive, atol=1e-12, rtol=1e-12)


def test_list_of_boxes_equals_rois_tensor():
    generator = torch.Generator().manual_seed(4)
    input = torch.randn(3, 2, 5, 6, dtype=torch.float64, generator=generator)
    per_image = [random_rois(n, 1, 5, 6, generator)[:, 1:] for n in (3, 0, 2)]
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i), dtype=torch.float64), b], 1)
                      for i, b in enumerate(per_image)])
    expected = naive_roi_align(input, rois, (2, 2))
    for fn in (roi_align, roi_align_reference):
        torch.testing.assert_close(fn(input, per_image, 2), expected, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(fn(input, tuple(per_image), 2), expected, atol=1e-12, rtol=1e-12)


def test_empty_roi_set():
    input = torch.randn(2, 3, 4, 4, requires_grad=True)
    for fn in (roi_align, roi_align_reference, roi_align_triton):
        for boxes in (torch.zeros(0, 5), [torch.zeros(0, 4), torch.zeros(0, 4)]):
            out = fn(input, boxes, (2, 3))
            assert out.shape == (0, 3, 2, 3) and out.dtype == torch.float32
            (grad,) = torch.autograd.grad(out.sum(), input)
            assert grad.shape == input.shape and grad.abs().max() == 0


def test_gradcheck():
    generator = torch.Generator().manual_seed(5)
    input = torch.randn(1, 2, 3, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    rois = random_rois(4, 1, 3, 4, generator, margin=1.0)
    fn = lambda x: roi_align_reference(x, rois, 2, 1.0, 0, False)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (input,), eps=1e-6, atol=1e-8)


# ---------------------------------------------------------------- low precision

@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_matches_fp32_on_the_same_values(dtype, impl, restore_impl):
    """Sums run in fp32, so the only error of a low-precision call (on the same, already rounded, input
    and output gradient) is the final rounding of each output and gradient: half an ulp, eps / 2 relative."""
    set_roi_align_impl(impl)
    generator = torch.Generator().manual_seed(6)
    input = torch.randn(2, 4, 6, 7, generator=generator).to(dtype)
    rois = random_rois(3, 2, 6, 7, generator, dtype=torch.float32)
    out, grad, grad_output = grads_of(roi_align, input, rois, output_size=2, sampling_ratio=2)
    out32, grad32, _ = grads_of(roi_align, input.float(), rois, grad_output.float(), output_size=2, sampling_ratio=2)
    assert out.dtype == dtype and grad.dtype == dtype
    eps = torch.finfo(dtype).eps
    assert out32.abs().max() > 0.1 and grad32.abs().max() > 0.01
    # The Triton interpreter casts fp32 -> bf16 by truncation (a GPU rounds to nearest): up to a whole ulp.
    # (The gradient is cast by PyTorch after the kernel: rounded to nearest on both paths.)
    out_rounding = eps if (impl == "triton" and dtype == torch.bfloat16) else eps / 2
    torch.testing.assert_close(out.float(), out32, rtol=out_rounding, atol=1e-6)
    torch.testing.assert_close(grad.float(), grad32, rtol=eps / 2, atol=1e-6)


def test_low_precision_input_error_is_bounded_by_the_input_rounding():
    """Against fp32 on the unrounded input: an output is an average (weights summing to at most 1) of
    inputs rounded by eps / 2 relative, so it is off by at most eps / 2 * max|input| plus its own rounding."""
    generator = torch.Generator().manual_seed(7)
    input = torch.randn(1, 16, 8, 8, generator=generator)
    rois = random_rois(6, 1, 8, 8, generator, dtype=torch.float32)
    expected = roi_align(input, rois, 3)
    for dtype in (torch.bfloat16, torch.float16):
        eps = torch.finfo(dtype).eps
        actual = roi_align(input.to(dtype), rois, 3).float()
        # (1 + eps): the output's rounding is relative to its own value, itself off by the first term
        bound = eps / 2 * (input.abs().max() + expected.abs()) * (1 + eps) + 1e-6
        assert ((actual - expected).abs() <= bound).all()
        assert (actual - expected).abs().max() > 0  # the rounding is visible: the check can fail


# ---------------------------------------------------------------- Triton against the reference

TRITON_CASES = [
    # batch, channels, H, W, rois, output size, spatial scale, aligned, sampling ratio
    (2, 8, 6, 7, 4, (2, 3), 1.0, False, 0),  # non-square output, two images
    (2, 8, 6, 7, 4, (2, 3), 1.0, True, 2),
    (1, 20, 5, 5, 3, (3, 3), 0.5, True, 0),  # channels not a power of two, boxes in image pixels
    (1, 20, 5, 5, 3, (3, 3), 0.5, False, 2),
    (1, 3, 4, 9, 3, (1, 5), 1.0, False, -1),  # a 1 x K output, 3 channels
]


@pytest.mark.parametrize("case", TRITON_CASES, ids=[f"case{i}" for i in range(len(TRITON_CASES))])
def test_triton_matches_reference(case):
    batch, channels, height, width, num_rois, output_size, scale, aligned, sampling_ratio = case
    generator = torch.Generator().manual_seed(sum(output_size) + int(aligned) + sampling_ratio)
    input = torch.randn(batch, channels, height, width, dtype=torch.float64, generator=generator)
    rois = random_rois(num_rois, batch, height / scale, width / scale, generator, margin=2.0 / scale)
    kwargs = dict(output_size=output_size, spatial_scale=scale, sampling_ratio=sampling_ratio, aligned=aligned)
    out_t, grad_t, grad_output = grads_of(roi_align_triton, input, rois, **kwargs)
    out_r, grad_r, _ = grads_of(roi_align_reference, input, rois, grad_output, **kwargs)
    assert out_t.dtype == torch.float64 and out_t.shape == (num_rois, channels, *output_size)
    torch.testing.assert_close(out_t, out_r, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(grad_t, grad_r, atol=1e-12, rtol=1e-12)


def test_triton_fp32_channels_last_input_and_expanded_grad():
    generator = torch.Generator().manual_seed(8)
    input = torch.randn(2, 16, 5, 6, generator=generator).to(memory_format=torch.channels_last)
    rois = random_rois(4, 2, 5, 6, generator, dtype=torch.float32)
    x_t = input.clone().requires_grad_()
    x_r = input.contiguous().requires_grad_()
    out_t = roi_align_triton(x_t, rois, (2, 2), 1.0, 0, True)
    out_r = roi_align_reference(x_r, rois, (2, 2), 1.0, 0, True)
    torch.testing.assert_close(out_t, out_r, atol=2e-6, rtol=2e-6)
    out_t.sum().backward()  # grad_output is an expanded (stride 0) tensor
    out_r.sum().backward()
    assert x_r.grad.abs().max() > 0
    torch.testing.assert_close(x_t.grad, x_r.grad, atol=2e-6, rtol=2e-6)


def test_triton_gradcheck():
    generator = torch.Generator().manual_seed(9)
    input = torch.randn(1, 2, 3, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    rois = random_rois(2, 1, 3, 4, generator, margin=1.0)
    fn = lambda x: roi_align_triton(x, rois, 2, 1.0, 2, True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (input,), eps=1e-6, atol=1e-8, fast_mode=True)


# ---------------------------------------------------------------- dispatch switch and torch.compile

def test_dispatch_switch(monkeypatch, restore_impl):
    calls = []
    real_forward = triton_kernels.roi_align_forward

    def spy(*args):
        calls.append("triton")
        return real_forward(*args)

    monkeypatch.setattr(triton_kernels, "roi_align_forward", spy)
    input, rois = torch.randn(1, 4, 3, 3), torch.tensor([[0.0, 0, 0, 2, 2]])
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert get_roi_align_impl() == "auto"
    roi_align(input, rois, 2)  # CPU + auto -> reference
    assert calls == []
    monkeypatch.setenv(ENV_VAR, "triton")
    roi_align(input, rois, 2)
    assert calls == ["triton"]
    set_roi_align_impl("reference")  # the setter wins over the environment
    roi_align(input, rois, 2)
    assert calls == ["triton"]
    set_roi_align_impl(None)
    monkeypatch.setenv(ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="'cuda' from environment variable COMER_ROI_ALIGN_IMPL"):
        roi_align(input, rois, 2)
    with pytest.raises(ValueError, match="not one of"):
        set_roi_align_impl("fast")


@pytest.mark.parametrize("impl", [pytest.param("reference", marks=pytest.mark.slow), "triton"])
def test_torch_compile_fullgraph(impl, restore_impl):
    """One opaque custom op under torch.compile (fake shapes, registered autograd); the reference path
    (slow: a second compile) also runs its backward through torch.func.vjp inside the backward op."""
    set_roi_align_impl(impl)
    generator = torch.Generator().manual_seed(10)
    input = torch.randn(1, 4, 5, 5, generator=generator)
    rois = random_rois(3, 1, 5, 5, generator, dtype=torch.float32)

    def fn(x):
        return roi_align(x * 2, rois, 2, sampling_ratio=2).square().sum((1, 2, 3))

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    x = input.clone().requires_grad_()
    out = compiled(x)
    (grad,) = torch.autograd.grad(out.sum(), x)
    x_eager = input.clone().requires_grad_()
    expected = fn(x_eager)
    (expected_grad,) = torch.autograd.grad(expected.sum(), x_eager)
    assert expected_grad.abs().max() > 0
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(grad, expected_grad)


# ---------------------------------------------------------------- bad input

def test_bad_inputs_raise_clear_errors():
    input = torch.randn(2, 3, 4, 4)
    rois = torch.tensor([[0.0, 0, 0, 2, 2], [1, 1, 1, 3, 3]])
    for fn in (roi_align, roi_align_reference, roi_align_triton):
        with pytest.raises(ValueError, match=r"boxes must have shape \[K, 5\].*list of per-image \[L, 4\]"):
            fn(input, rois[:, 1:], 2)
        with pytest.raises(ValueError, match=r"boxes\[1\] must have shape \[K, 4\].*not in a list"):
            fn(input, [rois[:1, 1:], rois], 2)
        with pytest.raises(ValueError, match="list of 1 per-image tensors but input has a batch of 2"):
            fn(input, [rois[:, 1:]], 2)
        with pytest.raises(ValueError, match="boxes must be finite; roi 1"):
            fn(input, torch.tensor([[0.0, 0, 0, 2, 2], [0, 1, float("inf"), 3, 3]]), 2)
        with pytest.raises(ValueError, match=r"roi 1 has batch index 2.0, not an image index in \[0, 2\)"):
            fn(input, torch.tensor([[0.0, 0, 0, 2, 2], [2, 1, 1, 3, 3]]), 2)
        with pytest.raises(ValueError, match="roi 0 has batch index 0.5"):
            fn(input, torch.tensor([[0.5, 0, 0, 2, 2]]), 2)
        with pytest.raises(ValueError, match="output_size must be >= 1"):
            fn(input, rois, (0, 2))
        with pytest.raises(ValueError, match="output_size must be an int or a pair"):
            fn(input, rois, (2, 2, 2))
        with pytest.raises(ValueError, match=r"input must be a \[B, C, H, W\] tensor"):
            fn(input[0], rois, 2)
        with pytest.raises(ValueError, match="boxes is on meta but input is on cpu"):
            fn(input, rois.to("meta"), 2)
        with pytest.raises(ValueError, match="boxes must be a floating-point tensor"):
            fn(input, rois.long(), 2)
        with pytest.raises(ValueError, match="spatial_scale must be positive"):
            fn(input, rois, 2, spatial_scale=0.0)
        with pytest.raises(TypeError, match="sampling_ratio must be an int"):
            fn(input, rois, 2, sampling_ratio=2.0)


# ---------------------------------------------------------------- compiled for real GPUs (no GPU needed)

STATIC_COMPILE_PROBE = """
import re, sys, torch
from comer.kernels.ms_deform_attn.static_compile import compile_launch, resource_usage
from comer.kernels.roi_align import triton_kernels
from comer.kernels.roi_align.geometry import accumulator_dtype, roi_grid
arch = int(sys.argv[1])
for dtype in (torch.float32, torch.bfloat16, torch.float64):
    for size in (7, 14):
        acc = accumulator_dtype(dtype)
        geometry = roi_grid(torch.tensor([[0.0, 1, 1, 30, 30]] * 4), (size, size), 0.25, 0, True, acc).packed()
        output = torch.empty(4, 256, size, size, dtype=dtype)
        launches = {"fwd": triton_kernels.forward_launch(torch.zeros(2, 64, 64, 256, dtype=dtype), geometry, output),
                    "bwd": triton_kernels.backward_launch(output.expand(4, 256, size, size), geometry,
                                                          torch.zeros(2, 64, 64, 256, dtype=acc))}
        for name, launch in launches.items():
            compiled = compile_launch(launch, arch)
            usage = resource_usage(compiled)
            ptx = compiled.asm["ptx"]
            vector = bool(re.search(r"ld\\.global(\\.\\w+)*\\.v4|red\\.global(\\.\\w+)*\\.v4", ptx))
            print(str(dtype)[6:], size, name, usage.registers, usage.spills, "div.rn" in ptx, vector)
"""


@pytest.mark.slow
@pytest.mark.parametrize("arch", [90, 80])
def test_kernels_compile_for_gpus_without_spills(arch):
    """The kernels compile for sm_90 / sm_80 (Triton's bundled ptxas, see ms_deform_attn/static_compile.py) in
    every accumulator dtype at the box (7x7) and mask (14x14) head sizes: no register spills, IEEE divisions
    (sample positions as the reference's), and on sm_90 16-byte channel loads and vector atomics (fp32)."""
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", STATIC_COMPILE_PROBE, str(arch)], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1], env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split() for line in result.stdout.splitlines()]
    assert len(rows) == 12  # 3 dtypes x 2 sizes x (forward, backward)
    for dtype, size, name, registers, spills, ieee_division, vector in rows:
        assert 0 < int(registers) <= 255 and spills == "False" and ieee_division == "True", (dtype, size, name)
        if arch == 90 and dtype != "float64":
            assert vector == "True", (dtype, size, name)

"""Multi-scale deformable attention: the reference against a naive loop, the Triton kernels (run by the
Triton interpreter on CPU) against the reference, the dispatch switch, autocast and torch.compile."""
import os

# The Triton interpreter is chosen when a @triton.jit function is decorated. comer decorates its kernels
# on first use, after this line; Triton's own library functions (tl.zeros, tl.sum, ...) are decorated when
# triton.language is first imported, which torch may already have done (it does under this conftest):
# then re-decorate them in interpreter mode.
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
    get_ms_deform_attn_impl,
    ms_deform_attn,
    ms_deform_attn_reference,
    ms_deform_attn_triton,
    set_ms_deform_attn_impl,
)
from comer.kernels.ms_deform_attn import ENV_VAR, triton_kernels  # noqa: E402


def make_layout(shapes):
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64)
    sizes = spatial_shapes.prod(1)
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    return spatial_shapes, level_start_index, int(sizes.sum())


def make_inputs(shapes, batch, queries, heads, head_dim, points, dtype=torch.float64, low=-0.1, high=1.1):
    spatial_shapes, level_start_index, tokens = make_layout(shapes)
    levels = len(shapes)
    value = torch.randn(batch, tokens, heads, head_dim, dtype=dtype)
    locations = low + (high - low) * torch.rand(batch, queries, heads, levels, points, 2, dtype=dtype)
    weights = torch.rand(batch, queries, heads, levels, points, dtype=dtype)
    return value, spatial_shapes, level_start_index, locations, weights


def naive_ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights):
    """Bilinear sampling written out corner by corner (differentiable, tiny inputs only)."""
    batch, _, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = locations.shape
    rows = []
    for n in range(batch):
        for q in range(queries):
            heads_out = []
            for m in range(heads):
                acc = value.new_zeros(head_dim)
                for level in range(levels):
                    height, width = (int(s) for s in spatial_shapes[level])
                    start = int(level_start_index[level])
                    for p in range(points):
                        x = locations[n, q, m, level, p, 0] * width - 0.5
                        y = locations[n, q, m, level, p, 1] * height - 0.5
                        # floor picks the top-left corner; on an exact pixel centre the location gradient
                        # is the one-sided (right / down) difference, as in grid_sample.
                        x0, y0 = math.floor(float(x.detach())), math.floor(float(y.detach()))
                        fx, fy = x - x0, y - y0
                        for col, row, coeff in ((x0, y0, (1 - fx) * (1 - fy)), (x0 + 1, y0, fx * (1 - fy)),
                                                (x0, y0 + 1, (1 - fx) * fy), (x0 + 1, y0 + 1, fx * fy)):
                            if 0 <= col < width and 0 <= row < height:
                                acc = acc + weights[n, q, m, level, p] * coeff * value[n, start + row * width + col, m]
                heads_out.append(acc)
            rows.append(torch.cat(heads_out))
    return torch.stack(rows).view(batch, queries, heads * head_dim)


def grads_of(fn, value, spatial_shapes, level_start_index, locations, weights, grad_output=None):
    inputs = [t.detach().clone().requires_grad_() for t in (value, locations, weights)]
    output = fn(inputs[0], spatial_shapes, level_start_index, inputs[1], inputs[2])
    if grad_output is None:
        grad_output = torch.randn_like(output)
    grads = torch.autograd.grad(output, inputs, grad_output)
    return output.detach(), grads, grad_output


def assert_close_all(actual, expected, atol, rtol, names=("value", "sampling_locations", "attention_weights")):
    for name, a, e in zip(names, actual, expected):
        assert a.dtype == e.dtype, name
        torch.testing.assert_close(a, e, atol=atol, rtol=rtol, msg=lambda m: f"grad of {name}: {m}")


# ---------------------------------------------------------------- the reference itself

# Locations on borders and pixel centres: maps whose sides are powers of two keep loc * W - 0.5 exact.
BORDER_VALUES = (0.0, 1.0, 0.125, 0.5, 0.875, 0.25, 0.75, -0.25, 1.25, 0.0625)


def border_locations(shape):
    choices = torch.tensor(BORDER_VALUES, dtype=torch.float64)
    return choices[torch.randint(len(choices), shape)]


@pytest.mark.parametrize("shapes,batch,queries,heads,head_dim,points", [
    ([(3, 5), (1, 4)], 2, 3, 2, 3, 2),
    ([(4, 4), (2, 2), (1, 1)], 1, 4, 1, 2, 3),
])
def test_reference_matches_naive_loop(shapes, batch, queries, heads, head_dim, points):
    inputs = make_inputs(shapes, batch, queries, heads, head_dim, points, low=-0.3, high=1.3)
    out_ref, grads_ref, go = grads_of(ms_deform_attn_reference, *inputs)
    out_naive, grads_naive, _ = grads_of(naive_ms_deform_attn, *inputs, grad_output=go)
    assert out_ref.abs().max() > 0.1  # sampling actually hit the maps
    torch.testing.assert_close(out_ref, out_naive, atol=1e-12, rtol=1e-12)
    assert_close_all(grads_ref, grads_naive, atol=1e-12, rtol=1e-12)


def test_reference_matches_naive_loop_on_borders():
    value, spatial_shapes, level_start_index, _, weights = make_inputs([(4, 8), (2, 2)], 1, 5, 2, 2, 2)
    locations = border_locations((1, 5, 2, 2, 2, 2))
    out_ref, grads_ref, go = grads_of(ms_deform_attn_reference, value, spatial_shapes, level_start_index,
                                      locations, weights)
    out_naive, grads_naive, _ = grads_of(naive_ms_deform_attn, value, spatial_shapes, level_start_index,
                                         locations, weights, grad_output=go)
    torch.testing.assert_close(out_ref, out_naive, atol=1e-12, rtol=1e-12)
    assert_close_all(grads_ref, grads_naive, atol=1e-12, rtol=1e-12)


def test_reference_known_values():
    # One 2x2 map with values 0..3, one query sampling the map centre (0.5, 0.5): mean of all four = 1.5;
    # at (0, 0) (top-left corner of the map) only pixel 0 contributes, with bilinear weight 1/4.
    spatial_shapes, level_start_index, _ = make_layout([(2, 2)])
    value = torch.arange(4, dtype=torch.float64).view(1, 4, 1, 1) + 1.0  # 1, 2, 3, 4
    locations = torch.tensor([[0.5, 0.5], [0.0, 0.0]], dtype=torch.float64).view(1, 2, 1, 1, 1, 2)
    weights = torch.ones(1, 2, 1, 1, 1, dtype=torch.float64)
    out = ms_deform_attn_reference(value, spatial_shapes, level_start_index, locations, weights)
    torch.testing.assert_close(out.flatten(), torch.tensor([2.5, 0.25], dtype=torch.float64))


# ---------------------------------------------------------------- Triton against the reference

CASES = [
    # shapes, batch, queries, heads, head_dim, points
    ([(3, 5), (1, 4), (2, 2)], 2, 7, 1, 32, 2),  # non-square, a 1xK level, batch 2, odd Lq
    ([(5, 3)], 1, 13, 1, 64, 4),  # one level, odd sizes, 4 points
    ([(4, 6), (2, 3)], 1, 5, 3, 96, 1),  # head dim padded to 128
    ([(2, 7), (1, 1), (3, 2), (1, 5)], 1, 3, 1, 128, 2),  # four levels, a 1x1 level
    ([(6, 1), (3, 3)], 2, 9, 2, 8, 1),  # a Kx1 level, small head dim, two heads
]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_triton_matches_reference(case, dtype, tol):
    inputs = make_inputs(*case, dtype=dtype, low=-0.2, high=1.2)
    out_t, grads_t, go = grads_of(ms_deform_attn_triton, *inputs)
    out_r, grads_r, _ = grads_of(ms_deform_attn_reference, *inputs, grad_output=go)
    assert out_t.dtype == dtype and out_t.shape == out_r.shape
    torch.testing.assert_close(out_t, out_r, atol=tol, rtol=tol)
    assert_close_all(grads_t, grads_r, atol=tol * 10, rtol=tol * 10)


HEAD_DIMS = (8, 32, 64, 96, 128)


def random_case(seed: int):
    """A random problem: 1-3 levels of 1-9 x 1-9, batch 1-2, 1-2 heads, any supported head dim, 1-3 points,
    and 65-100 queries, so several query blocks (the last one partial) run per (batch, head). (The
    interpreter's time grows with batch x heads x queries x levels x points.)"""
    generator = torch.Generator().manual_seed(seed)

    def draw(low, high):
        return int(torch.randint(low, high + 1, (1,), generator=generator))

    shapes = [(draw(1, 9), draw(1, 9)) for _ in range(draw(1, 3))]
    return shapes, draw(1, 2), draw(65, 100), draw(1, 2), HEAD_DIMS[draw(0, len(HEAD_DIMS) - 1)], draw(1, 3)


@pytest.mark.parametrize("seed", range(6))
def test_triton_matches_reference_on_random_shapes(seed):
    case = random_case(seed)
    inputs = make_inputs(*case, low=-0.2, high=1.2)
    out_t, grads_t, go = grads_of(ms_deform_attn_triton, *inputs)
    out_r, grads_r, _ = grads_of(ms_deform_attn_reference, *inputs, grad_output=go)
    torch.testing.assert_close(out_t, out_r, atol=1e-12, rtol=1e-12, msg=lambda m: f"{case}: {m}")
    assert_close_all(grads_t, grads_r, atol=1e-11, rtol=1e-11)


def test_triton_on_borders_and_outside():
    value, spatial_shapes, level_start_index, _, weights = make_inputs([(4, 8), (2, 2), (1, 4)], 1, 6, 2, 16, 2)
    locations = border_locations((1, 6, 2, 3, 2, 2))
    out_t, grads_t, go = grads_of(ms_deform_attn_triton, value, spatial_shapes, level_start_index, locations,
                                  weights)
    out_r, grads_r, _ = grads_of(ms_deform_attn_reference, value, spatial_shapes, level_start_index, locations,
                                 weights, grad_output=go)
    torch.testing.assert_close(out_t, out_r, atol=1e-12, rtol=1e-12)
    assert_close_all(grads_t, grads_r, atol=1e-12, rtol=1e-12)


def test_points_far_outside_give_zero_and_no_value_gradient():
    value, spatial_shapes, level_start_index, locations, weights = make_inputs([(3, 3)], 1, 4, 1, 16, 2)
    locations = torch.where(torch.rand_like(locations) < 0.5, locations - 2.0, locations + 2.0)
    out, (grad_value, grad_loc, grad_w), _ = grads_of(ms_deform_attn_triton, value, spatial_shapes,
                                                      level_start_index, locations, weights)
    assert out.abs().max() == 0 and grad_value.abs().max() == 0
    assert grad_loc.abs().max() == 0 and grad_w.abs().max() == 0


def test_triton_gradcheck():
    value, spatial_shapes, level_start_index, locations, weights = make_inputs([(2, 3), (1, 2)], 1, 2, 1, 2, 2,
                                                                               low=0.05, high=0.95)
    inputs = [t.requires_grad_() for t in (value, locations, weights)]
    fn = lambda v, loc, w: ms_deform_attn_triton(v, spatial_shapes, level_start_index, loc, w)  # noqa: E731
    # fast mode checks random projections of the Jacobian: a few interpreter calls instead of one per input.
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, fast_mode=True)


def test_non_contiguous_inputs():
    value, spatial_shapes, level_start_index, locations, weights = make_inputs([(3, 5), (2, 2)], 1, 5, 2, 16, 2)
    value_nc = value.transpose(2, 3).contiguous().transpose(2, 3)  # same values, non-contiguous strides
    locations_nc = locations.transpose(1, 2).contiguous().transpose(1, 2)
    assert not value_nc.is_contiguous() and not locations_nc.is_contiguous()
    expected = ms_deform_attn_reference(value, spatial_shapes, level_start_index, locations, weights)
    actual = ms_deform_attn_triton(value_nc, spatial_shapes, level_start_index, locations_nc, weights)
    torch.testing.assert_close(actual, expected, atol=1e-12, rtol=1e-12)


# ---------------------------------------------------------------- bad input

def test_bad_inputs_raise_clear_errors():
    value, spatial_shapes, level_start_index, locations, weights = make_inputs([(3, 5), (2, 2)], 1, 5, 2, 16, 2)
    for fn in (ms_deform_attn, ms_deform_attn_triton, ms_deform_attn_reference):
        with pytest.raises(ValueError, match="value must have rank 4"):
            fn(value[0], spatial_shapes, level_start_index, locations, weights)
        with pytest.raises(ValueError, match="cover 19 tokens but value has 20"):
            fn(torch.cat([value, value[:, :1]], 1), spatial_shapes, level_start_index, locations, weights)
        with pytest.raises(ValueError, match="level_start_index"):
            fn(value, spatial_shapes, level_start_index + 1, locations, weights)
        with pytest.raises(ValueError, match="attention_weights must have shape"):
            fn(value, spatial_shapes, level_start_index, locations, weights[..., :1])
        with pytest.raises(ValueError, match="int64"):
            fn(value, spatial_shapes.int(), level_start_index, locations, weights)
        with pytest.raises(ValueError, match="one device"):
            fn(value, spatial_shapes, level_start_index, locations, weights.to("meta"))
        with pytest.raises(ValueError, match="sampling_locations must be one of"):
            fn(value, spatial_shapes, level_start_index, locations.long(), weights)
    with pytest.raises(ValueError, match="need one dtype"):  # the reference alone is strict about dtypes
        ms_deform_attn_reference(value, spatial_shapes, level_start_index, locations.float(), weights)
    with pytest.raises(ValueError, match="head dim 300 not supported"):
        big = torch.zeros(1, 19, 2, 300, dtype=torch.float64)
        ms_deform_attn_triton(big, spatial_shapes, level_start_index, locations, weights)


def test_level_layout_is_read_once_per_tensor_pair(monkeypatch):
    """The values of spatial_shapes / level_start_index cost a GPU -> host sync: the op reads them the first
    time a pair of tensors is seen, not on every one of a forward's attention calls, and again only when
    a tensor was modified in place or replaced."""
    from comer.kernels.ms_deform_attn import validation

    reads = []
    real_bool = torch.Tensor.__bool__
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda t: reads.append(1) or real_bool(t))
    value, spatial_shapes, level_start_index, locations, weights = make_inputs([(3, 5), (2, 2)], 1, 5, 2, 16, 2)
    for _ in range(3):
        ms_deform_attn_triton(value, spatial_shapes, level_start_index, locations, weights)
    assert len(reads) == 1
    level_start_index.add_(0)  # an in-place write bumps the version: read again
    ms_deform_attn_triton(value, spatial_shapes, level_start_index, locations, weights)
    assert len(reads) == 2
    ms_deform_attn_triton(value, spatial_shapes.clone(), level_start_index, locations, weights)  # a new tensor
    assert len(reads) == 3
    bad_starts = level_start_index.clone()
    bad_starts[1] += 1
    for _ in range(2):  # a failed check is not remembered
        with pytest.raises(ValueError, match="level_start_index"):
            ms_deform_attn_triton(value, spatial_shapes, bad_starts, locations, weights)
    spatial_shapes.mul_(2)  # no longer covers value's tokens: the changed tensor is checked again
    with pytest.raises(ValueError, match="cover 76 tokens but value has 19"):
        ms_deform_attn_triton(value, spatial_shapes, level_start_index, locations, weights)
    assert len(validation._checked_layouts._entries) <= validation._CheckedLayouts.MAX_ENTRIES


def test_level_layout_cache_forgets_dead_tensors():
    from comer.kernels.ms_deform_attn import validation

    value, spatial_shapes, level_start_index, _, _ = make_inputs([(2, 2)], 1, 1, 1, 4, 1)
    validation.check_level_layout(value, spatial_shapes, level_start_index)
    key = (id(spatial_shapes), id(level_start_index), value.shape[1])
    assert key in validation._checked_layouts._entries
    del spatial_shapes
    assert key not in validation._checked_layouts._entries


# ---------------------------------------------------------------- dispatch switch

@pytest.fixture
def restore_impl():
    yield
    set_ms_deform_attn_impl(None)


def test_dispatch_switch(monkeypatch, restore_impl):
    calls = []
    real_forward = triton_kernels.ms_deform_attn_forward

    def spy(*args):
        calls.append("triton")
        return real_forward(*args)

    monkeypatch.setattr(triton_kernels, "ms_deform_attn_forward", spy)
    inputs = make_inputs([(3, 3)], 1, 2, 1, 8, 1)
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert get_ms_deform_attn_impl() == "auto"
    ms_deform_attn(*inputs)  # CPU + auto -> reference
    assert calls == []
    monkeypatch.setenv(ENV_VAR, "triton")
    ms_deform_attn(*inputs)
    assert calls == ["triton"]
    set_ms_deform_attn_impl("reference")  # the setter wins over the environment
    ms_deform_attn(*inputs)
    assert calls == ["triton"]
    set_ms_deform_attn_impl(None)
    monkeypatch.setenv(ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="'cuda' from environment variable COMER_MS_DEFORM_ATTN_IMPL"):
        ms_deform_attn(*inputs)
    with pytest.raises(ValueError, match="not one of"):
        set_ms_deform_attn_impl("fast")


# ---------------------------------------------------------------- autocast and torch.compile

@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_autocast_mixed_dtypes(impl, restore_impl):
    # As in MSDeformAttn under bf16 autocast: value from a Linear (bf16), locations and softmax weights fp32.
    set_ms_deform_attn_impl(impl)
    shapes, heads, head_dim = [(4, 4), (2, 2)], 2, 16
    spatial_shapes, level_start_index, tokens = make_layout(shapes)
    feat = torch.randn(1, tokens, heads * head_dim)
    proj = torch.nn.Linear(heads * head_dim, heads * head_dim)
    locations = torch.rand(1, 6, heads, 2, 2, 2).requires_grad_()
    logits = torch.randn(1, 6, heads, 4).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = proj(feat).view(1, tokens, heads, head_dim)
        weights = logits.softmax(-1).view(1, 6, heads, 2, 2)
        assert value.dtype == torch.bfloat16 and weights.dtype == torch.float32
        out = ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights)
    assert out.dtype == torch.bfloat16
    expected = ms_deform_attn_reference(value.float(), spatial_shapes, level_start_index, locations, weights)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
    out.float().sum().backward()
    assert locations.grad.dtype == torch.float32 and proj.weight.grad.dtype == torch.float32
    assert locations.grad.abs().max() > 0 and logits.grad.abs().max() > 0


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_torch_compile_fullgraph(impl, restore_impl):
    set_ms_deform_attn_impl(impl)
    inputs = make_inputs([(3, 5), (2, 2)], 1, 4, 2, 8, 2, dtype=torch.float32)
    value, spatial_shapes, level_start_index, locations, weights = inputs

    def fn(value, locations, weights):
        return ms_deform_attn(value * 2, spatial_shapes, level_start_index, locations, weights.softmax(-1)).sum(-1)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    value.requires_grad_()
    out = compiled(value, locations, weights)
    expected = fn(value.detach(), locations, weights)
    torch.testing.assert_close(out, expected)
    (grad,) = torch.autograd.grad(out.sum(), value)
    eager_value = value.detach().clone().requires_grad_()
    (expected_grad,) = torch.autograd.grad(fn(eager_value, locations, weights).sum(), eager_value)
    assert expected_grad.abs().max() > 0
    torch.testing.assert_close(grad, expected_grad)


def test_dispatched_reference_path_matches_reference_gradients(restore_impl):
    # CPU + "auto" runs the reference eagerly (plain autograd); it must match the reference exactly.
    inputs = make_inputs([(3, 5), (2, 2)], 2, 4, 2, 3, 2)
    out_op, grads_op, go = grads_of(ms_deform_attn, *inputs)
    out_ref, grads_ref, _ = grads_of(ms_deform_attn_reference, *inputs, grad_output=go)
    torch.testing.assert_close(out_op, out_ref, atol=1e-12, rtol=1e-12)
    assert_close_all(grads_op, grads_ref, atol=1e-12, rtol=1e-12)


def test_backbone_with_triton_path_matches_reference_path(restore_impl):
    """A small ViT-CoMer, forward and backward in float64, gives the same features and parameter gradients
    whichever path runs its deformable attention (every CTI and CNN-side call goes through the op)."""
    from comer import build_backbone

    model = build_backbone("comer_t", embed_dim=48, depth=4, num_heads=3, deform_num_heads=3, num_interactions=4,
                           mrfp_ratio=1.0, drop_path_rate=0.0, cti_init_value=0.1).double().eval()
    images = torch.randn(1, 3, 32, 32, dtype=torch.float64)  # the smallest input: levels 4x4, 2x2, 1x1
    results = {}
    for impl in ("reference", "triton"):
        set_ms_deform_attn_impl(impl)
        model.zero_grad(set_to_none=True)
        features = model(images)
        sum(f.square().mean() for f in features.values()).backward()
        results[impl] = ({k: f.detach() for k, f in features.items()},
                         {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (ref_features, ref_grads), (tri_features, tri_grads) = results["reference"], results["triton"]
    attention_grads = [g for n, g in tri_grads.items() if ".attn.sampling_offsets.weight" in n]
    assert ref_grads.keys() == tri_grads.keys() and len(attention_grads) >= 8
    assert all(g.abs().max() > 0 for g in attention_grads)
    for name in ref_features:
        torch.testing.assert_close(tri_features[name], ref_features[name], atol=1e-10, rtol=1e-10)
    for name in ref_grads:
        torch.testing.assert_close(tri_grads[name], ref_grads[name], atol=1e-9, rtol=1e-8, msg=name)

"""AnchorGenerator against hand-written mmdet 2.x anchors: base shapes (no rounding), ratio-major
order, row-major locations with a location's anchors consecutive, and that order matching a head
output ``[A, H, W]`` read as mmdet does (``permute(1, 2, 0).reshape(-1)``)."""

import math

import pytest
import torch

from comer.heads.anchor_generator import AnchorGenerator

R2 = math.sqrt(2.0)


def base_rpn(stride):
    """The RPN's three base anchors at a level (scale 8, ratios 0.5, 1, 2), written out:
    ratio r has h = 8 * stride * sqrt(r), w = 8 * stride / sqrt(r), centred on (0, 0)."""
    s = 8 * stride / 2  # half the side of the square anchor
    return torch.tensor([
        [-s * R2, -s / R2, s * R2, s / R2],   # ratio 0.5: wide
        [-s, -s, s, s],                       # ratio 1
        [-s / R2, -s * R2, s / R2, s * R2],   # ratio 2: tall
    ])


def shifted(base, x, y):
    return base + torch.tensor([x, y, x, y], dtype=base.dtype)


@pytest.mark.parametrize("stride", [4, 8])
def test_two_by_two_map(stride):
    gen = AnchorGenerator(strides=(stride,))
    (anchors,) = gen.grid_anchors([(2, 2)], device="cpu")
    base = base_rpn(stride)
    expected = torch.cat([
        shifted(base, 0, 0), shifted(base, stride, 0),        # row y = 0: x = 0, then x = stride
        shifted(base, 0, stride), shifted(base, stride, stride),
    ])
    assert anchors.shape == (12, 4) and anchors.dtype == torch.float32
    torch.testing.assert_close(anchors, expected)


def test_stride_4_literal_values():
    (anchors,) = AnchorGenerator(strides=(4,)).grid_anchors([(2, 2)])
    torch.testing.assert_close(anchors[:3], torch.tensor([
        [-22.627417, -11.313708, 22.627417, 11.313708],
        [-16.0, -16.0, 16.0, 16.0],
        [-11.313708, -22.627417, 11.313708, 22.627417],
    ]))
    torch.testing.assert_close(anchors[-3:][1], torch.tensor([-12.0, -12.0, 20.0, 20.0]))


def test_ratio_major_order_with_several_scales():
    gen = AnchorGenerator(strides=(10,), ratios=(0.25, 1.0), scales=(2, 3))
    assert gen.num_base_anchors == 4
    (anchors,) = gen.grid_anchors([(1, 1)])
    widths = anchors[:, 2] - anchors[:, 0]
    heights = anchors[:, 3] - anchors[:, 1]
    # (ratio 0.25, scale 2), (0.25, 3), (1, 2), (1, 3): w = 10 * scale / sqrt(r), h = 10 * scale * sqrt(r)
    torch.testing.assert_close(widths, torch.tensor([40.0, 60.0, 20.0, 30.0]))
    torch.testing.assert_close(heights, torch.tensor([10.0, 15.0, 20.0, 30.0]))


def test_center_offset_moves_the_reference_point():
    (anchors,) = AnchorGenerator(strides=(16,), ratios=(1.0,), scales=(1,), center_offset=0.5).grid_anchors([(1, 2)])
    torch.testing.assert_close(anchors, torch.tensor([[0.0, 0.0, 16.0, 16.0], [16.0, 0.0, 32.0, 16.0]]))


def test_counts_and_order_over_five_levels():
    gen = AnchorGenerator()
    sizes = [(5, 7), (3, 4), (2, 2), (1, 1), (1, 1)]
    levels = gen.grid_anchors(sizes, device="cpu", dtype=torch.float64)
    assert [len(a) for a in levels] == [h * w * 3 for h, w in sizes]
    assert all(a.dtype == torch.float64 for a in levels)
    for (height, width), stride, anchors in zip(sizes, gen.strides, levels):
        centres = (anchors[:, :2] + anchors[:, 2:]) / 2
        ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        expected = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1).double() * stride
        torch.testing.assert_close(centres, expected.repeat_interleave(3, dim=0))
        torch.testing.assert_close(anchors.view(-1, 3, 4)[:, 1, 2] - anchors.view(-1, 3, 4)[:, 1, 0],
                                   torch.full((height * width,), 8.0 * stride, dtype=torch.float64))


def test_order_matches_a_head_output_read_as_mmdet():
    """Entry k of ``score[A, H, W].permute(1, 2, 0).reshape(-1)`` belongs to anchor k."""
    gen = AnchorGenerator(strides=(8,))
    height, width, num = 3, 4, gen.num_base_anchors
    (anchors,) = gen.grid_anchors([(height, width)])
    a, y, x = torch.meshgrid(torch.arange(num), torch.arange(height), torch.arange(width), indexing="ij")
    code = (a * 100 + y * 10 + x).float()  # [A, H, W]
    flat = code.permute(1, 2, 0).reshape(-1)
    base = base_rpn(8)
    for k in range(len(anchors)):
        a_k, y_k, x_k = int(flat[k]) // 100, int(flat[k]) // 10 % 10, int(flat[k]) % 10
        torch.testing.assert_close(anchors[k], shifted(base[a_k], 8.0 * x_k, 8.0 * y_k))
    # Deltas [4A, H, W] read as permute(1, 2, 0).reshape(-1, 4): row k is anchor k's 4 channels.
    channel = torch.arange(4 * num).float()[:, None, None].expand(4 * num, height, width)
    rows = channel.permute(1, 2, 0).reshape(-1, 4)
    anchor_of_row = (flat.long() // 100)
    torch.testing.assert_close(rows, (anchor_of_row[:, None] * 4 + torch.arange(4)).float())


def test_valid_flags_mark_the_images_own_padded_extent():
    gen = AnchorGenerator(strides=(16, 32), ratios=(1.0,), scales=(1,))
    flags = gen.valid_flags([(4, 4), (2, 2)], pad_size=(32, 50))
    # stride 16: rows < ceil(32/16) = 2, cols < ceil(50/16) = 4; stride 32: rows < 1, cols < 2.
    expected0 = torch.zeros(4, 4, dtype=torch.bool)
    expected0[:2, :4] = True
    expected1 = torch.zeros(2, 2, dtype=torch.bool)
    expected1[:1, :2] = True
    assert torch.equal(flags[0], expected0.reshape(-1))
    assert torch.equal(flags[1], expected1.reshape(-1))
    three = AnchorGenerator(strides=(16,)).valid_flags([(2, 2)], pad_size=(16, 32))[0]
    assert three.tolist() == [True] * 6 + [False] * 6


def test_bad_input():
    gen = AnchorGenerator()
    with pytest.raises(ValueError, match="feature_sizes has 4 levels but the anchor strides"):
        gen.grid_anchors([(2, 2)] * 4)
    with pytest.raises(ValueError, match=r"feature_sizes\[1\]"):
        gen.grid_anchors([(2, 2), (2,), (1, 1), (1, 1), (1, 1)])
    with pytest.raises(ValueError, match="ratios"):
        AnchorGenerator(ratios=(0.0, 1.0))
    with pytest.raises(ValueError, match="strides"):
        AnchorGenerator(strides=(4, 8.5))

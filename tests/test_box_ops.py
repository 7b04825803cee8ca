"""Box arithmetic (areas, IoU / IoF, clipping) and the delta box coder (mmdet 2.x semantics)."""
import math

import pytest
import torch

from comer.kernels import DeltaXYWHBBoxCoder, bbox_overlaps, box_area, box_iou, clip_boxes


def t(rows, dtype=torch.float64):
    return torch.tensor(rows, dtype=dtype)


# ---------------------------------------------------------------- areas and overlaps

def test_box_area_hand_values():
    areas = box_area(t([[0, 0, 2, 3], [1, 1, 1, 5], [3, 3, 1, 2]]))
    torch.testing.assert_close(areas, t([6, 0, 2]))  # no +1; an inverted box has (-2) * (-1)


def test_box_iou_hand_values():
    boxes1 = t([[0, 0, 2, 2], [1, 1, 3, 3]])
    boxes2 = t([[1, 1, 3, 3], [0, 0, 1, 1], [2, 2, 4, 4], [10, 10, 11, 11], [0, 0, 2, 2]])
    expected = t([[1 / 7, 1 / 4, 0, 0, 1],  # overlap 1 of union 4 + 4 - 1; a corner touch is 0
                  [1, 0, 1 / 7, 0, 1 / 7]])
    iou = box_iou(boxes1, boxes2)
    assert iou.shape == (2, 5)
    torch.testing.assert_close(iou, expected, atol=1e-15, rtol=0)


def test_box_iou_degenerate_boxes_overlap_nothing():
    boxes = t([[1, 1, 1, 3],  # zero width
               [2, 2, 2, 2],  # a point
               [3, 3, 1, 1],  # inverted (x2 < x1, y2 < y1)
               [0, 0, 4, 4]])
    iou = box_iou(boxes, boxes)
    assert torch.isfinite(iou).all()
    torch.testing.assert_close(iou[:3], torch.zeros(3, 4, dtype=torch.float64))  # even with themselves
    assert iou[3, 3] == 1


@pytest.mark.parametrize("n,m", [(0, 3), (2, 0), (0, 0)])
def test_box_iou_empty(n, m):
    iou = box_iou(torch.rand(n, 4), torch.rand(m, 4))
    assert iou.shape == (n, m) and iou.dtype == torch.float32


def test_iof_divides_by_the_first_boxes_area():
    boxes1 = t([[0, 0, 2, 2], [0, 0, 1, 1], [5, 5, 6, 6]])
    boxes2 = t([[1, 1, 3, 3], [0, 0, 8, 8]])  # boxes1 all inside the second: IoF 1, IoU < 1
    iof = bbox_overlaps(boxes1, boxes2, mode="iof")
    torch.testing.assert_close(iof, t([[1 / 4, 1], [0, 1], [0, 1]]), atol=1e-15, rtol=0)


def test_half_precision_boxes_are_computed_in_fp32():
    boxes1 = t([[1000.0, 0.0, 1001.25, 1.0]], torch.float32)
    boxes2 = t([[1000.0, 0.0, 1002.0, 1.0]], torch.float32)
    torch.testing.assert_close(box_iou(boxes1, boxes2), t([[1.25 / 2]], torch.float32))
    # fp16 holds 1001.25 as 1001.0 (spacing 0.5 below 1024); the IoU itself is computed in fp32
    iou_half = box_iou(boxes1.half(), boxes2.half())
    assert iou_half.dtype == torch.float32
    torch.testing.assert_close(iou_half, t([[0.5]], torch.float32))


def test_overlap_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"boxes1 must have shape \[\.\.\., 4\]"):
        box_iou(torch.rand(3, 5), torch.rand(2, 4))
    with pytest.raises(ValueError, match="boxes2 must be a floating-point tensor"):
        box_iou(torch.rand(3, 4), torch.ones(2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"boxes1 must have shape \[N, 4\]"):
        box_iou(torch.rand(2, 3, 4), torch.rand(2, 4))
    with pytest.raises(ValueError, match="mode must be one of"):
        bbox_overlaps(torch.rand(3, 4), torch.rand(2, 4), mode="giou")


# ---------------------------------------------------------------- clipping

def test_clip_boxes_to_height_and_width():
    boxes = t([[-5, -3, 20, 30], [1, 2, 3, 4], [16, 11, 17, 12]])
    clipped = clip_boxes(boxes, (10, 15))  # (h, w): x to [0, 15], y to [0, 10]
    torch.testing.assert_close(clipped, t([[0, 0, 15, 10], [1, 2, 3, 4], [15, 10, 15, 10]]))
    assert clip_boxes(boxes[None], (10, 15)).shape == (1, 3, 4)
    assert boxes[0, 0] == -5  # not in place
    with pytest.raises(ValueError, match=r"image_size must be \(h, w\)"):
        clip_boxes(boxes, (10, 15, 3))


# ---------------------------------------------------------------- delta coder

RCNN_STDS = (0.1, 0.1, 0.2, 0.2)


def random_boxes(n, generator, low=-50.0, high=500.0, min_size=1.0, max_size=300.0):
    xy = low + (high - low) * torch.rand(n, 2, generator=generator, dtype=torch.float64)
    wh = min_size + (max_size - min_size) * torch.rand(n, 2, generator=generator, dtype=torch.float64)
    return torch.cat([xy, xy + wh], dim=1)


def test_encode_hand_values():
    proposals = t([[0, 0, 10, 20], [0, 0, 10, 20]])
    gt = t([[5, 5, 15, 25], [0, 0, 20, 10]])
    deltas = DeltaXYWHBBoxCoder().encode(proposals, gt)
    # centre (5, 10) size (10, 20) -> centre (10, 15) size (10, 20): dx = 5 / 10, dy = 5 / 20;
    # -> centre (10, 5) size (20, 10): dx = 5 / 10, dy = -5 / 20, dw = log 2, dh = log 1/2
    torch.testing.assert_close(deltas, t([[0.5, 0.25, 0, 0], [0.5, -0.25, math.log(2), math.log(0.5)]]))
    normalised = DeltaXYWHBBoxCoder(means=(0.5, 0, 0, 1), stds=RCNN_STDS).encode(proposals, gt)
    torch.testing.assert_close(normalised, t([[0, 2.5, 0, -5], [0, -2.5, math.log(2) / 0.2,
                                                               (math.log(0.5) - 1) / 0.2]]))


def test_decode_hand_values():
    rois = t([[0, 0, 1, 1], [0, 0, 1, 1], [5, 5, 5, 5], [0, 0, 10, 20]])
    deltas = t([[0, 0, 0, 0], [1, 1, 1, 1], [0.7, -1.9, -0.5, 0.3], [0.5, -0.25, math.log(2), 0]])
    decoded = DeltaXYWHBBoxCoder().decode(rois, deltas)
    e = math.e
    expected = t([[0, 0, 1, 1],
                  [1.5 - e / 2, 1.5 - e / 2, 1.5 + e / 2, 1.5 + e / 2],  # centre 0.5 + 1 * 1, size e
                  [5, 5, 5, 5],  # a zero-size roi stays a point
                  [0, -5, 20, 15]])  # centre (5 + 5, 10 - 5), size (20, 20)
    torch.testing.assert_close(decoded, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("means,stds", [((0, 0, 0, 0), (1, 1, 1, 1)), ((0.1, -0.2, 0.05, 0.3), RCNN_STDS)])
def test_encode_decode_round_trip(means, stds):
    generator = torch.Generator().manual_seed(0)
    proposals = random_boxes(200, generator, min_size=20.0)
    gt = random_boxes(200, generator, min_size=20.0)
    coder = DeltaXYWHBBoxCoder(means, stds)
    deltas = coder.encode(proposals, gt)
    assert deltas.dtype == torch.float64 and deltas.shape == (200, 4)
    log_ratios = deltas[:, 2:] * torch.tensor(stds[2:]) + torch.tensor(means[2:])
    assert log_ratios.abs().max() < coder.max_log_ratio  # sizes within 15x: no clamp in the round trip
    torch.testing.assert_close(coder.decode(proposals, deltas), gt, atol=1e-9, rtol=1e-12)
    torch.testing.assert_close(coder.encode(proposals, coder.decode(proposals, deltas)), deltas, atol=1e-9,
                               rtol=1e-9)


def test_decode_clamps_dw_dh_to_the_ratio_limit():
    rois = t([[0, 0, 10, 10]])
    max_ratio = math.log(1000 / 16)
    for raw, clamped in ((10.0, max_ratio), (-10.0, -max_ratio), (2.0, 2.0)):
        decoded = DeltaXYWHBBoxCoder().decode(rois, t([[0, 0, raw, -raw]]))
        width, height = 10 * math.exp(clamped), 10 * math.exp(-clamped)
        torch.testing.assert_close(decoded, t([[5 - width / 2, 5 - height / 2, 5 + width / 2, 5 + height / 2]]))
    decoded = DeltaXYWHBBoxCoder(wh_ratio_clip=0.5).decode(rois, t([[0, 0, 3.0, 0]]))
    torch.testing.assert_close(decoded, t([[-5, 0, 15, 10]]))  # width 10 * 2
    # the clamp applies to the de-normalised delta: 3 * 0.2 = 0.6 < log(2) is not clamped
    decoded = DeltaXYWHBBoxCoder(stds=RCNN_STDS, wh_ratio_clip=0.5).decode(rois, t([[0, 0, 3.0, 0]]))
    torch.testing.assert_close(decoded[:, 2] - decoded[:, 0], t([10 * math.exp(0.6)]))


def test_decode_clips_x_to_width_and_y_to_height():
    rois = t([[0, 0, 10, 10], [20, 2, 30, 8]])
    deltas = t([[-1, -1, 1, 1], [1, 3, 0, 0]])
    unclipped = DeltaXYWHBBoxCoder().decode(rois, deltas)
    assert unclipped[0, 0] < 0 and unclipped[1, 2] > 35 and unclipped[1, 3] > 20
    clipped = DeltaXYWHBBoxCoder().decode(rois, deltas, max_shape=(20, 35))  # h 20, w 35
    expected = unclipped.clone()
    expected[:, 0::2] = expected[:, 0::2].clamp(0, 35)
    expected[:, 1::2] = expected[:, 1::2].clamp(0, 20)
    torch.testing.assert_close(clipped, expected)
    torch.testing.assert_close(clipped[1], t([30, 20, 35, 20]))  # centre (35, 23), size (10, 6): past w and h
    same = DeltaXYWHBBoxCoder().decode(rois, deltas, max_shape=(20, 35, 3))  # (h, w, c) as mmdet
    torch.testing.assert_close(same, clipped)


def test_decode_per_class_deltas():
    generator = torch.Generator().manual_seed(1)
    rois = random_boxes(7, generator)
    deltas = torch.randn(7, 12, generator=generator, dtype=torch.float64)
    coder = DeltaXYWHBBoxCoder(stds=RCNN_STDS)
    decoded = coder.decode(rois, deltas, max_shape=(300, 400))
    assert decoded.shape == (7, 12)
    for k in range(3):
        torch.testing.assert_close(decoded[:, 4 * k:4 * k + 4],
                                   coder.decode(rois, deltas[:, 4 * k:4 * k + 4], max_shape=(300, 400)))


def test_coder_dtypes_and_empty_inputs():
    coder = DeltaXYWHBBoxCoder()
    assert coder.encode(torch.zeros(0, 4), torch.zeros(0, 4)).shape == (0, 4)
    assert coder.decode(torch.zeros(0, 4), torch.zeros(0, 8), max_shape=(5, 5)).shape == (0, 8)
    boxes = t([[0, 0, 100, 50]], torch.bfloat16)
    assert coder.encode(boxes, boxes).dtype == torch.float32  # low precision is computed in fp32
    assert coder.decode(boxes, torch.zeros(1, 4, dtype=torch.bfloat16)).dtype == torch.float32


def test_coder_errors_name_the_argument():
    coder = DeltaXYWHBBoxCoder()
    with pytest.raises(ValueError, match="proposals .* and gt .* must have one shape"):
        coder.encode(torch.rand(3, 4), torch.rand(2, 4))
    with pytest.raises(ValueError, match=r"deltas must have shape \[N, 4k\]"):
        coder.decode(torch.rand(3, 4), torch.rand(3, 5))
    with pytest.raises(ValueError, match="deltas .* and rois .* must have one N"):
        coder.decode(torch.rand(3, 4), torch.rand(2, 4))
    with pytest.raises(ValueError, match="max_shape must be"):
        coder.decode(torch.rand(3, 4), torch.rand(3, 4), max_shape=(5,))
    with pytest.raises(ValueError, match="stds must be positive"):
        DeltaXYWHBBoxCoder(stds=(1, 1, 0, 1))
    with pytest.raises(ValueError, match="wh_ratio_clip"):
        DeltaXYWHBBoxCoder(wh_ratio_clip=2.0)

"""R-CNN stage pieces against hand-computed values: RoI level mapping and pooling, box head targets and
losses, mask targets, mask pasting, multi-class NMS, and the whole RoI head on empty inputs."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from comer.heads import (
    FCNMaskHead,
    RoIExtractor,
    SamplingResult,
    SharedFCBBoxHead,
    StandardRoIHead,
    mask_targets,
    multiclass_nms,
    paste_masks,
)

STRIDES = (4, 8, 16, 32)


def square(side: float, x0: float = 0.0, y0: float = 0.0) -> list[float]:
    return [x0, y0, x0 + side, y0 + side]


def rois_of(boxes, image: int = 0) -> torch.Tensor:
    boxes = torch.tensor(boxes, dtype=torch.float32)
    return torch.cat([torch.full((boxes.shape[0], 1), float(image)), boxes], dim=1)


def sampling_result(pos_boxes, pos_gt_boxes, pos_labels, neg_boxes, pos_gt_inds=None) -> SamplingResult:
    pos = torch.tensor(pos_boxes, dtype=torch.float32).view(-1, 4)
    neg = torch.tensor(neg_boxes, dtype=torch.float32).view(-1, 4)
    num_pos = pos.shape[0]
    gt_inds = torch.arange(num_pos) if pos_gt_inds is None else torch.tensor(pos_gt_inds, dtype=torch.long)
    return SamplingResult(
        pos_inds=torch.arange(num_pos), neg_inds=torch.arange(num_pos, num_pos + neg.shape[0]),
        pos_boxes=pos, neg_boxes=neg, pos_gt_boxes=torch.tensor(pos_gt_boxes, dtype=torch.float32).view(-1, 4),
        pos_gt_labels=torch.tensor(pos_labels, dtype=torch.long), pos_assigned_gt_inds=gt_inds,
        pos_is_gt=torch.zeros(num_pos, dtype=torch.bool))


# ---------------------------------------------------------------------------------------- RoI extractor
def test_roi_levels_at_the_boundaries():
    extractor = RoIExtractor(output_size=7, featmap_strides=STRIDES, finest_scale=56)
    # sqrt(w*h): below 112 -> p2, [112, 224) -> p3, [224, 448) -> p4, >= 448 -> p5 (clamped both ends).
    sides = [1, 111.9, 112, 223.9, 224, 447.9, 448, 2000]
    levels = extractor.map_roi_levels(rois_of([square(s, 3, 5) for s in sides]))
    assert levels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert levels.dtype == torch.int64
    # non-square: the geometric mean of the sides decides (56 x 224 -> sqrt = 112 -> p3)
    assert extractor.map_roi_levels(rois_of([[0, 0, 56, 224], [0, 0, 55.9, 224]])).tolist() == [1, 0]


def test_roi_pooling_reads_the_mapped_level_at_its_stride():
    extractor = RoIExtractor(output_size=2, featmap_strides=STRIDES, finest_scale=56)
    size = 512
    # level l holds 100 * l + x_l, x_l the column index of that level (a ramp: bilinear sampling is exact)
    features = [100.0 * level + torch.arange(size // s, dtype=torch.float32).expand(1, 3, size // s, size // s)
                for level, s in enumerate(STRIDES)]
    features.append(torch.full((1, 3, size // 64, size // 64), -1.0))  # p6: never read
    boxes = [[16, 8, 80, 72], [64, 32, 192, 160], [0, 0, 256, 256], [128, 128, 448, 448]]  # 64, 128, 256, 320 px
    pooled = extractor(features, rois_of(boxes))
    assert pooled.shape == (4, 3, 2, 2)
    for row, ((x1, _, x2, _), level) in enumerate(zip(boxes, [0, 1, 2, 2])):
        stride = STRIDES[level]
        # aligned RoIAlign: bin j of 2 covers [x1/s - 0.5 + j*w/2, ...]; the mean of a ramp is its centre
        centres = [x1 / stride - 0.5 + (j + 0.5) * (x2 - x1) / stride / 2 for j in range(2)]
        expected = torch.tensor([100.0 * level + c for c in centres]).expand(3, 2, 2)
        torch.testing.assert_close(pooled[row], expected, rtol=0, atol=1e-4)


def test_roi_extractor_with_no_rois_keeps_every_level_in_the_graph():
    extractor = RoIExtractor(output_size=7)
    features = [torch.randn(1, 4, 8, 8, requires_grad=True) for _ in STRIDES]
    pooled = extractor(features, torch.zeros(0, 5))
    assert pooled.shape == (0, 4, 7, 7)
    (pooled.sum() + 0.0).backward()
    assert all(f.grad is not None and torch.count_nonzero(f.grad) == 0 for f in features)


def test_roi_extractor_has_no_state():
    assert list(RoIExtractor(output_size=14).state_dict()) == []


# ---------------------------------------------------------------------------------------- box head
def hand_deltas(proposal, gt, stds=(0.1, 0.1, 0.2, 0.2)):
    px, py = (proposal[0] + proposal[2]) / 2, (proposal[1] + proposal[3]) / 2
    pw, ph = proposal[2] - proposal[0], proposal[3] - proposal[1]
    gx, gy = (gt[0] + gt[2]) / 2, (gt[1] + gt[3]) / 2
    gw, gh = gt[2] - gt[0], gt[3] - gt[1]
    raw = [(gx - px) / pw, (gy - py) / ph, math.log(gw / pw), math.log(gh / ph)]
    return [r / s for r, s in zip(raw, stds)]


BOX_SAMPLES = [
    sampling_result([[0, 0, 10, 10], [5, 5, 15, 25]], [[1, 1, 11, 12], [4, 6, 16, 20]], [2, 0], [[20, 20, 30, 30]]),
    sampling_result([], [], [], [[0, 0, 4, 4], [2, 2, 8, 8]]),
]


def test_box_targets_are_hand_deltas_with_background_last():
    head = SharedFCBBoxHead(num_classes=3, in_channels=2, roi_feat_size=2, fc_out_channels=8)
    targets = head.get_targets(BOX_SAMPLES)
    assert targets.labels.tolist() == [2, 0, 3, 3, 3]
    expected = torch.zeros(5, 4)
    expected[0] = torch.tensor(hand_deltas([0, 0, 10, 10], [1, 1, 11, 12]))  # (1.0, 1.5, 0, log(1.1)/0.2)
    expected[1] = torch.tensor(hand_deltas([5, 5, 15, 25], [4, 6, 16, 20]))  # (0, -1.0, log(1.2)/0.2, log(0.7)/0.2)
    torch.testing.assert_close(targets.deltas, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(expected[0, :2], torch.tensor([1.0, 1.5]))


def test_box_losses_golden_and_by_hand():
    torch.manual_seed(0)
    head = SharedFCBBoxHead(num_classes=3, in_channels=2, roi_feat_size=2, fc_out_channels=8)
    cls_score, bbox_pred = torch.randn(5, 4), torch.randn(5, 12)
    losses = head.loss(cls_score, bbox_pred, head.get_targets(BOX_SAMPLES))
    # by hand: cross-entropy averaged over all 5 sampled RoIs of the batch ...
    labels = [2, 0, 3, 3, 3]
    ce = [torch.logsumexp(cls_score[i], 0) - cls_score[i, c] for i, c in enumerate(labels)]
    torch.testing.assert_close(losses["loss_cls"], sum(ce) / 5)
    # ... L1 on the positives' gt-class deltas, summed and divided by ALL 5 sampled RoIs (mmdet's avg_factor)
    l1 = ((bbox_pred[0, 8:12] - torch.tensor(hand_deltas([0, 0, 10, 10], [1, 1, 11, 12]))).abs().sum()
          + (bbox_pred[1, 0:4] - torch.tensor(hand_deltas([5, 5, 15, 25], [4, 6, 16, 20]))).abs().sum())
    torch.testing.assert_close(losses["loss_bbox"], l1 / 5)
    correct = sum(int(cls_score[i].argmax()) == c for i, c in enumerate(labels))
    assert losses["acc"].item() == pytest.approx(100.0 * correct / 5)
    # golden values (seed 0), so a change of either the loss or this hand computation is seen
    assert losses["loss_cls"].item() == pytest.approx(2.18727, abs=1e-4)
    assert losses["loss_bbox"].item() == pytest.approx(1.44301, abs=1e-4)


def test_box_loss_of_constant_logits_is_log_num_classes():
    head = SharedFCBBoxHead(num_classes=3, in_channels=2, roi_feat_size=2, fc_out_channels=8)
    losses = head.loss(torch.zeros(5, 4), torch.zeros(5, 12), head.get_targets(BOX_SAMPLES))
    assert losses["loss_cls"].item() == pytest.approx(math.log(4))
    total = sum(abs(v) for v in hand_deltas([0, 0, 10, 10], [1, 1, 11, 12]) + hand_deltas([5, 5, 15, 25], [4, 6, 16, 20]))
    assert losses["loss_bbox"].item() == pytest.approx(total / 5, rel=1e-5)


def test_box_head_layout_and_init():
    torch.manual_seed(0)
    head = SharedFCBBoxHead(num_classes=80)
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert shapes == {"shared_fcs.0.weight": (1024, 12544), "shared_fcs.0.bias": (1024,),
                      "shared_fcs.1.weight": (1024, 1024), "shared_fcs.1.bias": (1024,),
                      "fc_cls.weight": (81, 1024), "fc_cls.bias": (81,), "fc_reg.weight": (320, 1024), "fc_reg.bias": (320,)}
    assert head.fc_cls.weight.std().item() == pytest.approx(0.01, rel=0.02)
    assert head.fc_reg.weight.std().item() == pytest.approx(0.001, rel=0.02)
    bound = math.sqrt(6 / (12544 + 1024))  # Xavier uniform
    assert head.shared_fcs[0].weight.abs().max().item() == pytest.approx(bound, rel=1e-3)
    assert all(torch.count_nonzero(getattr(head, n).bias) == 0 for n in ("fc_cls", "fc_reg"))
    cls_score, bbox_pred = head(torch.randn(3, 256, 7, 7))
    assert cls_score.shape == (3, 81) and bbox_pred.shape == (3, 320)


# ---------------------------------------------------------------------------------------- mask targets
def left_half_mask() -> torch.Tensor:
    mask = torch.zeros(2, 8, 8, dtype=torch.bool)
    mask[0, :, :4] = True  # gt 0: columns 0-3
    mask[1, 2:6, :] = True  # gt 1: rows 2-5
    return mask


def test_mask_targets_cut_along_the_box_by_aligned_roi_align():
    boxes = torch.tensor([[0, 0, 8, 8], [2, 0, 6, 8], [0.5, 0, 4.5, 8], [-4, 0, 4, 8], [0, 0, 8, 8]], dtype=torch.float32)
    targets = mask_targets(boxes, left_half_mask(), torch.tensor([0, 0, 0, 0, 1]), mask_size=4)
    # samples at box-relative x = x1 - 0.5 + (j + 0.5) * w / 4 (aligned), bilinear, then >= 0.5
    expected_columns = [
        [1, 1, 0, 0],  # x = 0, 1 | 2, 3 | 4, 5 | 6, 7 (two samples per bin) -> means 1, 1, 0, 0
        [1, 1, 0, 0],  # x = 2, 3, 4, 5
        [1, 1, 1, 1],  # x = 0.5, 1.5, 2.5, 3.5: the last interpolates 1 and 0 to exactly 0.5 -> kept (>=)
        [1, 1, 1, 1],  # clipped to [0, 0, 4, 8] first (mmdet clips proposals to the mask), like the row above
    ]
    for row, columns in enumerate(expected_columns):
        assert targets[row].tolist() == [columns] * 4, row
    assert targets[4].tolist() == [[0] * 4, [1] * 4, [1] * 4, [0] * 4]  # gt 1 (rows 2-5): the right gt is read
    assert targets.dtype == torch.float32
    assert mask_targets(torch.zeros(0, 4), left_half_mask(), torch.zeros(0, dtype=torch.long), 28).shape == (0, 28, 28)


def test_mask_loss_uses_the_gt_class_channel():
    head = FCNMaskHead(num_classes=3, in_channels=4, conv_out_channels=4, num_convs=1, mask_size=2)
    targets = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 0.0], [1.0, 1.0]]])
    labels = torch.tensor([2, 0])
    logits = torch.zeros(2, 3, 2, 2)
    assert head.loss(logits, targets, labels).item() == pytest.approx(math.log(2))
    logits = -20.0 * (2 * targets[:, None] - 1).expand(2, 3, 2, 2).clone()  # every channel wrong ...
    logits[0, 2] *= -1  # ... but the gt channels
    logits[1, 0] *= -1
    assert head.loss(logits, targets, labels).item() == pytest.approx(0.0, abs=1e-8)
    expected = F.binary_cross_entropy_with_logits(logits[[0, 1], [1, 1]], targets)
    assert head.loss(logits, targets, torch.tensor([1, 1])).item() == pytest.approx(expected.item())


def test_mask_head_layout_and_shapes():
    head = FCNMaskHead(num_classes=80)
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert shapes == {**{f"convs.{i}.conv.weight": (256, 256, 3, 3) for i in range(4)},
                      **{f"convs.{i}.conv.bias": (256,) for i in range(4)},
                      "upsample.weight": (256, 256, 2, 2), "upsample.bias": (256,),
                      "conv_logits.weight": (80, 256, 1, 1), "conv_logits.bias": (80,)}
    assert head(torch.randn(2, 256, 14, 14)).shape == (2, 80, 28, 28)
    fan_out = 80 * 1 * 1  # kaiming normal, fan_out, ReLU gain: std = sqrt(2 / fan_out)
    assert head.conv_logits.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.05)


# ---------------------------------------------------------------------------------------- mask paste
def test_paste_of_a_constant_map_fills_exactly_the_box():
    probs = torch.full((1, 28, 28), 0.7)
    masks = paste_masks(probs, torch.tensor([[2.0, 3.0, 10.0, 7.0]]), (12, 16))
    expected = torch.zeros(1, 12, 16, dtype=torch.bool)
    expected[0, 3:7, 2:10] = True  # pixel centres inside the box; outside, the weight is < 1/2
    assert masks.dtype == torch.bool and torch.equal(masks, expected)


def test_paste_of_a_half_map_at_scale_two():
    probs = torch.zeros(1, 28, 28)
    probs[0, :, :14] = 1.0
    masks = paste_masks(probs, torch.tensor([[0.0, 0.0, 56.0, 56.0]]), (56, 60))
    # pixel x samples cell (x + 0.5) / 2 - 0.5; between cells 13 (1) and 14 (0) the value is >= 0.5 up to 13.5,
    # i.e. x <= 27; the border pixels sample 1/4 cell outside: 0.75 of the edge cell, still >= 0.5
    expected = torch.zeros(1, 56, 60, dtype=torch.bool)
    expected[0, :, :28] = True
    assert torch.equal(masks, expected)


def test_paste_of_a_ramp_thresholds_at_half():
    probs = (torch.arange(28, dtype=torch.float32) / 27).expand(1, 28, 28)
    masks = paste_masks(probs, torch.tensor([[4.0, 0.0, 32.0, 28.0]]), (28, 40), threshold=0.5)
    expected = torch.zeros(1, 28, 40, dtype=torch.bool)
    expected[0, :, 4 + 14:32] = True  # cell j = pixel - 4; j / 27 >= 0.5 from j = 14
    assert torch.equal(masks, expected)


def whole_image_paste(probs, boxes, height, width, threshold):
    """mmdet's GPU path: every mask sampled over the whole image (no chunks, no regions)."""
    xs = torch.arange(width, dtype=torch.float32) + 0.5
    ys = torch.arange(height, dtype=torch.float32) + 0.5
    x0, y0, x1, y1 = boxes.split(1, dim=1)
    gx = ((xs - x0) / (x1 - x0) * 2 - 1)[:, None, :].expand(-1, height, width)
    gy = ((ys - y0) / (y1 - y0) * 2 - 1)[:, :, None].expand(-1, height, width)
    sampled = F.grid_sample(probs[:, None], torch.stack([gx, gy], dim=3), align_corners=False)
    return sampled[:, 0] >= threshold


def test_chunked_paste_equals_the_whole_image_paste():
    g = torch.Generator().manual_seed(0)
    num, height, width = 30, 90, 130
    probs = torch.rand(num, 28, 28, generator=g)
    corners = torch.rand(num, 2, generator=g) * torch.tensor([width, height])
    sizes = 2 + torch.rand(num, 2, generator=g) * 60
    boxes = torch.cat([corners - 10, corners - 10 + sizes], dim=1)  # some cross the image border
    expected = whole_image_paste(probs, boxes, height, width, 0.5)
    for chunk_bytes in (1, 50_000, 1 << 30):  # one mask per chunk, a few chunks, one chunk
        assert torch.equal(paste_masks(probs, boxes, (height, width), 0.5, chunk_bytes), expected)


def test_paste_of_100_masks_into_a_test_image_stays_within_the_chunk_memory(monkeypatch):
    """The recipe's test output (100 detections, 1333 x 800): each grid_sample call works on at most
    ``chunk_bytes`` (+ one mask's worth, from rounding the chunk count)."""
    g = torch.Generator().manual_seed(0)
    num, height, width, chunk_bytes = 100, 800, 1333, 64 << 20
    corners = torch.rand(num, 2, generator=g) * torch.tensor([width * 0.8, height * 0.8])
    boxes = torch.cat([corners, corners + 20 + torch.rand(num, 2, generator=g) * 300], dim=1)
    calls = []
    real_grid_sample = F.grid_sample

    def recording_grid_sample(input, grid, *args, **kwargs):
        calls.append(grid.shape[0] * grid.shape[1] * grid.shape[2])
        return real_grid_sample(input, grid, *args, **kwargs)

    monkeypatch.setattr(F, "grid_sample", recording_grid_sample)
    masks = paste_masks(torch.rand(num, 28, 28, generator=g), boxes, (height, width), 0.5, chunk_bytes)
    assert masks.shape == (num, height, width) and masks.dtype == torch.bool
    assert len(calls) > 1 and max(calls) * 12 <= chunk_bytes + height * width * 12  # 12 bytes per pasted pixel
    inside = masks.any(dim=0).nonzero()
    assert inside[:, 1].max() < boxes[:, 2].max() and inside[:, 0].max() < boxes[:, 3].max()


def test_paste_of_degenerate_and_no_boxes():
    masks = paste_masks(torch.ones(2, 28, 28), torch.tensor([[5.0, 5.0, 5.0, 9.0], [3.0, 3.0, 9.0, 3.0]]), (16, 16))
    assert masks.shape == (2, 16, 16) and not masks.any()
    assert paste_masks(torch.zeros(0, 28, 28), torch.zeros(0, 4), (7, 9)).shape == (0, 7, 9)


# ---------------------------------------------------------------------------------------- multi-class NMS
def test_multiclass_nms_by_hand():
    scores = torch.tensor([[0.9, 0.05, 0.05], [0.8, 0.6, 0.0], [0.3, 0.7, 0.0]])  # background last
    boxes = torch.tensor([
        [0, 0, 10, 10, 0, 0, 10, 10],
        [1, 1, 10, 10, 1, 1, 10, 10],  # IoU 0.81 with the box above, in both classes
        [20, 20, 30, 30, 0, 0, 10, 10],
    ], dtype=torch.float32)
    out_boxes, out_scores, out_labels = multiclass_nms(boxes, scores, 0.05, 0.5, 100)
    # class 0: 0.9 keeps, 0.8 suppressed by it, 0.3 (far away) kept; class 1: 0.05 is not > 0.05,
    # 0.7 keeps and suppresses 0.6 -- NMS never crosses classes (0.7's box equals class 0's 0.9 box)
    assert out_scores.tolist() == pytest.approx([0.9, 0.7, 0.3])
    assert out_labels.tolist() == [0, 1, 0] and out_labels.dtype == torch.int64
    assert out_boxes.tolist() == [[0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]]
    _, top_scores, _ = multiclass_nms(boxes, scores, 0.05, 0.5, 2)
    assert top_scores.tolist() == pytest.approx([0.9, 0.7])
    # shared boxes ([K, 4]): in class 1, rois 1 (0.6) and 2 (0.7) no longer overlap, both stay
    _, shared_scores, shared_labels = multiclass_nms(boxes[:, :4], scores, 0.05, 0.5, 100)
    assert shared_scores.tolist() == pytest.approx([0.9, 0.7, 0.6, 0.3]) and shared_labels.tolist() == [0, 1, 1, 0]
    empty = multiclass_nms(boxes, scores, 0.95, 0.5, 100)
    assert [tuple(t.shape) for t in empty] == [(0, 4), (0,), (0,)] and empty[2].dtype == torch.int64


# ---------------------------------------------------------------------------------------- whole RoI head
CLASSES = 3


def small_roi_head() -> StandardRoIHead:
    return StandardRoIHead(
        bbox_roi_extractor=RoIExtractor(output_size=7),
        bbox_head=SharedFCBBoxHead(CLASSES, in_channels=8, fc_out_channels=16),
        mask_roi_extractor=RoIExtractor(output_size=14),
        mask_head=FCNMaskHead(CLASSES, in_channels=8, conv_out_channels=8, num_convs=2),
    )


def pyramid(batch: int = 2, size: int = 64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(batch, 8, size // s, size // s, generator=g, requires_grad=True) for s in STRIDES + (64,)]


def test_roi_head_with_no_proposals_and_no_objects_gives_zero_losses():
    head = small_roi_head()
    features = pyramid()
    empty_boxes = [torch.zeros(0, 4)] * 2
    losses = head.loss(features, [torch.zeros(0, 5)] * 2, empty_boxes, [torch.zeros(0, dtype=torch.long)] * 2,
                       [torch.zeros(0, 64, 64, dtype=torch.bool)] * 2)
    assert {k: v.item() for k, v in losses.items()} == {"loss_cls": 0.0, "loss_bbox": 0.0, "acc": 0.0, "loss_mask": 0.0}
    sum(v for k, v in losses.items() if k.startswith("loss_")).backward()
    assert all(p.grad is not None for p in head.parameters())


def test_roi_head_with_no_proposals_trains_on_the_gt_boxes():
    head = small_roi_head()
    gt_boxes = [torch.tensor([[4.0, 4.0, 30.0, 40.0]]), torch.zeros(0, 4)]
    gt_masks = [torch.zeros(1, 64, 64, dtype=torch.bool), torch.zeros(0, 64, 64, dtype=torch.bool)]
    gt_masks[0][0, 10:30, 8:20] = True
    features = pyramid()
    losses = head.loss(features, [torch.zeros(0, 5)] * 2, gt_boxes, [torch.tensor([1]), torch.zeros(0, dtype=torch.long)],
                       gt_masks, generator=torch.Generator().manual_seed(0))
    # one RoI, the gt box itself: a positive of label 1 with zero target deltas
    cls_score, bbox_pred = head.bbox_head(head.bbox_roi_extractor(features, rois_of(gt_boxes[0].tolist())))
    assert losses["loss_cls"].item() == pytest.approx(F.cross_entropy(cls_score, torch.tensor([1])).item(), rel=1e-5)
    assert losses["loss_bbox"].item() == pytest.approx(bbox_pred[0, 4:8].abs().sum().item(), rel=1e-5)
    assert losses["acc"].item() in (0.0, 100.0)
    mask_logits = head.mask_head(head.mask_roi_extractor(features, rois_of(gt_boxes[0].tolist())))
    target = mask_targets(gt_boxes[0], gt_masks[0], torch.tensor([0]), 28)
    assert 0 < target.mean() < 1  # the 12 x 20 mask inside the 26 x 36 box
    expected = F.binary_cross_entropy_with_logits(mask_logits[0, 1], target[0])  # the label's channel
    assert losses["loss_mask"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_roi_head_on_an_image_without_objects():
    head = small_roi_head()
    features = pyramid(batch=1)
    proposals = [torch.tensor([[0.0, 0.0, 20.0, 20.0, 0.9], [10.0, 10.0, 60.0, 50.0, 0.8], [5.0, 30.0, 25.0, 62.0, 0.7]])]
    losses = head.loss(features, proposals, [torch.zeros(0, 4)], [torch.zeros(0, dtype=torch.long)],
                       [torch.zeros(0, 64, 64, dtype=torch.bool)])
    assert losses["loss_bbox"].item() == 0.0 and losses["loss_mask"].item() == 0.0
    assert 0 < losses["loss_cls"].item() < 10  # 3 negatives: finite, positive
    assert losses["loss_cls"].item() == pytest.approx(math.log(CLASSES + 1), abs=0.1)  # near-uniform init
    (losses["loss_cls"] + losses["loss_bbox"] + losses["loss_mask"]).backward()
    assert torch.count_nonzero(head.bbox_head.fc_cls.weight.grad) > 0
    assert torch.count_nonzero(head.bbox_head.fc_reg.weight.grad) == 0


def test_roi_head_predict_with_no_proposals():
    head = small_roi_head().eval()
    with torch.no_grad():
        results = head.predict(pyramid(), [torch.zeros(0, 5), torch.zeros(0, 5)], [(64, 64), (40, 50)])
    for result, (h, w) in zip(results, [(64, 64), (40, 50)]):
        assert result["boxes"].shape == (0, 4) and result["scores"].shape == (0,)
        assert result["labels"].shape == (0,) and result["labels"].dtype == torch.int64
        assert result["masks"].shape == (0, h, w) and result["masks"].dtype == torch.bool


def test_roi_head_predict_shapes_and_box_clipping():
    torch.manual_seed(0)
    head = small_roi_head().eval()
    proposals = [torch.tensor([[0.0, 0.0, 30.0, 30.0, 0.9], [20.0, 10.0, 63.0, 50.0, 0.5]]), torch.zeros(0, 5)]
    with torch.no_grad():
        results = head.predict(pyramid(), proposals, [(60, 62), (64, 64)])
    first = results[0]
    # near-uniform scores (1/4 > 0.05) -> every (RoI, class) pair survives the threshold; NMS per class keeps both
    # RoIs (IoU < 0.5): 2 x 3 detections, best first, boxes inside the 60 x 62 image
    assert first["boxes"].shape == (6, 4) and sorted(first["labels"].tolist()) == [0, 0, 1, 1, 2, 2]
    assert torch.all(first["scores"][:-1] >= first["scores"][1:])
    assert first["boxes"][:, 2].max() <= 62 and first["boxes"][:, 3].max() <= 60 and first["boxes"].min() >= 0
    assert first["masks"].shape == (6, 60, 62) and first["masks"].dtype == torch.bool
    assert results[1]["boxes"].shape == (0, 4)

"""RPNHead: mmdet key names and init, golden losses on hand-set weights (values recomputed in the
test from the features, with the assignment worked out by hand), empty images, the anchor /
output layout with several anchors per location, proposals (decode, clip, per-level NMS,
nms_pre / max_per_img, small-box removal) and bad input."""

import math

import pytest
import torch
import torch.nn.functional as F

from comer.heads.anchor_generator import AnchorGenerator
from comer.heads.random_sampler import RandomSampler
from comer.heads.rpn_head import RPNHead


def sp(x):
    """softplus: BCE-with-logits is sp(-z) for target 1 and sp(z) for target 0."""
    return F.softplus(torch.as_tensor(x, dtype=torch.float32))


# ---------------------------------------------------------------- one anchor per location
# Anchors 32x32 centred on (16x, 16y) of a 4x4 map (image 64x64). The gt below has IoU 0.79 with
# anchor (y=2, x=2) (positive), 0.36 with (2, 3) and 0.38 with (3, 2) (ignored), < 0.3 with the
# other 13 (negative): worked out by hand in the comments of test_golden_losses_hand_set_weights.
GT = torch.tensor([[18.0, 16.0, 50.0, 52.0]])
POS = [(2, 2)]
IGNORED = [(2, 3), (3, 2)]
NEG = [(y, x) for y in range(4) for x in range(4) if (y, x) not in POS + IGNORED]
# anchor (2, 2) = [16, 16, 48, 48] (centre 32, 32, size 32); gt centre (34, 34), size 32 x 36
TARGET = torch.tensor([2 / 32, 2 / 32, 0.0, math.log(36 / 32)])
CLS_BIAS = -0.5


def single_anchor_head(**kwargs):
    """Features pass through rpn_conv (identity); logits = f0 - 0.5; delta_k = 0.1 (k + 1) f1."""
    head = RPNHead(in_channels=2, feat_channels=2,
                   anchor_generator=AnchorGenerator(strides=(16,), ratios=(1.0,), scales=(2,)), **kwargs)
    with torch.no_grad():
        head.rpn_conv.weight.zero_()
        head.rpn_conv.bias.zero_()
        head.rpn_conv.weight[0, 0, 1, 1] = 1.0
        head.rpn_conv.weight[1, 1, 1, 1] = 1.0
        head.rpn_cls.weight.zero_()
        head.rpn_cls.weight[0, 0] = 1.0
        head.rpn_cls.bias.fill_(CLS_BIAS)
        head.rpn_reg.weight.zero_()
        head.rpn_reg.bias.zero_()
        for k in range(4):
            head.rpn_reg.weight[k, 1] = 0.1 * (k + 1)
    return head


def positive_features(batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 2, 4, 4, generator=g) + 0.1


def expected_sums(f, pos, neg):
    """Sum of BCE terms and of L1 terms for one image's features f [2, 4, 4]."""
    logits = f[0] + CLS_BIAS
    cls = sum(sp(-logits[y, x]) for y, x in pos) + sum(sp(logits[y, x]) for y, x in neg)
    deltas = torch.stack([0.1 * (k + 1) * f[1] for k in range(4)])  # [4, 4, 4]
    bbox = sum((deltas[:, y, x] - TARGET).abs().sum() for y, x in pos)
    return cls, bbox


def test_golden_losses_hand_set_weights():
    # IoU with GT = [18, 16, 50, 52] (area 1152) of anchor [16x-16, 16y-16, 16x+16, 16y+16] (area 1024):
    # (2,2): 30*32 / (2176 - 960) = 0.789;  (2,3): 18*32 / 1600 = 0.36;  (3,2): 30*20 / 1576 = 0.381;
    # (1,2): 30*16 / 1696 = 0.283;  (2,1): 14*32 / 1728 = 0.259;  (3,3): 18*20 / 1816 = 0.198; others less.
    head = single_anchor_head()
    f = positive_features()
    cls_scores, bbox_preds = head([f])
    losses = head.loss(cls_scores, bbox_preds, [GT], [(64, 64)])
    cls, bbox = expected_sums(f[0], POS, NEG)
    num_samples = len(POS) + len(NEG)  # 14: all fit in the 256 samples
    torch.testing.assert_close(losses["loss_rpn_cls"], cls / num_samples)
    torch.testing.assert_close(losses["loss_rpn_bbox"], bbox / num_samples)
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_bbox"}


def test_batch_with_an_empty_image_counts_one_positive_for_it():
    head = single_anchor_head()
    f = positive_features(batch=2)
    losses = head.loss(*head(list([f])), [GT, torch.zeros(0, 4)], [(64, 64), (64, 64)])
    cls0, bbox0 = expected_sums(f[0], POS, NEG)
    all_cells = [(y, x) for y in range(4) for x in range(4)]
    cls1, _ = expected_sums(f[1], [], all_cells)
    # mmdet: per image max(num_pos, 1) + max(num_neg, 1) -> (1 + 13) + (1 + 16)
    torch.testing.assert_close(losses["loss_rpn_cls"], (cls0 + cls1) / 31)
    torch.testing.assert_close(losses["loss_rpn_bbox"], bbox0 / 31)


def test_image_without_objects_finite_cls_zero_bbox():
    head = single_anchor_head()
    f = positive_features(batch=1).requires_grad_()
    losses = head.loss(*head([f]), [torch.zeros(0, 4)], [(64, 64)])
    all_cells = [(y, x) for y in range(4) for x in range(4)]
    cls, _ = expected_sums(f[0].detach(), [], all_cells)
    torch.testing.assert_close(losses["loss_rpn_cls"], cls / 17)
    assert losses["loss_rpn_bbox"].item() == 0.0
    (losses["loss_rpn_cls"] + losses["loss_rpn_bbox"]).backward()
    assert torch.isfinite(f.grad).all() and f.grad[0, 0].abs().sum() > 0
    assert head.rpn_reg.weight.grad is not None and head.rpn_reg.weight.grad.abs().sum() == 0


def test_sampled_loss_on_a_seeded_generator():
    """4 samples at 0.5 positive: the one positive plus 3 negatives drawn as the head of
    randperm(13) (a single positive is under its quota, so no draw for positives)."""
    head = single_anchor_head(sampler=RandomSampler(num=4, pos_fraction=0.5, add_gt_as_proposals=False))
    f = positive_features(seed=3)
    outputs = head([f])
    losses = head.loss(*outputs, [GT], [(64, 64)], generator=torch.Generator().manual_seed(11))
    again = head.loss(*outputs, [GT], [(64, 64)], generator=torch.Generator().manual_seed(11))
    chosen = torch.randperm(len(NEG), generator=torch.Generator().manual_seed(11))[:3]
    cls, bbox = expected_sums(f[0], POS, [NEG[i] for i in chosen])
    torch.testing.assert_close(losses["loss_rpn_cls"], cls / 4)
    torch.testing.assert_close(losses["loss_rpn_bbox"], bbox / 4)
    assert torch.equal(losses["loss_rpn_cls"], again["loss_rpn_cls"])


def test_pad_sizes_leave_out_anchors_beyond_the_images_padded_extent():
    head = single_anchor_head()
    f = positive_features()
    losses = head.loss(*head([f]), [torch.zeros(0, 4)], [(30, 60)], pad_sizes=[(32, 64)])
    valid = [(y, x) for y in range(2) for x in range(4)]  # rows < ceil(32 / 16)
    cls, _ = expected_sums(f[0], [], valid)
    torch.testing.assert_close(losses["loss_rpn_cls"], cls / (1 + 8))


# ---------------------------------------------------------------- three anchors per location
def test_loss_reads_anchor_channels_as_mmdet():
    """gt = the tall (ratio 2) anchor at (y=1, x=2) of a stride-8 map: the only positive. Its box
    deltas are channels 8..11 and its logit channel 2 at (1, 2); the other two anchors there are
    ignored (IoU 0.55, 0.33), every other anchor negative (IoU < 0.2)."""
    head = RPNHead(in_channels=4, feat_channels=4,
                   anchor_generator=AnchorGenerator(strides=(8,), ratios=(0.5, 1.0, 2.0), scales=(1,)))
    w, h = 8 / math.sqrt(2), 8 * math.sqrt(2)
    gt = torch.tensor([[16 - w / 2, 8 - h / 2, 16 + w / 2, 8 + h / 2]])
    cls_scores = torch.zeros(1, 3, 4, 4, requires_grad=True)
    bbox_preds = torch.full((1, 12, 4, 4), 0.1, requires_grad=True)
    losses = head.loss([cls_scores], [bbox_preds], [gt], [(32, 32)])
    (losses["loss_rpn_cls"] + losses["loss_rpn_bbox"]).backward()
    num_samples = 1 + (48 - 3)
    bbox_grad = torch.zeros(1, 12, 4, 4)
    bbox_grad[0, 8:12, 1, 2] = 1.0 / num_samples  # d|0.1 - 0| / d pred (target 0: gt == anchor)
    torch.testing.assert_close(bbox_preds.grad, bbox_grad)
    cls_grad = torch.full((1, 3, 4, 4), 0.5 / num_samples)  # sigmoid(0) - 0 on negatives
    cls_grad[0, 2, 1, 2] = -0.5 / num_samples                # sigmoid(0) - 1 on the positive
    cls_grad[0, 0:2, 1, 2] = 0.0                              # ignored
    torch.testing.assert_close(cls_scores.grad, cls_grad)
    # A prediction off the target shows up, on the positive's channels only.
    preds = torch.zeros(1, 12, 4, 4)
    preds[0, 8:12, 1, 2] = torch.tensor([0.1, -0.2, 0.3, -0.4])
    preds[0, 0:4, 1, 2] = 5.0  # an ignored anchor's deltas never count
    losses = head.loss([torch.zeros(1, 3, 4, 4)], [preds], [gt], [(32, 32)])
    torch.testing.assert_close(losses["loss_rpn_bbox"], torch.tensor(1.0 / num_samples))


def test_proposal_layout_with_three_anchors():
    head = RPNHead(in_channels=4, feat_channels=4, anchor_generator=AnchorGenerator(strides=(8,)), test_nms_pre=1)
    cls = torch.full((1, 3, 2, 4), -5.0)
    cls[0, 2, 1, 3] = 4.0  # tall anchor at x = 3, y = 1
    deltas = torch.zeros(1, 12, 2, 4)
    deltas[0, 8, 1, 3] = 0.25  # its dx
    (proposals,) = head.predict_proposals([cls], [deltas], [(100, 100)], training=False)
    w, h = 64 / math.sqrt(2), 64 * math.sqrt(2)
    cx, cy = 24 + 0.25 * w, 8.0
    score = torch.sigmoid(torch.tensor(4.0))
    expected = torch.tensor([[cx - w / 2, max(0.0, cy - h / 2), cx + w / 2, cy + h / 2, score]])
    torch.testing.assert_close(proposals, expected)


# ---------------------------------------------------------------- proposals, two levels
def two_level_case():
    """Level 0: 16x16 anchors centred on (16x, 16y), a 2x2 map; level 1: one 32x32 anchor at (0, 0).

    level 0 logits [[3, 2], [0, 1]]; anchor (0, 1) moved by dx = -1 onto anchor (0, 0)'s box;
    level 1 (logit 0.5) moved to centre (16, 16) and halved: [8, 8, 24, 24], the same box as
    level-0 anchor (1, 1). Image (h, w) = (20, 40) clips y to 20."""
    cls0 = torch.tensor([[[[3.0, 2.0], [0.0, 1.0]]]])
    deltas0 = torch.zeros(1, 4, 2, 2)
    deltas0[0, 0, 0, 1] = -1.0
    cls1 = torch.tensor([[[[0.5]]]])
    deltas1 = torch.tensor([0.5, 0.5, math.log(0.5), math.log(0.5)]).view(1, 4, 1, 1)
    return [cls0, cls1], [deltas0, deltas1]


def s(x):
    return torch.sigmoid(torch.tensor(x)).item()


A00 = [0.0, 0.0, 8.0, 8.0, s(3.0)]
A11 = [8.0, 8.0, 24.0, 20.0, s(1.0)]
L1 = [8.0, 8.0, 24.0, 20.0, s(0.5)]
A10 = [0.0, 8.0, 8.0, 20.0, s(0.0)]


def two_level_head(**kwargs):
    return RPNHead(in_channels=4, feat_channels=4,
                   anchor_generator=AnchorGenerator(strides=(16, 32), ratios=(1.0,), scales=(1,)), **kwargs)


def test_proposals_decode_clip_and_nms_per_level():
    cls, deltas = two_level_case()
    (proposals,) = two_level_head().predict_proposals(cls, deltas, [(20, 40)], training=False)
    # anchor (0, 1) lands on (0, 0)'s box and is suppressed (same level); level 1's copy of
    # anchor (1, 1)'s box survives (another level).
    torch.testing.assert_close(proposals, torch.tensor([A00, A11, L1, A10]))


def test_nms_pre_and_max_per_img():
    cls, deltas = two_level_case()
    head = two_level_head(train_nms_pre=3, test_nms_pre=1, test_max_per_img=2)
    (test,) = head.predict_proposals(cls, deltas, [(20, 40)], training=False)
    torch.testing.assert_close(test, torch.tensor([A00, L1]))  # 1 per level before NMS
    (train,) = head.predict_proposals(cls, deltas, [(20, 40)], training=True)
    torch.testing.assert_close(train, torch.tensor([A00, A11, L1]))  # 3 per level; 1000 kept
    (capped,) = two_level_head(test_max_per_img=2).predict_proposals(cls, deltas, [(20, 40)], training=False)
    torch.testing.assert_close(capped, torch.tensor([A00, A11]))


def test_small_and_empty_boxes_are_removed():
    cls, deltas = two_level_case()
    (large,) = two_level_head(min_box_size=8.0).predict_proposals(cls, deltas, [(20, 40)], training=False)
    torch.testing.assert_close(large, torch.tensor([A11, L1]))  # 8x8 and 8x12 go: w or h <= 8
    deltas[0][0, 0, 1, 0] = -2.0  # anchor (1, 0) pushed left of the image: clipped to width 0
    (proposals,) = two_level_head().predict_proposals(cls, deltas, [(20, 40)], training=False)
    torch.testing.assert_close(proposals, torch.tensor([A00, A11, L1]))
    (none,) = two_level_head(min_box_size=100.0).predict_proposals(cls, deltas, [(20, 40)], training=False)
    assert none.shape == (0, 5)


def test_proposals_are_clipped_per_image():
    cls, deltas = two_level_case()
    batch_cls = [torch.cat([c, c]) for c in cls]
    batch_deltas = [torch.cat([d, d]) for d in deltas]
    first, second = two_level_head().predict_proposals(batch_cls, batch_deltas, [(20, 40), (64, 12)], training=False)
    torch.testing.assert_close(first, torch.tensor([A00, A11, L1, A10]))
    # image (h=64, w=12): x clipped to 12, y no longer clipped at 20
    torch.testing.assert_close(second, torch.tensor([
        A00, [8.0, 8.0, 12.0, 24.0, s(1.0)], [8.0, 8.0, 12.0, 24.0, s(0.5)], [0.0, 8.0, 8.0, 24.0, s(0.0)],
    ]))


# ---------------------------------------------------------------- the recipe's head
def test_default_head_keys_init_shapes_and_gradients():
    torch.manual_seed(0)
    head = RPNHead()
    assert {k: tuple(v.shape) for k, v in head.state_dict().items()} == {
        "rpn_conv.weight": (256, 256, 3, 3), "rpn_conv.bias": (256,),
        "rpn_cls.weight": (3, 256, 1, 1), "rpn_cls.bias": (3,),
        "rpn_reg.weight": (12, 256, 1, 1), "rpn_reg.bias": (12,),
    }
    assert abs(head.rpn_conv.weight.std().item() - 0.01) < 0.001
    assert head.rpn_cls.bias.abs().sum() == 0
    sizes = [(32, 24), (16, 12), (8, 6), (4, 3), (2, 2)]
    features = [torch.randn(2, 256, h, w) for h, w in sizes]
    cls_scores, bbox_preds = head(features)
    assert [tuple(c.shape) for c in cls_scores] == [(2, 3, h, w) for h, w in sizes]
    assert [tuple(b.shape) for b in bbox_preds] == [(2, 12, h, w) for h, w in sizes]
    gts = [torch.tensor([[10.0, 20.0, 60.0, 90.0], [40.0, 5.0, 90.0, 30.0]]), torch.zeros(0, 4)]
    losses = head.loss(cls_scores, bbox_preds, gts, [(128, 96), (120, 90)], generator=torch.Generator().manual_seed(0))
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_rpn_bbox"] > 0
    (losses["loss_rpn_cls"] + losses["loss_rpn_bbox"]).backward()
    assert head.rpn_conv.weight.grad.abs().sum() > 0 and head.rpn_reg.weight.grad.abs().sum() > 0
    proposals = head.predict_proposals(cls_scores, bbox_preds, [(128, 96), (120, 90)], training=True)
    for boxes, (height, width) in zip(proposals, [(128, 96), (120, 90)]):
        assert boxes.shape[1] == 5 and 0 < boxes.shape[0] <= 1000 and not boxes.requires_grad
        assert bool((boxes[:, 0] >= 0).all() and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all())
        assert bool((boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all())
        assert bool((boxes[1:, 4] <= boxes[:-1, 4]).all())


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad, message", [
    (torch.tensor([[30.0, 0.0, 10.0, 10.0]]), r"gt_boxes\[1\]: box 0 has x2 < x1"),
    (torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, float("inf"), 1.0]]), r"gt_boxes\[1\]: box 1 is not finite"),
    (torch.zeros(2, 5), r"gt_boxes\[1\]: expected shape \[G, 4\]"),
])
def test_bad_gt_boxes_name_the_image(bad, message):
    head = single_anchor_head()
    outputs = head([positive_features(batch=2)])
    with pytest.raises(ValueError, match=message):
        head.loss(*outputs, [GT, bad], [(64, 64), (64, 64)])


def test_level_count_and_batch_mismatches():
    head = RPNHead(in_channels=4, feat_channels=4)
    with pytest.raises(ValueError, match=r"features has 4 levels but the anchor strides \[4, 8, 16, 32, 64\]"):
        head([torch.zeros(1, 4, 8, 8)] * 4)
    with pytest.raises(TypeError, match="list"):
        head({"p2": torch.zeros(1, 4, 8, 8)})
    cls, deltas = two_level_case()
    with pytest.raises(ValueError, match="cls_scores has 2 levels"):
        head.predict_proposals(cls, deltas, [(20, 40)], training=False)
    two = two_level_head()
    with pytest.raises(ValueError, match="image_sizes has 2 entries for a batch of 1"):
        two.predict_proposals(cls, deltas, [(20, 40), (20, 40)], training=False)
    with pytest.raises(ValueError, match="gt_boxes has 2 entries for a batch of 1"):
        two.loss(cls, deltas, [GT, GT], [(20, 40)])
    with pytest.raises(ValueError, match=r"bbox_preds\[1\] must be"):
        two.loss(cls, [deltas[0], deltas[1][:, :2]], [GT], [(20, 40)])

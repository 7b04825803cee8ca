"""MaxIoUAssigner and RandomSampler against hand-made IoU cases with mmdet 2.x semantics."""

import pytest
import torch

from comer.heads.max_iou_assigner import AssignResult, MaxIoUAssigner
from comer.heads.random_sampler import RandomSampler

GT = torch.tensor([[0.0, 0.0, 10.0, 10.0]])


def rpn_assigner(**kwargs):
    return MaxIoUAssigner(pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3, **kwargs)


# ------------------------------------------------------------------ assigner
def test_positive_negative_and_ignored_zones():
    boxes = torch.tensor([
        [0.0, 0.0, 10.0, 10.0],    # IoU 1.0  -> positive
        [0.0, 0.0, 10.0, 8.0],     # IoU 0.8  -> positive
        [0.0, 0.0, 10.0, 5.0],     # IoU 0.5  -> ignored (0.3 <= IoU < 0.7)
        [0.0, 0.0, 10.0, 3.0],     # IoU 0.3  -> ignored (not < 0.3)
        [0.0, 0.0, 10.0, 2.0],     # IoU 0.2  -> negative
        [20.0, 20.0, 30.0, 30.0],  # IoU 0    -> negative
    ])
    result = rpn_assigner().assign(boxes, GT, torch.tensor([4]))
    assert result.num_gts == 1
    assert result.gt_inds.tolist() == [1, 1, -1, -1, 0, 0]
    torch.testing.assert_close(result.max_overlaps, torch.tensor([1.0, 0.8, 0.5, 0.3, 0.2, 0.0]))
    assert result.labels.tolist() == [4, 4, -1, -1, -1, -1]
    assert rpn_assigner().assign(boxes, GT).labels is None


def test_low_quality_match_and_min_pos_iou():
    gts = torch.tensor([[0.0, 0.0, 10.0, 10.0], [100.0, 100.0, 110.0, 110.0], [200.0, 200.0, 210.0, 210.0]])
    boxes = torch.tensor([
        [0.0, 0.0, 10.0, 5.0],         # gt 0's best (0.5): low-quality positive
        [100.0, 100.0, 110.0, 104.0],  # gt 1's best (0.4): low-quality positive
        [100.0, 100.0, 110.0, 103.0],  # 0.3 with gt 1, not its best: ignored
        [200.0, 200.0, 210.0, 202.0],  # gt 2's best is 0.2 < min_pos_iou 0.3: stays negative
    ])
    result = rpn_assigner().assign(boxes, gts, torch.tensor([7, 8, 9]))
    assert result.gt_inds.tolist() == [1, 2, -1, 0]
    assert result.labels.tolist() == [7, 8, -1, -1]
    without = rpn_assigner(match_low_quality=False).assign(boxes, gts)
    assert without.gt_inds.tolist() == [-1, -1, -1, 0]


def test_ties_with_and_without_gt_max_assign_all():
    boxes = torch.tensor([
        [0.0, 0.0, 10.0, 5.0],   # IoU 0.5
        [0.0, 5.0, 10.0, 10.0],  # IoU 0.5 (tie)
        [0.0, 0.0, 5.0, 10.0],   # IoU 0.5 (tie)
        [0.0, 0.0, 10.0, 4.0],   # IoU 0.4
    ])
    assert rpn_assigner(gt_max_assign_all=True).assign(boxes, GT).gt_inds.tolist() == [1, 1, 1, -1]
    assert rpn_assigner(gt_max_assign_all=False).assign(boxes, GT).gt_inds.tolist() == [1, -1, -1, -1]


def test_later_gt_overwrites_a_low_quality_match():
    """mmdet loops over gts in order: box 0 is gt A's positive (IoU 1) but also gt B's best box
    (IoU 0.5), so the low-quality pass hands it to gt B; its max_overlap stays 1."""
    gts = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 20.0]])
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]])
    result = rpn_assigner().assign(boxes, gts, torch.tensor([1, 2]))
    assert result.gt_inds.tolist() == [2, 0]
    assert result.labels.tolist() == [2, -1]
    torch.testing.assert_close(result.max_overlaps, torch.tensor([1.0, 0.0]))
    # Positives by the IoU threshold go to the argmax gt when no low-quality pass runs.
    assert rpn_assigner(match_low_quality=False).assign(boxes, gts).gt_inds.tolist() == [1, 0]


def test_roi_stage_thresholds_and_neg_range():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 6.0], [0.0, 0.0, 10.0, 4.0], [0.0, 0.0, 10.0, 0.5]])
    roi = MaxIoUAssigner(pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5, match_low_quality=True)
    assert roi.assign(boxes, GT).gt_inds.tolist() == [1, 0, 0]
    ranged = MaxIoUAssigner(pos_iou_thr=0.5, neg_iou_thr=(0.1, 0.5), min_pos_iou=0.5)
    assert ranged.assign(boxes, GT).gt_inds.tolist() == [1, 0, -1]  # IoU 0.05 < 0.1: ignored


def test_zero_gts_all_negative_and_zero_boxes_empty():
    boxes = torch.tensor([[0.0, 0.0, 5.0, 5.0], [1.0, 1.0, 3.0, 3.0]])
    result = rpn_assigner().assign(boxes, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    assert result.num_gts == 0
    assert result.gt_inds.tolist() == [0, 0]
    assert result.max_overlaps.tolist() == [0.0, 0.0]
    assert result.labels.tolist() == [-1, -1]
    empty = rpn_assigner().assign(torch.zeros(0, 4), GT, torch.tensor([3]))
    assert empty.gt_inds.shape == (0,) and empty.max_overlaps.shape == (0,) and empty.labels.shape == (0,)
    assert empty.num_gts == 1


def test_proposals_with_a_score_column_are_accepted():
    proposals = torch.tensor([[0.0, 0.0, 10.0, 10.0, 0.9], [20.0, 20.0, 30.0, 30.0, 0.8]])
    assert rpn_assigner().assign(proposals, GT).gt_inds.tolist() == [1, 0]


def test_add_gt_prepends_self_matches():
    result = AssignResult(
        num_gts=2,
        gt_inds=torch.tensor([0, 2, -1]),
        max_overlaps=torch.tensor([0.1, 0.8, 0.4]),
        labels=torch.tensor([-1, 6, -1]),
    )
    result.add_gt_(torch.tensor([5, 6]))
    assert result.gt_inds.tolist() == [1, 2, 0, 2, -1]
    torch.testing.assert_close(result.max_overlaps, torch.tensor([1.0, 1.0, 0.1, 0.8, 0.4]))
    assert result.labels.tolist() == [5, 6, -1, 6, -1]


@pytest.mark.parametrize("gt, message", [
    (torch.tensor([[10.0, 0.0, 5.0, 10.0]]), "x2 < x1"),
    (torch.tensor([[0.0, 0.0, float("nan"), 10.0]]), "not finite"),
    (torch.tensor([[0.0, 0.0, 10.0]]), r"\[G, 4\]"),
])
def test_bad_gt_boxes_are_named(gt, message):
    with pytest.raises(ValueError, match=f"gt_boxes.*{message}"):
        rpn_assigner().assign(GT, gt)


def test_bad_labels_are_named():
    with pytest.raises(ValueError, match=r"gt_labels: labels must be >= 0"):
        rpn_assigner().assign(GT, GT, torch.tensor([-2]))
    with pytest.raises(ValueError, match=r"gt_labels: expected shape \[1\]"):
        rpn_assigner().assign(GT, GT, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="gt_labels: expected an integer"):
        rpn_assigner().assign(GT, GT, torch.tensor([1.0]))


# ------------------------------------------------------------------ sampler
def assignment(num_pos, num_neg, num_ignored=0, num_gts=2):
    """An AssignResult with positives first (cycling over gts), then negatives, then ignored."""
    gt_inds = torch.cat([
        torch.arange(num_pos) % num_gts + 1,
        torch.zeros(num_neg, dtype=torch.long),
        torch.full((num_ignored,), -1, dtype=torch.long),
    ])
    labels = torch.where(gt_inds > 0, gt_inds + 10, torch.full_like(gt_inds, -1))
    return AssignResult(num_gts, gt_inds, torch.rand(len(gt_inds)), labels)


def candidate_boxes(n):
    xy = torch.arange(n, dtype=torch.float32)[:, None] * 2
    return torch.cat([xy, xy, xy + 1, xy + 1], dim=1)


GTS = torch.tensor([[0.0, 0.0, 4.0, 4.0], [10.0, 10.0, 20.0, 20.0]])
LABELS = torch.tensor([3, 5])


def test_counts_and_fraction():
    result = RandomSampler(num=16, pos_fraction=0.25, add_gt_as_proposals=False).sample(
        assignment(10, 90, 20), candidate_boxes(120), GTS)
    assert result.num_pos == 4 and result.num_neg == 12
    assert bool((result.pos_inds < 10).all()) and bool(((result.neg_inds >= 10) & (result.neg_inds < 100)).all())
    assert torch.equal(result.pos_inds, result.pos_inds.unique())
    assert torch.equal(result.neg_inds, result.neg_inds.unique())
    torch.testing.assert_close(result.pos_boxes, candidate_boxes(120)[result.pos_inds])
    torch.testing.assert_close(result.boxes, candidate_boxes(120)[torch.cat([result.pos_inds, result.neg_inds])])
    # positives cycle over the two gts: even index -> gt 0, odd -> gt 1
    assert result.pos_assigned_gt_inds.tolist() == (result.pos_inds % 2).tolist()
    torch.testing.assert_close(result.pos_gt_boxes, GTS[result.pos_inds % 2])
    assert result.pos_gt_labels.tolist() == (result.pos_inds % 2 + 11).tolist()
    assert not bool(result.pos_is_gt.any())


def test_fewer_positives_than_the_quota_fill_with_negatives():
    result = RandomSampler(num=16, pos_fraction=0.5, add_gt_as_proposals=False).sample(
        assignment(2, 90), candidate_boxes(92), GTS)
    assert result.pos_inds.tolist() == [0, 1] and result.num_neg == 14
    few = RandomSampler(num=16, pos_fraction=0.5, add_gt_as_proposals=False).sample(
        assignment(2, 5, 30), candidate_boxes(37), GTS)
    assert few.pos_inds.tolist() == [0, 1] and few.neg_inds.tolist() == [2, 3, 4, 5, 6]  # ignored never drawn


def test_neg_pos_upper_bound():
    sampler = RandomSampler(num=64, pos_fraction=0.25, neg_pos_ub=2, add_gt_as_proposals=False)
    assert sampler.sample(assignment(3, 90), candidate_boxes(93), GTS).num_neg == 6
    assert sampler.sample(assignment(0, 90), candidate_boxes(90), GTS).num_neg == 2  # max(1, 0) * 2


def test_add_gt_as_proposals():
    assign = assignment(3, 40, num_gts=2)
    result = RandomSampler(num=8, pos_fraction=1.0, add_gt_as_proposals=True).sample(
        assign, candidate_boxes(43), GTS, LABELS)
    # the 2 gts are prepended: 5 positives (indices 0..4), all drawn
    assert result.pos_inds.tolist() == [0, 1, 2, 3, 4]
    assert result.pos_is_gt.tolist() == [True, True, False, False, False]
    torch.testing.assert_close(result.pos_boxes[:2], GTS)
    assert result.pos_assigned_gt_inds.tolist() == [0, 1, 0, 1, 0]
    assert result.pos_gt_labels.tolist() == [3, 5, 11, 12, 11]
    assert assign.gt_inds.shape == (45,)  # extended in place
    assert result.num_neg == 3 and bool((result.neg_inds >= 5).all())
    # no gts: nothing prepended, everything negative
    empty = RandomSampler(num=8, pos_fraction=0.5).sample(
        rpn_assigner().assign(candidate_boxes(10), torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)),
        candidate_boxes(10), torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    assert empty.num_pos == 0 and empty.num_neg == 8 and empty.pos_gt_boxes.shape == (0, 4)
    with pytest.raises(ValueError, match="gt_labels must be given"):
        RandomSampler(num=8, pos_fraction=0.5).sample(assignment(3, 40), candidate_boxes(43), GTS)


def test_seeded_generator_is_reproducible_and_draws_through_randperm():
    sampler = RandomSampler(num=16, pos_fraction=0.25, add_gt_as_proposals=False)

    def draw(seed):
        return sampler.sample(assignment(30, 200), candidate_boxes(230), GTS,
                              generator=torch.Generator().manual_seed(seed))

    first, again = draw(7), draw(7)
    assert torch.equal(first.pos_inds, again.pos_inds) and torch.equal(first.neg_inds, again.neg_inds)
    assert any(not torch.equal(first.neg_inds, draw(seed).neg_inds) for seed in (8, 9, 10))
    # positives first, then negatives, each the head of one randperm of its candidates
    g = torch.Generator().manual_seed(7)
    expected_pos = torch.randperm(30, generator=g)[:4].sort().values
    expected_neg = (torch.randperm(200, generator=g)[:12] + 30).sort().values
    assert torch.equal(first.pos_inds, expected_pos) and torch.equal(first.neg_inds, expected_neg)


def test_sampler_rejects_mismatched_assignment():
    with pytest.raises(ValueError, match="assign_result covers 10 boxes but boxes has 9"):
        RandomSampler(num=8, pos_fraction=0.5).sample(assignment(2, 8), candidate_boxes(9), GTS, LABELS)

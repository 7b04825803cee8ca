"""SegmentationIoU: hand-computed IoU / Acc on small masks, ignore handling, absent classes,
dataset-level accumulation (not a mean of per-image scores), state merging as under DDP."""

import math

import pytest
import torch

from comer.metrics import SegmentationIoU, format_table

IGNORE = 255

# 4 classes; class 3 only predicted on an ignored pixel -> absent -> excluded from the means.
TARGET = torch.tensor([[[0, 0, 1, 1, IGNORE], [2, 2, 1, 0, IGNORE]]])
PREDS = torch.tensor([[[0, 1, 1, 1, 2], [2, 0, 1, 0, 3]]])
# Valid pixels (target, pred): (0,0) (0,1) (1,1) (1,1) / (2,2) (2,0) (1,1) (0,0)
# class 0: label 3, pred 3, intersect 2 -> union 4 -> IoU 1/2, Acc 2/3
# class 1: label 3, pred 4, intersect 3 -> union 4 -> IoU 3/4, Acc 1
# class 2: label 2, pred 1, intersect 1 -> union 2 -> IoU 1/2, Acc 1/2
EXPECTED_IOU = [0.5, 0.75, 0.5]
EXPECTED_ACC = [2 / 3, 1.0, 0.5]


def test_hand_made_masks():
    metric = SegmentationIoU(num_classes=4, ignore_index=IGNORE)
    metric.update(PREDS, TARGET)
    result = metric.compute()
    torch.testing.assert_close(result["IoU"][:3], torch.tensor(EXPECTED_IOU, dtype=torch.float64))
    torch.testing.assert_close(result["Acc"][:3], torch.tensor(EXPECTED_ACC, dtype=torch.float64))
    assert math.isnan(result["IoU"][3]) and math.isnan(result["Acc"][3])
    assert result["mIoU"].item() == pytest.approx(sum(EXPECTED_IOU) / 3)  # 0.5833, class 3 excluded
    assert result["mAcc"].item() == pytest.approx(sum(EXPECTED_ACC) / 3)
    assert result["aAcc"].item() == pytest.approx(6 / 8)
    torch.testing.assert_close(metric.area_union, torch.tensor([4.0, 4.0, 2.0, 0.0], dtype=torch.float64))


def test_class_only_predicted_counts_as_zero_iou():
    metric = SegmentationIoU(num_classes=3)
    metric.update(torch.tensor([[[0, 2, 0, 0]]]), torch.tensor([[[0, 0, 0, 0]]]))
    result = metric.compute()
    # class 0: 3/4; class 1 absent (NaN, excluded); class 2: predicted once, never labelled -> 0
    assert result["IoU"][0].item() == 0.75 and result["IoU"][2].item() == 0.0
    assert math.isnan(result["IoU"][1])
    assert result["mIoU"].item() == pytest.approx(0.375)


def test_scores_are_argmaxed():
    logits = torch.nn.functional.one_hot(PREDS, 4).permute(0, 3, 1, 2).float() * 3.0 - 1.0
    a, b = SegmentationIoU(num_classes=4), SegmentationIoU(num_classes=4)
    a.update(PREDS, TARGET)
    b.update(logits.softmax(1), TARGET)
    for key in ("IoU", "Acc"):
        torch.testing.assert_close(a.compute()[key], b.compute()[key], equal_nan=True)


def test_accumulation_is_dataset_level():
    image_a = (torch.tensor([[[0, 0, 0, 0]]]), torch.tensor([[[0, 0, 0, 0]]]))  # (preds, target)
    image_b = (torch.tensor([[[0, 0, 0, 0]]]), torch.tensor([[[1, 0, 0, 0]]]))
    streamed = SegmentationIoU(num_classes=2)
    per_image = []
    for preds, target in (image_a, image_b):
        streamed.update(preds, target)
        single = SegmentationIoU(num_classes=2)
        single.update(preds, target)
        per_image.append(single.compute()["mIoU"].item())
    together = SegmentationIoU(num_classes=2)
    together.update(torch.cat([image_a[0], image_b[0]]), torch.cat([image_a[1], image_b[1]]))
    # dataset: class 0 intersect 7 / union 8, class 1 intersect 0 / union 1 -> (0.875 + 0) / 2
    assert streamed.compute()["mIoU"].item() == pytest.approx(0.4375)
    assert together.compute()["mIoU"].item() == pytest.approx(0.4375)
    assert per_image == pytest.approx([1.0, 0.375])  # their mean, 0.6875, is NOT the dataset mIoU
    assert streamed.compute()["aAcc"].item() == pytest.approx(7 / 8)


def test_states_merge_by_sum_like_ddp():
    rank0, rank1 = SegmentationIoU(num_classes=4), SegmentationIoU(num_classes=4)
    rank0.update(PREDS[:, :1], TARGET[:, :1])
    rank1.update(PREDS[:, 1:], TARGET[:, 1:])
    rank0.merge_state(rank1)
    assert rank0.compute()["mIoU"].item() == pytest.approx(sum(EXPECTED_IOU) / 3)
    assert all(rank0._reductions[name] is not None for name in ("area_intersect", "area_union", "area_label"))


def test_reset_clears_state():
    metric = SegmentationIoU(num_classes=4)
    metric.update(PREDS, TARGET)
    metric.reset()
    metric.update(TARGET.clamp(max=3), TARGET)  # perfect on classes 0..2 (ignored pixels stay ignored)
    assert metric.compute()["mIoU"].item() == pytest.approx(1.0)


def test_bad_inputs_name_the_problem():
    metric = SegmentationIoU(num_classes=4)
    with pytest.raises(ValueError, match=r"target hold class ids \[7\]"):
        metric.update(PREDS, torch.full_like(TARGET, 7))
    with pytest.raises(ValueError, match=r"preds hold class ids \[9\]"):
        metric.update(torch.full_like(PREDS, 9), TARGET)
    with pytest.raises(ValueError, match="differ in shape"):
        metric.update(PREDS[:, :1], TARGET)
    with pytest.raises(ValueError, match="5 channels"):
        metric.update(torch.zeros(1, 5, 2, 5), TARGET)
    with pytest.raises(ValueError, match="class_names"):
        SegmentationIoU(num_classes=4, class_names=["a"])


def test_format_table():
    metric = SegmentationIoU(num_classes=4)
    metric.update(PREDS, TARGET)
    table = format_table(metric.compute(), ["wall", "floor", "tree", "sky"])
    lines = table.splitlines()
    assert lines[1].split() == ["wall", "50.00", "66.67"]
    assert lines[4].split() == ["sky", "nan", "nan"]
    assert lines[-1] == "mIoU 58.33  mAcc 72.22  aAcc 75.00"
    with pytest.raises(ValueError, match="2 class names for 4 classes"):
        format_table(metric.compute(), ["a", "b"])

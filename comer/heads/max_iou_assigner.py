"""Max-IoU assignment of boxes (anchors or proposals) to ground truths with mmdet 2.x's
``MaxIoUAssigner`` semantics, used by the RPN (0.7 / 0.3 / 0.3) and the RoI stage (0.5 / 0.5 / 0.5).

Also the ground-truth checks every training-target builder runs first, so a bad annotation fails
with the argument and image that carry it instead of as a NaN loss later.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from comer.kernels import box_iou

# gt_inds codes (mmdet's): 0 is background, -1 is "neither" (no loss), k > 0 is ground truth k - 1.
NEGATIVE = 0
IGNORED = -1


def check_gt_boxes(boxes: torch.Tensor, name: str = "gt_boxes") -> None:
    """``boxes`` must be a finite ``[G, 4]`` (x1, y1, x2, y2) tensor with x2 >= x1 and y2 >= y1.

    ``name`` says where it came from in the message, e.g. ``"gt_boxes[3]"`` for image 3.
    """
    if not isinstance(boxes, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor [G, 4], got {type(boxes).__name__}")
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{name}: expected shape [G, 4], got {tuple(boxes.shape)}")
    if not boxes.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got {boxes.dtype}")
    if boxes.numel() == 0:
        return
    finite = torch.isfinite(boxes).all(dim=1)
    if not bool(finite.all()):
        row = int((~finite).nonzero()[0])
        raise ValueError(f"{name}: box {row} is not finite: {boxes[row].tolist()}")
    inverted = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    if bool(inverted.any()):
        row = int(inverted.nonzero()[0])
        raise ValueError(f"{name}: box {row} has x2 < x1 or y2 < y1: {boxes[row].tolist()}")


def check_gt_labels(
    labels: torch.Tensor, num_gts: int, name: str = "gt_labels", num_classes: int | None = None
) -> None:
    """``labels`` must be an integer ``[G]`` tensor in ``[0, num_classes)`` (upper bound when given)."""
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor [G], got {type(labels).__name__}")
    if labels.dim() != 1 or labels.shape[0] != num_gts:
        raise ValueError(f"{name}: expected shape [{num_gts}] (one label per gt box), got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"{name}: expected an integer tensor, got {labels.dtype}")
    if labels.numel() == 0:
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or (num_classes is not None and high >= num_classes):
        bound = f"[0, {num_classes})" if num_classes is not None else ">= 0"
        raise ValueError(f"{name}: labels must be {bound}; got values in [{low}, {high}]")


@dataclass
class AssignResult:
    """Per box: ``gt_inds`` (0 negative, -1 ignored, k > 0 matched to gt k - 1), its best IoU
    with any gt, and (when labels were given) the matched gt's label, -1 elsewhere."""

    num_gts: int
    gt_inds: torch.Tensor
    max_overlaps: torch.Tensor
    labels: torch.Tensor | None = None

    @property
    def num_boxes(self) -> int:
        return self.gt_inds.numel()

    def add_gt_(self, gt_labels: torch.Tensor) -> None:
        """Prepend the ground truths as boxes matched to themselves (IoU 1, their own label), as
        when the sampler puts the gt boxes in front of the candidates."""
        self_inds = torch.arange(1, len(gt_labels) + 1, dtype=torch.long, device=self.gt_inds.device)
        self.gt_inds = torch.cat([self_inds, self.gt_inds])
        self.max_overlaps = torch.cat([self.max_overlaps.new_ones(len(gt_labels)), self.max_overlaps])
        if self.labels is not None:
            self.labels = torch.cat([gt_labels.to(device=self.labels.device, dtype=self.labels.dtype), self.labels])


class MaxIoUAssigner:
    """mmdet 2.x ``MaxIoUAssigner`` (without ignore regions or CPU fallback):

    1. every box starts ignored (-1);
    2. negative (0) when ``0 <= max_iou < neg_iou_thr`` (or inside ``[lo, hi)`` for a pair);
    3. positive (its argmax gt) when ``max_iou >= pos_iou_thr``;
    4. with ``match_low_quality``, every gt whose best IoU is ``>= min_pos_iou`` takes its best box
       (all boxes tied at that IoU when ``gt_max_assign_all``), later gts overwriting earlier ones.

    No gts: every box negative. No boxes: an empty result.
    """

    def __init__(
        self,
        pos_iou_thr: float,
        neg_iou_thr: float | Sequence[float],
        min_pos_iou: float,
        match_low_quality: bool = True,
        gt_max_assign_all: bool = True,
    ) -> None:
        if isinstance(neg_iou_thr, (int, float)):
            neg_range = (0.0, float(neg_iou_thr))
        else:
            neg_range = tuple(float(t) for t in neg_iou_thr)
            if len(neg_range) != 2 or neg_range[0] > neg_range[1]:
                raise ValueError(f"MaxIoUAssigner: neg_iou_thr must be a float or (lo, hi), got {neg_iou_thr}")
        if neg_range[1] > pos_iou_thr:
            raise ValueError(f"MaxIoUAssigner: neg_iou_thr {neg_iou_thr} exceeds pos_iou_thr {pos_iou_thr}")
        self.pos_iou_thr = float(pos_iou_thr)
        self.neg_iou_thr = neg_iou_thr
        self.neg_range = neg_range
        self.min_pos_iou = float(min_pos_iou)
        self.match_low_quality = bool(match_low_quality)
        self.gt_max_assign_all = bool(gt_max_assign_all)

    def assign(
        self,
        boxes: torch.Tensor,
        gt_boxes: torch.Tensor,
        gt_labels: torch.Tensor | None = None,
    ) -> AssignResult:
        if boxes.dim() != 2 or boxes.shape[1] < 4:
            raise ValueError(f"MaxIoUAssigner: boxes must be [N, 4] (or [N, 5] with scores), got {tuple(boxes.shape)}")
        check_gt_boxes(gt_boxes, "gt_boxes")
        if gt_labels is not None:
            check_gt_labels(gt_labels, gt_boxes.shape[0], "gt_labels")
        boxes = boxes[:, :4]
        num_boxes, num_gts = boxes.shape[0], gt_boxes.shape[0]
        device = boxes.device

        def labels_for(gt_inds: torch.Tensor) -> torch.Tensor | None:
            if gt_labels is None:
                return None
            labels = torch.full((num_boxes,), -1, dtype=torch.long, device=device)
            matched = gt_inds > 0
            labels[matched] = gt_labels.to(device=device, dtype=torch.long)[gt_inds[matched] - 1]
            return labels

        if num_gts == 0 or num_boxes == 0:
            fill = NEGATIVE if num_gts == 0 else IGNORED
            gt_inds = torch.full((num_boxes,), fill, dtype=torch.long, device=device)
            max_overlaps = boxes.new_zeros((num_boxes,))
            return AssignResult(num_gts, gt_inds, max_overlaps, labels_for(gt_inds))

        overlaps = box_iou(gt_boxes.to(device), boxes)  # [G, N]
        max_overlaps, argmax_overlaps = overlaps.max(dim=0)
        gt_inds = torch.full((num_boxes,), IGNORED, dtype=torch.long, device=device)
        low, high = self.neg_range
        gt_inds[(max_overlaps >= low) & (max_overlaps < high)] = NEGATIVE
        positive = max_overlaps >= self.pos_iou_thr
        gt_inds[positive] = argmax_overlaps[positive] + 1

        if self.match_low_quality:
            gt_max_overlaps, gt_argmax_overlaps = overlaps.max(dim=1)
            if self.gt_max_assign_all:
                best = overlaps == gt_max_overlaps[:, None]
            else:
                best = torch.zeros_like(overlaps, dtype=torch.bool)
                best[torch.arange(num_gts, device=device), gt_argmax_overlaps] = True
            best &= (gt_max_overlaps >= self.min_pos_iou)[:, None]
            # mmdet loops over the gts in order, so the last gt claiming a box wins: the first True
            # in the gt-reversed mask (argmax returns the first maximum).
            claimed = best.any(dim=0)
            last_gt = num_gts - 1 - best.flip(0).to(torch.uint8).argmax(dim=0)
            gt_inds[claimed] = last_gt[claimed] + 1

        return AssignResult(num_gts, gt_inds, max_overlaps, labels_for(gt_inds))

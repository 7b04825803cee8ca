"""Random sampling of positives and negatives from an assignment, with mmdet 2.x's
``RandomSampler`` semantics (RPN: 256 at 0.5 positive; RoI stage: 512 at 0.25 with the gt boxes
added as proposals). Randomness comes from ``torch.randperm`` with an optional generator, so a
seeded run draws the same samples."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from comer.heads.max_iou_assigner import AssignResult, check_gt_boxes, check_gt_labels


@dataclass
class SamplingResult:
    """Indices into the candidates the sampler saw (the gt boxes first when it added them), the
    sampled boxes, and for positives their gt box, label (None without labels), gt index and
    whether the positive is a gt box itself. Indices ascend within positives and within negatives."""

    pos_inds: torch.Tensor
    neg_inds: torch.Tensor
    pos_boxes: torch.Tensor
    neg_boxes: torch.Tensor
    pos_gt_boxes: torch.Tensor
    pos_gt_labels: torch.Tensor | None
    pos_assigned_gt_inds: torch.Tensor
    pos_is_gt: torch.Tensor

    @property
    def boxes(self) -> torch.Tensor:
        """Positives then negatives, ``[P + Q, 4]``."""
        return torch.cat([self.pos_boxes, self.neg_boxes], dim=0)

    @property
    def num_pos(self) -> int:
        return self.pos_inds.numel()

    @property
    def num_neg(self) -> int:
        return self.neg_inds.numel()


def _random_choice(gallery: torch.Tensor, num: int, generator: torch.Generator | None) -> torch.Tensor:
    """``num`` distinct entries of ``gallery`` drawn by ``randperm``."""
    perm_device = generator.device if generator is not None else torch.device("cpu")
    perm = torch.randperm(gallery.numel(), generator=generator, device=perm_device)[:num]
    return gallery[perm.to(gallery.device)]


class RandomSampler:
    """Up to ``int(num * pos_fraction)`` random positives, then random negatives to fill ``num``
    (at most ``neg_pos_ub * max(1, num_pos)`` when ``neg_pos_ub >= 0``)."""

    def __init__(
        self,
        num: int,
        pos_fraction: float,
        neg_pos_ub: float = -1,
        add_gt_as_proposals: bool = True,
    ) -> None:
        if num < 1:
            raise ValueError(f"RandomSampler: num must be >= 1, got {num}")
        if not 0.0 <= pos_fraction <= 1.0:
            raise ValueError(f"RandomSampler: pos_fraction must be in [0, 1], got {pos_fraction}")
        self.num = int(num)
        self.pos_fraction = float(pos_fraction)
        self.neg_pos_ub = neg_pos_ub
        self.add_gt_as_proposals = bool(add_gt_as_proposals)

    def _sample(self, candidates: torch.Tensor, num: int, generator: torch.Generator | None) -> torch.Tensor:
        if candidates.numel() <= num:
            return candidates
        return _random_choice(candidates, num, generator).unique()

    def sample(
        self,
        assign_result: AssignResult,
        boxes: torch.Tensor,
        gt_boxes: torch.Tensor,
        gt_labels: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> SamplingResult:
        """Samples from ``boxes`` ([N, 4], or [N, 5] proposals whose score column is dropped).

        With ``add_gt_as_proposals`` and at least one gt, the gt boxes are put in front of the
        candidates and ``assign_result`` is extended in place (``add_gt_``), as in mmdet.
        """
        if boxes.dim() != 2 or boxes.shape[1] < 4:
            raise ValueError(f"RandomSampler: boxes must be [N, 4] (or [N, 5] with scores), got {tuple(boxes.shape)}")
        if assign_result.num_boxes != boxes.shape[0]:
            raise ValueError(
                f"RandomSampler: assign_result covers {assign_result.num_boxes} boxes but boxes has {boxes.shape[0]}"
            )
        check_gt_boxes(gt_boxes, "gt_boxes")
        if gt_labels is not None:
            check_gt_labels(gt_labels, gt_boxes.shape[0], "gt_labels")
        boxes = boxes[:, :4]
        is_gt = torch.zeros(boxes.shape[0], dtype=torch.bool, device=boxes.device)
        if self.add_gt_as_proposals and gt_boxes.shape[0] > 0:
            if gt_labels is None:
                raise ValueError("RandomSampler: gt_labels must be given when add_gt_as_proposals is True")
            boxes = torch.cat([gt_boxes.to(boxes.dtype), boxes], dim=0)
            assign_result.add_gt_(gt_labels)
            is_gt = torch.cat([torch.ones(gt_boxes.shape[0], dtype=torch.bool, device=boxes.device), is_gt])

        gt_inds = assign_result.gt_inds
        pos_inds = self._sample((gt_inds > 0).nonzero().view(-1), int(self.num * self.pos_fraction), generator)
        num_neg = self.num - pos_inds.numel()
        if self.neg_pos_ub >= 0:
            num_neg = min(num_neg, int(self.neg_pos_ub * max(1, pos_inds.numel())))
        neg_inds = self._sample((gt_inds == 0).nonzero().view(-1), num_neg, generator)

        pos_assigned_gt_inds = gt_inds[pos_inds] - 1
        if gt_boxes.shape[0] == 0:
            pos_gt_boxes = gt_boxes.new_zeros((0, 4))
        else:
            pos_gt_boxes = gt_boxes[pos_assigned_gt_inds]
        return SamplingResult(
            pos_inds=pos_inds,
            neg_inds=neg_inds,
            pos_boxes=boxes[pos_inds],
            neg_boxes=boxes[neg_inds],
            pos_gt_boxes=pos_gt_boxes,
            pos_gt_labels=assign_result.labels[pos_inds] if assign_result.labels is not None else None,
            pos_assigned_gt_inds=pos_assigned_gt_inds,
            pos_is_gt=is_gt[pos_inds],
        )

"""Box head of the R-CNN stage (mmdet 2.x ``Shared2FCBBoxHead``): shared fully connected layers
on the pooled RoI features, then a classifier over the classes + background (background LAST) and
class-specific box deltas."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from comer.kernels import DeltaXYWHBBoxCoder
from comer.kernels.boxes import BOX_DIM

# The recipe's R-CNN box target normalisation (mmdet DeltaXYWHBBoxCoder target_means / target_stds).
BOX_TARGET_MEANS = (0.0, 0.0, 0.0, 0.0)
BOX_TARGET_STDS = (0.1, 0.1, 0.2, 0.2)


@dataclass
class BoxTargets:
    """Per sampled RoI of a batch (images concatenated, each image's positives first):
    ``labels`` [R] (num_classes = background), ``deltas`` [R, 4] (zero for negatives)."""

    labels: torch.Tensor
    deltas: torch.Tensor


class SharedFCBBoxHead(nn.Module):
    """``num_shared_fcs`` x (Linear + ReLU) on the flattened RoI features, then ``fc_cls``
    (num_classes + 1 logits, background last) and ``fc_reg`` (4 deltas per class).

    Args:
        num_classes: foreground classes.
        in_channels, roi_feat_size: shape of the pooled RoI features (256 x 7 x 7).
        fc_out_channels: width of the shared layers (1024).
        num_shared_fcs: number of shared layers (2: mmdet's Shared2FCBBoxHead).
        bbox_coder: encodes / decodes the class-specific deltas (None: target stds 0.1, 0.1, 0.2, 0.2).
        cls_init_std, reg_init_std: std of the normal init of fc_cls / fc_reg (mmdet: 0.01 / 0.001);
            the shared layers get Xavier-uniform weights; every bias starts at 0.
        loss_cls_weight, loss_bbox_weight: factors on the cross-entropy and L1 losses.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 256,
        roi_feat_size: int = 7,
        fc_out_channels: int = 1024,
        num_shared_fcs: int = 2,
        bbox_coder: DeltaXYWHBBoxCoder | None = None,
        cls_init_std: float = 0.01,
        reg_init_std: float = 0.001,
        loss_cls_weight: float = 1.0,
        loss_bbox_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if num_shared_fcs < 1:
            raise ValueError(f"num_shared_fcs must be >= 1, got {num_shared_fcs}")
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.roi_feat_size = roi_feat_size
        self.bbox_coder = bbox_coder if bbox_coder is not None else DeltaXYWHBBoxCoder(BOX_TARGET_MEANS, BOX_TARGET_STDS)
        self.loss_cls_weight = loss_cls_weight
        self.loss_bbox_weight = loss_bbox_weight
        widths = [in_channels * roi_feat_size * roi_feat_size] + [fc_out_channels] * num_shared_fcs
        self.shared_fcs = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.relu = nn.ReLU(inplace=True)
        self.fc_cls = nn.Linear(fc_out_channels, num_classes + 1)
        self.fc_reg = nn.Linear(fc_out_channels, BOX_DIM * num_classes)
        for fc in self.shared_fcs:
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)
        nn.init.normal_(self.fc_cls.weight, std=cls_init_std)
        nn.init.zeros_(self.fc_cls.bias)
        nn.init.normal_(self.fc_reg.weight, std=reg_init_std)
        nn.init.zeros_(self.fc_reg.bias)

    @property
    def background_label(self) -> int:
        return self.num_classes

    def forward(self, roi_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[K, C, s, s] -> (class logits [K, num_classes + 1], deltas [K, 4 * num_classes])."""
        x = roi_features.flatten(1)
        for fc in self.shared_fcs:
            x = self.relu(fc(x))
        return self.fc_cls(x), self.fc_reg(x)

    def get_targets(self, sampling_results: Sequence) -> BoxTargets:
        """Labels and regression targets of every sampled RoI (positives first in each image, as
        ``SamplingResult.boxes``), images concatenated."""
        labels, deltas = [], []
        for result in sampling_results:
            num_pos, num_neg = result.pos_boxes.shape[0], result.neg_boxes.shape[0]
            image_labels = result.pos_boxes.new_full((num_pos + num_neg,), self.background_label, dtype=torch.long)
            image_deltas = result.pos_boxes.new_zeros(num_pos + num_neg, BOX_DIM)
            if num_pos > 0:
                image_labels[:num_pos] = result.pos_gt_labels
                image_deltas[:num_pos] = self.bbox_coder.encode(result.pos_boxes, result.pos_gt_boxes)
            labels.append(image_labels)
            deltas.append(image_deltas)
        return BoxTargets(torch.cat(labels), torch.cat(deltas))

    def loss(self, cls_score: torch.Tensor, bbox_pred: torch.Tensor, targets: BoxTargets) -> dict[str, torch.Tensor]:
        """mmdet 2.x ``BBoxHead.loss`` with the recipe's losses:

        - ``loss_cls``: cross-entropy averaged over all sampled RoIs of the batch;
        - ``loss_bbox``: L1 between the positives' deltas of their gt class and the targets, summed
          over the positives' 4 coordinates and divided by the number of ALL sampled RoIs of the
          batch (mmdet's ``avg_factor=bbox_targets.size(0)``); exactly 0 without positives;
        - ``acc``: top-1 classification accuracy in percent (a metric, not a loss).
        No sampled RoI at all gives zero losses that still reach every parameter of the head.
        """
        cls_score, bbox_pred = cls_score.float(), bbox_pred.float()
        labels = targets.labels
        num_rois = labels.shape[0]
        if num_rois == 0:
            zero = cls_score.sum() * 0.0 + bbox_pred.sum() * 0.0
            return {"loss_cls": zero, "loss_bbox": zero.clone(), "acc": zero.detach().clone()}
        loss_cls = F.cross_entropy(cls_score, labels, reduction="sum") / num_rois
        positive = labels < self.background_label
        if bool(positive.any()):
            per_class = bbox_pred.view(num_rois, self.num_classes, BOX_DIM)
            pos_pred = per_class[positive, labels[positive]]
            loss_bbox = (pos_pred - targets.deltas[positive]).abs().sum() / num_rois
        else:
            loss_bbox = bbox_pred[positive].sum()
        accuracy = (cls_score.argmax(dim=1) == labels).float().mean() * 100.0
        return {"loss_cls": self.loss_cls_weight * loss_cls, "loss_bbox": self.loss_bbox_weight * loss_bbox,
                "acc": accuracy.detach()}

    def decode(self, boxes: torch.Tensor, cls_score: torch.Tensor, bbox_pred: torch.Tensor,
               image_size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(class-specific boxes [K, 4 * num_classes] clipped to ``image_size`` (h, w),
        class probabilities [K, num_classes + 1] with background last) for RoIs ``boxes`` [K, 4]."""
        scores = F.softmax(cls_score.float(), dim=-1)
        decoded = self.bbox_coder.decode(boxes, bbox_pred.float(), max_shape=tuple(int(s) for s in image_size))
        return decoded, scores

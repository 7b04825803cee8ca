"""Region Proposal Network head with mmdet 2.x's ``RPNHead`` semantics and key names
(``rpn_conv``, ``rpn_cls``, ``rpn_reg``), so released Mask R-CNN checkpoints load and propose the
same boxes.

Layouts (mmdet's): a level's objectness ``[B, A, H, W]`` is read as ``permute(0, 2, 3, 1)`` ->
``[B, H*W*A]`` and its deltas ``[B, 4A, H, W]`` as ``[B, H*W*A, 4]`` (channel ``4a + k`` is
coordinate ``k`` of anchor ``a``), which is the order of ``AnchorGenerator.grid_anchors``.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from comer.heads.anchor_generator import AnchorGenerator
from comer.heads.max_iou_assigner import MaxIoUAssigner, check_gt_boxes
from comer.heads.random_sampler import RandomSampler
from comer.kernels import DeltaXYWHBBoxCoder, batched_nms

# mmdet's RPNHead init_cfg: every conv N(0, 0.01), zero bias.
RPN_INIT_STD = 0.01


class RPNHead(nn.Module):
    """One shared 3x3 conv + ReLU, then a 1x1 sigmoid-objectness conv (``A`` outputs) and a 1x1
    box-delta conv (``4A``) on every pyramid level.

    The defaults are the standard R50-FPN Mask R-CNN's: anchors scale 8, ratios 0.5/1/2, strides
    4-64; assigner IoU 0.7/0.3 (min 0.3, low-quality matches); 256 samples, half positive;
    proposals: 2000 (train) / 1000 (test) top-scoring per level before NMS 0.7 across levels with
    the level as class, 1000 kept.
    """

    def __init__(
        self,
        in_channels: int = 256,
        feat_channels: int = 256,
        anchor_generator: AnchorGenerator | None = None,
        bbox_coder: DeltaXYWHBBoxCoder | None = None,
        assigner: MaxIoUAssigner | None = None,
        sampler: RandomSampler | None = None,
        train_nms_pre: int = 2000,
        train_max_per_img: int = 1000,
        test_nms_pre: int = 1000,
        test_max_per_img: int = 1000,
        nms_iou_threshold: float = 0.7,
        min_box_size: float = 0.0,
        loss_cls_weight: float = 1.0,
        loss_bbox_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if in_channels < 1 or feat_channels < 1:
            raise ValueError(f"RPNHead: channels must be >= 1, got in={in_channels}, feat={feat_channels}")
        for name, value in dict(train_nms_pre=train_nms_pre, train_max_per_img=train_max_per_img,
                                test_nms_pre=test_nms_pre, test_max_per_img=test_max_per_img).items():
            if value < 1:
                raise ValueError(f"RPNHead: {name} must be >= 1, got {value}")
        if not 0.0 < nms_iou_threshold <= 1.0:
            raise ValueError(f"RPNHead: nms_iou_threshold must be in (0, 1], got {nms_iou_threshold}")
        if min_box_size < 0:
            raise ValueError(f"RPNHead: min_box_size must be >= 0, got {min_box_size}")
        self.anchor_generator = anchor_generator if anchor_generator is not None else AnchorGenerator()
        self.bbox_coder = (
            bbox_coder if bbox_coder is not None
            else DeltaXYWHBBoxCoder(means=(0.0, 0.0, 0.0, 0.0), stds=(1.0, 1.0, 1.0, 1.0))
        )
        self.assigner = (
            assigner if assigner is not None
            else MaxIoUAssigner(pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3, match_low_quality=True)
        )
        self.sampler = (
            sampler if sampler is not None
            else RandomSampler(num=256, pos_fraction=0.5, neg_pos_ub=-1, add_gt_as_proposals=False)
        )
        self.train_nms_pre = int(train_nms_pre)
        self.train_max_per_img = int(train_max_per_img)
        self.test_nms_pre = int(test_nms_pre)
        self.test_max_per_img = int(test_max_per_img)
        self.nms_iou_threshold = float(nms_iou_threshold)
        self.min_box_size = float(min_box_size)
        self.loss_cls_weight = float(loss_cls_weight)
        self.loss_bbox_weight = float(loss_bbox_weight)

        self.num_anchors = self.anchor_generator.num_base_anchors
        self.rpn_conv = nn.Conv2d(in_channels, feat_channels, 3, padding=1)
        self.rpn_cls = nn.Conv2d(feat_channels, self.num_anchors, 1)
        self.rpn_reg = nn.Conv2d(feat_channels, self.num_anchors * 4, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for conv in (self.rpn_conv, self.rpn_cls, self.rpn_reg):
            nn.init.normal_(conv.weight, mean=0.0, std=RPN_INIT_STD)
            nn.init.zeros_(conv.bias)

    # ------------------------------------------------------------------ forward
    def _check_num_levels(self, num_levels: int, name: str) -> None:
        if num_levels != self.anchor_generator.num_levels:
            raise ValueError(
                f"RPNHead: {name} has {num_levels} levels but the anchor strides "
                f"{list(self.anchor_generator.strides)} define {self.anchor_generator.num_levels}"
            )

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per level: objectness logits ``[B, A, H, W]`` and deltas ``[B, 4A, H, W]``."""
        if isinstance(features, Mapping):
            raise TypeError("RPNHead.forward takes a list of level maps (fine to coarse), e.g. list(fpn_out.values())")
        self._check_num_levels(len(features), "features")
        cls_scores, bbox_preds = [], []
        for x in features:
            x = F.relu(self.rpn_conv(x))
            cls_scores.append(self.rpn_cls(x))
            bbox_preds.append(self.rpn_reg(x))
        return cls_scores, bbox_preds

    # ------------------------------------------------------------------ shared checks
    def _check_outputs(
        self, cls_scores: Sequence[torch.Tensor], bbox_preds: Sequence[torch.Tensor], image_sizes: Sequence
    ) -> list[tuple[int, int]]:
        self._check_num_levels(len(cls_scores), "cls_scores")
        self._check_num_levels(len(bbox_preds), "bbox_preds")
        batch = cls_scores[0].shape[0]
        for level, (cls, box) in enumerate(zip(cls_scores, bbox_preds)):
            if cls.dim() != 4 or cls.shape[0] != batch or cls.shape[1] != self.num_anchors:
                raise ValueError(
                    f"RPNHead: cls_scores[{level}] must be [B={batch}, A={self.num_anchors}, H, W], "
                    f"got {tuple(cls.shape)}"
                )
            if box.shape != (batch, 4 * self.num_anchors, *cls.shape[2:]):
                raise ValueError(
                    f"RPNHead: bbox_preds[{level}] must be [{batch}, {4 * self.num_anchors}, "
                    f"{cls.shape[2]}, {cls.shape[3]}], got {tuple(box.shape)}"
                )
        if len(image_sizes) != batch:
            raise ValueError(f"RPNHead: image_sizes has {len(image_sizes)} entries for a batch of {batch}")
        sizes = []
        for i, size in enumerate(image_sizes):
            if len(size) != 2 or any(int(s) != s or s < 1 for s in size):
                raise ValueError(f"RPNHead: image_sizes[{i}] must be (h, w) positive ints, got {size}")
            sizes.append((int(size[0]), int(size[1])))
        return sizes

    @staticmethod
    def _flatten(cls_scores: Sequence[torch.Tensor], bbox_preds: Sequence[torch.Tensor]):
        """``[B, sum(H*W*A)]`` logits and ``[B, sum(H*W*A), 4]`` deltas in anchor order."""
        batch = cls_scores[0].shape[0]
        logits = torch.cat([c.permute(0, 2, 3, 1).reshape(batch, -1) for c in cls_scores], dim=1)
        deltas = torch.cat([b.permute(0, 2, 3, 1).reshape(batch, -1, 4) for b in bbox_preds], dim=1)
        return logits, deltas

    # ------------------------------------------------------------------ training
    def loss(
        self,
        cls_scores: Sequence[torch.Tensor],
        bbox_preds: Sequence[torch.Tensor],
        gt_boxes: Sequence[torch.Tensor],
        image_sizes: Sequence[Sequence[int]],
        generator: torch.Generator | None = None,
        pad_sizes: Sequence[Sequence[int]] | None = None,
    ) -> dict[str, torch.Tensor]:
        """``loss_rpn_cls`` (BCE with logits over the sampled anchors) and ``loss_rpn_bbox`` (L1 on
        the positives' deltas), both divided by the sampled count of the whole batch, where every
        image counts at least one positive and one negative (mmdet's ``max(n, 1)``).

        ``pad_sizes`` (optional, per image ``(h, w)``): the image's own padded extent (mmdet's
        ``pad_shape``); anchors at locations beyond it, present only because another image in the
        batch is larger, take no part, as in mmdet. ``None`` uses every anchor, which equals mmdet
        whenever all images in the batch share one padded size.
        """
        self._check_outputs(cls_scores, bbox_preds, image_sizes)
        batch = cls_scores[0].shape[0]
        if len(gt_boxes) != batch:
            raise ValueError(f"RPNHead: gt_boxes has {len(gt_boxes)} entries for a batch of {batch}")
        for i, boxes in enumerate(gt_boxes):
            check_gt_boxes(boxes, f"gt_boxes[{i}]")
        if pad_sizes is not None and len(pad_sizes) != batch:
            raise ValueError(f"RPNHead: pad_sizes has {len(pad_sizes)} entries for a batch of {batch}")

        device = cls_scores[0].device
        feature_sizes = [tuple(c.shape[2:]) for c in cls_scores]
        anchors = torch.cat(self.anchor_generator.grid_anchors(feature_sizes, device=device), dim=0)
        logits, deltas = self._flatten(cls_scores, bbox_preds)

        cls_terms, bbox_terms = [], []
        num_samples = 0
        for i in range(batch):
            if pad_sizes is None:
                candidates = None
                image_anchors = anchors
            else:
                valid = torch.cat(self.anchor_generator.valid_flags(feature_sizes, pad_sizes[i], device=device))
                candidates = valid.nonzero().view(-1)
                image_anchors = anchors[candidates]
            gts = gt_boxes[i].to(device=device, dtype=anchors.dtype)
            assignment = self.assigner.assign(image_anchors, gts)
            sampled = self.sampler.sample(assignment, image_anchors, gts, generator=generator)
            pos, neg = sampled.pos_inds, sampled.neg_inds
            if candidates is not None:
                pos, neg = candidates[pos], candidates[neg]
            num_samples += max(pos.numel(), 1) + max(neg.numel(), 1)

            sampled_logits = torch.cat([logits[i, pos], logits[i, neg]]).float()
            targets = torch.cat([sampled_logits.new_ones(pos.numel()), sampled_logits.new_zeros(neg.numel())])
            cls_terms.append(F.binary_cross_entropy_with_logits(sampled_logits, targets, reduction="sum"))
            if pos.numel() > 0:
                target_deltas = self.bbox_coder.encode(sampled.pos_boxes, sampled.pos_gt_boxes)
                bbox_terms.append((deltas[i, pos].float() - target_deltas.float()).abs().sum())
            else:
                # Keeps the graph (and DDP's used-parameter bookkeeping) identical on empty images.
                bbox_terms.append(deltas[i].sum() * 0.0)

        return {
            "loss_rpn_cls": self.loss_cls_weight * torch.stack(cls_terms).sum() / num_samples,
            "loss_rpn_bbox": self.loss_bbox_weight * torch.stack(bbox_terms).sum() / num_samples,
        }

    # ------------------------------------------------------------------ proposals
    @torch.no_grad()
    def predict_proposals(
        self,
        cls_scores: Sequence[torch.Tensor],
        bbox_preds: Sequence[torch.Tensor],
        image_sizes: Sequence[Sequence[int]],
        training: bool,
    ) -> list[torch.Tensor]:
        """Per image ``[K, 5]`` (x1, y1, x2, y2, objectness), best first, detached.

        Per level the ``nms_pre`` best anchors by sigmoid score; decode clipped to the image;
        drop boxes with width or height ``<= min_box_size``; NMS across levels with the level as
        class; keep ``max_per_img``.
        """
        sizes = self._check_outputs(cls_scores, bbox_preds, image_sizes)
        nms_pre = self.train_nms_pre if training else self.test_nms_pre
        max_per_img = self.train_max_per_img if training else self.test_max_per_img
        device = cls_scores[0].device
        level_anchors = self.anchor_generator.grid_anchors([tuple(c.shape[2:]) for c in cls_scores], device=device)

        proposals = []
        for i, image_size in enumerate(sizes):
            scores, deltas, anchors, level_ids = [], [], [], []
            for level, (cls, box, level_anchor) in enumerate(zip(cls_scores, bbox_preds, level_anchors)):
                level_scores = cls[i].detach().permute(1, 2, 0).reshape(-1).float().sigmoid()
                level_deltas = box[i].detach().permute(1, 2, 0).reshape(-1, 4).float()
                if nms_pre < level_scores.numel():
                    level_scores, order = level_scores.sort(descending=True)
                    level_scores, order = level_scores[:nms_pre], order[:nms_pre]
                    level_deltas, level_anchor = level_deltas[order], level_anchor[order]
                scores.append(level_scores)
                deltas.append(level_deltas)
                anchors.append(level_anchor)
                level_ids.append(torch.full_like(level_scores, level, dtype=torch.long))
            scores, level_ids = torch.cat(scores), torch.cat(level_ids)
            boxes = self.bbox_coder.decode(torch.cat(anchors), torch.cat(deltas), max_shape=image_size)
            widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
            keep = (widths > self.min_box_size) & (heights > self.min_box_size)
            boxes, scores, level_ids = boxes[keep], scores[keep], level_ids[keep]
            if boxes.numel() == 0:
                proposals.append(boxes.new_zeros((0, 5)))
                continue
            kept = batched_nms(boxes, scores, level_ids, self.nms_iou_threshold)[:max_per_img]
            proposals.append(torch.cat([boxes[kept], scores[kept, None]], dim=1))
        return proposals

"""The R-CNN stage of Mask R-CNN (mmdet 2.x ``StandardRoIHead``): proposals are matched to the gt
boxes and sampled, pooled from the pyramid, classified and regressed by the box head; the positives
are pooled again for the mask head. At test time: per-class NMS of the decoded boxes, then masks for
the kept detections, pasted into the image."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from comer.heads.bbox_head import SharedFCBBoxHead
from comer.heads.mask_head import FCNMaskHead
from comer.heads.mask_paste import DEFAULT_CHUNK_BYTES
from comer.heads.max_iou_assigner import MaxIoUAssigner
from comer.heads.multiclass_nms import multiclass_nms
from comer.heads.random_sampler import RandomSampler
from comer.heads.roi_extractor import RoIExtractor
from comer.kernels.boxes import BOX_DIM

# The recipe's R-CNN matching and sampling (mmdet train_cfg.rcnn), used when none is passed in.
RCNN_IOU_THRESHOLD = 0.5
RCNN_NUM_SAMPLES = 512
RCNN_POS_FRACTION = 0.25


def boxes_to_rois(boxes: Sequence[torch.Tensor]) -> torch.Tensor:
    """[K, 5] RoIs (image index, x1, y1, x2, y2) from per-image boxes [K_i, >= 4] (mmdet ``bbox2roi``)."""
    rois = [torch.cat([b.new_full((b.shape[0], 1), float(i)), b[:, :BOX_DIM]], dim=1) for i, b in enumerate(boxes)]
    return torch.cat(rois)


@dataclass
class RoIHeadOutputs:
    """Raw outputs on the sampled RoIs of a batch (images concatenated, positives first per image)."""

    cls_score: torch.Tensor  # [R, num_classes + 1]
    bbox_pred: torch.Tensor  # [R, 4 * num_classes]
    mask_logits: torch.Tensor  # [P, num_classes, 28, 28], the positives only


class StandardRoIHead(nn.Module):
    """Box and mask branches on FPN features.

    Args:
        bbox_roi_extractor, bbox_head: RoI pooling (7x7) and the box head.
        mask_roi_extractor, mask_head: RoI pooling (14x14) and the mask head.
        assigner: matches proposals to gt boxes (None: MaxIoUAssigner(0.5, 0.5, 0.5, match_low_quality=True)).
        sampler: picks the RoIs trained on (None: RandomSampler(512, 0.25, add_gt_as_proposals=True)).
        score_threshold: test-time (RoI, class) pairs scoring at most this are dropped (0.05).
        nms_iou_threshold: test-time per-class NMS threshold (0.5).
        max_per_img: test-time detections kept per image (100).
        mask_threshold: pasted mask probabilities >= this are foreground (0.5).
        paste_chunk_bytes: working memory of one mask-pasting chunk.
    """

    def __init__(
        self,
        bbox_roi_extractor: RoIExtractor,
        bbox_head: SharedFCBBoxHead,
        mask_roi_extractor: RoIExtractor,
        mask_head: FCNMaskHead,
        assigner: MaxIoUAssigner | None = None,
        sampler: RandomSampler | None = None,
        score_threshold: float = 0.05,
        nms_iou_threshold: float = 0.5,
        max_per_img: int = 100,
        mask_threshold: float = 0.5,
        paste_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> None:
        super().__init__()
        if bbox_head.num_classes != mask_head.num_classes:
            raise ValueError(f"bbox_head has {bbox_head.num_classes} classes but mask_head {mask_head.num_classes}")
        if bbox_roi_extractor.featmap_strides != mask_roi_extractor.featmap_strides:
            raise ValueError(f"box and mask RoI extractors read different levels: {bbox_roi_extractor.featmap_strides}"
                             f" vs {mask_roi_extractor.featmap_strides}")
        mask_output = mask_roi_extractor.output_size * mask_head.upsample_factor
        if mask_output != mask_head.mask_size:
            raise ValueError(f"mask head predicts {mask_output}x{mask_output} maps ({mask_roi_extractor.output_size} x "
                             f"{mask_head.upsample_factor}) but its targets are {mask_head.mask_size}x{mask_head.mask_size}")
        self.bbox_roi_extractor = bbox_roi_extractor
        self.bbox_head = bbox_head
        self.mask_roi_extractor = mask_roi_extractor
        self.mask_head = mask_head
        self.assigner = assigner if assigner is not None else MaxIoUAssigner(
            RCNN_IOU_THRESHOLD, RCNN_IOU_THRESHOLD, RCNN_IOU_THRESHOLD, match_low_quality=True)
        self.sampler = sampler if sampler is not None else RandomSampler(
            RCNN_NUM_SAMPLES, RCNN_POS_FRACTION, add_gt_as_proposals=True)
        self.score_threshold = score_threshold
        self.nms_iou_threshold = nms_iou_threshold
        self.max_per_img = max_per_img
        self.mask_threshold = mask_threshold
        self.paste_chunk_bytes = paste_chunk_bytes

    @property
    def num_classes(self) -> int:
        return self.bbox_head.num_classes

    @property
    def featmap_strides(self) -> tuple[int, ...]:
        return self.bbox_roi_extractor.featmap_strides

    # ------------------------------------------------------------------ training
    def sample(self, proposals: Sequence[torch.Tensor], gt_boxes: Sequence[torch.Tensor],
               gt_labels: Sequence[torch.Tensor], generator: torch.Generator | None = None) -> list:
        """One SamplingResult per image: proposals [K_i, 4 (+ score)] matched to the gt boxes and
        sampled (the gt boxes join the candidates)."""
        results = []
        for boxes, image_gt_boxes, image_gt_labels in zip(proposals, gt_boxes, gt_labels):
            boxes = boxes[:, :BOX_DIM].detach()
            assigned = self.assigner.assign(boxes, image_gt_boxes, image_gt_labels)
            results.append(self.sampler.sample(assigned, boxes, image_gt_boxes, image_gt_labels, generator=generator))
        return results

    def forward_train(self, features: Sequence[torch.Tensor], sampling_results: Sequence) -> RoIHeadOutputs:
        """Box head on all sampled RoIs, mask head on the positives."""
        rois = boxes_to_rois([result.boxes for result in sampling_results])
        cls_score, bbox_pred = self.bbox_head(self.bbox_roi_extractor(features, rois))
        pos_rois = boxes_to_rois([result.pos_boxes for result in sampling_results])
        mask_logits = self.mask_head(self.mask_roi_extractor(features, pos_rois))
        return RoIHeadOutputs(cls_score, bbox_pred, mask_logits)

    def loss_from_outputs(self, outputs: RoIHeadOutputs, sampling_results: Sequence,
                          gt_masks: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """``loss_cls``, ``loss_bbox``, ``acc`` (box head) and ``loss_mask``."""
        losses = self.bbox_head.loss(outputs.cls_score, outputs.bbox_pred, self.bbox_head.get_targets(sampling_results))
        targets = self.mask_head.get_targets(sampling_results, gt_masks)
        labels = torch.cat([result.pos_gt_labels for result in sampling_results]).long()
        losses["loss_mask"] = self.mask_head.loss(outputs.mask_logits, targets, labels)
        return losses

    def loss(self, features: Sequence[torch.Tensor], proposals: Sequence[torch.Tensor],
             gt_boxes: Sequence[torch.Tensor], gt_labels: Sequence[torch.Tensor], gt_masks: Sequence[torch.Tensor],
             generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Training losses of a batch. ``features``: pyramid maps finest first (p2, p3, ...);
        ``proposals``: per image [K_i, 4 or 5]; ``gt_masks``: per image [G_i, H_i, W_i], the image's
        pixels at the top left (padding below / right is zero)."""
        sampling_results = self.sample(proposals, gt_boxes, gt_labels, generator)
        return self.loss_from_outputs(self.forward_train(features, sampling_results), sampling_results, gt_masks)

    # ------------------------------------------------------------------ inference
    def predict_boxes(self, features: Sequence[torch.Tensor], proposals: Sequence[torch.Tensor],
                      image_sizes: Sequence[Sequence[int]]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per image (boxes [N, 4], scores [N], labels [N]) after per-class NMS, best first."""
        rois = boxes_to_rois(proposals)
        cls_score, bbox_pred = self.bbox_head(self.bbox_roi_extractor(features, rois))
        counts = [p.shape[0] for p in proposals]
        detections = []
        for boxes, scores, deltas, size in zip(proposals, cls_score.split(counts), bbox_pred.split(counts), image_sizes):
            if boxes.shape[0] == 0:
                detections.append((boxes.new_zeros(0, BOX_DIM), boxes.new_zeros(0),
                                   torch.zeros(0, dtype=torch.long, device=boxes.device)))
                continue
            decoded, probs = self.bbox_head.decode(boxes[:, :BOX_DIM].float(), scores, deltas, size)
            detections.append(multiclass_nms(decoded, probs, self.score_threshold, self.nms_iou_threshold,
                                             self.max_per_img))
        return detections

    def predict_masks(self, features: Sequence[torch.Tensor], boxes: Sequence[torch.Tensor],
                      labels: Sequence[torch.Tensor], image_sizes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Per image, bool masks [N, h, w] of the detections ``boxes`` with ``labels``."""
        counts = [b.shape[0] for b in boxes]
        if sum(counts) == 0:
            return [torch.zeros(0, int(h), int(w), dtype=torch.bool, device=b.device)
                    for b, (h, w) in zip(boxes, image_sizes)]
        mask_logits = self.mask_head(self.mask_roi_extractor(features, boxes_to_rois(boxes)))
        return [self.mask_head.paste(logits, image_boxes, image_labels, size, self.mask_threshold,
                                     self.paste_chunk_bytes)
                for logits, image_boxes, image_labels, size in zip(mask_logits.split(counts), boxes, labels,
                                                                   image_sizes)]

    def predict(self, features: Sequence[torch.Tensor], proposals: Sequence[torch.Tensor],
                image_sizes: Sequence[Sequence[int]]) -> list[dict[str, torch.Tensor]]:
        """Per image ``{"boxes" [N, 4], "scores" [N], "labels" [N] int64, "masks" [N, h, w] bool}``
        in the pixels of the (unpadded) image of size ``image_sizes[i]`` = (h, w)."""
        detections = self.predict_boxes(features, proposals, image_sizes)
        masks = self.predict_masks(features, [d[0] for d in detections], [d[2] for d in detections], image_sizes)
        return [{"boxes": boxes, "scores": scores, "labels": labels, "masks": image_masks}
                for (boxes, scores, labels), image_masks in zip(detections, masks)]

"""Mask R-CNN (mmdet 2.x ``MaskRCNN`` / ``TwoStageDetector``): backbone -> FPN -> RPN proposals ->
RoI heads (boxes and masks). Attribute names follow mmdet so released checkpoints map key for key."""
from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from comer.heads.max_iou_assigner import check_gt_boxes, check_gt_labels

NeckFactory = Callable[..., nn.Module]
MASK_DTYPES = (torch.bool, torch.uint8)


class MaskRCNN(nn.Module):
    """``backbone`` (dict of maps) -> ``neck`` (FPN, dict p2..p6) -> ``rpn_head`` -> ``roi_head``.

    Args:
        backbone: returns a dict of feature maps (``output_shape()`` declares them).
        neck: takes that dict and returns the pyramid, finest level first.
        rpn_head: proposals (and their losses) from all pyramid levels.
        roi_head: box and mask branches (a StandardRoIHead) on the first levels.
        size_divisor: padded image sides must be multiples of this (32, the coarsest backbone stride);
            it is also each image's own padded extent (mmdet's ``pad_shape``), which decides which
            anchors and which mask pixels take part in training.

    Images are normalised, batched top-left and zero-padded: ``images`` [B, 3, H, W] with H, W
    multiples of ``size_divisor``; ``image_sizes[i]`` = (h, w) is the valid part of image i. Boxes are
    (x1, y1, x2, y2) in pixels of that image.
    """

    def __init__(self, backbone: nn.Module, neck: nn.Module, rpn_head: nn.Module, roi_head: nn.Module,
                 size_divisor: int = 32) -> None:
        super().__init__()
        if size_divisor < 1:
            raise ValueError(f"size_divisor must be >= 1, got {size_divisor}")
        self.backbone = backbone
        self.neck = neck
        self.rpn_head = rpn_head
        self.roi_head = roi_head
        self.size_divisor = size_divisor

    @property
    def num_classes(self) -> int:
        return self.roi_head.num_classes

    # ------------------------------------------------------------------ input checks
    def _check_images(self, images: torch.Tensor, image_sizes: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise ValueError(f"images must be a tensor [B, 3, H, W], got {getattr(images, 'shape', type(images))}")
        batch, _, height, width = images.shape
        if height % self.size_divisor or width % self.size_divisor:
            raise ValueError(f"images are {height}x{width}: pad both sides to a multiple of {self.size_divisor}")
        if len(image_sizes) != batch:
            raise ValueError(f"image_sizes has {len(image_sizes)} entries for a batch of {batch} images")
        sizes = []
        for i, size in enumerate(image_sizes):
            size = tuple(int(s) for s in size)
            if len(size) != 2 or not (1 <= size[0] <= height and 1 <= size[1] <= width):
                raise ValueError(f"image_sizes[{i}] = {tuple(image_sizes[i])} must be (h, w) with 1 <= h <= {height} "
                                 f"and 1 <= w <= {width} (the padded batch)")
            sizes.append(size)
        return sizes

    def pad_size(self, size: Sequence[int]) -> tuple[int, int]:
        """An image's own padded extent: each side rounded up to a multiple of ``size_divisor``."""
        return tuple(math.ceil(s / self.size_divisor) * self.size_divisor for s in size)

    def _check_targets(self, images: torch.Tensor, sizes: Sequence[tuple[int, int]], gt_boxes, gt_labels,
                       gt_masks) -> list[torch.Tensor]:
        """Check the annotations; returns the masks as bool tensors at each image's padded extent."""
        batch, _, height, width = images.shape
        for name, values in (("gt_boxes", gt_boxes), ("gt_labels", gt_labels), ("gt_masks", gt_masks)):
            if len(values) != batch:
                raise ValueError(f"{name} has {len(values)} entries for a batch of {batch} images")
        masks_out = []
        for i, (boxes, labels, masks, size) in enumerate(zip(gt_boxes, gt_labels, gt_masks, sizes)):
            check_gt_boxes(boxes, f"gt_boxes[{i}]")
            check_gt_labels(labels, boxes.shape[0], f"gt_labels[{i}]", self.num_classes)
            if not isinstance(masks, torch.Tensor) or masks.dim() != 3 or masks.shape[0] != boxes.shape[0]:
                raise ValueError(f"gt_masks[{i}]: expected [G={boxes.shape[0]}, h, w], got "
                                 f"{getattr(masks, 'shape', type(masks))}")
            if masks.dtype not in MASK_DTYPES:
                raise ValueError(f"gt_masks[{i}]: expected bool or uint8 masks, got {masks.dtype}")
            mask_size = tuple(masks.shape[1:])
            if mask_size not in (size, (height, width)):
                raise ValueError(f"gt_masks[{i}] is {mask_size[0]}x{mask_size[1]} but image {i} is {size[0]}x{size[1]} "
                                 f"(padded batch {height}x{width}): masks must cover the image or the padded batch")
            masks_out.append(self._to_pad_size(masks.bool(), self.pad_size(size)))
        return masks_out

    @staticmethod
    def _to_pad_size(masks: torch.Tensor, pad: tuple[int, int]) -> torch.Tensor:
        """Crop / zero-pad masks [G, h, w] at the bottom and right to ``pad`` (mmdet pads each image's
        masks to its own ``pad_shape``; that extent bounds the proposals cut for mask targets)."""
        masks = masks[:, : pad[0], : pad[1]]
        return F.pad(masks, (0, pad[1] - masks.shape[2], 0, pad[0] - masks.shape[1]))

    # ------------------------------------------------------------------ network
    def extract_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The neck's pyramid, finest level first."""
        return list(self.neck(self.backbone(images)).values())

    def forward(
        self,
        images: torch.Tensor,
        image_sizes: Sequence[Sequence[int]],
        gt_boxes: Sequence[torch.Tensor],
        gt_labels: Sequence[torch.Tensor],
        gt_masks: Sequence[torch.Tensor],
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Training losses ``loss_rpn_cls``, ``loss_rpn_bbox``, ``loss_cls``, ``loss_bbox``, ``loss_mask``
        (sum them to train) and ``acc`` (R-CNN classification accuracy in percent, a metric).

        ``gt_boxes[i]`` [G, 4] float, ``gt_labels[i]`` [G] int in 0..num_classes-1, ``gt_masks[i]``
        [G, h, w] or [G, H, W] bool/uint8. ``generator`` draws the RPN and RoI samples.
        """
        sizes = self._check_images(images, image_sizes)
        masks = self._check_targets(images, sizes, gt_boxes, gt_labels, gt_masks)
        gt_boxes = [b.to(images.device, torch.float32) for b in gt_boxes]
        gt_labels = [label.to(images.device, torch.long) for label in gt_labels]
        masks = [m.to(images.device) for m in masks]
        features = self.extract_features(images)
        cls_scores, bbox_preds = self.rpn_head(features)
        losses = self.rpn_head.loss(cls_scores, bbox_preds, gt_boxes, sizes, generator=generator,
                                    pad_sizes=[self.pad_size(s) for s in sizes])
        proposals = self.rpn_head.predict_proposals(cls_scores, bbox_preds, sizes, training=True)
        losses.update(self.roi_head.loss(features, proposals, gt_boxes, gt_labels, masks, generator=generator))
        return losses

    @torch.no_grad()
    def predict(self, images: torch.Tensor, image_sizes: Sequence[Sequence[int]]) -> list[dict[str, torch.Tensor]]:
        """Per image ``{"boxes" [N, 4] float, "scores" [N], "labels" [N] int64 in 0..num_classes-1,
        "masks" [N, h, w] bool}``, best first, in pixels of the image of size ``image_sizes[i]``.
        Call it in eval mode (BatchNorm statistics, test-time proposal numbers)."""
        sizes = self._check_images(images, image_sizes)
        features = self.extract_features(images)
        cls_scores, bbox_preds = self.rpn_head(features)
        proposals = self.rpn_head.predict_proposals(cls_scores, bbox_preds, sizes, training=False)
        return self.roi_head.predict(features, proposals, sizes)


def build_mask_rcnn(
    backbone: nn.Module,
    neck: NeckFactory,
    rpn_head: nn.Module,
    roi_head: nn.Module,
    *,
    num_classes: int,
    **kwargs,
) -> MaskRCNN:
    """Build a :class:`MaskRCNN` (the target of ``conf/model/mask_rcnn.yaml``).

    ``neck`` is a factory (Hydra ``_partial_: true``) called with ``input_shape=backbone.output_shape()``,
    so configs never repeat the backbone's channels. The pieces are checked against each other: the
    RoI head's classes equal ``num_classes``, the RPN's anchor strides are the neck's strides and the
    RoI extractors read the neck's finest levels. ``kwargs`` go to :class:`MaskRCNN`.
    """
    if not hasattr(backbone, "output_shape"):
        raise TypeError(f"backbone {type(backbone).__name__} has no output_shape(); see docs/contracts.md")
    if isinstance(neck, nn.Module) or not callable(neck):
        raise TypeError(f"neck must be a factory (Hydra `_partial_: true`) taking input_shape, got {type(neck).__name__}")
    neck = neck(input_shape=backbone.output_shape())
    if roi_head.num_classes != num_classes:
        raise ValueError(f"roi_head has {roi_head.num_classes} classes, the detector {num_classes}")
    neck_shape: Mapping = neck.output_shape()
    strides = tuple(spec.stride for spec in neck_shape.values())
    anchor_strides = tuple(rpn_head.anchor_generator.strides)
    if anchor_strides != strides:
        raise ValueError(f"RPN anchor strides {anchor_strides} differ from the neck's level strides {strides}")
    roi_strides = tuple(roi_head.featmap_strides)
    if roi_strides != strides[: len(roi_strides)]:
        raise ValueError(f"RoI extractors read strides {roi_strides}, but the neck's finest levels have {strides}")
    return MaskRCNN(backbone, neck, rpn_head, roi_head, **kwargs)

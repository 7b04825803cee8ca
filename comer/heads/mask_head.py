"""Mask head of Mask R-CNN (mmdet 2.x ``FCNMaskHead``): 3x3 convs on the 14x14 RoI features, a 2x
transposed-conv upsampling to 28x28 and a 1x1 conv to one mask logit map per class; its training
targets are the gt masks cut along each positive RoI."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from comer.heads.conv_module import ConvModule
from comer.heads.mask_paste import DEFAULT_CHUNK_BYTES, paste_masks
from comer.kernels import roi_align

# RoIAlign settings mmdet 2.x uses to cut bitmap mask targets (BitmapMasks.crop_and_resize):
# boxes in mask pixels, adaptive sampling, half-pixel aligned.
TARGET_SPATIAL_SCALE = 1.0
TARGET_SAMPLING_RATIO = 0
TARGET_ALIGNED = True


def mask_targets(
    boxes: torch.Tensor,
    gt_masks: torch.Tensor,
    gt_indices: torch.Tensor,
    mask_size: int,
    binarize_threshold: float = 0.5,
) -> torch.Tensor:
    """Float {0, 1} targets [P, mask_size, mask_size] for RoIs ``boxes`` [P, 4] of one image.

    As mmdet 2.x for bitmap masks: each box is clipped to the mask's extent, the full-size
    instance mask ``gt_masks[gt_indices[p]]`` ([G, H, W], bool / uint8 / float) is pooled along it by
    RoIAlign (output ``mask_size``, spatial scale 1, adaptive sampling, aligned) and binarised
    ``>= binarize_threshold``.
    """
    if boxes.shape[0] == 0:
        return boxes.new_zeros(0, mask_size, mask_size)
    height, width = gt_masks.shape[-2:]
    boxes = boxes.detach().float()
    clipped = torch.stack([boxes[:, 0].clamp(0, width), boxes[:, 1].clamp(0, height),
                           boxes[:, 2].clamp(0, width), boxes[:, 3].clamp(0, height)], dim=1)
    # Pool straight from the gt masks used (batch index = position among them): no per-RoI copy.
    used, position = torch.unique(gt_indices, return_inverse=True)
    masks = gt_masks[used].to(device=boxes.device, dtype=torch.float32)[:, None]
    rois = torch.cat([position.to(clipped.dtype)[:, None], clipped], dim=1)
    pooled = roi_align(masks, rois, (mask_size, mask_size), spatial_scale=TARGET_SPATIAL_SCALE,
                       sampling_ratio=TARGET_SAMPLING_RATIO, aligned=TARGET_ALIGNED)[:, 0]
    return (pooled >= binarize_threshold).float()


class FCNMaskHead(nn.Module):
    """``num_convs`` x ConvModule(3x3, ReLU, no norm) -> ConvTranspose2d(2x2, stride 2) + ReLU ->
    1x1 ``conv_logits`` to ``num_classes`` maps.

    Args:
        num_classes: foreground classes (one mask map each).
        in_channels, conv_out_channels, num_convs, conv_kernel_size: the conv tower (256, 256, 4, 3).
        upsample_factor: kernel and stride of the transposed conv (2: 14 -> 28).
        mask_size: side of the training targets (28, the output of a 14x14 input).
        target_threshold: gt masks pooled along a RoI are binarised at this value (0.5).
        loss_weight: factor on the mask loss.
    Init (mmdet): Kaiming-normal (fan_out, ReLU) weights and zero biases everywhere.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 256,
        conv_out_channels: int = 256,
        num_convs: int = 4,
        conv_kernel_size: int = 3,
        upsample_factor: int = 2,
        mask_size: int = 28,
        target_threshold: float = 0.5,
        loss_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if conv_kernel_size % 2 != 1:
            raise ValueError(f"conv_kernel_size must be odd (same padding), got {conv_kernel_size}")
        self.num_classes = num_classes
        self.upsample_factor = upsample_factor
        self.mask_size = mask_size
        self.target_threshold = target_threshold
        self.loss_weight = loss_weight
        self.convs = nn.ModuleList(
            ConvModule(in_channels if i == 0 else conv_out_channels, conv_out_channels, conv_kernel_size,
                       padding=conv_kernel_size // 2, norm=None, act=nn.ReLU)
            for i in range(num_convs))
        tower_channels = conv_out_channels if num_convs > 0 else in_channels
        self.upsample = nn.ConvTranspose2d(tower_channels, conv_out_channels, upsample_factor, stride=upsample_factor)
        self.relu = nn.ReLU(inplace=True)
        self.conv_logits = nn.Conv2d(conv_out_channels, num_classes, 1)
        for module in (self.upsample, self.conv_logits):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(module.bias)

    def forward(self, roi_features: torch.Tensor) -> torch.Tensor:
        """[K, C, 14, 14] -> mask logits [K, num_classes, 28, 28]."""
        x = roi_features
        for conv in self.convs:
            x = conv(x)
        return self.conv_logits(self.relu(self.upsample(x)))

    def get_targets(self, sampling_results: Sequence, gt_masks: Sequence[torch.Tensor]) -> torch.Tensor:
        """Targets [P, mask_size, mask_size] of all positives of the batch (images concatenated)."""
        targets = [mask_targets(result.pos_boxes, masks, result.pos_assigned_gt_inds, self.mask_size,
                                self.target_threshold)
                   for result, masks in zip(sampling_results, gt_masks)]
        return torch.cat(targets)

    def loss(self, mask_logits: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Binary cross-entropy of each positive's gt-class logits against its target, averaged over
        all pixels of all positives (mmdet ``mask_cross_entropy``); 0 without positives."""
        if mask_logits.shape[0] == 0:
            return mask_logits.sum() * 0.0
        logits = mask_logits[torch.arange(labels.shape[0], device=labels.device), labels].float()
        return self.loss_weight * F.binary_cross_entropy_with_logits(logits, targets, reduction="mean")

    def paste(
        self,
        mask_logits: torch.Tensor,
        boxes: torch.Tensor,
        labels: torch.Tensor,
        image_size: Sequence[int],
        threshold: float,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> torch.Tensor:
        """Binary masks [N, h, w] of detections ``boxes`` [N, 4] with ``labels`` [N] from their mask
        logits [N, num_classes, 28, 28] (sigmoid of the label's map, pasted, ``>= threshold``)."""
        if mask_logits.shape[0] == 0:
            return paste_masks(mask_logits.new_zeros(0, self.mask_size, self.mask_size), boxes, image_size, threshold)
        probs = mask_logits[torch.arange(labels.shape[0], device=labels.device), labels].float().sigmoid()
        return paste_masks(probs, boxes, image_size, threshold, chunk_bytes)

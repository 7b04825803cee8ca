"""Per-class NMS of class-specific boxes (mmdet 2.x ``multiclass_nms``)."""
from __future__ import annotations

import torch

from comer.kernels import batched_nms
from comer.kernels.boxes import BOX_DIM


def multiclass_nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    score_threshold: float,
    iou_threshold: float,
    max_per_img: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Detections from K RoIs.

    Args:
        boxes: [K, 4 * C] (one box per class) or [K, 4] (shared by all classes).
        scores: [K, C + 1] class probabilities, background in the LAST column (ignored).
        score_threshold: (RoI, class) pairs scoring strictly above it are kept.
        iou_threshold: NMS threshold, applied within each class.
        max_per_img: keep the highest-scoring this many after NMS (<= 0: keep all).

    Returns:
        (boxes [N, 4], scores [N], labels [N] int64 in 0..C-1), sorted by decreasing score.
    """
    if scores.dim() != 2 or boxes.dim() != 2 or boxes.shape[0] != scores.shape[0]:
        raise ValueError(f"multiclass_nms: boxes [K, 4C or 4] and scores [K, C+1] expected, got "
                         f"{tuple(boxes.shape)} and {tuple(scores.shape)}")
    num_rois, num_classes = scores.shape[0], scores.shape[1] - 1
    if boxes.shape[1] == BOX_DIM:
        per_class = boxes[:, None, :].expand(num_rois, num_classes, BOX_DIM)
    elif boxes.shape[1] == BOX_DIM * num_classes:
        per_class = boxes.view(num_rois, num_classes, BOX_DIM)
    else:
        raise ValueError(f"multiclass_nms: boxes have {boxes.shape[1]} columns; expected 4 or 4 * {num_classes}")
    foreground = scores[:, :-1]
    labels = torch.arange(num_classes, device=scores.device).view(1, -1).expand(num_rois, num_classes)
    # Flattened RoI-major, class-minor (mmdet's order: it decides which of two equal scores is kept).
    candidate = (foreground > score_threshold).reshape(-1)
    flat_boxes = per_class.reshape(-1, BOX_DIM)[candidate]
    flat_scores = foreground.reshape(-1)[candidate]
    flat_labels = labels.reshape(-1)[candidate]
    if flat_scores.numel() == 0:
        return boxes.new_zeros(0, BOX_DIM), scores.new_zeros(0), torch.zeros(0, dtype=torch.long, device=scores.device)
    keep = batched_nms(flat_boxes, flat_scores, flat_labels, iou_threshold)
    if max_per_img > 0:
        keep = keep[:max_per_img]
    return flat_boxes[keep], flat_scores[keep], flat_labels[keep]

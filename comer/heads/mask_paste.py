"""Paste fixed-size mask probabilities into image-sized binary masks (mmdet 2.x ``_do_paste_mask``
followed by ``>= mask_thr_binary``)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

# Working memory per pasted pixel of a chunk: the sampling grid (x, y) and the sampled value, float32.
BYTES_PER_PASTED_PIXEL = 3 * 4
DEFAULT_CHUNK_BYTES = 1 << 30  # mmdet's GPU_MEM_LIMIT (1 GiB)
REGION_MARGIN = 1  # pixels around the boxes' integer hull that are sampled (mmdet's skip_empty region)


def paste_masks(
    mask_probs: torch.Tensor,
    boxes: torch.Tensor,
    image_size: Sequence[int],
    threshold: float = 0.5,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> torch.Tensor:
    """Binary masks [N, h, w] (bool) from probabilities ``mask_probs`` [N, mh, mw] that cover ``boxes``
    [N, 4] (x1, y1, x2, y2 in image pixels).

    Each image pixel centre (x + 0.5, y + 0.5) is mapped into its box's [-1, 1] frame and the
    probability map bilinearly sampled there (``grid_sample``, ``align_corners=False``, zeros
    outside), then compared ``>= threshold``: exactly mmdet's ``_do_paste_mask``. Masks are pasted
    ``chunk_bytes``-sized chunks at a time, each only over the pixel hull of its boxes (+1 pixel): a
    sample further out weighs less than 1/2 and a probability is at most 1, so it can never reach a
    threshold of 1/2 or more, and the result equals pasting over the whole image.

    Deviation from mmdet: a box of zero width or height gives an empty mask (mmdet divides by zero
    and paints the mask's centre line across the image).
    """
    if mask_probs.dim() != 3 or boxes.dim() != 2 or boxes.shape != (mask_probs.shape[0], 4):
        raise ValueError(f"paste_masks: expected mask_probs [N, h, w] and boxes [N, 4], got "
                         f"{tuple(mask_probs.shape)} and {tuple(boxes.shape)}")
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    height, width = (int(s) for s in image_size)
    num = mask_probs.shape[0]
    out = torch.zeros(num, height, width, dtype=torch.bool, device=mask_probs.device)
    if num == 0 or height == 0 or width == 0:
        return out
    boxes = boxes.float()
    num_chunks = min(num, math.ceil(num * height * width * BYTES_PER_PASTED_PIXEL / chunk_bytes))
    for index in torch.arange(num, device=boxes.device).chunk(num_chunks):
        chunk_boxes = boxes[index]
        valid = (chunk_boxes[:, 2] > chunk_boxes[:, 0]) & (chunk_boxes[:, 3] > chunk_boxes[:, 1])
        if not bool(valid.any()):
            continue
        index, chunk_boxes = index[valid], chunk_boxes[valid]
        left = min(max(math.floor(chunk_boxes[:, 0].min().item()) - REGION_MARGIN, 0), width)
        top = min(max(math.floor(chunk_boxes[:, 1].min().item()) - REGION_MARGIN, 0), height)
        right = max(min(math.ceil(chunk_boxes[:, 2].max().item()) + REGION_MARGIN, width), left)
        bottom = max(min(math.ceil(chunk_boxes[:, 3].max().item()) + REGION_MARGIN, height), top)
        if right == left or bottom == top:
            continue
        x0, y0, x1, y1 = chunk_boxes.split(1, dim=1)  # each [n, 1]
        xs = torch.arange(left, right, device=boxes.device, dtype=torch.float32) + 0.5
        ys = torch.arange(top, bottom, device=boxes.device, dtype=torch.float32) + 0.5
        grid_x = (xs - x0) / (x1 - x0) * 2 - 1  # [n, region_w]
        grid_y = (ys - y0) / (y1 - y0) * 2 - 1  # [n, region_h]
        n, region_h, region_w = index.numel(), bottom - top, right - left
        grid = torch.stack([grid_x[:, None, :].expand(n, region_h, region_w),
                            grid_y[:, :, None].expand(n, region_h, region_w)], dim=3)
        sampled = F.grid_sample(mask_probs[index, None].float(), grid, mode="bilinear", padding_mode="zeros",
                                align_corners=False)
        out[index, top:bottom, left:right] = sampled[:, 0] >= threshold
    return out

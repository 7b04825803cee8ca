"""Exact greedy non-maximum suppression, vectorised in PyTorch (no Python loop over boxes).

Greedy NMS (mmcv semantics, offset 0): visit boxes by decreasing score, equal scores in index order;
keep a box unless a kept box overlaps it with IoU > iou_threshold. In the score-sorted order the kept set
is the unique solution of

    keep[i] = not any(keep[j] and IoU(i, j) > t for j < i)

Boxes are processed in blocks of NMS_BLOCK_SIZE. A block's boxes are first suppressed by the boxes kept
in earlier blocks (IoU tiles against those, KEPT_CHUNK_SIZE at a time); what is left is settled inside the
block by iterating the equation above from "all alive" until nothing changes. After iteration t the first
t entries are final (each depends only on lower ones), so the iteration ends after at most block-size
steps, exactly; in practice after the length of the longest suppression chain (a few). Memory stays at
one block x block and one block x chunk tile, whatever the number of boxes.

No Triton kernel: the work is a few IoU tiles per block, already single PyTorch ops on the GPU; the
sequential part (blocks, fixed-point steps) is a handful of host round trips. Whether a bitmask kernel
would pay has not been measured (benchmarks/roi_ops.py times this implementation).
"""
from __future__ import annotations

import torch

from .boxes import BOX_DIM, compute_dtype, pairwise_overlaps

NMS_BLOCK_SIZE = 1024  # boxes settled together; the in-block tile is NMS_BLOCK_SIZE^2 bools
KEPT_CHUNK_SIZE = 4096  # kept boxes compared with a block at once


def _check_nms_inputs(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor | None,
                      iou_threshold: float) -> None:
    if boxes.dim() != 2 or boxes.shape[1] != BOX_DIM:
        raise ValueError(f"boxes must have shape [N, {BOX_DIM}] (x1, y1, x2, y2), got {tuple(boxes.shape)}")
    if not boxes.is_floating_point():
        raise ValueError(f"boxes must be a floating-point tensor, got {boxes.dtype}")
    if scores.dim() != 1 or scores.shape[0] != boxes.shape[0]:
        raise ValueError(f"scores must have shape [{boxes.shape[0]}] (one per box), got {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise ValueError(f"scores must be a floating-point tensor, got {scores.dtype}")
    tensors = {"boxes": boxes, "scores": scores}
    if idxs is not None:
        if idxs.shape != scores.shape:
            raise ValueError(f"idxs must have shape [{boxes.shape[0]}] (one per box), got {tuple(idxs.shape)}")
        if idxs.is_floating_point() or idxs.is_complex():
            raise ValueError(f"idxs must be an integer tensor, got {idxs.dtype}")
        tensors["idxs"] = idxs
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(f"nms: inputs must be on one device, got {devices}")
    if isinstance(iou_threshold, torch.Tensor) or not isinstance(iou_threshold, (int, float)):
        raise TypeError(f"iou_threshold must be a Python number, got {type(iou_threshold).__name__}")
    if not torch.compiler.is_compiling() and boxes.numel():
        boxes_finite, scores_finite = bool(torch.isfinite(boxes).all()), bool(torch.isfinite(scores).all())
        if not boxes_finite:
            raise ValueError("nms: boxes must be finite (found inf or NaN)")
        if not scores_finite:
            raise ValueError("nms: scores must be finite (found inf or NaN)")


def _suppression(boxes_a: torch.Tensor, boxes_b: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """[A, B] bool: box b would suppress box a if kept (IoU > threshold)."""
    # eps=0: boxes of zero area give NaN, which suppresses nothing (mmcv's 0 / 0).
    return pairwise_overlaps(boxes_a, boxes_b, "iou", eps=0.0) > iou_threshold


def _settle_block(alive: torch.Tensor, suppresses: torch.Tensor) -> torch.Tensor:
    """Greedy NMS inside one score-sorted block: alive [b] bool (not suppressed from outside),
    suppresses [b, b] bool with [i, j] only for j < i. Returns keep [b] bool."""
    keep = alive
    for _ in range(alive.shape[0] + 1):  # the fixed point is reached within b steps
        new_keep = alive & ~(suppresses & keep[None, :]).any(dim=1)
        if torch.equal(new_keep, keep):
            return keep
        keep = new_keep
    raise AssertionError("nms: fixed-point iteration did not converge")  # unreachable, see module doc


def _greedy_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    num_boxes = boxes.shape[0]
    if num_boxes == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    sorted_boxes = boxes[order].to(compute_dtype(boxes))
    keep = torch.zeros(num_boxes, dtype=torch.bool, device=boxes.device)
    kept_boxes = sorted_boxes[:0]
    for start in range(0, num_boxes, NMS_BLOCK_SIZE):
        stop = min(start + NMS_BLOCK_SIZE, num_boxes)
        block = sorted_boxes[start:stop]
        alive = torch.ones(stop - start, dtype=torch.bool, device=boxes.device)
        for chunk in range(0, kept_boxes.shape[0], KEPT_CHUNK_SIZE):
            alive &= ~_suppression(block, kept_boxes[chunk:chunk + KEPT_CHUNK_SIZE], iou_threshold).any(dim=1)
        earlier = torch.ones(stop - start, stop - start, dtype=torch.bool, device=boxes.device).tril(-1)
        block_keep = _settle_block(alive, _suppression(block, block, iou_threshold) & earlier)
        keep[start:stop] = block_keep
        kept_boxes = torch.cat([kept_boxes, block[block_keep]])
    return order[keep]


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS of boxes [N, 4] (x1, y1, x2, y2) with scores [N]: a box is dropped when a kept,
    higher-scored box overlaps it with IoU > iou_threshold (equal scores: the lower index ranks first).
    Returns the kept indices [K] int64, by decreasing score; empty input gives an empty tensor."""
    _check_nms_inputs(boxes, scores, None, iou_threshold)
    return _greedy_nms(boxes, scores, float(iou_threshold))


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """NMS run independently per value of idxs [N] (e.g. class labels; boxes of different idxs never
    suppress each other). boxes [N, 4], scores [N] -> kept indices [K] int64 by decreasing score (equal
    scores: the lower index first).

    Each group runs the greedy NMS above on its own boxes (a loop over the groups, not the boxes), so no
    IoU is computed across groups, and no box offsets lose float precision on large coordinates."""
    _check_nms_inputs(boxes, scores, idxs, iou_threshold)
    threshold = float(iou_threshold)
    kept = []
    for group in torch.unique(idxs):
        members = torch.nonzero(idxs == group).flatten()
        kept.append(members[_greedy_nms(boxes[members], scores[members], threshold)])
    if not kept:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    kept = torch.cat(kept).sort().values  # index order first, so the stable score sort breaks ties by index
    return kept[torch.sort(scores[kept], descending=True, stable=True).indices]

"""Box regression targets: (x1, y1, x2, y2) boxes <-> (dx, dy, dw, dh) deltas relative to a base box.

The semantics are mmdet 2.x's `DeltaXYWHBBoxCoder` (`bbox2delta` / `delta2bbox`, add_ctr_clamp=False):
widths without +1, centre shifts in units of the base box's size, log-size ratios clamped to
±|log(wh_ratio_clip)| when decoding, normalised by `means` / `stds`. Arithmetic runs in fp32 at least
(fp64 inputs stay fp64; mmdet casts everything to fp32).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .boxes import BOX_DIM, check_boxes, compute_dtype

DEFAULT_MEANS = (0.0, 0.0, 0.0, 0.0)
DEFAULT_STDS = (1.0, 1.0, 1.0, 1.0)
# A box may grow or shrink by at most 1000 / 16 per side in one decode (mmdet's default).
DEFAULT_WH_RATIO_CLIP = 16 / 1000


def _centre_size(boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """[..., 4] boxes -> centre x, centre y, width, height, each [...]."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return (x1 + x2) * 0.5, (y1 + y2) * 0.5, x2 - x1, y2 - y1


def _image_bounds(max_shape: Sequence[int] | torch.Tensor) -> tuple[float, float]:
    """(h, w) or (h, w, c) -> the largest (x, y) a decoded corner may take: (w, h)."""
    if len(max_shape) < 2:
        raise ValueError(f"max_shape must be (h, w) or (h, w, c), got {max_shape}")
    height, width = (float(s) for s in max_shape[:2])
    if not (height >= 0 and width >= 0):
        raise ValueError(f"max_shape must be non-negative, got {max_shape}")
    return width, height


class DeltaXYWHBBoxCoder:
    """Encode boxes as deltas from base boxes and decode them back.

    means, stds: 4 numbers each; encoded deltas are (delta - means) / stds (Faster R-CNN's RoI head uses
    stds (0.1, 0.1, 0.2, 0.2)). wh_ratio_clip: decoded dw and dh are clamped to ±|log(wh_ratio_clip)|.
    """

    def __init__(self, means: Sequence[float] = DEFAULT_MEANS, stds: Sequence[float] = DEFAULT_STDS,
                 wh_ratio_clip: float = DEFAULT_WH_RATIO_CLIP) -> None:
        if len(means) != BOX_DIM or len(stds) != BOX_DIM:
            raise ValueError(f"means and stds must have {BOX_DIM} entries each, got {means} and {stds}")
        if not all(s > 0 for s in stds):
            raise ValueError(f"stds must be positive, got {stds}")
        if not 0 < wh_ratio_clip < 1:
            raise ValueError(f"wh_ratio_clip must be in (0, 1), got {wh_ratio_clip}")
        self.means = tuple(float(m) for m in means)
        self.stds = tuple(float(s) for s in stds)
        self.wh_ratio_clip = float(wh_ratio_clip)
        self.max_log_ratio = abs(math.log(self.wh_ratio_clip))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(means={self.means}, stds={self.stds}, "
                f"wh_ratio_clip={self.wh_ratio_clip})")

    def encode(self, proposals: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        """Deltas [N, 4] that move proposals [N, 4] onto gt [N, 4] (mmdet `bbox2delta`).

        A proposal of zero width or height gives non-finite deltas, as in mmdet; the sampler never
        hands such proposals over (RPN drops boxes under its minimum size)."""
        check_boxes(proposals, "proposals")
        check_boxes(gt, "gt")
        if proposals.shape != gt.shape:
            raise ValueError(f"proposals {tuple(proposals.shape)} and gt {tuple(gt.shape)} must have one shape")
        dtype = compute_dtype(proposals, gt)
        px, py, pw, ph = _centre_size(proposals.to(dtype))
        gx, gy, gw, gh = _centre_size(gt.to(dtype))
        deltas = torch.stack([(gx - px) / pw, (gy - py) / ph, torch.log(gw / pw), torch.log(gh / ph)], dim=-1)
        means = deltas.new_tensor(self.means)
        stds = deltas.new_tensor(self.stds)
        return (deltas - means) / stds

    def decode(self, rois: torch.Tensor, deltas: torch.Tensor,
               max_shape: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        """Boxes from rois [N, 4] moved by deltas [N, 4] or [N, 4k] (one box per class: k groups of
        (dx, dy, dw, dh)); returns [N, 4] / [N, 4k] (mmdet `delta2bbox`). With max_shape (h, w), x is
        clipped to [0, w] and y to [0, h]."""
        check_boxes(rois, "rois")
        if rois.dim() != 2:
            raise ValueError(f"rois must have shape [N, {BOX_DIM}], got {tuple(rois.shape)}")
        if deltas.dim() != 2 or deltas.shape[1] == 0 or deltas.shape[1] % BOX_DIM:
            raise ValueError(f"deltas must have shape [N, 4k] with k >= 1, got {tuple(deltas.shape)}")
        if deltas.shape[0] != rois.shape[0]:
            raise ValueError(f"deltas {tuple(deltas.shape)} and rois {tuple(rois.shape)} must have one N")
        if not deltas.is_floating_point():
            raise ValueError(f"deltas must be a floating-point tensor, got {deltas.dtype}")
        image_bounds = None if max_shape is None else _image_bounds(max_shape)
        dtype = compute_dtype(rois, deltas)
        num_rois, num_classes = deltas.shape[0], deltas.shape[1] // BOX_DIM
        means = deltas.new_tensor(self.means, dtype=dtype)
        stds = deltas.new_tensor(self.stds, dtype=dtype)
        # [N, k, 4]: every class's deltas against the same roi
        denorm = deltas.to(dtype).reshape(num_rois, num_classes, BOX_DIM) * stds + means
        dx, dy, dw, dh = denorm.unbind(-1)
        px, py, pw, ph = (t[:, None] for t in _centre_size(rois.to(dtype)))
        dw = dw.clamp(min=-self.max_log_ratio, max=self.max_log_ratio)
        dh = dh.clamp(min=-self.max_log_ratio, max=self.max_log_ratio)
        gw = pw * dw.exp()
        gh = ph * dh.exp()
        gx = px + pw * dx
        gy = py + ph * dy
        # [N, k, 2 corners, (x, y)]
        corners = torch.stack([torch.stack([gx - gw * 0.5, gy - gh * 0.5], dim=-1),
                               torch.stack([gx + gw * 0.5, gy + gh * 0.5], dim=-1)], dim=-2)
        if image_bounds is not None:
            corners = torch.minimum(corners.clamp(min=0), corners.new_tensor(image_bounds))
        return corners.reshape(num_rois, num_classes * BOX_DIM)

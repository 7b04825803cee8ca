"""Anchors for the RPN with mmdet 2.x's ``AnchorGenerator`` semantics, so released ``rpn_cls`` /
``rpn_reg`` weights score and regress the same boxes.

Per level, the base anchors sit around ``stride * center_offset``; with ``h_ratio = sqrt(ratio)``
and ``w_ratio = 1 / h_ratio`` a base anchor is ``w = stride * w_ratio * scale``,
``h = stride * h_ratio * scale`` (no rounding), ordered ratio-major (mmdet's ``scale_major=True``:
``(w_ratios[:, None] * scales[None, :]).view(-1)``). The grid repeats them at every location,
locations row-major and the anchors of one location consecutive, which is the order of a head
output ``[A, H, W]`` permuted to ``[H, W, A]`` and flattened.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

# mmdet 2.x's RPN of the standard R50-FPN Mask R-CNN.
RPN_ANCHOR_STRIDES = (4, 8, 16, 32, 64)
RPN_ANCHOR_RATIOS = (0.5, 1.0, 2.0)
RPN_ANCHOR_SCALES = (8,)


class AnchorGenerator:
    """Anchors per feature level; ``strides[i]`` is both the level's stride and its base size."""

    def __init__(
        self,
        strides: Sequence[int] = RPN_ANCHOR_STRIDES,
        ratios: Sequence[float] = RPN_ANCHOR_RATIOS,
        scales: Sequence[float] = RPN_ANCHOR_SCALES,
        center_offset: float = 0.0,
    ) -> None:
        strides, ratios, scales = tuple(strides), tuple(ratios), tuple(scales)
        if not strides or any(int(s) != s or s < 1 for s in strides):
            raise ValueError(f"AnchorGenerator: strides must be positive ints, got {list(strides)}")
        if not ratios or any(not math.isfinite(r) or r <= 0 for r in ratios):
            raise ValueError(f"AnchorGenerator: ratios must be positive, got {list(ratios)}")
        if not scales or any(not math.isfinite(s) or s <= 0 for s in scales):
            raise ValueError(f"AnchorGenerator: scales must be positive, got {list(scales)}")
        if not 0.0 <= center_offset <= 1.0:
            raise ValueError(f"AnchorGenerator: center_offset must be in [0, 1], got {center_offset}")
        self.strides = tuple(int(s) for s in strides)
        self.ratios = tuple(float(r) for r in ratios)
        self.scales = tuple(float(s) for s in scales)
        self.center_offset = float(center_offset)
        self.base_anchors = [self._base_anchors(stride) for stride in self.strides]

    @property
    def num_levels(self) -> int:
        return len(self.strides)

    @property
    def num_base_anchors(self) -> int:
        """Anchors per location (the same on every level)."""
        return len(self.ratios) * len(self.scales)

    def _base_anchors(self, base_size: int) -> torch.Tensor:
        """``[A, 4]`` (x1, y1, x2, y2) around the level's reference point, float32."""
        ratios = torch.tensor(self.ratios, dtype=torch.float32)
        scales = torch.tensor(self.scales, dtype=torch.float32)
        h_ratios = torch.sqrt(ratios)
        w_ratios = 1 / h_ratios
        widths = (base_size * w_ratios[:, None] * scales[None, :]).view(-1)
        heights = (base_size * h_ratios[:, None] * scales[None, :]).view(-1)
        center = self.center_offset * base_size
        return torch.stack(
            [center - 0.5 * widths, center - 0.5 * heights, center + 0.5 * widths, center + 0.5 * heights],
            dim=-1,
        )

    def _check_sizes(self, feature_sizes: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
        if len(feature_sizes) != self.num_levels:
            raise ValueError(
                f"AnchorGenerator: feature_sizes has {len(feature_sizes)} levels but the anchor strides "
                f"{list(self.strides)} define {self.num_levels}"
            )
        sizes = []
        for level, size in enumerate(feature_sizes):
            if len(size) != 2 or any(int(s) != s or s < 0 for s in size):
                raise ValueError(f"AnchorGenerator: feature_sizes[{level}] must be (H, W) ints >= 0, got {size}")
            sizes.append((int(size[0]), int(size[1])))
        return sizes

    def grid_anchors(
        self,
        feature_sizes: Sequence[Sequence[int]],
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> list[torch.Tensor]:
        """Per level ``[H * W * A, 4]``: location-major (row-major), anchor-minor."""
        anchors = []
        for (height, width), stride, base in zip(self._check_sizes(feature_sizes), self.strides, self.base_anchors):
            shift_x = torch.arange(width, device=device).to(dtype) * stride
            shift_y = torch.arange(height, device=device).to(dtype) * stride
            yy, xx = torch.meshgrid(shift_y, shift_x, indexing="ij")
            xx, yy = xx.reshape(-1), yy.reshape(-1)
            shifts = torch.stack([xx, yy, xx, yy], dim=-1)
            anchors.append((base.to(device=device, dtype=dtype)[None, :, :] + shifts[:, None, :]).reshape(-1, 4))
        return anchors

    def valid_flags(
        self,
        feature_sizes: Sequence[Sequence[int]],
        pad_size: Sequence[int],
        device: torch.device | str = "cpu",
    ) -> list[torch.Tensor]:
        """Per level ``[H * W * A]`` bool: the anchors whose location lies inside the image's own padded
        extent ``pad_size = (h, w)`` (mmdet's ``valid_flags`` with ``img_meta['pad_shape']``); locations
        that exist only because a larger image in the batch padded the tensor are False."""
        flags = []
        for (height, width), stride in zip(self._check_sizes(feature_sizes), self.strides):
            valid_h = min(math.ceil(pad_size[0] / stride), height)
            valid_w = min(math.ceil(pad_size[1] / stride), width)
            valid_y = torch.arange(height, device=device) < valid_h
            valid_x = torch.arange(width, device=device) < valid_w
            valid = (valid_y[:, None] & valid_x[None, :]).reshape(-1)
            flags.append(valid[:, None].expand(-1, self.num_base_anchors).reshape(-1))
        return flags

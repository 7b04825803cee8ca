"""Multi-level RoI feature extraction (mmdet 2.x ``SingleRoIExtractor``): each RoI is pooled by
RoIAlign from the one pyramid level its size maps to."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from comer.kernels import roi_align

# RoIs of side sqrt(w*h) in [finest_scale * 2^k, finest_scale * 2^(k+1)) go to level k (clamped),
# the FPN paper's k0 = 4 for 224-pixel RoIs written relative to the finest level.
ROI_LEVEL_EPS = 1e-6  # mmdet adds it inside the log2 so that exact powers of two land on the upper level


class RoIExtractor(nn.Module):
    """Pool ``output_size`` x ``output_size`` features for RoIs from the first
    ``len(featmap_strides)`` feature maps.

    Args:
        output_size: side of the pooled features (7 for the box head, 14 for the mask head).
        featmap_strides: stride of each pyramid level used, finest first (p2..p5: 4, 8, 16, 32).
        finest_scale: RoIs smaller than ``2 * finest_scale`` (sqrt of the area) go to the finest level.
        sampling_ratio: RoIAlign sampling points per bin side; 0 = adaptive (ceil(roi side / output)).
        aligned: RoIAlign with the half-pixel offset (mmcv/torchvision ``aligned=True``).

    It has no parameters: the state dict of a detector holds none of its keys (as mmdet).
    """

    def __init__(
        self,
        output_size: int,
        featmap_strides: Sequence[int] = (4, 8, 16, 32),
        finest_scale: float = 56.0,
        sampling_ratio: int = 0,
        aligned: bool = True,
    ) -> None:
        super().__init__()
        if output_size < 1:
            raise ValueError(f"output_size must be >= 1, got {output_size}")
        if not featmap_strides or any(s <= 0 for s in featmap_strides):
            raise ValueError(f"featmap_strides must be positive, got {list(featmap_strides)}")
        if list(featmap_strides) != sorted(featmap_strides):
            raise ValueError(f"featmap_strides must run from the finest level up, got {list(featmap_strides)}")
        if finest_scale <= 0:
            raise ValueError(f"finest_scale must be > 0, got {finest_scale}")
        self.output_size = int(output_size)
        self.featmap_strides = tuple(int(s) for s in featmap_strides)
        self.finest_scale = float(finest_scale)
        self.sampling_ratio = int(sampling_ratio)
        self.aligned = bool(aligned)

    @property
    def num_levels(self) -> int:
        return len(self.featmap_strides)

    def map_roi_levels(self, rois: torch.Tensor) -> torch.Tensor:
        """Level index (int64) of each RoI [K, 5] (batch index, x1, y1, x2, y2):
        floor(log2(sqrt(w*h) / finest_scale + 1e-6)) clamped to [0, num_levels - 1]."""
        scale = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
        levels = torch.floor(torch.log2(scale / self.finest_scale + ROI_LEVEL_EPS))
        return levels.clamp(min=0, max=self.num_levels - 1).long()

    def forward(self, features: Sequence[torch.Tensor], rois: torch.Tensor) -> torch.Tensor:
        """``features``: pyramid maps [B, C, H_l, W_l], finest first (extra coarser maps are ignored);
        ``rois``: [K, 5] in input pixels. Returns [K, C, output_size, output_size]."""
        if len(features) < self.num_levels:
            raise ValueError(f"RoIExtractor: needs {self.num_levels} feature maps (strides "
                             f"{self.featmap_strides}), got {len(features)}")
        if rois.dim() != 2 or rois.shape[1] != 5:
            raise ValueError(f"RoIExtractor: rois must be [K, 5] (batch index, x1, y1, x2, y2), got {tuple(rois.shape)}")
        features = features[: self.num_levels]
        channels = features[0].shape[1]
        size = self.output_size
        pooled = features[0].new_zeros(rois.shape[0], channels, size, size)
        levels = self.map_roi_levels(rois)
        for level, (feature, stride) in enumerate(zip(features, self.featmap_strides)):
            index = torch.nonzero(levels == level).squeeze(1)
            if index.numel() > 0:
                pooled[index] = roi_align(feature, rois[index], (size, size), spatial_scale=1.0 / stride,
                                          sampling_ratio=self.sampling_ratio, aligned=self.aligned).to(pooled.dtype)
            else:
                # Keep every level in the autograd graph (distributed training expects gradients for all
                # parameters feeding it), as mmdet does; adds exactly zero.
                pooled = pooled + feature.sum() * 0.0
        return pooled

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, featmap_strides={self.featmap_strides}, "
                f"finest_scale={self.finest_scale}, sampling_ratio={self.sampling_ratio}, aligned={self.aligned}")

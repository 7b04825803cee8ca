"""Where RoIAlign samples: the per-RoI sampling grid, computed once in PyTorch for both paths.

For RoI k with box (x1, y1, x2, y2) on image b (torchvision's `roi_align` semantics):
    start = box * spatial_scale - (0.5 if aligned else 0)       roi size = end - start
    not aligned: the roi size is at least 1 x 1 (malformed boxes become 1 x 1)
    bin size = roi size / output size
    samples per bin along an axis = sampling_ratio if > 0 else ceil(roi size / output size) (>= 0)
    sample (iy, ix) of bin (ph, pw):  y = (start_y + ph * bin_h) + ((iy + 0.5) * bin_h) / grid_h
                                      x = (start_x + pw * bin_w) + ((ix + 0.5) * bin_w) / grid_w
    output = (sum of the bilinear samples) / max(grid_h * grid_w, 1)
Bilinear sampling (`bilinear_axis`): a sample outside [-1, H] x [-1, W] is 0; otherwise its coordinate is
clamped to >= 0, and one at or past the last row / column reads that row / column alone.

The Triton kernels read the packed per-RoI values (`RoiGrid.packed`) and compute the sample positions
with the same operations in the same order, so both paths sample at the same points.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

ALIGNED_OFFSET = 0.5  # aligned=True: pixel centres sit at integer + 0.5 coordinates
MIN_ROI_SIZE = 1.0  # aligned=False: RoIs smaller than a pixel are enlarged to one
SAMPLE_CENTRE = 0.5  # samples sit at the centres of a grid_h x grid_w split of the bin
OUTSIDE_MARGIN = 1.0  # samples more than one pixel outside the map read zero

# Columns of RoiGrid.packed(): one row of ACC dtype numbers per RoI.
GEOMETRY_FIELDS = ("batch", "start_y", "start_x", "bin_h", "bin_w", "grid_h", "grid_w", "count")
NUM_GEOMETRY_FIELDS = len(GEOMETRY_FIELDS)


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 inputs are sampled and accumulated in fp64 (exact gradient checks); every other dtype in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class RoiGrid:
    """The sampling grid of K RoIs, every field [K]."""

    batch: torch.Tensor  # int64 image index
    start_y: torch.Tensor  # accumulator dtype, in feature-map pixels
    start_x: torch.Tensor
    bin_h: torch.Tensor
    bin_w: torch.Tensor
    grid_h: torch.Tensor  # int64 samples per bin along y (>= 0)
    grid_w: torch.Tensor
    count: torch.Tensor  # accumulator dtype, max(grid_h * grid_w, 1): the divisor of a bin's sum

    def packed(self) -> torch.Tensor:
        """[K, NUM_GEOMETRY_FIELDS] in the accumulator dtype, columns in GEOMETRY_FIELDS order."""
        dtype = self.start_y.dtype
        return torch.stack([getattr(self, name).to(dtype) for name in GEOMETRY_FIELDS], dim=1).contiguous()


def roi_grid(rois: torch.Tensor, output_size: tuple[int, int], spatial_scale: float, sampling_ratio: int,
             aligned: bool, dtype: torch.dtype) -> RoiGrid:
    """The sampling grid of rois [K, 5] (batch index, x1, y1, x2, y2), computed in `dtype`."""
    output_h, output_w = output_size
    rois = rois.detach().to(dtype)
    offset = ALIGNED_OFFSET if aligned else 0.0
    start_x, start_y, end_x, end_y = (rois[:, i] * spatial_scale - offset for i in range(1, 5))
    roi_w = end_x - start_x
    roi_h = end_y - start_y
    if not aligned:
        roi_w = roi_w.clamp(min=MIN_ROI_SIZE)
        roi_h = roi_h.clamp(min=MIN_ROI_SIZE)
    bin_h = roi_h / output_h
    bin_w = roi_w / output_w
    if sampling_ratio > 0:
        grid_h = torch.full_like(rois[:, 0], sampling_ratio, dtype=torch.int64)
        grid_w = grid_h
    else:
        # ceil(roi size / output size); aligned boxes can be inverted: no samples, output 0 (torchvision).
        grid_h = torch.ceil(bin_h).clamp(min=0).to(torch.int64)
        grid_w = torch.ceil(bin_w).clamp(min=0).to(torch.int64)
    count = (grid_h * grid_w).clamp(min=1).to(dtype)
    return RoiGrid(rois[:, 0].to(torch.int64), start_y, start_x, bin_h, bin_w, grid_h, grid_w, count)


def sample_coordinate(start: torch.Tensor, bin_index: torch.Tensor, bin_size: torch.Tensor, sample: torch.Tensor,
                      grid: torch.Tensor) -> torch.Tensor:
    """Coordinate of sample `sample` of bin `bin_index` (broadcasting tensors of one float dtype)."""
    return (start + bin_index * bin_size) + ((sample + SAMPLE_CENTRE) * bin_size) / grid


def bilinear_axis(coord: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Along one axis of length `size`: (low index, high index, weight of high, inside) for each
    coordinate; the low index has weight 1 - frac. Indices are valid (in [0, size)) even where not inside."""
    inside = (coord >= -OUTSIDE_MARGIN) & (coord <= size)
    coord = coord.clamp(min=0, max=size)
    low = coord.floor().to(torch.int64)
    at_edge = low >= size - 1
    low = torch.where(at_edge, size - 1, low)
    high = torch.where(at_edge, low, low + 1)
    frac = torch.where(at_edge, torch.zeros_like(coord), coord - low.to(coord.dtype))
    return low, high, frac, inside

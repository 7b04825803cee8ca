"""The multi-level token sequence of the CNN branch, named once.

The CNN stream `c` is the concatenation of three flattened feature maps: strides 8, 16 and 32 of
the input image (levels 0, 1, 2). The ViT grid is level 1 (stride 16). Everything that cuts the
sequence into levels, glues it back, or needs per-level geometry goes through LevelLayout, built
once per forward from the image size.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

LEVEL_STRIDES = (8, 16, 32)
VIT_STRIDE = 16


@dataclass(frozen=True)
class LevelLayout:
    """Geometry of the [B, S, C] multi-level token sequence (row-major maps, finest level first)."""

    sizes: tuple[tuple[int, int], ...]  # (h, w) per level
    vit_level: int  # index of the level that has the ViT grid
    device: torch.device

    @classmethod
    def from_image_size(cls, height: int, width: int, device: torch.device | str = "cpu",
                        strides: tuple[int, ...] = LEVEL_STRIDES, vit_stride: int = VIT_STRIDE) -> "LevelLayout":
        max_stride = max(strides)
        if height % max_stride or width % max_stride:
            raise ValueError(
                f"image size {height}x{width} is not allowed: both sides must be multiples of {max_stride}")
        if vit_stride not in strides:
            raise ValueError(f"LevelLayout: vit_stride {vit_stride} must be one of the level strides {strides}")
        sizes = tuple((height // s, width // s) for s in strides)
        return cls(sizes=sizes, vit_level=strides.index(vit_stride), device=torch.device(device))

    # ---- geometry -------------------------------------------------------------------------------
    @property
    def num_levels(self) -> int:
        return len(self.sizes)

    @property
    def lengths(self) -> list[int]:
        return [h * w for h, w in self.sizes]

    @property
    def num_tokens(self) -> int:
        return sum(self.lengths)

    @property
    def vit_grid(self) -> tuple[int, int]:
        return self.sizes[self.vit_level]

    @cached_property
    def vit_layout(self) -> "LevelLayout":
        """The ViT tokens alone as a one-level layout (the stride-16 grid): values and reference points
        of the attentions between the ViT tokens and the CNN stream (ViT-Adapter's injector and extractor)."""
        return LevelLayout(sizes=(self.vit_grid,), vit_level=0, device=self.device)

    # The tensors below are built on first use and cached: one layout serves every attention call of a
    # forward pass (the layout is frozen, so cached_property writes straight into the instance dict).
    @cached_property
    def spatial_shapes(self) -> torch.Tensor:
        """[L, 2] int64 (h, w) per level, as ms_deform_attn expects."""
        return torch.tensor(self.sizes, dtype=torch.int64, device=self.device)

    @cached_property
    def level_start_index(self) -> torch.Tensor:
        """[L] int64 offset of each level in the sequence."""
        starts = [0]
        for length in self.lengths[:-1]:
            starts.append(starts[-1] + length)
        return torch.tensor(starts, dtype=torch.int64, device=self.device)

    @cached_property
    def _offset_normalizer(self) -> torch.Tensor:
        return torch.tensor([(w, h) for h, w in self.sizes], dtype=torch.float32, device=self.device)

    def offset_normalizer(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[L, 2] (w, h) per level: divides pixel offsets into normalised (x, y) offsets."""
        return self._offset_normalizer.to(dtype)

    def reference_points(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[1, S, 1, 2] normalised (x, y) pixel centres of every token of every level.

        Computed in float32 (as Deformable DETR does) and then cast, so that float64 runs see the
        same points as the official code.
        """
        return self._reference_points.to(dtype)

    @cached_property
    def _reference_points(self) -> torch.Tensor:
        points = []
        for height, width in self.sizes:
            ys = (torch.arange(height, dtype=torch.float32, device=self.device) + 0.5) / height
            xs = (torch.arange(width, dtype=torch.float32, device=self.device) + 0.5) / width
            grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
            points.append(torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=-1))
        return torch.cat(points, dim=0)[None, :, None, :]

    # ---- sequence <-> levels ----------------------------------------------------------------------
    def check(self, tokens: torch.Tensor) -> None:
        if tokens.dim() != 3 or tokens.shape[1] != self.num_tokens:
            raise ValueError(
                f"LevelLayout: expected tokens [B, {self.num_tokens}, C] for levels {list(self.sizes)}, "
                f"got {tuple(tokens.shape)}")

    def split(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """[B, S, C] -> per level [B, h*w, C]."""
        self.check(tokens)
        return list(tokens.split(self.lengths, dim=1))

    def merge(self, levels: list[torch.Tensor]) -> torch.Tensor:
        """Per level [B, h*w, C] -> [B, S, C]."""
        return torch.cat(levels, dim=1)

    def to_maps(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """[B, S, C] -> per level [B, C, h, w]."""
        return [level.transpose(1, 2).reshape(level.shape[0], level.shape[2], h, w)
                for level, (h, w) in zip(self.split(tokens), self.sizes)]

    @staticmethod
    def from_maps(maps: list[torch.Tensor]) -> torch.Tensor:
        """Per level [B, C, h, w] -> [B, S, C]."""
        return torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1)

    def add_to_vit_level(self, tokens: torch.Tensor, vit_tokens: torch.Tensor) -> torch.Tensor:
        """Return tokens with vit_tokens [B, h*w, C] (the ViT grid) added into the stride-16 level."""
        levels = self.split(tokens)
        levels[self.vit_level] = levels[self.vit_level] + vit_tokens
        return self.merge(levels)

    def map_of_level(self, tokens_of_level: torch.Tensor, level: int) -> torch.Tensor:
        """[B, h*w, C] of one level -> [B, C, h, w]."""
        height, width = self.sizes[level]
        return tokens_of_level.transpose(1, 2).reshape(tokens_of_level.shape[0], -1, height, width)

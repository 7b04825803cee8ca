"""Convolutional-transformer interaction (CTI) blocks between the ViT tokens x and the CNN stream c.

ViT-CoMer's attentions are multi-scale deformable self-attention over the 3-level CNN sequence, with
reference points at the pixel centres of every level (LevelLayout.reference_points). ViT-Adapter's,
which they descend from, are cross-attentions between x and c: the Injector (x queries c) and the
CNNInteraction with values_from_vit (c queries x, ViT-Adapter's extractor); x is then the one-level
LevelLayout.vit_layout.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .conv_ffn import ConvFFN
from .drop_path import DropPath
from .level_layout import LevelLayout
from .ms_deform_attn import MSDeformAttn

VIT_VALUE_LEVELS = 1  # the ViT tokens as values: one level, the stride-16 grid (LevelLayout.vit_layout)


@dataclass(frozen=True)
class DeformSettings:
    """Numbers shared by every deformable attention + ConvFFN pair of the backbone."""

    dim: int
    num_heads: int
    num_points: int
    value_ratio: float
    ffn_ratio: float
    drop_path: float
    norm_layer: Callable[[int], nn.Module]
    num_levels: int = 3

    def attn(self, num_value_levels: int | None = None) -> MSDeformAttn:
        """Deformable attention over `num_value_levels` value levels (default: the CNN stream's)."""
        levels = self.num_levels if num_value_levels is None else num_value_levels
        return MSDeformAttn(self.dim, self.num_heads, levels, self.num_points, self.value_ratio)

    def ffn(self) -> ConvFFN:
        return ConvFFN(self.dim, int(self.dim * self.ffn_ratio))

    def norm(self) -> nn.Module:
        return self.norm_layer(self.dim)


class CNNInteraction(nn.Module):
    """The CNN stream attends over `feat` by deformable attention, then a ConvFFN:
    q = q + attn(query_norm(q), feat_norm(feat)); q = q + ConvFFN(ffn_norm(q)).

    feat is the CNN stream itself (ViT-CoMer's CNN feature interaction, three value levels) or, with
    values_from_vit, the ViT tokens (one value level, the ViT grid): ViT-Adapter's extractor, which
    ViT-CoMer's block descends from."""

    def __init__(self, settings: DeformSettings, values_from_vit: bool = False):
        super().__init__()
        self.values_from_vit = values_from_vit
        self.query_norm = settings.norm()
        self.feat_norm = settings.norm()
        self.attn = settings.attn(num_value_levels=VIT_VALUE_LEVELS if values_from_vit else None)
        self.ffn = settings.ffn()
        self.ffn_norm = settings.norm()
        self.drop_path = DropPath(settings.drop_path)

    def forward(self, query: torch.Tensor, feat: torch.Tensor, layout: LevelLayout) -> torch.Tensor:
        points = layout.reference_points(query.dtype)
        value_layout = layout.vit_layout if self.values_from_vit else layout
        query = query + self.attn(self.query_norm(query), self.feat_norm(feat), value_layout, points)
        return query + self.drop_path(self.ffn(self.ffn_norm(query), layout))

    def extra_repr(self) -> str:
        return f"values_from_vit={self.values_from_vit}"


class Injector(nn.Module):
    """ViT-Adapter's spatial feature injector: the ViT tokens attend over the CNN stream (queries at the
    ViT grid's pixel centres, values from all three levels of c) and x + gamma * attended is returned;
    no ConvFFN, no resizing (compare CTIToViT, where c queries itself)."""

    def __init__(self, settings: DeformSettings, init_value: float):
        super().__init__()
        self.query_norm = settings.norm()
        self.feat_norm = settings.norm()
        self.attn = settings.attn()
        self.gamma = nn.Parameter(torch.full((settings.dim,), float(init_value)))

    def forward(self, x: torch.Tensor, c: torch.Tensor, layout: LevelLayout) -> torch.Tensor:
        points = layout.vit_layout.reference_points(x.dtype)
        return x + self.gamma * self.attn(self.query_norm(x), self.feat_norm(c), layout, points)


class CTIToViT(nn.Module):
    """Injects the CNN stream into the ViT tokens: attend over c (queries and values both from c),
    add a ConvFFN, resize the three levels to the ViT grid, sum, and add gamma * sum to x."""

    def __init__(self, settings: DeformSettings, init_value: float):
        super().__init__()
        self.query_norm = settings.norm()
        self.feat_norm = settings.norm()
        self.attn = settings.attn()
        self.gamma = nn.Parameter(torch.full((settings.dim,), float(init_value)))
        self.ffn = settings.ffn()
        self.ffn_norm = settings.norm()
        self.drop_path = DropPath(settings.drop_path)

    def forward(self, x: torch.Tensor, c: torch.Tensor, layout: LevelLayout) -> torch.Tensor:
        points = layout.reference_points(c.dtype)
        attended = self.attn(self.query_norm(c), self.feat_norm(c), layout, points)
        attended = attended + self.drop_path(self.ffn(self.ffn_norm(attended), layout))
        grid = layout.vit_grid
        resized = [level if tuple(level.shape[-2:]) == grid else
                   F.interpolate(level, size=grid, mode="bilinear", align_corners=False)
                   for level in layout.to_maps(attended)]
        fused = sum(resized[1:], resized[0]).flatten(2).transpose(1, 2)  # summed in level order
        return x + self.gamma * fused


class CTIToCNN(nn.Module):
    """Injects the ViT tokens into the CNN stream: x is added into the stride-16 level of c; with the
    CNN feature interaction, c becomes interaction(query_norm(c), feat_norm(c)) — the normalised c
    also feeds the residual, so the stream is re-normalised at every stage (as the official code)."""

    def __init__(self, settings: DeformSettings, cnn_feature_interaction: bool):
        super().__init__()
        if cnn_feature_interaction:
            self.query_norm = settings.norm()
            self.feat_norm = settings.norm()
            self.cnn_interaction = CNNInteraction(settings)
        else:
            self.cnn_interaction = None

    def interact(self, c: torch.Tensor, layout: LevelLayout) -> torch.Tensor:
        """The CNN feature interaction (identity when switched off)."""
        if self.cnn_interaction is None:
            return c
        return self.cnn_interaction(self.query_norm(c), self.feat_norm(c), layout)

    def forward(self, c: torch.Tensor, x: torch.Tensor, layout: LevelLayout) -> torch.Tensor:
        return self.interact(layout.add_to_vit_level(c, x), layout)


class ExtraCTI(CTIToCNN):
    """Extra CTI-to-CNN block of the last stage: x into the stride-16 level, c + ConvFFN(ffn_norm(c)),
    then (optionally) the CNN feature interaction as in CTIToCNN."""

    def __init__(self, settings: DeformSettings, cnn_feature_interaction: bool):
        super().__init__(settings, cnn_feature_interaction)
        self.ffn = settings.ffn()
        self.ffn_norm = settings.norm()
        self.drop_path = DropPath(settings.drop_path)

    def forward(self, c: torch.Tensor, x: torch.Tensor, layout: LevelLayout) -> torch.Tensor:
        c = layout.add_to_vit_level(c, x)
        c = c + self.drop_path(self.ffn(self.ffn_norm(c), layout))
        return self.interact(c, layout)

"""PVT v1 (Wang et al. 2021, "Pyramid Vision Transformer") as the official dense-prediction backbone
(whai362/PVT detection/pvt.py and segmentation/pvt.py): four stages of non-overlapping patch embedding,
a learned position embedding per stage and spatial-reduction attention blocks; no class token, no final norm.

forward(images [B, 3, H, W], H and W multiples of 32) -> {"res2".."res5": [B, D_i, H/s, W/s]}, s = 4, 8, 16, 32.
Position embeddings are learned on the pretraining grid (pretrain_img_size / s) and resized bilinearly to
the input's grid when it differs. Parameter names follow the official ones per stage:
``stages.{i}.patch_embed`` / ``pos_embed`` / ``blocks.{j}`` for ``patch_embed{i+1}`` / ``pos_embed{i+1}`` /
``block{i+1}.{j}`` (comer/checkpoint/formats.py maps them).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from comer.layers.conv_patch_embed import ConvPatchEmbed
from comer.layers.pvt_block import PVTBlock, build_pvt_blocks
from comer.layers.pyramid_stages import (
    IMAGE_CHANNELS,
    check_pyramid_input,
    check_stage_lists,
    stage_downsampling,
    stage_drop_path_rates,
)
from comer.layers.rel_pos_bias import Grid

from .shape_spec import ShapeSpec
from .vit_comer import OUTPUT_NAMES, OUTPUT_STRIDES

# The blocks' LayerNorms: norm_layer=partial(nn.LayerNorm, eps=1e-6) in the official variants.
NORM_EPS = 1e-6
# The patch-embedding and spatial-reduction LayerNorms: the official code builds them as nn.LayerNorm(dim).
TORCH_LAYER_NORM_EPS = 1e-5
INIT_STD = 0.02  # truncated-normal std of the Linears and position embeddings


class PVTStage(nn.Module):
    """``patch_embed`` -> + ``pos_embed`` (resized to the grid) -> ``blocks`` -> map [B, D, h, w]."""

    def __init__(self, patch_embed: ConvPatchEmbed, dim: int, pos_grid: Grid, blocks: Sequence[PVTBlock]):
        super().__init__()
        self.patch_embed = patch_embed
        self.pos_grid = (int(pos_grid[0]), int(pos_grid[1]))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.pos_grid[0] * self.pos_grid[1], dim))
        self.blocks = nn.ModuleList(blocks)

    def position_embedding(self, grid: Grid) -> torch.Tensor:
        """[1, h*w, D]: the learned grid, bilinearly resized (align_corners False) when ``grid`` differs."""
        if tuple(grid) == self.pos_grid:
            return self.pos_embed
        maps = self.pos_embed.reshape(1, *self.pos_grid, -1).permute(0, 3, 1, 2)
        return F.interpolate(maps, size=tuple(grid), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, grid = self.patch_embed(x)
        tokens = tokens + self.position_embedding(grid)
        for block in self.blocks:
            tokens = block(tokens, grid)
        return tokens.transpose(1, 2).reshape(x.shape[0], -1, *grid)

    def extra_repr(self) -> str:
        return f"pos_grid={self.pos_grid}"


class PyramidVisionTransformer(nn.Module):
    """PVT v1 backbone; conf/backbone/pvt_*.yaml write every argument out.

    Args:
        embed_dims, depths, num_heads, mlp_ratios, sr_ratios: per stage (4 entries each).
        drop_path_rate: stochastic depth of the last block (linear in the block index from 0).
        pretrain_img_size: the square image size the position embeddings were learned at (224 for ImageNet).
        qkv_bias: bias of the q and kv projections (True in every official variant).
    """

    def __init__(
        self,
        embed_dims: Sequence[int],
        depths: Sequence[int],
        num_heads: Sequence[int],
        mlp_ratios: Sequence[float],
        sr_ratios: Sequence[int],
        drop_path_rate: float,
        pretrain_img_size: int,
        qkv_bias: bool = True,
    ):
        super().__init__()
        check_stage_lists("PyramidVisionTransformer", len(OUTPUT_NAMES), embed_dims=embed_dims, depths=depths,
                          num_heads=num_heads, mlp_ratios=mlp_ratios, sr_ratios=sr_ratios)
        if pretrain_img_size % OUTPUT_STRIDES[-1]:
            raise ValueError(f"PyramidVisionTransformer: pretrain_img_size {pretrain_img_size} must be a multiple of "
                             f"{OUTPUT_STRIDES[-1]}")
        self.embed_dims = [int(d) for d in embed_dims]
        stages = []
        in_channels = IMAGE_CHANNELS
        for i, (dim, patch, rates) in enumerate(zip(self.embed_dims, stage_downsampling(OUTPUT_STRIDES),
                                                    stage_drop_path_rates(drop_path_rate, depths))):
            side = pretrain_img_size // OUTPUT_STRIDES[i]
            blocks = build_pvt_blocks(dim, num_heads[i], mlp_ratios[i], qkv_bias, sr_ratios[i], pool_size=None,
                                      dw_kernel_size=None, relu_after_fc1=False, drop_path=rates, norm_eps=NORM_EPS,
                                      reduction_norm_eps=TORCH_LAYER_NORM_EPS)
            embed = ConvPatchEmbed(in_channels, dim, patch, patch, padding=0, norm_eps=TORCH_LAYER_NORM_EPS)
            stages.append(PVTStage(embed, dim, (side, side), blocks))
            in_channels = dim
        self.stages = nn.ModuleList(stages)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """As the official code: truncated-normal Linears and position embeddings, unit LayerNorms; the convs
        keep PyTorch's default initialisation."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=INIT_STD)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for stage in self.stages:
            nn.init.trunc_normal_(stage.pos_embed, std=INIT_STD)

    def output_shape(self) -> dict[str, ShapeSpec]:
        return pyramid_output_shape(self.embed_dims)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return run_stages(self.stages, images, type(self).__name__)


def pyramid_output_shape(dims: Sequence[int]) -> dict[str, ShapeSpec]:
    """res2..res5 with the stages' widths at strides 4..32 (PVT v1 and v2)."""
    return {name: ShapeSpec(dim, stride) for name, dim, stride in zip(OUTPUT_NAMES, dims, OUTPUT_STRIDES)}


def run_stages(stages: Sequence[nn.Module], images: torch.Tensor, owner: str) -> dict[str, torch.Tensor]:
    """The images through the stages in turn, each stage's output as res2..res5 (PVT v1 and v2)."""
    check_pyramid_input(images, OUTPUT_STRIDES[-1], owner)
    out = {}
    x = images
    for name, stage in zip(OUTPUT_NAMES, stages):
        x = stage(x)
        out[name] = x
    return out

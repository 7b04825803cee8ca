"""PVT v2 (Wang et al. 2022, "PVT v2: Improved Baselines with Pyramid Vision Transformer") as the official
dense-prediction backbone (whai362/PVT detection/pvt_v2.py): overlapping patch embedding, the convolutional
feed-forward (depth-wise 3x3 between the MLP's Linears), no position embedding, a LayerNorm after every stage.
b2-li replaces the conv spatial reduction by linear SRA (average pool to 7x7, 1x1 conv, LayerNorm, GELU) and
adds a ReLU after the MLP's first Linear.

forward(images [B, 3, H, W], H and W multiples of 32) -> {"res2".."res5": [B, D_i, H/s, W/s]}, s = 4, 8, 16, 32.
Names: ``stages.{i}.patch_embed`` / ``blocks.{j}`` / ``norm`` for the official ``patch_embed{i+1}`` /
``block{i+1}.{j}`` / ``norm{i+1}``, ``mlp.dwconv`` for ``mlp.dwconv.dwconv`` (comer/checkpoint/formats.py).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from comer.layers.conv_patch_embed import ConvPatchEmbed
from comer.layers.pvt_block import PVTBlock, build_pvt_blocks
from comer.layers.pyramid_stages import (
    IMAGE_CHANNELS,
    check_stage_lists,
    stage_downsampling,
    stage_drop_path_rates,
)

from .pvt import INIT_STD, NORM_EPS, TORCH_LAYER_NORM_EPS, pyramid_output_shape, run_stages
from .shape_spec import ShapeSpec
from .vit_comer import OUTPUT_NAMES, OUTPUT_STRIDES

CONV_FFN_KERNEL_SIZE = 3  # the depth-wise conv of the convolutional feed-forward


class PVTv2Stage(nn.Module):
    """``patch_embed`` (overlapping) -> ``blocks`` -> ``norm`` -> map [B, D, h, w]."""

    def __init__(self, patch_embed: ConvPatchEmbed, dim: int, blocks: Sequence[PVTBlock]):
        super().__init__()
        self.patch_embed = patch_embed
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(dim, eps=NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, grid = self.patch_embed(x)
        for block in self.blocks:
            tokens = block(tokens, grid)
        return self.norm(tokens).transpose(1, 2).reshape(x.shape[0], -1, *grid)


class PyramidVisionTransformerV2(nn.Module):
    """PVT v2 backbone; conf/backbone/pvt_v2_*.yaml write every argument out.

    Args:
        embed_dims, depths, num_heads, mlp_ratios: per stage (4 entries each).
        sr_ratios: per-stage spatial-reduction ratios of the conv SRA (b0..b5); None for linear SRA.
        linear_sra_pool_size: the pooled grid side of linear SRA (7 for b2-li); None for the conv SRA.
            Exactly one of sr_ratios and linear_sra_pool_size is given.
        patch_kernel_sizes: per-stage kernel of the overlapping patch embedding (7, 3, 3, 3), padding k // 2,
            strides 4, 2, 2, 2.
        drop_path_rate: stochastic depth of the last block (linear in the block index from 0).
        qkv_bias: bias of the q and kv projections (True in every official variant).
    """

    def __init__(
        self,
        embed_dims: Sequence[int],
        depths: Sequence[int],
        num_heads: Sequence[int],
        mlp_ratios: Sequence[float],
        sr_ratios: Sequence[int] | None,
        linear_sra_pool_size: int | None,
        patch_kernel_sizes: Sequence[int],
        drop_path_rate: float,
        qkv_bias: bool = True,
    ):
        super().__init__()
        if (sr_ratios is None) == (linear_sra_pool_size is None):
            raise ValueError(f"PyramidVisionTransformerV2: give exactly one of sr_ratios (conv SRA) or "
                             f"linear_sra_pool_size (linear SRA), got sr_ratios={sr_ratios}, "
                             f"linear_sra_pool_size={linear_sra_pool_size}")
        linear = linear_sra_pool_size is not None
        sr_ratios = [None] * len(OUTPUT_NAMES) if linear else list(sr_ratios)
        check_stage_lists("PyramidVisionTransformerV2", len(OUTPUT_NAMES), embed_dims=embed_dims, depths=depths,
                          num_heads=num_heads, mlp_ratios=mlp_ratios, sr_ratios=sr_ratios,
                          patch_kernel_sizes=patch_kernel_sizes)
        strides = stage_downsampling(OUTPUT_STRIDES)
        bad_kernels = [(k, s) for k, s in zip(patch_kernel_sizes, strides) if k < s or k % 2 == 0]
        if bad_kernels:
            raise ValueError(f"PyramidVisionTransformerV2: patch_kernel_sizes {list(patch_kernel_sizes)} must be odd "
                             f"and at least the strides {strides} (overlapping patches)")
        self.embed_dims = [int(d) for d in embed_dims]
        stages = []
        in_channels = IMAGE_CHANNELS
        for i, (dim, stride, kernel, rates) in enumerate(zip(self.embed_dims, strides, patch_kernel_sizes,
                                                             stage_drop_path_rates(drop_path_rate, depths))):
            blocks = build_pvt_blocks(dim, num_heads[i], mlp_ratios[i], qkv_bias, sr_ratios[i],
                                      pool_size=linear_sra_pool_size, dw_kernel_size=CONV_FFN_KERNEL_SIZE,
                                      relu_after_fc1=linear, drop_path=rates, norm_eps=NORM_EPS,
                                      reduction_norm_eps=TORCH_LAYER_NORM_EPS)
            embed = ConvPatchEmbed(in_channels, dim, kernel, stride, padding=kernel // 2,
                                   norm_eps=TORCH_LAYER_NORM_EPS)
            stages.append(PVTv2Stage(embed, dim, blocks))
            in_channels = dim
        self.stages = nn.ModuleList(stages)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """As the official code: truncated-normal Linears, unit LayerNorms, He-normal (fan-out per group) convs."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=INIT_STD)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Conv2d):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def output_shape(self) -> dict[str, ShapeSpec]:
        return pyramid_output_shape(self.embed_dims)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return run_stages(self.stages, images, type(self).__name__)

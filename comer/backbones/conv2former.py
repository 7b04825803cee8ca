"""Conv2Former (Hou et al. 2024, "Conv2Former: A Simple Transformer-Style ConvNet for Visual Recognition",
HVision-NKU/Conv2Former models/conv2former.py) as a four-level backbone: a convolutional stem, then per stage
a (LayerNorm + 2x2 stride-2 conv) downsampling and blocks of convolutional modulation (11x11 depth-wise
kernel) and feed-forward, each a layer-scaled residual. For dense prediction every level gets a channel
LayerNorm (``out_norms``, ConvNeXt's detection/segmentation recipe), which ImageNet checkpoints lack.

forward(images [B, 3, H, W], H and W multiples of 32) -> {"res2".."res5": [B, D_i, H/s, W/s]}, s = 4, 8, 16, 32.
Names are the official ones (``downsample_layers.{i}``, ``stages.{i}.{j}``); the classifier (``head``,
``pred``) is left out.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from comer.layers.conv2former_block import Conv2FormerBlock
from comer.layers.conv2former_mlp import Conv2FormerMlp
from comer.layers.conv_modulation import ConvModulation
from comer.layers.layer_norm_2d import LayerNorm2d
from comer.layers.pyramid_stages import (
    IMAGE_CHANNELS,
    check_pyramid_input,
    check_stage_lists,
    stage_downsampling,
    stage_drop_path_rates,
)

from .shape_spec import ShapeSpec
from .vit_comer import OUTPUT_NAMES, OUTPUT_STRIDES

NORM_EPS = 1e-6  # every LayerNorm of the official model
STEM_KERNEL_SIZE = 3  # the stem's two 3x3 convs (the first of stride 2); a 2x2 stride-2 conv ends it
STEM_FIRST_STRIDE = 2
MLP_POS_KERNEL_SIZE = 3  # the feed-forward's depth-wise "pos" conv
INIT_STD = 0.02  # truncated-normal std of every conv and Linear


def conv2former_stem(in_channels: int, dim: int, stride: int) -> nn.Sequential:
    """conv 3x3 /2 -> GELU -> BN -> conv 3x3 -> GELU -> BN -> conv (stride / 2) x (stride / 2), width dim / 2
    inside, no conv biases (the official indices 0, 2, 3, 5, 6)."""
    hidden = dim // 2
    last = stride // STEM_FIRST_STRIDE
    padding = STEM_KERNEL_SIZE // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden, STEM_KERNEL_SIZE, stride=STEM_FIRST_STRIDE, padding=padding, bias=False),
        nn.GELU(),
        nn.BatchNorm2d(hidden),
        nn.Conv2d(hidden, hidden, STEM_KERNEL_SIZE, padding=padding, bias=False),
        nn.GELU(),
        nn.BatchNorm2d(hidden),
        nn.Conv2d(hidden, dim, last, stride=last, bias=False),
    )


class Conv2Former(nn.Module):
    """Conv2Former backbone; every argument is per variant (conf/backbone/conv2former_*.yaml).

    Args:
        dims, depths, mlp_ratios: per stage (4 entries each).
        kernel_size: the depth-wise kernel of the convolutional modulation (11 in every official variant).
        layer_scale_init: initial value of the per-channel layer scales (1e-6).
        drop_path_rate: stochastic depth of the last block (linear in the block index from 0).
    """

    def __init__(
        self,
        dims: Sequence[int],
        depths: Sequence[int],
        mlp_ratios: Sequence[float],
        kernel_size: int,
        layer_scale_init: float,
        drop_path_rate: float,
    ):
        super().__init__()
        check_stage_lists("Conv2Former", len(OUTPUT_NAMES), dims=dims, depths=depths, mlp_ratios=mlp_ratios)
        self.dims = [int(d) for d in dims]
        strides = stage_downsampling(OUTPUT_STRIDES)
        downsamples = [conv2former_stem(IMAGE_CHANNELS, self.dims[0], strides[0])]
        for previous, dim, stride in zip(self.dims[:-1], self.dims[1:], strides[1:]):
            downsamples.append(nn.Sequential(LayerNorm2d(previous, eps=NORM_EPS),
                                             nn.Conv2d(previous, dim, stride, stride=stride)))
        self.downsample_layers = nn.ModuleList(downsamples)
        self.stages = nn.ModuleList(
            nn.Sequential(*(
                Conv2FormerBlock(dim, ConvModulation(dim, kernel_size, NORM_EPS),
                                 Conv2FormerMlp(dim, int(dim * ratio), MLP_POS_KERNEL_SIZE, NORM_EPS),
                                 layer_scale_init, rate)
                for rate in rates))
            for dim, ratio, rates in zip(self.dims, mlp_ratios, stage_drop_path_rates(drop_path_rate, depths)))
        self.out_norms = nn.ModuleList(LayerNorm2d(dim, eps=NORM_EPS) for dim in self.dims)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """As the official code: truncated-normal convs and Linears with zero biases; norms at unit scale."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(module.weight, std=INIT_STD)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def output_shape(self) -> dict[str, ShapeSpec]:
        return {name: ShapeSpec(dim, stride) for name, dim, stride in zip(OUTPUT_NAMES, self.dims, OUTPUT_STRIDES)}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        check_pyramid_input(images, OUTPUT_STRIDES[-1], "Conv2Former")
        out = {}
        x = images
        for name, downsample, stage, norm in zip(OUTPUT_NAMES, self.downsample_layers, self.stages, self.out_norms):
            x = stage(downsample(x))
            out[name] = norm(x)
        return out

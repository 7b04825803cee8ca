"""Semantic FPN (Kirillov et al. 2019, "Panoptic Feature Pyramid Networks"), the head of the PVT paper's ADE20K
results: mmseg's ``FPN`` neck (256 channels, one output per backbone level, no extra levels) followed by
mmseg's ``FPNHead``: per level 3x3 conv-norm-ReLU steps, each but a stride-4 level's followed by a 2x bilinear
upsampling, until the finest stride; the levels are summed, then dropout and the 1x1 ``conv_seg``.

Names follow mmseg's head (``scale_heads.{i}.{k}.conv`` / ``.bn``, ``conv_seg``); the neck sits inside the
head as ``neck`` (mmseg keeps it beside the head as a top-level ``neck``).
"""

from __future__ import annotations

import math
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from comer.backbones.shape_spec import ShapeSpec
from comer.heads.base import DecodeHead
from comer.heads.conv_module import ActFactory, ConvModule, NormFactory
from comer.heads.fpn import FPN

NeckFactory = Callable[..., FPN]
UPSAMPLE_FACTOR = 2  # each scale-head step doubles the resolution (FPN levels are powers of two apart)
KERNEL_SIZE = 3  # the scale heads' convs


class SemanticFPNHead(DecodeHead):
    """Logits at the stride of the neck's finest output.

    Args:
        input_shape: the backbone's ``output_shape()``.
        num_classes: classes of ``conv_seg``.
        neck: factory (Hydra ``_partial_``) of the FPN, called with ``input_shape``; every one of its outputs
            gets a scale head (configure it with ``num_outs`` = its number of ``in_features``).
        channels: width of the scale heads (128 in mmseg's Semantic FPN).
    """

    def __init__(
        self,
        input_shape: Mapping[str, ShapeSpec],
        num_classes: int,
        neck: NeckFactory,
        channels: int = 128,
        dropout: float = 0.1,
        norm: NormFactory | None = nn.BatchNorm2d,
        act: ActFactory | None = nn.ReLU,
        align_corners: bool = False,
    ) -> None:
        super().__init__(channels, num_classes, dropout)
        self.neck = neck(input_shape=input_shape)
        shapes = list(self.neck.output_shape().values())
        self.output_stride = shapes[0].stride
        self.align_corners = align_corners
        self.scale_heads = nn.ModuleList(
            self._scale_head(shape, channels, norm, act) for shape in shapes)

    def _scale_head(self, shape: ShapeSpec, channels: int, norm: NormFactory | None,
                    act: ActFactory | None) -> nn.Sequential:
        """max(1, log2(stride / finest stride)) convs, each followed by a 2x upsampling on a coarser level."""
        steps = int(round(math.log(shape.stride // self.output_stride, UPSAMPLE_FACTOR)))
        layers: list[nn.Module] = []
        for step in range(max(1, steps)):
            in_channels = shape.channels if step == 0 else channels
            layers.append(ConvModule(in_channels, channels, KERNEL_SIZE, padding=KERNEL_SIZE // 2, norm=norm, act=act))
            if steps:
                layers.append(nn.Upsample(scale_factor=UPSAMPLE_FACTOR, mode="bilinear",
                                          align_corners=self.align_corners))
        return nn.Sequential(*layers)

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        levels = list(self.neck(features).values())
        out = self.scale_heads[0](levels[0])
        for head, level in zip(self.scale_heads[1:], levels[1:]):
            upsampled = head(level)
            if upsampled.shape[2:] != out.shape[2:]:
                upsampled = F.interpolate(upsampled, size=out.shape[2:], mode="bilinear",
                                          align_corners=self.align_corners)
            out = out + upsampled
        return self.cls_seg(out)

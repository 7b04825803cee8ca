"""UPerNet decode head (Xiao et al. 2018) with mmseg's module names: a pyramid pooling module on
the coarsest level, an FPN top-down path, fusion of all levels at the finest stride."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from comer.heads.base import DecodeHead, select_features, select_shapes
from comer.heads.conv_module import ActFactory, ConvModule, NormFactory


class UPerHead(DecodeHead):
    """Logits at the stride of the first (finest) entry of ``in_features``.

    Channels per level are read from ``input_shape`` (the backbone's ``output_shape()``).
    """

    def __init__(
        self,
        input_shape: Mapping,
        num_classes: int,
        in_features: Sequence[str] = ("res2", "res3", "res4", "res5"),
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
        norm: NormFactory | None = nn.BatchNorm2d,
        act: ActFactory | None = nn.ReLU,
        align_corners: bool = False,
    ) -> None:
        super().__init__(channels, num_classes, dropout)
        if len(in_features) < 2:
            raise ValueError(f"UPerHead needs at least two in_features, got {list(in_features)}")
        if not pool_scales or any(int(s) < 1 for s in pool_scales):
            raise ValueError(f"pool_scales must be positive ints, got {list(pool_scales)}")
        shapes = select_shapes(input_shape, in_features, "UPerHead")
        strides = [shape.stride for shape in shapes]
        if strides != sorted(strides):
            raise ValueError(f"UPerHead in_features must go from fine to coarse; strides {strides}")
        in_channels = [shape.channels for shape in shapes]
        self.in_features = tuple(in_features)
        self.align_corners = align_corners
        self.output_stride = strides[0]

        conv = dict(norm=norm, act=act)
        self.psp_modules = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(int(scale)), ConvModule(in_channels[-1], channels, 1, **conv))
            for scale in pool_scales
        )
        self.bottleneck = ConvModule(
            in_channels[-1] + len(pool_scales) * channels, channels, 3, padding=1, **conv
        )
        self.lateral_convs = nn.ModuleList(ConvModule(c, channels, 1, **conv) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(
            ConvModule(channels, channels, 3, padding=1, **conv) for _ in in_channels[:-1]
        )
        self.fpn_bottleneck = ConvModule(len(in_channels) * channels, channels, 3, padding=1, **conv)

    def _resize(self, x: torch.Tensor, size) -> torch.Tensor:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=self.align_corners)

    def psp_forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = [self._resize(module(x), x.shape[2:]) for module in self.psp_modules]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        inputs = select_features(features, self.in_features, "UPerHead")
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs[:-1])]
        laterals.append(self.psp_forward(inputs[-1]))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + self._resize(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(lateral) for conv, lateral in zip(self.fpn_convs, laterals[:-1])]
        outs.append(laterals[-1])
        size = outs[0].shape[2:]
        fused = torch.cat([outs[0], *(self._resize(out, size) for out in outs[1:])], dim=1)
        return self.cls_seg(self.fpn_bottleneck(fused))

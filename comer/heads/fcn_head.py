"""FCN head (mmseg ``FCNHead``): a few convs on one level, then the classifier. Used as the
auxiliary head on the 1/16 map."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from comer.heads.base import DecodeHead, select_features, select_shapes
from comer.heads.conv_module import ActFactory, ConvModule, NormFactory


class FCNHead(DecodeHead):
    """``convs`` (num_convs ConvModules), optional ``conv_cat`` over [input, convs(input)], classifier.

    Logits at the stride of ``in_feature``.
    """

    def __init__(
        self,
        input_shape: Mapping,
        num_classes: int,
        in_feature: str = "res4",
        channels: int = 256,
        num_convs: int = 1,
        kernel_size: int = 3,
        dilation: int = 1,
        concat_input: bool = False,
        dropout: float = 0.1,
        norm: NormFactory | None = nn.BatchNorm2d,
        act: ActFactory | None = nn.ReLU,
    ) -> None:
        super().__init__(channels, num_classes, dropout)
        (shape,) = select_shapes(input_shape, [in_feature], "FCNHead")
        in_channels = shape.channels
        if num_convs < 0:
            raise ValueError(f"FCNHead num_convs must be >= 0, got {num_convs}")
        if num_convs == 0 and in_channels != channels:
            raise ValueError(
                f"FCNHead with num_convs=0 needs channels == input channels ({in_channels}), got {channels}"
            )
        if kernel_size % 2 != 1:
            raise ValueError(f"FCNHead kernel_size must be odd, got {kernel_size}")
        self.in_feature = in_feature
        self.output_stride = shape.stride
        conv = dict(padding=(kernel_size // 2) * dilation, dilation=dilation, norm=norm, act=act)
        if num_convs == 0:
            self.convs = nn.Identity()
        else:
            self.convs = nn.Sequential(
                ConvModule(in_channels, channels, kernel_size, **conv),
                *(ConvModule(channels, channels, kernel_size, **conv) for _ in range(num_convs - 1)),
            )
        self.conv_cat = (
            ConvModule(in_channels + channels, channels, kernel_size, padding=kernel_size // 2, norm=norm, act=act)
            if concat_input
            else None
        )

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        (x,) = select_features(features, [self.in_feature], "FCNHead")
        out = self.convs(x)
        if self.conv_cat is not None:
            out = self.conv_cat(torch.cat([x, out], dim=1))
        return self.cls_seg(out)

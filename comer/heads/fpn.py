"""Feature Pyramid Network (Lin et al. 2017) as mmdet 2.x's ``FPN`` with ``add_extra_convs=False``
(the neck of the standard R50-FPN Mask R-CNN), named key for key like it:
``lateral_convs.{i}.conv.{weight,bias}`` and ``fpn_convs.{i}.conv.{weight,bias}``."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from comer.backbones.shape_spec import ShapeSpec
from comer.heads.base import select_features, select_shapes
from comer.heads.conv_module import ConvModule


def level_name(stride: int) -> str:
    """``p{log2(stride)}``: stride 4 is ``p2``, 64 is ``p6``."""
    return f"p{int(round(math.log2(stride)))}"


class FPN(nn.Module):
    """1x1 laterals, a nearest-neighbour top-down path, 3x3 output convs (no norm, no activation,
    with bias), then ``num_outs - len(in_features)`` extra levels, each a stride-2 max-pool with
    kernel 1 of the previous output (P6 from P5's output)."""

    def __init__(
        self,
        input_shape: Mapping[str, ShapeSpec],
        in_features: Sequence[str] = ("res2", "res3", "res4", "res5"),
        out_channels: int = 256,
        num_outs: int = 5,
    ) -> None:
        super().__init__()
        if not in_features:
            raise ValueError("FPN: in_features is empty")
        if out_channels < 1:
            raise ValueError(f"FPN: out_channels must be >= 1, got {out_channels}")
        if num_outs < len(in_features):
            raise ValueError(f"FPN: num_outs ({num_outs}) must be >= len(in_features) ({len(in_features)})")
        shapes = select_shapes(input_shape, in_features, "FPN")
        strides = [shape.stride for shape in shapes]
        if any(later <= earlier for earlier, later in zip(strides, strides[1:])):
            raise ValueError(f"FPN: in_features must go from fine to coarse; got strides {strides}")
        if any(s & (s - 1) for s in strides):
            raise ValueError(f"FPN: strides must be powers of two (levels are named p<log2 stride>); got {strides}")
        self.in_features = tuple(in_features)
        self.out_channels = out_channels
        self.num_outs = num_outs
        out_strides = strides + [strides[-1] * 2 ** (k + 1) for k in range(num_outs - len(strides))]
        self._output_shape = {level_name(s): ShapeSpec(channels=out_channels, stride=s) for s in out_strides}

        plain = dict(norm=None, act=None)
        self.lateral_convs = nn.ModuleList(ConvModule(shape.channels, out_channels, 1, **plain) for shape in shapes)
        self.fpn_convs = nn.ModuleList(
            ConvModule(out_channels, out_channels, 3, padding=1, **plain) for _ in shapes
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """mmdet's FPN ``init_cfg``: Xavier-uniform (gain 1) conv weights, zero biases."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight, gain=1.0)
                nn.init.zeros_(module.bias)

    def output_shape(self) -> dict[str, ShapeSpec]:
        return dict(self._output_shape)

    def forward(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        inputs = select_features(features, self.in_features, "FPN")
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs)]
        for i in range(len(laterals) - 1, 0, -1):
            finer = laterals[i - 1]
            laterals[i - 1] = finer + F.interpolate(laterals[i], size=finer.shape[2:], mode="nearest")
        outs = [conv(lateral) for conv, lateral in zip(self.fpn_convs, laterals)]
        while len(outs) < self.num_outs:
            outs.append(F.max_pool2d(outs[-1], kernel_size=1, stride=2))
        return dict(zip(self._output_shape, outs))

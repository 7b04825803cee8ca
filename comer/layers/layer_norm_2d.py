"""LayerNorm over the channels of [B, C, H, W] maps (ConvNeXt's / Conv2Former's "channels_first" LayerNorm)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm2d(nn.LayerNorm):
    """``nn.LayerNorm(channels)`` applied at every pixel of a [B, C, H, W] map (parameters ``weight``, ``bias``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return normed.permute(0, 3, 1, 2)

"""A Conv2Former block: convolutional modulation and feed-forward, each a layer-scaled residual."""
from __future__ import annotations

import torch
from torch import nn

from .conv2former_mlp import Conv2FormerMlp
from .conv_modulation import ConvModulation
from .drop_path import DropPath


class Conv2FormerBlock(nn.Module):
    """x + drop_path(layer_scale_1 * attn(x)), then x + drop_path(layer_scale_2 * mlp(x)), on [B, C, H, W].

    ``layer_scale_1/2`` are per-channel parameters (the official names); ``attn`` and ``mlp`` come built.
    """

    def __init__(self, dim: int, attn: ConvModulation, mlp: Conv2FormerMlp, layer_scale_init: float, drop_path: float):
        super().__init__()
        self.attn = attn
        self.mlp = mlp
        self.layer_scale_1 = nn.Parameter(torch.full((dim,), float(layer_scale_init)))
        self.layer_scale_2 = nn.Parameter(torch.full((dim,), float(layer_scale_init)))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.layer_scale_1[:, None, None] * self.attn(x))
        return x + self.drop_path(self.layer_scale_2[:, None, None] * self.mlp(x))

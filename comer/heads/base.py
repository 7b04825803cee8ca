"""What every mmseg-style decode head shares: picking its inputs from the backbone's
``output_shape()`` and the dropout + 1x1 ``conv_seg`` classifier at its end."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

# mmseg initialises the classifier with N(0, 0.01) and a zero bias.
CONV_SEG_INIT_STD = 0.01


def select_shapes(input_shape: Mapping, names: Sequence[str], owner: str) -> list:
    """The ShapeSpecs of ``names`` from ``input_shape``, in order, with a clear error when one is
    missing."""
    missing = [name for name in names if name not in input_shape]
    if missing:
        raise KeyError(
            f"{owner}: feature(s) {missing} not in the backbone's output_shape(); "
            f"available: {sorted(input_shape)}"
        )
    return [input_shape[name] for name in names]


def select_features(features: Mapping[str, torch.Tensor], names: Sequence[str], owner: str) -> list:
    missing = [name for name in names if name not in features]
    if missing:
        raise KeyError(f"{owner}: feature(s) {missing} missing from the input; got {sorted(features)}")
    return [features[name] for name in names]


class DecodeHead(nn.Module):
    """Base of the heads: ``dropout`` (Dropout2d, as mmseg) then ``conv_seg`` (1x1 conv to classes)."""

    def __init__(self, channels: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.num_classes = num_classes
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        nn.init.normal_(self.conv_seg.weight, mean=0.0, std=CONV_SEG_INIT_STD)
        nn.init.zeros_(self.conv_seg.bias)

    def cls_seg(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.dropout(x))

"""Conv + norm + activation, named like mmcv's ConvModule (``.conv``, ``.bn``) so mmseg head
checkpoints map onto ours key for key."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

NormFactory = Callable[[int], nn.Module]
ActFactory = Callable[[], nn.Module]


class ConvModule(nn.Module):
    """``conv -> bn -> act``.

    The convolution has no bias when a norm follows it (mmcv's ``bias="auto"``). ``norm`` and
    ``act`` are constructors (``norm(num_channels)``, ``act()``); ``None`` leaves the step out.
    Initialisation follows mmcv: Kaiming-normal (fan_out, ReLU gain) conv weights, zero bias,
    norm weight 1 and bias 0.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        padding: int = 0,
        dilation: int = 1,
        norm: NormFactory | None = nn.BatchNorm2d,
        act: ActFactory | None = nn.ReLU,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            padding=padding,
            dilation=dilation,
            bias=norm is None,
        )
        self.bn = norm(out_channels) if norm is not None else None
        self.activate = act() if act is not None else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        if self.conv.bias is not None:
            nn.init.zeros_(self.conv.bias)
        if self.bn is not None and getattr(self.bn, "weight", None) is not None:
            nn.init.ones_(self.bn.weight)
            nn.init.zeros_(self.bn.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        if self.activate is not None:
            x = self.activate(x)
        return x

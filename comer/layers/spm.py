"""SPM (spatial pyramid module): a small CNN giving maps at strides 4, 8, 16, 32, each projected to dim."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def _conv_norm_act(in_ch: int, out_ch: int, stride: int, norm_layer: Callable[[int], nn.Module]) -> list[nn.Module]:
    return [nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False), norm_layer(out_ch),
            nn.ReLU(inplace=True)]


class SPM(nn.Module):
    """stem (3 convs, the first stride 2, then max-pool) -> c1 at 1/4 with `inplanes` channels;
    conv2/conv3/conv4 (stride 2 each) -> 2x, 4x, 4x inplanes at 1/8, 1/16, 1/32; fc1..fc4 1x1 to dim."""

    def __init__(self, dim: int, inplanes: int = 64, in_chans: int = 3,
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d):
        super().__init__()
        self.stem = nn.Sequential(
            *_conv_norm_act(in_chans, inplanes, 2, norm_layer),
            *_conv_norm_act(inplanes, inplanes, 1, norm_layer),
            *_conv_norm_act(inplanes, inplanes, 1, norm_layer),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        widths = (inplanes, 2 * inplanes, 4 * inplanes, 4 * inplanes)
        self.conv2 = nn.Sequential(*_conv_norm_act(widths[0], widths[1], 2, norm_layer))
        self.conv3 = nn.Sequential(*_conv_norm_act(widths[1], widths[2], 2, norm_layer))
        self.conv4 = nn.Sequential(*_conv_norm_act(widths[2], widths[3], 2, norm_layer))
        self.fc1, self.fc2, self.fc3, self.fc4 = (nn.Conv2d(w, dim, kernel_size=1) for w in widths)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """[B, 3, H, W] -> [c1, c2, c3, c4], each [B, dim, H/s, W/s] for s = 4, 8, 16, 32."""
        c1 = self.stem(images)
        c2 = self.conv2(c1)
        c3 = self.conv3(c2)
        c4 = self.conv4(c3)
        return [self.fc1(c1), self.fc2(c2), self.fc3(c3), self.fc4(c4)]

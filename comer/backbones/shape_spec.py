"""What a backbone returns per output level."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ShapeSpec:
    channels: int
    stride: int

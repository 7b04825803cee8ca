"""Constructor argument checks the backbones share: counts and widths that must be at least one, so a
nonsensical size fails at construction with the key's name instead of building an empty network."""
from __future__ import annotations


def check_counts(owner: str, **counts: int) -> None:
    """Every count (depth, heads, sampling points, channels) must be a whole number >= 1."""
    bad = [f"{name} must be >= 1, got {value}" for name, value in counts.items() if value < 1]
    if bad:
        raise ValueError(f"{owner}: {'; '.join(bad)}")


def check_width_ratios(owner: str, embed_dim: int, **ratios: float) -> None:
    """Every ratio gives a hidden width ``int(embed_dim * ratio)``, which must be >= 1."""
    bad = [f"{name} {ratio} gives int(embed_dim * {name}) = int({embed_dim} * {ratio}) = "
           f"{int(embed_dim * ratio)} channels, must be >= 1"
           for name, ratio in ratios.items() if int(embed_dim * ratio) < 1]
    if bad:
        raise ValueError(f"{owner}: {'; '.join(bad)}")

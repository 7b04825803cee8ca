"""An infinite, seeded, rank-aware shuffled sample stream for iteration-based training."""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class InfiniteShuffleSampler(Sampler):
    """Yields ``(index, position)`` forever.

    The global stream is the concatenation of permutations of ``range(dataset_size)``, the
    permutation of pass ``e`` drawn from ``torch.Generator().manual_seed(seed + e)``. Rank ``r`` of
    ``world_size`` takes global positions ``start + r, start + r + world_size, ...``, so ranks are
    disjoint within a pass and together consume the stream in order. ``start`` is the number of
    samples already consumed by all ranks together: a run resumed with ``start = k`` yields exactly
    what an uninterrupted run yields after its first ``k`` global samples. ``position`` is the
    global stream position (used to seed the sample's augmentation).
    """

    def __init__(self, dataset_size: int, seed: int, rank: int = 0, world_size: int = 1, start: int = 0):
        if dataset_size < 1:
            raise ValueError(f"dataset_size must be >= 1, got {dataset_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if start < 0:
            raise ValueError(f"start (samples consumed) must be >= 0, got {start}")
        self.dataset_size = dataset_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start = start

    def permutation(self, pass_index: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed + pass_index)
        return torch.randperm(self.dataset_size, generator=generator)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        position = self.start + self.rank
        pass_index = position // self.dataset_size
        order = self.permutation(pass_index)
        while True:
            current = position // self.dataset_size
            if current != pass_index:
                pass_index, order = current, self.permutation(current)
            yield int(order[position % self.dataset_size]), position
            position += self.world_size


class EvaluationShardSampler(Sampler):
    """Rank ``r`` of ``world_size`` evaluates indices ``r, r + world_size, ...`` of ``range(dataset_size)``:
    every index exactly once over all ranks, no padding (``DistributedSampler`` repeats indices to even out
    the shares, which would score those images twice in a dataset-level metric). Shares differ by at most
    one sample; the metrics reduce their sums across ranks after the loop, so uneven shares are fine."""

    def __init__(self, dataset_size: int, rank: int = 0, world_size: int = 1):
        if dataset_size < 0:
            raise ValueError(f"dataset_size must be >= 0, got {dataset_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.dataset_size = dataset_size
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.dataset_size, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.dataset_size, self.world_size))

"""Seeds derived from (base seed, stream coordinates), for reproducible data loading."""

from __future__ import annotations

import random

import numpy as np
import torch


def derive_seed(*entropy: int) -> int:
    """A well-mixed 32-bit seed from integer coordinates (order matters)."""
    return int(np.random.SeedSequence([int(e) for e in entropy]).generate_state(1)[0])


def sample_seed(seed: int, position: int) -> int:
    """Augmentation seed of the sample at global stream ``position``."""
    return derive_seed(seed, position)


def seed_pipeline(pipeline, seed: int) -> None:
    """Seed an albumentations Compose and give each of its transforms an independent stream.

    (``Compose.set_random_seed`` hands the same seed to every transform, which would correlate
    e.g. the flip decision with the first photometric draw.)
    """
    pipeline.set_random_seed(seed)
    for i, transform in enumerate(pipeline.transforms):
        transform.set_random_seed(derive_seed(seed, i))


def seed_worker(worker_id: int, *, seed: int, rank: int, start: int) -> None:
    """DataLoader ``worker_init_fn``: seed python/numpy/torch from (seed, rank, worker, start).

    Use through ``functools.partial`` so it pickles for spawned workers.
    """
    worker_seed = derive_seed(seed, rank, worker_id, start)
    random.seed(worker_seed)
    np.random.seed(worker_seed)
    torch.manual_seed(worker_seed)

"""Random-number-generator states saved with a checkpoint, so a resumed run draws the same drop-path
and dropout masks as an uninterrupted one (data augmentation is seeded per sample by the data side)."""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

RNG_STATE_KEY = "rng_states"


def _numpy_state() -> tuple:
    # Tensors and plain Python values only: Lightning loads checkpoints with weights_only=True.
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian


def _set_numpy_state(state: tuple) -> None:
    name, keys, position, has_gauss, cached_gaussian = state
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))


def capture_rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": _numpy_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    _set_numpy_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])

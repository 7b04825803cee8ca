"""Which implementation `roi_align` runs: the Triton kernels or the PyTorch reference.

Order of precedence: `set_roi_align_impl(name)` (e.g. from a Hydra config), then the environment variable
COMER_ROI_ALIGN_IMPL, then "auto" (Triton on CUDA tensors, the reference elsewhere); see impl_switch.py.
"""
from __future__ import annotations

import torch

from ..impl_switch import IMPLS, ImplSwitch

ENV_VAR = "COMER_ROI_ALIGN_IMPL"

_switch = ImplSwitch("roi_align", ENV_VAR)


def set_roi_align_impl(name: str | None) -> None:
    """Force "auto", "triton" or "reference" for this process; None returns control to the env var."""
    _switch.set(name, "set_roi_align_impl")


def get_roi_align_impl() -> str:
    """The configured choice ("auto", "triton" or "reference"), before resolving "auto"."""
    return _switch.get()


def resolve_impl(input: torch.Tensor) -> str:
    """The implementation that runs for this input: "triton" or "reference"."""
    return _switch.resolve(input)


__all__ = ["ENV_VAR", "IMPLS", "get_roi_align_impl", "resolve_impl", "set_roi_align_impl"]

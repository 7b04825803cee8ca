"""Which implementation `ms_deform_attn` runs: the Triton kernels or the PyTorch reference.

Order of precedence: `set_ms_deform_attn_impl(name)` (e.g. from a Hydra config), then the environment
variable COMER_MS_DEFORM_ATTN_IMPL, then "auto". "auto" runs Triton on CUDA tensors (when Triton is
importable) and the reference everywhere else. The switch itself is the shared `ImplSwitch`.
"""
from __future__ import annotations

import torch

from ..impl_switch import IMPLS, ImplSwitch, triton_available

ENV_VAR = "COMER_MS_DEFORM_ATTN_IMPL"

_switch = ImplSwitch("ms_deform_attn", ENV_VAR)


def set_ms_deform_attn_impl(name: str | None) -> None:
    """Force "auto", "triton" or "reference" for this process; None returns control to the env var."""
    _switch.set(name, "set_ms_deform_attn_impl")


def get_ms_deform_attn_impl() -> str:
    """The configured choice ("auto", "triton" or "reference"), before resolving "auto"."""
    return _switch.get()


def resolve_impl(value: torch.Tensor) -> str:
    """The implementation that runs for these inputs: "triton" or "reference"."""
    return _switch.resolve(value)


__all__ = ["ENV_VAR", "IMPLS", "get_ms_deform_attn_impl", "resolve_impl", "set_ms_deform_attn_impl",
           "triton_available"]

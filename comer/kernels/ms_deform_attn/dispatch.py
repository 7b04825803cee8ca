"""Which implementation `ms_deform_attn` runs: the Triton kernels or the PyTorch reference.

Order of precedence: `set_ms_deform_attn_impl(name)` (e.g. from a Hydra config), then the environment
variable COMER_MS_DEFORM_ATTN_IMPL, then "auto". "auto" runs Triton on CUDA tensors (when Triton is
importable) and the reference everywhere else.
"""
from __future__ import annotations

import importlib.util
import os

import torch

ENV_VAR = "COMER_MS_DEFORM_ATTN_IMPL"
IMPLS = ("auto", "triton", "reference")

_forced_impl: str | None = None


def _check_name(name: str, source: str) -> str:
    if name not in IMPLS:
        raise ValueError(f"ms_deform_attn: implementation {name!r} from {source} is not one of {IMPLS}")
    return name


def set_ms_deform_attn_impl(name: str | None) -> None:
    """Force "auto", "triton" or "reference" for this process; None returns control to the env var."""
    global _forced_impl
    _forced_impl = None if name is None else _check_name(name, "set_ms_deform_attn_impl")


def get_ms_deform_attn_impl() -> str:
    """The configured choice ("auto", "triton" or "reference"), before resolving "auto"."""
    if _forced_impl is not None:
        return _forced_impl
    return _check_name(os.environ.get(ENV_VAR, "auto"), f"environment variable {ENV_VAR}")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_impl(value: torch.Tensor) -> str:
    """The implementation that runs for these inputs: "triton" or "reference"."""
    impl = get_ms_deform_attn_impl()
    if impl == "auto":
        return "triton" if value.is_cuda and triton_available() else "reference"
    return impl

"""Which implementation an op with a Triton path runs: its Triton kernels or its PyTorch reference.

Each such op owns one `ImplSwitch`. Order of precedence: the op's setter (e.g. from a Hydra config), then
the op's environment variable, then "auto". "auto" runs Triton on CUDA tensors (when Triton is importable)
and the reference everywhere else.
"""
from __future__ import annotations

import importlib.util
import os

import torch

IMPLS = ("auto", "triton", "reference")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


class ImplSwitch:
    """The process-wide choice of implementation for one op (`op_name`), read from `env_var` unless set."""

    def __init__(self, op_name: str, env_var: str) -> None:
        self.op_name = op_name
        self.env_var = env_var
        self._forced: str | None = None

    def _check_name(self, name: str, source: str) -> str:
        if name not in IMPLS:
            raise ValueError(f"{self.op_name}: implementation {name!r} from {source} is not one of {IMPLS}")
        return name

    def set(self, name: str | None, source: str) -> None:
        """Force "auto", "triton" or "reference"; None returns control to the environment variable.
        `source` names the caller in error messages."""
        self._forced = None if name is None else self._check_name(name, source)

    def get(self) -> str:
        """The configured choice ("auto", "triton" or "reference"), before resolving "auto"."""
        if self._forced is not None:
            return self._forced
        return self._check_name(os.environ.get(self.env_var, "auto"), f"environment variable {self.env_var}")

    def resolve(self, tensor: torch.Tensor) -> str:
        """The implementation that runs for inputs living where `tensor` lives: "triton" or "reference"."""
        impl = self.get()
        if impl == "auto":
            return "triton" if tensor.is_cuda and triton_available() else "reference"
        return impl

"""Compile a kernel launch for a GPU target on a machine without one, and read its register use.

Triton's wheel ships ptxas, so a launch described by `KernelLaunch` can be compiled for, say, sm_90 on any
Linux machine, with the same argument specialisation (dtypes, 16-byte alignment, strides equal to 1) that
a real launch gets. ptxas's report then shows what the launch parameters cost before any GPU is at hand:
registers per thread (occupancy) and bytes spilled to local memory. It does not say how fast a kernel
runs: that is benchmarks/.

The kernels must have been decorated as compiled kernels, so the Triton interpreter must be off
(TRITON_INTERPRET unset) in this process. The binding of arguments goes through Triton's own launch-time
helpers (`triton.runtime.jit`), which are not public API; they are checked on Triton 3.9.
"""
from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from .triton_kernels import KernelLaunch

WARP_SIZE = 32


@dataclass(frozen=True)
class ResourceUsage:
    registers: int  # per thread
    stack_bytes: int  # stack frame per thread
    spill_store_bytes: int  # > 0: values did not fit in registers and went to local memory
    spill_load_bytes: int

    @property
    def spills(self) -> bool:
        return self.spill_store_bytes > 0 or self.spill_load_bytes > 0


def compile_launch(launch: KernelLaunch, arch: int = 90) -> triton.compiler.CompiledKernel:
    """Compile the launch's kernel for sm_<arch>, specialised on the launch's arguments as at run time."""
    kernel = launch.kernel
    if not isinstance(kernel, JITFunction):
        raise RuntimeError("static_compile needs compiled kernels: unset TRITON_INTERPRET before importing comer")
    target = GPUTarget("cuda", arch, WARP_SIZE)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*launch.args, **launch.options)
    options, signature, constexprs, attrs = kernel._pack_args(backend, launch.options, bound_args, specialization,
                                                              options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


def resource_usage(compiled: triton.compiler.CompiledKernel) -> ResourceUsage:
    """Registers, stack frame and spills of the compiled kernel: its PTX assembled again by ptxas -v with the
    flags Triton uses (the report Triton itself discards)."""
    metadata = compiled.metadata
    flags = ["-v", "-lineinfo", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(metadata.target.arch)}"]
    if not metadata.enable_fp_fusion:
        flags.append("--fmad=false")
    with tempfile.TemporaryDirectory() as folder:
        ptx = Path(folder) / "kernel.ptx"
        ptx.write_text(compiled.asm["ptx"])
        command = [get_ptxas(metadata.target.arch).path, *flags, str(ptx), "-o", str(ptx.with_suffix(".o"))]
        report = subprocess.run(command, capture_output=True, text=True, check=True).stderr
    registers = re.search(r"Used (\d+) registers", report)
    memory = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", report)
    if registers is None or memory is None:
        raise RuntimeError(f"unexpected ptxas report:\n{report}")
    return ResourceUsage(int(registers.group(1)), *(int(g) for g in memory.groups()))

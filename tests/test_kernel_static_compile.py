"""The Triton kernels compile for Hopper (sm_90) and Ampere (sm_80) on this GPU-less machine, with the tuned
launch configs, for every value dtype, without register spills (benchmarks/kernel_resources.py)."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # about 20 compiles per architecture


def run_without_interpreter(*args: str) -> subprocess.CompletedProcess:
    """A Python subprocess in which Triton compiles real kernels instead of interpreting them."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


@pytest.mark.parametrize("arch", [90, 80])
def test_tuned_configs_compile_without_spills(arch):
    result = run_without_interpreter(str(ROOT / "benchmarks" / "kernel_resources.py"), "--arch", str(arch),
                                     "--fail-on-spill")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line.strip("|").split("|") for line in result.stdout.splitlines() if line.startswith("| ")][1:]
    assert len(rows) == 18  # forward and backward x 3 head dims x 3 value dtypes
    for row in rows:
        registers, spills, resident_warps = int(row[6]), row[8].strip(), int(row[9])
        assert 0 < registers <= 255 and spills == "0/0" and resident_warps >= 8, row


VECTOR_ACCESS_PROBE = """
import collections, re, sys, torch
sys.path.insert(0, "benchmarks")
import kernel_resources
from comer.kernels.ms_deform_attn.static_compile import compile_launch
for head_dim in (32, 64):
    for kernel, launch in kernel_resources.launches(head_dim, torch.bfloat16):
        ptx = compile_launch(launch, arch=90).asm["ptx"]
        counts = collections.Counter(re.findall(r"\\b((?:ld|red)\\.global[\\w.]*)", ptx))
        print(head_dim, kernel, dict(counts))
"""


def test_value_gathers_and_gradient_scatters_are_vectorised():
    """Each corner's D channels are one 16-byte load per thread (ld.global.v4) in both kernels, and the
    backward adds into grad_value with 4-wide vector atomics (red.global.add.v4.f32): what the channel-
    contiguous layout and the launcher's argument specialisation are for."""
    result = run_without_interpreter("-c", VECTOR_ACCESS_PROBE)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 4
    for line in lines:
        head_dim, kernel, text = line.split(" ", 2)
        counts = ast.literal_eval(text)
        tiles = 4 if kernel == "forward" else 5  # the four corners (+ the grad_output tile)
        assert counts.get("ld.global.v4.b32") == tiles, line
        if kernel == "backward":
            assert counts.get("red.global.gpu.relaxed.add.v4.f32", 0) >= 4, line

"""The Triton kernels compile for Hopper (sm_90) and Ampere (sm_80) on this GPU-less machine, with the tuned
launch configs, for every value dtype, without register spills (benchmarks/kernel_resources.py)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # about 20 compiles per architecture


@pytest.mark.parametrize("arch", [90, 80])
def test_tuned_configs_compile_without_spills(arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real compiles, not the interpreter
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_resources.py"), "--arch", str(arch),
                             "--fail-on-spill"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line.strip("|").split("|") for line in result.stdout.splitlines() if line.startswith("| ")][1:]
    assert len(rows) == 18  # forward and backward x 3 head dims x 3 value dtypes
    for row in rows:
        registers, spills, resident_warps = int(row[6]), row[8].strip(), int(row[9])
        assert 0 < registers <= 255 and spills == "0/0" and resident_warps >= 8, row

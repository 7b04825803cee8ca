"""The benchmark scripts run end to end (their --cpu-smoke mode, tiny inputs) and print complete tables, so
a GPU session spends its minutes measuring, not debugging the scripts."""
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str, *args: str) -> list[list[str]]:
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), "--cpu-smoke", *args],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "NOT a benchmark" in result.stdout
    rows = [line.strip("|").split("|") for line in result.stdout.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row] for row in rows[1:]]  # without the header row


def test_kernel_benchmark_smoke():
    rows = run_script("ms_deform_attn.py")
    assert [(row[0], row[4]) for row in rows] == [
        ("smoke 3-level", "triton"), ("smoke 3-level", "reference"),
        ("smoke 1-level", "triton"), ("smoke 1-level", "reference")]
    for row in rows:
        forward_ms, forward_backward_ms = float(row[5]), float(row[6])
        assert 0 < forward_ms and 0 < forward_backward_ms and math.isfinite(forward_backward_ms)


@pytest.mark.parametrize("with_heads", [False, True])
def test_backbone_benchmark_smoke(with_heads):
    rows = run_script("backbone_attention_paths.py", *(["--with-heads"] if with_heads else []))
    assert [row[0] for row in rows] == ["reference"]
    step_ms, images_per_s = float(rows[0][1]), float(rows[0][2])
    assert step_ms > 0 and images_per_s == pytest.approx(2 / (step_ms / 1e3), abs=0.051)  # printed to 0.1


def test_tuning_sweep_smoke():
    rows = run_script("tune_ms_deform_attn.py")
    kernels_and_shapes = {(row[0], row[1]) for row in rows if row[0] in ("forward", "backward")}
    assert kernels_and_shapes == {(k, f"smoke 2x{d}") for k in ("forward", "backward") for d in (32, 64, 128)}
    assert all(float(row[5]) > 0 for row in rows if row[0] in ("forward", "backward"))


def test_tuning_sweep_rejects_a_wrong_configuration(monkeypatch):
    """A launch config whose results differ from the tuned table's is reported, never chosen."""
    import torch

    from comer.kernels.ms_deform_attn import triton_kernels

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import tune_ms_deform_attn as tune

    real_forward = triton_kernels.ms_deform_attn_forward

    def forward_broken_for_block_16(*args, config=None):
        out = real_forward(*args, config=config)
        return out + 1 if config is not None and config.block_q == 16 else out

    monkeypatch.setattr(triton_kernels, "ms_deform_attn_forward", forward_broken_for_block_16)
    results = tune.sweep("forward", 32, tune.smoke_shape(32), torch.float32, torch.device("cpu"), smoke=True)
    assert [(config.block_q, ms is None) for config, ms in results] == [(16, True), (32, False)]

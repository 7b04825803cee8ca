"""benchmarks/mask_rcnn.py runs end to end (--cpu-smoke: a tiny model, 64x64 images) and prints the per-component
table, so a GPU session spends its minutes measuring."""
import math

import pytest

from test_benchmarks import run_script

COMPONENTS = ["backbone", "FPN", "RPN", "RoI heads", "losses"]


def test_mask_rcnn_benchmark_smoke():
    rows = {row[0]: row[1:] for row in run_script("mask_rcnn.py")}
    assert list(rows) == COMPONENTS + ["sum of components", "whole step"]
    forward = [float(rows[name][0]) for name in COMPONENTS]
    backward = [float(rows[name][1]) for name in COMPONENTS]
    for name, f, b in zip(COMPONENTS, forward, backward):
        assert f > 0 and b >= 0 and math.isfinite(f + b), name
        assert float(rows[name][2]) == pytest.approx(f + b, abs=0.11)  # printed to 0.1
        assert rows[name][3] == "n/a"  # no CUDA memory statistics on the CPU
    assert float(rows["sum of components"][0]) == pytest.approx(sum(forward), abs=0.3)
    assert float(rows["sum of components"][1]) == pytest.approx(sum(backward), abs=0.3)
    assert float(rows["whole step"][2]) > 0

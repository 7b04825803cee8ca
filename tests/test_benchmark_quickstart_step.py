"""benchmarks/quickstart_step.py runs end to end in its smoke mode (a 4-block network on tiny synthetic data) and
prints both step times, the per-pair ratio and the normalisation's own cost."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_step_benchmark_smoke(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quickstart_step.py"), "--smoke",
                             "--root", str(tmp_path)],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "NOT a benchmark" in out and "batch (2, 3, 64, 64) torch.uint8" in out
    times = [float(t) for t in re.findall(r"\| (?:now|before): .* \| ([0-9.]+) \|", out)]
    assert len(times) == 2 and all(t > 0 for t in times)
    median, low, high = (float(x) for x in re.search(r"median ([0-9.]+), quartiles ([0-9.]+)-([0-9.]+)", out).groups())
    assert low <= median <= high and median > 0
    assert float(re.search(r"the normalisation alone: ([0-9.]+) ms per batch", out).group(1)) > 0

"""benchmarks/data_pipeline.py runs end to end in its smoke mode (4 tiny generated samples) and prints both
tables with every stage of the current pipeline."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_data_pipeline_benchmark_smoke():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "data_pipeline.py"), "--smoke"],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "NOT a benchmark" in out
    headers = [line for line in out.splitlines() if line.startswith("### ")]
    assert [h.split()[1] for h in headers] == ["train", "test"]
    assert all(float(h.split(": ")[1].split()[0]) > 0 for h in headers)
    train, test = out.split("### test path")
    stages = lambda text: [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ")][1:]
    assert stages(train) == ["decode image", "decode label", "label checks", "RatioRangeResize", "CatMaxRatioCrop",
                             "HorizontalFlip", "PhotoMetricDistortion", "to tensor", "collate",
                             "end to end (DataLoader, one process)"]
    assert stages(test) == ["decode image", "decode label", "label checks", "RatioRangeResize", "ResizeToMultiple",
                            "to tensor", "collate", "end to end (DataLoader, one process)"]
    assert out.count("normalisation on the device") == 2

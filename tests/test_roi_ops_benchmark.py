"""benchmarks/roi_ops.py runs end to end in its --cpu-smoke mode and prints both tables complete, so a GPU
session spends its minutes measuring, not debugging the script."""
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def markdown_tables(stdout: str) -> list[list[list[str]]]:
    """Each Markdown table of the output as rows of cells, without its header and separator rows."""
    tables, rows = [], None
    for line in stdout.splitlines() + [""]:
        if line.startswith("|"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            rows = [] if rows is None else rows + [cells]  # the first row is the header
        elif rows is not None:
            tables.append([row for row in rows if not set(row[0]) <= set("-")])
            rows = None
    return tables


def test_roi_ops_benchmark_smoke():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "roi_ops.py"), "--cpu-smoke"],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("NOT a benchmark") == 2
    nms_rows, roi_rows = markdown_tables(result.stdout)

    assert [(row[0], row[1]) for row in nms_rows] == [
        (f"smoke {n} boxes", op) for n in (50, 200) for op in ("nms", "batched_nms 80 classes")]
    for boxes, op, ms, _, kept in nms_rows:
        num_boxes = int(boxes.split()[1])
        assert float(ms) > 0
        assert 0 < int(kept) <= num_boxes
    kept = {(row[0], row[1]): int(row[4]) for row in nms_rows}
    assert kept[("smoke 200 boxes", "nms")] < 200  # the crowded smoke boxes do get suppressed

    assert [(row[0], row[2]) for row in roi_rows] == [
        (f"smoke {s}x{s}", impl) for s in (2, 3) for impl in ("triton", "reference")]
    for _, _, impl, fwd, fwd_bwd, _, _, diff in roi_rows:
        assert float(fwd) > 0 and math.isfinite(float(fwd_bwd)) and float(fwd_bwd) > 0
        if impl == "triton":
            assert float(diff) < 1e-5  # fp32 smoke inputs: the kernels agree with the reference
        else:
            assert diff == "-"

"""The run summary every entry point leaves behind: <run dir>/metrics.json."""
from __future__ import annotations

import json
import math
from pathlib import Path

METRICS_FILE = "metrics.json"


def stage_metrics(callback_metrics: dict, stage: str) -> dict[str, float | None]:
    """The logged metrics of one stage ("val", "test") as floats; non-finite values become None (JSON null)."""
    prefix = f"{stage}/"
    out = {}
    for name, value in callback_metrics.items():
        if name.startswith(prefix):
            value = float(value)
            out[name] = value if math.isfinite(value) else None
    return out


def write_summary(output_dir: Path, summary: dict) -> Path:
    path = Path(output_dir) / METRICS_FILE
    path.write_text(json.dumps(summary, indent=2))
    return path

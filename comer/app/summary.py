"""The run summary every entry point leaves behind: <run dir>/metrics.json.

For training it is rewritten (atomically) after every validation: the latest metrics, the best ones by the
monitored metric (with their step), and the whole history; a resumed run continues the history of the run
it resumes, so nothing measured before is lost.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import lightning.pytorch as pl

from comer.training.checkpoint_io import atomic_write_text

METRICS_FILE = "metrics.json"
MODES = ("max", "min")


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
    atomic_write_text(path, json.dumps(summary, indent=2))
    return path


def read_summary(output_dir: Path) -> dict:
    """The summary a run left (an empty one when it has none yet)."""
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise OSError(f"cannot read the run summary {path}: {error}; restore it or move it away") from error


class RunSummary(pl.Callback):
    """Keeps ``<run dir>/metrics.json`` current during training (rank zero writes)."""

    def __init__(self, output_dir: Path, monitor: str | None, mode: str, resumed_step: int | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"monitor mode must be one of {MODES}, got {mode!r}")
        self.output_dir = Path(output_dir)
        self.monitor, self.mode = monitor, mode
        previous = read_summary(self.output_dir) if resumed_step is not None else {}
        # validations after the resumed step belong to steps that are trained again: they are measured anew
        self.history = [entry for entry in previous.get("history", []) if entry["step"] <= (resumed_step or 0)]
        self.summary = {"run_dir": str(self.output_dir), "status": "running", "global_step": resumed_step or 0}

    def record_model(self, complexity: dict) -> None:
        """Parameters and FLOPs of the model (comer.flops.model_complexity), kept under ``model``."""
        self.summary["model"] = complexity

    def _best(self) -> dict | None:
        scored = [e for e in self.history if self.monitor and e["metrics"].get(self.monitor) is not None]
        if not scored:
            return None
        pick = max if self.mode == "max" else min
        return pick(scored, key=lambda e: e["metrics"][self.monitor])

    def update(self, trainer: pl.Trainer, **fields) -> dict:
        last = self.history[-1]["metrics"] if self.history else {}
        best_checkpoint = getattr(trainer.checkpoint_callback, "best_model_path", "") if trainer.checkpoint_callback else ""
        self.summary.update(global_step=trainer.global_step, metrics=last, best=self._best(), monitor=self.monitor,
                            best_checkpoint=best_checkpoint, history=self.history, **fields)
        if trainer.is_global_zero:
            write_summary(self.output_dir, self.summary)
        return self.summary

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = stage_metrics(trainer.callback_metrics, "val")
        self.history = [e for e in self.history if e["step"] != trainer.global_step]
        self.history.append({"step": trainer.global_step, "metrics": metrics})
        self.update(trainer)

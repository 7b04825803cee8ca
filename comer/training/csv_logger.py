"""A CSV logger that a resumed run continues (Lightning's deletes the existing metrics.csv)."""
from __future__ import annotations

import csv
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

STEP_COLUMN = "step"


class _ContinuingWriter(ExperimentWriter):
    """Appends to an existing metrics.csv, first dropping the rows logged after ``keep_up_to_step`` (steps
    the resumed run trains again)."""

    def __init__(self, log_dir: str, keep_up_to_step: int | None) -> None:
        self._keep_up_to_step = keep_up_to_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            fieldnames, rows = list(reader.fieldnames or []), list(reader)
        if self._keep_up_to_step is not None:
            kept = [row for row in rows if not row.get(STEP_COLUMN) or float(row[STEP_COLUMN]) <= self._keep_up_to_step]
            if len(kept) != len(rows):
                with open(path, "w", newline="") as handle:
                    writer = csv.DictWriter(handle, fieldnames=fieldnames)
                    writer.writeheader()
                    writer.writerows(kept)
        self.metrics_keys = sorted(fieldnames)


class ContinuingCSVLogger(CSVLogger):
    """``CSVLogger`` with a fixed version directory that a resumed run appends to; `resume_at(step)` says
    from which step the resumed run logs again."""

    def __init__(self, save_dir: str, name: str = "csv", version: int | str = 0, **kwargs) -> None:
        super().__init__(save_dir, name=name, version=version, **kwargs)
        self._keep_up_to_step: int | None = None

    def resume_at(self, step: int) -> None:
        self._keep_up_to_step = step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(self.log_dir, self._keep_up_to_step)
        return self._experiment

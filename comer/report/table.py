"""One table of runs: a column per swept key, the task's metrics, the model's size; Markdown and CSV."""
from __future__ import annotations

import csv
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .runs import FINISHED, Run
from .sweep import SweepDefinition, is_bookkeeping, run_label

# The metrics a task defines, in column order (segmentation, then detection); validation and test stages.
METRIC_NAMES = ("mIoU", "aAcc", "bbox_mAP", "segm_mAP")
STAGES = ("val", "test")
DEFAULT = "(default)"  # a run that does not override a key other runs sweep
MISSING = "-"


def metric_label(name: str) -> str:
    """`val/mIoU` -> `mIoU (%)` (the metrics are fractions; shown in percent)."""
    stage, _, short = name.partition("/")
    return f"{short or stage} (%)" if stage == "val" else f"{name} (%)"


def _percent(value: float | None) -> str:
    return MISSING if value is None or not math.isfinite(value) else f"{100 * value:.2f}"


def _lookup(config: dict | None, dotted: str):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


@dataclass
class Table:
    runs: list[Run]
    swept: list[str]
    fixed: dict[str, str]
    metrics: list[str]
    monitor: str | None
    columns: list[str] = field(default_factory=list)  # extra columns from the resolved configs
    order: dict[str, list[str]] = field(default_factory=dict)  # swept values in their sweep's order
    at_best: bool = False  # metric columns (and plots) from each run's best validation instead of its latest

    def value(self, run: Run, key: str) -> str:
        return run.overrides.get(key, DEFAULT)

    def label(self, run: Run) -> str:
        return run_label(run.run_name, {k: self.value(run, k) for k in self.swept})

    def metric(self, run: Run, name: str) -> float | None:
        """`name` at the run's latest validation, or at its best one (by the monitor) with `at_best`."""
        source = ((run.best or {}).get("metrics") or {}) if self.at_best else run.metrics
        value = source.get(name)
        return float(value) if value is not None else None

    def best(self, run: Run) -> tuple[float | None, int | None]:
        if not self.monitor or not run.best:
            return None, None
        return run.best.get("metrics", {}).get(self.monitor), run.best.get("step")

    def counts(self) -> str:
        """`5 runs: 3 finished, 1 failed, 1 not started`."""
        states = Counter(run.state for run in self.runs)
        parts = [f"{count} {state}" for state, count in states.most_common()]
        return f"{len(self.runs)} run{'s' if len(self.runs) != 1 else ''}: " + ", ".join(parts)

    # ------------------------------------------------------------------ output
    def header(self) -> list[str]:
        best = [f"best {metric_label(self.monitor)}", "best step"] if self.monitor else []
        return ["run", "state", "step", *self.swept, *self.columns, *map(metric_label, self.metrics), *best,
                "params (M)", "GFLOPs"]

    def rows(self) -> list[list[str]]:
        rows = []
        for run in self.runs:
            best_value, best_step = self.best(run)
            best = [_percent(best_value), MISSING if best_step is None else str(best_step)] if self.monitor else []
            extra = [MISSING if _lookup(run.config, c) is None else str(_lookup(run.config, c)) for c in self.columns]
            rows.append([
                self.label(run), run.state, MISSING if run.step is None else str(run.step),
                *(self.value(run, k) for k in self.swept), *extra,
                *(_percent(self.metric(run, m)) for m in self.metrics), *best,
                MISSING if run.params is None else f"{run.params / 1e6:.2f}",
                MISSING if run.flops is None else f"{run.flops / 1e9:.1f}",
            ])
        return rows

    def markdown(self) -> str:
        header, rows = self.header(), self.rows()
        numeric = [i >= 3 + len(self.swept) + len(self.columns) or i == 2 for i in range(len(header))]
        cells = [header, *rows]
        widths = [max(len(_escape(row[i])) for row in cells) for i in range(len(header))]

        def line(row: Sequence[str]) -> str:
            return "| " + " | ".join(_escape(c).rjust(w) if n else _escape(c).ljust(w)
                                     for c, w, n in zip(row, widths, numeric)) + " |"

        rule = "|" + "|".join("-" * (w + 1) + (":" if n else "-") for w, n in zip(widths, numeric)) + "|"
        lines = [line(header), rule, *map(line, rows)]
        notes = [f"{self.counts()}."]
        if self.at_best:
            notes.append(f"Metric columns: each run's best validation by {self.monitor}.")
        if self.fixed:
            notes.append("Shared by all runs: " + " ".join(f"`{k}={v}`" for k, v in self.fixed.items()) + ".")
        unfinished = [run for run in self.runs if run.state != FINISHED]
        for run in unfinished:
            notes.append(f"- {self.label(run)}: **{run.state}**" + (f" ({run.detail})" if run.detail else "")
                         + f" - `{run.location}`")
        return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"

    def write_csv(self, path: Path) -> Path:
        """Raw values (metrics as fractions, params and FLOPs as counts), one row per run."""
        best = [f"best {self.monitor}", "best step"] if self.monitor else []
        header = ["run", "state", "detail", "step", *self.swept, *self.columns, *self.metrics, *best, "params",
                  "flops", "run_dir"]
        with Path(path).open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            for run in self.runs:
                best_value, best_step = self.best(run)
                writer.writerow([
                    self.label(run), run.state, run.detail, _blank(run.step), *(self.value(run, k) for k in self.swept),
                    *(_blank(_lookup(run.config, c)) for c in self.columns),
                    *(_blank(self.metric(run, m)) for m in self.metrics),
                    *([_blank(best_value), _blank(best_step)] if self.monitor else []),
                    _blank(run.params), _blank(run.flops), run.location])
        return Path(path)


def _blank(value) -> str:
    return "" if value is None else str(value)


def _escape(text: str) -> str:
    return str(text).replace("|", "\\|")


def build_table(runs: list[Run], definitions: Sequence[SweepDefinition] = (), metrics: Sequence[str] | None = None,
                columns: Sequence[str] = (), at_best: bool = False) -> Table:
    """The table of `runs`: swept keys are those the sweeps declare, then any other override whose value
    differs between runs; the metrics are those of METRIC_NAMES the runs have (or `metrics`)."""
    swept: list[str] = []
    order: dict[str, list[str]] = {}
    for definition in definitions:
        for key in definition.swept:
            if key not in swept:
                swept.append(key)
            for value in definition.values.get(key, []):
                order.setdefault(key, [])
                if value not in order[key]:
                    order[key].append(value)
    all_keys = list(dict.fromkeys(k for run in runs for k in run.overrides))
    for key in all_keys:
        differs = len({run.overrides.get(key, DEFAULT) for run in runs}) > 1
        if key not in swept and not is_bookkeeping(key) and differs:
            swept.append(key)
    fixed = {k: runs[0].overrides[k] for k in all_keys if k not in swept and k in runs[0].overrides
             and all(run.overrides.get(k) == runs[0].overrides[k] for run in runs)}
    if metrics is None:
        present = {m for run in runs for m in (*run.metrics, *((run.best or {}).get("metrics") or {}))}
        metrics = [f"{stage}/{name}" for name in METRIC_NAMES for stage in STAGES if f"{stage}/{name}" in present]
    monitors = [run.monitor for run in runs if run.monitor]
    monitor = Counter(monitors).most_common(1)[0][0] if monitors else None
    return Table(runs=list(runs), swept=swept, fixed=fixed, metrics=list(metrics), monitor=monitor,
                 columns=list(columns), order=order, at_best=at_best)

"""Runs on disk: find them under the paths a user gives, read what each left, and tell its state.

The layout comer.app writes (comer/app/run_dir.py, comer/app/summary.py): `<run>/config.yaml` (the resolved
config), `<run>/.hydra/overrides.yaml`, `<run>/metrics.json` (rewritten after every validation, status
"running" until the run finishes or is interrupted) and `<run>/.run.lock` ("host pid") while a process runs
there. A run killed with SIGKILL leaves its lock behind (its process is gone); one that failed with an
exception removed its lock without finishing. Multirun jobs live in `<sweep dir>/<job number>/` beside the
sweep's `multirun.yaml`.
"""
from __future__ import annotations

import json
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import yaml

from .sweep import MULTIRUN_FILE, SweepDefinition, parse_overrides, read_multirun, sweep_definition

# The run-directory layout of comer.app (tests/test_report.py checks these against comer.app's constants).
METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.yaml"
LOCK_FILE = ".run.lock"
OVERRIDES_FILE = ".hydra/overrides.yaml"
# Folders inside runs and sweeps that never hold runs.
SKIPPED_DIRS = {"checkpoints", "wandb", "csv", "val_images", "metric_tables", "predictions", "report"}

FINISHED, INTERRUPTED, RUNNING, KILLED, FAILED, NOT_STARTED = (
    "finished", "interrupted", "running", "killed", "failed", "not started")


@dataclass
class Run:
    """What one run left: where, its state, its overrides, its metrics and its model's size."""

    location: str
    state: str
    detail: str = ""
    run_name: str | None = None
    overrides: dict[str, str] = field(default_factory=dict)
    step: int | None = None
    metrics: dict[str, float | None] = field(default_factory=dict)
    best: dict | None = None  # {"step", "metrics"}
    monitor: str | None = None
    params: int | None = None
    flops: int | None = None
    config: dict | None = None
    sweep: str | None = None  # the sweep directory (or W&B group) it belongs to
    job: int | None = None  # its job number in that sweep


def natural_key(text: str) -> list:
    """Sort key that orders numbers by value: 2 before 10, n2 before n10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(text))]


def is_run_dir(path: Path) -> bool:
    return any((path / name).is_file() for name in (OVERRIDES_FILE, METRICS_FILE, CONFIG_FILE))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    return True


def _lock_owner(path: Path) -> tuple[str, int] | None:
    try:
        host, pid = path.read_text().split()
        return host, int(pid)
    except (OSError, ValueError):
        return None


def run_state(run_dir: Path, summary: dict) -> tuple[str, str]:
    """(state, detail) of a run directory from its metrics.json status and its lock file."""
    status = summary.get("status")
    step = summary.get("global_step")
    at_step = f" at step {step}" if step is not None else ""
    if status == FINISHED:
        return FINISHED, ""
    if status == INTERRUPTED:
        return INTERRUPTED, f"stopped by {summary.get('interrupted_by') or 'a signal'}{at_step}; resume with ckpt_path"
    lock = run_dir / LOCK_FILE
    if lock.exists():
        owner = _lock_owner(lock)
        if owner is None:
            return RUNNING, f"lock file {LOCK_FILE} unreadable; assumed running"
        host, pid = owner
        if host != socket.gethostname():
            return RUNNING, f"lock held by process {pid} on {host} (not checkable from this host)"
        if _pid_alive(pid):
            return RUNNING, f"process {pid}{at_step}"
        return KILLED, f"process {pid} is gone and left its lock{at_step}"
    if not summary:
        return FAILED, f"no {METRICS_FILE}: ended before its first validation"
    return FAILED, f"ended without finishing{at_step} (no lock left: an error stopped it)"


def _load_yaml(path: Path):
    try:
        with path.open() as handle:
            return yaml.safe_load(handle)
    except (OSError, yaml.YAMLError):
        return None


def read_run(run_dir: Path, sweep: Path | None = None, job: int | None = None) -> Run:
    """Everything a run directory says about its run."""
    run_dir = Path(run_dir)
    summary, problem = {}, ""
    if (run_dir / METRICS_FILE).is_file():
        try:
            summary = json.loads((run_dir / METRICS_FILE).read_text())
        except (OSError, json.JSONDecodeError) as error:
            problem = f"{METRICS_FILE} unreadable: {error}"
    config = _load_yaml(run_dir / CONFIG_FILE) if (run_dir / CONFIG_FILE).is_file() else None
    overrides = _load_yaml(run_dir / OVERRIDES_FILE) or []
    state, detail = run_state(run_dir, summary)
    model = summary.get("model") or {}
    return Run(
        location=str(run_dir), state=state, detail="; ".join(filter(None, [problem, detail])),
        run_name=(config or {}).get("run_name"), overrides=parse_overrides(overrides),
        step=summary.get("global_step"), metrics=summary.get("metrics") or {}, best=summary.get("best"),
        monitor=summary.get("monitor"), params=model.get("params"), flops=model.get("flops"), config=config,
        sweep=str(sweep) if sweep is not None else None, job=job)


def _job_number(path: Path) -> int | None:
    return int(path.name) if path.name.isdigit() else None


def read_sweep(sweep_dir: Path) -> tuple[list[Run], SweepDefinition]:
    """The jobs of a multirun directory in job order, and the jobs its sweeper planned but never started
    (the basic launcher stops a sweep at its first failure)."""
    sweep_dir = Path(sweep_dir)
    definition = sweep_definition(read_multirun(sweep_dir))
    job_dirs = sorted((d for d in sweep_dir.iterdir() if d.is_dir() and is_run_dir(d)),
                      key=lambda d: natural_key(d.name))
    runs = [read_run(d, sweep=sweep_dir, job=_job_number(d)) for d in job_dirs]
    if definition.job_overrides is not None:
        started = [sorted(f"{k}={v}" for k, v in run.overrides.items()) for run in runs]
        names = {run.run_name for run in runs}
        run_name = names.pop() if len(names) == 1 else None  # what the planned jobs would have been called
        for number, planned in enumerate(definition.job_overrides):
            values = parse_overrides(planned)
            if sorted(f"{k}={v}" for k, v in values.items()) not in started:
                runs.append(Run(location=str(sweep_dir / str(number)), state=NOT_STARTED,
                                detail="planned by the sweep, never started", overrides=values, run_name=run_name,
                                sweep=str(sweep_dir), job=number))
        runs.sort(key=lambda r: (r.job is None, r.job if r.job is not None else 0, natural_key(r.location)))
    return runs, definition


def collect(paths: Iterable[str | Path]) -> tuple[list[Run], list[SweepDefinition]]:
    """Runs under `paths`: multirun directories (their jobs), run directories, or folders searched for
    both (outputs/, outputs/<run_name>/)."""
    runs: list[Run] = []
    definitions: list[SweepDefinition] = []
    seen: set[str] = set()
    for path in paths:
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such directory (give a multirun directory, run directories, or a "
                                    f"folder holding them, e.g. outputs/)")
        for kind, found in _walk(path):
            if kind == "sweep":
                jobs, definition = read_sweep(found)
                definitions.append(definition)
                new = [run for run in jobs if run.location not in seen]
            else:
                new = [read_run(found)] if str(found) not in seen else []
            seen.update(run.location for run in new)
            runs.extend(new)
    return runs, definitions


def _walk(path: Path) -> Iterator[tuple[str, Path]]:
    """("sweep", dir) for multirun directories, ("run", dir) for run directories outside them."""
    if is_run_dir(path):
        yield "run", path
        return
    children = sorted((c for c in path.iterdir() if c.is_dir()), key=lambda c: natural_key(c.name))
    # a multirun directory: Hydra's multirun.yaml, or (Optuna writes none) numbered job directories
    if (path / MULTIRUN_FILE).is_file() or any(c.name.isdigit() and is_run_dir(c) for c in children):
        yield "sweep", path
        return
    for child in children:
        if child.name.startswith(".") or child.name in SKIPPED_DIRS:
            continue
        yield from _walk(child)
